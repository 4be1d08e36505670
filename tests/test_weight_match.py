"""Data-free weight matching: recovers a hidden permutation exactly, preserves B's function,
is deterministic, and raises the A-B weight similarity."""

import pytest
import torch

from mergekit_permute.core.heads import HeadPerm
from mergekit_permute.settings import AlignSettings, residual_policy
from mergekit_permute.core.permute import (
    apply_to_state_dict, fold_scales, identity_transforms, random_transforms,
)
from mergekit_permute.spec import spec_for_config
from mergekit_permute.align.weight_match import (
    _attention_score, weight_match, weight_match_alignment, weight_similarity,
)
from tests.tiny import build, inputs, outputs

ARCHS = ["BertForMaskedLM", "LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM",
         "Qwen2ForCausalLM"]


def _pair(name):
    a, b = build(name, seed=0), build(name, seed=1)
    return spec_for_config(a.config), a, b


@pytest.mark.parametrize("name", ARCHS)
def test_recovers_a_hidden_permutation_exactly(name):
    model = build(name)
    spec = spec_for_config(model.config)
    a = model.state_dict()
    b = apply_to_state_dict(spec, a, random_transforms(spec, seed=7, qk_follows_vo=True))
    transforms, report = weight_match(spec, a, b)
    back = apply_to_state_dict(spec, b, transforms)
    for k in a:
        assert torch.equal(back[k], a[k]), k
    assert all(r["mean_corr_after"] == 1.0 for r in report.values())


def test_orthogonal_residual_recovers_a_hidden_permutation():
    model = build("LlamaForCausalLM")
    spec = spec_for_config(model.config)
    a = model.state_dict()
    b = apply_to_state_dict(spec, a, random_transforms(spec, seed=7, qk_follows_vo=True))
    transforms, _ = weight_match(spec, a, b, residual="orthogonal")
    assert transforms["residual"][""].shape == (32, 32)
    back = apply_to_state_dict(spec, b, transforms, fold_scales(spec, b))
    folded_a = apply_to_state_dict(spec, a, identity_transforms(spec), fold_scales(spec, a))
    for k in a:
        torch.testing.assert_close(back[k], folded_a[k], rtol=0, atol=1e-6, msg=k)


@pytest.mark.parametrize("name,residual", [(n, "auto") for n in ARCHS] + [
    ("LlamaForCausalLM", "all"), ("GPT2LMHeadModel-untied", "all"), ("BertModel", "auto")])
def test_alignment_of_independent_models_preserves_b(name, residual):
    spec, model_a, model_b = _pair(name)
    settings = AlignSettings(residual=residual)
    al = weight_match_alignment(spec, model_a.state_dict(), model_b.state_dict(), settings)
    orthogonal = residual_policy(settings, spec) == "orthogonal"  # pre-norm, untied head
    assert al.info["matching"] == "weights" and al.folded == orthogonal
    assert not al.transforms["residual"][""].is_floating_point() or orthogonal
    fresh = build(name, seed=2)
    fresh.load_state_dict(al.state_dict(model_b.state_dict()))
    kw = inputs(model_b)
    for got, want in zip(outputs(fresh, kw), outputs(model_b, kw)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    moved = {s for s, views in al.transforms.items()
             if any(not torch.equal(t, identity_transforms(spec)[s][v]) for v, t in views.items())}
    # Every unfrozen space moves; a rotation of a tiny residual may leave some heads in place.
    assert moved >= {s.name for s in spec.spaces
                     if not s.frozen and (s.kind == "ffn" or not orthogonal)}


def test_deterministic():
    spec, a, b = _pair("LlamaForCausalLM")
    runs = [weight_match(spec, a.state_dict(), b.state_dict(), residual="orthogonal", seed=3)
            for _ in range(2)]
    for space, views in runs[0][0].items():
        for v, t in views.items():
            assert torch.equal(t, runs[1][0][space][v]), (space, v)
    assert runs[0][1] == runs[1][1]


@pytest.mark.parametrize("name", ["BertForMaskedLM", "GPTNeoXForCausalLM", "LlamaForCausalLM"])
def test_raises_weight_similarity_of_independent_models(name):
    spec, a, b = _pair(name)
    for residual in ("all", "auto"):
        _, report = weight_match(spec, a.state_dict(), b.state_dict(), residual=residual)
        assert set(report) == {s.name for s in spec.spaces}
        for space, r in report.items():
            assert -1 <= r["mean_corr_before"] <= 1 and -1 <= r["mean_corr_after"] <= 1
            assert r["mean_corr_after"] >= r["mean_corr_before"], (space, r)
            assert r["measure"] == "weight cosine"
        gains = [r["mean_corr_after"] - r["mean_corr_before"] for r in report.values()
                 if r["kind"] != "residual"]
        assert min(gains) > 0.05


def test_similarity_splits_fused_axes_and_transforms_the_other_axes():
    model = build("GPT2LMHeadModel")
    spec = spec_for_config(model.config)
    a = model.state_dict()
    b = build("GPT2LMHeadModel", seed=1).state_dict()
    t = random_transforms(spec, seed=1)
    sim = weight_similarity(spec, a, b, t, "attn.0")
    assert {v: tuple(s.shape) for v, s in sim.items()} == {v: (32, 32) for v in "qkvo"}
    r = t["residual"][""]
    w_a, w_b = (s["transformer.h.0.attn.c_attn.weight"].double() for s in (a, b))  # [in, 3h]
    b_a, b_b = (s["transformer.h.0.attn.c_attn.bias"].double() for s in (a, b))    # [3h]
    for j, view in enumerate("qkv"):
        cols = slice(32 * j, 32 * j + 32)
        want = w_a[:, cols].T @ w_b[r][:, cols] + torch.outer(b_a[cols], b_b[cols])
        torch.testing.assert_close(sim[view], want)
    p_a, p_b = (s["transformer.h.0.attn.c_proj.weight"].double() for s in (a, b))  # [o, out]
    torch.testing.assert_close(sim["o"], p_a @ p_b[:, r].T)

    model = build("GPTNeoXForCausalLM")
    spec = spec_for_config(model.config)
    a = model.state_dict()
    b = build("GPTNeoXForCausalLM", seed=1).state_dict()
    sim = weight_similarity(spec, a, b, identity_transforms(spec), "attn.1")
    # query_key_value rows are [heads, (q, k, v), head_dim] -> the q part [heads * head_dim, in]
    q_a, q_b = (s["gpt_neox.layers.1.attention.query_key_value.weight"].double()
                .reshape(4, 3, 8, 32)[:, 0].reshape(32, 32) for s in (a, b))
    qb_a, qb_b = (s["gpt_neox.layers.1.attention.query_key_value.bias"].double()
                  .reshape(4, 3, 8)[:, 0].reshape(32) for s in (a, b))
    torch.testing.assert_close(sim["q"], q_a @ q_b.T + torch.outer(qb_a, qb_b))


@pytest.mark.parametrize("name", ["LlamaForCausalLM", "GPT2LMHeadModel", "GPTNeoXForCausalLM"])
def test_attention_score_equals_the_weight_inner_product(name):
    """The folded o-view score, read at a head permutation of the kind match_attention returns,
    is exactly the sum over the q/k/v/o views of S_view[i, p_view[i]]."""
    spec = spec_for_config(build(name).config)
    space = spec.space("attn.0")
    layout, gen = space.heads, torch.Generator().manual_seed(0)
    sim = {v: torch.randn(n, n, generator=gen, dtype=torch.float64)
           for v, n in space.views.items()}
    perm = HeadPerm.random(layout, gen, qk_follows_vo=True).views(layout)
    want = sum(s[torch.arange(len(perm[v])), perm[v]].sum() for v, s in sim.items())
    score = _attention_score(sim, layout, "head_perm")
    got = score[torch.arange(space.size), perm["o"]].sum()
    torch.testing.assert_close(got, want)


def test_refuses_policies_it_cannot_honour():
    spec, a, b = _pair("GPT2LMHeadModel")
    for policy in ("first", "last"):
        with pytest.raises(ValueError, match="all, identity, orthogonal"):
            weight_match(spec, a.state_dict(), b.state_dict(), residual=policy)
    with pytest.raises(ValueError, match=spec.orthogonal_residual_error()[:30]):
        weight_match(spec, a.state_dict(), b.state_dict(), residual="orthogonal")
