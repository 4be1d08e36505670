"""Apply, invert and draw transforms, generically over a PermutationSpec.

A transform set maps space name -> view name -> tensor. A 1-D integer tensor is a permutation
(new = old[p]); a 2-D float tensor M is a general change of basis (features h' = h @ M), which
writers ("out" axes) take as M and readers ("in" axes) as M^-T. Norm gains ("elem" axes)
only admit permutations.
"""

from typing import Dict, Mapping, Optional, Tuple

import torch

from mergekit_permute.heads import HeadPerm
from mergekit_permute.spec.base import Bind, Fused, PermutationSpec, WeightRule

Transforms = Dict[str, Dict[str, torch.Tensor]]


def is_permutation(t: torch.Tensor) -> bool:
    return t.ndim == 1 and not t.is_floating_point()


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
            out[space.name] = {"": torch.randperm(space.size, generator=gen)}
    return out


def invert(transforms: Transforms) -> Transforms:
    def inv(t: torch.Tensor) -> torch.Tensor:
        return torch.argsort(t) if is_permutation(t) else torch.linalg.inv(t.double()).to(t.dtype)
    return {s: {v: inv(t) for v, t in views.items()} for s, views in transforms.items()}


def check_transforms(spec: PermutationSpec, transforms: Transforms) -> None:
    """Refuse a saved transform set that does not fit this model (sizes, valid permutations)."""
    for space in spec.spaces:
        views = transforms.get(space.name)
        if views is None or set(views) != set(space.views):
            raise ValueError(f"saved alignment lacks space {space.name} (or its views); it was "
                             "made for a different architecture or configuration")
        for view, size in space.views.items():
            t = views[view]
            if is_permutation(t):
                if t.shape != (size,) or not torch.equal(t.sort().values, torch.arange(size)):
                    raise ValueError(f"{space.name}[{view or 'all'}]: not a permutation of {size}")
            elif t.shape != (size, size):
                raise ValueError(f"{space.name}: matrix of shape {tuple(t.shape)}, expected {size}")
    extra = set(transforms) - {s.name for s in spec.spaces}
    if extra:
        raise ValueError(f"saved alignment has spaces this model lacks: {sorted(extra)[:5]}")


def _fused_index(axis: Fused, transforms: Transforms) -> torch.Tensor:
    """Index permutation of a fused axis built from the permutations of its parts."""
    if axis.layout == "blocks":
        pieces, offset = [], 0
        for part, size in zip(axis.parts, axis.sizes):
            perm = torch.arange(size) if part is None else _perm(transforms, part)
            pieces.append(perm + offset)
            offset += size
        return torch.cat(pieces)
    # per_head: the axis is [heads, parts, head_dim] flattened (GPT-NeoX query_key_value).
    n_parts, heads = len(axis.parts), axis.num_heads
    head_dim = axis.sizes[0] // heads
    index = torch.empty(heads, n_parts, head_dim, dtype=torch.long)
    for j, (part, size) in enumerate(zip(axis.parts, axis.sizes)):
        perm = torch.arange(size) if part is None else _perm(transforms, part)
        src = perm.reshape(heads, head_dim)                   # [heads, head_dim] flat source
        index[:, j, :] = (src // head_dim) * (n_parts * head_dim) + j * head_dim + src % head_dim
    return index.reshape(-1)


def _perm(transforms: Transforms, bind: Bind) -> torch.Tensor:
    t = transforms[bind.space][bind.view]
    if not is_permutation(t):
        raise ValueError(f"space {bind.space} holds a matrix; a fused axis needs a permutation")
    return t


def apply_to_tensor(rule: WeightRule, tensor: torch.Tensor, transforms: Transforms) -> torch.Tensor:
    """One tensor of B, expressed in A's basis."""
    for dim, axis in enumerate(rule.axes):
        if axis is None:
            continue
        if isinstance(axis, Fused):
            tensor = tensor.index_select(dim, _fused_index(axis, transforms).to(tensor.device))
            continue
        t = transforms[axis.space][axis.view]
        if is_permutation(t):
            tensor = tensor.index_select(dim, t.to(tensor.device))
            continue
        if axis.role == "elem":
            if torch.all(tensor == 1):
                continue  # a folded (unit) gain commutes with any orthogonal map
            raise ValueError(
                f"{rule.name}: space {axis.space} holds a matrix, but this weight scales it "
                "elementwise; fold the norm gain into its readers first"
            )
        m = t.to(device=tensor.device, dtype=torch.float64)
        m = m if axis.role == "out" else torch.linalg.inv(m).T
        # new[..., i, ...] = sum_j m[j, i] * old[..., j, ...]
        moved = torch.movedim(tensor.to(torch.float64), dim, -1) @ m
        tensor = torch.movedim(moved, -1, dim).to(tensor.dtype)
    return tensor


# ---- norm folding (what admits orthogonal residual maps) -----------------------------------------

# tensor -> (axis, factor): a reader's input axis times its norm's gain, a LayerNorm bias times
# 1/gain; a norm gain -> None (it becomes ones).
Folds = Dict[str, Optional[Tuple[int, torch.Tensor]]]


def fold_scales(spec: PermutationSpec, state: Mapping[str, torch.Tensor]) -> Folds:
    """LN(x) = g * n(x) + b feeds readers W: W (g * n + b) = (W diag g)(n + b / g), so the gain
    moves into the readers' input axis and the bias becomes b / g."""
    rules = {w.name: w for w in spec.weights}
    folds: Folds = {}
    for fold in spec.norm_folds:
        gain = state[fold.norm].detach().to("cpu", torch.float64)
        folds[fold.norm] = None
        if fold.bias is not None:
            if bool((gain.abs() < 1e-6).any()):
                raise ValueError(f"{fold.norm} has a (near-)zero gain, so its bias cannot be "
                                 "folded; use a permutation residual policy")
            folds[fold.bias] = (0, 1.0 / gain)
        for reader in fold.readers:
            axis = next(d for d, ax in enumerate(rules[reader].axes)
                        if isinstance(ax, Bind) and ax.role == "in")
            folds[reader] = (axis, gain)
    return folds


def fold_tensor(name: str, tensor: torch.Tensor, folds: Folds) -> torch.Tensor:
    """The same function with norm gains moved into their readers (see fold_scales)."""
    if name not in folds:
        return tensor
    if folds[name] is None:
        return torch.ones_like(tensor)
    axis, factor = folds[name]
    shape = [1] * tensor.ndim
    shape[axis] = -1
    return (tensor.double() * factor.to(tensor.device).reshape(shape)).to(tensor.dtype)


def apply_to_state_dict(spec: PermutationSpec, state: Mapping[str, torch.Tensor],
                        transforms: Transforms, folds: Optional[Folds] = None
                        ) -> Dict[str, torch.Tensor]:
    rules = spec.weight_map()
    out = {}
    for name, tensor in state.items():
        if folds:
            tensor = fold_tensor(name, tensor, folds)
        rule: Optional[WeightRule] = rules.get(name)
        out[name] = tensor if rule is None else apply_to_tensor(rule, tensor, transforms)
    return out


def apply_to_model(spec: PermutationSpec, model: torch.nn.Module, transforms: Transforms,
                   folds: Optional[Folds] = None) -> None:
    """Transform a loaded transformers model in place (tied parameters stay tied)."""
    rules = spec.weight_map()
    seen = set()
    with torch.no_grad():
        for name, param in model.state_dict(keep_vars=True).items():
            if id(param) in seen or name not in rules:
                continue
            seen.add(id(param))
            data = fold_tensor(name, param.data, folds) if folds else param.data
            param.data = apply_to_tensor(rules[name], data, transforms).contiguous()
