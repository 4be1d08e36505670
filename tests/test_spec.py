import copy

import pytest
import torch

from mergekit_permute.core.permute import (
    apply_to_model, apply_to_state_dict, identity_transforms, invert, random_transforms,
)
from mergekit_permute.spec import UnsupportedArchitecture, spec_for_config
from tests.tiny import CONFIGS, build, inputs, outputs


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_random_valid_permutation_preserves_function(name):
    model = build(name)
    spec = spec_for_config(model.config)
    spec.check_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()})
    kw = inputs(model)
    before = outputs(model, kw)
    permuted = copy.deepcopy(model)
    transforms = random_transforms(spec, seed=3)
    apply_to_model(spec, permuted, transforms)
    after = outputs(permuted, kw)
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The weights really moved.
    changed = [k for k, v in permuted.state_dict().items()
               if not torch.equal(v, model.state_dict()[k])]
    assert len(changed) > len(spec.weights) // 2


@pytest.mark.parametrize("name", ["BertForPreTraining", "LlamaForCausalLM"])
def test_apply_then_invert_is_identity(name):
    model = build(name)
    spec = spec_for_config(model.config)
    state = model.state_dict()
    t = random_transforms(spec, seed=5)
    back = apply_to_state_dict(spec, apply_to_state_dict(spec, state, t), invert(t))
    for k in state:
        assert torch.equal(back[k], state[k]), k
    ident = apply_to_state_dict(spec, state, identity_transforms(spec))
    assert all(torch.equal(ident[k], state[k]) for k in state)


def test_wrong_mlm_head_permutation_breaks_function():
    """Guard against the trap in METHOD.md: permuting only transform.dense's input axis."""
    model = build("BertForMaskedLM")
    spec = spec_for_config(model.config)
    t = random_transforms(spec, seed=2)
    permuted = copy.deepcopy(model)
    apply_to_model(spec, permuted, t)
    w = permuted.cls.predictions.transform.dense
    with torch.no_grad():  # undo the output-axis permutation only
        inv = torch.argsort(t["residual"][""])
        w.weight.copy_(w.weight[inv])
        w.bias.copy_(w.bias[inv])
    kw = inputs(model)
    err = (outputs(permuted, kw)[0] - outputs(model, kw)[0]).abs().max()
    assert err > 1e-2


def test_unsupported_architecture_is_refused_with_the_supported_list():
    import transformers as T
    cfg = T.GPT2Config(n_layer=1, n_embd=16, n_head=2)
    cfg.architectures = ["GPTJForCausalLM"]
    with pytest.raises(UnsupportedArchitecture, match="BertForMaskedLM.*LlamaForCausalLM"):
        spec_for_config(cfg)


def test_spec_validates_sizes():
    from mergekit_permute.spec.base import Bind, PermutationSpec, Space, WeightRule
    with pytest.raises(ValueError, match="size 5 bound to ffn"):
        PermutationSpec(family="x", architecture="X", num_layers=1, blocks="layers",
                        spaces=(Space(name="ffn", kind="ffn", size=4),),
                        weights=(WeightRule(name="w", shape=(5, 3),
                                            axes=(Bind(space="ffn", role="out"), None)),))
    with pytest.raises(ValueError, match="extra"):
        Bind(space="ffn", role="out", colour="red")


def test_moving_rotary_dims_breaks_function():
    """Negative control for the RoPE rule: permuting rotary Q/K dims changes the logits."""
    from mergekit_permute.spec.base import HeadLayout
    model = build("GPTNeoXForCausalLM")
    with torch.no_grad():  # sharpen attention so positions matter
        for layer in model.gpt_neox.layers:
            layer.attention.query_key_value.weight.mul_(20)
    spec = spec_for_config(model.config)
    free = HeadLayout(num_heads=4, num_kv_heads=4, head_dim=8, qk_frozen_dims=0)
    spaces = tuple(s.model_copy(update={"heads": free}) if s.heads else s for s in spec.spaces)
    unsafe = spec.model_copy(update={"spaces": spaces})
    kw = inputs(model)
    permuted = copy.deepcopy(model)
    apply_to_model(unsafe, permuted, random_transforms(unsafe, seed=4))
    assert (outputs(permuted, kw)[0] - outputs(model, kw)[0]).abs().max() > 1e-2


def test_older_gpt2_checkpoints_with_their_causal_mask_buffers_are_accepted():
    """Checkpoints saved by older transformers carry `h.N.attn.bias` / `.masked_bias` (the
    causal mask, not weights): covered as buffers, while a truly unknown tensor is refused."""
    model = build("GPT2LMHeadModel")
    spec = spec_for_config(model.config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes.update({f"transformer.h.{i}.attn.{b}": (1, 1, 40, 40) if b == "bias" else ()
                   for i in range(2) for b in ("bias", "masked_bias")})
    spec.check_state_dict(shapes)
    with pytest.raises(ValueError, match="tensors not covered"):
        spec.check_state_dict({**shapes, "transformer.h.0.attn.extra.bias": (4,)})


def test_a_refused_map_leaves_the_model_as_it_was():
    """apply_to_model computes every tensor before writing any: a residual rotation without
    its norm fold is refused at the first norm, after the embeddings and projections."""
    from mergekit_permute.core.match import procrustes

    model = build("LlamaForCausalLM")
    before = copy.deepcopy(model.state_dict())
    spec = spec_for_config(model.config)
    t = identity_transforms(spec)
    d = spec.space("residual").size
    t["residual"] = {"": procrustes([torch.randn(d, d, dtype=torch.float64,
                                                 generator=torch.Generator().manual_seed(0))])}
    with pytest.raises(ValueError, match="fold the norm gain"):
        apply_to_model(spec, model, t)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_scaled_map_with_a_float_index_is_not_a_symmetry():
    """A hand-edited permutations file: named as what it is, not an AttributeError."""
    from mergekit_permute.core.permute import Scaled
    from mergekit_permute.core.symmetry import NotASymmetry, check_symmetry
    spec = spec_for_config(build("LlamaForCausalLM").config)
    t = identity_transforms(spec)
    n = spec.space("ffn.0").size
    t["ffn.0"][""] = Scaled(torch.arange(n).double(), torch.ones(n, dtype=torch.float64))
    with pytest.raises(NotASymmetry, match="scaled map of index"):
        check_symmetry(spec, t)


# spec_layout(...)["fingerprint"] of tests.tiny's configs as the code of ee8e8f1 (2026-12-07)
# wrote them into alignment.json, before later versions added optional rules, GPT-2's names
# without `transformer.` and the `layout` key
EARLIER_FINGERPRINTS = {"LlamaForCausalLM": "8e535ef5366e0d8a",
                        "GPT2LMHeadModel": "be0cdb68a2d8fbd5",
                        "GPT2LMHeadModel-untied": "fb23e86e2c379781",
                        "BertForMaskedLM": "30793c1e9a86b0db",
                        "GPTNeoXForCausalLM": "439783e3a8f13c8b",
                        "RobertaForMaskedLM": "1e5634f2c86a5b80"}


@pytest.mark.parametrize("name", sorted(EARLIER_FINGERPRINTS))
def test_alignments_written_before_replay_and_other_configurations_are_refused(name):
    """`apply` of an alignment.json an earlier version wrote: its fingerprint still matches;
    a model of another FF width is refused by the new `layout` and by the old fingerprint."""
    from mergekit_permute.core.alignment import check_layout, spec_layout
    spec = spec_for_config(build(name).config)
    here = spec_layout(spec)
    earlier = {k: v for k, v in here.items() if k != "layout"}
    assert earlier["fingerprint"] == EARLIER_FINGERPRINTS[name]
    check_layout(earlier, spec, "B")
    check_layout(here, spec, "B")
    config = build(name).config
    if hasattr(config, "n_embd"):   # GPT-2: n_inner (None: 4 x n_embd)
        config.n_inner = 4 * config.n_embd + 8
    else:
        config.intermediate_size += 8
    wider = spec_for_config(config)
    for saved in (earlier, here):
        with pytest.raises(ValueError, match="another configuration"):
            check_layout(saved, wider, "B")
