"""N >= 3 models: each aligned to the base (`reference=base`) or, in turn, to the running
average of the base and the models aligned before it (`reference=average`: the alignment error
spreads instead of routing every model through the base). The blend is read block by block,
never built whole; every alignment maps into the base's basis and norm gauge.
"""

import logging
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_permute.align.pipeline import align
from mergekit_permute.core.alignment import Alignment
from mergekit_permute.io.checkpoints import AlignedSource, BlendSource
from mergekit_permute.io.models import load_state, open_pair
from mergekit_permute.settings import AlignSettings

LOG = logging.getLogger(__name__)


def align_all(models: Sequence[str], weights: Sequence[float], data: Optional[str],
              settings: AlignSettings, allow_unsafe_pickle: bool = False,
              **workload) -> List[Alignment]:
    """Alignments of models[1:] into models[0]'s basis (to it, or to the running average);
    `workload`: the Workload fields (device, cache, workers, ...)."""
    base = models[0]
    pairs = [open_pair(base, other, allow_unsafe_pickle) for other in models[1:]]
    if settings.reference == "base" or len(models) < 3 or settings.aligns_nothing:
        return [align(base, other, data, settings, pair=pair, **workload)
                for other, pair in zip(models[1:], pairs)]
    alignments: List[Alignment] = []
    for k, (other, pair) in enumerate(zip(models[1:], pairs), start=1):
        members = [pairs[0].source("a")] + [AlignedSource(pairs[j].source("b"), alignments[j])
                                            for j in range(k - 1)]
        blend = list(weights[:k])
        if sum(blend) == 0:   # (weight 0 for all so far, e.g. the base alone: count them equally)
            blend = [1.0] * k
        target = BlendSource(list(zip(blend, members)))
        alignment = align(base, other, data, settings, pair=pair,
                          sources=(target, pair.source("b")), **workload)
        alignment.info.update(reference="average",
                              aligned_to=f"running average of {k} model(s)")
        alignments.append(alignment)
        LOG.info("model %d aligned to the running average of %d", k, k)
    return alignments


def aligned_states(models: Sequence[str], weights: Sequence[float], data: Optional[str],
                   settings: AlignSettings, allow_unsafe_pickle: bool = False,
                   **workload) -> List[Dict[str, torch.Tensor]]:
    """Every model's state dict in the base's basis, in memory (N-model evaluation)."""
    alignments = align_all(models, weights, data, settings, allow_unsafe_pickle, **workload)
    pairs = [open_pair(models[0], other, allow_unsafe_pickle) for other in models[1:]]
    states = [load_state(pairs[0].checkpoint_a)]
    states += [al.state_dict(load_state(p.checkpoint_b)) for al, p in zip(alignments, pairs)]
    return states
