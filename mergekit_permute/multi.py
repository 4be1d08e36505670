"""N >= 3 models: align every model to the base (`reference=base`), or each in turn to the
running average of the models already aligned (`reference=average`, base first).

Aligning to the running average matches each model against a target that is already a
blend, which spreads the alignment error instead of routing every model through the base's
idiosyncrasies. Every returned alignment maps its model into the base's basis, so merging is
the same weighted average either way.
"""

import copy
import logging
from typing import Dict, List, Mapping, Sequence, Tuple

import torch

from mergekit_permute.align import (
    Alignment, AlignSettings, collect_stats, make_alignment, resolve_residual,
)
from mergekit_permute.data import fingerprint
from mergekit_permute.permute import apply_to_state_dict, fold_scales, identity_transforms

LOG = logging.getLogger(__name__)
State = Mapping[str, torch.Tensor]


def _blend(parts: Sequence[Tuple[float, State]]) -> Dict[str, torch.Tensor]:
    total = sum(w for w, _ in parts)
    first = parts[0][1]
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            out[k] = (sum(w * s[k].double() for w, s in parts) / total).to(v.dtype)
        else:
            out[k] = v
    return out


def align_to_running_average(spec, model, states: Sequence[State], weights: Sequence[float],
                             tokenizer, texts: List[str], settings: AlignSettings, *,
                             device="cpu", use_cache: bool = True, data_source: str = ""
                             ) -> List[Alignment]:
    """Alignments of states[1:] into states[0]'s basis, model k matched against the weighted
    average of states[0] and the already aligned states[1:k]. `model` is any loaded model of
    the architecture; it is used as a container and restored afterwards."""
    original = {k: v.detach().clone() for k, v in model.state_dict().items()}
    target_model, other_model = model, copy.deepcopy(model)
    base_fold = fold_scales(spec, states[0]) if _orthogonal(spec, settings) else {}
    blended = [(weights[0], apply_to_state_dict(spec, states[0], identity_transforms(spec),
                                                base_fold))]
    alignments = []
    for k in range(1, len(states)):
        target = _blend(blended)
        target_model.load_state_dict(target)
        other_model.load_state_dict(states[k])
        stats = None
        if settings.matching == "activations":
            stats = collect_stats(spec, target_model, other_model, tokenizer, texts, settings,
                                  device=device, use_cache=use_cache)
        alignment = make_alignment(spec, stats, settings, (target, states[k]))
        # The target is already folded (unit gains); merging folds the base with its own gains.
        alignment.fold_a = base_fold
        alignment.info = {"reference": "average", "aligned_to": f"running average of {k} model(s)"}
        if stats is not None:
            alignment.info["data"] = {"source": data_source, "passages": len(texts),
                                      "fingerprint": fingerprint(texts),
                                      "tokens": int(next(iter(stats.values())).n)}
        alignments.append(alignment)
        blended.append((weights[k], apply_to_state_dict(spec, states[k], alignment.transforms,
                                                        alignment.fold_b)))
        LOG.info("model %d aligned to the running average of %d", k, k)
    model.load_state_dict(original)
    return alignments


def _orthogonal(spec, settings: AlignSettings) -> bool:
    return resolve_residual(spec, settings.residual) == "orthogonal"
