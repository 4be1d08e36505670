"""MergeKit weight lists read off our permutation spec, for `permute` runs only (MergeKit's own
entries for BertForMaskedLM and GPT-NeoX do not match what transformers saves). MergeKit's own
metadata (vocabulary_axis, optional, tied_names) is kept where it has it; BertForPreTraining,
which MergeKit lacks, is added to its table.
"""

import json
from functools import lru_cache
from typing import Dict, List, Optional

from mergekit.architecture.json_definitions import NAME_TO_ARCH
from transformers import AutoConfig
from mergekit.architecture.base import (
    ModelArchitecture, ModuleArchitecture, ModuleDefinition, WeightInfo,
)

from mergekit_permute.spec import BUILDERS, MODEL_TYPES, PermutationSpec


@lru_cache(maxsize=None)
def _stock(architecture: str, model_type: str) -> Dict[str, WeightInfo]:
    """MergeKit's own weight metadata for this architecture, by every name it answers to."""
    out: Dict[str, WeightInfo] = {}
    for arch in NAME_TO_ARCH.get(architecture, []):
        if arch.expected_model_type != model_type:
            continue
        module = arch.modules["default"].architecture
        try:
            config = AutoConfig.for_model(model_type, num_hidden_layers=1)
            weights = module.pre_weights(config) + module.post_weights(config) + \
                (module.layer_weights(0, config) or [])
        except Exception:  # an entry we cannot instantiate: no metadata to keep
            continue
        for w in weights:
            for name in (w.name, *(w.aliases or ())):
                out[name] = w
    return out


def weight_infos(spec: PermutationSpec, stock: Dict[str, WeightInfo]) -> Dict[object, List[WeightInfo]]:
    """"pre" / layer index / "post" -> MergeKit WeightInfos, in spec order."""
    first = next(i for i, w in enumerate(spec.weights) if w.layer is not None)
    groups: Dict[object, List[WeightInfo]] = {"pre": [], "post": []}
    for i, rule in enumerate(spec.weights):
        names = (rule.name, *rule.aliases)
        known = next((stock[n] for n in names if n in stock), None)
        # Layer templates are read at layer 0; match layer i's names through that template.
        if known is None and rule.layer is not None:
            zero = rule.name.replace(f"{spec.blocks}.{rule.layer}.", f"{spec.blocks}.0.", 1)
            known = stock.get(zero)
        info = WeightInfo(
            name=rule.name,
            aliases=tuple(rule.aliases) or None,
            vocabulary_axis=rule.vocab_axis if known is None else known.vocabulary_axis,
            optional=bool(rule.tied_to or rule.optional) if known is None
            else (known.optional or bool(rule.tied_to or rule.optional)),
            tied_names=((rule.tied_to,) if rule.tied_to else None) if known is None
            else (known.tied_names or ((rule.tied_to,) if rule.tied_to else None)),
            force_dtype=None if known is None else known.force_dtype,
        )
        key = rule.layer if rule.layer is not None else ("pre" if i < first else "post")
        groups.setdefault(key, []).append(info)
    return groups


class SpecModule(ModuleArchitecture):
    """A MergeKit module architecture whose weights come from one PermutationSpec (a run's),
    or from the spec of whatever config MergeKit passes (the global BertForPreTraining)."""

    def __init__(self, architecture: str, spec: Optional[PermutationSpec] = None,
                 keep_stock: bool = True):
        self.architecture, self.spec, self.keep_stock = architecture, spec, keep_stock

    def _groups(self, config) -> Dict[object, List[WeightInfo]]:
        spec = self.spec or _spec_for(self.architecture, config.to_json_string())
        stock = _stock(self.architecture, MODEL_TYPES[self.architecture]) if self.keep_stock else {}
        return _cached_groups(spec, tuple(sorted(stock.items())))

    def pre_weights(self, config) -> List[WeightInfo]:
        return self._groups(config)["pre"]

    def post_weights(self, config) -> List[WeightInfo]:
        return self._groups(config)["post"]

    def layer_weights(self, index: int, config) -> Optional[List[WeightInfo]]:
        return self._groups(config).get(index, [])

    def num_layers_config_key(self) -> str:
        return "num_hidden_layers"

    def num_layers(self, config) -> int:
        return (self.spec or _spec_for(self.architecture, config.to_json_string())).num_layers


@lru_cache(maxsize=16)
def _spec_for(architecture: str, config_json: str) -> PermutationSpec:
    config = AutoConfig.for_model(**json.loads(config_json))
    return BUILDERS[architecture](config, architecture)


@lru_cache(maxsize=16)
def _cached_groups(spec: PermutationSpec, stock_items: tuple) -> Dict[object, List[WeightInfo]]:
    return weight_infos(spec, dict(stock_items))


def run_architecture(spec: PermutationSpec) -> ModelArchitecture:
    """The architecture a `permute` run plans with."""
    return ModelArchitecture(
        modules={"default": ModuleDefinition(architecture=SpecModule(spec.architecture, spec))},
        architectures=[spec.architecture], model_type=MODEL_TYPES[spec.architecture])


MISSING_IN_MERGEKIT = ("BertForPreTraining",)


def add_missing_architectures() -> None:
    """Architectures MergeKit 0.1.5 lacks, added without replacing anything it has."""
    for arch in MISSING_IN_MERGEKIT:
        NAME_TO_ARCH.setdefault(arch, [ModelArchitecture(
            modules={"default": ModuleDefinition(architecture=SpecModule(arch, keep_stock=False))},
            architectures=[arch], model_type=MODEL_TYPES[arch])])
