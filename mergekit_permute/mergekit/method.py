"""The MergeKit merge method `permute`: align every other model to the base, then average.

MergeKit calls a method one tensor at a time. Everything a `permute` run computes before the
first tensor (alignments, REPAIR corrections) lives in that run's `PermuteRun`, which the
planner hands to each tensor task as a parameter (hooks.py); the method itself holds no state.
"""

import sys
from typing import Union

import torch
from mergekit.merge_methods.base import (
    BasePolicy, GroupMergeMethod, InputContract, MergeMethodSpec, OptionalTensorPolicy,
    ParameterScope, ParameterSpec, TensorGroup,
)

from mergekit_permute._autoload import enabled
from mergekit_permute.settings import (
    DATA_PARAM, DEFAULT_DATA, WEIGHT_PARAM, AlignSettings, RecipeError, recipe_names, value_type,
)


def parameter_specs():
    """MergeKit ParameterSpecs for `merge_method: permute` (documentation and defaults;
    values are validated by AlignSettings.from_recipe)."""
    specs = [ParameterSpec(WEIGHT_PARAM, float, ParameterScope.INPUT, default=1.0,
                           description="Per-model weight of the average."),
             ParameterSpec(DATA_PARAM, str, ParameterScope.SHARED, default=DEFAULT_DATA,
                           description="Calibration text: .txt, .jsonl, dataset id or "
                           "shakespeare-calib (shipped).")]
    for key, name in recipe_names().items():
        info = AlignSettings.model_fields[name]
        kind = value_type(name)
        # a text setting may be a YAML number (`learn_lambdas: 0.5`); AlignSettings converts it
        kind = Union[str, int, float] if kind is str else kind
        specs.append(ParameterSpec(key, kind, ParameterScope.SHARED,
                                   default=info.default, description=info.description))
    return tuple(specs)


RUN_PARAM = "mergekit_permute_run"   # the run object, added by the planner hook


class PermuteMerge(GroupMergeMethod):
    spec = MergeMethodSpec(
        name="permute",
        pretty_name="Permute (activation-matched alignment, then average)",
        reference_url="https://arxiv.org/abs/2403.00986",
        contract=InputContract(base=BasePolicy.REQUIRED, min_inputs=2),
        optional_tensor_policy=OptionalTensorPolicy.ERROR,
        parameters=parameter_specs(),
    )

    def merge_group(self, group: TensorGroup, /, weight, **params) -> torch.Tensor:
        run = params.get(RUN_PARAM)
        if run is None:
            raise RecipeError(
                "merge_method permute needs model paths, not bare tensors: it aligns whole "
                "models on calibration text before averaging. Run it from a MergeKit recipe "
                "(mergekit-yaml, or mergekit-permute merge), or align first "
                "(mergekit-permute align) and merge the aligned checkpoints with any method.")
        return run.merge_tensor(group, weight)


def register() -> None:
    """Add `permute` to MergeKit's methods (once)."""
    from mergekit.merge_methods import registry  # (it may be what is importing us)
    if not any(m.spec.name == "permute" for m in registry.registered_methods()):
        registry.register(PermuteMerge())


# Importing this module may itself be what loaded MergeKit's registry (whose import hook then
# had to wait for PermuteMerge to exist): register now, if the plugin is enabled.
if enabled() and "mergekit.merge_methods.registry" in sys.modules:
    register()
