"""Small helpers that keep the per-family tables short."""

from typing import List, Optional, Tuple

from mergekit_permute.spec.base import Axis, Bind, FeaturePoint, WeightRule

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
