"""REPAIR (Jordan et al. 2022, adapted): after averaging, each FF neuron of the merge is
rescaled so its statistics on the calibration text match the mix of the parents' (averaging
imperfectly correlated neurons shrinks their variance). The correction is folded into the down
projection's columns (and bias: the mean), layer by layer, one block in memory.
"""

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_permute.calibration.blocks import BlockModel
from mergekit_permute.io.checkpoints import BlendSource
from mergekit_permute.calibration.calibrate import capture
from mergekit_permute.spec.base import PermutationSpec

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Moments:
    """Per-feature first and second moments (float64) over calibration tokens."""

    mean: torch.Tensor  # [n]
    sq: torch.Tensor    # [n] mean of squares

    @property
    def std(self) -> torch.Tensor:
        return (self.sq - self.mean**2).clamp_min(0).sqrt()

    @staticmethod
    def mix(parts: Sequence[Tuple[float, "Moments"]]) -> "Moments":
        """REPAIR's target: weighted mean of the parents' means and of their stds (the second
        moment is rebuilt from the mixed std so `std` returns exactly that mix)."""
        total = sum(w for w, _ in parts)
        mean = sum(w * m.mean for w, m in parts) / total
        std = sum(w * m.std for w, m in parts) / total
        return Moments(mean, std**2 + mean**2)


@dataclass(frozen=True)
class Reader:
    """The weight that reads a space (its columns), the axis bound to the space, its bias."""

    weight: str
    axis: int
    bias: Optional[str]


def reader_of(spec: PermutationSpec, space: str) -> Reader:
    rule, axis = spec.reader(space)
    bias = rule.name[: -len(".weight")] + ".bias"
    return Reader(rule.name, axis, bias if bias in spec.weight_map() else None)


def repairable_spaces(spec: PermutationSpec) -> List[str]:
    return [s.name for s in spec.spaces if s.kind == "ffn"]


def _moments(sums) -> Moments:
    n, total, sq = sums
    return Moments(total / n, sq / n)


@torch.no_grad()
def _walk(model: BlockModel, spec: PermutationSpec, batches, masks, per_layer, desc: str):
    """Run `model` block by block; `per_layer(layer, run_block)` may measure and correct the
    loaded block; `run_block(capture_points)` runs it over every batch and returns the
    moments of the captured points, without advancing the hidden states."""
    model.load(None)
    caught = [model.catch(b) for b in batches]
    model.free(None)
    hidden = [h for h, _ in caught]
    flat_masks = [m.reshape(-1) for m in masks]
    for layer in tqdm(range(spec.num_layers), desc=desc, unit="layer"):
        model.load(layer)

        def run_block(points) -> Dict[str, Moments]:
            sums: Dict[str, list] = {}
            with capture(model.model, points) as cap:
                for j, mask in enumerate(flat_masks):
                    model.run(layer, hidden[j], caught[j][1][layer])
                    for p in points:
                        feats = cap[f"{p.module}:{p.where}"]
                        feats = feats.reshape(mask.shape[0], -1)[mask.to(feats.device)].double()
                        s = sums.setdefault(p.module, [0, 0.0, 0.0])
                        s[0] += feats.shape[0]
                        s[1] = s[1] + feats.sum(0)
                        s[2] = s[2] + (feats * feats).sum(0)
            return {k: _moments(v) for k, v in sums.items()}

        per_layer(layer, run_block)
        for j in range(len(hidden)):
            hidden[j] = model.run(layer, hidden[j], caught[j][1][layer])
        model.free(layer)


def measure(model: BlockModel, spec: PermutationSpec, batches, masks,
            desc: str = "measuring") -> Dict[str, Moments]:
    """FF moments of every layer of `model` on the batches."""
    out: Dict[str, Moments] = {}
    spaces = {s: spec.space(s) for s in repairable_spaces(spec)}

    def per_layer(layer, run_block):
        here = {name: s.features[0] for name, s in spaces.items() if s.layer == layer}
        got = run_block(list(here.values()))
        out.update({name: got[p.module] for name, p in here.items()})
    _walk(model, spec, batches, masks, per_layer, desc)
    return out


def repair(model: BlockModel, spec: PermutationSpec, targets: Dict[str, Moments], batches,
           masks, desc: str = "repair") -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """Correct `model` (holding the merged weights) layer by layer. Returns the corrected
    tensors (CPU) and, per space, the mean |log(std_merged / std_target)| before correcting."""
    corrected: Dict[str, torch.Tensor] = {}
    report: Dict[str, float] = {}
    params = dict(model.model.named_parameters())

    def per_layer(layer, run_block):
        for name in [s for s in targets if spec.space(s).layer == layer]:
            point = spec.space(name).features[0]
            merged = run_block([point])[point.module]
            target = targets[name]
            reader = reader_of(spec, name)
            weight = params_now(reader.weight)
            alive = merged.std > 1e-12  # a dead neuron stays as it is
            if reader.bias is not None:
                scale = torch.where(alive, target.std / merged.std.clamp_min(1e-12), 1.0)
                shift = torch.where(alive, target.mean - scale * merged.mean, 0.0)   # [n]
                bias = params_now(reader.bias)
                # bias += W @ shift, contracting the space's axis of W (before W is rescaled)
                bias.add_(torch.tensordot(weight.double(), shift.to(weight.device),
                                          dims=([reader.axis], [0])).to(bias.dtype))
                corrected[reader.bias] = bias.detach().to("cpu").clone()
            else:
                scale = torch.where(alive, (target.sq / merged.sq.clamp_min(1e-24)).sqrt(), 1.0)
            shape = [1] * weight.ndim
            shape[reader.axis] = -1
            weight.mul_(scale.to(weight.device, weight.dtype).reshape(shape))
            corrected[reader.weight] = weight.detach().to("cpu").clone()
            ratio = merged.std.clamp_min(1e-12) / target.std.clamp_min(1e-12)
            report[name] = round(float(ratio.log().abs().mean()), 6)

    def params_now(name: str) -> torch.Tensor:
        # a skeleton's parameters are replaced on every load: look them up afresh
        return dict(model.model.named_parameters()).get(name, params.get(name))

    _walk(model, spec, batches, masks, per_layer, desc)
    return corrected, report


def repair_blend(spec: PermutationSpec, config, parents: Sequence[Tuple[float, object]],
                 calib, device: str = "cpu", moments: Optional[Sequence[Dict[str, Moments]]] = None
                 ) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
    """The weighted average of `parents` ((weight, tensor source) in one basis) REPAIRed toward
    the same mix of the parents' FF moments on the calibration batches (`moments`: measured
    before, one per parent). Returns the corrected tensors and the report."""
    def runner(source) -> BlockModel:
        return BlockModel.skeleton(spec, config, source, device)
    if moments is None:
        moments = [measure(runner(s), spec, calib.batches, calib.masks) for _, s in parents]
    targets = {k: Moments.mix([(w, m[k]) for (w, _), m in zip(parents, moments)])
               for k in moments[0]}
    return repair(runner(BlendSource(parents)), spec, targets, calib.batches, calib.masks)
