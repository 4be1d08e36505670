"""Hypothesis over random small configs of every supported architecture."""

import copy

import torch
import transformers as T
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mergekit_permute.calibration.calibrate import calibrate
from mergekit_permute.core.permute import apply_to_model, apply_to_state_dict, invert, random_transforms
from mergekit_permute.calibration.collect import calibration_spaces
from mergekit_permute.settings import AlignSettings
from mergekit_permute.align.solve import compute_alignment
from mergekit_permute.spec import BUILDERS, spec_for_config
from tests.tiny import inputs, outputs


@st.composite
def configs(draw):
    arch = draw(st.sampled_from(sorted(BUILDERS)))
    kv = draw(st.sampled_from([1, 2]))
    heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([4, 8]))  # LayerNorm over < 4 dims is degenerate
    common = dict(vocab_size=draw(st.integers(20, 40)), num_hidden_layers=draw(st.integers(1, 2)),
                  intermediate_size=draw(st.integers(8, 24)), num_attention_heads=heads)
    if arch.startswith(("Bert", "Roberta")):
        cls = T.BertConfig if arch.startswith("Bert") else T.RobertaConfig
        config = cls(hidden_size=heads * head_dim, max_position_embeddings=40,
                     type_vocab_size=draw(st.integers(2, 3)), num_labels=3, **common)
    elif arch == "GPT2LMHeadModel":
        config = T.GPT2Config(vocab_size=common["vocab_size"], n_layer=common["num_hidden_layers"],
                              n_head=heads, n_embd=heads * head_dim, n_positions=32,
                              n_inner=common["intermediate_size"], bos_token_id=0, eos_token_id=0,
                              tie_word_embeddings=draw(st.booleans()))
    elif arch == "GPTNeoXForCausalLM":
        config = T.GPTNeoXConfig(hidden_size=heads * head_dim, max_position_embeddings=32,
                                 rotary_pct=draw(st.sampled_from([0.25, 0.5, 1.0])),
                                 use_parallel_residual=draw(st.booleans()), **common)
    else:
        cls = {"Llama": T.LlamaConfig, "Mistral": T.MistralConfig, "Qwen2": T.Qwen2Config,
               "Qwen3": T.Qwen3Config, "Phi3": T.Phi3Config, "Gemma": T.GemmaConfig,
               "Gemma2": T.Gemma2Config}[arch.split("For")[0]]
        config = cls(hidden_size=heads * draw(st.sampled_from([2, 4])), num_key_value_heads=kv,
                     head_dim=head_dim, tie_word_embeddings=draw(st.booleans()),
                     max_position_embeddings=32, **common,
                     **({"pad_token_id": 0} if arch.startswith("Phi3") else {}))
    config.architectures = [arch]
    return config


def _model(config, seed, scale=1.0):
    """Random weights; `scale` > 1 leaves the near-linear regime of a fresh init, so every
    feature is distinguishable (what recovery needs)."""
    torch.manual_seed(seed)
    model = getattr(T, config.architectures[0])(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
            else:
                p.mul_(scale)
    return model


def _random_batches(config, spec, seed):
    """Random token batches with at least as many tokens as the widest space has features."""
    gen = torch.Generator().manual_seed(seed)
    widest = max(s.size for s in spec.spaces)
    return [{"input_ids": torch.randint(0, config.vocab_size, (8, 16), generator=gen),
             "attention_mask": torch.ones(8, 16, dtype=torch.long)}
            for _ in range(max(4, widest // 16))]


SETTINGS = settings(max_examples=16, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(configs(), st.integers(0, 1000))
def test_random_valid_permutation_preserves_function(config, seed):
    model = _model(config, seed)
    spec = spec_for_config(model.config)
    kw = inputs(model, length=7)
    before = outputs(model, kw)
    permuted = copy.deepcopy(model)
    apply_to_model(spec, permuted, random_transforms(spec, seed))
    for x, y in zip(before, outputs(permuted, kw)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


@SETTINGS
@given(configs(), st.integers(0, 1000))
def test_apply_then_inverse_is_identity(config, seed):
    model = _model(config, seed)
    spec = spec_for_config(model.config)
    state = model.state_dict()
    t = random_transforms(spec, seed)
    back = apply_to_state_dict(spec, apply_to_state_dict(spec, state, t), invert(t))
    assert all(torch.equal(back[k], state[k]) for k in state)


@SETTINGS
@given(configs(), st.integers(0, 1000))
def test_self_alignment_recovers_the_permutation(config, seed):
    a = _model(config, seed, scale=10.0)
    spec = spec_for_config(a.config)
    b = copy.deepcopy(a)
    apply_to_model(spec, b, random_transforms(spec, seed + 1, qk_follows_vo=True))
    batches = _random_batches(config, spec, seed)
    stats = calibrate(a, b, spec, batches, calibration_spaces(spec))
    alignment = compute_alignment(spec, stats, AlignSettings(residual="all"))
    apply_to_model(spec, b, alignment.transforms)
    kw = inputs(a, length=7)
    for x, y in zip(outputs(a, kw), outputs(b, kw)):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, msg=k)


@SETTINGS
@given(configs(), st.integers(0, 1000), st.sampled_from(["separate", "joint"]))
def test_qk_matching_recovers_independent_qk_permutations(config, seed, qk):
    """With Q/K features, the Q/K dims are recovered even where they moved independently of V
    (every non-rotary dim: BERT, GPT-2, the free dims of partial-rotary NeoX heads)."""
    a = _model(config, seed, scale=10.0)
    spec = spec_for_config(a.config)
    b = copy.deepcopy(a)
    apply_to_model(spec, b, random_transforms(spec, seed + 1, qk_follows_vo=False))
    batches = _random_batches(config, spec, seed)
    stats = calibrate(a, b, spec, batches, calibration_spaces(spec), qk=True)
    alignment = compute_alignment(spec, stats, AlignSettings(residual="all", qk=qk))
    apply_to_model(spec, b, alignment.transforms)
    for k, v in a.state_dict().items():
        torch.testing.assert_close(v, b.state_dict()[k], rtol=0, atol=0, msg=k)
