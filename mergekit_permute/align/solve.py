"""Statistics -> transforms, one space at a time, on every core.

`solve_space` is a pure function of one space's statistics (their correlations, then the
matching); the assignment solvers release the GIL, so spaces are solved on threads: while
later layers are calibrated when the forwards run on an accelerator, in batches while they
wait on the CPU. The residual stream is solved last from its summary.
"""

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Dict, Mapping, Optional, Tuple

import torch

from mergekit_permute.core.alignment import Alignment
from mergekit_permute.core.match import (
    match_attention, match_plain, mean_matched, procrustes_from_moments, rotate_vo,
)
from mergekit_permute.core.permute import plain_views
from mergekit_permute.settings import AlignSettings, residual_policy
from mergekit_permute.spec.base import PermutationSpec, Space
from mergekit_permute.calibration.stats import CrossStats, ResidualSummary

LOG = logging.getLogger(__name__)
Solved = Tuple[Dict[str, torch.Tensor], Dict, float]   # views, report row, seconds


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover (not Linux)
        return max(1, os.cpu_count() or 1)


def qk_matched(q_corr: torch.Tensor, k_corr: torch.Tensor, views: Dict[str, torch.Tensor]) -> float:
    """Mean correlation of matched query and key dims (what qk=separate/joint maximise)."""
    total = (mean_matched(q_corr, views["q"]) * len(views["q"])
             + mean_matched(k_corr, views["k"]) * len(views["k"]))
    return total / (len(views["q"]) + len(views["k"]))


def correlations(space: Space, stats: Mapping[str, CrossStats], settings: AlignSettings,
                 consume: bool = False) -> Dict[str, torch.Tensor]:
    """What matching reads of a space's statistics (`stats` holds its `@0` point, and `@q`,
    `@k` for qk matching): the correlations, and the raw cross moments where the V/O rotation
    needs them. A space waiting for its batch holds these instead of its statistics. With
    `consume` (nothing else reads the statistics), each correlation takes its sums' buffer."""
    held = {}
    if space.kind == "attention":
        if settings.vo == "orthogonal":
            held["moments"] = stats["0"].raw_sum_ab()
        if settings.needs_qk_features:
            if "q" not in stats or "k" not in stats:
                raise ValueError(f"calibration statistics lack {space.name}@q/k, which "
                                 f"qk={settings.qk} needs; they were collected without them")
            held["q"] = stats["q"].correlation(consume=consume)
            held["k"] = stats["k"].correlation(consume=consume)
    held["0"] = stats["0"].correlation(consume=consume)
    return held


def solve_space(space: Space, stats: Mapping[str, CrossStats], settings: AlignSettings,
                consume: bool = False) -> Solved:
    """One FF or attention space from its statistics. Returns its views (None if it stays in
    place), its report row, the seconds."""
    start = time.perf_counter()
    return match_space(space, correlations(space, stats, settings, consume), settings, start)


def match_space(space: Space, held: Mapping[str, torch.Tensor], settings: AlignSettings,
                start: float) -> Solved:
    """One space from `correlations(...)`; the seconds count from `start`."""
    corr = held["0"]
    identity = torch.arange(space.size)
    report: Dict = {"kind": space.kind, "size": space.size}
    report["mean_corr_before"] = round(mean_matched(corr, identity), 6)
    if space.kind == "ffn":
        perm, matched = match_plain(corr, spend=True)   # corr is spent here
        views = plain_views(space, perm)
    else:
        qk = settings.qk if settings.needs_qk_features else "follow_vo"
        q_corr, k_corr = held.get("q"), held.get("k")
        views = match_attention(corr, space.heads, settings.attention, qk, q_corr, k_corr)
        perm = views["o"]
        if settings.vo == "orthogonal":
            views.update(rotate_vo(held["moments"], space.heads, views))
        if q_corr is not None:
            ident = {v: torch.arange(n) for v, n in space.views.items()}
            report["qk_corr_before"] = round(qk_matched(q_corr, k_corr, ident), 6)
            report["qk_corr_after"] = round(qk_matched(q_corr, k_corr, views), 6)
        matched = mean_matched(corr, perm)
    report["mean_corr_after"] = round(matched, 6)
    return views, report, time.perf_counter() - start


def _space_stats(stats: Mapping[str, CrossStats], space: str) -> Dict[str, CrossStats]:
    return {key.split("@", 1)[1]: stats[key] for key in (f"{space}@0", f"{space}@q", f"{space}@k")
            if key in stats}



class Solver:
    """Solves spaces as they are handed in, on `workers` threads (the assignment solvers and
    torch release the GIL; a process pool measured slower and larger at real widths, since
    every worker receives a copy of its statistics: BENCHMARKS.md):
    - `overlap` (the forwards run on an accelerator and leave the CPU idle): in the
      background, while later layers are calibrated;
    - else (CPU forwards that use every core; a concurrent solver only oversubscribes them,
      measured slower): a layer's spaces at once while the forwards wait (`submit_layer`), or
      batches of `workers` spaces of one kind (`submit`).
    Results are identical either way (the assignment is deterministic)."""

    def __init__(self, spec: PermutationSpec, settings: AlignSettings,
                 workers: Optional[int] = None, overlap: bool = False):
        self.spec, self.settings, self.overlap = spec, settings, overlap
        self.workers = default_workers() if workers is None else max(1, workers)
        self._thread: Optional[ThreadPoolExecutor] = None
        self._jobs: Dict[str, Future] = {}
        self._done: Dict[str, Solved] = {}
        # spaces waiting for their batch: (space, correlations, seconds spent on them)
        self._batch: Dict[str, Tuple[Space, Dict[str, torch.Tensor], float]] = {}

    def _threads(self) -> ThreadPoolExecutor:
        if self._thread is None:
            self._thread = ThreadPoolExecutor(self.workers,
                                              thread_name_prefix="mergekit-permute-solve")
        return self._thread

    def submit(self, space_name: str, stats: Mapping[str, CrossStats],
               consume: bool = False) -> None:
        """`consume`: the statistics are the solver's (no cache writer or caller reads them
        afterwards), so each correlation is computed in its sums' buffer."""
        space = self.spec.space(space_name)
        if not self.settings.moves(space) or space.kind == "residual":
            return
        own = _space_stats(stats, space_name)
        if not self.overlap:
            # Batches of one kind (FF, attention): alike in cost, so the threads finish together.
            # A waiting space holds its correlations, not its statistics: a batch then needs
            # one [n, n] matrix per space, as solving one space at a time does.
            start = time.perf_counter()
            held = correlations(space, own, self.settings, consume)
            self._batch[space_name] = (space, held, time.perf_counter() - start)
            if sum(s.kind == space.kind for s, _, _ in self._batch.values()) >= self.workers:
                self._solve_batch(space.kind)
            return
        # Backpressure: a queued job holds its space's statistics; never let them pile up.
        waiting = [n for n, job in self._jobs.items() if not job.done()]
        if len(waiting) >= 2 * self.workers:
            self._done[waiting[0]] = self._jobs.pop(waiting[0]).result()
        self._jobs[space_name] = self._threads().submit(solve_space, space, own, self.settings,
                                                        consume)

    def submit_layer(self, stats: Mapping[str, CrossStats], consume: bool = False) -> None:
        for name in sorted({k.split("@", 1)[0] for k in stats}):
            self.submit(name, stats, consume)
        if self._batch:
            # (CPU) the layer's spaces are solved before the next layer runs, together: one
            # FF correlation resident at a time. Waiting for a second layer's FF space to
            # solve two at once halved the solving time but held a correlation through a
            # layer's calibration, the largest item of the peak (BENCHMARKS.md).
            self._solve_batch()

    def _solve_batch(self, kind: Optional[str] = None) -> None:
        names = [n for n, job in self._batch.items() if kind in (None, job[0].kind)]
        batch = [(name, *self._batch.pop(name)) for name in names]
        if len(batch) == 1:
            name, space, held, spent = batch.pop()
            self._done[name] = match_space(space, held, self.settings, time.perf_counter() - spent)
            return
        jobs = {name: self._threads().submit(match_space, space, held, self.settings,
                                          time.perf_counter() - spent)
                for name, space, held, spent in batch}
        del batch   # each job holds its own correlations, dropped as it finishes
        for name, job in jobs.items():
            self._done[name] = job.result()

    def results(self) -> Dict[str, Solved]:
        try:
            if self._batch:
                self._solve_batch()
            for name, job in list(self._jobs.items()):
                self._done[name] = job.result()
            self._jobs.clear()
        finally:
            self.close()
        return self._done

    def close(self) -> None:
        """Stop the workers; queued jobs are dropped (a failed run)."""
        if self._thread is not None:
            self._thread.shutdown(cancel_futures=True)
        self._thread = None
        self._batch.clear()


def solve_residual(spec: PermutationSpec, summary: ResidualSummary, policy: str
                   ) -> Tuple[Optional[torch.Tensor], Dict]:
    """The residual transform (a permutation, or an orthogonal Q [dB, dA]) from its summary."""
    space = spec.space("residual")
    start = time.perf_counter()
    if policy == "orthogonal":
        q = procrustes_from_moments(summary.unit_moments, keep_ones=spec.residual_centered)
        pooled = summary.pooled
        norm = float((pooled.raw_sq_a().sum() * pooled.raw_sq_b().sum()).sqrt())
        moments = pooled.raw_sum_ab()   # uncentred, H_A^T H_B
        report = {"kind": "residual", "size": space.size,
                  "measure": "uncentered cosine of H_A and H_B Q",
                  "mean_corr_before": round(float(torch.trace(moments)) / norm, 6),
                  "mean_corr_after": round(float(torch.trace(moments @ q)) / norm, 6)}
    else:
        chosen = {"first": summary.first, "last": summary.last, "all": summary.pooled}[policy]
        corr = chosen.correlation()
        before = mean_matched(corr, torch.arange(space.size))
        q, matched = match_plain(corr, spend=True)
        report = {"kind": "residual", "size": space.size,
                  "mean_corr_before": round(before, 6), "mean_corr_after": round(matched, 6)}
    report["seconds"] = time.perf_counter() - start
    return q, report


def assemble(spec: PermutationSpec, settings: AlignSettings, solved: Mapping[str, Solved],
             residual: Optional[ResidualSummary], gains: Tuple[Dict, Dict] = ({}, {})
             ) -> Alignment:
    """An Alignment from solved spaces and the residual summary. `gains` (A's and B's norm
    gains) are needed only for the orthogonal residual, which folds them."""
    alignment = Alignment.identity(spec, settings)
    seconds: Dict[str, float] = {}
    for name, (views, report, spent) in sorted(solved.items()):
        alignment.transforms[name].update(views)
        alignment.report[name] = report
        seconds[name] = round(spent, 3)
    policy = residual_policy(settings, spec)
    space = spec.space("residual")
    if settings.moves(space) and residual is not None and residual.points:
        q, report = solve_residual(spec, residual, policy)
        seconds["residual"] = round(report.pop("seconds"), 3)
        alignment.transforms["residual"] = {"": q}
        alignment.report["residual"] = report
        if policy == "orthogonal":
            if not gains[0] or not gains[1]:
                raise ValueError("residual=orthogonal needs both models' norm gains to fold them")
            alignment.gains_a, alignment.gains_b = dict(gains[0]), dict(gains[1])
    alignment.info["residual_policy"] = policy if settings.moves(space) else "identity"
    alignment.timings["solve_seconds"] = seconds
    return alignment


def compute_alignment(spec: PermutationSpec, stats, settings: AlignSettings,
                      gains: Tuple[Dict, Dict] = ({}, {}), workers: Optional[int] = 1
                      ) -> Alignment:
    """Transforms from complete statistics (a Statistics or a mapping with the residual
    summary under `.residual`)."""
    solver = Solver(spec, settings, workers)
    for space in spec.spaces:
        if space.kind != "residual" and settings.moves(space):
            solver.submit(space.name, stats)
    return assemble(spec, settings, solver.results(), getattr(stats, "residual", None), gains)
