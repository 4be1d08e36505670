"""Checks that run before any model forward pass: every problem a run would hit later, found in
its first seconds and said in one line (the CLI exits 2, nothing is written)."""

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch


class PreflightError(ValueError):
    """A run that cannot succeed; the message names the problem and the fix."""


def check_device(device: str) -> None:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PreflightError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") \
            from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PreflightError(f"--device {device}: no CUDA device is available here "
                                 "(torch.cuda.is_available() is False); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise PreflightError(f"--device {device}: only {torch.cuda.device_count()} CUDA "
                                 "device(s) here")
    elif dev.type not in ("cpu", "mps"):
        raise PreflightError(f"--device {device}: unsupported device type {dev.type!r}")


def _existing_ancestor(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path("/")


def check_output(out: Path, overwrite: bool, need_bytes: int = 0) -> None:
    """The output directory can be created and written where it is asked for, and has room."""
    out = Path(out).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise PreflightError(f"{out} exists and is not a directory; choose another output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise PreflightError(f"{out} already exists and is not empty; pass --overwrite to replace "
                             "it, or choose another output directory")
    anchor = _existing_ancestor(out.parent)
    if not anchor.is_dir():
        raise PreflightError(f"cannot create {out}: {anchor} is a file, not a directory")
    if str(anchor).startswith(("/proc", "/sys", "/dev")):
        raise PreflightError(f"cannot write {out}: {anchor} is a virtual filesystem")
    try:   # a real probe: permissions, read-only mounts, quotas all show here
        fd, probe = tempfile.mkstemp(prefix=".mergekit-permute-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(f"cannot write {out}: {anchor} is not writable ({e.strerror})") \
            from None
    if need_bytes:
        free = shutil.disk_usage(anchor).free
        if free < need_bytes * 1.05:
            raise PreflightError(f"{out} needs about {need_bytes / 2**30:.2f} GiB, but "
                                 f"{anchor} has {free / 2**30:.2f} GiB free")


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
    """What writing a copy of this checkpoint takes (in `dtype` where given)."""
    total = 0
    for key in checkpoint.keys():
        shape, stored = checkpoint.meta(key)
        item = (dtype if dtype is not None and stored.is_floating_point else stored).itemsize
        total += int(torch.Size(shape).numel()) * item
    return total


def check_scorable(batches, objective: str = "mlm", what: str = "evaluation data") -> int:
    """A loss needs labelled tokens (next tokens, masked positions or labels)."""
    shift = 1 if objective == "clm" else 0     # a passage's first token predicts nothing
    count = sum(int((b["labels"][..., shift:] != -100).sum()) for b in batches)
    if count == 0:
        raise PreflightError(f"the {what} gives no token to score (every passage too short, or "
                             "no masked position); pass longer or more passages (--data, "
                             "--eval-samples, --eval-max-length)")
    return count
