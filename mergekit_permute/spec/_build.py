"""Small helpers that keep the per-family tables short."""

from typing import List, Optional, Tuple

from mergekit_permute.spec.base import Axis, Bind, FeaturePoint, HeadLayout, Space, WeightRule

RESIDUAL = "residual"


def out(space: str, view: str = "") -> Bind:
    return Bind(space=space, view=view, role="out")


def inp(space: str, view: str = "") -> Bind:
    return Bind(space=space, view=view, role="in")


def elem(space: str) -> Bind:
    return Bind(space=space, role="elem")


def w(name: str, shape: Tuple[int, ...], *axes: Axis, layer: Optional[int] = None,
      **kw) -> WeightRule:
    return WeightRule(name=name, shape=tuple(shape), axes=tuple(axes), layer=layer, **kw)


def linear(name: str, out_dim: int, in_dim: int, out_axis: Axis, in_axis: Axis, *,
           bias: bool, layer: Optional[int] = None) -> List[WeightRule]:
    """nn.Linear: weight [out, in] (+ bias [out])."""
    rules = [w(f"{name}.weight", (out_dim, in_dim), out_axis, in_axis, layer=layer)]
    if bias:
        rules.append(w(f"{name}.bias", (out_dim,), out_axis, layer=layer))
    return rules


def layer_norm(name: str, dim: int, space: str, *, bias: bool, layer: Optional[int] = None,
               legacy: bool = False) -> List[WeightRule]:
    """LayerNorm / RMSNorm gain (+ bias); `legacy` also accepts TF-era gamma/beta names. The
    gain scales each feature ("elem"); the bias adds a vector in the space, so it transforms
    like a writer's output ("out"), also under a rotation."""
    rules = [w(f"{name}.weight", (dim,), elem(space), layer=layer,
               aliases=(f"{name}.gamma",) if legacy else ())]
    if bias:
        rules.append(w(f"{name}.bias", (dim,), out(space), layer=layer,
                       aliases=(f"{name}.beta",) if legacy else ()))
    return rules


def inputs_of(module: str) -> FeaturePoint:
    return FeaturePoint(module=module, where="input")


def outputs_of(module: str) -> FeaturePoint:
    return FeaturePoint(module=module, where="output")


# ---- the Llama-style decoder (Llama, Phi-3, Gemma): RoPE heads, gated FF, one lm_head ----

def rope_heads(config, rotary_dims: Optional[int] = None) -> HeadLayout:
    """Query / KV heads and head_dim from the config; RoPE freezes `rotary_dims` Q/K dims of a
    head (every one unless given)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return HeadLayout(num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None)
                      or heads, head_dim=head_dim,
                      qk_frozen_dims=head_dim if rotary_dims is None else rotary_dims)


def decoder_spaces(layer: int, block: str, layout: HeadLayout, inter: int) -> List[Space]:
    """A block's attention space (read at o_proj's input) and gated FF space (at down_proj's)."""
    return [Space(name=f"attn.{layer}", kind="attention", size=layout.num_heads * layout.head_dim,
                  heads=layout, layer=layer, features=(inputs_of(f"{block}.self_attn.o_proj"),)),
            Space(name=f"ffn.{layer}", kind="ffn", size=inter, layer=layer, gated=True,
                  features=(inputs_of(f"{block}.mlp.down_proj"),))]


def lm_head(config, embeddings: str, tied_by_default: bool) -> WeightRule:
    """The output head: reads the residual, tied to the embeddings where the config says so."""
    tied = bool(getattr(config, "tie_word_embeddings", tied_by_default))
    return w("lm_head.weight", (config.vocab_size, config.hidden_size), None, inp(RESIDUAL),
             tied_to=embeddings if tied else None, vocab_axis=0)
