"""Apply, invert and draw transforms, generically over a PermutationSpec.

A transform is a permutation (1-D int, new = old[p]), a `Scaled` permutation (SwiGLU up/down)
or a dense change of basis M (h' = h @ M); writers take M, readers its inverse transpose. A
`Gauge` folds norm gains into their readers (what lets a rotation pass a norm) and unfolds A's,
so aligned B is written in A's norm gauge and any stock merge of the two is exact.
"""

from dataclasses import dataclass, field
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from mergekit_permute.core.heads import HeadPerm
from mergekit_permute.spec.base import Bind, PermutationSpec, WeightRule



class Scaled(NamedTuple):
    """new_i = scale_i * old[index_i]: a permutation with per-feature scales."""

    index: torch.Tensor   # [n] long
    scale: torch.Tensor   # [n] float64


Transform = Union[torch.Tensor, Scaled]
Transforms = Dict[str, Dict[str, Transform]]


def is_permutation(t) -> bool:
    return isinstance(t, torch.Tensor) and t.ndim == 1 and not t.is_floating_point()


def as_matrix(t: Transform, n: Optional[int] = None) -> torch.Tensor:
    """The dense M (h' = h @ M, float64) of any transform."""
    if isinstance(t, Scaled) or is_permutation(t):
        index, scale = (t.index, t.scale) if isinstance(t, Scaled) else \
            (t, torch.ones(len(t), dtype=torch.float64))
        m = torch.zeros(len(index), len(index), dtype=torch.float64)
        m[index, torch.arange(len(index))] = scale.to(torch.float64)
        return m
    return t.to(torch.float64)


def compose(first: Transform, then: Transform) -> Transform:
    """The transform of applying `first`, then `then` (h'' = h @ M_first @ M_then)."""
    if is_permutation(first) and is_permutation(then):
        return first[then]
    if not (isinstance(first, torch.Tensor) and first.ndim == 2) and \
            not (isinstance(then, torch.Tensor) and then.ndim == 2):
        i0, s0 = (first.index, first.scale) if isinstance(first, Scaled) else \
            (first, torch.ones(len(first), dtype=torch.float64))
        i1, s1 = (then.index, then.scale) if isinstance(then, Scaled) else \
            (then, torch.ones(len(then), dtype=torch.float64))
        return Scaled(i0[i1], s0[i1] * s1)
    return as_matrix(first) @ as_matrix(then)


def plain_views(space, perm: torch.Tensor) -> Dict[str, torch.Tensor]:
    """One permutation on every view of a non-attention space (a gated FF's gate too)."""
    return {view: perm for view in space.views}


def identity_transforms(spec: PermutationSpec) -> Transforms:
    return {s.name: {v: torch.arange(n) for v, n in s.views.items()} for s in spec.spaces}


def random_transforms(spec: PermutationSpec, seed: int = 0, qk_follows_vo: bool = False
                      ) -> Transforms:
    """A random *function-preserving* transform set (for tests and property checks)."""
    gen = torch.Generator().manual_seed(seed)
    out: Transforms = {}
    for space in spec.spaces:
        if space.frozen:
            out[space.name] = {v: torch.arange(n) for v, n in space.views.items()}
        elif space.heads is not None:
            out[space.name] = HeadPerm.random(space.heads, gen, qk_follows_vo).views(space.heads)
        else:
            out[space.name] = plain_views(space, torch.randperm(space.size, generator=gen))
    return out


def invert(transforms: Transforms) -> Transforms:
    def inv(t: Transform) -> Transform:
        if isinstance(t, Scaled):
            back = torch.argsort(t.index)
            return Scaled(back, 1.0 / t.scale[back])
        return torch.argsort(t) if is_permutation(t) else torch.linalg.inv(t.double()).to(t.dtype)
    return {s: {v: inv(t) for v, t in views.items()} for s, views in transforms.items()}


def _reader_matrix(m: torch.Tensor) -> torch.Tensor:
    """M^-T, computed once per matrix (readers of one space share it)."""
    cached = getattr(m, "_mergekit_permute_inv_t", None)
    if cached is None:
        cached = torch.linalg.inv(m.to(torch.float64)).T.contiguous()
        m._mergekit_permute_inv_t = cached
    return cached


# The attribute under which `with_readers` leaves a learned matrix's M^-T.
_READER = "_mergekit_permute_reader"


def with_readers(transforms: Transforms, views: Sequence[Tuple[str, str]]) -> Transforms:
    """`transforms` with M^-T attached (differentiably) to every matrix a weight reads through,
    computed once: learned maps are built anew for every loss, and the residual space alone has
    a reader per block input and the head. (Done before the forward, outside any checkpointed
    block, whose recomputation must not find tensors of another block's region.)"""
    for space, view in views:   # (PermutationSpec.reader_views)
        m = transforms.get(space, {}).get(view)
        if isinstance(m, torch.Tensor) and m.is_floating_point() and m.ndim == 2:
            setattr(m, _READER, torch.linalg.inv(m).T)
    return transforms


def exact_dtype(dtype: torch.dtype) -> torch.dtype:
    """Arithmetic that adds no rounding the result's dtype would show: float64 for float32 and
    float64 tensors, float32 for 16-bit ones (whose steps are 2^16 times coarser)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else torch.float64


def _along(tensor: torch.Tensor, dim: int, t: Transform, role: str, name: str,
           exact: bool = True, work: Optional[torch.dtype] = None) -> torch.Tensor:
    """One axis of a tensor through one view's transform (in `work`, by default `exact_dtype`
    when `exact`, else the tensor's own dtype: differentiable either way)."""
    work = work or (exact_dtype(tensor.dtype) if exact else tensor.dtype)
    if is_permutation(t):
        return tensor.index_select(dim, t.to(tensor.device))
    if isinstance(t, Scaled):
        moved = tensor.index_select(dim, t.index.to(tensor.device))
        if role == "elem":
            if torch.all(t.scale == 1):
                return moved
            raise ValueError(f"{name}: a norm gain cannot follow per-feature scales")
        shape = [1] * tensor.ndim
        shape[dim] = -1
        scale = t.scale.to(tensor.device).reshape(shape)
        scale = scale if role == "out" else 1.0 / scale
        return (moved.to(work) * scale.to(work)).to(tensor.dtype)
    if role == "elem":
        if torch.all(tensor == 1):
            return tensor  # a folded (unit) gain commutes with any map
        raise ValueError(f"{name}: this weight scales a space that holds a matrix; fold the "
                         "norm gain into its readers first")
    if role == "out":
        m = t
    elif exact:
        m = _reader_matrix(t)
    else:
        m = getattr(t, _READER, None)   # (with_readers)
        m = torch.linalg.inv(t).T if m is None else m     # differentiable (learned alignment)
    m = m.to(device=tensor.device, dtype=work)
    # new[..., i, ...] = sum_j m[j, i] * old[..., j, ...]
    moved = torch.movedim(tensor.to(work), dim, -1) @ m
    return torch.movedim(moved, -1, dim).to(tensor.dtype)


def apply_to_tensor(rule: WeightRule, tensor: torch.Tensor, transforms: Transforms,
                    exact: bool = True, work: Optional[torch.dtype] = None) -> torch.Tensor:
    """One tensor of B, expressed in A's basis (the arithmetic in `work`: see `_along`)."""
    for dim, axis in enumerate(rule.axes):
        if axis is None:
            continue
        if isinstance(axis, Bind):
            tensor = _along(tensor, dim, transforms[axis.space][axis.view], axis.role, rule.name,
                            exact, work)
            continue
        # A fused axis: each part through its own view, then put back in place.
        out = tensor.clone()
        for j, part in enumerate(axis.parts):
            if part is None:
                continue
            idx = axis.part_index(j).to(tensor.device)
            piece = _along(tensor.index_select(dim, idx), dim, transforms[part.space][part.view],
                           part.role, rule.name, exact, work)
            out = out.index_copy(dim, idx, piece)
        tensor = out
    return tensor


# ---- gauges: norm gains moved into (or out of) their readers --------------------------------------

@dataclass(frozen=True)
class Gauge:
    """tensor name -> ("scale", axis, factor) or ("set", value): what folding (or unfolding)
    does to it. LN(x) = g * n(x) + b read by W: W (g * n + b) = (W diag g)(n + b / g). A norm
    with an offset (NormFold.offset, Gemma's (1 + w)) folds its effective gain offset + w."""

    ops: Dict[str, Tuple] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def apply(self, name: str, tensor: torch.Tensor, work: Optional[torch.dtype] = None,
              inplace: bool = False) -> torch.Tensor:
        """The tensor with this gauge's op (the arithmetic in `work`, by default
        `exact_dtype` of the tensor's; with `inplace`, a private copy already in `work` is
        scaled where it is)."""
        op = self.ops.get(name)
        if op is None:
            return tensor
        if op[0] == "set":
            return op[1].to(tensor.device, tensor.dtype).clone()
        _, axis, factor = op
        shape = [1] * tensor.ndim
        shape[axis] = -1
        work = work or exact_dtype(tensor.dtype)
        if inplace and tensor.dtype == work:
            return tensor.mul_(factor.to(tensor.device, work).reshape(shape))
        return (tensor.to(work) * factor.to(tensor.device, work).reshape(shape)).to(tensor.dtype)


def norm_gains(spec: PermutationSpec, source) -> Dict[str, torch.Tensor]:
    """The gains of every foldable norm, float64 on the CPU, from a state dict or any tensor
    source (`.get(name)`)."""
    return {f.norm: source.get(f.norm).detach().to("cpu", torch.float64)
            for f in spec.norm_folds}


def _reader_axis(rule: WeightRule) -> int:
    return next(d for d, ax in enumerate(rule.axes) if isinstance(ax, Bind) and ax.role == "in")


def _check_gain(norm: str, gain: torch.Tensor, why: str) -> None:
    if bool((gain.abs() < 1e-6).any()):
        raise ValueError(f"{norm} has a (near-)zero gain, so {why}; use a permutation residual "
                         "policy (residual=all)")


def _effective(fold, gain: torch.Tensor) -> Tuple[torch.Tensor, float]:
    """(the gain the norm multiplies by, that of a folded norm). A folded norm stores ones, as
    every family's does, so the generic code sees a unit gain; with an offset (Gemma's
    (1 + w)) that multiplies by the uniform 1 + offset, which commutes with any map too."""
    return gain + fold.offset, 1.0 + fold.offset


def fold_gauge(spec: PermutationSpec, gains: Mapping[str, torch.Tensor]) -> Gauge:
    """Gains -> ones: readers' input axes times the gain, LayerNorm biases divided by it."""
    rules = {w.name: w for w in spec.weights}
    ops: Dict[str, Tuple] = {}
    for fold in spec.norm_folds:
        gain, unit = _effective(fold, gains[fold.norm])
        ops[fold.norm] = ("set", torch.ones_like(gain))
        if fold.bias is not None:
            _check_gain(fold.norm, gain, "its bias cannot be folded")
            ops[fold.bias] = ("scale", 0, unit / gain)
        for reader in fold.readers:
            ops[reader] = ("scale", _reader_axis(rules[reader]), gain / unit)
    return Gauge(ops)


def unfold_gauge(spec: PermutationSpec, gains: Mapping[str, torch.Tensor]) -> Gauge:
    """Ones -> these gains (model A's): the inverse of fold_gauge for the same gains."""
    rules = {w.name: w for w in spec.weights}
    ops: Dict[str, Tuple] = {}
    for fold in spec.norm_folds:
        gain, unit = _effective(fold, gains[fold.norm])
        _check_gain(fold.norm, gain, "aligned B cannot be written in A's norm gauge")
        ops[fold.norm] = ("set", gains[fold.norm])
        if fold.bias is not None:
            ops[fold.bias] = ("scale", 0, gain / unit)
        for reader in fold.readers:
            ops[reader] = ("scale", _reader_axis(rules[reader]), unit / gain)
    return Gauge(ops)


def fold_scales(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> Gauge:
    return fold_gauge(spec, norm_gains(spec, state))


# ---- whole state dicts and models (tests, barrier sweeps, small models) ---------------------------

def _has_arithmetic(rule: Optional[WeightRule], transforms: Transforms) -> bool:
    """Whether any of the rule's axes goes through more than a permutation."""
    if rule is None:
        return False
    binds = [b for axis in rule.axes if axis is not None
             for b in ([axis] if isinstance(axis, Bind) else [p for p in axis.parts if p])]
    return any(not is_permutation(transforms[b.space][b.view]) for b in binds)


# Working copies of a large tensor (an embedding through a residual rotation: float32 or
# float64 copies, the product, BLAS buffers) are made a slab of this many bytes at a time.
SLAB_BYTES = 32 << 20


def _slab_dim(rule: Optional[WeightRule], tensor: torch.Tensor,
              gauges: Tuple[Optional[Gauge], ...]) -> Optional[int]:
    """An axis no transform touches along which `tensor` is cut into slabs, or None (small
    tensors, and norms whose gauge replaces them whole)."""
    if rule is None or tensor.ndim < 2 or not tensor.is_floating_point() or \
            tensor.numel() * 8 <= SLAB_BYTES or \
            any(g and g.ops.get(rule.name, ("",))[0] == "set" for g in gauges):
        return None
    return next((d for d, axis in enumerate(rule.axes) if axis is None), None)


def transform_tensor(spec_rules: Mapping[str, WeightRule], name: str, tensor: torch.Tensor,
                     transforms: Transforms, fold: Optional[Gauge] = None,
                     unfold: Optional[Gauge] = None) -> torch.Tensor:
    """fold (B's gains -> 1), transform, unfold (1 -> A's gains): one tensor of aligned B,
    computed in `exact_dtype` and rounded to the tensor's own dtype once, at the end. A large
    tensor goes a slab at a time along an untouched axis, so its working copies stay small."""
    rule = spec_rules.get(name)
    dim = _slab_dim(rule, tensor, (fold, unfold))
    if dim is None:
        return _transform_whole(rule, name, tensor, transforms, fold, unfold)
    out = torch.empty_like(tensor)
    row_bytes = tensor.numel() // tensor.shape[dim] * 8
    rows = max(1, SLAB_BYTES // row_bytes)
    for start in range(0, tensor.shape[dim], rows):
        n = min(rows, tensor.shape[dim] - start)
        out.narrow(dim, start, n).copy_(_transform_whole(
            rule, name, tensor.narrow(dim, start, n), transforms, fold, unfold))
    return out


def _transform_whole(rule: Optional[WeightRule], name: str, tensor: torch.Tensor,
                     transforms: Transforms, fold: Optional[Gauge],
                     unfold: Optional[Gauge]) -> torch.Tensor:
    key = rule.name if rule is not None else name   # gauges use the spec's names, not aliases
    stored = tensor.dtype
    # Every step in the stored dtype's exact_dtype (a bf16 tensor's float32 copy must not be
    # taken for a float32 tensor and widened again: float64 products, twice the time).
    work = exact_dtype(stored) if tensor.is_floating_point() else None
    original = tensor
    if work is not None and (_has_arithmetic(rule, transforms)
                             or any(g and key in g.ops for g in (fold, unfold))):
        tensor = tensor.to(work)
    # (gauges scale in place once `tensor` is a working copy: one [rows, cols] buffer fewer)
    if fold:
        tensor = fold.apply(key, tensor, work, inplace=tensor is not original)
    if rule is not None:
        tensor = apply_to_tensor(rule, tensor, transforms, work=work)
    if unfold:
        tensor = unfold.apply(key, tensor, work, inplace=tensor is not original)
    return tensor.to(stored)


def apply_to_state_dict(spec: PermutationSpec, state: Mapping[str, torch.Tensor],
                        transforms: Transforms, fold: Optional[Gauge] = None,
                        unfold: Optional[Gauge] = None) -> Dict[str, torch.Tensor]:
    rules = spec.weight_map()
    return {name: transform_tensor(rules, name, t, transforms, fold, unfold)
            for name, t in state.items()}


def apply_to_model(spec: PermutationSpec, model: torch.nn.Module, transforms: Transforms,
                   fold: Optional[Gauge] = None, unfold: Optional[Gauge] = None) -> None:
    """Transform a loaded transformers model in place (tied parameters stay tied)."""
    rules = spec.weight_map()
    new = {}   # every tensor first: a refused map leaves the model as it was
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if id(param) in new or name not in rules:
                continue
            new[id(param)] = (param, transform_tensor(rules, name, param.data, transforms, fold,
                                                      unfold).contiguous())
    for param, tensor in new.values():
        param.data = tensor
