"""Auction prices that give the exact assignment solver a nearly solved start.

On the flat correlations of barely related features (random-init or little-trained models, the
hardest matrices a user hands the solver), Jonker-Volgenant and scipy spend most of their time
finding the dual prices. A few rounds of Bertsekas' auction, vectorised over every unassigned
row at once in float32, find prices close to the optimal duals. Adding a price to each column
and subtracting each row's minimum changes every assignment's total by the same constant, so
the exact float64 solver then returns the same assignment as on the raw costs, several times
faster (BENCHMARKS.md). The auction never decides anything itself: its assignment is thrown
away, and its prices only need to be good, not optimal.
"""

import numpy as np
import torch

# epsilon-scaling: one phase per step, in units of the spread of a row's plausible columns (the
# median gap between a row's best and 8th-best cost). Chosen on the 5632-wide random-init FF
# correlations of benchmarks/assignment.py; reported on the other widths and kinds there.
PHASES = (0.4, 0.04)
CANDIDATES = 8
SETTLED = 0.99     # a phase ends once this share of rows holds a column (the tail is slow)
MAX_ROUNDS = 500   # per phase: a cap on time for adversarial costs, never reached on real ones
CHUNK = 64         # rows per [CHUNK, n] work buffer (it stays in cache for the passes)


def auction_prices(cost: np.ndarray) -> np.ndarray:
    """Column prices [n] (float64) for a square, finite cost matrix [n, n] (minimised)."""
    n = cost.shape[0]
    prices = torch.zeros(n)
    sample = torch.from_numpy(cost[:: max(1, n // 64)])   # [<=64, n]: a few whole rows
    best = sample.topk(min(CANDIDATES, n), dim=1, largest=False).values   # [<=64, k] ascending
    scale = float((best[:, -1] - best[:, 0]).median())
    if not scale > 0.0:
        return prices.double().numpy()
    costs = torch.from_numpy(cost)
    for step in PHASES:
        _auction_phase(costs, prices, step * scale)
    return prices.double().numpy()


def _auction_phase(costs: torch.Tensor, prices: torch.Tensor, eps: float) -> None:
    """One epsilon phase of the Jacobi auction from the current `prices` (updated in place):
    every unassigned row bids for its cheapest column at once; each column goes to its
    highest bid, whose previous holder is unassigned again."""
    n = costs.shape[0]
    holder = torch.full((n,), -1, dtype=torch.long)    # column -> row
    held = torch.full((n,), -1, dtype=torch.long)      # row -> column
    for _ in range(MAX_ROUNDS):
        bidders = (held < 0).nonzero().flatten()
        if len(bidders) <= (1.0 - SETTLED) * n:
            return
        target = torch.empty(len(bidders), dtype=torch.long)
        bid = torch.empty(len(bidders))
        for s in range(0, len(bidders), CHUNK):
            rows = bidders[s:s + CHUNK]
            block = costs[s:s + CHUNK] if len(bidders) == n else costs[rows]
            value = block.float().add_(prices)                # [rows, n] priced costs
            best, best_col = value.min(1)
            value.scatter_(1, best_col[:, None], float("inf"))
            second = value.amin(1)
            target[s:s + CHUNK] = best_col
            # The highest price at which the column would still be this row's best, plus eps.
            bid[s:s + CHUNK] = prices[best_col] + (second - best) + eps
        top = torch.full((n,), -float("inf")).scatter_reduce(0, target, bid, "amax")
        won = bid == top[target]
        cols, rows = target[won], bidders[won]
        order = torch.argsort(cols, stable=True)              # ties: the lowest row wins
        cols, rows = cols[order], rows[order]
        first = torch.ones(len(cols), dtype=torch.bool)
        first[1:] = cols[1:] != cols[:-1]
        cols, rows = cols[first], rows[first]
        outbid = holder[cols]
        held[outbid[outbid >= 0]] = -1
        holder[cols], held[rows] = rows, cols
        prices[cols] = top[cols]
