"""Registry: architecture name (config.architectures[0]) -> spec builder. Add a family here."""

from typing import Callable, Dict

from mergekit_permute.spec import bert, llama
from mergekit_permute.spec.base import (
    Bind, FeaturePoint, Fused, HeadLayout, PermutationSpec, Space, WeightRule,
)

BUILDERS: Dict[str, Callable] = {
    "BertModel": bert.build,
    "BertForMaskedLM": bert.build,
    "BertForPreTraining": bert.build,
    "BertForSequenceClassification": bert.build,
    "LlamaForCausalLM": llama.build,
    "MistralForCausalLM": llama.build,
    "Qwen2ForCausalLM": llama.build,
    "Qwen3ForCausalLM": llama.build,
}


class UnsupportedArchitecture(ValueError):
    pass


def architecture_of(config) -> str:
    archs = getattr(config, "architectures", None) or []
    if len(archs) != 1:
        raise UnsupportedArchitecture(
            f"config.architectures is {archs!r}; mergekit-permute needs exactly one of: "
            f"{', '.join(sorted(BUILDERS))}"
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


__all__ = ["BUILDERS", "Bind", "FeaturePoint", "Fused", "HeadLayout", "PermutationSpec",
           "Space", "WeightRule", "UnsupportedArchitecture", "architecture_of", "spec_for_config"]
