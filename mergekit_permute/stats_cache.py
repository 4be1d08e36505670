"""Calibration statistics cached on disk: a cache, never a source of truth.

One entry per (model A, model B, calibration text, calibration settings), keyed by content
hashes (`cache_key`, the one key function). An entry is a directory written beside its final
place and renamed in when complete: one safetensors file per layer (written as each layer
finishes), the residual summary, and `meta.json` (files, sha256 checksums, token count).
On read every file is checked (checksum, keys, shapes, dtype, finite); anything wrong is a
warning and a recompute, and the recompute rewrites the entry. A failed write is a warning:
the run goes on without the cache.
"""

import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Dict, List, Literal, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file, save_file

from mergekit_permute import __version__
from mergekit_permute.outputs import process_alive
from mergekit_permute.stats import CrossStats, ResidualSummary, Statistics

LOG = logging.getLogger(__name__)
FORMAT = "mergekit-permute-stats/3"   # 3: shifted sums, with their shifts
RESIDUAL = "residual.safetensors"
RESUME = "resume"    # inside a partial entry: the state a later run continues from
CHECKPOINT_ENV = "MERGEKIT_PERMUTE_CHECKPOINT_SECONDS"
CHECKPOINT_SECONDS = 600.0
# use: a valid entry is read (else computed and stored); refresh: recomputed and stored;
# off: neither read nor written (nothing on disk, and an interrupted run cannot continue)
CacheMode = Literal["use", "refresh", "off"]   # (RunSettings.cache)


def cache_dir() -> Path:
    return Path(os.environ.get("MERGEKIT_PERMUTE_CACHE",
                               Path.home() / ".cache" / "mergekit_permute"))


def cache_key(fingerprint_a: str, fingerprint_b: str, data_fingerprint: str,
              calibration: Mapping, qk: bool) -> str:
    """The one cache key: both models' content, the text, the calibration settings."""
    source = json.dumps({"a": fingerprint_a, "b": fingerprint_b, "data": data_fingerprint,
                         "settings": dict(calibration), "qk": qk, "format": FORMAT,
                         "version": __version__}, sort_keys=True)
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


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


def _write_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """One statistics file, streamed tensor by tensor (no second copy in memory), float64
    throughout (float32 sums are widened as they are written); returns the sha256 of the bytes
    as written."""
    from mergekit_permute.checkpoints import stream_safetensors
    items = dict(sorted(tensors.items()))
    hasher = hashlib.sha256()
    stream_safetensors(path, [(k, tuple(t.shape), torch.float64 if t.is_floating_point()
                               else t.dtype) for k, t in items.items()],
                       items.__getitem__, hasher=hasher)
    return hasher.hexdigest()


def _layer_file(layer: Optional[int]) -> str:
    return "layer-pre.safetensors" if layer is None else f"layer-{layer:04d}.safetensors"


class CacheEntry:
    """A validated entry: layer statistics read one file at a time."""

    def __init__(self, path: Path, meta: Dict, residual: ResidualSummary):
        self.path, self.meta, self.residual = path, meta, residual
        self._file_of = {key: file for file, keys in meta["layers"].items() for key in keys}
        self._cached_file: Optional[str] = None
        self._cached: Dict[str, CrossStats] = {}

    def keys(self) -> List[str]:
        return list(self._file_of)

    def layer(self, file: str) -> Dict[str, CrossStats]:
        if self._cached_file != file:
            self._cached = _unflatten(load_file(str(self.path / file)))
            self._cached_file = file
        return self._cached

    def __call__(self, key: str) -> CrossStats:
        return self.layer(self._file_of[key])[key]

    def layers(self):
        """(layer file, its statistics) in depth order."""
        for file in self.meta["layers"]:
            yield file, self.layer(file)

    def statistics(self) -> Statistics:
        return Statistics(residual=self.residual, tokens=int(self.meta["tokens"]), loader=self)


def _flatten(stats: Mapping[str, CrossStats]) -> Dict[str, torch.Tensor]:
    return {f"{k}/{n}": t.contiguous() for k, s in stats.items()
            for n, t in s.totals(widen=False).items()}


def _unflatten(flat: Mapping[str, torch.Tensor]) -> Dict[str, CrossStats]:
    grouped: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        key, name = k.rsplit("/", 1)
        grouped.setdefault(key, {})[name] = t
    return {k: CrossStats.from_tensors(v) for k, v in grouped.items()}


def remove_stale(root: Path) -> None:
    """What dead runs left in the cache: replaced entries (`.old-PID`) and partial entries
    without a checkpoint to continue from (`.partial-PID`)."""
    for path in list(root.glob("stats-*.old-*")) + list(root.glob("stats-*.partial-*")):
        try:
            pid = int(path.name.rsplit("-", 1)[1])
        except ValueError:
            continue
        resumable = path.name.split(".")[-1].startswith("partial") and \
            (path / RESUME / "progress.json").is_file()
        if pid != os.getpid() and not process_alive(pid) and not resumable:
            LOG.info("removing %s, left by an interrupted run (process %d)", path, pid)
            shutil.rmtree(path, ignore_errors=True)


class StatsCache:
    """Reading and writing one entry. `expected`: stats key -> (size A, size B), from the spec,
    what every valid entry for this key must hold."""

    def __init__(self, key: str, expected: Mapping[str, tuple], residual_size: int):
        self.key, self.expected, self.residual_size = key, dict(expected), residual_size
        self.path = cache_dir() / f"stats-{key}"
        remove_stale(cache_dir())

    # ---- reading ----
    def load(self) -> Optional[CacheEntry]:
        if not self.path.exists():
            return None
        try:
            entry = self._validated()
        except Exception as e:  # a cache problem is never the user's problem
            LOG.warning("ignoring the cached calibration statistics in %s (%s); recomputing "
                        "them", self.path, e)
            return None
        LOG.info("reusing cached calibration statistics %s", self.path)
        return entry

    def _validated(self) -> CacheEntry:
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise ValueError("no meta.json (an incomplete entry)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or meta.get("key") != self.key:
            raise ValueError("written for another key or format")
        seen = set()
        for file, keys in [*meta["layers"].items(), (RESIDUAL, None)]:
            seen.update(self._check_file(self.path, file, keys, meta["sha256"]))
        missing = set(self.expected) - seen
        if missing:
            raise ValueError(f"lacks {sorted(missing)[:3]}")
        residual = ResidualSummary.from_tensors(load_file(str(self.path / RESIDUAL)))
        return CacheEntry(self.path, meta, residual)

    def _check_file(self, root: Path, file: str, keys: Optional[Sequence[str]],
                    sha256: Mapping[str, str]) -> List[str]:
        """One statistics file (layer: `keys`; the residual summary: None) is complete and
        sound; returns the statistics it holds."""
        path = root / file
        if not path.is_file():
            raise ValueError(f"{file} is missing")
        if _sha256(path) != sha256.get(file):
            raise ValueError(f"{file} does not match its checksum")
        flat = load_file(str(path))
        for name, t in flat.items():
            if t.dtype != torch.float64 or not torch.isfinite(t).all():
                raise ValueError(f"{file}: {name} is not finite float64")
        if keys is None:
            self._check_residual(flat)
            return []
        stats = _unflatten(flat)
        if sorted(stats) != sorted(keys):
            raise ValueError(f"{file} holds other statistics than listed")
        for key, s in stats.items():
            self._check_shape(key, s)
        return list(stats)

    def _check_shape(self, key: str, s: CrossStats) -> None:
        if key not in self.expected:
            raise ValueError(f"unexpected statistics {key}")
        da, db = self.expected[key]
        if s.sum_ab.shape != (da, db) or s.sum_a.shape != (da,) or s.sum_b.shape != (db,) \
                or s.n.shape != ():
            raise ValueError(f"{key} has shape {tuple(s.sum_ab.shape)}, expected {(da, db)}")

    def _check_residual(self, flat: Mapping[str, torch.Tensor]) -> None:
        summary = ResidualSummary.from_tensors(flat)
        d = self.residual_size
        if summary.points and summary.unit_moments.shape != (d, d):
            raise ValueError("residual summary of the wrong size")

    # ---- resuming ----
    def resumable(self) -> Optional["Resume"]:
        """The furthest checkpoint an interrupted run left for this key (its process is gone,
        or it is this one); partial entries that cannot be resumed are removed."""
        best: Optional[Resume] = None
        for path in sorted(self.path.parent.glob(f"{self.path.name}.partial-*")):
            try:
                pid = int(path.name.rsplit("-", 1)[1])
            except ValueError:
                continue
            if pid != os.getpid() and process_alive(pid):
                continue   # another run is writing it
            try:
                found = self._resume_from(path)
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

    def _resume_from(self, path: Path) -> Optional["Resume"]:
        progress_path = path / RESUME / "progress.json"
        if not progress_path.is_file():
            return None
        progress = json.loads(progress_path.read_text())
        if progress.get("format") != FORMAT or progress.get("key") != self.key:
            raise ValueError("written for another key or format")
        sha256 = progress["sha256"]
        for file, keys in progress["layers"].items():
            self._check_file(path, file, keys, sha256)
        self._check_file(path, f"{RESUME}/{RESIDUAL}", None, sha256)
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
    def writer(self, resume: Optional["Resume"] = None) -> "EntryWriter":
        return EntryWriter(self, resume)


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
        # read on the writer's thread; float32-only sums are widened as they are written
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
