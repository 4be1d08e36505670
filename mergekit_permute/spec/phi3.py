"""Phi-3 / Phi-4-mini (the Llama layout with fused projections).

qkv_proj stacks [Q | K | V] along its output axis in blocks of the GQA sizes, gate_up_proj
[gate | up]: each part is the view llama.py binds to its separate projection. Partial rotary
(Phi-4-mini) frees the non-rotary Q/K dims, as in GPT-NeoX."""

from typing import List

from mergekit_permute.spec._build import (
    RESIDUAL, decoder_spaces, inp, layer_norm, linear, lm_head, out, outputs_of, rope_heads, w,
)
from mergekit_permute.spec.base import (
    Fused, NormFold, PermutationSpec, Space, WeightRule,
)
from mergekit_permute.spec.gpt_neox import rotary_fraction

NOTES = {"Phi3ForCausalLM": "as Llama with fused qkv_proj = [Q, K, V] and gate_up_proj = "
                            "[gate, up] blocks; partial rotary frees non-rotary Q/K dims"}
MODEL_TYPES = {"Phi3ForCausalLM": "phi3"}


def build(config, architecture: str) -> PermutationSpec:
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = rope_heads(config).head_dim
    # transformers rotates 2 * ceil(int(head_dim * factor) / 2) leading dims of each head.
    rotary = int(head_dim * rotary_fraction(config))
    layout = rope_heads(config, min(head_dim, 2 * ((rotary + 1) // 2)))
    n_layers = config.num_hidden_layers
    q, kv = layout.num_heads * head_dim, layout.num_kv_heads * head_dim
    residual_points = [outputs_of("model.embed_tokens")]
    spaces: List[Space] = []
    weights: List[WeightRule] = [
        w("model.embed_tokens.weight", (config.vocab_size, hidden), None, out(RESIDUAL),
          vocab_axis=0),
    ]
    folds = []
    for i in range(n_layers):
        L = f"model.layers.{i}"
        attn, ffn = f"attn.{i}", f"ffn.{i}"
        spaces += decoder_spaces(i, L, layout, inter)
        residual_points.append(outputs_of(L))
        qkv = Fused(parts=(out(attn, "q"), out(attn, "k"), out(attn, "v")), sizes=(q, kv, kv))
        gate_up = Fused(parts=(out(ffn, "gate"), out(ffn, "")), sizes=(inter, inter))
        weights += layer_norm(f"{L}.input_layernorm", hidden, RESIDUAL, bias=False, layer=i)
        weights += linear(f"{L}.self_attn.qkv_proj", q + 2 * kv, hidden, qkv, inp(RESIDUAL),
                          bias=False, layer=i)
        weights += linear(f"{L}.self_attn.o_proj", hidden, q, out(RESIDUAL), inp(attn, "o"),
                          bias=False, layer=i)
        weights += layer_norm(f"{L}.post_attention_layernorm", hidden, RESIDUAL, bias=False,
                              layer=i)
        weights += linear(f"{L}.mlp.gate_up_proj", 2 * inter, hidden, gate_up, inp(RESIDUAL),
                          bias=False, layer=i)
        weights += linear(f"{L}.mlp.down_proj", hidden, inter, out(RESIDUAL), inp(ffn),
                          bias=False, layer=i)
        folds += [NormFold(norm=f"{L}.input_layernorm.weight",
                           readers=(f"{L}.self_attn.qkv_proj.weight",)),
                  NormFold(norm=f"{L}.post_attention_layernorm.weight",
                           readers=(f"{L}.mlp.gate_up_proj.weight",))]
    weights += layer_norm("model.norm", hidden, RESIDUAL, bias=False)
    folds.append(NormFold(norm="model.norm.weight", readers=("lm_head.weight",)))
    weights.append(lm_head(config, "model.embed_tokens.weight", tied_by_default=False))
    spaces.insert(0, Space(name=RESIDUAL, kind="residual", size=hidden,
                           features=tuple(residual_points)))
    return PermutationSpec(family="phi3", architecture=architecture, spaces=tuple(spaces),
                           weights=tuple(weights), num_layers=n_layers, norm_folds=tuple(folds),
                           blocks="model.layers")
