"""Streaming cross-correlation statistics: additive float64 sums over tokens.

Only the A x B cross block is kept (the reference code builds the full 2d x 2d covariance).
Sums from different batches, processes or machines combine with `+` (or an all-reduce of
`tensors()`), so memory does not grow with the amount of calibration text.

Per-layer spaces (FF, attention) are complete once their block has run and can be matched or
spilled right away; the residual stream is seen at every layer, so it is kept as a
`ResidualSummary` of what each residual policy needs, not point by point.
"""

from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Optional

import torch

from mergekit_permute.heap import empty_outside_heap


# Products are summed in float32 between flushes into the float64 totals: one float32 GEMM
# accumulating in place is as exact as one over this many tokens, and the float64 add (the bulk
# of the cost on small batches) happens once per flush instead of once per batch.
FLUSH_TOKENS = 8192


@dataclass
class CrossStats:
    n: torch.Tensor        # [] token count (float64, so it all-reduces like the rest)
    sum_a: torch.Tensor    # [da]
    sum_b: torch.Tensor    # [db]
    sq_a: torch.Tensor     # [da] sum of squares
    sq_b: torch.Tensor     # [db]
    sum_ab: torch.Tensor   # [da, db]
    # float32 products not yet in sum_ab, and how many tokens they hold
    _pending: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    _pending_tokens: int = field(default=0, repr=False, compare=False)

    @staticmethod
    def zeros(da: int, db: int, device="cpu") -> "CrossStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        # sum_ab starts as a zero view without memory; the first flush makes it real, so a
        # layer's batches hold only the float32 pending products.
        return CrossStats(z(()), z(da), z(db), z(da), z(db), z(()).expand(da, db))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [tokens, da], b: [tokens, db], the same tokens in the same order.

        Inputs are upcast to float32 (fp16/bf16 products cannot overflow there); per-feature
        sums of a batch are float32 reductions added to the float64 totals, the cross products
        go through the float32 pending buffer (see FLUSH_TOKENS)."""
        a, b = a.to(torch.float32), b.to(torch.float32)
        self.n += a.shape[0]
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        self.sq_a += torch.linalg.vector_norm(a, dim=0).square_()   # no [tokens, d] temporary
        self.sq_b += torch.linalg.vector_norm(b, dim=0).square_()
        if self._pending is None:
            self._pending = empty_outside_heap(self.sum_ab.shape, torch.float32,
                                               self.sum_ab.device).zero_()
        self._pending.addmm_(a.T, b)   # [da, tokens] @ [tokens, db], accumulated in place
        self._pending_tokens += a.shape[0]
        if self._pending_tokens >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> "CrossStats":
        """Fold the pending float32 products into the float64 totals (every reader does)."""
        if self.sum_ab.stride() == (0, 0):          # still the zero view of `zeros`
            total = empty_outside_heap(self.sum_ab.shape, torch.float64, self.sum_ab.device)
            self.sum_ab = total.copy_(self._pending) if self._pending is not None else total.zero_()
        elif self._pending is not None:
            self.sum_ab += self._pending
        self._pending, self._pending_tokens = None, 0
        return self

    def seal(self) -> "CrossStats":
        """The statistics are complete. Pending products are folded into float64 totals that
        already exist (past FLUSH_TOKENS tokens); float32 sums without totals stay as they are.
        Either way, nothing changes in place afterwards: `totals()` and `correlation()` only
        read, so a cache writer may read on its own thread beside the solver."""
        if self.sum_ab.stride() != (0, 0) and self._pending is not None:
            self.flush()
        return self

    def totals(self, widen: bool = True) -> Dict[str, torch.Tensor]:
        """`tensors()` without folding anything in place: float32-only sums are copied to
        float64 here (exact), or with `widen=False` given as they are (their values are the
        float64 totals' exactly; a writer widens them a slice at a time)."""
        sum_ab = self.sum_ab
        if self._pending is not None:
            if sum_ab.stride() != (0, 0):
                sum_ab = sum_ab + self._pending
            else:
                sum_ab = self._pending.double() if widen else self._pending
        return {"n": self.n, "sum_a": self.sum_a, "sum_b": self.sum_b, "sq_a": self.sq_a,
                "sq_b": self.sq_b, "sum_ab": sum_ab}

    def __add__(self, other: "CrossStats") -> "CrossStats":
        self.flush(), other.flush()
        return CrossStats(*(x + y for x, y in zip(self.tensors().values(), other.tensors().values())))

    def tensors(self) -> Dict[str, torch.Tensor]:
        self.flush()
        return {"n": self.n, "sum_a": self.sum_a, "sum_b": self.sum_b, "sq_a": self.sq_a,
                "sq_b": self.sq_b, "sum_ab": self.sum_ab}

    @staticmethod
    def from_tensors(t: Mapping[str, torch.Tensor]) -> "CrossStats":
        return CrossStats(t["n"], t["sum_a"], t["sum_b"], t["sq_a"], t["sq_b"], t["sum_ab"])

    def to(self, device) -> "CrossStats":
        if all(x.device == torch.device(device) for x in (self.n, self.sum_ab)):
            return self   # (not flushed: the float32 sums may be all a correlation reads)
        return CrossStats(*(x.to(device) for x in self.tensors().values()))

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation [da, db]; a zero-variance feature correlates 0, never NaN."""
        n = self.n.clamp_min(1.0)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        # One [da, db] buffer, updated in place (these matrices are the largest of a run).
        corr = empty_outside_heap(self.sum_ab.shape, torch.float64, self.sum_ab.device)
        if self.sum_ab.stride() == (0, 0) and self._pending is not None:
            # Only float32 sums so far: read directly (exact in float64, as a flush would be),
            # without a float64 copy of them beside the result.
            corr.copy_(self._pending).div_(n)
        else:
            torch.div(self.flush().sum_ab, n, out=corr)
        corr.addr_(mean_a, mean_b, alpha=-1)                   # covariance
        corr.div_(std_a[:, None]).div_(std_b[None, :])
        # A (near-)constant feature correlates 0 with everything, never NaN. (Each pass over
        # [da, db] only where it can change something: they are memory-bound.)
        for flat, axis in ((std_a <= eps ** 0.5, 1), (std_b <= eps ** 0.5, 0)):
            if bool(flat.any()):
                corr.masked_fill_(flat.unsqueeze(axis), 0.0)
        if not bool(torch.isfinite(corr.sum())):   # overflowed (fp16) inputs
            corr.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return corr.clamp_(-1.0, 1.0)


@dataclass
class ResidualSummary:
    """What every residual policy needs, accumulated point by point in depth order:
    first / last point (policies first, last), the pooled sums (all), and the sum of the
    points' cross second moments, each normalised to unit scale (orthogonal Procrustes, so
    late, large-norm layers do not drown the early ones)."""

    first: Optional[CrossStats] = None
    last: Optional[CrossStats] = None
    pooled: Optional[CrossStats] = None
    unit_moments: Optional[torch.Tensor] = None   # [da, db] float64
    points: int = 0

    def add(self, point: CrossStats) -> None:
        self.first = point if self.first is None else self.first
        self.last = point
        # Sums kept in place: a new total per layer would be a long-lived buffer allocated
        # above that layer's transients, and the heap would ratchet up with depth.
        if self.pooled is None:
            self.pooled = CrossStats.from_tensors({k: v.clone() for k, v in point.tensors().items()})
        else:
            for total, part in zip(self.pooled.tensors().values(), point.tensors().values()):
                total.add_(part)
        unit = point.sum_ab / point.sum_ab.norm().clamp_min(1e-30)
        if self.unit_moments is None:
            self.unit_moments = unit
        else:
            self.unit_moments.add_(unit)
        self.points += 1

    def tensors(self) -> Dict[str, torch.Tensor]:
        out = {"points": torch.tensor(float(self.points), dtype=torch.float64)}
        if self.points:
            for name in ("first", "last", "pooled"):
                out.update({f"{name}.{k}": v for k, v in getattr(self, name).tensors().items()})
            out["unit_moments"] = self.unit_moments
        return out

    @staticmethod
    def from_tensors(t: Mapping[str, torch.Tensor]) -> "ResidualSummary":
        s = ResidualSummary(points=int(t["points"]))
        if s.points:
            for name in ("first", "last", "pooled"):
                setattr(s, name, CrossStats.from_tensors(
                    {k.split(".", 1)[1]: v for k, v in t.items() if k.startswith(name + ".")}))
            s.unit_moments = t["unit_moments"]
        return s


class Statistics(Mapping[str, CrossStats]):
    """Calibration statistics of one model pair: `space@point` -> CrossStats for per-layer
    spaces (FF, attention, query/key), and the residual stream's summary. Layer statistics
    may live on disk (a stats-cache entry) and are then read one layer file at a time."""

    def __init__(self, layers: Optional[Dict[str, CrossStats]] = None,
                 residual: Optional[ResidualSummary] = None, tokens: int = 0, loader=None):
        self._layers = dict(layers or {})
        self.residual = residual or ResidualSummary()
        self.tokens = tokens
        self._loader = loader          # key -> CrossStats, for statistics kept on disk
        self._keys = None

    def __getitem__(self, key: str) -> CrossStats:
        if key in self._layers:
            return self._layers[key]
        if self._loader is not None:
            return self._loader(key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        if self._loader is not None and hasattr(self._loader, "keys"):
            return iter(self._loader.keys())
        return iter(self._layers)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, key) -> bool:
        if key in self._layers:
            return True
        return self._loader is not None and key in set(self)
