"""Partial statistics-cache entries: written layer by layer as calibration runs, checkpointed
(the hidden states entering the next block, the residual summary) every few minutes, renamed
into place when complete, and continued by the same command after an interruption."""

import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from mergekit_permute.calibration.cache import (
    FORMAT, RESIDUAL, RESUME, StatsCache, _flatten, _layer_file, _sha256, _unflatten, _write_file,
)
from mergekit_permute.calibration.stats import CrossStats, ResidualSummary
from mergekit_permute.io.outputs import process_alive

LOG = logging.getLogger(__name__)
CHECKPOINT_ENV = "MERGEKIT_PERMUTE_CHECKPOINT_SECONDS"
CHECKPOINT_SECONDS = 600.0


def checkpoint_seconds() -> float:
    """Seconds between checkpoints of a partial entry (MERGEKIT_PERMUTE_CHECKPOINT_SECONDS;
    0 checkpoints after every layer)."""
    raw = os.environ.get(CHECKPOINT_ENV)
    if raw is None:
        return CHECKPOINT_SECONDS
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise ValueError(f"{CHECKPOINT_ENV}={raw!r}: give a number of seconds >= 0 (0 "
                         "checkpoints after every layer), or unset it for the default "
                         f"{CHECKPOINT_SECONDS:.0f}")
    return seconds


def resumable(cache: StatsCache) -> Optional["Resume"]:
    """The furthest checkpoint an interrupted run left for this key (its process is gone,
    or it is this one); partial entries that cannot be resumed are removed."""
    best: Optional[Resume] = None
    for path in sorted(cache.path.parent.glob(f"{cache.path.name}.partial-*")):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        if pid != os.getpid() and process_alive(pid):
            continue   # another run is writing it
        try:
            found = _resume_from(cache, path)
        except Exception as e:  # a cache problem is never the user's problem
            LOG.warning("removing %s: an interrupted run's statistics that cannot be "
                        "resumed (%s)", path, e)
            found = None
        else:
            if found is None:
                LOG.info("removing %s: left by a run interrupted before its first "
                         "checkpoint", path)
        if found is None:
            shutil.rmtree(path, ignore_errors=True)
        elif best is None or found.next_layer > best.next_layer:
            if best is not None:
                shutil.rmtree(best.path, ignore_errors=True)
            best = found
        else:
            shutil.rmtree(found.path, ignore_errors=True)
    return best


def _resume_from(cache: StatsCache, path: Path) -> Optional["Resume"]:
    progress_path = path / RESUME / "progress.json"
    if not progress_path.is_file():
        return None
    progress = json.loads(progress_path.read_text())
    if progress.get("format") != FORMAT or progress.get("key") != cache.key:
        raise ValueError("written for another key or format")
    sha256 = progress["sha256"]
    for file, keys in progress["layers"].items():
        cache._check_file(path, file, keys, sha256)
    cache._check_file(path, f"{RESUME}/{RESIDUAL}", None, sha256)
    hidden: Dict[str, List[torch.Tensor]] = {"a": [], "b": []}
    for side in hidden:
        for j in range(int(progress["batches"])):
            file = f"{RESUME}/hidden-{side}-{j:05d}.safetensors"
            if not (path / file).is_file() or _sha256(path / file) != sha256.get(file):
                raise ValueError(f"{file} is missing or does not match its checksum")
            t = load_file(str(path / file))["hidden"]
            if not t.is_floating_point() or not torch.isfinite(t).all():
                raise ValueError(f"{file} is not finite")
            hidden[side].append(t)
    residual = ResidualSummary.from_tensors(load_file(str(path / RESUME / RESIDUAL)))
    return Resume(path, {"layers": progress["layers"],
                         "sha256": {f: sha256[f] for f in progress["layers"]}},
                  int(progress["next_layer"]), hidden["a"], hidden["b"], residual)

# ---- writing ----


@dataclass
class Resume:
    """An interrupted run's partial entry: its complete layer files, and the state after its
    last checkpointed layer (the hidden states entering the next block, the residual
    summary). Layer statistics are read one file at a time."""

    path: Path
    meta: Dict            # "layers": file -> keys, "sha256": file -> checksum
    next_layer: int
    hidden_a: List[torch.Tensor]
    hidden_b: List[torch.Tensor]
    residual: ResidualSummary

    def layers(self):
        for file in self.meta["layers"]:
            yield _unflatten(load_file(str(self.path / file)))


class EntryWriter:
    """Writes layer files as layers complete, then renames the finished entry into place.
    Files are written on a background thread, one at a time (the next layer's blocks run
    meanwhile; at most one file is in flight, so memory stays flat). The first failure (disk
    full, read-only cache) disables it with one warning."""

    def __init__(self, cache: StatsCache, resume: Optional[Resume] = None):
        self.cache = cache
        self.tmp = cache.path.with_name(f"{cache.path.name}.partial-{os.getpid()}")
        self.meta: Dict = {"format": FORMAT, "key": cache.key, "layers": {}, "sha256": {}}
        self.failed = False
        self.every = checkpoint_seconds()
        self._last_checkpoint = time.monotonic()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stats-cache")
        self._pending: Optional[Future] = None
        self.resumed: Optional[Resume] = None   # the interrupted run's entry, now this one's
        if resume is not None and resume.path != self.tmp:
            self._guard(lambda: (shutil.rmtree(self.tmp, ignore_errors=True),
                                 os.replace(resume.path, self.tmp)))
        if resume is not None and not self.failed:
            resume.path = self.tmp
            self.resumed = resume
            self.meta["layers"] = dict(resume.meta["layers"])
            self.meta["sha256"] = dict(resume.meta["sha256"])
            return
        self._guard(lambda: (shutil.rmtree(self.tmp, ignore_errors=True),
                             self.tmp.mkdir(parents=True, exist_ok=True)))

    def _guard(self, action) -> None:
        if self.failed:
            return
        try:
            action()
        except OSError as e:
            self.failed = True
            LOG.warning("could not write the statistics cache (%s); the run goes on without "
                        "it", e)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._guard(pending.result)

    def _save(self, name: str, tensors: Callable[[], Dict[str, torch.Tensor]]) -> None:
        def write():   # hashed as written, not read back
            self.meta["sha256"][name] = _write_file(self.tmp / name, tensors())
        self._wait()
        if not self.failed:
            self._pending = self._pool.submit(write)

    def layer(self, layer: Optional[int], stats: Mapping[str, CrossStats]) -> None:
        if not stats:
            return
        name = _layer_file(layer)
        self.meta["layers"][name] = sorted(stats)
        for s in stats.values():
            s.seal()   # then only read, here and by the writer's thread
        # read on the writer's thread
        self._save(name, lambda: _flatten(stats))

    def checkpoint(self, layer: int, hidden_a: Sequence[torch.Tensor],
                   hidden_b: Sequence[torch.Tensor], residual: ResidualSummary) -> None:
        """After `layer`: what a later run needs to continue with layer + 1, if the last
        checkpoint is `every` seconds old. Staged beside and renamed in, so a run killed while
        checkpointing leaves the previous checkpoint whole."""
        if self.failed or time.monotonic() - self._last_checkpoint < self.every:
            return
        self._wait()   # the layer files it lists are on disk

        def write():
            staging = self.tmp / f"{RESUME}.staging"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            sha256 = {f: self.meta["sha256"][f] for f in self.meta["layers"]}
            for side, hidden in (("a", hidden_a), ("b", hidden_b)):
                for j, h in enumerate(hidden):   # one batch in host memory at a time
                    name = f"hidden-{side}-{j:05d}.safetensors"
                    save_file({"hidden": h.detach().to("cpu").contiguous()}, str(staging / name))
                    sha256[f"{RESUME}/{name}"] = _sha256(staging / name)
            sha256[f"{RESUME}/{RESIDUAL}"] = _write_file(staging / RESIDUAL, residual.tensors())
            (staging / "progress.json").write_text(json.dumps(
                {"format": FORMAT, "key": self.cache.key, "next_layer": layer + 1,
                 "batches": len(hidden_a), "layers": self.meta["layers"], "sha256": sha256},
                indent=1, sort_keys=True))
            final = self.tmp / RESUME
            if final.exists():
                os.replace(final, self.tmp / f"{RESUME}.old")
                shutil.rmtree(self.tmp / f"{RESUME}.old", ignore_errors=True)
            os.replace(staging, final)
        self._guard(write)
        self._last_checkpoint = time.monotonic()

    def finish(self, residual: ResidualSummary, tokens: int) -> None:
        tensors = residual.tensors()
        self._save(RESIDUAL, lambda: tensors)
        self._wait()
        self._pool.shutdown()
        self.meta["tokens"] = tokens

        def commit():
            shutil.rmtree(self.tmp / RESUME, ignore_errors=True)   # the entry is whole now
            (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True))
            final = self.cache.path
            if final.exists():  # a stale or invalid entry: replace it
                old = final.with_name(f"{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(self.tmp, final)
        self._guard(commit)

    def abandon(self) -> None:
        """A failed or interrupted run: its entry is kept if it holds a checkpoint (the same
        command continues from there), else removed."""
        checkpointed = not self.failed and (self.tmp / RESUME / "progress.json").is_file()
        self.failed = True
        if self._pending is not None:
            self._pending.cancel()
            wait([self._pending])
        self._pool.shutdown()
        if checkpointed:
            progress = json.loads((self.tmp / RESUME / "progress.json").read_text())
            LOG.warning("calibration statistics up to layer %d are kept in %s: the same command "
                        "continues from there", progress["next_layer"], self.tmp)
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
