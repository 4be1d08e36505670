"""align_from(): the one dispatch every caller uses (the CLI, a MergeKit `permute` run, barrier
sweeps, N-model merges): a Workload and settings -> an Alignment of B into A's basis.

Activation matching calibrates both models block by block and solves each layer's spaces as
soon as its statistics are complete (or solves from statistics a sweep shares); weight matching
and learned alignment read both models whole.
"""

import logging
import time
from typing import Dict, Optional

import torch

from mergekit_permute.align.learn import learn_alignment
from mergekit_permute.align.solve import Solver, assemble, compute_alignment
from mergekit_permute.align.weight_match import weight_match_alignment
from mergekit_permute.calibration.collect import Workload, prepare_calibration, statistics
from mergekit_permute.calibration.heap import flat_heap
from mergekit_permute.core.alignment import Alignment
from mergekit_permute.io.models import load_model, open_pair
from mergekit_permute.io.untie import untied_record
from mergekit_permute.settings import AlignSettings, check_settings, residual_policy

LOG = logging.getLogger(__name__)


def align_from(work: Workload, settings: AlignSettings) -> Alignment:
    """B's transforms into A's basis, by the settings' matching."""
    started = time.perf_counter()
    flat_heap()
    spec = work.pair.spec
    check_settings(spec, settings)
    if not settings.function_preserving:
        LOG.warning("attention=ignore_heads is NOT function-preserving (paper ablation only)")
    info: Dict = {"model_a": work.pair.path_a, "model_b": work.pair.path_b,
                  "matching": settings.matching}
    untied = {k: r for k, r in (("a", untied_record(work.pair.path_a)),
                                ("b", untied_record(work.pair.path_b))) if r}
    if untied:
        info["untied"] = untied
    if settings.aligns_nothing:
        alignment = Alignment.identity(spec, settings)
    elif settings.matching == "weights":
        alignment = weight_match_alignment(spec, *work.states(), settings)
        info["data"] = None
    elif settings.matching == "learned":
        alignment = align_from(work, settings.model_copy(update={"matching": "activations"}))
        info["data"] = alignment.info.get("data")
        if work.dist.is_main:
            alignment = learn_alignment(work, alignment, settings)
        alignment.settings = settings
    else:
        alignment, info["data"] = _from_activations(work, settings)
    alignment.info = {**info, **alignment.info, "matching": settings.matching}
    alignment.timings["total_seconds"] = round(time.perf_counter() - started, 2)
    return alignment


def _from_activations(work: Workload, settings: AlignSettings):
    """(alignment, calibration info): from shared statistics, or calibrating now with every
    layer's spaces solved as soon as its statistics are complete."""
    spec = work.pair.spec
    folds = residual_policy(settings, spec) == "orthogonal"
    if work.shared is not None:
        gains = work.gains() if folds else ({}, {})
        return compute_alignment(spec, work.shared, settings, gains, work.workers), None
    calib = prepare_calibration(work.pair, work.data, settings)
    solver = Solver(spec, settings, work.workers if work.dist.is_main else 1,
                    overlap=torch.device(work.device).type != "cpu")
    try:
        stats = statistics(work, calib, settings, qk=settings.needs_qk_features, keep=False,
                           on_layer=lambda _, s, own: work.dist.is_main and
                           solver.submit_layer(s, consume=own))
    except BaseException:
        solver.close()
        raise
    gains = work.gains() if folds else ({}, {})
    return (assemble(spec, settings, solver.results(), stats.residual, gains),
            calib.info(stats.tokens))


def align(model_a: str, model_b: str, data: Optional[str], settings: AlignSettings, *,
          pair=None, allow_unsafe_pickle: bool = False, **workload) -> Alignment:
    """align_from() for two checkpoints (`workload`: the other Workload fields)."""
    pair = pair or open_pair(model_a, model_b, allow_unsafe_pickle)
    return align_from(Workload(pair, data, **workload), settings)


def align_pair(model_a: str, model_b: str, data: Optional[str], settings: AlignSettings, *,
               device: str = "cpu", cache="use", workers: Optional[int] = 1):
    """align(), then both models loaded whole: (alignment, model A, model B, tokenizer). For
    small models and tests; the CLI streams instead."""
    pair = open_pair(model_a, model_b)
    alignment = align(model_a, model_b, data, settings, pair=pair, device=device,
                      workers=workers, cache=cache)
    return alignment, load_model(model_a, device), load_model(model_b, device), pair.tokenizer
