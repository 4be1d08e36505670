"""Checks that run before any model forward pass: every problem a run would hit later, found in
its first seconds and said in one line (the CLI exits 2, nothing is written)."""

from typing import Iterable, Optional

import torch

from mergekit_permute.io.checkpoints import sidecar_files


class PreflightError(ValueError):
    """A run that cannot succeed; the message names the problem and the fix."""


def check_device(device: str) -> None:
    """The device exists here and can hold a tensor (cpu, cuda, cuda:N, mps, ...)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PreflightError(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or mps") \
            from None
    if dev.type == "cpu":
        return
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError(f"--device {device}: no CUDA device is available here "
                                 "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PreflightError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                                 "device(s) here (cuda:0 to "
                                 f"cuda:{torch.cuda.device_count() - 1})")
        return
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise PreflightError(f"--device {device}: no Apple MPS device is available here "
                             "(torch.backends.mps.is_available() is False); use --device cpu")
    try:   # any other kind: it must hold a tensor
        torch.empty(1, device=dev)
    except Exception as e:
        raise PreflightError(f"--device {device}: unusable here ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); use --device cpu") \
            from None


def positions(config) -> Optional[int]:
    """How many token positions a model can read (None: no fixed limit)."""
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit and getattr(config, "model_type", "") in ("roberta", "xlm-roberta"):
        limit -= (getattr(config, "pad_token_id", 1) or 1) + 1   # positions start after pad
    return limit


def eval_length(requested: Optional[int], config, default: int = 128) -> int:
    """The evaluation passage length: as asked, else `default` capped at the model's positions."""
    if requested is not None:
        return requested
    limit = positions(config)
    return min(default, limit) if limit else default


def check_max_length(max_length: int, configs: Iterable, option: str = "--max-length") -> None:
    for name, config in configs:
        limit = positions(config)
        if limit and max_length > limit:
            raise PreflightError(f"{option} {max_length} exceeds the {limit} positions of "
                                 f"{name}; pass {option} {limit} or less")


def checkpoint_bytes(checkpoint, dtype: Optional[torch.dtype] = None) -> int:
    """What writing a copy of this checkpoint takes (in `dtype` where given): its weights and
    the files copied beside them (config, tokenizer)."""
    total = sum(f.stat().st_size for f in sidecar_files(checkpoint.root))
    for key in checkpoint.keys():
        shape, stored = checkpoint.meta(key)
        item = (dtype if dtype is not None and stored.is_floating_point else stored).itemsize
        total += int(torch.Size(shape).numel()) * item
    return total


def alignment_bytes(spec, settings) -> int:
    """An upper bound of permutations.safetensors + alignment.json: index vectors (with scales),
    float64 matrices where the settings give a space dense maps, A's norm gains."""
    dense = {"residual": settings.residual in ("auto", "orthogonal") or settings.matching == "learned",
             "attention": settings.vo == "orthogonal" or settings.matching == "learned",
             "ffn": False}
    total = 1 << 20
    for space in spec.spaces:
        total += sum(n * n * 8 if dense[space.kind] else n * 12 for n in space.views.values())
    return total + 8 * spec.space("residual").size * len(spec.norm_folds)


def check_scorable(batches, objective: str = "mlm", what: str = "evaluation data") -> int:
    """A loss needs labelled tokens (next tokens, masked positions or labels)."""
    shift = 1 if objective == "clm" else 0     # a passage's first token predicts nothing
    count = sum(int((b["labels"][..., shift:] != -100).sum()) for b in batches)
    if count == 0:
        raise PreflightError(f"the {what} gives no token to score (every passage too short, or "
                             "no masked position); pass longer or more passages (--data, "
                             "--eval-samples, --eval-max-length)")
    return count
