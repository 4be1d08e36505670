"""Nothing the user owns is deleted or replaced, and no command writes a model that is not what
it claims to be: output paths that touch inputs, tampered or mismatched alignments, numeric
options out of range, full disks; each refused in one line before any work."""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
import transformers as T
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tests.conftest import cli, invoke, run_cli

ARGS = ["--samples", "64", "--max-length", "32"]


def _align(a, b, out, *extra):
    return invoke("mergekit-permute", "align", a, b, "--data", "shakespeare-calib", *ARGS,
                  "--out", out, *extra)


def _refused(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    message = r.stderr.strip()
    assert message.startswith("Error: ") and "Traceback" not in message, message
    for needle in needles:
        assert needle in message, (needle, message)


def _snapshot(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


# ---- output paths -------------------------------------------------------------------------------

@pytest.mark.parametrize("out", ["", ".", "..", "   "])
def test_an_empty_or_working_directory_output_is_refused(pair, tmp_path, monkeypatch, out,
                                                         no_forward):
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("precious")
    monkeypatch.chdir(work)
    r = _align(*pair, out, "--overwrite")
    _refused(r, "output path is empty" if not out.strip() else "is the working directory")
    assert (work / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize("where", ["A", "B", "A/sub", "parent"])
def test_an_output_that_touches_an_input_is_refused(pair, tmp_path, where, no_forward):
    a, b = pair
    before = _snapshot(tmp_path)
    out = {"A": a, "B": b, "A/sub": f"{a}/sub", "parent": str(tmp_path)}[where]
    relation = {"A": " is the model A", "B": " is the model B", "A/sub": "lies inside the model A",
                "parent": "contains the model"}[where]
    _refused(_align(a, b, out, "--overwrite"), relation)
    assert _snapshot(tmp_path) == before


def test_apply_and_merge_never_write_over_their_inputs(pair, tmp_path, no_forward):
    a, b = pair
    aln = tmp_path / "aln"
    aln.mkdir()
    (aln / "permutations.safetensors").write_bytes(b"")   # (never read: refused before)
    before = _snapshot(tmp_path)
    _refused(invoke("mergekit-permute", "apply", aln, b, "--out", b, "--overwrite"),
             "is the checkpoint")
    _refused(invoke("mergekit-permute", "apply", aln, b, "--out", aln, "--overwrite"),
             "is the alignment")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": a, "parameters": {"weight": 1.0}}, {"model": b, "parameters": {"weight": 1.0}}]}))
    _refused(invoke("mergekit-permute", "merge", recipe, a, "--overwrite"), "is the model")
    data = tmp_path / "eval.txt"
    data.write_text("Good morrow, cousin.\n" * 20)
    _refused(invoke("mergekit-permute", "barrier", a, b, "--data", data, "--out", tmp_path,
                    "--overwrite"), "contains")
    assert _snapshot(tmp_path) == {**before, "r.yml": recipe.read_bytes(),
                                   "eval.txt": data.read_bytes()}


def test_symlinks_and_loops_as_output_are_refused_before_work(pair, tmp_path, no_forward):
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    _refused(_align(*pair, loop), "symbolic link that loops")
    target = tmp_path / "target"
    target.mkdir()
    link = tmp_path / "link"
    os.symlink(target, link)
    _refused(_align(*pair, link, "--overwrite"), "is a symbolic link")


def test_overwrite_replaces_only_what_this_tool_wrote(pair, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    _refused(_align(*pair, foreign, "--overwrite"), "did not write", "Remove it yourself")
    assert (foreign / "notes.txt").read_text() == "mine"
    ours = tmp_path / "ours"
    assert _align(*pair, ours, "--permutations-only").returncode == 0
    assert _align(*pair, ours, "--permutations-only", "--overwrite").returncode == 0
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _align(*pair, empty, "--permutations-only").returncode == 0
    assert (empty / "permutations.safetensors").is_file()


def test_space_is_estimated_in_readable_units(pair, tmp_path, monkeypatch, no_forward):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 900))
    r = _align(*pair, tmp_path / "o")
    _refused(r, "needs about", "has 900 B free")
    assert "0.00 GiB" not in r.stderr


def test_a_full_disk_while_writing_is_one_line_and_leaves_nothing(pair, tmp_path, monkeypatch):
    import mergekit_permute.io.checkpoints as checkpoints

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(checkpoints, "stream_safetensors", full)
    _refused(_align(*pair, tmp_path / "o"), "no space left while writing")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith((".o", "o"))]


# ---- apply: only symmetries of the target are replayed -----------------------------------------

@pytest.fixture
def aligned(pair, tmp_path):
    """An orthogonal-residual (folded) alignment of the untied llama pair."""
    out = tmp_path / "aln"
    assert _align(*pair, out, "--permutations-only").returncode == 0
    assert json.loads((out / "alignment.json").read_text())["residual_policy"] == "orthogonal"
    return out


def _tied_copy(src: str, out: Path) -> str:
    model = T.AutoModelForCausalLM.from_pretrained(src)
    config = model.config
    config.tie_word_embeddings = True
    tied = T.LlamaForCausalLM(config)
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    tied.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(src) / f, out / f)
    return str(out)


def test_apply_refuses_a_tied_checkpoint_for_an_untied_alignment(pair, aligned, tmp_path):
    tied = _tied_copy(pair[1], tmp_path / "tied")
    _refused(invoke("mergekit-permute", "apply", aligned, tied, "--out", tmp_path / "x"),
             "ties its output head to the embeddings")
    assert not (tmp_path / "x").exists()
    # without the recorded layout (an older alignment.json), the rotation itself is refused
    doc = json.loads((aligned / "alignment.json").read_text())
    del doc["spec"]
    (aligned / "alignment.json").write_text(json.dumps(doc))
    _refused(invoke("mergekit-permute", "apply", aligned, tied, "--out", tmp_path / "x"),
             "rotates the residual stream", "tied to the embeddings")


def test_a_pair_that_differs_only_in_tying_is_named(pair, tmp_path, no_forward):
    tied = _tied_copy(pair[1], tmp_path / "tied")
    _refused(_align(pair[0], tied, tmp_path / "o"), "model B ties its output head",
             "both must be tied or both untied")


def _tamper(folder: Path, how: str) -> None:
    path = folder / "permutations.safetensors"
    flat = load_file(str(path))
    if how == "nan_gauge":
        key = next(k for k in flat if k.startswith("gauge/"))
        flat[key][0] = float("nan")
    elif how == "zero_gauge":
        key = next(k for k in flat if k.startswith("gauge/"))
        flat[key][1] = 0.0
    elif how == "residual_x2":
        flat["residual"] = flat["residual"] * 2
    elif how == "q_rolled":
        flat["attn.0/q"] = flat["attn.0/q"].roll(1)
    elif how == "k_not_q":
        flat["attn.1/k"] = flat["attn.1/k"].flip(0)
    elif how == "ffn_matrix":
        n = flat["ffn.0"].numel()
        flat["ffn.0"] = torch.eye(n, dtype=torch.float64)
    elif how == "missing_space":
        del flat["ffn.1"]
    save_file(flat, str(path))


@pytest.mark.parametrize("how,needle", [
    ("nan_gauge", "not finite"), ("zero_gauge", "zero gain"),
    ("residual_x2", "not orthogonal"), ("q_rolled", "whole heads"),
    ("k_not_q", "whole heads"), ("ffn_matrix", "permutation only"),
    ("missing_space", "lacks space ffn.1"),
])
def test_apply_refuses_tampered_alignments(pair, aligned, tmp_path, how, needle):
    _tamper(aligned, how)
    _refused(invoke("mergekit-permute", "apply", aligned, pair[1], "--out", tmp_path / "x"),
             needle)
    assert not (tmp_path / "x").exists()


def test_apply_names_the_files_of_an_n_model_merge(pair, aligned, tmp_path):
    several = tmp_path / "merged"
    several.mkdir()
    for k in (1, 2):
        shutil.copy(aligned / "permutations.safetensors", several / f"permutations-{k}.safetensors")
    _refused(invoke("mergekit-permute", "apply", several, pair[1], "--out", tmp_path / "x"),
             "permutations-1.safetensors", "pass the file")
    r = invoke("mergekit-permute", "apply", several / "permutations-2.safetensors", pair[1],
               "--out", tmp_path / "x")
    assert r.returncode == 0, r.stderr


def test_outputs_do_not_carry_the_inputs_run_records(pair, aligned, tmp_path):
    """A checkpoint that is itself an earlier output holds that run's alignment.json: a new
    output written from it carries its config and tokenizer, never that stale record."""
    earlier = tmp_path / "earlier"
    assert _align(*pair, earlier).returncode == 0
    (earlier / "barrier.json").write_text("{}")
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(aligned / "permutations.safetensors", lone / "permutations.safetensors")
    r = invoke("mergekit-permute", "apply", lone / "permutations.safetensors", earlier,
               "--out", tmp_path / "x")
    assert r.returncode == 0, r.stderr
    written = {p.name for p in (tmp_path / "x").iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors"} <= written
    assert not written & {"alignment.json", "barrier.json"}, written


# ---- numbers, devices, cache debris -------------------------------------------------------------

@pytest.mark.parametrize("args,needle", [
    (["--matching", "learned", "--learn-lr", "1e4"], "less than or equal to 1"),
    (["--matching", "learned", "--learn-lr", "inf"], "finite"),
    (["--matching", "learned", "--learn-lambdas", "0.5,,0.5"], "learn_lambdas"),
    (["--matching", "learned", "--learn-lambdas", "1.5"], "strictly between 0 and 1"),
    (["--device", "mps"], "no Apple MPS device"),
    (["--device", "cuda:7"], "cuda"),
])
def test_numbers_and_devices_are_checked_before_work(pair, tmp_path, args, needle, no_forward):
    if args[-1].startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    _refused(_align(*pair, tmp_path / "o", *args), needle)


def test_a_singular_map_falls_back_to_the_best_step(pair, monkeypatch, caplog):
    from mergekit_permute.align import learn
    from mergekit_permute.align.pipeline import align_pair
    from mergekit_permute.settings import AlignSettings
    real, calls = learn.Maps.transforms, {"n": 0}

    def failing(self, hard=False):
        calls["n"] += 1
        if calls["n"] == 4:
            raise torch.linalg.LinAlgError("linalg.inv: The diagonal element 3 is zero, the "
                                           "inversion could not be completed because the input "
                                           "matrix is singular.")
        return real(self, hard)
    monkeypatch.setattr(learn.Maps, "transforms", failing)
    settings = AlignSettings(samples=64, max_length=32, batch_size=8, matching="learned",
                             learn_steps=20)
    alignment = align_pair(*pair, "shakespeare-calib", settings)[0]
    assert "keeping the best maps" in caplog.text
    assert alignment.info["learned"]["steps_run"] < 20


def test_stale_cache_debris_is_removed_on_the_next_run(pair, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir()
    monkeypatch.setenv("MERGEKIT_PERMUTE_CACHE", str(cache))
    for name in ("stats-abc.partial-999999999", "stats-abc.old-999999998"):
        (cache / name).mkdir()
    assert _align(*pair, tmp_path / "o", "--permutations-only").returncode == 0
    assert sorted(p.name for p in cache.iterdir() if "999" in p.name) == []


# ---- MergeKit runs, cards, modes ----------------------------------------------------------------

def test_mergekit_yaml_refusals_are_one_line(pair, tmp_path):
    a, b = pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "permute", "base_model": a,
                                      "models": [{"model": a}, {"model": b}],
                                      "parameters": {"calibration_sample": 8}}))
    r = run_cli(cli("mergekit-yaml"), str(recipe), str(tmp_path / "o"))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(
        "Error: merge_method permute: unknown parameter(s) ['calibration_sample']")


def test_the_card_carries_licenses_and_the_barrier_and_files_follow_the_umask(pair, tmp_path):
    a, b = pair
    for path, lic in ((a, "apache-2.0"), (b, "apache-2.0")):
        Path(path, "README.md").write_text(f"---\nlicense: {lic}\n---\n# a model\n")
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "permute", "base_model": a, "dtype": "float32",
        "models": [{"model": a}, {"model": b}],
        "parameters": {"calibration_samples": 64, "max_length": 32}}))
    old = os.umask(0o022)
    try:
        r = invoke("mergekit-permute", "merge", recipe, tmp_path / "m", "--barrier",
                   "shakespeare-eval", "--barrier-lambdas", "3")
    finally:
        os.umask(old)
    assert r.returncode == 0, r.stderr
    card = (tmp_path / "m" / "README.md").read_text()
    assert "license: apache-2.0" in card and "License: apache-2.0, the license of every" in card
    assert "| vanilla |" in card and "![loss barrier](barrier.png)" in card
    assert (tmp_path / "m" / "barrier.png").is_file()
    assert "| this merge |" in r.stdout   # the table, printed too
    for f in (tmp_path / "m").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
    # the merge reuses the alignment its barrier measured: the model of a plain merge
    assert invoke("mergekit-permute", "merge", recipe, tmp_path / "plain").returncode == 0
    for name in ("model.safetensors", "permutations.safetensors"):
        assert (tmp_path / "m" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()
    Path(b, "README.md").write_text("---\nlicense: mit\n---\n")
    from mergekit_permute.card import license_lines
    assert license_lines([a, b])[0] == "other"


# ---- fuzzing -----------------------------------------------------------------------------------

FUZZ = settings(max_examples=15, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
parts = st.sampled_from(["", ".", "..", "A", "B", "sub", "~", "/", "x y", "A/..", "./B"])


@FUZZ
@given(path=st.lists(parts, min_size=0, max_size=3).map(lambda p: "/".join(p)),
       overwrite=st.booleans())
def test_fuzzed_out_paths_never_touch_the_inputs(zoo, tmp_path_factory, path, overwrite):
    from mergekit_permute.io.outputs import check_output
    from mergekit_permute.io.preflight import PreflightError
    root = tmp_path_factory.mktemp("fuzz")
    for name in ("A", "B"):
        (root / name).mkdir()
        (root / name / "config.json").write_text("{}")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        try:
            out = check_output(path, overwrite, [("model A", "A"), ("model B", "B")])
        except PreflightError:
            return
        for name in ("A", "B"):
            inp = (root / name).resolve()
            assert out != inp and not out.is_relative_to(inp) and not inp.is_relative_to(out)
    finally:
        os.chdir(cwd)


@FUZZ
@given(key=st.sampled_from(["residual", "attn.0/q", "attn.0/o", "attn.1/v", "ffn.0", "ffn.1/gate"]),
       how=st.sampled_from(["swap", "scale", "noise", "nan"]))
def test_fuzzed_tampering_is_refused_or_exact(aligned_once, key, how):
    from mergekit_permute.core.alignment import load_alignment
    folder, spec, gains_b, state, logits, inputs = aligned_once
    flat = load_file(str(folder / "permutations.safetensors"))
    t = flat[key].clone()
    if how == "swap":
        t[[0, 1]] = t[[1, 0]]
    elif how == "scale":
        t = t * 2 if t.is_floating_point() else t.flip(0)
    elif how == "noise":
        t = t + 1e-3 * torch.randn_like(t.double()).to(t.dtype) if t.is_floating_point() else t.roll(3)
    else:
        t = t.double()
        t.view(-1)[0] = float("nan")
    tampered = folder.parent / f"t-{key.replace('/', '_')}-{how}"
    tampered.mkdir(exist_ok=True)
    save_file({**flat, key: t.contiguous()}, str(tampered / "permutations.safetensors"))
    shutil.copy(folder / "alignment.json", tampered / "alignment.json")
    try:
        alignment = load_alignment(tampered, spec, gains_b)
    except ValueError:
        return
    # accepted: then it is a symmetry (e.g. two FF neurons swapped) and B's function is kept
    model = T.LlamaForCausalLM(T.AutoConfig.from_pretrained(folder.parent / "B"))
    model.load_state_dict(alignment.state_dict(state))
    with torch.no_grad():
        out = model(**inputs).logits
    assert torch.allclose(out, logits, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def aligned_once(zoo, tmp_path_factory):
    from mergekit_permute.io.checkpoints import CheckpointSource
    from mergekit_permute.io.models import load_config, open_checkpoint
    from mergekit_permute.spec import spec_for_config
    a, b = zoo("llama")
    root = tmp_path_factory.mktemp("tamper")
    shutil.copytree(b, root / "B")
    assert _align(a, b, root / "aln", "--permutations-only").returncode == 0
    spec = spec_for_config(load_config(b))
    reader = CheckpointSource(open_checkpoint(b, spec), spec)
    gains_b = {f.norm: reader.get(f.norm).double() for f in spec.norm_folds}
    model = T.AutoModelForCausalLM.from_pretrained(b)
    inputs = {"input_ids": torch.tensor([[2, 40, 50, 60, 70, 80, 90]])}
    with torch.no_grad():
        logits = model(**inputs).logits
    return root / "aln", spec, gains_b, model.state_dict(), logits, inputs


@pytest.mark.parametrize("arch", ["llama", "bert"])
@pytest.mark.parametrize("update", [{"matching": "learned", "learn_steps": 6},
                                    {"vo": "orthogonal"}])
def test_every_map_the_tool_makes_passes_the_symmetry_check(zoo, tmp_path, arch, update):
    from mergekit_permute.align.pipeline import align_pair
    from mergekit_permute.core.alignment import load_alignment, save_alignment
    from mergekit_permute.core.permute import norm_gains
    from mergekit_permute.settings import AlignSettings
    a, b = zoo(arch)
    settings = AlignSettings(samples=64, max_length=32, **update)
    alignment, _, model_b, _ = align_pair(a, b, "shakespeare-calib", settings)
    save_alignment(alignment, tmp_path)
    loaded = load_alignment(tmp_path, alignment.spec, norm_gains(alignment.spec,
                                                                 model_b.state_dict()))
    assert loaded.transforms.keys() == alignment.transforms.keys()
