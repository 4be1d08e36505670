"""GPT-NeoX / Pythia (pre-LN, parallel attention + MLP on one residual, untied head).

query_key_value is stored per head as [q, k, v] (a `per_head` fused axis). Partial rotary:
only the first rotary_pct * head_dim dimensions of each Q/K head rotate, so those are frozen;
the rest may move (the same way in Q and K)."""

from typing import List

from mergekit_permute.spec._build import (
    RESIDUAL, inp, inputs_of, layer_norm, linear, out, outputs_of, w,
)
from mergekit_permute.spec.base import (
    Fused, HeadLayout, NormFold, PermutationSpec, Space, WeightRule,
)

NOTES = {"GPTNeoXForCausalLM": "PolyPythias; fused per-head [q,k,v]; partial rotary frees "
                               "non-rotary Q/K dims; parallel residual; untied head"}
MODEL_TYPES = {"GPTNeoXForCausalLM": "gpt_neox"}


def rotary_fraction(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    for value in (rope.get("partial_rotary_factor"), getattr(config, "rotary_pct", None),
                  getattr(config, "partial_rotary_factor", None)):
        if value is not None:
            return float(value)
    return 1.0


def build(config, architecture: str) -> PermutationSpec:
    hidden, heads, inter = config.hidden_size, config.num_attention_heads, config.intermediate_size
    head_dim = hidden // heads
    n_layers = config.num_hidden_layers
    attention_bias = bool(getattr(config, "attention_bias", True))   # (Q/K/V and output)
    # transformers rotates cos.shape[-1] = 2 * ceil(int(head_dim * pct) / 2) leading dims.
    rotary = int(head_dim * rotary_fraction(config))
    layout = HeadLayout(num_heads=heads, num_kv_heads=heads, head_dim=head_dim,
                        qk_frozen_dims=min(head_dim, 2 * ((rotary + 1) // 2)))
    residual_points = [outputs_of("gpt_neox.embed_in")]
    spaces: List[Space] = []
    weights: List[WeightRule] = [
        w("gpt_neox.embed_in.weight", (config.vocab_size, hidden), None, out(RESIDUAL),
          vocab_axis=0),
    ]
    for i in range(n_layers):
        L = f"gpt_neox.layers.{i}"
        attn, ffn = f"attn.{i}", f"ffn.{i}"
        spaces += [
            Space(name=attn, kind="attention", size=hidden, heads=layout, layer=i,
                  features=(inputs_of(f"{L}.attention.dense"),)),
            Space(name=ffn, kind="ffn", size=inter, layer=i,
                  features=(inputs_of(f"{L}.mlp.dense_4h_to_h"),)),
        ]
        residual_points.append(outputs_of(L))
        qkv = Fused(parts=(out(attn, "q"), out(attn, "k"), out(attn, "v")), sizes=(hidden,) * 3,
                    layout="per_head", num_heads=heads)
        weights += layer_norm(f"{L}.input_layernorm", hidden, RESIDUAL, bias=True, layer=i)
        weights += layer_norm(f"{L}.post_attention_layernorm", hidden, RESIDUAL, bias=True, layer=i)
        weights += linear(f"{L}.attention.query_key_value", 3 * hidden, hidden, qkv,
                          inp(RESIDUAL), bias=attention_bias, layer=i)
        weights += linear(f"{L}.attention.dense", hidden, hidden, out(RESIDUAL), inp(attn, "o"),
                          bias=attention_bias, layer=i)
        weights += linear(f"{L}.mlp.dense_h_to_4h", inter, hidden, out(ffn), inp(RESIDUAL),
                          bias=True, layer=i)
        weights += linear(f"{L}.mlp.dense_4h_to_h", hidden, inter, out(RESIDUAL), inp(ffn),
                          bias=True, layer=i)
    weights += layer_norm("gpt_neox.final_layer_norm", hidden, RESIDUAL, bias=True)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    weights.append(w("lm_head.weight", (config.vocab_size, hidden), None, inp(RESIDUAL),
                     aliases=("embed_out.weight",),
                     tied_to="gpt_neox.embed_in.weight" if tied else None, vocab_axis=0))
    spaces.insert(0, Space(name=RESIDUAL, kind="residual", size=hidden,
                           features=tuple(residual_points)))
    folds = [NormFold(norm=f"gpt_neox.layers.{i}.{ln}.weight", bias=f"gpt_neox.layers.{i}.{ln}.bias",
                      readers=(f"gpt_neox.layers.{i}.{reader}.weight",))
             for i in range(n_layers) for ln, reader in (
                 ("input_layernorm", "attention.query_key_value"),
                 ("post_attention_layernorm", "mlp.dense_h_to_4h"))]
    folds.append(NormFold(norm="gpt_neox.final_layer_norm.weight",
                          bias="gpt_neox.final_layer_norm.bias", readers=("lm_head.weight",)))
    return PermutationSpec(family="gpt_neox", architecture=architecture, spaces=tuple(spaces),
                           weights=tuple(weights), num_layers=n_layers, norm_folds=tuple(folds),
                           residual_centered=True, blocks="gpt_neox.layers")
