"""N >= 3 models: align every model to the base (`reference=base`), or each in turn to the
running average of the models already aligned (`reference=average`, base first).

Aligning to the running average matches each model against a target that is already a
blend, which spreads the alignment error instead of routing every model through the base's
idiosyncrasies. The blend is never built whole: the layer-wise runner reads each block of it
as the weighted average of the base's block and the aligned blocks of the models before.
Every returned alignment maps its model into the base's basis (and norm gauge), so merging is
the same weighted average either way.
"""

import logging
from typing import Dict, List, Optional, Sequence

import torch

from mergekit_permute.alignment import Alignment
from mergekit_permute.checkpoints import AlignedSource, BlendSource
from mergekit_permute.models import load_state, open_pair
from mergekit_permute.pipeline import align
from mergekit_permute.settings import AlignSettings

LOG = logging.getLogger(__name__)


def align_all(models: Sequence[str], weights: Sequence[float], data: Optional[str],
              settings: AlignSettings, **kw) -> List[Alignment]:
    """Alignments of models[1:] into models[0]'s basis (to it, or to the running average)."""
    base = models[0]
    if settings.reference == "base" or len(models) < 3 or settings.aligns_nothing:
        return [align(base, other, data, settings, **kw) for other in models[1:]]
    alignments: List[Alignment] = []
    pairs = [open_pair(base, other) for other in models[1:]]
    for k, (other, pair) in enumerate(zip(models[1:], pairs), start=1):
        target = BlendSource([(weights[0], pairs[0].source("a"))] + [
            (weights[j + 1], AlignedSource(pairs[j].source("b"), alignments[j]))
            for j in range(k - 1)])
        alignment = align(base, other, data, settings, pair=pair,
                          sources=(target, pair.source("b")), **kw)
        alignment.info.update(reference="average",
                              aligned_to=f"running average of {k} model(s)")
        alignments.append(alignment)
        LOG.info("model %d aligned to the running average of %d", k, k)
    return alignments


def aligned_states(models: Sequence[str], weights: Sequence[float], data: Optional[str],
                   settings: AlignSettings, **kw) -> List[Dict[str, torch.Tensor]]:
    """Every model's state dict in the base's basis, in memory (N-model evaluation)."""
    alignments = align_all(models, weights, data, settings, **kw)
    pairs = [open_pair(models[0], other) for other in models[1:]]
    states = [load_state(pairs[0].checkpoint_a)]
    states += [al.state_dict(load_state(p.checkpoint_b)) for al, p in zip(alignments, pairs)]
    return states
