"""Streaming cross statistics of A's and B's features: additive float64 sums over tokens, the
A x B block only (the reference code builds the full 2d x 2d covariance).

The sums are shifted (each feature minus the first batch's mean), so features whose mean is
large against their spread keep their covariances instead of losing them to cancellation;
sums with different shifts re-centre exactly (batches, processes, all-reduce). The residual
stream, seen at every layer, is kept as a ResidualSummary of what each policy needs.
"""

from dataclasses import dataclass, field
from typing import Dict, Iterator, Mapping, Optional

import torch



# Products are summed in float32 between flushes into the float64 totals: one float32 GEMM
# accumulating in place is as exact as one over this many tokens, and the float64 add (the bulk
# of the cost on small batches) happens once per flush instead of once per batch. (The values
# multiplied are shifted ones, of the size of the features' spread, so float32 products lose
# nothing that matters to a correlation.)
FLUSH_TOKENS = 8192
SUMS = ("n", "sum_a", "sum_b", "sq_a", "sq_b", "sum_ab")


@dataclass
class CrossStats:
    """Sums over tokens of the shifted features x - shift (per feature; see the module)."""

    n: torch.Tensor        # [] token count (float64, so it all-reduces like the rest)
    sum_a: torch.Tensor    # [da] sum of (a - shift_a)
    sum_b: torch.Tensor    # [db] sum of (b - shift_b)
    sq_a: torch.Tensor     # [da] sum of (a - shift_a)^2
    sq_b: torch.Tensor     # [db]
    sum_ab: torch.Tensor   # [da, db] sum of (a - shift_a)(b - shift_b)^T
    shift_a: Optional[torch.Tensor] = None   # [da] float64 (float32 values); zeros: no tokens yet
    shift_b: Optional[torch.Tensor] = None   # [db]
    # float32 products not yet in sum_ab, and how many tokens they hold
    _pending: Optional[torch.Tensor] = field(default=None, repr=False, compare=False)
    _pending_tokens: int = field(default=0, repr=False, compare=False)
    # the shifts are fixed (set by the first batch with tokens; from sums: n > 0)
    _fixed: Optional[bool] = field(default=None, repr=False, compare=False)
    # sum_ab became a correlation (correlation(consume=True)): nothing may read them again
    _spent: bool = field(default=False, repr=False, compare=False)
    # the dtype of the cross products of a batch (bfloat16: rounded before the float32 sum)
    _products: torch.dtype = field(default=torch.float32, repr=False, compare=False)

    def __post_init__(self):
        for name, like in (("shift_a", self.sum_a), ("shift_b", self.sum_b)):
            shift = getattr(self, name)
            if shift is None:
                setattr(self, name, torch.zeros_like(like, dtype=torch.float64))
            elif shift.shape != like.shape:
                raise ValueError(f"{name} has shape {tuple(shift.shape)}, the sums "
                                 f"{tuple(like.shape)}")
        if self._fixed is None:
            self._fixed = bool(self.n > 0)

    @staticmethod
    def zeros(da: int, db: int, device="cpu", products: torch.dtype = torch.float32
              ) -> "CrossStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        # sum_ab starts as a zero view without memory; the first flush makes it real, so a
        # layer's batches hold only the float32 pending products.
        return CrossStats(z(()), z(da), z(db), z(da), z(db), z(()).expand(da, db), z(da), z(db),
                          _fixed=False, _products=products)

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [tokens, da], b: [tokens, db], the same tokens in the same order.

        The first batch with tokens fixes the shifts (its means, rounded to float32: a float32
        feature near its shift minus the shift is exact). Shifted values are float32 (fp16/bf16
        products cannot overflow there); per-feature sums of a batch are float32 reductions
        (squares: float64) added to the float64 totals, the cross products go through the
        float32 pending buffer (see FLUSH_TOKENS), multiplied in float32 or, if the statistics
        were made with `products=torch.bfloat16`, in bfloat16 (the setting stats_products)."""
        tokens = a.shape[0]
        if tokens == 0:
            return
        if not self._fixed:
            self.shift_a, self.shift_b = _shift_of(a), _shift_of(b)
            self._fixed = True
        a, b = _shifted(a, self.shift_a), _shifted(b, self.shift_b)
        self.n += tokens
        self.sum_a += a.sum(0)
        self.sum_b += b.sum(0)
        # No [tokens, d] temporary; accumulated in float64 (a float32 norm over a batch's
        # tokens is ~1e-5 off, which a correlation of near-constant features shows).
        self.sq_a += torch.linalg.vector_norm(a, dim=0, dtype=torch.float64).square_()
        self.sq_b += torch.linalg.vector_norm(b, dim=0, dtype=torch.float64).square_()
        if self._pending is None:
            self._pending = torch.zeros(self.sum_ab.shape, dtype=torch.float32,
                                        device=self.sum_ab.device)
        if self._products == torch.float32:
            self._pending.addmm_(a.T, b)   # [da, tokens] @ [tokens, db], accumulated in place
        else:
            # The batch's products in bfloat16 ([da, db], rounded to 8 bits: a relative error
            # of 2^-9 per batch, against a correlation's sampling error of 1/sqrt(tokens)),
            # summed in float32 like the rest.
            self._pending += a.T.to(self._products) @ b.to(self._products)
        self._pending_tokens += tokens
        if self._pending_tokens >= FLUSH_TOKENS:
            self.flush()

    def flush(self) -> "CrossStats":
        """Fold the pending float32 products into the float64 totals (every reader does)."""
        if self._spent:
            raise RuntimeError("these statistics were spent by an in-place correlation")
        if self.sum_ab.stride() == (0, 0):          # still the zero view of `zeros`
            total = torch.empty(self.sum_ab.shape, dtype=torch.float64, device=self.sum_ab.device)
            self.sum_ab = total.copy_(self._pending) if self._pending is not None else total.zero_()
        elif self._pending is not None:
            self.sum_ab += self._pending
        self._pending, self._pending_tokens = None, 0
        return self

    def seal(self) -> "CrossStats":
        """The statistics are complete: pending products folded into the float64 totals.
        Nothing changes in place afterwards: `totals()` and `correlation()` only read, so a
        cache writer may read on its own thread beside the solver."""
        return self.flush()

    def totals(self) -> Dict[str, torch.Tensor]:
        """`tensors()` without folding anything in place (pending products added to a copy)."""
        if self._spent:
            raise RuntimeError("these statistics were spent by an in-place correlation")
        sum_ab = self.sum_ab
        if self._pending is not None:
            sum_ab = sum_ab + self._pending if sum_ab.stride() != (0, 0) \
                else self._pending.double()
        return {"n": self.n, "sum_a": self.sum_a, "sum_b": self.sum_b, "sq_a": self.sq_a,
                "sq_b": self.sq_b, "sum_ab": sum_ab, "shift_a": self.shift_a,
                "shift_b": self.shift_b}

    def tensors(self) -> Dict[str, torch.Tensor]:
        """The sums and their shifts (what a cache file or an all-reduce holds), float64."""
        self.flush()
        return {"n": self.n, "sum_a": self.sum_a, "sum_b": self.sum_b, "sq_a": self.sq_a,
                "sq_b": self.sq_b, "sum_ab": self.sum_ab, "shift_a": self.shift_a,
                "shift_b": self.shift_b}

    @staticmethod
    def from_tensors(t: Mapping[str, torch.Tensor]) -> "CrossStats":
        return CrossStats(*(t[k] for k in SUMS), t["shift_a"], t["shift_b"])

    def to(self, device) -> "CrossStats":
        if all(x.device == torch.device(device) for x in (self.n, self.sum_ab)):
            return self
        return CrossStats(*(x.to(device) for x in self.tensors().values()), _fixed=self._fixed)

    # ---- combining ----
    def recenter_(self, shift_a: torch.Tensor, shift_b: torch.Tensor) -> "CrossStats":
        """The same sums about other shifts, in place (exact algebra: with d = old - new,
        sum (x - new) = sum (x - old) + n d, and the squares and products alike). Sums of no
        tokens stay zeros, whatever the shifts."""
        self.flush()
        shift_a = shift_a.to(self.shift_a.device, torch.float64)
        shift_b = shift_b.to(self.shift_b.device, torch.float64)
        da, db = self.shift_a - shift_a, self.shift_b - shift_b
        if bool(da.any()) or bool(db.any()):
            # sum_ab += d_a S_b^T + S_a d_b^T + n d_a d_b^T = d_a (S_b + n d_b)^T + S_a d_b^T
            # (every sum updated in place: their tensors may be held, e.g. for an all-reduce)
            sum_b_new = self.sum_b + self.n * db
            self.sum_ab.addr_(da, sum_b_new).addr_(self.sum_a, db)
            self.sq_a.add_((2 * self.sum_a + self.n * da) * da)
            self.sq_b.add_((2 * self.sum_b + self.n * db) * db)
            self.sum_a.add_(self.n * da)
            self.sum_b.copy_(sum_b_new)
        self.shift_a, self.shift_b = shift_a.clone(), shift_b.clone()
        self._fixed = bool(self.n > 0)
        return self

    def add_(self, other: "CrossStats") -> "CrossStats":
        """Add `other`'s tokens in place, about this one's shifts (or `other`'s, while this one
        holds no tokens): `other`'s sums re-centred as they are added (`recenter_`'s algebra,
        without a copy of them). `other` is only read."""
        self.flush()
        if not other._fixed:
            return self    # no tokens
        if not self._fixed:
            self.recenter_(other.shift_a, other.shift_b)
        t = other.totals()
        da = other.shift_a.to(self.shift_a.device) - self.shift_a
        db = other.shift_b.to(self.shift_b.device) - self.shift_b
        self.sum_ab.add_(t["sum_ab"])
        if bool(da.any()) or bool(db.any()):
            sum_b = t["sum_b"] + t["n"] * db      # other's sum_b about this one's shift
            self.sum_ab.addr_(da, sum_b).addr_(t["sum_a"], db)
            self.sq_a.add_(t["sq_a"] + (2 * t["sum_a"] + t["n"] * da) * da)
            self.sq_b.add_(t["sq_b"] + (2 * t["sum_b"] + t["n"] * db) * db)
            self.sum_a.add_(t["sum_a"] + t["n"] * da)
            self.sum_b.add_(sum_b)
        else:
            for name in ("sum_a", "sum_b", "sq_a", "sq_b"):
                getattr(self, name).add_(t[name])
        self.n.add_(t["n"])
        self._fixed = True
        return self

    def __add__(self, other: "CrossStats") -> "CrossStats":
        base, part = (self, other) if self._fixed or not other._fixed else (other, self)
        out = CrossStats.from_tensors({k: v.clone() for k, v in base.totals().items()})
        return out.add_(part)

    # ---- reading ----
    def raw_sum_ab(self) -> torch.Tensor:
        """The uncentred cross moment sum a b^T [da, db] (H_A^T H_B), float64, a new matrix:
        S_ab + s_a (S_b + n s_b)^T + S_a s_b^T, the sums S about the shifts s."""
        total = self.totals()["sum_ab"]
        out = total.clone() if total is self.sum_ab else total   # (else already a new one)
        return out.addr_(self.shift_a, self.sum_b + self.n * self.shift_b).addr_(self.sum_a,
                                                                                 self.shift_b)

    def raw_sq_a(self) -> torch.Tensor:
        """The uncentred sum of squares of A's features, sum a^2 [da]."""
        return self.sq_a + (2 * self.sum_a + self.n * self.shift_a) * self.shift_a

    def raw_sq_b(self) -> torch.Tensor:
        return self.sq_b + (2 * self.sum_b + self.n * self.shift_b) * self.shift_b

    def correlation(self, eps: float = 1e-12, consume: bool = False) -> torch.Tensor:
        """Pearson correlation [da, db]; a zero-variance feature correlates 0, never NaN.
        (From the shifted sums: the means they give are small against the spread.) With
        `consume`, computed in the cross-product sums' own buffer (no second [da, db] matrix),
        and these statistics are spent."""
        n = self.n.clamp_min(1.0)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        # One [da, db] buffer, updated in place (these matrices are the largest of a run).
        total = self.flush().sum_ab
        if consume and total.stride() != (0, 0):
            corr, self.sum_ab, self._spent = total, None, True
            corr.div_(n)
        else:
            corr = torch.empty(total.shape, dtype=torch.float64, device=total.device)
            torch.div(total, n, out=corr)
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


def _shift_of(x: torch.Tensor) -> torch.Tensor:
    """A batch's per-feature means as float64 holding float32 values (finite: an overflowed
    feature gets 0)."""
    mean = x.sum(0, dtype=torch.float64) / x.shape[0]
    return mean.to(torch.float32).to(torch.float64).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)


def _shifted(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """x - shift as float32, the subtraction in float32 (float64 for float64 inputs): exact
    for float32 values within a factor 2 of their shift."""
    wide = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(wide) - shift.to(wide)).to(torch.float32)


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
        # (Points are re-centred onto the first point's shifts as they are added.)
        point.flush()
        if self.pooled is None:
            self.pooled = CrossStats.from_tensors({k: v.clone() for k, v in point.tensors().items()})
        else:
            self.pooled.add_(point)
        unit = point.raw_sum_ab()   # the uncentred moment H_A^T H_B
        unit /= unit.norm().clamp_min(1e-30)
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

    def update(self, layer_stats: Mapping[str, CrossStats]) -> None:
        """Hold these (completed) layer statistics in memory."""
        self._layers.update(layer_stats)

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
