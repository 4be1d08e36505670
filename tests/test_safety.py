"""Pickle checkpoints: weights-only .bin keeps working (MultiBERTs), code-running pickles are
refused on every path and never executed."""

import os
import shutil

import pytest
import torch
import transformers as T
import yaml

from tests.conftest import cli, run_cli


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _as_pretraining_bin(src: str, dst, extra=None):
    """A MultiBERTs-like checkpoint: BertForPreTraining, pytorch_model.bin only."""
    mlm = T.BertForMaskedLM.from_pretrained(src)
    config = mlm.config
    config.architectures = ["BertForPreTraining"]
    torch.manual_seed(0)
    model = T.BertForPreTraining(config)
    model.load_state_dict(mlm.state_dict(), strict=False)
    dst.mkdir(parents=True)
    config.save_pretrained(dst)
    state = model.state_dict()
    if extra is not None:
        state["evil"] = extra
    torch.save(state, dst / "pytorch_model.bin")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{f}", dst / f)
    return str(dst)


@pytest.fixture(scope="module")
def bin_models(zoo, tmp_path_factory):
    a, b = zoo("bert")
    root = tmp_path_factory.mktemp("bin")
    marker = root / "PWNED"
    return {"a": _as_pretraining_bin(a, root / "a"), "b": _as_pretraining_bin(b, root / "b"),
            "evil": _as_pretraining_bin(b, root / "evil", Evil(marker)), "marker": marker}


def test_weights_only_bin_aligns_and_merges(bin_models, tmp_path):
    a, b = bin_models["a"], bin_models["b"]
    out = tmp_path / "aligned"
    r = run_cli(cli("mergekit-permute"), "align", a, b, "--data", "shakespeare-calib",
                "--samples", "120", "--max-length", "32", "--out", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pickle weights only" in r.stderr and "safetensors" in r.stderr
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "permute", "base_model": a, "dtype": "float32",
        "models": [{"model": a}, {"model": b}],
        "parameters": {"calibration_samples": 120, "max_length": 32}}))
    r = run_cli(cli("mergekit-yaml"), str(recipe), str(tmp_path / "merged"))
    assert r.returncode == 0, r.stderr[-3000:]
    merged = T.BertForPreTraining.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        out = merged(input_ids=torch.tensor([[2, 40, 41, 3]]))
    assert torch.isfinite(out.prediction_logits).all()


@pytest.mark.parametrize("path", ["align", "barrier", "mergekit-yaml", "merge"])
def test_code_running_pickle_is_never_run(bin_models, tmp_path, path):
    a, evil, marker = bin_models["a"], bin_models["evil"], bin_models["marker"]
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "permute", "base_model": a,
                                      "models": [{"model": a}, {"model": evil}]}))
    cmd = {
        "align": [cli("mergekit-permute"), "align", a, evil, "--data", "shakespeare-calib",
                  "--out", str(tmp_path / "o")],
        "barrier": [cli("mergekit-permute"), "barrier", a, evil, "--data", "shakespeare-eval",
                    "--out", str(tmp_path / "o")],
        "mergekit-yaml": [cli("mergekit-yaml"), str(recipe), str(tmp_path / "o")],
        "merge": [cli("mergekit-permute"), "merge", str(recipe), str(tmp_path / "o")],
    }[path]
    r = run_cli(*cmd)
    assert r.returncode != 0
    assert "arbitrary code" in r.stderr or "Weights only load failed" in r.stderr
    assert not marker.exists()
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
