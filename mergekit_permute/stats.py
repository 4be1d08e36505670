"""Streaming cross-correlation statistics: additive float64 sums over tokens.

Only the A x B cross block is kept (the reference code builds the full 2d x 2d covariance).
Sums from different batches, processes or machines combine with `+` (or an all-reduce of
`tensors()`), so memory does not grow with the amount of calibration text.
"""

from dataclasses import dataclass
from typing import Dict

import torch


@dataclass
class CrossStats:
    n: torch.Tensor        # [] token count (float64, so it all-reduces like the rest)
    sum_a: torch.Tensor    # [da]
    sum_b: torch.Tensor    # [db]
    sq_a: torch.Tensor     # [da] sum of squares
    sq_b: torch.Tensor     # [db]
    sum_ab: torch.Tensor   # [da, db]

    @staticmethod
    def zeros(da: int, db: int, device="cpu") -> "CrossStats":
        z = lambda *s: torch.zeros(*s, dtype=torch.float64, device=device)  # noqa: E731
        return CrossStats(z(()), z(da), z(db), z(da), z(db), z(da, db))

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """a: [tokens, da], b: [tokens, db], the same tokens in the same order.

        One batch's products are formed in float32 (fp16/bf16 inputs are upcast first, so they
        cannot overflow) and added to the float64 running sums: the float64 matmul was the bulk
        of the calibration overhead, and a batch's float32 partial sums are exact to ~1e-7."""
        a, b = a.to(torch.float32), b.to(torch.float32)
        self.n += a.shape[0]
        self.sum_a += a.sum(0, dtype=torch.float64)
        self.sum_b += b.sum(0, dtype=torch.float64)
        self.sq_a += (a * a).sum(0, dtype=torch.float64)
        self.sq_b += (b * b).sum(0, dtype=torch.float64)
        self.sum_ab += (a.T @ b).to(torch.float64)

    def __add__(self, other: "CrossStats") -> "CrossStats":
        return CrossStats(*(x + y for x, y in zip(self.tensors().values(), other.tensors().values())))

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"n": self.n, "sum_a": self.sum_a, "sum_b": self.sum_b, "sq_a": self.sq_a,
                "sq_b": self.sq_b, "sum_ab": self.sum_ab}

    @staticmethod
    def from_tensors(t: Dict[str, torch.Tensor]) -> "CrossStats":
        return CrossStats(t["n"], t["sum_a"], t["sum_b"], t["sq_a"], t["sq_b"], t["sum_ab"])

    def to(self, device) -> "CrossStats":
        return CrossStats(*(x.to(device) for x in self.tensors().values()))

    def correlation(self, eps: float = 1e-12) -> torch.Tensor:
        """Pearson correlation [da, db]; a zero-variance feature correlates 0, never NaN."""
        n = self.n.clamp_min(1.0)
        mean_a, mean_b = self.sum_a / n, self.sum_b / n
        cov = self.sum_ab / n - mean_a[:, None] * mean_b[None, :]
        std_a = (self.sq_a / n - mean_a**2).clamp_min(0).sqrt()
        std_b = (self.sq_b / n - mean_b**2).clamp_min(0).sqrt()
        denom = std_a[:, None] * std_b[None, :]
        corr = torch.where(denom > eps, cov / denom.clamp_min(eps), torch.zeros_like(cov))
        return corr.clamp(-1.0, 1.0)
