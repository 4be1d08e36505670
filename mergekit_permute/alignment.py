"""The Alignment type: B's transforms into A's basis, and saving / loading them
(`permutations.safetensors` + `alignment.json`)."""

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from mergekit_permute import __version__
from mergekit_permute.permute import (
    Gauge, Scaled, Transforms, apply_to_model, fold_gauge, identity_transforms, is_permutation,
    transform_tensor, unfold_gauge,
)
from mergekit_permute.settings import AlignSettings
from mergekit_permute.spec.base import PermutationSpec

PERMUTATIONS_FILE = "permutations.safetensors"
ALIGNMENT_FILE = "alignment.json"
FORMAT = "mergekit-permute/2"
GAIN_PREFIX = "gauge/"
SCALE_SUFFIX = "#scale"


@dataclass
class Alignment:
    """How B is expressed in A's basis. With folded norms (orthogonal residual), B's gains go
    into its readers, B is transformed, and A's gains come out again, so aligned B has A's
    norm gains and a stock merge of A with aligned B equals the `permute` merge."""

    spec: PermutationSpec
    transforms: Transforms
    settings: AlignSettings
    report: Dict[str, Dict] = field(default_factory=dict)
    info: Dict = field(default_factory=dict)
    # Norm gains of A and B (float64), present only where the norms are folded.
    gains_a: Dict[str, torch.Tensor] = field(default_factory=dict)
    gains_b: Dict[str, torch.Tensor] = field(default_factory=dict)
    # Wall-clock seconds (total, per solved space): the one part of alignment.json that is
    # not bit-identical between reruns.
    timings: Dict = field(default_factory=dict)

    @staticmethod
    def identity(spec: PermutationSpec, settings: AlignSettings) -> "Alignment":
        return Alignment(spec=spec, transforms=identity_transforms(spec), settings=settings)

    @property
    def folded(self) -> bool:
        return bool(self.gains_a)

    @cached_property
    def rules(self):
        """Tensor name (aliases included) -> rule; built once, looked up per tensor."""
        return self.spec.weight_map()

    @cached_property
    def fold(self) -> Gauge:
        return fold_gauge(self.spec, self.gains_b) if self.folded else Gauge()

    @cached_property
    def unfold(self) -> Gauge:
        return unfold_gauge(self.spec, self.gains_a) if self.folded else Gauge()

    def tensor(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """One tensor of B (as stored) -> the same tensor of aligned B."""
        return transform_tensor(self.rules, name, tensor, self.transforms, self.fold, self.unfold)

    def state_dict(self, state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {name: self.tensor(name, t) for name, t in state.items()}

    def apply_to_model(self, model: torch.nn.Module) -> None:
        apply_to_model(self.spec, model, self.transforms, self.fold, self.unfold)

    def for_checkpoint(self, gains: Mapping[str, torch.Tensor]) -> "Alignment":
        """The same transforms for another checkpoint of B's architecture (e.g. a fine-tune of
        B): its own gains are folded, A's come out."""
        return Alignment(spec=self.spec, transforms=self.transforms, settings=self.settings,
                         report=self.report, info=self.info, gains_a=self.gains_a,
                         gains_b=dict(gains) if self.folded else {})


def summarize(report: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
    by_kind: Dict[str, List[Dict]] = {}
    for r in report.values():
        by_kind.setdefault(r["kind"], []).append(r)
    return {k: {"mean_corr_before": round(sum(r["mean_corr_before"] for r in rs) / len(rs), 4),
                "mean_corr_after": round(sum(r["mean_corr_after"] for r in rs) / len(rs), 4)}
            for k, rs in sorted(by_kind.items())}


def _file(name: str, suffix: str) -> str:
    stem, ext = name.rsplit(".", 1)
    return f"{stem}{suffix}.{ext}"


def alignment_document(alignment: Alignment) -> Dict:
    return {
        "format": FORMAT,
        "mergekit_permute_version": __version__,
        "architecture": alignment.spec.architecture,
        "function_preserving": alignment.settings.function_preserving,
        "folded_norms": alignment.folded,
        "settings": alignment.settings.model_dump(),
        "label": alignment.settings.label(),
        **alignment.info,
        "spaces": alignment.report,
        "summary": summarize(alignment.report),
        "timings": alignment.timings,
    }


def save_alignment(alignment: Alignment, out_dir: Path, suffix: str = "") -> None:
    """permutations.safetensors (int32 index vectors, float64 matrices where a space holds one,
    A's norm gains under gauge/ where norms are folded) and alignment.json."""
    tensors = {}
    for space, views in alignment.transforms.items():
        for view, t in views.items():
            key = f"{space}/{view}" if view else space
            if isinstance(t, Scaled):
                tensors[key] = t.index.to(torch.int32)
                tensors[key + SCALE_SUFFIX] = t.scale.double()
            else:
                tensors[key] = t.to(torch.int32) if is_permutation(t) else t.double()  # exact
    for norm, gain in alignment.gains_a.items():
        tensors[GAIN_PREFIX + norm] = gain.double()
    # One metadata key: safetensors writes the header from a hash map, so two keys would come
    # out in a per-process order and break bit-identical reruns.
    header = json.dumps({"format": FORMAT, "architecture": alignment.spec.architecture},
                        sort_keys=True)
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)},
              str(Path(out_dir) / _file(PERMUTATIONS_FILE, suffix)),
              metadata={"mergekit_permute": header})
    (Path(out_dir) / _file(ALIGNMENT_FILE, suffix)).write_text(
        json.dumps(alignment_document(alignment), indent=2) + "\n")


def read_alignment_files(path: Path) -> Tuple[Transforms, Dict[str, torch.Tensor], Dict]:
    """(transforms, A's norm gains, alignment.json document or {}) from a directory written by
    `align` / a merge, or from its permutations.safetensors."""
    path = Path(path)
    folder, perms = (path, path / PERMUTATIONS_FILE) if path.is_dir() else (path.parent, path)
    if not perms.is_file():
        raise FileNotFoundError(f"{path}: no {PERMUTATIONS_FILE} (pass a directory written by "
                                "`mergekit-permute align`, or the file itself)")
    try:
        flat = load_file(str(perms))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{perms}: not a readable safetensors file ({e})") from None
    transforms: Transforms = {}
    gains: Dict[str, torch.Tensor] = {}
    for key, t in flat.items():
        if key.startswith(GAIN_PREFIX):
            gains[key[len(GAIN_PREFIX):]] = t.double()
            continue
        if key.endswith(SCALE_SUFFIX):
            continue
        space, _, view = key.partition("/")
        t = t.long() if not t.is_floating_point() else t
        if key + SCALE_SUFFIX in flat:
            t = Scaled(t, flat[key + SCALE_SUFFIX].double())
        transforms.setdefault(space, {})[view] = t
    info_path = folder / _file(ALIGNMENT_FILE, perms.stem[len("permutations"):])
    doc = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return transforms, gains, doc


def load_alignment(path: Path, spec: PermutationSpec,
                   gains_b: Optional[Mapping[str, torch.Tensor]] = None) -> Alignment:
    """A saved alignment for a checkpoint of `spec` whose norm gains are `gains_b`."""
    from mergekit_permute.permute import check_transforms
    transforms, gains_a, doc = read_alignment_files(path)
    if doc.get("architecture") not in (None, spec.architecture):
        raise ValueError(f"the alignment was made for {doc['architecture']}, but this "
                         f"checkpoint is {spec.architecture}")
    check_transforms(spec, transforms)
    folded = bool(gains_a) or bool(doc.get("folded_norms"))
    if folded and not gains_a:
        raise ValueError(f"{path}: the alignment folds norms but its file carries no gains "
                         "(written by an older version); re-run `align`")
    settings = AlignSettings(**doc["settings"]) if "settings" in doc else AlignSettings()
    return Alignment(spec=spec, transforms=transforms, settings=settings,
                     report=doc.get("spaces", {}), info={k: doc[k] for k in ("model_a", "model_b")
                                                         if k in doc},
                     gains_a=gains_a, gains_b=dict(gains_b or {}) if folded else {})
