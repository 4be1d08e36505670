"""Gemma and Gemma 2 (the Llama layout; GeGLU MLP, tied head, head_dim free of hidden / heads).

The RMSNorms multiply by (1 + w): a permutation moves w like any gain, and folding uses the
effective gain (NormFold.offset = 1). The embedding is scaled by sqrt(hidden) in the forward
(a scalar: any map passes it); Gemma 2's logit soft-capping acts per score or logit. Gemma 2
also normalises what attention and the MLP write (post_attention / post_feedforward
layernorm): those gains scale the residual on the writing side and cannot be folded, so Gemma 2
is permutation-only (as is every Gemma with its usual tied head)."""

from typing import List

from mergekit_permute.spec._build import (
    RESIDUAL, decoder_spaces, inp, layer_norm, linear, lm_head, out, outputs_of, rope_heads, w,
)
from mergekit_permute.spec.base import NormFold, PermutationSpec, Space, WeightRule

NOTES = {
    "GemmaForCausalLM": "as Llama; RMSNorm gains stored as 1 + w (folded with that offset), "
                        "GeGLU, MQA, head_dim free; tied head",
    "Gemma2ForCausalLM": "as Gemma, with post-attention / post-MLP norms (residual "
                         "permutation only) and logit soft-capping",
}
MODEL_TYPES = {"GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2"}
SANDWICH = {"Gemma2ForCausalLM"}


def build(config, architecture: str) -> PermutationSpec:
    hidden, inter = config.hidden_size, config.intermediate_size
    layout = rope_heads(config)
    heads, kv_heads, head_dim = layout.num_heads, layout.num_kv_heads, layout.head_dim
    n_layers = config.num_hidden_layers
    bias = bool(getattr(config, "attention_bias", False))
    sandwich = architecture in SANDWICH
    residual_points = [outputs_of("model.embed_tokens")]
    spaces: List[Space] = []
    weights: List[WeightRule] = [
        w("model.embed_tokens.weight", (config.vocab_size, hidden), None, out(RESIDUAL),
          vocab_axis=0),
    ]
    folds = []

    def norm(name: str, layer=None, readers=None) -> None:
        weights.extend(layer_norm(name, hidden, RESIDUAL, bias=False, layer=layer))
        if readers:
            folds.append(NormFold(norm=f"{name}.weight", readers=readers, offset=1.0))

    for i in range(n_layers):
        L = f"model.layers.{i}"
        attn, ffn = f"attn.{i}", f"ffn.{i}"
        spaces += decoder_spaces(i, L, layout, inter)
        residual_points.append(outputs_of(L))
        norm(f"{L}.input_layernorm", i, tuple(f"{L}.self_attn.{p}_proj.weight" for p in "qkv"))
        weights += linear(f"{L}.self_attn.q_proj", heads * head_dim, hidden, out(attn, "q"),
                          inp(RESIDUAL), bias=bias, layer=i)
        for proj, view in (("k_proj", "k"), ("v_proj", "v")):
            weights += linear(f"{L}.self_attn.{proj}", kv_heads * head_dim, hidden,
                              out(attn, view), inp(RESIDUAL), bias=bias, layer=i)
        weights += linear(f"{L}.self_attn.o_proj", hidden, heads * head_dim, out(RESIDUAL),
                          inp(attn, "o"), bias=bias, layer=i)
        mlp_readers = (f"{L}.mlp.gate_proj.weight", f"{L}.mlp.up_proj.weight")
        if sandwich:
            norm(f"{L}.post_attention_layernorm", i)               # scales attention's output
            norm(f"{L}.pre_feedforward_layernorm", i, mlp_readers)
            norm(f"{L}.post_feedforward_layernorm", i)             # scales the MLP's output
        else:
            norm(f"{L}.post_attention_layernorm", i, mlp_readers)
        for proj, view in (("gate_proj", "gate"), ("up_proj", "")):
            weights += linear(f"{L}.mlp.{proj}", inter, hidden, out(ffn, view), inp(RESIDUAL),
                              bias=False, layer=i)
        weights += linear(f"{L}.mlp.down_proj", hidden, inter, out(RESIDUAL), inp(ffn),
                          bias=False, layer=i)
    norm("model.norm", readers=("lm_head.weight",))
    weights.append(lm_head(config, "model.embed_tokens.weight", tied_by_default=True))
    spaces.insert(0, Space(name=RESIDUAL, kind="residual", size=hidden,
                           features=tuple(residual_points)))
    return PermutationSpec(family="gemma", architecture=architecture, spaces=tuple(spaces),
                           weights=tuple(weights), num_layers=n_layers, norm_folds=tuple(folds),
                           blocks="model.layers")
