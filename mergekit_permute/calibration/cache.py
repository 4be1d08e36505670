"""Calibration statistics cached on disk: a cache, never a source of truth.

One entry per (model A, model B, text, calibration settings), keyed by content hashes: one
safetensors file per layer, the residual summary and meta.json with checksums. Every file is
checked on read; anything wrong is a warning and a recompute, and a failed write a warning.
"""

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from safetensors.torch import load_file

from mergekit_permute import __version__
from mergekit_permute.settings import RunSettings
from mergekit_permute.io.checkpoints import stream_safetensors
from mergekit_permute.io.outputs import process_alive
from mergekit_permute.calibration.stats import CrossStats, ResidualSummary, Statistics

LOG = logging.getLogger(__name__)
FORMAT = "mergekit-permute-stats/3"   # 3: shifted sums, with their shifts
RESIDUAL = "residual.safetensors"
RESUME = "resume"    # inside a partial entry: the state a later run continues from
# use: a valid entry is read (else computed and stored); refresh: recomputed and stored;
# off: neither read nor written (nothing on disk, and an interrupted run cannot continue)
CacheMode = RunSettings.model_fields["cache"].annotation


def cache_dir() -> Path:
    return Path(os.environ.get("MERGEKIT_PERMUTE_CACHE",
                               Path.home() / ".cache" / "mergekit_permute"))


def cache_key(fingerprint_a: str, fingerprint_b: str, data_fingerprint: str,
              calibration: Mapping, qk: bool, context: Mapping = ()) -> str:
    """The one cache key: both models' content, the text, the calibration settings, and the
    `context` they are computed in (tokens, config, device kind, dtypes)."""
    source = json.dumps({"a": fingerprint_a, "b": fingerprint_b, "data": data_fingerprint,
                         "settings": dict(calibration), "qk": qk, "context": dict(context),
                         "format": FORMAT,
                         "version": __version__}, sort_keys=True)
    return hashlib.sha256(source.encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_file(path: Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """One statistics file, streamed tensor by tensor (no second copy in memory), float64
    throughout; returns the sha256 of the bytes as written."""
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
            for n, t in s.totals().items()}


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
