"""`barrier`: the loss along theta(lam) = lam * A + (1 - lam) * B' for several alignment
methods of one pair (or the N-model merge's loss), its table and its plot. Every point is
evaluated in memory on one loaded model; the methods share one set of statistics."""

import json
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from mergekit_permute.align.multi import aligned_states
from mergekit_permute.align.pipeline import align_from
from mergekit_permute.align.repair import measure, repair_blend
from mergekit_permute.calibration.blocks import BlockModel
from mergekit_permute.calibration.collect import Workload, prepare_calibration, statistics
from mergekit_permute.card import barrier_table
from mergekit_permute.core.alignment import summarize
from mergekit_permute.evaluate import LOSS_NAME, EvalSet, Evaluation, barrier_values, evaluate
from mergekit_permute.evaluate import interpolation_losses
from mergekit_permute.io.checkpoints import StateSource, average_states
from mergekit_permute.io.models import load_model, open_pair, scan_pair
from mergekit_permute.settings import AlignSettings, RunSettings, check_settings

Methods = Union[Sequence[str], Mapping[str, AlignSettings]]


def _parse(methods: Methods, settings: AlignSettings) -> Dict[str, AlignSettings]:
    """Method names (`default+repair`, ...) or named settings; bad names fail before loading."""
    return dict(methods) if isinstance(methods, Mapping) else \
        {m: settings.with_method(m) for m in methods}


# How masked-LM evaluation masks are drawn (io.batches.mask_rows), recorded with the losses:
# results without it drew them per padded batch, so they depended on the batch size.
MLM_MASKS = "per passage: seeded by the seed and the passage's index"


def lambda_grid(points: int) -> List[float]:
    """`points` evenly spaced lambdas in [0, 1], with 0.5 among them (the midpoint loss is read
    there): an even count gains it as one more point."""
    grid = [float(x) for x in np.linspace(0.0, 1.0, points)]
    mid = min(range(len(grid)), key=lambda i: abs(grid[i] - 0.5))
    if abs(grid[mid] - 0.5) < 1e-9:
        grid[mid] = 0.5
        return grid
    return sorted(grid + [0.5])


def _loaded(path: str, device: str, allow_unsafe_pickle: bool = False):
    model = load_model(path, device, allow_unsafe_pickle=allow_unsafe_pickle)
    return model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_barrier(model_a: str, model_b: str, *, methods: Methods, settings: AlignSettings,
                evaluation: Evaluation, calibration: str, run: RunSettings = RunSettings(),
                keep: Optional[Dict] = None) -> Dict:
    """Every method's loss along the path (`settings`: the calibration fields all share);
    `keep` receives each method's Alignment by name."""
    parsed = _parse(methods, settings)
    pair = open_pair(model_a, model_b, run.allow_unsafe_pickle)
    for s in parsed.values():
        check_settings(pair.spec, s)
    fingerprints = scan_pair(pair)
    evalset = EvalSet.prepare(pair, evaluation, settings.batch_size)   # before any model loads
    calib = prepare_calibration(pair, calibration, settings) \
        if any(s.needs_statistics for s in parsed.values()) else None   # (so is this)
    device = run.device
    model, state_a = _loaded(model_a, device, run.allow_unsafe_pickle)
    state_b = _loaded(model_b, device, run.allow_unsafe_pickle)[1]
    work = Workload(pair, calibration, device=device, dtype=run.dtype, workers=run.workers,
                    cache=run.cache,
                    sources=(StateSource(state_a, pair.spec), StateSource(state_b, pair.spec)),
                    fingerprints=fingerprints)
    started = time.perf_counter()
    if calib is not None:
        work.shared = statistics(work, calib, settings,
                                 qk=any(s.needs_qk_features for s in parsed.values()))
    grid = lambda_grid(evaluation.lambdas)
    result = {"loss": LOSS_NAME[evalset.objective], "objective": evalset.objective,
              "eval_data": evaluation.data, "eval_max_length": evalset.max_length,
              "calibration_seconds": round(time.perf_counter() - started, 2),
              "calibration": calibration, "model_a": model_a,
              "model_b": model_b, "lambda_meaning": "theta = lambda * A + (1 - lambda) * aligned B",
              "headline": "barrier", "lambdas": grid, "methods": {},
              **({"mlm_masks": MLM_MASKS} if evalset.objective == "mlm" else {})}
    for name, s in parsed.items():
        started = time.perf_counter()
        alignment = align_from(work, s)
        seconds = time.perf_counter() - started
        if keep is not None:
            keep[name] = alignment
        aligned_b = alignment.state_dict(state_b)   # in A's norm gauge: A stays as is
        after_mix = _repair_hook(pair, calib, state_a, aligned_b, device) if s.repair else None
        losses = interpolation_losses(model, state_a, aligned_b, grid, evalset.batches,
                                      evalset.objective, device, desc=name, after_mix=after_mix)
        result["methods"][name] = {
            "settings": s.method_fields(), "function_preserving": s.function_preserving,
            "losses": losses, **barrier_values(grid, losses),
            "correlation": summarize(alignment.report),
            **({"learned": alignment.info["learned"]} if "learned" in alignment.info else {}),
            "alignment_seconds": round(seconds, 2)}
    vanilla = next((m for n, m in result["methods"].items() if parsed[n].aligns_nothing), None)
    if vanilla and vanilla["barrier"] > 0:
        for m in result["methods"].values():
            m["removed_vs_vanilla"] = 1 - m["barrier"] / vanilla["barrier"]
    return result


def _repair_hook(pair, calib, state_a, aligned_b, device: str):
    """`after_mix(model, lam)`: each interior mix REPAIRed toward lam * moments(A) +
    (1 - lam) * moments(aligned B), the endpoints measured once."""
    spec = pair.spec
    ends = [StateSource(state_a, spec), StateSource(aligned_b, spec)]
    moments = [measure(BlockModel.skeleton(spec, pair.config, s, device), spec, calib.batches,
                       calib.masks) for s in ends]

    def after_mix(model, lam: float) -> None:
        corrected, _ = repair_blend(spec, pair.config, [(lam, ends[0]), (1 - lam, ends[1])],
                                    calib, device, moments)
        model.load_state_dict(corrected, strict=False)
    return after_mix


def run_multi(models: Sequence[str], *, methods: Methods, settings: AlignSettings,
              evaluation: Evaluation, calibration: str, run: RunSettings = RunSettings()
              ) -> Dict:
    """N >= 3 models aligned into the first one's basis (to it, or to the running average:
    `reference=`), then the N-average (REPAIRed with `repair`). Reports the merge's loss
    against each parent's and against the vanilla N-average."""
    parsed = _parse(methods, settings)
    ref, device, allow_unsafe_pickle = models[0], run.device, run.allow_unsafe_pickle
    pair = open_pair(ref, models[1], allow_unsafe_pickle)
    for other in models[2:]:
        open_pair(ref, other, allow_unsafe_pickle)  # every model checked before any work
    for s in parsed.values():
        check_settings(pair.spec, s)
    evalset = EvalSet.prepare(pair, evaluation, settings.batch_size)
    if evalset.objective == "cls":
        raise ValueError("N-model evaluation supports language-model losses only")
    for s in parsed.values():   # the calibration text checked before any model loads
        if s.needs_statistics or s.repair:
            prepare_calibration(pair, calibration, s)
    a, state_a = _loaded(ref, device, allow_unsafe_pickle)
    batches, objective = evalset.batches, evalset.objective
    parents = {ref: evaluate(a, batches, objective, device)}
    for path in models[1:]:
        parents[path] = evaluate(_loaded(path, device, allow_unsafe_pickle)[0], batches,
                                 objective, device)
    out = {"loss": LOSS_NAME[objective], "eval_data": evaluation.data, "models": list(models),
           "reference": ref, "parents": parents, "methods": {}}
    for name, s in parsed.items():
        states = aligned_states(list(models), [1.0] * len(models), calibration, s,
                                allow_unsafe_pickle, device=device, dtype=run.dtype,
                                cache=run.cache, workers=run.workers)
        merged = average_states([(1.0, st) for st in states])
        if s.repair:
            calib = prepare_calibration(pair, calibration, s)
            corrected, _ = repair_blend(pair.spec, pair.config,
                                        [(1.0, StateSource(st, pair.spec)) for st in states],
                                        calib, device)
            merged.update(corrected)
        a.load_state_dict(merged)
        out["methods"][name] = {"settings": s.method_fields(),
                                "merge_loss": evaluate(a, batches, objective, device)}
        a.load_state_dict(state_a)
    mean_parent = sum(parents.values()) / len(parents)
    for m in out["methods"].values():
        m["minus_mean_parent"] = m["merge_loss"] - mean_parent
        m["minus_best_parent"] = m["merge_loss"] - min(parents.values())
    return out


def multi_table(result: Dict) -> str:
    parents = result["parents"]
    lines = [f"{len(parents)}-model merge ({result['loss']} on `{result['eval_data']}`; all "
             f"aligned to `{result['reference']}`). Parents: "
             + ", ".join(f"{v:.4f}" for v in parents.values()), "",
             "| method | loss of the N-model merge | minus mean parent | minus best parent |",
             "|---|---|---|---|"]
    for name, m in result["methods"].items():
        lines.append(f"| {name} | {m['merge_loss']:.4f} | {m['minus_mean_parent']:+.4f} | "
                     f"{m['minus_best_parent']:+.4f} |")
    return "\n".join(lines)


def write_report(result: Dict, out: Path) -> None:
    """barrier.json, barrier.md, barrier.png (and learning.png with a learned method) into
    `out` (an existing directory)."""
    (out / "barrier.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "barrier.md").write_text(barrier_table(result) + "\n")
    plot(result, out / "barrier.png")
    plot_learning(result, out / "learning.png")


def plot(result: Dict, path: Path) -> None:
    from matplotlib.figure import Figure  # (its import writes a font cache under $HOME)
    fig = Figure(figsize=(6.4, 4.2), dpi=120)   # no pyplot: the user's backend stays as it is
    ax = fig.subplots()
    lam = result["lambdas"]
    for name, m in result["methods"].items():
        line, = ax.plot(lam, m["losses"], marker=".", label=f"{name} (barrier {m['barrier']:.3f})")
        ax.plot([0, 1], [m["loss_b"], m["loss_a"]], ls=":", color=line.get_color(), lw=1)
    first = next(iter(result["methods"].values()))
    ax.scatter([1, 0], [first["loss_a"], first["loss_b"]], color="black", zorder=5,
               label="endpoints (A at 1, B at 0)")
    ax.set_xlabel("lambda (weight of model A)")
    ax.set_ylabel(result["loss"])
    ax.set_title("Loss along the interpolation path")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)


def plot_learning(result: Dict, path: Path) -> None:
    """The held-out merged loss of every `matching: learned` method at each check, its
    back-offs marked (nothing is written without a learned method)."""
    runs = {n: m["learned"] for n, m in result["methods"].items()
            if m.get("learned", {}).get("held_out_checks")}
    if not runs:
        return
    from matplotlib.figure import Figure  # (as plot: matplotlib only when drawing)
    fig = Figure(figsize=(6.4, 4.2), dpi=120)
    ax = fig.subplots()
    for name, learned in runs.items():
        steps, losses = zip(*learned["held_out_checks"])
        line, = ax.plot(steps, losses, marker=".", label=f"{name} (best at step "
                                                          f"{learned['best_step']})")
        for step, _ in learned.get("backoffs", []):
            ax.axvline(step, ls="--", lw=1, color=line.get_color())
    ax.set_xlabel("step (dashed: learning rate halved, back to the best maps)")
    ax.set_ylabel("held-out merged loss")
    ax.set_title("Learned alignment: held-out checks")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
