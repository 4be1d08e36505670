"""Loss barrier along the interpolation path theta(lam) = lam * A + (1 - lam) * B'.

Headline barrier: max_lam [ L(theta(lam)) - (lam L(A) + (1 - lam) L(B)) ].
Paper's barrier:  max_lam L(theta(lam)) - (L(A) + L(B)) / 2.
Every point is evaluated in memory on one loaded model; nothing is written per point.
"""

import json
import logging
from pathlib import Path
from typing import Dict, List, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mergekit_permute.align import AlignSettings

LOG = logging.getLogger(__name__)
Objective = Literal["mlm", "clm", "cls"]
LOSS_NAME = {"mlm": "masked-LM cross-entropy", "clm": "next-token cross-entropy",
             "cls": "classification cross-entropy (MSE for regression)"}
# The ablations of the paper, as settings on top of "nothing aligned".
PRESETS = {
    "vanilla": {},
    "ffn_only": {"ffn": "permute"},
    "head_perm": {"ffn": "permute", "attention": "head_perm"},
    "monotonic": {"ffn": "permute", "attention": "monotonic"},
    "ignore_heads": {"ffn": "permute", "attention": "ignore_heads"},
}
NOTHING = {"ffn": "identity", "attention": "identity", "residual": "identity", "qk": "follow_vo",
           "matching": "activations", "repair": False, "reference": "base", "vo": "permute"}
METHOD_FIELDS = set(NOTHING)


def parse_method(name: str, base: AlignSettings) -> AlignSettings:
    """'head_perm+residual=all' -> settings; 'default' = the tool's defaults."""
    fields: Dict = {}
    for part in name.split("+"):
        part = part.strip()
        if part == "repair":
            fields["repair"] = True
        elif part == "default":
            fields.update(AlignSettings().model_dump(include=METHOD_FIELDS))
        elif part in PRESETS:
            fields.update(NOTHING, **PRESETS[part])
        elif "=" in part and part.split("=")[0] in METHOD_FIELDS:
            key, value = part.split("=", 1)
            for k, v in NOTHING.items():
                fields.setdefault(k, v)
            fields[key] = value
        else:
            raise ValueError(f"unknown method {part!r} in {name!r}; use {sorted(PRESETS)}, "
                             "'default', 'repair', or ffn=/attention=/residual=/qk=/vo=/"
                             "matching=/reference= joined with '+'")
    return base.model_copy(update=AlignSettings(**{**NOTHING, **fields}).model_dump(
        include=METHOD_FIELDS))


def aligns_nothing(s: AlignSettings) -> bool:
    return (s.ffn, s.attention, s.residual) == ("identity",) * 3


def needs_stats(s: AlignSettings) -> bool:
    return s.repair or (s.matching == "activations" and not aligns_nothing(s))


def objective_for(model) -> Objective:
    arch = model.config.architectures[0]
    if arch.endswith(("ForMaskedLM", "ForPreTraining")):
        return "mlm"
    if arch.endswith("ForCausalLM") or arch.endswith("LMHeadModel"):
        return "clm"
    if arch.endswith("ForSequenceClassification"):
        return "cls"
    raise ValueError(f"{arch} has no loss to measure a barrier with; use a *ForMaskedLM, "
                     "*ForCausalLM or *ForSequenceClassification checkpoint")


def eval_batches(tokenizer, texts: Sequence[str], objective: Objective, *, max_length: int,
                 batch_size: int, seed: int = 0, labels: Sequence = (), model=None) -> List[Dict]:
    """Fixed batches: the same masked positions for every lambda and method (masking seed)."""
    from mergekit_permute.calibrate import model_inputs, prepare_tokenizer
    from mergekit_permute.zoo import mask_tokens
    prepare_tokenizer(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = dict(tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                             max_length=max_length, return_tensors="pt"))
        ids, attn = enc["input_ids"], enc["attention_mask"]
        if objective == "mlm":
            special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids)) | (attn == 0)
            enc["input_ids"], enc["labels"] = mask_tokens(ids, special, tokenizer.mask_token_id,
                                                          len(tokenizer), gen)
        elif objective == "clm":
            enc["labels"] = ids.masked_fill(attn == 0, -100)
        else:
            enc["labels"] = torch.tensor(list(labels[i:i + batch_size]))
        batches.append(model_inputs(enc, model))
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
    losses = []
    for lam in tqdm(lambdas, desc=desc, unit="point"):
        mixed = {k: (lam * a + (1 - lam) * state_b[k]) if a.is_floating_point() else a
                 for k, a in state_a.items()}
        model.load_state_dict(mixed)
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


def run_barrier(model_a: str, model_b: str, *, eval_data: str, calibration: str,
                methods: Sequence[str], lambdas: int, settings: AlignSettings,
                eval_samples: int = 256, eval_max_length: int = 128, seed: int = 0,
                device: str = "cpu", use_cache: bool = True, label_field: str = "label") -> Dict:
    from mergekit_permute.align import check_settings, collect_stats, make_alignment
    from mergekit_permute.calibrate import tokenize
    from mergekit_permute.data import load_texts
    from mergekit_permute.models import load_pair
    from mergekit_permute.permute import apply_to_state_dict, identity_transforms
    from mergekit_permute.repair import repair_hook

    parsed = {m: parse_method(m, settings) for m in methods}  # bad names fail before loading
    spec, a, b, tok = load_pair(model_a, model_b, device=device)
    for s in parsed.values():
        check_settings(spec, s)
    objective = objective_for(a)
    labels: Sequence = ()
    if objective == "cls":
        texts, labels = _labelled(eval_data, eval_samples, label_field)
    else:
        texts = load_texts(eval_data, eval_samples)
    batches = eval_batches(tok, texts, objective, max_length=eval_max_length,
                           batch_size=settings.batch_size, seed=seed, labels=labels, model=a)
    stats, calib_batches = None, None
    if any(needs_stats(s) for s in parsed.values()):
        calib = load_texts(calibration, settings.samples)
        stats = collect_stats(spec, a, b, tok, calib, settings, device=device, use_cache=use_cache,
                              qk=any(s.needs_qk_features for s in parsed.values()))
        if any(s.repair for s in parsed.values()):
            calib_batches = tokenize(tok, calib, settings.max_length, settings.batch_size, a)
    state_a = {k: v.detach().clone() for k, v in a.state_dict().items()}
    state_b = {k: v.detach().clone() for k, v in b.state_dict().items()}
    del b
    grid = [float(x) for x in np.linspace(0.0, 1.0, lambdas)]
    result = {"loss": LOSS_NAME[objective], "objective": objective, "eval_data": eval_data,
              "calibration": calibration, "model_a": model_a, "model_b": model_b,
              "lambda_meaning": "theta = lambda * A + (1 - lambda) * aligned B",
              "headline": "barrier", "lambdas": grid, "methods": {}}
    for name, s in parsed.items():
        transforms, report, a_state, aligned_b = identity_transforms(spec), {}, state_a, state_b
        if not aligns_nothing(s):
            alignment = make_alignment(spec, stats, s, (state_a, state_b))
            transforms, report = alignment.transforms, alignment.report
            aligned_b = apply_to_state_dict(spec, state_b, transforms, alignment.fold_b)
            if alignment.fold_a:  # both endpoints in the folded (same-function) form
                a_state = apply_to_state_dict(spec, state_a, identity_transforms(spec),
                                              alignment.fold_a)
        after_mix = None
        if s.repair:
            after_mix = repair_hook(spec, stats, transforms, calib_batches,
                                    special_ids=tok.all_special_ids,
                                    keep_special=s.keep_special_tokens, device=device)
        losses = interpolation_losses(a, a_state, aligned_b, grid, batches, objective, device,
                                      desc=name, after_mix=after_mix)
        a.load_state_dict(state_a)
        result["methods"][name] = _method_result(s, losses, grid, report)
    vanilla = next((m for n, m in result["methods"].items()
                    if aligns_nothing(parse_method(n, settings))), None)
    if vanilla and vanilla["barrier"] > 0:
        for m in result["methods"].values():
            m["removed_vs_vanilla"] = 1 - m["barrier"] / vanilla["barrier"]
    return result


def run_multi(models: Sequence[str], *, eval_data: str, calibration: str, methods: Sequence[str],
              settings: AlignSettings, eval_samples: int = 256, eval_max_length: int = 128,
              seed: int = 0, device: str = "cpu", use_cache: bool = True) -> Dict:
    """N >= 3 models aligned into the first one's basis (to it, or to the running average:
    `reference=`), then the N-average (REPAIRed with `repair`). Reports the merge's loss
    against each parent's and against the vanilla N-average."""
    from mergekit_permute.align import check_settings, collect_stats, make_alignment
    from mergekit_permute.calibrate import tokenize
    from mergekit_permute.data import load_texts
    from mergekit_permute.models import load_pair
    from mergekit_permute.multi import align_to_running_average
    from mergekit_permute.permute import apply_to_state_dict, identity_transforms
    from mergekit_permute.repair import repair_merge

    parsed = {m: parse_method(m, settings) for m in methods}
    ref = models[0]
    spec, a, _, tok = load_pair(ref, models[1], device=device)
    for s in parsed.values():
        check_settings(spec, s)
    objective = objective_for(a)
    if objective == "cls":
        raise ValueError("N-model evaluation supports language-model losses only")
    batches = eval_batches(tok, load_texts(eval_data, eval_samples), objective,
                           max_length=eval_max_length, batch_size=settings.batch_size, seed=seed,
                           model=a)
    calib = load_texts(calibration, settings.samples)
    calib_batches = tokenize(tok, calib, settings.max_length, settings.batch_size, a)
    state_a = {k: v.detach().clone() for k, v in a.state_dict().items()}
    parents, per_model = {ref: evaluate(a, batches, objective, device)}, []
    for path in models[1:]:
        spec_i, _, b, _ = load_pair(ref, path, device=device)
        parents[path] = evaluate(b, batches, objective, device)
        stats = None
        if any(needs_stats(s) and s.reference == "base" for s in parsed.values()):
            stats = collect_stats(spec, a, b, tok, calib, settings, device=device,
                                  use_cache=use_cache,
                                  qk=any(s.needs_qk_features for s in parsed.values()))
        per_model.append(({k: v.detach().clone() for k, v in b.state_dict().items()}, stats))
        del b
    out = {"loss": LOSS_NAME[objective], "eval_data": eval_data, "models": list(models),
           "reference": ref, "parents": parents, "methods": {}}
    for name, s in parsed.items():
        states_b = [state_b for state_b, _ in per_model]
        if s.reference == "average" and not aligns_nothing(s):
            alignments = align_to_running_average(
                spec, a, [state_a, *states_b], [1.0] * len(models), tok, calib, s,
                device=device, use_cache=use_cache)
        else:
            alignments = [make_alignment(spec, stats, s, (state_a, state_b))
                          for state_b, stats in per_model]
        aligned = [apply_to_state_dict(spec, state_a, identity_transforms(spec),
                                       alignments[0].fold_a)]
        aligned += [apply_to_state_dict(spec, state_b, al.transforms, al.fold_b)
                    for state_b, al in zip(states_b, alignments)]
        if s.repair:
            merged, _ = repair_merge(a, spec, [(1.0, st) for st in aligned], calib_batches,
                                     special_ids=tok.all_special_ids,
                                     keep_special=s.keep_special_tokens, device=device)
        else:
            merged = {k: (sum(st[k].double() for st in aligned) / len(aligned)).to(v.dtype)
                      if v.is_floating_point() else v for k, v in aligned[0].items()}
        a.load_state_dict(merged)
        out["methods"][name] = {"settings": s.model_dump(include=METHOD_FIELDS),
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


def _method_result(s: AlignSettings, losses, grid, report) -> Dict:
    from mergekit_permute.align import summarize
    return {"settings": s.model_dump(include=METHOD_FIELDS),
            "function_preserving": s.function_preserving, "losses": losses,
            **barrier_values(grid, losses), "correlation": summarize(report)}


def _labelled(path: str, samples: int, field: str):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or "text" not in rows[0] or field not in rows[0]:
        raise ValueError(f"{path}: classification evaluation needs a .jsonl with 'text' and "
                         f"'{field}' fields")
    rows = rows[:samples]
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
