"""Orthogonal residual alignment for RMSNorm models: norm gains folded into their readers, a
Procrustes rotation of the residual stream; B's function is preserved exactly."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

from mergekit_permute.core.match import procrustes
from mergekit_permute.core.permute import apply_to_model, fold_scales, identity_transforms
from mergekit_permute.align.pipeline import align_pair
from mergekit_permute.settings import AlignSettings, check_settings, residual_policy
from mergekit_permute.spec import spec_for_config
from tests.conftest import invoke
from tests.tiny import build, inputs, outputs

SETTINGS = AlignSettings(samples=120, max_length=32, residual="orthogonal")


def _rotated(name, keep_ones):
    model = build(name)
    spec = spec_for_config(model.config)
    assert spec.orthogonal_residual_error() is None
    kw = inputs(model)
    q = procrustes([torch.randn(32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))],
                   keep_ones=keep_ones)  # a random orthogonal matrix (keeping 1 if asked)
    t = identity_transforms(spec)
    t["residual"] = {"": q}
    rotated = copy.deepcopy(model)
    apply_to_model(spec, rotated, t, fold_scales(spec, model.state_dict()))
    return spec, outputs(model, kw)[0], outputs(rotated, kw)[0]


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "MistralForCausalLM", "GPTNeoXForCausalLM",
                                  "GPTNeoXForCausalLM-sequential", "GPT2LMHeadModel-untied"])
def test_random_orthogonal_residual_preserves_function_after_folding(name):
    """RMSNorm: any rotation. LayerNorm (pre-norm, gains folded, biases / gain): any rotation
    that keeps the all-ones vector."""
    spec = spec_for_config(build(name).config)
    spec, before, after = _rotated(name, keep_ones=spec.residual_centered)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_layernorm_models_need_the_ones_vector_kept():
    spec, before, after = _rotated("GPTNeoXForCausalLM", keep_ones=False)
    assert spec.residual_centered and (after - before).abs().max() > 1e-2


@pytest.mark.parametrize("name,reason", [
    ("BertForMaskedLM", "post-LayerNorm"),
    ("GPT2LMHeadModel", "tied to the embeddings"),
    ("LlamaForCausalLM-tied", "tied to the embeddings"),
])
def test_orthogonal_refused_where_it_would_change_function(name, reason):
    spec = spec_for_config(build(name).config)
    assert reason in spec.orthogonal_residual_error()


def test_align_orthogonal_computes_b_and_merges(zoo, tmp_path):
    """Residual rotation and per-KV-group V/O rotations together."""
    a, b = zoo("llama")
    alignment, model_a, model_b, tok = align_pair(a, b, "shakespeare-calib",
                                                  SETTINGS.model_copy(update={"vo": "orthogonal"}))
    v = alignment.transforms["attn.0"]["v"]
    assert v.is_floating_point() and torch.allclose(v.T @ v, torch.eye(v.shape[0], dtype=v.dtype))
    assert not torch.equal(v.abs().max(0).values, torch.ones(v.shape[0], dtype=v.dtype))  # not a permutation
    assert not alignment.transforms["attn.0"]["q"].is_floating_point()  # heads still permute
    reference = copy.deepcopy(model_b)
    alignment.apply_to_model(model_b)
    enc = tok(["Now is the winter of our discontent"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(model_b(**enc).logits, reference(**enc).logits,
                                   rtol=1e-4, atol=1e-4)
    # Aligned B is written in A's norm gauge: A's gains, B's function.
    for name, gain in alignment.gains_a.items():
        assert torch.equal(model_b.state_dict()[name], model_a.state_dict()[name]), name
    res = alignment.report["residual"]
    assert res["mean_corr_after"] > res["mean_corr_before"]
    # Through MergeKit: the merge is the average of A as stored and aligned B.
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: permute\nbase_model: {a}\ndtype: float32\nmodels:\n"
                      f"  - model: {a}\n  - model: {b}\nparameters:\n  calibration_samples: 120\n"
                      "  max_length: 32\n  residual: orthogonal\n  vo: orthogonal\n")
    r = invoke("mergekit-permute", "merge", str(recipe), str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr[-2000:]
    merged = load_file(str(tmp_path / "m" / "model.safetensors"))
    for k, v in merged.items():
        expected = (model_a.state_dict()[k] + model_b.state_dict()[k]) / 2
        torch.testing.assert_close(v, expected, rtol=0, atol=2e-6, msg=k)
    torch.testing.assert_close(merged["model.norm.weight"], model_a.state_dict()["model.norm.weight"])


def test_auto_policy_picks_orthogonal_only_where_it_preserves_function():
    for name in ("LlamaForCausalLM", "GPTNeoXForCausalLM", "GPT2LMHeadModel-untied"):
        assert residual_policy(AlignSettings(), spec_for_config(build(name).config)) == "orthogonal"
    for name in ("BertForMaskedLM", "LlamaForCausalLM-tied", "GPT2LMHeadModel"):
        assert residual_policy(AlignSettings(), spec_for_config(build(name).config)) == "all"


@pytest.mark.parametrize("name,update,message", [
    ("GPT2LMHeadModel", {"vo": "orthogonal"}, "fuses V into"),
    ("LlamaForCausalLM", {"vo": "orthogonal", "matching": "weights"}, "needs matching=activations"),
    ("LlamaForCausalLM", {"qk": "joint", "matching": "weights"}, "supports qk=follow_vo only"),
])
def test_settings_the_architecture_cannot_honour_are_refused(name, update, message):
    with pytest.raises(ValueError, match=message):
        check_settings(spec_for_config(build(name).config), AlignSettings(**update))


@pytest.mark.parametrize("name", ["GPTNeoXForCausalLM", "GPT2LMHeadModel-untied"])
def test_pre_layernorm_orthogonal_alignment_keeps_b_function(name):
    """Two independently initialised pre-LN models: the aligned rotation keeps the all-ones
    vector, and B (gains folded, biases / gain) computes exactly its own function."""
    from mergekit_permute.calibration.calibrate import calibrate
    from mergekit_permute.core.permute import norm_gains
    from mergekit_permute.calibration.collect import calibration_spaces
    from mergekit_permute.align.solve import compute_alignment
    a, b = build(name, seed=0), build(name, seed=1)
    spec = spec_for_config(a.config)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, a.config.vocab_size, (8, 16), generator=gen),
                "attention_mask": torch.ones(8, 16, dtype=torch.long)} for _ in range(8)]
    stats = calibrate(a, b, spec, batches, calibration_spaces(spec))
    alignment = compute_alignment(spec, stats, SETTINGS,
                                  gains=(norm_gains(spec, a.state_dict()), norm_gains(spec, b.state_dict())))
    q = alignment.transforms["residual"][""]
    torch.testing.assert_close(torch.ones(32, dtype=q.dtype) @ q, torch.ones(32, dtype=q.dtype))
    kw = inputs(b)
    before = outputs(b, kw)[0]
    alignment.apply_to_model(b)
    torch.testing.assert_close(outputs(b, kw)[0], before, rtol=1e-4, atol=1e-5)
    assert alignment.report["residual"]["mean_corr_after"] > alignment.report["residual"]["mean_corr_before"]


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "GPTNeoXForCausalLM", "GPT2LMHeadModel-untied"])
def test_large_tensors_go_a_slab_at_a_time_with_the_same_result(name, monkeypatch):
    """An embedding through a rotation is transformed in slabs along its untouched (vocab)
    axis: the same tensors as in one piece, and the function still preserved."""
    import mergekit_permute.core.permute as permute
    model = build(name)
    spec = spec_for_config(model.config)
    if spec.orthogonal_residual_error() is not None:
        pytest.skip(spec.orthogonal_residual_error())
    keep_ones = spec.residual_centered
    q = procrustes([torch.randn(32, 32, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(1))], keep_ones=keep_ones)
    t = identity_transforms(spec)
    t["residual"] = {"": q}
    fold = fold_scales(spec, model.state_dict())
    rules = spec.weight_map()
    state = model.state_dict()
    whole = {k: permute.transform_tensor(rules, k, v, t, fold) for k, v in state.items()}
    monkeypatch.setattr(permute, "SLAB_BYTES", 512)   # every matrix in many slabs
    assert any(permute._slab_dim(rules.get(k), v, (fold,)) is not None for k, v in state.items())
    slabbed = {k: permute.transform_tensor(rules, k, v, t, fold) for k, v in state.items()}
    for k in whole:
        torch.testing.assert_close(slabbed[k], whole[k], rtol=0, atol=1e-12, msg=k)
    rotated = copy.deepcopy(model)
    apply_to_model(spec, rotated, t, fold)
    kw = inputs(model)
    torch.testing.assert_close(outputs(rotated, kw)[0], outputs(model, kw)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float32])
def test_a_tensor_is_transformed_once_in_its_exact_dtype_and_its_input_untouched(stored):
    """Fold, rotate, unfold run in `exact_dtype` of the stored dtype (float32 for bf16: a bf16
    tensor's float32 working copy is not widened again to float64) and round once; the input
    tensor is never scaled in place."""
    import mergekit_permute.core.permute as permute
    model = build("LlamaForCausalLM")
    spec = spec_for_config(model.config)
    q = procrustes([torch.randn(32, 32, dtype=torch.float64,
                                generator=torch.Generator().manual_seed(2))], keep_ones=False)
    t = identity_transforms(spec)
    t["residual"] = {"": q}
    gains = {k: v.double() for k, v in model.state_dict().items()}
    fold, unfold = permute.fold_gauge(spec, permute.norm_gains(spec, gains)), \
        permute.unfold_gauge(spec, permute.norm_gains(spec, gains))
    rules = spec.weight_map()
    name = "model.layers.0.mlp.gate_proj.weight"     # [inter, hidden]: FF rows, residual columns
    tensor = model.state_dict()[name].to(stored)
    before = tensor.clone()
    work = permute.exact_dtype(stored)
    seen = set()

    class Dtypes(TorchFunctionMode):   # the dtypes of every product over the whole matrix
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.update(a.dtype for a in args if isinstance(a, torch.Tensor) and
                        a.numel() == tensor.numel())
            return func(*args, **(kwargs or {}))
    with Dtypes():
        out = permute.transform_tensor(rules, name, tensor, t, fold, unfold)
    assert seen - {stored} == {work}
    assert torch.equal(tensor, before)
    gain = gains["model.layers.0.post_attention_layernorm.weight"].to(work)
    # new = ((W * g) @ inv(Q)^T) / g, rows permuted by the (identity) FF map
    expected = ((tensor.to(work) * gain) @ permute._reader_matrix(q).to(work)) / gain
    assert out.dtype == stored
    assert torch.equal(out, expected.to(stored))
