"""Llama family (pre-RMSNorm decoder, RoPE, GQA, SwiGLU): Llama, Mistral, Qwen2, Qwen3.

RoPE pairs Q/K dimensions by frequency, so only whole heads move on the Q/K side
(qk_frozen_dims = head_dim); V/O may also be permuted inside a head. Under GQA a KV head moves
with its group of query heads. gate and up share the FF permutation. Qwen2 adds Q/K/V biases,
Qwen3 per-head q_norm/k_norm (shared by all heads, untouched because Q/K dims never move).
"""

from typing import List

from mergekit_permute.spec._build import (
    RESIDUAL, decoder_spaces, inp, layer_norm, linear, lm_head, out, outputs_of, rope_heads, w,
)
from mergekit_permute.spec.base import NormFold, PermutationSpec, Space, WeightRule

NOTES = {
    "LlamaForCausalLM": "RoPE: whole heads / KV groups move, V/O dims inside heads; tied or untied head",
    "MistralForCausalLM": "as Llama",
    "Qwen2ForCausalLM": "as Llama, with Q/K/V biases",
    "Qwen3ForCausalLM": "as Llama, with per-head q_norm/k_norm (untouched)",
}
MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
               "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
QKV_BIAS = {"Qwen2ForCausalLM"}
QK_NORM = {"Qwen3ForCausalLM"}


def build(config, architecture: str) -> PermutationSpec:
    hidden, inter = config.hidden_size, config.intermediate_size
    layout = rope_heads(config)
    heads, kv_heads, head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
    n_layers = config.num_hidden_layers
    qkv_bias = architecture in QKV_BIAS or bool(getattr(config, "attention_bias", False))
    o_bias = architecture not in QKV_BIAS and bool(getattr(config, "attention_bias", False))
    mlp_bias = bool(getattr(config, "mlp_bias", False))

    residual_points = [outputs_of("model.embed_tokens")]
    spaces: List[Space] = []
    weights: List[WeightRule] = [
        w("model.embed_tokens.weight", (config.vocab_size, hidden), None, out(RESIDUAL),
          vocab_axis=0),
    ]
    for i in range(n_layers):
        L = f"model.layers.{i}"
        attn, ffn = f"attn.{i}", f"ffn.{i}"
        spaces += decoder_spaces(i, L, layout, inter)
        residual_points.append(outputs_of(L))
        weights += layer_norm(f"{L}.input_layernorm", hidden, RESIDUAL, bias=False, layer=i)
        weights += linear(f"{L}.self_attn.q_proj", heads * head_dim, hidden, out(attn, "q"),
                          inp(RESIDUAL), bias=qkv_bias, layer=i)
        for proj, view in (("k_proj", "k"), ("v_proj", "v")):
            weights += linear(f"{L}.self_attn.{proj}", kv_heads * head_dim, hidden,
                              out(attn, view), inp(RESIDUAL), bias=qkv_bias, layer=i)
        weights += linear(f"{L}.self_attn.o_proj", hidden, heads * head_dim, out(RESIDUAL),
                          inp(attn, "o"), bias=o_bias, layer=i)
        if architecture in QK_NORM:
            weights += [w(f"{L}.self_attn.q_norm.weight", (head_dim,), None, layer=i),
                        w(f"{L}.self_attn.k_norm.weight", (head_dim,), None, layer=i)]
        weights += layer_norm(f"{L}.post_attention_layernorm", hidden, RESIDUAL, bias=False,
                              layer=i)
        for proj, view in (("gate_proj", "gate"), ("up_proj", "")):
            weights += linear(f"{L}.mlp.{proj}", inter, hidden, out(ffn, view), inp(RESIDUAL),
                              bias=mlp_bias, layer=i)
        weights += linear(f"{L}.mlp.down_proj", hidden, inter, out(RESIDUAL), inp(ffn),
                          bias=mlp_bias, layer=i)

    weights += layer_norm("model.norm", hidden, RESIDUAL, bias=False)
    folds = []
    for i in range(n_layers):
        L = f"model.layers.{i}"
        folds += [NormFold(norm=f"{L}.input_layernorm.weight",
                           readers=tuple(f"{L}.self_attn.{p}_proj.weight" for p in "qkv")),
                  NormFold(norm=f"{L}.post_attention_layernorm.weight",
                           readers=(f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight"))]
    folds.append(NormFold(norm="model.norm.weight", readers=("lm_head.weight",)))
    weights.append(lm_head(config, "model.embed_tokens.weight", tied_by_default=False))
    spaces.insert(0, Space(name=RESIDUAL, kind="residual", size=hidden,
                           features=tuple(residual_points)))
    return PermutationSpec(family="llama", architecture=architecture, spaces=tuple(spaces),
                           weights=tuple(weights), num_layers=n_layers, norm_folds=tuple(folds),
                           blocks="model.layers")
