"""Inputs at the edges, each found by a review and each failing on the code before its fix:
outputs on mount points, in read-only parents or spelt `x/..`; read-only sources; JSON Lines
with U+2028, byte order marks, lone surrogates; broken shard indexes, safetensors beside pickles;
models without tokenizers; barrier inputs checked before any model loads, class labels, masks
independent of --batch-size, even lambda counts; recipes quoted, piped or misspelt."""

import json
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from mergekit_permute.io.data import DataError, load_texts
from tests.conftest import cli, invoke
from tests.test_data_safety import _align, _refused


# ---- outputs ------------------------------------------------------------------------------------

def test_a_mount_point_as_output_is_refused_before_work(pair, tmp_path, monkeypatch, no_forward):
    target = tmp_path / "volume"
    target.mkdir()
    ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == str(target) or ismount(p))
    _refused(_align(*pair, target), "is a mount point", str(target / "merged-model"))


def test_the_outputs_parent_must_be_writable(pair, tmp_path, monkeypatch, no_forward):
    """The output is built in its parent and renamed: that is what the probe must try."""
    parent = tmp_path / "shared"
    (parent / "mine").mkdir(parents=True)
    mkstemp = tempfile.mkstemp

    def probe(*args, dir=None, **kwargs):
        if Path(dir) == parent:
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)
    monkeypatch.setattr(tempfile, "mkstemp", probe)
    _refused(_align(*pair, parent / "mine"), f"{parent} is not writable")


def test_a_dotdot_output_is_the_directory_it_names(pair, tmp_path, monkeypatch, no_forward):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    _refused(_align(*pair, "new/.."), "is the working directory")


def test_a_read_only_sources_files_are_copied_writable(tmp_path):
    from mergekit_permute.io.checkpoints import _set_config_dtype, copy_sidecars
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    os.chmod(src / "config.json", 0o444)
    copy_sidecars(src, dst)
    assert os.stat(dst / "config.json").st_mode & stat.S_IWUSR
    _set_config_dtype(dst / "config.json", torch.float32)
    assert json.loads((dst / "config.json").read_text())["torch_dtype"] == "float32"


# ---- text ---------------------------------------------------------------------------------------

def test_json_lines_may_hold_unicode_line_separators(tmp_path):
    rows = ["line one\u2028line two", "ellipsis mojibake \x85 here", "para\u2029graph"]
    path = tmp_path / "u.jsonl"
    path.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows),
                    encoding="utf-8")
    assert load_texts(str(path)) == rows


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbfhello\nworld\n")
    (tmp_path / "b.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "hello"}\n')
    assert load_texts(str(tmp_path / "b.txt")) == ["hello", "world"]
    assert load_texts(str(tmp_path / "b.jsonl")) == ["hello"]


def test_a_lone_surrogate_is_named_with_its_line(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "cut emoji \\ud83d"}\n')
    with pytest.raises(DataError, match=r"s.jsonl:2: 'text' holds an unpaired surrogate"):
        load_texts(str(path))


# ---- checkpoints --------------------------------------------------------------------------------

def _shards(root: Path, weight_map) -> None:
    root.mkdir()
    save_file({"a": torch.zeros(2)}, str(root / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2)}, str(root / "model-00002-of-00002.safetensors"))
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.parametrize("weight_map, needle", [
    ({"a": "model-00002-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
     "lists a in this file, but the file does not hold it"),
    ([], "not a valid shard index"),
])
def test_a_broken_shard_index_is_named(tmp_path, weight_map, needle):
    from mergekit_permute.io.checkpoints import Checkpoint, CheckpointError
    _shards(tmp_path / "m", weight_map)
    with pytest.raises(CheckpointError, match=needle):
        checkpoint = Checkpoint(str(tmp_path / "m"))
        [checkpoint.meta(k) for k in checkpoint.keys()]


def test_safetensors_are_read_before_pickles_beside_them(tmp_path):
    from mergekit_permute.io.checkpoints import Checkpoint
    root = tmp_path / "m"
    root.mkdir()
    save_file({"w": torch.ones(2)}, str(root / "model.safetensors"))
    torch.save({"w": torch.zeros(2)}, root / "pytorch_model-00001-of-00001.bin")
    (root / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {"w": "pytorch_model-00001-of-00001.bin"}}))
    checkpoint = Checkpoint(str(root))
    assert checkpoint.files == ["model.safetensors"] and not checkpoint.is_pickle
    assert torch.equal(checkpoint.get("w"), torch.ones(2))


def test_a_model_without_tokenizer_files_is_named(pair, tmp_path, no_forward):
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(Path(pair[1]) / f, bare / f)
    r = invoke("mergekit-permute", "align", pair[0], bare, "--matching", "weights",
               "--out", tmp_path / "o")
    _refused(r, f"model {bare} has no tokenizer files", "save_pretrained")


# ---- barrier ------------------------------------------------------------------------------------

def test_barrier_checks_calibration_text_before_loading_models(pair, tmp_path, monkeypatch):
    import mergekit_permute.barrier as barrier

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the calibration text was checked")
    monkeypatch.setattr(barrier, "load_model", load)
    (tmp_path / "short.txt").write_text("too short\n")
    r = invoke("mergekit-permute", "barrier", *pair, "--data", "shakespeare-eval",
               "--calibration", tmp_path / "short.txt", "--methods", "vanilla,default",
               "--eval-samples", "8", "--out", tmp_path / "o")
    _refused(r, "calibration data gives", "barrier: --calibration")


def test_class_labels_are_checked_against_the_head(tmp_path):
    from mergekit_permute.evaluate import labelled
    path = tmp_path / "l.jsonl"
    path.write_text('{"text": "a", "label": 1.0}\n{"text": "b", "label": 2}\n')
    assert labelled(str(path), 8, "label", num_labels=3) == (["a", "b"], [1, 2])
    assert labelled(str(path), 8, "label", num_labels=1)[1] == [1.0, 2.0]
    with pytest.raises(DataError, match=r"l.jsonl:2: 'label' is 2, but the model's head has 2"):
        labelled(str(path), 8, "label", num_labels=2)


def test_masked_positions_do_not_depend_on_the_batch_size(zoo):
    from transformers import AutoTokenizer

    from mergekit_permute.io.batches import tokenize
    tok = AutoTokenizer.from_pretrained(zoo("bert")[0])
    texts = load_texts("shakespeare-eval", 24)

    def rows(batch_size):
        out = []
        for b in tokenize(tok, texts, 32, batch_size, "BertForMaskedLM", "mlm", seed=3):
            for ids, labels, attn in zip(b["input_ids"], b["labels"], b["attention_mask"]):
                n = int(attn.sum())
                out.append((ids[:n].tolist(), labels[:n].tolist()))
        return out
    assert rows(4) == rows(8) == rows(24)
    assert any(label != -100 for _, labels in rows(8) for label in labels)


def test_the_lambda_grid_always_holds_the_midpoint():
    import numpy as np

    from mergekit_permute.barrier import lambda_grid
    assert lambda_grid(11) == [float(x) for x in np.linspace(0, 1, 11)]
    assert lambda_grid(4) == sorted([0.0, 1 / 3, 2 / 3, 1.0, 0.5])
    for n in (3, 21, 99, 197):
        grid = lambda_grid(n)
        assert len(grid) == n and 0.5 in grid and grid == sorted(grid)


# ---- recipes ------------------------------------------------------------------------------------

def _recipe(a, b, **top):
    return {"merge_method": "permute", "base_model": a, "models": [{"model": a}, {"model": b}],
            "parameters": {"matching": "weights"}, "dtype": "float32", **top}


@pytest.mark.parametrize("spelling", ["quoted", "bom", "flow"])
def test_a_permute_recipe_is_checked_however_it_is_spelt(pair, tmp_path, spelling, no_forward):
    a, b = pair
    raw = _recipe(a, b)
    raw["paramters"] = raw.pop("parameters")
    text = {"quoted": yaml.safe_dump(raw).replace("merge_method: permute",
                                                   'merge_method: "permute"'),
            "bom": "\ufeff" + yaml.safe_dump(raw), "flow": json.dumps(raw)}[spelling]
    recipe = tmp_path / "r.yml"
    recipe.write_text(text, encoding="utf-8")
    _refused(invoke("mergekit-yaml", recipe, tmp_path / "o"), "unknown key(s) ['paramters']")


@pytest.mark.parametrize("change, needle", [
    (lambda r: r["models"][1].update(parameters={"weight": float("nan")}),
     "weight must be a number >= 0, got nan"),
    (lambda r: r["models"][1].update(parameters={"wieght": 0.3}), "did you mean 'weight'?"),
    (lambda r: r.update(tokenizer={"source": "base", "pad_to_multiple": 64}),
     "did you mean 'pad_to_multiple_of'?"),
    (lambda r: r["parameters"].update(max_length=100000), "pass max_length: "),
])
def test_recipe_values_are_refused_by_their_recipe_names(pair, tmp_path, change, needle,
                                                         no_forward):
    raw = _recipe(*pair)
    change(raw)
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump(raw))
    _refused(invoke("mergekit-yaml", recipe, tmp_path / "o"), needle)


def test_a_piped_recipe_still_merges(pair, tmp_path):
    """Reading a pipe to look for `permute` must leave MergeKit the recipe (any method)."""
    a, b = pair
    recipe = yaml.safe_dump({"merge_method": "linear", "dtype": "float32", "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]})
    r = subprocess.run([cli("mergekit-yaml"), "/dev/stdin", str(tmp_path / "o"),
                        "--no-write-model-card"], input=recipe, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONWARNINGS="ignore"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "o" / "model.safetensors").is_file()


# ---- learned settings and the card -------------------------------------------------------------

@pytest.mark.parametrize("update, needle", [
    ({"ffn": "identity", "attention": "identity", "residual": "identity"}, "there is none"),
    ({"ffn": "identity", "learn_permutations": True}, "learn_permutations learns the FF"),
    ({"attention": "monotonic", "learn_heads": True}, "attention=monotonic keeps it"),
    ({"samples": 4, "learn_samples": 2, "batch_size": 8}, "at least two calibration batches"),
])
def test_learned_settings_that_cannot_be_honoured_are_refused_up_front(update, needle):
    from mergekit_permute.settings import AlignSettings, check_settings
    from mergekit_permute.spec import spec_for_config
    from tests.tiny import build
    spec = spec_for_config(build("LlamaForCausalLM").config)
    with pytest.raises(ValueError, match=needle):
        check_settings(spec, AlignSettings(matching="learned", **update))


def test_a_task_head_is_refused_before_learned_alignment_starts():
    from mergekit_permute.settings import AlignSettings, check_settings
    from mergekit_permute.spec import spec_for_config
    from tests.tiny import build
    spec = spec_for_config(build("BertForSequenceClassification").config)
    with pytest.raises(ValueError, match="needs a language-model loss"):
        check_settings(spec, AlignSettings(matching="learned"))


@pytest.mark.parametrize("start, how, measure", [
    ("weights", "from data-free weight matching (Git Re-Basin), then exact symmetries learned",
     "weight cosine (the start, before learning)"),
    ("activations", "from activation correlations on calibration text, then exact symmetries",
     "mean matched correlation (the start, before learning)"),
])
def test_the_card_names_a_learned_alignments_start(start, how, measure):
    from types import SimpleNamespace

    from mergekit_permute.card import _start, alignment_section, what_was_done
    from mergekit_permute.settings import AlignSettings
    settings = AlignSettings(matching="learned")
    learned = {"start": start, "maps": ["residual", "vo"], "passages": 2000, "steps_run": 600,
               "held_out_loss_start": 4.7, "held_out_loss_best": 4.5, "best_step": 540}
    alignment = SimpleNamespace(settings=settings, info={"learned": learned},
                                report={"ffn.0": {"kind": "ffn", "mean_corr_before": 0.1,
                                                  "mean_corr_after": 0.5}})
    assert _start(alignment) == start
    assert how in what_was_done(settings, [alignment], 2)[0]
    section = alignment_section(alignment)
    assert f"| space | {measure} before | after |" in section
