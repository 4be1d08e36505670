"""REPAIR for Transformers (Jordan et al. 2022, adapted): after averaging, rescale each FF
neuron of the merged model so its activation statistics on the calibration text match the
interpolation of the endpoints' statistics; averaging aligned neurons that are not perfectly
correlated shrinks their variance ("variance collapse"), which this undoes.

The correction acts on the FF features the spec already matches (the input of the down
projection): a' = (a - mean_merged) * std_target / std_merged + mean_target. It is folded into
the weight that reads those features (its columns scaled) and that weight's bias (the mean
shift); without a bias (Llama), only a scale is possible and it matches the root mean square.
Layers are corrected in order, each measured after the ones before it were corrected.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_permute.calibrate import capture, token_mask
from mergekit_permute.spec.base import Bind, PermutationSpec
from mergekit_permute.stats import CrossStats

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Moments:
    """Per-feature first and second moments (float64) over calibration tokens."""

    mean: torch.Tensor  # [n]
    sq: torch.Tensor    # [n] mean of squares

    @property
    def std(self) -> torch.Tensor:
        return (self.sq - self.mean**2).clamp_min(0).sqrt()

    def index(self, perm: torch.Tensor) -> "Moments":
        return Moments(self.mean[perm], self.sq[perm])

    @staticmethod
    def mix(parts: Sequence[Tuple[float, "Moments"]]) -> "Moments":
        """REPAIR's target: weighted mean of the endpoints' means and of their stds (the
        second moment is rebuilt from the mixed std so `std` returns exactly that mix)."""
        total = sum(w for w, _ in parts)
        mean = sum(w * m.mean for w, m in parts) / total
        std = sum(w * m.std for w, m in parts) / total
        return Moments(mean, std**2 + mean**2)


def endpoint_moments(stats: CrossStats) -> Tuple[Moments, Moments]:
    n = stats.n.clamp_min(1.0)
    return (Moments(stats.sum_a / n, stats.sq_a / n), Moments(stats.sum_b / n, stats.sq_b / n))


@dataclass(frozen=True)
class Reader:
    """The weight that reads a space (its columns), the axis bound to the space, its bias."""

    weight: str
    axis: int
    bias: Optional[str]


def reader_of(spec: PermutationSpec, space: str) -> Reader:
    rules = {w.name: w for w in spec.weights}
    for w in spec.weights:
        if len(w.shape) != 2:
            continue
        for axis, bind in enumerate(w.axes):
            if isinstance(bind, Bind) and bind.space == space and bind.role == "in":
                bias = w.name[: -len(".weight")] + ".bias"
                return Reader(w.name, axis, bias if bias in rules else None)
    raise ValueError(f"space {space} has no reading weight")


def repairable_spaces(spec: PermutationSpec) -> List[str]:
    return [s.name for s in spec.spaces if s.kind == "ffn"]


class _Stop(Exception):
    """Raised after the measured layer: the rest of the forward pass is not needed."""


@torch.no_grad()
def measure(model, spec: PermutationSpec, spaces: Sequence[str], batches, special_ids=(),
            keep_special: bool = True, device="cpu") -> Dict[str, Moments]:
    """Moments of the spaces' features in `model`; the forward stops after the deepest one."""
    points = {s: spec.space(s).features[0] for s in spaces}
    last = max(spaces, key=lambda s: spec.space(s).layer)
    sums: Dict[str, List] = {s: [0, 0.0, 0.0] for s in spaces}   # tokens, sum, sum of squares

    def stop(*_):
        raise _Stop()

    stopper = model.get_submodule(points[last].module).register_forward_hook(stop)
    try:
        with capture(model, list(points.values())) as cap:
            for batch in batches:
                mask = token_mask(batch, special_ids, keep_special).reshape(-1).to(device)
                try:
                    model(**{k: v.to(device) for k, v in batch.items() if k != "labels"})
                except _Stop:
                    pass
                for s, point in points.items():
                    feats = cap[f"{point.module}:{point.where}"]
                    feats = feats.reshape(mask.shape[0], -1)[mask].double()  # [B, T, n] -> [tokens, n]
                    sums[s][0] += feats.shape[0]
                    sums[s][1] = sums[s][1] + feats.sum(0)
                    sums[s][2] = sums[s][2] + (feats * feats).sum(0)
    finally:
        stopper.remove()
    return {s: Moments(total / n, sq / n) for s, (n, total, sq) in sums.items()}


def _correct(param: torch.Tensor, axis: int, scale: torch.Tensor) -> None:
    shape = [1] * param.ndim
    shape[axis] = -1
    param.mul_(scale.to(param.dtype).reshape(shape))


@torch.no_grad()
def repair(model, spec: PermutationSpec, targets: Dict[str, Moments], batches, *,
           special_ids=(), keep_special: bool = True, device="cpu", desc="repair") -> Dict:
    """Correct `model` (holding the merged weights) in place, layer by layer. Returns per
    space the mean |log(std_merged / std_target)| before the correction (what was repaired)."""
    params = dict(model.named_parameters())
    report = {}
    for space in tqdm(sorted(targets, key=lambda s: spec.space(s).layer), desc=desc, unit="layer"):
        target = targets[space]
        merged = measure(model, spec, [space], batches, special_ids, keep_special, device)[space]
        reader = reader_of(spec, space)
        weight = params[reader.weight]
        alive = merged.std > 1e-12  # a dead neuron stays as it is
        if reader.bias is not None:
            scale = torch.where(alive, target.std / merged.std.clamp_min(1e-12), 1.0)
            shift = torch.where(alive, target.mean - scale * merged.mean, 0.0)   # [n]
            # bias += W @ shift, contracting the space's axis of W (before W is rescaled)
            params[reader.bias].add_(torch.tensordot(weight.double(), shift.to(weight.device),
                                                     dims=([reader.axis], [0])).to(weight.dtype))
        else:
            scale = torch.where(alive, (target.sq / merged.sq.clamp_min(1e-24)).sqrt(), 1.0)
        _correct(weight, reader.axis, scale.to(weight.device))
        ratio = merged.std.clamp_min(1e-12) / target.std.clamp_min(1e-12)
        report[space] = round(float(ratio.log().abs().mean()), 6)
    return report


def repair_hook(spec: PermutationSpec, stats: Dict[str, CrossStats], transforms, batches, **kw):
    """`after_mix(model, lam)` for the barrier sweep: repair the mix lam * A + (1 - lam) * B'
    towards lam * moments(A) + (1 - lam) * moments(B') (B's moments in A's basis)."""
    moments = {}
    for space in repairable_spaces(spec):
        m_a, m_b = endpoint_moments(stats[f"{space}@0"])
        moments[space] = (m_a, m_b.index(transforms[space][""]))

    def after_mix(model, lam: float) -> None:
        targets = {s: Moments.mix([(lam, m_a), (1 - lam, m_b)]) for s, (m_a, m_b) in moments.items()}
        repair(model, spec, targets, batches, desc=f"repair {lam:.2f}", **kw)
    return after_mix


def repair_merge(model, spec: PermutationSpec, weighted_states, batches, **kw):
    """Weighted average of states already in one basis, then repaired towards the weighted mix
    of each parent's own FF moments. Returns (merged state dict, report)."""
    spaces = repairable_spaces(spec)
    parts, total, weight_sum = [], None, 0.0
    for w, state in weighted_states:
        model.load_state_dict(state)
        parts.append((w, measure(model, spec, spaces, batches, kw.get("special_ids", ()),
                                 kw.get("keep_special", True), kw.get("device", "cpu"))))
        weighted = {k: w * v.double() for k, v in state.items() if v.is_floating_point()}
        total = weighted if total is None else {k: total[k] + v for k, v in weighted.items()}
        weight_sum += w
    first = weighted_states[0][1]
    merged = {k: (total[k] / weight_sum).to(v.dtype) if k in total else v for k, v in first.items()}
    model.load_state_dict(merged)
    targets = {s: Moments.mix([(w, m[s]) for w, m in parts]) for s in spaces}
    report = repair(model, spec, targets, batches, **kw)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, report
