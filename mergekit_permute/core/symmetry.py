"""Is a saved transform set a symmetry of this architecture? `apply` replays nothing else.

Each space admits its own group: FF neurons a permutation (SwiGLU: with per-neuron scales on
up / down), attention a head permutation (whole KV groups, query heads inside their group,
dims inside heads; Q/K dims frozen where RoPE rotates them) or its dense generalisation (per KV
group an invertible V/O map, a Q map whose K map is its inverse transpose and commutes with
RoPE), the residual a permutation or, where the norms fold, an orthogonal map. Anything else
(a tampered file, a map made for another configuration) is refused before a byte is written.
"""

from typing import Dict, Mapping, Optional

import torch

from mergekit_permute.core.heads import HeadPerm
from mergekit_permute.core.permute import Scaled, Transforms, as_matrix, is_permutation
from mergekit_permute.spec.base import HeadLayout, PermutationSpec, Space

TOL = 1e-6   # float64 maps: rounding is ~1e-15; tampering is orders of magnitude above this


class NotASymmetry(ValueError):
    """A transform that would change the model's function (the message names the space)."""


def _is_perm(t, n: int) -> bool:
    return is_permutation(t) and t.shape == (n,) and torch.equal(t.sort().values, torch.arange(n))


def _basic(space: Space, view: str, t, size: int) -> None:
    where = f"{space.name}[{view or 'all'}]"
    index = t.index if isinstance(t, Scaled) else t
    if isinstance(t, Scaled) and (t.scale.shape != (size,) or not torch.isfinite(t.scale).all()
                                  or bool((t.scale == 0).any())):
        raise NotASymmetry(f"{where}: scales are not {size} finite non-zero numbers")
    if is_permutation(index):
        if not _is_perm(index, size):
            raise NotASymmetry(f"{where}: not a permutation of {size}")
    elif not (isinstance(t, torch.Tensor) and t.is_floating_point() and t.shape == (size, size)
              and bool(torch.isfinite(t).all())):
        shape = (f"scaled map of index {tuple(t.index.shape)} {t.index.dtype}"
                 if isinstance(t, Scaled) else f"{tuple(t.shape)} map")
        raise NotASymmetry(f"{where}: a {shape} (or not finite); expected a permutation of "
                           f"{size} or a finite {size} x {size} matrix")


def check_symmetry(spec: PermutationSpec, transforms: Transforms, *,
                   orthogonal_vo: bool = False) -> None:
    """Refuse a transform set that is not a function-preserving map of B for `spec`."""
    extra = set(transforms) - {s.name for s in spec.spaces}
    if extra:
        raise NotASymmetry(f"the alignment has spaces this model lacks: {sorted(extra)[:5]}; it "
                           "was made for another architecture or configuration")
    for space in spec.spaces:
        views = transforms.get(space.name)
        if views is None or set(views) != set(space.views):
            raise NotASymmetry(f"the alignment lacks space {space.name} (or some of its views); "
                               "it was made for another architecture or configuration")
        for view, size in space.views.items():
            _basic(space, view, views[view], size)
        if space.frozen:
            if not all(is_permutation(t) and torch.equal(t, torch.arange(len(t)))
                       for t in views.values()):
                raise NotASymmetry(f"{space.name}: this model's output is read in that basis, "
                                   "so only the identity keeps its function")
        elif space.kind == "ffn":
            _check_ffn(space, views)
        elif space.kind == "attention":
            _check_attention(space, views, orthogonal_vo, spec.qk_normed)
        else:
            _check_residual(spec, views[""])


def _check_ffn(space: Space, views: Mapping) -> None:
    up = views[""]
    if not (is_permutation(up) or isinstance(up, Scaled)):
        raise NotASymmetry(f"{space.name}: feed-forward neurons admit a permutation only, not a "
                           "dense map (the activation is elementwise)")
    if isinstance(up, Scaled) and not space.gated:
        raise NotASymmetry(f"{space.name}: per-neuron scales need a gated (SwiGLU) feed-forward; "
                           "this activation is not homogeneous")
    if space.gated:
        gate, index = views["gate"], up.index if isinstance(up, Scaled) else up
        if not is_permutation(gate) or not torch.equal(gate, index):
            raise NotASymmetry(f"{space.name}: the gate must move with up (one permutation)")


def _check_residual(spec: PermutationSpec, q) -> None:
    if is_permutation(q):
        return
    if isinstance(q, Scaled):
        raise NotASymmetry("residual: per-feature scales do not pass the norms")
    error = spec.orthogonal_residual_error()
    if error:
        raise NotASymmetry(f"residual: the alignment rotates the residual stream, which this "
                           f"checkpoint does not admit: {error}")
    q = q.double()
    eye = torch.eye(q.shape[0], dtype=torch.float64)
    if float((q.T @ q - eye).abs().max()) > TOL:
        raise NotASymmetry("residual: the map is not orthogonal (Q^T Q != I), so the norms "
                           "would change the function")
    if spec.residual_centered:
        ones = torch.ones(q.shape[0], dtype=torch.float64)
        if float((ones @ q - ones).abs().max()) > TOL * q.shape[0] ** 0.5:
            raise NotASymmetry("residual: the rotation moves the all-ones direction, which "
                               "LayerNorm's mean subtraction does not allow")


def _check_attention(space: Space, views: Mapping, orthogonal_vo: bool, qk_normed: bool
                     ) -> None:
    if any(isinstance(t, Scaled) for t in views.values()):
        raise NotASymmetry(f"{space.name}: attention admits no per-feature scales")
    if all(is_permutation(t) for t in views.values()):
        _check_head_permutation(space, views)
    else:
        _check_head_maps(space, {v: as_matrix(t) for v, t in views.items()}, orthogonal_vo,
                         qk_normed)


def _check_head_permutation(space: Space, views: Mapping[str, torch.Tensor]) -> None:
    """The flat q/k/v/o permutations are exactly the views of one HeadPerm."""
    h = space.heads
    kv, g, d, f = h.num_kv_heads, h.group_size, h.head_dim, h.qk_frozen_dims
    v, k, o = views["v"].reshape(kv, d), views["k"].reshape(kv, d), views["o"].reshape(h.num_heads, d)
    src_group = v[:, 0] // d                                            # [kv]
    src_head = (o[:, 0] // d).reshape(kv, g)                            # [kv, g]
    perm = HeadPerm(group=src_group, query=src_head - src_group[:, None] * g,
                    qk_inner=k - src_group[:, None] * d, vo_inner=v - src_group[:, None] * d)
    ok = _is_perm(perm.group, kv) and all(_is_perm(q, g) for q in perm.query) \
        and all(_is_perm(p, d) for p in (*perm.qk_inner, *perm.vo_inner))
    if ok:
        expected = perm.views(h)
        ok = all(torch.equal(expected[view], views[view]) for view in expected)
    if not ok:
        raise NotASymmetry(f"{space.name}: the permutations do not move whole heads (KV groups "
                           "with their query heads, one inner permutation per group for Q/K and "
                           "one for V/O), so attention would change")
    if f and not torch.equal(perm.qk_inner[:, :f], torch.arange(f).repeat(kv, 1)):
        raise NotASymmetry(f"{space.name}: rotary Q/K dimensions moved inside a head (RoPE "
                           "pairs them by frequency)")


def _blocks(m: torch.Tensor, n: int, d: int) -> torch.Tensor:
    # [n*d, n*d] -> [n, d, n, d] -> [source block, new block, d, d]
    return m.reshape(n, d, n, d).permute(0, 2, 1, 3)


def _sources(blocks: torch.Tensor, name: str, what: str) -> torch.Tensor:
    """For every new block the one source block that is not zero."""
    norms = blocks.flatten(2).norm(dim=2)                               # [source, new]
    scale = float(norms.max()) or 1.0
    live = norms > TOL * scale
    if not bool((live.sum(0) == 1).all()) or not bool((live.sum(1) == 1).all()):
        raise NotASymmetry(f"{name}: the {what} map mixes heads (each head must come whole from "
                           "one head)")
    return live.float().argmax(0)                                       # [new] -> source


def _check_head_maps(space: Space, m: Dict[str, torch.Tensor], orthogonal_vo: bool,
                     qk_normed: bool = False) -> None:
    h: HeadLayout = space.heads
    kv, g, d, f = h.num_kv_heads, h.group_size, h.head_dim, h.qk_frozen_dims
    name = space.name
    vb, ob = _blocks(m["v"], kv, d), _blocks(m["o"], h.num_heads, d)
    qb, kb = _blocks(m["q"], h.num_heads, d), _blocks(m["k"], kv, d)
    src_group, src_head = _sources(vb, name, "V"), _sources(ob, name, "O")
    if not (torch.equal(_sources(kb, name, "K"), src_group)
            and torch.equal(_sources(qb, name, "Q"), src_head)
            and torch.equal(src_head // g, src_group.repeat_interleave(g))):
        raise NotASymmetry(f"{name}: Q, K, V and O move heads differently (a KV group must move "
                           "with its own query heads)")
    eye = torch.eye(d, dtype=torch.float64)
    rotary = _rope_generator(f)
    for i in range(h.num_heads):
        group = i // g
        mv = vb[src_group[group], group]
        mq, mk = qb[src_head[i], i], kb[src_group[group], group]
        scale = max(1.0, float(mq.abs().max()))
        if float((ob[src_head[i], i] - mv).abs().max()) > TOL * max(1.0, float(mv.abs().max())):
            raise NotASymmetry(f"{name}: head {i}'s O map is not its KV group's V map")
        if qk_normed and max(_max_abs(mq - eye), _max_abs(mk - eye)) > TOL:
            raise NotASymmetry(f"{name}: head {i}'s Q/K map acts inside the head, whose q_norm/"
                               "k_norm gains are per dim (only whole heads may move)")
        if float((mq @ mk.T - eye).abs().max()) > TOL * scale:
            raise NotASymmetry(f"{name}: head {i}'s Q map is not the inverse transpose of its "
                               "group's K map, so q.k would change")
        if rotary is not None and (
                float((mq[:f, :f] @ rotary - rotary @ mq[:f, :f]).abs().max()) > TOL * scale
                or _max_abs(mq[:f, f:]) > TOL * scale or _max_abs(mq[f:, :f]) > TOL * scale):
            raise NotASymmetry(f"{name}: head {i}'s Q map does not commute with RoPE (rotary "
                               "dims admit only a rotation-scaling per frequency pair)")
        if orthogonal_vo and float((mv.T @ mv - eye).abs().max()) > TOL:
            raise NotASymmetry(f"{name}: V/O maps claim to be rotations but are not orthogonal")
        if float(torch.linalg.svdvals(mv).min()) < TOL * max(1.0, float(mv.abs().max())):
            raise NotASymmetry(f"{name}: head {i}'s V/O map is singular")


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _rope_generator(frozen: int) -> Optional[torch.Tensor]:
    """A generic element of the rotations RoPE applies to the first `frozen` dims (rotate_half
    pairs dim i with i + frozen/2, each pair its own frequency): a map of those dims commutes
    with every RoPE rotation exactly when it commutes with this one."""
    if frozen == 0:
        return None
    half = frozen // 2
    gen = torch.zeros(frozen, frozen, dtype=torch.float64)
    i = torch.arange(half)
    freq = 1.0 + i.double()
    gen[i, i + half], gen[i + half, i] = freq, -freq
    return gen
