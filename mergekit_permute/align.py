"""load -> calibrate -> match -> transforms, plus saving and loading a finished alignment."""

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from mergekit_permute import __version__
from mergekit_permute.calibrate import calibrate, prepare_tokenizer, tokenize
from mergekit_permute.match import (
    AttentionMode, QKMode, ResidualPolicy, match_attention, match_plain, mean_matched, procrustes,
    residual_points, rotate_vo,
)
from mergekit_permute.permute import (
    Folds, Transforms, fold_scales, identity_transforms, is_permutation,
)
from mergekit_permute.spec.base import Fused, PermutationSpec
from mergekit_permute.stats import CrossStats

LOG = logging.getLogger(__name__)


class AlignSettings(BaseModel):
    """How to align B to A. Unknown keys are errors (extra="forbid")."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    # activations: correlate features on calibration text; weights: data-free weight matching.
    matching: Literal["activations", "weights"] = "activations"
    attention: AttentionMode = "head_perm"
    # Q/K dims inside a head: follow V's permutation (paper), or matched on query/key features.
    qk: QKMode = "follow_vo"
    # V/O dims inside a head: permuted (paper) or rotated (Procrustes per KV group).
    vo: Literal["permute", "orthogonal"] = "permute"
    # Used when merging (recipe, barrier), not by `align`: REPAIR-style FF statistics correction,
    # and what models 2..N are aligned to (the base, or the running average; N >= 3 only).
    repair: bool = False
    reference: Literal["base", "average"] = "base"
    ffn: Literal["permute", "identity"] = "permute"
    # auto = orthogonal for pre-norm models with an untied head, else all (BENCHMARKS.md).
    residual: ResidualPolicy = "auto"
    samples: int = Field(256, ge=1, description="calibration passages")
    max_length: int = Field(128, ge=2, description="tokens per passage")
    batch_size: int = Field(8, ge=1)
    keep_special_tokens: bool = True

    @property
    def function_preserving(self) -> bool:
        return self.attention != "ignore_heads"

    def label(self) -> str:
        qk = "" if self.qk == "follow_vo" else f",qk={self.qk}"
        repair = ",repair" if self.repair else ""
        weights = ",matching=weights" if self.matching == "weights" else ""
        ref = ",reference=average" if self.reference == "average" else ""
        vo = ",vo=orthogonal" if self.vo == "orthogonal" else ""
        return (f"ffn={self.ffn},attention={self.attention},residual={self.residual}"
                f"{qk}{vo}{weights}{repair}{ref}")

    @property
    def needs_qk_features(self) -> bool:
        return (self.qk != "follow_vo" and self.attention not in ("identity", "ignore_heads")
                and self.matching == "activations")

    def calibration_key(self) -> Dict:
        return self.model_dump(include={"samples", "max_length", "batch_size", "keep_special_tokens"})


@dataclass
class Alignment:
    spec: PermutationSpec
    transforms: Transforms
    settings: AlignSettings
    report: Dict[str, Dict] = field(default_factory=dict)
    info: Dict = field(default_factory=dict)
    # Norm gains folded into their readers (orthogonal residual only), per model.
    fold_a: Folds = field(default_factory=dict)
    fold_b: Folds = field(default_factory=dict)

    @cached_property
    def rules(self):
        """Tensor name (aliases included) -> rule; built once, looked up per tensor."""
        return self.spec.weight_map()


def calibration_spaces(spec: PermutationSpec) -> List[str]:
    """Every space whose statistics any setting could use."""
    return [s.name for s in spec.spaces if not s.frozen]


def resolve_residual(spec: PermutationSpec, policy: str) -> str:
    """`auto`: the orthogonal map where it preserves the function (pre-norm models with an
    untied head; it beat `all` on the Llama and GPT-NeoX zoos, BENCHMARKS.md), else the pooled
    permutation `all`."""
    if policy != "auto":
        return policy
    return "all" if spec.orthogonal_residual_error() else "orthogonal"


def compute_alignment(spec: PermutationSpec, stats: Dict[str, CrossStats],
                      settings: AlignSettings, states=None) -> Alignment:
    """Transforms from statistics. `states` (A's and B's state dicts) are needed only for the
    orthogonal residual policy, which folds each model's norm gains first."""
    transforms = identity_transforms(spec)
    report: Dict[str, Dict] = {}
    folds: Dict[str, Folds] = {"a": {}, "b": {}}
    residual = resolve_residual(spec, settings.residual)
    for space in spec.spaces:
        if space.frozen:
            continue
        q_corr = None
        if space.kind == "residual" and residual == "orthogonal":
            points = [stats[f"{space.name}@{i}"] for i in range(len(space.features))]
            q = procrustes([p.sum_ab for p in points], keep_ones=spec.residual_centered)
            transforms[space.name] = {"": q}
            sum_ab = sum(p.sum_ab for p in points)
            norm = float((sum(p.sq_a.sum() for p in points) * sum(p.sq_b.sum() for p in points)).sqrt())
            report[space.name] = {"kind": space.kind, "size": space.size,
                                  "measure": "uncentered cosine of H_A and H_B Q",
                                  "mean_corr_before": round(float(torch.trace(sum_ab)) / norm, 6),
                                  "mean_corr_after": round(float(torch.trace(sum_ab @ q)) / norm, 6)}
            if states is None:
                raise ValueError("residual=orthogonal needs both models' weights to fold norms")
            folds = {"a": fold_scales(spec, states[0]), "b": fold_scales(spec, states[1])}
            continue
        if space.kind == "residual":
            points = residual_points(residual, len(space.features))
            if not points:
                continue
            pooled = stats[f"{space.name}@{points[0]}"]
            for i in points[1:]:
                pooled = pooled + stats[f"{space.name}@{i}"]
            corr = pooled.correlation()
            transforms[space.name] = {"": match_plain(corr)}
            perm = transforms[space.name][""]
        else:
            corr = stats[f"{space.name}@0"].correlation()
            if space.kind == "ffn":
                if settings.ffn == "identity":
                    continue
                transforms[space.name] = {"": match_plain(corr)}
                perm = transforms[space.name][""]
            else:
                if settings.attention == "identity":
                    continue
                qk = settings.qk if settings.needs_qk_features else "follow_vo"
                q_corr = k_corr = None
                if qk != "follow_vo":
                    q_corr, k_corr = (_stats_for(stats, f"{space.name}@{v}", "qk")
                                      .correlation() for v in ("q", "k"))
                transforms[space.name] = match_attention(corr, space.heads, settings.attention,
                                                         qk, q_corr, k_corr)
                perm = transforms[space.name]["o"]
                if settings.vo == "orthogonal":
                    transforms[space.name].update(rotate_vo(
                        stats[f"{space.name}@0"].sum_ab, space.heads, transforms[space.name]))
        report[space.name] = {
            "kind": space.kind, "size": space.size,
            "mean_corr_before": round(mean_matched(corr, torch.arange(space.size)), 6),
            "mean_corr_after": round(mean_matched(corr, perm), 6),
        }
        if space.kind == "attention" and q_corr is not None:
            identity = {v: torch.arange(n) for v, n in space.views.items()}
            report[space.name]["qk_corr_before"] = round(qk_matched(q_corr, k_corr, identity), 6)
            report[space.name]["qk_corr_after"] = round(
                qk_matched(q_corr, k_corr, transforms[space.name]), 6)
    return Alignment(spec=spec, transforms=transforms, settings=settings, report=report,
                     fold_a=folds["a"], fold_b=folds["b"])


def qk_matched(q_corr: torch.Tensor, k_corr: torch.Tensor, views: Dict[str, torch.Tensor]) -> float:
    """Mean correlation of matched query and key dims (what qk=separate/joint maximise)."""
    total = (mean_matched(q_corr, views["q"]) * len(views["q"])
             + mean_matched(k_corr, views["k"]) * len(views["k"]))
    return total / (len(views["q"]) + len(views["k"]))


# ---- calibration statistics, cached on disk ---------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("MERGEKIT_PERMUTE_CACHE",
                               Path.home() / ".cache" / "mergekit_permute"))


def model_fingerprint(model) -> str:
    """Content hash of the weights actually loaded (robust to paths, copies and hub revisions)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()[:16]


def _stats_for(stats: Dict[str, CrossStats], key: str, setting: str) -> CrossStats:
    if key not in stats:
        raise ValueError(f"calibration statistics lack {key}, which {setting} needs; they were "
                         "collected without it (pass qk=True to collect_stats)")
    return stats[key]


def collect_stats(spec, model_a, model_b, tokenizer, texts: List[str], settings: AlignSettings,
                  *, device="cpu", use_cache: bool = True, data_id: str = "",
                  qk: Optional[bool] = None) -> Dict[str, CrossStats]:
    """`qk`: also the query/key projection outputs (default: when `settings` needs them)."""
    from mergekit_permute.data import fingerprint
    qk = settings.needs_qk_features if qk is None else qk
    key_src = json.dumps({"a": model_fingerprint(model_a), "b": model_fingerprint(model_b),
                          "data": fingerprint(texts), "settings": settings.calibration_key(),
                          "qk": qk, "version": __version__}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    path = cache_dir() / f"stats-{key}.safetensors"
    if use_cache and path.is_file():
        LOG.info("reusing cached calibration statistics %s", path)
        flat = load_file(str(path))
        return _unflatten_stats(flat)
    prepare_tokenizer(tokenizer)
    batches = tokenize(tokenizer, texts, settings.max_length, settings.batch_size, model_a)
    stats = calibrate(model_a, model_b, spec, batches, calibration_spaces(spec),
                      special_ids=tokenizer.all_special_ids,
                      keep_special=settings.keep_special_tokens, device=device, qk=qk)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({f"{k}/{n}": t.contiguous() for k, s in stats.items()
                   for n, t in s.tensors().items()}, str(tmp))
        os.replace(tmp, path)
    return stats


def _unflatten_stats(flat: Dict[str, torch.Tensor]) -> Dict[str, CrossStats]:
    grouped: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        space, name = k.rsplit("/", 1)
        grouped.setdefault(space, {})[name] = t
    return {k: CrossStats.from_tensors(v) for k, v in grouped.items()}


# ---- saved alignments ---------------------------------------------------------------------------

PERMUTATIONS_FILE = "permutations.safetensors"
ALIGNMENT_FILE = "alignment.json"


def save_alignment(alignment: Alignment, out_dir: Path, suffix: str = "") -> None:
    """permutations.safetensors (int32 index vectors; float64 matrices where a space holds one)
    and alignment.json (settings, data fingerprint, per-space correlations)."""
    tensors = {}
    for space, views in alignment.transforms.items():
        for view, t in views.items():
            key = f"{space}/{view}" if view else space
            tensors[key] = t.to(torch.int32) if is_permutation(t) else t.double()  # exact reuse
    perm_file = out_dir / PERMUTATIONS_FILE.replace(".safetensors", f"{suffix}.safetensors")
    # One metadata key: safetensors writes the header from a hash map, so two keys would come
    # out in a per-process order and break bit-identical reruns.
    header = json.dumps({"format": "mergekit-permute/1",
                         "architecture": alignment.spec.architecture}, sort_keys=True)
    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(perm_file),
              metadata={"mergekit_permute": header})
    doc = {
        "format": "mergekit-permute/1",
        "folded_norms": bool(alignment.fold_b),
        "mergekit_permute_version": __version__,
        "architecture": alignment.spec.architecture,
        "function_preserving": alignment.settings.function_preserving,
        "settings": alignment.settings.model_dump(),
        **alignment.info,
        "spaces": alignment.report,
        "summary": summarize(alignment.report),
    }
    (out_dir / ALIGNMENT_FILE.replace(".json", f"{suffix}.json")).write_text(
        json.dumps(doc, indent=2) + "\n")


def load_transforms(path: Path) -> Transforms:
    flat = load_file(str(path))
    out: Transforms = {}
    for key, t in flat.items():
        space, _, view = key.partition("/")
        out.setdefault(space, {})[view] = t.long() if not t.is_floating_point() else t
    return out


def summarize(report: Dict[str, Dict]) -> Dict[str, Dict[str, float]]:
    by_kind: Dict[str, List[Dict]] = {}
    for r in report.values():
        by_kind.setdefault(r["kind"], []).append(r)
    return {k: {"mean_corr_before": round(sum(r["mean_corr_before"] for r in rs) / len(rs), 4),
                "mean_corr_after": round(sum(r["mean_corr_after"] for r in rs) / len(rs), 4)}
            for k, rs in sorted(by_kind.items())}


def make_alignment(spec: PermutationSpec, stats: Optional[Dict[str, CrossStats]],
                   settings: AlignSettings, states) -> Alignment:
    """Activation matching from `stats`, or weight matching from `states` alone."""
    if (settings.ffn, settings.attention, settings.residual) == ("identity",) * 3:
        return Alignment(spec=spec, transforms=identity_transforms(spec), settings=settings)
    if settings.matching == "weights":
        from mergekit_permute.weight_match import weight_match_alignment
        return weight_match_alignment(spec, states[0], states[1], settings)
    return compute_alignment(spec, stats, settings, states=states)


def check_settings(spec: PermutationSpec, settings: AlignSettings) -> None:
    """Refuse settings the architecture cannot honour, before calibration."""
    if settings.matching == "weights" and settings.qk != "follow_vo":
        raise ValueError(f"qk={settings.qk} matches query/key activations; weight matching "
                         "(matching=weights) supports qk=follow_vo only")
    if settings.vo == "orthogonal":
        if settings.matching == "weights" or settings.attention in ("identity", "ignore_heads"):
            raise ValueError("vo=orthogonal rotates V/O inside matched heads: it needs "
                             "matching=activations and attention=head_perm or monotonic")
        fused = [w.name for w in spec.weights for ax in w.axes if isinstance(ax, Fused) and any(
            p is not None and p.view in ("v", "o") for p in ax.parts)]
        if fused:
            raise ValueError(f"vo=orthogonal needs separate V and O projections; "
                             f"{spec.architecture} fuses V into {fused[0]} (use vo=permute)")
    if settings.matching == "weights" and settings.residual in ("first", "last"):
        raise ValueError(f"residual={settings.residual} picks calibration points; weight "
                         "matching supports residual=all, orthogonal, identity or auto")
    if settings.residual == "orthogonal" and spec.orthogonal_residual_error():
        raise ValueError(f"residual=orthogonal: {spec.orthogonal_residual_error()}")
    if settings.attention == "ignore_heads":
        gqa = [s.name for s in spec.spaces if s.heads and s.heads.num_kv_heads != s.heads.num_heads]
        if gqa:
            raise ValueError("attention=ignore_heads needs as many KV heads as query heads; this "
                             f"{spec.architecture} uses grouped-query attention ({gqa[0]})")


def align_pair(model_a: str, model_b: str, data: str, settings: AlignSettings, *,
               device: str = "cpu", use_cache: bool = True):
    """The whole pipeline in memory: (Alignment, spec, loaded model B, tokenizer)."""
    from mergekit_permute.data import fingerprint, load_texts
    from mergekit_permute.models import load_pair

    if settings.matching == "weights":
        spec, a, b, tok = load_pair(model_a, model_b, device=device)
        check_settings(spec, settings)
        alignment = make_alignment(spec, None, settings, (a.state_dict(), b.state_dict()))
        alignment.info = {"model_a": model_a, "model_b": model_b, "matching": "weights",
                          "data": None}
        return alignment, a, b, tok
    texts = load_texts(data, settings.samples)
    spec, a, b, tok = load_pair(model_a, model_b, device=device)
    check_settings(spec, settings)
    if not settings.function_preserving:
        LOG.warning("attention=ignore_heads is NOT function-preserving (paper ablation only)")
    stats = collect_stats(spec, a, b, tok, texts, settings, device=device, use_cache=use_cache)
    alignment = compute_alignment(spec, stats, settings, states=(a.state_dict(), b.state_dict()))
    alignment.info = {"model_a": model_a, "model_b": model_b, "matching": "activations",
                      "data": {"source": data, "passages": len(texts),
                               "fingerprint": fingerprint(texts),
                               "tokens": int(stats[next(iter(stats))].n)}}
    return alignment, a, b, tok
