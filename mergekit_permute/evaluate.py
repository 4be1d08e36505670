"""Losses of whole models and of the interpolation path between two: what the barrier sweep
reports and what learned alignment minimises.

Headline barrier: max_lam [ L(theta(lam)) - (lam L(A) + (1 - lam) L(B)) ].
Paper's barrier:  max_lam L(theta(lam)) - (L(A) + L(B)) / 2.
"""

import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from mergekit_permute.io.batches import Objective, tokenize
from mergekit_permute.io.checkpoints import average_states
from mergekit_permute.io.data import DataError, chars_for, load_texts
from mergekit_permute.io.preflight import check_max_length, check_scorable, eval_length

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


@dataclass(frozen=True)
class Evaluation:
    """What a barrier is measured on: the text, how much of it, the points of lambda."""

    data: str
    samples: int = 256
    max_length: Optional[int] = None     # default: 128, or the model's positions if fewer
    seed: int = 0                        # the masking seed (MLM)
    label_field: str = "label"           # classification: the label beside each text
    lambdas: int = 21


@dataclass
class EvalSet:
    """Fixed loss batches of one text for one pair: the same masked positions for every lambda
    and method."""

    objective: Objective
    batches: List[Dict[str, torch.Tensor]]
    max_length: int

    @staticmethod
    def prepare(pair, evaluation: Evaluation, batch_size: int) -> "EvalSet":
        """Checked before any model loads: length against the positions, scorable tokens."""
        e = evaluation
        objective = objective_for(pair.config.architectures[0])
        length = eval_length(e.max_length, pair.config)
        check_max_length(length, [("model A", pair.config)], "--eval-max-length")
        texts, labels = labelled(e.data, e.samples, e.label_field,
                                 getattr(pair.config, "num_labels", 2)) if objective == "cls" else \
            (load_texts(e.data, e.samples, max_chars=chars_for(length)), ())
        batches = tokenize(pair.tokenizer, texts, length, batch_size, pair.spec.architecture,
                           objective, e.seed, labels)
        check_scorable(batches, objective)
        return EvalSet(objective, batches, length)


def labelled(path: str, samples: int, field: str, num_labels: int = 2):
    """(texts, labels) of the first `samples` rows with text of a .jsonl: class indices in
    [0, num_labels) (1.0 read as 1), or floats for a regression head (num_labels 1)."""
    load_texts(path, samples)   # the file, its rows and their text, checked and named
    texts, labels = [], []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, start=1):
            if len(texts) == samples:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str) or not text.strip():
                continue
            value = row.get(field)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise DataError(f"{path}:{i}: classification evaluation needs a numeric "
                                f"'{field}' beside 'text'")
            if num_labels == 1:
                value = float(value)
            elif value != int(value) or not 0 <= value < num_labels:
                raise DataError(f"{path}:{i}: '{field}' is {value!r}, but the model's head has "
                                f"{num_labels} classes: labels must be class indices 0 to "
                                f"{num_labels - 1} (unlabelled rows, e.g. -1 in GLUE test "
                                "splits, cannot be scored: drop them)")
            else:
                value = int(value)
            texts.append(text.strip())
            labels.append(value)
    if not texts:
        raise DataError(f"{path!r} holds no text")
    return texts, labels


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

