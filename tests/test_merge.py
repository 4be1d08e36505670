import pytest
import torch
import transformers as T
import yaml
from safetensors.torch import load_file

from tests.conftest import invoke, third_model

PARAMS = {"calibration_data": "shakespeare-calib", "calibration_samples": 120, "max_length": 32,
          "residual": "all"}  # permutations: the merge is (A + aligned B)/2 with A as stored


def recipe(tmp_path, a, b, params=None, models=None, **top):
    doc = {"merge_method": "permute", "base_model": a, "dtype": "float32",
           "models": models or [{"model": a}, {"model": b}],
           "parameters": PARAMS if params is None else params, **top}
    path = tmp_path / "recipe.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize("arch", ["bert", "llama"])
@pytest.mark.parametrize("runner", ["mergekit-yaml", "mergekit-permute"])
def test_merge_equals_average_of_a_and_aligned_b(zoo, tmp_path, arch, runner):
    a, b = zoo(arch)
    aligned = tmp_path / "aligned"
    r = invoke("mergekit-permute", "align", a, b, "--data", "shakespeare-calib",
                "--samples", "120", "--max-length", "32", "--residual", "all", "--out", str(aligned))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "merged"
    cmd = ["mergekit-yaml", str(recipe(tmp_path, a, b)), str(out)] if runner == "mergekit-yaml" \
        else ["mergekit-permute", "merge", str(recipe(tmp_path, a, b)), str(out)]
    r = invoke(*cmd)
    assert r.returncode == 0, r.stderr[-3000:]
    merged, wa, wb = (load_file(f"{p}/model.safetensors") for p in (out, a, aligned))
    for k, v in merged.items():
        torch.testing.assert_close(v, (wa[k] + wb[k]) / 2, rtol=0, atol=1e-6, msg=k)
    model = T.AutoModelForMaskedLM.from_pretrained(out) if arch == "bert" else \
        T.AutoModelForCausalLM.from_pretrained(out)
    tok = T.AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = model(**tok(["To be, or not to be"], return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "Alignment (mergekit-permute)" in card and "merge_method: permute" in card
    assert (out / "alignment.json").exists() and (out / "permutations.safetensors").exists()


@pytest.mark.parametrize("params,models_extra,message", [
    ({**PARAMS, "calibraton_samples": 5}, None, "unknown parameter(s) ['calibraton_samples']"),
    ({**PARAMS, "attention": "heads"}, None, "attention: Input should be"),
    ({**PARAMS, "calibration_samples": 0}, None, "calibration_samples: Input should be greater"),
    (PARAMS, {"max_length": 3}, "are not per-model"),
    (PARAMS, {"weight": -1}, "weight must be a number >= 0"),
])
def test_bad_recipes_are_refused_clearly(zoo, tmp_path, params, models_extra, message):
    from click.testing import CliRunner

    from mergekit_permute.cli import main
    a, b = zoo("bert")
    models = [{"model": a}, {"model": b, **({"parameters": models_extra} if models_extra else {})}]
    path = recipe(tmp_path, a, b, params=params, models=models)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["merge", str(path), str(out)])
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not out.exists()


def test_stock_mergekit_yaml_refuses_unknown_keys(zoo, tmp_path):
    """MergeKit ignores unknown keys; with the plugin installed `permute` recipes do not."""
    a, b = zoo("bert")
    out = tmp_path / "out"
    r = invoke("mergekit-yaml", str(recipe(tmp_path, a, b, {**PARAMS, "resdual": "all"})),
                str(out))
    assert r.returncode != 0 and "unknown parameter(s) ['resdual']" in r.stderr
    assert not out.exists() or not any(out.iterdir())


def test_one_model_and_missing_base_are_refused(zoo, tmp_path):
    a, b = zoo("bert")
    path = recipe(tmp_path, a, b, models=[{"model": a}])
    r = invoke("mergekit-permute", "merge", str(path), str(tmp_path / "o"))
    assert r.returncode == 2 and "at least two distinct models" in r.stderr
    path = recipe(tmp_path, a, b, base_model=None)
    r = invoke("mergekit-permute", "merge", str(path), str(tmp_path / "o"))
    assert r.returncode == 2 and "needs `base_model`" in r.stderr
    assert not (tmp_path / "o").exists()


def test_shipped_local_recipe_is_valid():
    from pathlib import Path

    from mergekit_permute.recipes import load_recipe
    from mergekit_permute.mergekit.run import validate_recipe
    for path in sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.yml")):
        settings, data, *_ = validate_recipe(load_recipe(path))
        assert settings.attention == "head_perm"


def test_three_models_merge_through_mergekit_and_evaluate(zoo, tmp_path):
    """N >= 3: every model aligned to the base; `barrier` with N models reports the merge."""
    from click.testing import CliRunner

    from mergekit_permute.cli import main
    a, b = zoo("llama")
    c = third_model(b, tmp_path / "c", 0.02)  # a third "seed": B nudged
    path = recipe(tmp_path, a, b, models=[{"model": a}, {"model": b}, {"model": str(c)}])
    r = CliRunner().invoke(main, ["merge", str(path), str(tmp_path / "m")])
    assert r.exit_code == 0, r.output
    for f in ("alignment-1.json", "alignment-2.json", "permutations-2.safetensors"):
        assert (tmp_path / "m" / f).exists(), f
    assert "2 models were aligned each to the base model" in (tmp_path / "m" / "README.md").read_text()
    r = CliRunner().invoke(main, ["barrier", a, b, str(c), "--data", "shakespeare-eval",
                                  "--eval-samples", "32", "--eval-max-length", "32",
                                  "--samples", "120", "--max-length", "32",
                                  "--methods", "vanilla,default", "--out", str(tmp_path / "ev")])
    assert r.exit_code == 0, r.output
    import json
    doc = json.loads((tmp_path / "ev" / "merge.json").read_text())
    assert len(doc["parents"]) == 3
    assert doc["methods"]["default"]["merge_loss"] < doc["methods"]["vanilla"]["merge_loss"]


def test_registration_works_whichever_module_is_imported_first():
    import subprocess
    import sys
    check = ("import mergekit.merge_methods as mm; "
             "assert 'permute' in [m.spec.name for m in mm.registered_methods()]")
    firsts = ("", "import mergekit_permute.mergekit.method; ", "import mergekit_permute.demo; ",
              "import mergekit.scripts.run_yaml; ")
    procs = {first: subprocess.Popen([sys.executable, "-c", first + check], text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for first in firsts}   # side by side: each its own fresh interpreter
    for first, proc in procs.items():
        stderr = proc.communicate()[1]
        assert proc.returncode == 0, (first, stderr[-1500:])
        assert "could not hook" not in stderr, (first, stderr[-1500:])


def test_merge_card_is_hub_ready_and_says_what_was_done(zoo, tmp_path):
    """The card of `mergekit-permute merge`: titled with the output's final name (not the
    temporary directory), Hub metadata that huggingface_hub parses, the method as run."""
    from click.testing import CliRunner
    from huggingface_hub import ModelCard

    from mergekit_permute.cli import main
    a, b = zoo("llama")
    params = {**PARAMS, "residual": "orthogonal", "vo": "orthogonal", "repair": True}
    out = tmp_path / "my-merge"
    r = CliRunner().invoke(main, ["merge", str(recipe(tmp_path, a, b, params)), str(out)])
    assert r.exit_code == 0, r.output
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "transformers"
    assert {"mergekit", "merge", "mergekit-permute"} <= set(card.data.tags)
    assert card.data.base_model == []   # local paths are not Hub ids
    text = card.text
    assert text.lstrip().startswith("# my-merge\n")
    for said in ("rotated by an orthogonal map", "V/O dims rotated per KV group", "REPAIR",
                 "vo=orthogonal,repair=true,reference=base", "Feed-forward neurons: permuted"):
        assert said in text, said
    assert "permuted into model A's basis from activation" not in text


def test_card_lists_hub_ids_as_base_models(tmp_path):
    from types import SimpleNamespace

    import yaml as pyyaml

    from mergekit_permute.card import merge_card
    from mergekit_permute.settings import AlignSettings
    local = tmp_path / "local-model"
    local.mkdir()
    run = SimpleNamespace(models=lambda: ["google/multiberts-seed_1", str(local)], alignments={},
                          settings=AlignSettings(matching="weights"), base="google/multiberts-seed_1",
                          weights={"google/multiberts-seed_1": 1.0, str(local): 1.0}, barrier=None)
    text = merge_card(run, "merge_method: permute\n", "out")
    meta = pyyaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == ["google/multiberts-seed_1"]
    assert "data-free weight matching" in text


def test_hub_revisions_in_a_recipe_are_the_revisions_aligned(zoo, monkeypatch):
    """`owner/name@step1000` (a Pythia training step): the alignment reads that revision, as
    MergeKit does, and two revisions of one repository are two models."""
    from mergekit.config import MergeConfiguration

    import mergekit_permute.io.checkpoints as checkpoints
    from mergekit_permute.mergekit.run import validate_recipe
    a, b = zoo("llama")
    downloads = []

    def snapshot_download(repo, revision=None, allow_patterns=None):
        downloads.append((repo, revision))
        return a if revision == "step1000" else b
    monkeypatch.setattr(checkpoints, "snapshot_download", snapshot_download)
    monkeypatch.setattr(checkpoints, "weight_patterns", lambda repo, revision: ["*.safetensors"])
    config = MergeConfiguration.model_validate({
        "merge_method": "permute", "base_model": "EleutherAI/pythia-70m@step1000",
        "dtype": "float32", "models": [{"model": "EleutherAI/pythia-70m@step1000"},
                                       {"model": "EleutherAI/pythia-70m@step2000"}]})
    _, _, base, others, weights = validate_recipe(config)
    assert (base, others) == ("EleutherAI/pythia-70m@step1000", ["EleutherAI/pythia-70m@step2000"])
    assert set(weights) == {base, *others}
    assert checkpoints.resolve(others[0]) == checkpoints.Path(b)
    assert downloads == [("EleutherAI/pythia-70m", "step2000")]


def test_hub_downloads_take_one_weight_format(monkeypatch):
    """A repository with safetensors and pickles (Pythia's) is fetched as safetensors only."""
    import mergekit_permute.io.checkpoints as checkpoints
    listed = {"both": ["config.json", "model.safetensors", "pytorch_model.bin",
                       "training_args.bin"], "pickles": ["config.json", "pytorch_model.bin"]}

    class Api:
        def list_repo_files(self, repo, revision=None):
            return listed[repo]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(checkpoints, "HfApi", Api)
    assert checkpoints.weight_patterns("both", None) == ["*.safetensors"]
    assert checkpoints.weight_patterns("pickles", "step1000") == ["pytorch_model*.bin"]


def test_token_rows_sourced_from_a_model_are_refused_before_work(zoo, tmp_path):
    a, b = zoo("llama")
    path = recipe(tmp_path, a, b, tokenizer={"source": "base", "tokens": {
        "<s>": {"source": a, "force": True}}})
    r = invoke("mergekit-yaml", path, tmp_path / "out")
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "tokenizer.tokens ['<s>'] take their embedding from a model" in r.stderr
    assert not (tmp_path / "out").exists()


def test_the_space_check_counts_the_dtype_the_recipe_writes(zoo, tmp_path):
    from mergekit_permute.recipes import estimated_bytes, load_recipe
    a, b = zoo("llama")
    sizes = {}
    for dtype in ("float32", "bfloat16"):
        sizes[dtype] = estimated_bytes(load_recipe(recipe(tmp_path, a, b, dtype=dtype)))
    assert T.AutoConfig.from_pretrained(a).dtype in (torch.float32, "float32")
    sidecars = sizes["float32"] - 2 * (sizes["float32"] - sizes["bfloat16"])
    assert 0 < sidecars < sizes["bfloat16"] < sizes["float32"]
