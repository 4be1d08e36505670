"""`untie`: a tied-head model copied with its own head keeps its function and then admits the
residual rotation (orthogonal policy, learned alignment), through align, the card and MergeKit."""

import json

import pytest
import torch
import transformers as T
from click.testing import CliRunner
from safetensors.torch import load_file

from mergekit_permute.cli import main
from mergekit_permute.spec import spec_for_config
from tests.conftest import invoke
from tests.tiny import build


def _logits(path, ids):
    with torch.no_grad():
        return T.AutoModelForCausalLM.from_pretrained(path)(input_ids=ids).logits


def _untie(src, out):
    r = CliRunner().invoke(main, ["untie", str(src), "--out", str(out)])
    assert r.exit_code == 0, r.output
    return str(out)


@pytest.fixture(scope="module")
def untied_pair(zoo, tmp_path_factory):
    a, b = zoo("gpt2")
    root = tmp_path_factory.mktemp("untied")
    return a, b, _untie(a, root / "a"), _untie(b, root / "b")


def test_untied_copy_computes_the_same_function(untied_pair):
    a, _, ua, _ = untied_pair
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45]])
    torch.testing.assert_close(_logits(ua, ids), _logits(a, ids), rtol=0, atol=0)
    config = json.loads(open(f"{ua}/config.json").read())
    assert config["tie_word_embeddings"] is False
    state = load_file(f"{ua}/model.safetensors")
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])
    assert json.loads(open(f"{ua}/untied.json").read())["heads"] == {
        "lm_head.weight": "transformer.wte.weight"}
    assert spec_for_config(T.AutoConfig.from_pretrained(ua)).orthogonal_residual_error() is None


def test_tied_models_are_refused_a_rotation_with_the_fix_named(zoo, tmp_path):
    a, b = zoo("gpt2")
    r = CliRunner().invoke(main, ["align", a, b, "--data", "shakespeare-calib", "--samples", "16",
                                  "--residual", "orthogonal", "--out", str(tmp_path / "x")])
    assert r.exit_code != 0 and "mergekit-permute untie" in r.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("name, reason", [
    ("BertForMaskedLM", "nothing to untie"),              # post-LN: the decoder reads no fold
    ("LlamaForCausalLM", "nothing to untie"),             # already untied
])
def test_untie_refuses_models_it_cannot_help(tmp_path, name, reason):
    model = build(name)
    model.save_pretrained(tmp_path / "m")
    r = CliRunner().invoke(main, ["untie", str(tmp_path / "m"), "--out", str(tmp_path / "o")])
    assert r.exit_code != 0 and reason in r.output
    assert not (tmp_path / "o").exists()


def test_learned_rotation_on_untied_gpt2_keeps_b_and_says_so(untied_pair, tmp_path):
    _, b, ua, ub = untied_pair
    out = tmp_path / "aligned"
    r = CliRunner().invoke(main, ["align", ua, ub, "--data", "shakespeare-calib", "--samples",
                                  "64", "--max-length", "32", "--matching", "learned",
                                  "--learn-steps", "10", "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "alignment.json").read_text())
    assert "residual" in doc["learned"]["maps"]
    assert doc["untied"]["b"]["source"] == b
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45]])
    torch.testing.assert_close(_logits(out, ids), _logits(b, ids), rtol=1e-4, atol=1e-4)
    state = load_file(out / "model.safetensors")   # rotated: the head is no longer the embeddings
    assert not torch.allclose(state["lm_head.weight"], state["transformer.wte.weight"])


def test_untied_pair_merges_through_mergekit_with_a_rotation(untied_pair, tmp_path):
    _, _, ua, ub = untied_pair
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: permute\nbase_model: {ua}\ndtype: float32\nmodels:\n"
                      f"  - model: {ua}\n  - model: {ub}\nparameters:\n  calibration_samples: 64\n"
                      "  max_length: 32\n  residual: orthogonal\n")
    r = invoke("mergekit-permute", "merge", str(recipe), str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr[-2000:]
    merged = T.AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert merged.config.tie_word_embeddings is False
    assert not torch.equal(merged.lm_head.weight, merged.transformer.wte.weight)
    card = (tmp_path / "m" / "README.md").read_text()
    assert "untied from the embeddings" in card


@pytest.mark.parametrize("name", ["LlamaForCausalLM-tied", "Qwen2ForCausalLM", "GemmaForCausalLM"])
def test_untie_other_tied_families(tmp_path, name):
    """Tied Llama-family heads (Gemma's (1 + w) norms included) untie the same way."""
    model = build(name)
    model.save_pretrained(tmp_path / "m")
    assert "tied to the embeddings" in spec_for_config(model.config).orthogonal_residual_error()
    r = CliRunner().invoke(main, ["untie", str(tmp_path / "m"), "--out", str(tmp_path / "u")])
    assert r.exit_code == 0, r.output
    ids = torch.tensor([[2, 40, 41, 42, 43, 44, 45]])
    torch.testing.assert_close(_logits(tmp_path / "u", ids), _logits(tmp_path / "m", ids),
                               rtol=0, atol=0)
    assert spec_for_config(T.AutoConfig.from_pretrained(tmp_path / "u")) \
        .orthogonal_residual_error() is None
