"""One `permute` merge: what MergeKit's planner asked for, and everything computed for it
before the first tensor is merged (alignments, REPAIR corrections). Created when MergeKit
plans a `permute` recipe, attached to that run's configuration object, and handed to every
tensor task; nothing lives at module level."""

import difflib
import logging
import math
from pathlib import Path
from typing import Dict, List, Optional

import torch

from mergekit_permute.align.multi import align_all
from mergekit_permute.align.repair import repair_blend
from mergekit_permute.calibration.collect import prepare_calibration
from mergekit_permute.card import merge_card
from mergekit_permute.core.alignment import save_alignment
from mergekit_permute.io.checkpoints import AlignedSource, weighted_average
from mergekit_permute.io.models import load_config, open_pair
from mergekit_permute.io.preflight import check_device, check_max_length
from mergekit_permute.mergekit.architecture import run_architecture
from mergekit_permute.settings import WEIGHT_PARAM, AlignSettings, RecipeError, check_settings

LOG = logging.getLogger(__name__)
ATTRIBUTE = "_mergekit_permute_run"


def model_path(ref) -> str:
    if getattr(ref, "lora", None) is not None:
        raise RecipeError(f"{ref}: LoRA inputs are not supported by merge_method permute")
    if not hasattr(ref, "model"):
        return str(ref)
    # MergeKit reads `path@revision` (a Hub branch or training step): so must the alignment
    revision = getattr(ref.model, "revision", None)
    return f"{ref.model.path}@{revision}" if revision else ref.model.path


def _check_token_sources(config) -> None:
    """MergeKit copies a `tokenizer.tokens` row sourced from a model into every model's
    embedding before the merge method sees it, where it would get each model's own alignment
    although it is in the source's basis."""
    tokens = getattr(getattr(config, "tokenizer", None), "tokens", None) or {}
    sourced = sorted(t for t, cfg in tokens.items()
                     if cfg.source is not None and getattr(cfg.source, "kind", None) != "zero")
    if sourced:
        raise RecipeError(f"merge_method permute: tokenizer.tokens {sourced} take their "
                          "embedding from a model; those rows would be aligned as every "
                          "model's own. Merge first, then set those rows (e.g. with "
                          "mergekit-tokensurgeon), or give them source: {kind: zero}")


def _check_length(settings: AlignSettings, base: str) -> None:
    """max_length against the base's positions, named as a recipe spells it (the pair's own
    checks, later, name a base whose config cannot be read)."""
    if not Path(base).is_dir():   # (a Hub id: fetched once, by the pair's checks)
        return
    try:
        config = load_config(base)
    except (OSError, ValueError):
        return
    try:
        check_max_length(settings.max_length, [(f"model {base}", config)], option="max_length:")
    except ValueError as e:
        raise RecipeError(f"merge_method permute: {e}") from None


def validate_recipe(config):
    """(settings, data, base, others, weights) of a `permute` recipe, or a RecipeError
    naming the problem, before MergeKit plans any tensor."""
    if config.slices or config.modules:
        raise RecipeError("merge_method permute needs the `models:` form (whole models, same "
                          "layer count); slices and modules are not supported")
    if config.base_model is None:
        raise RecipeError("merge_method permute needs `base_model` (model A, whose basis the "
                          "others are aligned to)")
    models = config.models or []
    refs = {m.model for m in models} | {config.base_model}
    if len(refs) < 2:
        raise RecipeError("merge_method permute needs at least two distinct models (base_model "
                          "and one or more others to align to it)")
    weights: Dict[str, float] = {}
    for m in models:
        extra = sorted(set(m.parameters or {}) - {WEIGHT_PARAM})
        misspelt = [k for k in extra if difflib.get_close_matches(str(k), [WEIGHT_PARAM], n=1)]
        if misspelt and WEIGHT_PARAM not in (m.parameters or {}):
            raise RecipeError(f"model {m.model}: unknown parameter(s) {misspelt}; did you mean "
                              f"{WEIGHT_PARAM!r}? (the only per-model parameter)")
        if extra:
            raise RecipeError(f"model {m.model}: parameter(s) {extra} are not per-model; "
                              "put them under the top-level `parameters:`")
        w = (m.parameters or {}).get(WEIGHT_PARAM, 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or w < 0:
            raise RecipeError(f"model {m.model}: weight must be a number >= 0, got {w!r}")
        weights[model_path(m.model)] = float(w)
    _check_token_sources(config)
    settings, data = AlignSettings.from_recipe(dict(config.parameters or {}))
    _check_length(settings, model_path(config.base_model))
    base = model_path(config.base_model)
    # in the recipe's order: with reference=average, each model joins the average of the base
    # and the models listed before it
    others = list(dict.fromkeys(p for p in (model_path(m.model) for m in models) if p != base))
    weights.setdefault(base, 1.0)
    if sum(weights.values()) == 0:
        raise RecipeError("merge_method permute: the model weights sum to zero")
    return settings, data, base, others, weights


class PermuteRun:
    def __init__(self, config, device: str = "cpu", allow_unsafe_pickle: bool = False):
        self.config = config
        self.settings, self.data, self.base, self.others, self.weights = validate_recipe(config)
        self.device = device or "cpu"
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.alignments: Dict[str, object] = {}       # other model's path -> Alignment
        self.repaired: Dict[str, torch.Tensor] = {}   # REPAIR-corrected merged tensors
        self.repair_report: Dict[str, float] = {}
        self.barrier: Optional[Dict] = None           # a measured barrier, for the card
        self.output_name: Optional[str] = None        # the card's title, if not the out dir
        self.spec = None
        self._unknown: set = set()

    # ---- the run on its configuration object ----
    @staticmethod
    def of(config) -> Optional["PermuteRun"]:
        return getattr(config, ATTRIBUTE, None)

    def attach(self) -> "PermuteRun":
        object.__setattr__(self.config, ATTRIBUTE, self)
        return self

    # ---- before any tensor ----
    def plan(self) -> None:
        """Check every model against the base, then align them (and REPAIR the merge)."""
        check_device(self.device)
        pairs = [open_pair(self.base, other, self.allow_unsafe_pickle) for other in self.others]
        self.spec = pairs[0].spec
        check_settings(self.spec, self.settings)
        if self.settings.reference == "average" and len(self.others) < 2:
            LOG.info("reference=average with one other model is alignment to the base")
        models = [self.base, *self.others]
        if set(self.alignments) != set(self.others):   # (else given: e.g. by `merge --barrier`)
            alignments = align_all(models, [self.weights[m] for m in models], self.data,
                                   self.settings, self.allow_unsafe_pickle, device=self.device)
            self.alignments = dict(zip(self.others, alignments))
        if self.settings.repair:
            parents = [(self.weights[self.base], pairs[0].source("a"))] + [
                (self.weights[o], AlignedSource(p.source("b"), self.alignments[o]))
                for o, p in zip(self.others, pairs)]
            calib = prepare_calibration(pairs[0], self.data, self.settings)
            self.repaired, self.repair_report = repair_blend(self.spec, pairs[0].config, parents,
                                                             calib, self.device)
            LOG.info("REPAIR: mean |log std ratio| before correction per FF layer: %s",
                     self.repair_report)

    def architecture(self):
        return run_architecture(self.spec)

    # ---- one tensor ----
    def merge_tensor(self, group, weight) -> torch.Tensor:
        base, name = group.base, group.metadata.name
        if name in self.repaired:
            return self.repaired[name].to(base.tensor.device, base.tensor.dtype)
        tensors, weights = [base.tensor], [float(weight[base.id])]
        for entry in group.non_base:
            alignment = self.alignments[model_path(entry.id)]
            if name not in alignment.rules and entry.tensor.is_floating_point() \
                    and name not in self._unknown:
                self._unknown.add(name)
                LOG.warning("%s is not in the permutation spec; averaged as is", name)
            tensors.append(alignment.tensor(name, entry.tensor).to(base.tensor.device))
            weights.append(float(weight[entry.id]))
        return weighted_average(tensors, weights)

    # ---- after the tensors ----
    def write_files(self, out_dir: Path) -> None:
        alignments = list(self.alignments.values())
        if len(alignments) == 1:
            save_alignment(alignments[0], Path(out_dir))
        else:
            for k, alignment in enumerate(alignments, start=1):
                save_alignment(alignment, Path(out_dir), suffix=f"-{k}")

    def card(self, config_yaml: str, name: str) -> str:
        return merge_card(self, config_yaml, self.output_name or name)

    def models(self) -> List[str]:
        return [self.base, *self.others]
