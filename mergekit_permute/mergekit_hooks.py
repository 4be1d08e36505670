"""Everything that touches MergeKit 0.1.5 internals, in one place.

MergeKit has no plugin discovery. `install()` (run by the import hook in _autoload.py when
MergeKit loads its merge-method registry, or directly by our CLI):
  * registers the merge method `permute`;
  * replaces MergeKit's architecture entries for every architecture we support with entries
    read off our specs (MergeKit 0.1.5's BertForMaskedLM and GPT-NeoX entries do not match what
    current transformers saves, and it has none for BertForPreTraining);
  * validates `permute` recipes and computes the alignment when MergeKit plans the merge;
  * adds our section to the model card and writes alignment.json next to the weights.
"""

import logging
from typing import List, Optional

from pydantic import BaseModel, ConfigDict

LOG = logging.getLogger(__name__)
_DONE = set()


def register_method() -> None:
    import sys
    partial = sys.modules.get("mergekit_permute.method")
    if partial is not None and not hasattr(partial, "PermuteMerge"):
        return  # method.py is importing MergeKit right now; it registers itself when done
    from mergekit.merge_methods import registry

    from mergekit_permute.method import PermuteMerge  # may register itself on import
    if "permute" not in registry._METHODS:
        registry.register(PermuteMerge())


def _spec_module_architecture():
    from mergekit.architecture.base import ModuleArchitecture, WeightInfo

    class SpecModuleArchitecture(ModuleArchitecture, BaseModel):
        """MergeKit's weight list, read off our permutation spec (tied copies left out:
        transformers re-ties them on load)."""

        model_config = ConfigDict(frozen=True)
        architecture: str

        def _weights(self, config, which) -> List[WeightInfo]:
            from mergekit_permute.spec import BUILDERS
            spec = BUILDERS[self.architecture](config, self.architecture)
            rules = [w for w in spec.weights if w.tied_to is None]
            first = next(i for i, w in enumerate(rules) if w.layer is not None)
            if which == "pre":
                chosen = rules[:first]
            elif which == "post":
                chosen = [w for w in rules[first:] if w.layer is None]
            else:
                chosen = [w for w in rules if w.layer == which]
            return [WeightInfo(name=w.name, aliases=w.aliases or None) for w in chosen]

        def pre_weights(self, config) -> List[WeightInfo]:
            return self._weights(config, "pre")

        def post_weights(self, config) -> List[WeightInfo]:
            return self._weights(config, "post")

        def layer_weights(self, index: int, config) -> Optional[List[WeightInfo]]:
            return self._weights(config, index)

    return SpecModuleArchitecture


def patch_architectures() -> None:
    from mergekit.architecture.base import ModelArchitecture, ModuleDefinition
    from mergekit.architecture.json_definitions import NAME_TO_ARCH
    if "architectures" in _DONE:
        return
    _DONE.add("architectures")
    from mergekit_permute.spec import MODEL_TYPES
    cls = _spec_module_architecture()
    for arch, model_type in MODEL_TYPES.items():
        NAME_TO_ARCH[arch] = [ModelArchitecture(
            modules={"default": ModuleDefinition(architecture=cls(architecture=arch))},
            architectures=[arch], model_type=model_type)]


def patch_planner() -> None:
    from mergekit import plan
    if "planner" in _DONE:
        return
    _DONE.add("planner")
    original = plan.MergePlanner.normalize_config

    def normalize_config(self):
        from mergekit_permute.method import warm_up
        if self.config.merge_method == "permute":
            warm_up(self.config, self.options.device)
        return original(self)

    plan.MergePlanner.normalize_config = normalize_config


def patch_outputs() -> None:
    from mergekit import merge
    if "outputs" in _DONE:
        return
    _DONE.add("outputs")
    original_card, original_tagalong = merge.generate_card, merge._copy_tagalong_files

    def generate_card(config, config_yaml, name, *args, **kwargs):
        card = original_card(config, config_yaml, name, *args, **kwargs)
        if config.merge_method == "permute":
            from mergekit_permute.card import permute_card_section
            card += permute_card_section()
        return card

    def copy_tagalong_files(merge_config, out_path, *args, **kwargs):
        original_tagalong(merge_config, out_path, *args, **kwargs)
        if merge_config.merge_method == "permute":
            from pathlib import Path

            from mergekit_permute.align import save_alignment
            from mergekit_permute.method import RUN
            alignments = list(RUN["alignments"].values())
            if len(alignments) == 1:
                save_alignment(alignments[0], Path(out_path))
            for k, alignment in enumerate(alignments if len(alignments) > 1 else [], start=1):
                save_alignment(alignment, Path(out_path), suffix=f"-{k}")

    merge.generate_card, merge._copy_tagalong_files = generate_card, copy_tagalong_files


def install() -> None:
    """Idempotent; safe to call after the import hook has run, as our CLI does."""
    import mergekit.merge  # noqa: F401  (loads every module below)
    register_method()
    patch_architectures()
    patch_planner()
    patch_outputs()
