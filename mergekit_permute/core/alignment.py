"""The Alignment type: B's transforms into A's basis, and saving / loading them
(`permutations.safetensors` + `alignment.json`)."""

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from safetensors.torch import load_file, save_file

from mergekit_permute import __version__
from mergekit_permute.io.outputs import follow_umask
from mergekit_permute.core.permute import (
    Gauge, Scaled, Transforms, apply_to_model, fold_gauge, identity_transforms, is_permutation,
    transform_tensor, unfold_gauge,
)
from mergekit_permute.settings import AlignSettings
from mergekit_permute.spec.base import Bind, PermutationSpec
from mergekit_permute.core.symmetry import check_symmetry

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


def spec_layout(spec: PermutationSpec) -> Dict:
    """What an alignment must agree on with any checkpoint it is replayed on."""
    reads_residual = [w for w in spec.weights if any(
        isinstance(a, Bind) and a.space == "residual" and a.role == "in" for a in w.axes)]
    return {"fingerprint": _fingerprint(_legacy_dump(spec)),
            "layout": _fingerprint({
                "spaces": [s.model_dump(mode="json") for s in spec.spaces],
                "weights": [(w.name, w.shape) for w in spec.weights if not w.optional],
                "layers": spec.num_layers, "blocks": spec.blocks}),
            "tied_head": any(w.tied_to for w in reads_residual),
            "folded_norms": len(spec.norm_folds), "residual_centered": spec.residual_centered}


def _fingerprint(doc) -> str:
    return hashlib.sha256(json.dumps(doc, separators=(",", ":")).encode()).hexdigest()[:16]


def _legacy_dump(spec: PermutationSpec) -> Dict:
    """The spec as alignments written before `layout` hashed it (the whole spec's JSON), so
    they replay: without what later versions added to specs (optional rules, GPT-2's names
    without their `transformer.` prefix)."""
    doc = spec.model_dump(mode="json")
    weights = []
    for w in doc["weights"]:
        if w.pop("optional", False):
            continue
        w["aliases"] = [a for a in w["aliases"] if a != w["name"].split(".", 1)[-1]]
        weights.append(w)
    return {**doc, "weights": weights}


def check_layout(saved: Optional[Dict], spec: PermutationSpec, target: str) -> None:
    """Refuse a checkpoint whose tying, norms or configuration differ from the alignment's."""
    if not saved:
        return   # written before layouts were recorded: the transforms are still checked
    here = spec_layout(spec)
    if saved.get("tied_head") != here["tied_head"]:
        tied = "ties its output head to the embeddings" if here["tied_head"] else \
            "has an output head separate from the embeddings"
        raise ValueError(f"{target} {tied}, but the alignment was made for a model that "
                         f"{'does not' if here['tied_head'] else 'does'}: tied and untied heads "
                         "admit different maps. Align this checkpoint's own pair instead")
    if (saved.get("folded_norms"), saved.get("residual_centered")) != \
            (here["folded_norms"], here["residual_centered"]):
        raise ValueError(f"{target} has another norm layout than the model the alignment was "
                         "made for; align this checkpoint's own pair instead")
    if saved.get("layout", saved.get("fingerprint")) != here["layout" if "layout" in saved
                                                              else "fingerprint"]:
        raise ValueError(f"{target} has another configuration (widths, heads, layers or head "
                         "layout) than the model the alignment was made for")


def alignment_document(alignment: Alignment) -> Dict:
    return {
        "format": FORMAT,
        "mergekit_permute_version": __version__,
        "architecture": alignment.spec.architecture,
        "spec": spec_layout(alignment.spec),
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
    path = Path(out_dir) / _file(PERMUTATIONS_FILE, suffix)
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(path),
              metadata={"mergekit_permute": header})
    follow_umask(path)   # (safetensors writes 0600)
    (Path(out_dir) / _file(ALIGNMENT_FILE, suffix)).write_text(
        json.dumps(alignment_document(alignment), indent=2) + "\n")


def locate(path: Path) -> Tuple[Path, Path]:
    """(folder, permutations file) of an alignment given as a directory or as the file."""
    path = Path(path)
    folder, perms = (path, path / PERMUTATIONS_FILE) if path.is_dir() else (path.parent, path)
    if perms.is_file():
        return folder, perms
    several = sorted(p.name for p in folder.glob("permutations-*.safetensors"))
    if path.is_dir() and several:
        raise FileNotFoundError(f"{path} holds one alignment per merged model ({', '.join(several)}"
                                f"); pass the file of the one to replay, e.g. {path / several[0]}")
    raise FileNotFoundError(f"{path}: no {PERMUTATIONS_FILE} (pass a directory written by "
                            "`mergekit-permute align`, or the file itself)")


def read_alignment_files(path: Path) -> Tuple[Transforms, Dict[str, torch.Tensor], Dict]:
    """(transforms, A's norm gains, alignment.json document or {}) from a directory written by
    `align` / a merge, or from its permutations.safetensors."""
    folder, perms = locate(path)
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
    transforms, gains_a, doc = read_alignment_files(path)
    if doc.get("architecture") not in (None, spec.architecture):
        raise ValueError(f"the alignment was made for {doc['architecture']}, but this "
                         f"checkpoint is {spec.architecture}")
    check_layout(doc.get("spec"), spec, "this checkpoint")
    settings = AlignSettings(**doc["settings"]) if "settings" in doc else AlignSettings()
    check_symmetry(spec, transforms, orthogonal_vo=settings.vo == "orthogonal"
                   and settings.matching != "learned")
    folded = bool(gains_a) or bool(doc.get("folded_norms"))
    if folded and not gains_a:
        raise ValueError(f"{path}: the alignment folds norms but its file carries no gains "
                         "(written by an older version); re-run `align`")
    dense_residual = not is_permutation(transforms["residual"][""])
    if dense_residual and not folded:
        raise ValueError(f"{path}: the residual map is a rotation but the file carries no norm "
                         "gains to fold; re-run `align`")
    if folded:
        check_gains(spec, gains_a, "the alignment's norm gains (model A's)")
        check_gains(spec, gains_b or {}, "this checkpoint's norm gains")
    return Alignment(spec=spec, transforms=transforms, settings=settings,
                     report=doc.get("spaces", {}), info={k: doc[k] for k in ("model_a", "model_b",
                                                                   "function_check") if k in doc},
                     gains_a=gains_a, gains_b=dict(gains_b or {}) if folded else {})


def check_gains(spec: PermutationSpec, gains: Mapping[str, torch.Tensor], what: str) -> None:
    """Every foldable norm has a finite gain without zeros, of the norm's size."""
    shapes = {w.name: w.shape for w in spec.weights}
    for fold in spec.norm_folds:
        gain = gains.get(fold.norm)
        if gain is None or tuple(gain.shape) != shapes[fold.norm]:
            raise ValueError(f"{what}: {fold.norm} is missing or has the wrong size")
        if not bool(torch.isfinite(gain).all()) or bool(((gain + fold.offset).abs() < 1e-6).any()):
            raise ValueError(f"{what}: {fold.norm} is not finite or holds a (near-)zero gain, "
                             "so the norms cannot be folded; use a permutation residual policy "
                             "(residual=all)")
