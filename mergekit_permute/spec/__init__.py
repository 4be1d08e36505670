"""Registry: architecture name (config.architectures[0]) -> spec builder. Adding a family is one
module here (a `build(config, architecture)`, NOTES and MODEL_TYPES) plus a test config."""

from typing import Callable, Dict

from mergekit_permute.spec import bert, gemma, gpt2, gpt_neox, llama, phi3
from mergekit_permute.spec.base import (
    Bind, FeaturePoint, Fused, HeadLayout, PermutationSpec, Space, WeightRule,
)

FAMILIES = (bert, llama, gpt2, gpt_neox, phi3, gemma)
BUILDERS: Dict[str, Callable] = {arch: f.build for f in FAMILIES for arch in f.NOTES}
MODEL_TYPES: Dict[str, str] = {arch: t for f in FAMILIES for arch, t in f.MODEL_TYPES.items()}
NOTES: Dict[str, str] = {arch: n for f in FAMILIES for arch, n in f.NOTES.items()}


class UnsupportedArchitecture(ValueError):
    pass


def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if len(archs) != 1:
        raise UnsupportedArchitecture(
            f"config.architectures is {archs!r}; mergekit-permute needs exactly one of: "
            f"{', '.join(sorted(BUILDERS))}. Set it in the model's config.json to the class the "
            "checkpoint was trained as, e.g. \"architectures\": [\"BertForMaskedLM\"]"
        )
    return archs[0]


def spec_for_config(config) -> PermutationSpec:
    arch = architecture_of(config)
    if arch not in BUILDERS:
        raise UnsupportedArchitecture(
            f"architecture {arch!r} is not supported by mergekit-permute. Supported: "
            f"{', '.join(sorted(BUILDERS))}. Adding one is a spec module in mergekit_permute/spec/."
        )
    return BUILDERS[arch](config, arch)


__all__ = ["BUILDERS", "MODEL_TYPES", "NOTES", "Bind", "FeaturePoint", "Fused", "HeadLayout",
           "PermutationSpec", "Space", "WeightRule", "UnsupportedArchitecture", "architecture_of",
           "spec_for_config"]
