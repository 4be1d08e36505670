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
from pathlib import Path
from typing import Dict, List, Mapping, Optional

import torch
from safetensors.torch import load_file, save

from mergekit_permute import __version__
from mergekit_permute.stats import CrossStats, ResidualSummary, Statistics

LOG = logging.getLogger(__name__)
FORMAT = "mergekit-permute-stats/2"
RESIDUAL = "residual.safetensors"


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


def _write_file(path: Path, blob: bytes) -> None:
    path.write_bytes(blob)


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
    return {f"{k}/{n}": t.contiguous() for k, s in stats.items() for n, t in s.tensors().items()}


def _unflatten(flat: Mapping[str, torch.Tensor]) -> Dict[str, CrossStats]:
    grouped: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, t in flat.items():
        key, name = k.rsplit("/", 1)
        grouped.setdefault(key, {})[name] = t
    return {k: CrossStats.from_tensors(v) for k, v in grouped.items()}


class StatsCache:
    """Reading and writing one entry. `expected`: stats key -> (size A, size B), from the spec,
    what every valid entry for this key must hold."""

    def __init__(self, key: str, expected: Mapping[str, tuple], residual_size: int):
        self.key, self.expected, self.residual_size = key, dict(expected), residual_size
        self.path = cache_dir() / f"stats-{key}"

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
            path = self.path / file
            if not path.is_file():
                raise ValueError(f"{file} is missing")
            if _sha256(path) != meta["sha256"].get(file):
                raise ValueError(f"{file} does not match its checksum")
            flat = load_file(str(path))
            for name, t in flat.items():
                if t.dtype != torch.float64 or not torch.isfinite(t).all():
                    raise ValueError(f"{file}: {name} is not finite float64")
            if keys is None:
                self._check_residual(flat)
                continue
            stats = _unflatten(flat)
            if sorted(stats) != sorted(keys):
                raise ValueError(f"{file} holds other statistics than listed")
            for key, s in stats.items():
                self._check_shape(key, s)
            seen.update(stats)
        missing = set(self.expected) - seen
        if missing:
            raise ValueError(f"lacks {sorted(missing)[:3]}")
        residual = ResidualSummary.from_tensors(load_file(str(self.path / RESIDUAL)))
        return CacheEntry(self.path, meta, residual)

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

    # ---- writing ----
    def writer(self) -> "EntryWriter":
        return EntryWriter(self)


class EntryWriter:
    """Writes layer files as layers complete, then renames the finished entry into place.
    The first failure (disk full, read-only cache) disables it with one warning."""

    def __init__(self, cache: StatsCache):
        self.cache = cache
        self.tmp = cache.path.with_name(f"{cache.path.name}.partial-{os.getpid()}")
        self.meta: Dict = {"format": FORMAT, "key": cache.key, "layers": {}, "sha256": {}}
        self.failed = False
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

    def _save(self, name: str, tensors: Dict[str, torch.Tensor]) -> None:
        def write():
            blob = save(dict(sorted(tensors.items())))   # hashed as written, not read back
            _write_file(self.tmp / name, blob)
            self.meta["sha256"][name] = hashlib.sha256(blob).hexdigest()
        self._guard(write)

    def layer(self, layer: Optional[int], stats: Mapping[str, CrossStats]) -> None:
        if not stats:
            return
        name = _layer_file(layer)
        self.meta["layers"][name] = sorted(stats)
        self._save(name, _flatten(stats))

    def finish(self, residual: ResidualSummary, tokens: int) -> None:
        self._save(RESIDUAL, residual.tensors())
        self.meta["tokens"] = tokens

        def commit():
            (self.tmp / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True))
            final = self.cache.path
            if final.exists():  # a stale or invalid entry: replace it
                old = final.with_name(f"{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(self.tmp, final)
        self._guard(commit)

    def abandon(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
