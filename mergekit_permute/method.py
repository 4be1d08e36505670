"""The MergeKit merge method `permute`: align B to the base model A, then average.

MergeKit calls a method one tensor at a time, so the alignment is computed once per run (at
planning time, see mergekit_hooks.py, or lazily on the first tensor) and looked up by tensor
name through the permutation spec.
"""

import logging
from typing import Dict, Optional, Tuple

import torch
from mergekit.merge_methods.base import (
    BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec, OptionalTensorPolicy,
    ParameterScope, ParameterSpec, TensorGroup,
)
from pydantic import ValidationError

from mergekit_permute.align import AlignSettings, Alignment, align_pair

LOG = logging.getLogger(__name__)
DEFAULT_DATA = "shakespeare-calib"

# Recipe parameter -> AlignSettings field (the recipe keeps the names).
SHARED = {"calibration_data": None, "calibration_samples": "samples", "max_length": "max_length",
          "batch_size": "batch_size", "attention": "attention", "ffn": "ffn",
          "residual": "residual", "qk": "qk", "matching": "matching", "repair": "repair", "reference": "reference", "vo": "vo",
          "keep_special_tokens": "keep_special_tokens"}
PER_MODEL = {"weight"}

_ALIGNMENTS: Dict[Tuple, Alignment] = {}
# The current MergeKit run: its device, and the alignments it computed (other model -> alignment).
RUN: Dict[str, object] = {"device": "cpu", "alignments": {}}


class RecipeError(ValueError):
    pass


def settings_from_parameters(params: Dict) -> Tuple[AlignSettings, str]:
    unknown = sorted(set(params) - set(SHARED))
    if unknown:
        raise RecipeError(f"merge_method permute: unknown parameter(s) {unknown}; known: "
                          f"{sorted(SHARED)} (and per-model 'weight')")
    fields = {SHARED[k]: v for k, v in params.items() if SHARED[k] is not None}
    try:
        settings = AlignSettings(**fields)
    except ValidationError as e:
        problems = "; ".join(f"{_recipe_name(err['loc'][0])}: {err['msg']}" for err in e.errors())
        raise RecipeError(f"merge_method permute: invalid parameter value(s): {problems}") from None
    data = params.get("calibration_data", DEFAULT_DATA)
    if not isinstance(data, str):
        raise RecipeError("merge_method permute: calibration_data must be a path or dataset id")
    return settings, data


def _recipe_name(field: str) -> str:
    return next((k for k, v in SHARED.items() if v == field), str(field))


def get_alignment(model_a: str, model_b: str, settings: AlignSettings, data: str) -> Alignment:
    key = (model_a, model_b, settings.model_dump_json(), data, str(RUN["device"]))
    if key not in _ALIGNMENTS:
        LOG.info("aligning %s to %s (%s)", model_b, model_a, settings.label())
        alignment, *_ = align_pair(model_a, model_b, data, settings, device=str(RUN["device"]))
        _ALIGNMENTS[key] = alignment
    RUN["alignments"][model_b] = _ALIGNMENTS[key]
    return _ALIGNMENTS[key]


def model_path(ref) -> str:
    if getattr(ref, "lora", None) is not None:
        raise RecipeError(f"{ref}: LoRA inputs are not supported by merge_method permute")
    return ref.model.path if hasattr(ref, "model") else str(ref)


class PermuteMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name="permute",
        pretty_name="Permute (activation-matched alignment, then average)",
        reference_url="https://arxiv.org/abs/2403.00986",
        contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
        optional_tensor_policy=OptionalTensorPolicy.ERROR,
        parameters=(
            ParameterSpec("weight", float, ParameterScope.INPUT, default=1.0),
            ParameterSpec("calibration_data", str, ParameterScope.SHARED, default=DEFAULT_DATA),
            ParameterSpec("calibration_samples", int, ParameterScope.SHARED, default=256),
            ParameterSpec("max_length", int, ParameterScope.SHARED, default=128),
            ParameterSpec("batch_size", int, ParameterScope.SHARED, default=8),
            ParameterSpec("attention", str, ParameterScope.SHARED, default="head_perm"),
            ParameterSpec("ffn", str, ParameterScope.SHARED, default="permute"),
            ParameterSpec("residual", str, ParameterScope.SHARED, default="auto"),
            ParameterSpec("qk", str, ParameterScope.SHARED, default="follow_vo"),
            ParameterSpec("matching", str, ParameterScope.SHARED, default="activations"),
            ParameterSpec("repair", bool, ParameterScope.SHARED, default=False),
            ParameterSpec("reference", str, ParameterScope.SHARED, default="base"),
            ParameterSpec("vo", str, ParameterScope.SHARED, default="permute"),
            ParameterSpec("keep_special_tokens", bool, ParameterScope.SHARED, default=True),
        ),
    )

    def merge_group(self, group: TensorGroup, /, weight, **params) -> torch.Tensor:
        """Every other model is in the base's basis (aligned to it, or to the running average:
        `reference`), then all are averaged."""
        from mergekit_permute.permute import apply_to_tensor, fold_tensor
        base, name = group.base, group.metadata.name
        settings, data = settings_from_parameters(params)
        if name in RUN.get("repaired", {}):  # computed whole-model at planning time (REPAIR)
            return RUN["repaired"][name].to(base.tensor.device, base.tensor.dtype)
        total = float(weight[base.id])
        merged = None
        for other in group.non_base:
            alignment = get_alignment(model_path(base.id), model_path(other.id), settings, data)
            if merged is None:
                merged = total * fold_tensor(name, base.tensor, alignment.fold_a).double()
            rule = alignment.rules.get(name)
            b = fold_tensor(name, other.tensor, alignment.fold_b)
            if rule is not None:
                b = apply_to_tensor(rule, b, alignment.transforms)
            elif b.is_floating_point():
                LOG.warning("%s is not in the permutation spec; averaged as is", name)
            w = float(weight[other.id])
            merged += w * b.to(merged.device).double()
            total += w
        if total == 0:
            raise RecipeError("merge_method permute: the model weights sum to zero")
        return (merged / total).to(base.tensor.dtype)


def validate_recipe(config) -> Optional[Tuple[AlignSettings, str]]:
    """Check a whole MergeKit configuration for `permute` before MergeKit plans any tensor."""
    if config.merge_method != "permute":
        return None
    if config.slices or config.modules:
        raise RecipeError("merge_method permute needs the `models:` form (whole models, same "
                          "layer count); slices and modules are not supported")
    models = config.models or []
    if config.base_model is None:
        raise RecipeError("merge_method permute needs `base_model` (model A, whose basis B is "
                          "aligned to)")
    refs = {m.model for m in models} | {config.base_model}
    if len(refs) < 2:
        raise RecipeError("merge_method permute needs at least two distinct models (base_model "
                          "and one or more others to align to it)")
    for m in models:
        extra = sorted(set(m.parameters or {}) - PER_MODEL)
        if extra:
            raise RecipeError(f"model {m.model}: parameter(s) {extra} are not per-model; "
                              "put them under the top-level `parameters:`")
        w = (m.parameters or {}).get("weight", 1.0)
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise RecipeError(f"model {m.model}: weight must be a number >= 0, got {w!r}")
    params = dict(config.parameters or {})
    for k, v in params.items():
        if isinstance(v, (list, dict)) or hasattr(v, "filter"):
            raise RecipeError(f"merge_method permute: {k} must be a single value, not a "
                              "gradient or filtered list")
    return settings_from_parameters(params)


def warm_up(config, device: str) -> None:
    """Compute the alignment at planning time, so failures come before any tensor is written."""
    checked = validate_recipe(config)
    if checked is None:
        return
    settings, data = checked
    RUN["device"] = device or "cpu"
    RUN["alignments"] = {}
    others = sorted({m.model for m in config.models if m.model != config.base_model}, key=str)
    if settings.reference == "average" and len(others) > 1:
        _align_to_running_average(config, others, settings, data)
    for other in others:  # each model is aligned to the base (the reference)
        get_alignment(model_path(config.base_model), model_path(other), settings, data)
    RUN["repaired"] = _repaired_tensors(config, others, settings, data) if settings.repair else {}


def _align_to_running_average(config, others, settings: AlignSettings, data: str) -> None:
    """Models in `others` order, each aligned to the running average; cached where
    get_alignment looks, so merge_group finds them."""
    from mergekit_permute.data import load_texts
    from mergekit_permute.models import load_pair
    from mergekit_permute.multi import align_to_running_average

    device = str(RUN["device"])
    base_path = model_path(config.base_model)
    weight = {m.model: float((m.parameters or {}).get("weight", 1.0)) for m in config.models}
    spec, base, _, tok = load_pair(base_path, model_path(others[0]), device=device)
    states = [base.state_dict()]
    for other in others:
        _, _, model, _ = load_pair(base_path, model_path(other), device=device)  # checks each
        states.append(model.state_dict())
    texts = load_texts(data, settings.samples) if settings.matching == "activations" else []
    alignments = align_to_running_average(
        spec, base, states, [weight.get(config.base_model, 1.0)] + [weight[o] for o in others],
        tok, texts, settings, device=device, data_source=data)
    for other, alignment in zip(others, alignments):
        alignment.info.update(model_a=base_path, model_b=model_path(other))
        key = (base_path, model_path(other), settings.model_dump_json(), data, device)
        _ALIGNMENTS[key] = alignment


def _repaired_tensors(config, others, settings: AlignSettings, data: str) -> Dict[str, torch.Tensor]:
    """REPAIR needs the whole merged model: build it in memory once, correct it on the
    calibration text, and keep the corrected tensors (the FF readers and their biases)."""
    from mergekit_permute.calibrate import prepare_tokenizer, tokenize
    from mergekit_permute.data import load_texts
    from mergekit_permute.models import load_model, load_tokenizer
    from mergekit_permute.permute import apply_to_state_dict, identity_transforms
    from mergekit_permute.repair import reader_of, repair_merge, repairable_spaces

    device = str(RUN["device"])
    weight = {m.model: float((m.parameters or {}).get("weight", 1.0)) for m in config.models}
    base_path = model_path(config.base_model)
    alignments = [RUN["alignments"][model_path(o)] for o in others]
    spec = alignments[0].spec
    base = load_model(base_path, device=device)
    states = [(weight.get(config.base_model, 1.0),
               apply_to_state_dict(spec, base.state_dict(), identity_transforms(spec),
                                   alignments[0].fold_a))]
    for other, alignment in zip(others, alignments):
        state = load_model(model_path(other), device=device).state_dict()
        states.append((weight[other], apply_to_state_dict(spec, state, alignment.transforms,
                                                          alignment.fold_b)))
    tok = prepare_tokenizer(load_tokenizer(base_path))
    batches = tokenize(tok, load_texts(data, settings.samples), settings.max_length,
                       settings.batch_size, base)
    merged, report = repair_merge(base, spec, states, batches, special_ids=tok.all_special_ids,
                                  keep_special=settings.keep_special_tokens, device=device)
    LOG.info("REPAIR: mean |log std ratio| before correction per FF layer: %s", report)
    names = set()
    for space in repairable_spaces(spec):
        reader = reader_of(spec, space)
        names |= {reader.weight} | ({reader.bias} if reader.bias else set())
    return {n: merged[n].cpu() for n in names}


def _register_if_mergekit_loaded() -> None:
    """Importing this module may itself be what loaded MergeKit's registry (whose import hook
    then had to wait for PermuteMerge to exist): register now."""
    import sys
    registry = sys.modules.get("mergekit.merge_methods.registry")
    if registry is not None and "permute" not in registry._METHODS:
        registry.register(PermuteMerge())


_register_if_mergekit_loaded()
