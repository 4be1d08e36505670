"""GPT-2 (pre-LN decoder, learned positions, tied head). Conv1D weights are stored [in, out],
transposed against nn.Linear, and c_attn fuses Q, K, V along its output axis (blocks)."""

from typing import List

from mergekit_permute.spec._build import (
    RESIDUAL, inp, inputs_of, layer_norm, out, outputs_of, w,
)
from mergekit_permute.spec.base import (
    Fused, HeadLayout, NormFold, PermutationSpec, Space, WeightRule,
)

NOTES = {"GPT2LMHeadModel": "Conv1D [in, out]; fused c_attn = [Q | K | V] blocks; tied head; "
                            "names with or without `transformer.` (the original checkpoints)"}
MODEL_TYPES = {"GPT2LMHeadModel": "gpt2"}


def conv1d(name, n_in, n_out, in_axis, out_axis, layer) -> List[WeightRule]:
    """transformers' Conv1D: weight [in, out], bias [out]."""
    return [w(f"{name}.weight", (n_in, n_out), in_axis, out_axis, layer=layer),
            w(f"{name}.bias", (n_out,), out_axis, layer=layer)]


def build(config, architecture: str) -> PermutationSpec:
    hidden, heads = config.n_embd, config.n_head
    inter = config.n_inner or 4 * hidden
    n_layers = config.n_layer
    residual_points = [outputs_of("transformer.drop")]
    spaces: List[Space] = []
    weights: List[WeightRule] = [
        w("transformer.wte.weight", (config.vocab_size, hidden), None, out(RESIDUAL),
          vocab_axis=0),
        w("transformer.wpe.weight", (config.n_positions, hidden), None, out(RESIDUAL)),
    ]
    for i in range(n_layers):
        L = f"transformer.h.{i}"
        attn, ffn = f"attn.{i}", f"ffn.{i}"
        spaces += [
            Space(name=attn, kind="attention", size=hidden, layer=i,
                  heads=HeadLayout(num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads),
                  features=(inputs_of(f"{L}.attn.c_proj"),)),
            Space(name=ffn, kind="ffn", size=inter, layer=i, features=(inputs_of(f"{L}.mlp.c_proj"),)),
        ]
        residual_points.append(outputs_of(L))
        qkv = Fused(parts=(out(attn, "q"), out(attn, "k"), out(attn, "v")), sizes=(hidden,) * 3)
        weights += layer_norm(f"{L}.ln_1", hidden, RESIDUAL, bias=True, layer=i)
        weights += conv1d(f"{L}.attn.c_attn", hidden, 3 * hidden, inp(RESIDUAL), qkv, i)
        weights += conv1d(f"{L}.attn.c_proj", hidden, hidden, inp(attn, "o"), out(RESIDUAL), i)
        weights += layer_norm(f"{L}.ln_2", hidden, RESIDUAL, bias=True, layer=i)
        weights += conv1d(f"{L}.mlp.c_fc", hidden, inter, inp(RESIDUAL), out(ffn), i)
        weights += conv1d(f"{L}.mlp.c_proj", inter, hidden, inp(ffn), out(RESIDUAL), i)
    weights += layer_norm("transformer.ln_f", hidden, RESIDUAL, bias=True)
    tied = bool(getattr(config, "tie_word_embeddings", True))
    weights.append(w("lm_head.weight", (config.vocab_size, hidden), None, inp(RESIDUAL),
                     tied_to="transformer.wte.weight" if tied else None, vocab_axis=0))
    spaces.insert(0, Space(name=RESIDUAL, kind="residual", size=hidden,
                           features=tuple(residual_points)))
    folds = [NormFold(norm=f"transformer.h.{i}.{ln}.weight", bias=f"transformer.h.{i}.{ln}.bias",
                      readers=(f"transformer.h.{i}.{reader}.weight",))
             for i in range(n_layers) for ln, reader in (("ln_1", "attn.c_attn"), ("ln_2", "mlp.c_fc"))]
    folds.append(NormFold(norm="transformer.ln_f.weight", bias="transformer.ln_f.bias",
                          readers=("lm_head.weight",)))
    # The original GPT-2 checkpoints (openai-community/gpt2 ...) store the body without its
    # `transformer.` prefix, which transformers adds on loading: those names too.
    weights = [r.model_copy(update={"aliases": (*r.aliases, r.name[len("transformer."):])})
               if r.name.startswith("transformer.") else r for r in weights]
    return PermutationSpec(family="gpt2", architecture=architecture, spaces=tuple(spaces),
                           weights=tuple(weights), num_layers=n_layers, norm_folds=tuple(folds),
                           residual_centered=True, blocks="transformer.h")



