"""Data-free weight matching (Git Re-Basin, Ainsworth et al. 2022), generic over the spec.

With every other space fixed, the inner product of A's and aligned B's weights is linear in one
space's permutation (a similarity S [n_A, n_B] over every axis bound to it); coordinate descent
over the spaces, in a seeded order, until a sweep changes nothing. A permutation p scores
sum_i S[i, p[i]], an orthogonal residual Q [dB, dA] trace(S Q).
"""

import logging
from typing import Dict, List, Mapping, Tuple

import torch

from mergekit_permute.core.alignment import Alignment
from mergekit_permute.core.match import match_attention, match_plain, procrustes
from mergekit_permute.core.permute import (
    Transforms, apply_to_tensor, fold_gauge, identity_transforms, is_permutation, norm_gains,
    plain_views,
)
from mergekit_permute.settings import AlignSettings, residual_policy
from mergekit_permute.spec.base import Bind, Fused, HeadLayout, PermutationSpec, Space, WeightRule

LOG = logging.getLogger(__name__)
State = Mapping[str, torch.Tensor]
RESIDUAL_POLICIES = ("all", "identity", "orthogonal", "auto")


# ---- similarity -------------------------------------------------------------------------------

def _bound_axes(spec: PermutationSpec, space: str) -> List[Tuple[WeightRule, int, List]]:
    """(rule, dim, [(view, part index or None)]) for every axis of every weight bound to space."""
    out = []
    for rule in spec.weights:
        for dim, axis in enumerate(rule.axes):
            if isinstance(axis, Bind):
                parts = [(axis.view, None)] if axis.space == space else []
            elif isinstance(axis, Fused):
                parts = [(p.view, j) for j, p in enumerate(axis.parts)
                         if p is not None and p.space == space]
            else:
                parts = []
            if parts:
                out.append((rule, dim, parts))
    return out


def _by_rule(spec: PermutationSpec, state: State) -> Dict[str, torch.Tensor]:
    """Rule name -> tensor (aliases resolved). A tied copy is dropped when its target is there
    (it is the same tensor); weights absent from the state are simply not counted."""
    rules = spec.weight_map()
    found = {rules[n].name: t for n, t in state.items() if n in rules}
    return {k: t for k, t in found.items() if rules[k].tied_to not in found}


def _similarity(spec: PermutationSpec, state_a: State, state_b: State, transforms: Transforms,
                space_name: str):
    """view -> S [n_A, n_B], plus view -> squared row norms of A [n_A] and of B [n_B]."""
    a_all, b_all = _by_rule(spec, state_a), _by_rule(spec, state_b)
    views = spec.space(space_name).views
    sim = {v: torch.zeros(n, n, dtype=torch.float64) for v, n in views.items()}
    sq_a = {v: torch.zeros(n, dtype=torch.float64) for v, n in views.items()}
    sq_b = {v: torch.zeros(n, dtype=torch.float64) for v, n in views.items()}
    for rule, dim, parts in _bound_axes(spec, space_name):
        if rule.name not in a_all or rule.name not in b_all:
            continue
        ta = a_all[rule.name].detach().to("cpu", torch.float64)
        tb = b_all[rule.name].detach().to("cpu", torch.float64)
        # B on every other axis in A's basis (current estimate); this axis left as stored.
        free = rule.model_copy(update={"axes": tuple(None if d == dim else ax
                                                     for d, ax in enumerate(rule.axes))})
        tb = apply_to_tensor(free, tb, transforms)
        for view, j in parts:
            pa, pb = ta, tb
            if j is not None:
                idx = rule.axes[dim].part_index(j)
                pa, pb = ta.index_select(dim, idx), tb.index_select(dim, idx)
            # [..., n, ...] -> [n, rest]; a 1-D bias or gain gives rows of length 1
            xa = pa.movedim(dim, 0).reshape(pa.shape[dim], -1)
            xb = pb.movedim(dim, 0).reshape(pb.shape[dim], -1)
            sim[view] += xa @ xb.T                                        # [n_A, n_B]
            sq_a[view] += xa.square().sum(1)
            sq_b[view] += xb.square().sum(1)
    return sim, sq_a, sq_b


def weight_similarity(spec: PermutationSpec, state_a: State, state_b: State,
                      transforms: Transforms, space_name: str) -> Dict[str, torch.Tensor]:
    """For one space: view -> [n_view_A, n_view_B] float64 similarity S where S[i, j] = sum over
    every tensor axis bound to that view of <row i of A's tensor along that axis, row j of B's
    tensor along that axis>, with B's tensor first transformed on all its OTHER axes by
    `transforms` (current estimate; the axis itself untouched). Fused axes (GPT-2 c_attn
    blocks, GPT-NeoX per_head) are split into their parts; role 'elem' (biases/gains) count as
    rows of length 1. Tied copies count once; weights absent from a state are skipped."""
    return _similarity(spec, state_a, state_b, transforms, space_name)[0]


# ---- one space at a time ------------------------------------------------------------------------

def _attention_score(sim: Dict[str, torch.Tensor], layout: HeadLayout, mode: str) -> torch.Tensor:
    """The four views folded into one o-view score [Hq*D, Hq*D] whose value under
    match_attention's head permutation is exactly the weights' inner product."""
    h, g, d = layout.num_heads, layout.group_size, layout.head_dim

    def expand(s: torch.Tensor) -> torch.Tensor:
        # [KV*D, KV*D] -> [Hq*D, Hq*D]: query head a reads KV head a // g. Each KV row is then
        # seen by the g query heads of its group, hence / g to count it once.
        idx = (torch.arange(h)[:, None] // g * d + torch.arange(d)[None, :]).reshape(-1)  # [Hq*D]
        return s[idx][:, idx] / g

    def per_head(s: torch.Tensor) -> torch.Tensor:
        # Q/K dims stay put inside a head: only a head pair's block trace counts. Spread it
        # evenly over the block ([n*D, n*D] -> [n, D, n, D] -> traces [n, n] -> blocks), so any
        # inner V/O permutation collects exactly the trace and its choice is unaffected.
        n = s.shape[0] // d
        tr = s.reshape(n, d, n, d).diagonal(dim1=1, dim2=3).sum(-1)       # [n, n]
        return (tr / d).repeat_interleave(d, 0).repeat_interleave(d, 1)  # [n*D, n*D]

    # match_attention moves Q/K dims with V/O when none is rotary (and under ignore_heads),
    # else keeps them all fixed: score Q/K at the dim level or at the head level accordingly.
    qk = (lambda s: s) if layout.qk_frozen_dims == 0 or mode == "ignore_heads" else per_head
    return sim["o"] + qk(sim["q"]) + expand(sim["v"]) + expand(qk(sim["k"]))


def _solve(space: Space, sim: Dict[str, torch.Tensor], attention: str, residual: str,
           centered: bool = False) -> Dict[str, torch.Tensor]:
    if space.kind == "attention":
        return match_attention(_attention_score(sim, space.heads, attention), space.heads,
                               attention)
    if space.kind == "residual" and residual == "orthogonal":
        # S [dA, dB] plays H_A^T H_B; Q [dB, dA]
        return {"": procrustes([sim[""]], keep_ones=centered)}
    # A gated FF's gate and up rows move together: their evidence adds up.
    return plain_views(space, match_plain(sum(sim.values()), spend=True)[0])


def _score(sim: Dict[str, torch.Tensor], views: Dict[str, torch.Tensor]) -> float:
    """<A, aligned B> over one space's bound rows: sum_i S[i, p[i]], or trace(S Q)."""
    total = 0.0
    for v, s in sim.items():
        t = views[v]
        total += float(s[torch.arange(s.shape[0]), t].sum() if is_permutation(t)
                       else torch.trace(s @ t.double()))
    return total


def _cosine(sim, sq_a, sq_b, views) -> float:
    """Cosine of A's and aligned B's rows over all of the space's bindings, in [-1, 1]."""
    norm = (sum(float(x.sum()) for x in sq_a.values())
            * sum(float(x.sum()) for x in sq_b.values())) ** 0.5
    return round(_score(sim, views) / max(norm, 1e-30), 6)


def _same(old: torch.Tensor, new: torch.Tensor) -> bool:
    if is_permutation(old) != is_permutation(new):
        return False
    return torch.equal(old, new) if is_permutation(new) else bool((old - new).abs().max() < 1e-10)


def _fold(spec: PermutationSpec, state: State) -> Dict[str, torch.Tensor]:
    """Norm gains moved into their readers; the (now unit) gains dropped, since an orthogonal
    map leaves them alone and they carry no evidence."""
    gauge = fold_gauge(spec, norm_gains(spec, state))
    return {n: gauge.apply(n, t) for n, t in state.items()
            if gauge.ops.get(n, ("",))[0] != "set"}


# ---- coordinate descent -------------------------------------------------------------------------

def weight_match(spec: PermutationSpec, state_a: State, state_b: State, *,
                 attention: str = "head_perm", ffn: str = "permute", residual: str = "all",
                 max_iter: int = 50, seed: int = 0) -> Tuple[Transforms, Dict[str, Dict]]:
    """Coordinate descent: start from identity transforms, visit non-frozen spaces in a random
    order (torch.Generator seeded by `seed`, so the same inputs give bit-identical output),
    solve each space's assignment from weight_similarity with the other spaces fixed, stop
    when a full sweep changes nothing (or max_iter sweeps). Returns (transforms, report)
    where report[space] = {"kind", "size", "mean_corr_before", "mean_corr_after", "measure"};
    the numbers are the cosine of A's and B's weights bound to the space, before (raw B) and
    after alignment.

    residual: "all" (one permutation from every binding), "identity", "orthogonal" (norm
    gains folded first: the transforms then apply to fold_scales(spec, state_b)-folded B, see
    weight_match_alignment), or "auto" (orthogonal where it preserves the function)."""
    residual = residual_policy(AlignSettings(residual=residual), spec)
    if residual not in RESIDUAL_POLICIES:
        raise ValueError(f"residual={residual!r} does not apply to weight matching (it pools "
                         f"calibration points); use one of {', '.join(RESIDUAL_POLICIES)}")
    for state in (state_a, state_b):
        spec.check_state_dict({k: tuple(v.shape) for k, v in state.items()})
    if residual == "orthogonal":
        error = spec.orthogonal_residual_error()
        if error:
            raise ValueError(f"residual=orthogonal: {error}")
        state_a, state_b = _fold(spec, state_a), _fold(spec, state_b)

    moving = AlignSettings(attention=attention, ffn=ffn, residual=residual)
    spaces = [s for s in spec.spaces if moving.moves(s)]
    transforms = identity_transforms(spec)
    # Only the numbers are kept: a real model's similarity matrices would not fit memory.
    before = {s.name: _cosine(*_similarity(spec, state_a, state_b, transforms, s.name),
                              transforms[s.name]) for s in spaces}
    gen = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        changed = False
        for k in torch.randperm(len(spaces), generator=gen).tolist():
            space = spaces[k]
            sim = weight_similarity(spec, state_a, state_b, transforms, space.name)
            new = _solve(space, sim, attention, residual, spec.residual_centered)
            changed |= not all(_same(transforms[space.name][v], t) for v, t in new.items())
            transforms[space.name] = new
        if not changed:
            break
    else:
        LOG.warning("weight matching stopped after %d sweeps without converging", max_iter)

    report: Dict[str, Dict] = {}
    for space in spaces:
        after = _similarity(spec, state_a, state_b, transforms, space.name)
        report[space.name] = {"kind": space.kind, "size": space.size,
                              "mean_corr_before": before[space.name],
                              "mean_corr_after": _cosine(*after, transforms[space.name]),
                              "measure": "weight cosine"}
    return transforms, report


def weight_match_alignment(spec: PermutationSpec, state_a: State, state_b: State,
                           settings: AlignSettings, *, max_iter: int = 50, seed: int = 0
                           ) -> Alignment:
    """A full Alignment from weights alone (the calibration fields of `settings` are unused)."""
    residual = residual_policy(settings, spec)
    transforms, report = weight_match(spec, state_a, state_b, attention=settings.attention,
                                      ffn=settings.ffn, residual=residual, max_iter=max_iter,
                                      seed=seed)
    alignment = Alignment(spec=spec, transforms=transforms, settings=settings, report=report,
                          info={"matching": "weights", "residual_policy": residual})
    if residual == "orthogonal":
        alignment.gains_a, alignment.gains_b = norm_gains(spec, state_a), norm_gains(spec, state_b)
    return alignment
