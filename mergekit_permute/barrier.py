"""Loss barrier along the interpolation path theta(lam) = lam * A + (1 - lam) * B'.

Headline barrier: max_lam [ L(theta(lam)) - (lam L(A) + (1 - lam) L(B)) ].
Paper's barrier:  max_lam L(theta(lam)) - (L(A) + L(B)) / 2.
Every point is evaluated in memory on one loaded model; nothing is written per point.
"""

import json
import logging
import time
from pathlib import Path
from typing import Dict, List, Literal, Mapping, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mergekit_permute.data import load_texts
from mergekit_permute.settings import AlignSettings
from mergekit_permute.stats_cache import CacheMode

LOG = logging.getLogger(__name__)
Objective = Literal["mlm", "clm", "cls"]
LOSS_NAME = {"mlm": "masked-LM cross-entropy", "clm": "next-token cross-entropy",
             "cls": "classification cross-entropy (MSE for regression)"}


def objective_for(model) -> Objective:
    """The loss of an architecture (a model or its architecture name)."""
    arch = model if isinstance(model, str) else model.config.architectures[0]
    if arch.endswith(("ForMaskedLM", "ForPreTraining")):
        return "mlm"
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "clm"
    if arch.endswith("ForSequenceClassification"):
        return "cls"
    raise ValueError(f"{arch} has no loss to measure a barrier with; use a *ForMaskedLM, "
                     "*ForCausalLM or *ForSequenceClassification checkpoint")


def eval_batches(tokenizer, texts: Sequence[str], objective: Objective, *, max_length: int,
                 batch_size: int, seed: int = 0, labels: Sequence = (),
                 architecture: Optional[str] = None) -> List[Dict]:
    """Fixed batches: the same masked positions for every lambda and method (masking seed)."""
    from mergekit_permute.calibrate import model_inputs, prepare_tokenizer
    from mergekit_permute.data import clip_texts
    from mergekit_permute.zoo import mask_tokens
    prepare_tokenizer(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = dict(tokenizer(clip_texts(texts[i:i + batch_size], max_length), padding=True,
                             truncation=True, max_length=max_length, return_tensors="pt"))
        ids, attn = enc["input_ids"], enc["attention_mask"]
        if objective == "mlm":
            special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (attn == 0)
            enc["input_ids"], enc["labels"] = mask_tokens(ids, special, tokenizer.mask_token_id,
                                                          len(tokenizer), gen)
        elif objective == "clm":
            enc["labels"] = ids.masked_fill(attn == 0, -100)
        else:
            enc["labels"] = torch.tensor(list(labels[i:i + batch_size]))
        batches.append(model_inputs(enc, architecture))
    return batches


@torch.no_grad()
def evaluate(model, batches: List[Dict], objective: Objective, device="cpu") -> float:
    """Token-weighted (example-weighted for classification) mean loss over all batches."""
    total, count = 0.0, 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch.pop("labels")
        out = model(**batch)
        logits = out.logits if hasattr(out, "logits") else out.prediction_logits
        if objective == "clm":
            logits, labels = logits[:, :-1], labels[:, 1:]
        if labels.numel() == 0:
            continue
        if objective == "cls" and logits.shape[-1] == 1:
            total += float(torch.nn.functional.mse_loss(logits.squeeze(-1), labels.float(),
                                                        reduction="sum"))
            count += labels.numel()
            continue
        flat = labels.reshape(-1)
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(flat.shape[0], -1).double(), flat, ignore_index=-100, reduction="sum"))
        count += int((flat != -100).sum())
    return total / max(count, 1)


def interpolation_losses(model, state_a, state_b, lambdas: Sequence[float], batches, objective,
                         device="cpu", desc="sweep", after_mix=None) -> List[float]:
    """`after_mix(model, lam)` may correct each interior mix in place (REPAIR)."""
    from mergekit_permute.checkpoints import average_states
    losses = []
    for lam in tqdm(lambdas, desc=desc, unit="point"):
        model.load_state_dict(average_states([(lam, state_a), (1 - lam, state_b)]))
        if after_mix is not None and 0.0 < lam < 1.0:
            after_mix(model, lam)
        losses.append(evaluate(model, batches, objective, device))
    model.load_state_dict(state_a)
    return losses


def barrier_values(lambdas: Sequence[float], losses: Sequence[float]) -> Dict[str, float]:
    lam, loss = np.asarray(lambdas, dtype=float), np.asarray(losses, dtype=float)
    loss_a, loss_b = float(loss[np.argmax(lam)]), float(loss[np.argmin(lam)])
    excess = loss - (lam * loss_a + (1 - lam) * loss_b)
    mid = int(np.argmin(np.abs(lam - 0.5)))
    return {"barrier": float(excess.max()), "barrier_lambda": float(lam[excess.argmax()]),
            "barrier_paper": float(loss.max() - (loss_a + loss_b) / 2),
            "midpoint_loss": float(loss[mid]), "loss_a": loss_a, "loss_b": loss_b}


def _alignment(spec, s: AlignSettings, stats, gains, states, workers):
    from mergekit_permute.alignment import Alignment
    from mergekit_permute.settings import residual_policy
    from mergekit_permute.solve import compute_alignment
    from mergekit_permute.weight_match import weight_match_alignment
    if s.aligns_nothing:
        return Alignment.identity(spec, s)
    if s.matching == "weights":
        return weight_match_alignment(spec, states[0], states[1], s)
    folded = residual_policy(s, spec) == "orthogonal"
    return compute_alignment(spec, stats, s, gains if folded else ({}, {}), workers)


class _Sweep:
    """What every method of one barrier run shares: the pair, both models in memory (the
    sweep evaluates whole models), evaluation and calibration batches, statistics."""

    def __init__(self, model_a: str, model_b: str, *, eval_data: str, calibration: str,
                 methods: Dict[str, AlignSettings], settings: AlignSettings, eval_samples: int,
                 eval_max_length: Optional[int], seed: int, device: str, cache: CacheMode, workers,
                 label_field: str = "label", pair=None):
        from mergekit_permute.checkpoints import StateSource
        from mergekit_permute.models import load_model, open_pair, scan_pair
        from mergekit_permute.pipeline import pair_gains, prepare_calibration, statistics
        from mergekit_permute.settings import check_settings
        self.pair = pair or open_pair(model_a, model_b)
        self.spec, self.device, self.workers = self.pair.spec, device, workers
        for s in methods.values():
            check_settings(self.spec, s)
        fingerprints = scan_pair(self.pair)
        tok, arch = self.pair.tokenizer, self.spec.architecture
        self.objective = objective_for(self.pair.config.architectures[0])
        labels: Sequence = ()
        if self.objective == "cls":
            texts, labels = _labelled(eval_data, eval_samples, label_field)
        else:
            texts = load_texts(eval_data, eval_samples)
        from mergekit_permute.preflight import check_max_length, check_scorable, eval_length
        self.eval_max_length = eval_max_length = eval_length(eval_max_length, self.pair.config)
        check_max_length(eval_max_length, [("model A", self.pair.config)], "--eval-max-length")
        self.batches = eval_batches(tok, texts, self.objective, max_length=eval_max_length,
                                    batch_size=settings.batch_size, seed=seed, labels=labels,
                                    architecture=arch)
        check_scorable(self.batches, self.objective)   # data checked before any model loads
        self.a = load_model(model_a, device)
        self.state_a = {k: v.detach().clone() for k, v in self.a.state_dict().items()}
        self.state_b = {k: v.detach().clone() for k, v in
                        load_model(model_b, device).state_dict().items()}
        self.sources = (StateSource(self.state_a, self.spec), StateSource(self.state_b, self.spec))
        self.stats, self.calib = None, None
        started = time.perf_counter()
        if any(s.needs_statistics for s in methods.values()):
            self.calib = prepare_calibration(self.pair, calibration, settings)
            self.stats = statistics(self.pair, self.calib, settings, device=device,
                                    qk=any(s.needs_qk_features for s in methods.values()),
                                    cache=cache, sources=self.sources,
                                    fingerprints=fingerprints)
        self.gains = pair_gains(self.pair, self.sources) if self.spec.norm_folds else ({}, {})
        self.calibration_seconds = round(time.perf_counter() - started, 2)   # shared by methods

    def alignment(self, s: AlignSettings):
        if s.matching == "learned":
            from mergekit_permute.pipeline import learn_alignment
            start = _alignment(self.spec, s.model_copy(update={"matching": "activations"}),
                               self.stats, self.gains, (self.state_a, self.state_b), self.workers)
            learned = learn_alignment(self.pair, start, self.calib.source, s, self.device,
                                      self.sources)
            learned.settings = s
            return learned
        return _alignment(self.spec, s, self.stats, self.gains, (self.state_a, self.state_b),
                          self.workers)

    def repair_hook(self, aligned_b: Dict[str, torch.Tensor]):
        """`after_mix(model, lam)`: REPAIR each interior mix towards lam * moments(A) +
        (1 - lam) * moments(aligned B)."""
        from mergekit_permute.blocks import BlockModel
        from mergekit_permute.checkpoints import StateSource
        from mergekit_permute.repair import Moments, measure, repair
        masks = self.calib.masks
        ends = [measure(BlockModel.skeleton(self.spec, self.pair.config, StateSource(st, self.spec),
                                            self.device), self.spec, self.calib.batches, masks)
                for st in (self.state_a, aligned_b)]

        def after_mix(model, lam: float) -> None:
            targets = {s: Moments.mix([(lam, ends[0][s]), (1 - lam, ends[1][s])]) for s in ends[0]}
            repair(BlockModel(self.spec, model, device=self.device), self.spec, targets,
                   self.calib.batches, masks, desc=f"repair {lam:.2f}")
        return after_mix


def run_barrier(model_a: str, model_b: str, *, eval_data: str, calibration: str,
                methods: Sequence[str], lambdas: int, settings: AlignSettings,
                eval_samples: int = 256, eval_max_length: Optional[int] = None, seed: int = 0,
                device: str = "cpu", cache: CacheMode = "use", label_field: str = "label",
                workers=1) -> Dict:
    # bad names fail before loading; a mapping gives named settings directly
    parsed = dict(methods) if isinstance(methods, Mapping) else \
        {m: settings.with_method(m) for m in methods}
    sweep = _Sweep(model_a, model_b, eval_data=eval_data, calibration=calibration,
                   methods=parsed, settings=settings, eval_samples=eval_samples,
                   eval_max_length=eval_max_length, seed=seed, device=device,
                   cache=cache, workers=workers, label_field=label_field)
    grid = [float(x) for x in np.linspace(0.0, 1.0, lambdas)]
    result = {"loss": LOSS_NAME[sweep.objective], "objective": sweep.objective,
              "eval_data": eval_data, "eval_max_length": sweep.eval_max_length,
              "calibration_seconds": sweep.calibration_seconds,
              "calibration": calibration, "model_a": model_a,
              "model_b": model_b, "lambda_meaning": "theta = lambda * A + (1 - lambda) * aligned B",
              "headline": "barrier", "lambdas": grid, "methods": {}}
    for name, s in parsed.items():
        started = time.perf_counter()
        alignment = sweep.alignment(s)
        seconds = time.perf_counter() - started
        aligned_b = alignment.state_dict(sweep.state_b)   # in A's norm gauge: A stays as is
        after_mix = sweep.repair_hook(aligned_b) if s.repair else None
        losses = interpolation_losses(sweep.a, sweep.state_a, aligned_b, grid, sweep.batches,
                                      sweep.objective, device, desc=name, after_mix=after_mix)
        result["methods"][name] = _method_result(s, losses, grid, alignment.report)
        if "learned" in alignment.info:
            result["methods"][name]["learned"] = alignment.info["learned"]
        result["methods"][name]["alignment_seconds"] = round(seconds, 2)
    vanilla = next((m for n, m in result["methods"].items() if parsed[n].aligns_nothing), None)
    if vanilla and vanilla["barrier"] > 0:
        for m in result["methods"].values():
            m["removed_vs_vanilla"] = 1 - m["barrier"] / vanilla["barrier"]
    return result


def run_multi(models: Sequence[str], *, eval_data: str, calibration: str, methods: Sequence[str],
              settings: AlignSettings, eval_samples: int = 256,
              eval_max_length: Optional[int] = None,
              seed: int = 0, device: str = "cpu", cache: CacheMode = "use", workers=1) -> Dict:
    """N >= 3 models aligned into the first one's basis (to it, or to the running average:
    `reference=`), then the N-average (REPAIRed with `repair`). Reports the merge's loss
    against each parent's and against the vanilla N-average."""
    from mergekit_permute.checkpoints import average_states
    from mergekit_permute.multi import aligned_states
    from mergekit_permute.models import load_model, open_pair

    parsed = {m: settings.with_method(m) for m in methods}
    ref = models[0]
    pair = open_pair(ref, models[1])
    for other in models[2:]:
        open_pair(ref, other)  # every model checked before any work
    for s in parsed.values():
        from mergekit_permute.settings import check_settings
        check_settings(pair.spec, s)
    objective = objective_for(pair.config.architectures[0])
    if objective == "cls":
        raise ValueError("N-model evaluation supports language-model losses only")
    from mergekit_permute.preflight import check_max_length, check_scorable, eval_length
    eval_max_length = eval_length(eval_max_length, pair.config)
    check_max_length(eval_max_length, [("model A", pair.config)], "--eval-max-length")
    batches = eval_batches(pair.tokenizer, load_texts(eval_data, eval_samples), objective,
                           max_length=eval_max_length, batch_size=settings.batch_size, seed=seed,
                           architecture=pair.spec.architecture)
    check_scorable(batches, objective)
    a = load_model(ref, device)
    state_a = {k: v.detach().clone() for k, v in a.state_dict().items()}
    parents = {ref: evaluate(a, batches, objective, device)}
    for path in models[1:]:
        parents[path] = evaluate(load_model(path, device), batches, objective, device)
    out = {"loss": LOSS_NAME[objective], "eval_data": eval_data, "models": list(models),
           "reference": ref, "parents": parents, "methods": {}}
    for name, s in parsed.items():
        states = aligned_states(list(models), [1.0] * len(models), calibration, s,
                                device=device, cache=cache, workers=workers)
        if s.repair:
            states = [_repaired(pair, states, calibration, s, device)]
        merged = average_states([(1.0, st) for st in states])
        a.load_state_dict(merged)
        out["methods"][name] = {"settings": s.method_fields(),
                                "merge_loss": evaluate(a, batches, objective, device)}
        a.load_state_dict(state_a)
    mean_parent = sum(parents.values()) / len(parents)
    for m in out["methods"].values():
        m["minus_mean_parent"] = m["merge_loss"] - mean_parent
        m["minus_best_parent"] = m["merge_loss"] - min(parents.values())
    return out


def _repaired(pair, states, calibration: str, s: AlignSettings, device: str):
    """The N-average REPAIRed towards the mix of every parent's FF moments."""
    from mergekit_permute.blocks import BlockModel
    from mergekit_permute.checkpoints import StateSource, average_states
    from mergekit_permute.pipeline import prepare_calibration
    from mergekit_permute.repair import Moments, measure, repair
    calib = prepare_calibration(pair, calibration, s)
    spec = pair.spec

    def runner(state):
        return BlockModel.skeleton(spec, pair.config, StateSource(state, spec), device)
    moments = [measure(runner(st), spec, calib.batches, calib.masks) for st in states]
    targets = {k: Moments.mix([(1.0, m[k]) for m in moments]) for k in moments[0]}
    merged = average_states([(1.0, st) for st in states])
    corrected, _ = repair(runner(merged), spec, targets, calib.batches, calib.masks)
    return {**merged, **corrected}


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


def _method_result(s: AlignSettings, losses, grid, report) -> Dict:
    from mergekit_permute.alignment import summarize
    return {"settings": s.method_fields(),
            "function_preserving": s.function_preserving, "losses": losses,
            **barrier_values(grid, losses), "correlation": summarize(report)}


def _labelled(path: str, samples: int, field: str):
    from mergekit_permute.data import DataError
    texts = load_texts(path, samples)    # checks the file, every row and its text
    rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()][:len(texts)]
    for i, row in enumerate(rows):
        if not isinstance(row.get(field), (int, float)) or isinstance(row.get(field), bool):
            raise DataError(f"{path}: row {i + 1}: classification evaluation needs a numeric "
                            f"'{field}' beside 'text'")
    return [r["text"] for r in rows], [r[field] for r in rows]


def write_report(result: Dict, out: Path) -> None:
    """barrier.json, barrier.md and barrier.png into `out` (an existing directory)."""
    from mergekit_permute.card import barrier_table
    (out / "barrier.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "barrier.md").write_text(barrier_table(result) + "\n")
    plot(result, out / "barrier.png")


def plot(result: Dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
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
    plt.close(fig)
