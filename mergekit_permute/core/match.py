"""Assignment solvers: correlation matrices -> permutations, per kind of space."""

from typing import Dict, List, Optional, Tuple

import lap
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergekit_permute.core.heads import HeadPerm, flat_views
from mergekit_permute.core.prices import auction_prices
from mergekit_permute.settings import AlignSettings
from mergekit_permute.spec.base import HeadLayout

AttentionMode = AlignSettings.model_fields["attention"].annotation
QKMode = AlignSettings.model_fields["qk"].annotation


# From this size, a square finite matrix is solved from auction prices (core/prices.py):
# lapx's Jonker-Volgenant on the costs less those prices and each row's minimum, which has the
# same optimal assignment. On real FF correlations 2.5-4x faster than scipy from 5632 wide,
# on every kind of matrix measured (BENCHMARKS.md); below it the auction's passes cost more
# than they save.
PRICED_FROM = 2048
# Smaller matrices: where at least this share of rows and their best column choose each other,
# lapx's Jonker-Volgenant (whose initialisation settles such pairs at once) is the faster
# exact solver; below it (flat correlations of random-init or barely trained models) its
# augmenting row reduction wanders and scipy's plain shortest augmenting paths are faster.
# Every path gives the same assignment (ties aside); measured on real matrices in BENCHMARKS.md.
JV_FROM_MUTUAL = 0.2


def mutual_best(cost: np.ndarray) -> float:
    """Share of rows i whose cheapest column j has i as its own cheapest row."""
    row_best, col_best = cost.argmin(1), cost.argmin(0)
    return float((col_best[row_best] == np.arange(cost.shape[0])).mean())


def _square_finite(m: np.ndarray) -> bool:
    # (a finite sum means finite entries, without an [n, n] mask; one that overflows sends a
    # finite matrix to scipy, which is exact too)
    return m.dtype == np.float64 and m.ndim == 2 and m.shape[0] == m.shape[1] and \
        m.shape[0] > 0 and bool(np.isfinite(m.sum())) and hasattr(lap, "lapjvh")


def solver_for(cost: np.ndarray) -> str:
    """`priced` (auction prices, then lapx's lapjvh), `lapjvh` or `scipy`: which exact solver
    `assign` gives these costs. (scipy also where another package installed a `lap` without
    lapjvh.)"""
    if not _square_finite(cost):
        return "scipy"
    if cost.shape[0] >= PRICED_FROM:
        return "priced"
    return "lapjvh" if mutual_best(cost) >= JV_FROM_MUTUAL else "scipy"


def assign(score: np.ndarray, overwrite: bool = False) -> Tuple[np.ndarray, float]:
    """Maximise total score: perm[i] = column matched to row i (rows = A, columns = B), and
    that total. `overwrite`: the caller is done with `score`, which may then serve as the
    solver's work buffer (no second [n, n] matrix) and holds anything afterwards."""
    own = not (score.dtype == np.float64 and score.flags.c_contiguous and score.flags.writeable)
    work = np.array(score, dtype=np.float64, order="C") if own else score
    if solver_for(work) == "priced":
        spent = overwrite and not own   # the caller's matrix becomes the work buffer
        cost = np.negative(work, out=work if overwrite or own else None)
        rows, cols, taken = _priced(cost)
        total = -(float(cost[rows, cols].sum()) + taken) if spent else \
            float(score[rows, cols].astype(np.float64).sum())
    else:
        # Negated in place (and back, both exact): the minimisers get the same numbers
        # without a second [n, n] matrix.
        cost = np.negative(work, out=work)
        try:
            rows, cols = (lap.lapjvh(cost, return_cost=False) if solver_for(cost) == "lapjvh"
                          else linear_sum_assignment(cost))
        finally:
            np.negative(cost, out=cost)
        total = float(work[rows, cols].sum())
    perm = np.empty(work.shape[0], dtype=np.int64)
    perm[rows] = cols
    return perm, total


def _priced(cost: np.ndarray) -> Tuple[np.ndarray, np.ndarray, float]:
    """lapjvh on cost + column prices - row minima, computed in place in `cost` [n, n] (same
    optimal assignment: every assignment's total moves by one constant). Returns rows, cols
    and that constant (original total = reduced total + it)."""
    prices = auction_prices(cost)
    np.add(cost, prices, out=cost)
    row_min = cost.min(1)
    np.subtract(cost, row_min[:, None], out=cost)
    rows, cols = lap.lapjvh(cost, return_cost=False)
    return rows, cols, float(row_min.sum() - prices.sum())


def match_plain(corr: torch.Tensor, spend: bool = False) -> Tuple[torch.Tensor, float]:
    """The permutation maximising matched correlation, and that mean. `spend`: the caller is
    done with corr, which may serve as the solver's work buffer (`assign`'s overwrite)."""
    perm, total = assign(corr.cpu().numpy(), overwrite=spend)
    return torch.from_numpy(perm), total / max(1, corr.shape[0])


def match_attention(corr: torch.Tensor, layout: HeadLayout, mode: AttentionMode,
                    qk: QKMode = "follow_vo", q_corr: Optional[torch.Tensor] = None,
                    k_corr: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
    """Flat q/k/v/o views from the correlation of the o_proj inputs [Hq*D, Hq*D].

    qk="follow_vo" (the paper): Q/K dims take V's inner permutation (none under RoPE).
    qk="separate": heads from V/O features, then one Q/K inner permutation per KV group from
    the query and key correlations (q_corr [Hq*D, Hq*D], k_corr [KV*D, KV*D]); RoPE dims stay.
    qk="joint": as separate, but the head and group assignment also scores Q/K agreement.
    """
    if mode == "identity":
        return HeadPerm.identity(layout).views(layout)
    if mode == "ignore_heads":
        return flat_views(match_plain(corr)[0], layout)
    h, d, g, kv = layout.num_heads, layout.head_dim, layout.group_size, layout.num_kv_heads
    use_qk = qk != "follow_vo"
    if use_qk and (q_corr is None or k_corr is None):
        raise ValueError(f"qk={qk} needs query and key statistics")
    blocks = _head_blocks(corr, h, d)                        # [hA, hB, d, d]
    q_blocks = _head_blocks(q_corr, h, d) if use_qk else None
    k_blocks = _head_blocks(k_corr, kv, d) if use_qk else None
    joint = qk == "joint"
    if mode == "monotonic":
        group_perm = np.arange(kv)
        query = np.tile(np.arange(g), (kv, 1))
        inner = [assign(sum(blocks[a, a] for a in range(ga * g, ga * g + g)))[0]
                 for ga in range(kv)]
        qk_inner = [_qk_assign(q_blocks, k_blocks, ga, ga, query[ga], g, layout)[0]
                    for ga in range(kv)] if use_qk else None
    else:  # head_perm (Verma & Elbayad), generalised to GQA groups
        head_score = np.array([[assign(blocks[a, b])[1] for b in range(h)] for a in range(h)])
        if joint:
            head_score += np.array([[_frozen_free_assign(q_blocks[a, b], layout)[1]
                                     for b in range(h)] for a in range(h)])
        group_score = np.zeros((kv, kv))
        choice: Dict[Tuple[int, int], Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]] = {}
        for ga in range(kv):
            for gb in range(kv):
                sa, sb = slice(ga * g, ga * g + g), slice(gb * g, gb * g + g)
                q_perm, _ = assign(head_score[sa, sb])
                # One inner permutation is shared by every query head of the group (V is shared).
                pooled = sum(blocks[ga * g + j, gb * g + q_perm[j]] for j in range(g))
                inner_perm, score = assign(pooled)
                qk_perm = None
                if use_qk:
                    qk_perm, qk_score = _qk_assign(q_blocks, k_blocks, ga, gb, q_perm, g, layout)
                    score += qk_score if joint else 0.0
                group_score[ga, gb] = score
                choice[ga, gb] = (q_perm, inner_perm, qk_perm)
        group_perm, _ = assign(group_score)
        query = np.stack([choice[ga, group_perm[ga]][0] for ga in range(kv)])
        inner = [choice[ga, group_perm[ga]][1] for ga in range(kv)]
        qk_inner = [choice[ga, group_perm[ga]][2] for ga in range(kv)] if use_qk else None
    vo_inner = torch.from_numpy(np.stack(inner))
    if use_qk:
        qk_inner = torch.from_numpy(np.stack(qk_inner))
    elif layout.qk_frozen_dims == 0:
        qk_inner = vo_inner  # the paper: Q/K take the same permutation as V
    else:
        qk_inner = torch.arange(d).repeat(kv, 1)  # RoPE: Q/K dims never move
    perm = HeadPerm(group=torch.from_numpy(group_perm), query=torch.from_numpy(query),
                    qk_inner=qk_inner, vo_inner=vo_inner)
    return perm.views(layout)


def _head_blocks(corr: torch.Tensor, heads: int, d: int) -> np.ndarray:
    # [heads*d, heads*d] -> [heads, d, heads, d] -> [hA, hB, d, d]
    return corr.cpu().numpy().reshape(heads, d, heads, d).transpose(0, 2, 1, 3)


def _frozen_free_assign(block: np.ndarray, layout: HeadLayout) -> Tuple[np.ndarray, float]:
    """Best Q/K inner permutation of one [d, d] block: rotary dims (the first qk_frozen_dims)
    stay in place and score their diagonal; the rest are assigned."""
    f, d = layout.qk_frozen_dims, layout.head_dim
    fixed = float(np.trace(block[:f, :f]))
    if f == d:
        return np.arange(d), fixed
    free, score = assign(block[f:, f:])
    return np.concatenate([np.arange(f), f + free]), fixed + score


def _qk_assign(q_blocks, k_blocks, ga: int, gb: int, q_perm, g: int, layout: HeadLayout):
    """Q/K inner permutation shared by KV head ga's key and its query heads (matched to gb's
    heads through q_perm): q.k is preserved only if Q and K dims move together."""
    pooled = k_blocks[ga, gb] + sum(q_blocks[ga * g + j, gb * g + q_perm[j]] for j in range(g))
    return _frozen_free_assign(pooled, layout)


def rotate_vo(cross: torch.Tensor, layout: HeadLayout, views: Dict[str, torch.Tensor]
              ) -> Dict[str, torch.Tensor]:
    """Orthogonal V/O maps replacing the inner V/O permutation: for every KV group, the
    Procrustes rotation of the V dims shared by its query heads, from the uncentered cross
    moments of the o_proj inputs [Hq*D, Hq*D] (A rows, B columns). The head and group
    assignment of `views` is kept. Returns dense "v" [KV*D, KV*D] and "o" [Hq*D, Hq*D]
    matrices in the h' = h @ M convention."""
    h, d, g, kv = layout.num_heads, layout.head_dim, layout.group_size, layout.num_kv_heads
    blocks = cross.double().reshape(h, d, h, d).permute(0, 2, 1, 3)  # [hA, hB, d, d]
    src_head = views["o"].reshape(h, d)[:, 0] // d                      # [h] new -> B's head
    src_group = views["v"].reshape(kv, d)[:, 0] // d                    # [kv]
    m_v = torch.zeros(kv * d, kv * d, dtype=torch.float64)
    m_o = torch.zeros(h * d, h * d, dtype=torch.float64)
    for ga in range(kv):
        heads = range(ga * g, ga * g + g)
        q = procrustes([sum(blocks[i, src_head[i]] for i in heads)])  # [dB, dA]
        gb = int(src_group[ga])
        m_v[gb * d:(gb + 1) * d, ga * d:(ga + 1) * d] = q
        for i in heads:
            src = int(src_head[i])
            m_o[src * d:(src + 1) * d, i * d:(i + 1) * d] = q
    return {"v": m_v, "o": m_o}


def procrustes(cross_moments: List[torch.Tensor], keep_ones: bool = False) -> torch.Tensor:
    """Orthogonal Q minimising sum_p ||H_B,p Q - H_A,p||^2 over points p, from their cross
    second moments H_A^T H_B [dA, dB]; each point is normalised to unit scale so late,
    large-norm layers do not drown the early ones."""
    m = sum(c.double() / c.norm().clamp_min(1e-30) for c in cross_moments)  # [dA, dB]
    return procrustes_from_moments(m, keep_ones)


def procrustes_from_moments(m: torch.Tensor, keep_ones: bool = False) -> torch.Tensor:
    """Q [dB, dA] maximising trace(m Q). `keep_ones`: Q maps the all-ones direction to itself
    (what commutes with LayerNorm's mean subtraction): Q = u u^T + B R B^T with B an
    orthonormal basis of the complement of u = 1/sqrt(d), R solved in that complement."""
    m = m.double()
    if not keep_ones:
        u, _, vh = torch.linalg.svd(m.T)                            # H_B^T H_A = U S V^T
        return u @ vh                                               # [dB, dA]: h_B @ Q ~ h_A
    d = m.shape[0]
    ones = torch.full((d, 1), d ** -0.5, dtype=torch.float64)
    basis, _ = torch.linalg.qr(torch.cat([ones, torch.eye(d, dtype=torch.float64)], 1))
    comp = basis[:, 1:d]                                            # [d, d-1], orthogonal to 1
    r = procrustes([comp.T @ m @ comp])                             # [d-1, d-1]
    return ones @ ones.T + comp @ r @ comp.T                        # [dB, dA]


def mean_matched(corr: torch.Tensor, perm: torch.Tensor) -> float:
    """Mean correlation of A's feature i with the B feature placed at i."""
    return float(corr[torch.arange(corr.shape[0]), perm.to(corr.device)].mean())
