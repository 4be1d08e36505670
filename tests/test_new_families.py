"""Phi-3 (fused qkv_proj / gate_up_proj) and Gemma / Gemma 2 ((1 + w) RMSNorms, tied head):
each a single spec module. Random permutations: tests/test_spec.py runs over tiny.CONFIGS,
which holds these architectures; here the rest, end to end."""

import copy
import re

import pytest
import torch
import transformers as T
import yaml
from click.testing import CliRunner

from mergekit_permute.core.match import procrustes
from mergekit_permute.core.permute import (
    apply_to_model, fold_scales, norm_gains, random_transforms, unfold_gauge,
)
from mergekit_permute.align.pipeline import align_pair
from mergekit_permute.settings import AlignSettings, check_settings, residual_policy
from mergekit_permute.spec import MODEL_TYPES, spec_for_config
from mergekit_permute.spec.base import HeadLayout
from tests.tiny import build, inputs, outputs

NEW = ["Phi3ForCausalLM", "Phi3ForCausalLM-tied", "GemmaForCausalLM", "GemmaForCausalLM-untied",
       "Gemma2ForCausalLM"]


def _rotation(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return procrustes([torch.randn(n, n, dtype=torch.float64, generator=gen)], keep_ones=False)


@pytest.mark.parametrize("name", NEW)
def test_spec_covers_the_checkpoint(name):
    model = build(name)
    spec = spec_for_config(model.config)
    spec.check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()})
    assert MODEL_TYPES[spec.architecture] == model.config.model_type


def test_phi3_partial_rotary_frees_only_the_non_rotary_dims():
    model = build("Phi3ForCausalLM")                       # head_dim 4, partial_rotary_factor 0.5
    with torch.no_grad():                                  # sharpen attention so positions matter
        for layer in model.model.layers:
            layer.self_attn.qkv_proj.weight.mul_(20)
    spec = spec_for_config(model.config)
    assert spec.space("attn.0").heads.qk_frozen_dims == 2
    kw = inputs(model)
    free = HeadLayout(num_heads=8, num_kv_heads=2, head_dim=4, qk_frozen_dims=0)
    unsafe = spec.model_copy(update={"spaces": tuple(
        s.model_copy(update={"heads": free}) if s.heads else s for s in spec.spaces)})
    for s, expect_same in ((spec, True), (unsafe, False)):
        moved = copy.deepcopy(model)
        apply_to_model(s, moved, random_transforms(s, seed=4))
        err = (outputs(moved, kw)[0] - outputs(model, kw)[0]).abs().max()
        assert (err < 1e-4) == expect_same, err


@pytest.mark.parametrize("name", ["Phi3ForCausalLM", "GemmaForCausalLM-untied"])
def test_orthogonal_residual_preserves_function_after_folding(name):
    """Fold B's gains, rotate the residual (and permute everything else), unfold A's gains:
    B's function, A's stored gains. Gemma folds its effective gain 1 + w."""
    b, a = build(name, seed=0), build(name, seed=1)
    spec = spec_for_config(b.config)
    assert spec.orthogonal_residual_error() is None
    assert residual_policy(AlignSettings(), spec) == "orthogonal"
    t = random_transforms(spec, seed=2)
    t["residual"] = {"": _rotation(32)}
    kw = inputs(b)
    before = outputs(b, kw)[0]
    folded, aligned = copy.deepcopy(b), copy.deepcopy(b)
    apply_to_model(spec, folded, t, fold_scales(spec, b.state_dict()))
    apply_to_model(spec, aligned, t, fold_scales(spec, b.state_dict()),
                   unfold_gauge(spec, norm_gains(spec, a.state_dict())))
    for m in (folded, aligned):
        torch.testing.assert_close(outputs(m, kw)[0], before, rtol=1e-4, atol=1e-5)
    for f in spec.norm_folds:
        assert torch.equal(aligned.state_dict()[f.norm], a.state_dict()[f.norm]), f.norm
    if name.startswith("Gemma"):   # negative control: the (1 + w) offset is what makes it exact
        plain = spec.model_copy(update={"norm_folds": tuple(
            f.model_copy(update={"offset": 0.0}) for f in spec.norm_folds)})
        wrong = copy.deepcopy(b)
        apply_to_model(plain, wrong, t, fold_scales(plain, b.state_dict()))
        assert (outputs(wrong, kw)[0] - before).abs().max() > 1e-2


@pytest.mark.parametrize("name,reason", [
    ("GemmaForCausalLM", "tied to the embeddings"),
    ("Phi3ForCausalLM-tied", "tied to the embeddings"),
    ("Gemma2ForCausalLM", "cannot be folded: ['model.layers.0.post_attention_layernorm.weight'"),
])
def test_orthogonal_refused_and_auto_permutes(name, reason):
    spec = spec_for_config(build(name).config)
    assert reason in spec.orthogonal_residual_error()
    assert residual_policy(AlignSettings(), spec) == "all"
    with pytest.raises(ValueError, match="residual=orthogonal: .*" + re.escape(reason)):
        check_settings(spec, AlignSettings(residual="orthogonal"))


def test_phi3_fused_v_refuses_vo_rotation():
    with pytest.raises(ValueError, match="fuses V into model.layers.0.self_attn.qkv_proj"):
        check_settings(spec_for_config(build("Phi3ForCausalLM").config),
                       AlignSettings(vo="orthogonal"))


# ---- end to end: align, stock mergekit-yaml, barrier ------------------------------------------

DEC = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           intermediate_size=48, max_position_embeddings=64, pad_token_id=0, bos_token_id=2,
           eos_token_id=3)
ARCHS = {
    "Phi3ForCausalLM": (T.Phi3Config, {**DEC, "partial_rotary_factor": 0.5}),
    "GemmaForCausalLM": (T.GemmaConfig, {**DEC, "num_key_value_heads": 1, "head_dim": 16}),
    "Gemma2ForCausalLM": (T.Gemma2Config, {**DEC, "head_dim": 16, "query_pre_attn_scalar": 16,
                                           "sliding_window": 8}),
}
SETTINGS = AlignSettings(samples=64, max_length=32, batch_size=16)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from mergekit_permute.io.data import load_texts
    from mergekit_permute.zoo import build_tokenizer
    path = tmp_path_factory.mktemp("tok")
    build_tokenizer(256, "llama", load_texts("shakespeare-train")).save_pretrained(path)
    return path


def _pair(arch, root, tokenizer_dir):
    cls, kw = ARCHS[arch]
    tok = T.AutoTokenizer.from_pretrained(tokenizer_dir)
    paths = []
    for seed in (0, 1):
        config = cls(vocab_size=len(tok), **kw)
        config.architectures = [arch]
        torch.manual_seed(seed)
        model = getattr(T, arch)(config)
        with torch.no_grad():     # non-trivial gains: a misplaced (1 + w) would show
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))
        model.save_pretrained(root / f"{arch}-{seed}")
        tok.save_pretrained(root / f"{arch}-{seed}")
        paths.append(str(root / f"{arch}-{seed}"))
    return paths, tok


def _logits(model, tok):
    enc = tok(["Good morrow, my lord.", "Now is the winter of our discontent."],
              return_tensors="pt", padding=True)
    with torch.no_grad():
        return model.eval()(**enc).logits


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_align_preserves_function_and_stock_mergekit_merges(arch, tmp_path, tokenizer_dir):
    (a, b), tok = _pair(arch, tmp_path, tokenizer_dir)
    cls = getattr(T, arch)
    alignment, model_a, model_b, _ = align_pair(a, b, "shakespeare-calib", SETTINGS)
    # Residual auto: rotation for the untied Phi-3, permutation for the tied Gemmas.
    assert alignment.folded == (arch == "Phi3ForCausalLM")
    reference = cls.from_pretrained(b)
    alignment.apply_to_model(model_b)
    torch.testing.assert_close(_logits(model_b, tok), _logits(reference, tok),
                               rtol=1e-5, atol=1e-5)
    assert any(not torch.equal(v, reference.state_dict()[k])
               for k, v in model_b.state_dict().items())

    from mergekit.scripts.run_yaml import main as mergekit_yaml
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "permute", "base_model": a, "dtype": "float32",
        "models": [{"model": a}, {"model": b}],
        "parameters": {"calibration_samples": 64, "max_length": 32, "batch_size": 16}}))
    r = CliRunner().invoke(mergekit_yaml, [str(recipe), str(tmp_path / "merged")])
    assert r.exit_code == 0, r.output + repr(r.exception)
    merged = cls.from_pretrained(tmp_path / "merged")
    assert torch.isfinite(_logits(merged, tok)).all()
    # A stock average of A with aligned B (written in A's norm gauge where folded).
    for k, v in merged.state_dict().items():
        expected = (model_a.state_dict()[k] + model_b.state_dict()[k]) / 2
        torch.testing.assert_close(v, expected, rtol=0, atol=2e-6, msg=k)


@pytest.mark.parametrize("arch", ["phi3", "gemma"])
def test_alignment_lowers_the_barrier_of_a_trained_pair(zoo, arch):
    from mergekit_permute.barrier import run_barrier
    from mergekit_permute.evaluate import Evaluation
    a, b = zoo(arch)
    r = run_barrier(a, b, evaluation=Evaluation("shakespeare-eval", 48, 32, lambdas=5),
                    calibration="shakespeare-calib", methods=["vanilla", "default"],
                    settings=AlignSettings(samples=120, max_length=32))
    vanilla, default = r["methods"]["vanilla"], r["methods"]["default"]
    assert default["barrier"] < 0.5 * vanilla["barrier"]
    assert default["loss_a"] == pytest.approx(vanilla["loss_a"], abs=1e-5)
    assert default["loss_b"] == pytest.approx(vanilla["loss_b"], abs=1e-5)
