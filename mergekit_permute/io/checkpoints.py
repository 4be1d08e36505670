"""Checkpoints on disk, read one tensor at a time, and written the same way.

`Checkpoint` opens a model directory (or a Hub id, downloaded once) without loading it:
safetensors shards are read lazily per tensor; pickles (`pytorch_model.bin`, as MultiBERTs
ship) go through the weights-only unpickler with mmap, and a pickle that needs full unpickling
is refused unless the user opts in. `write_like` streams a transformed copy out in the input's
shard layout, holding one tensor at a time.
"""

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import struct
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from huggingface_hub import HfApi, snapshot_download
from tqdm.auto import tqdm

from mergekit_permute.calibration.heap import HeapWatch

LOG = logging.getLogger(__name__)
ALLOW_PICKLE_ENV = "MERGEKIT_PERMUTE_ALLOW_UNSAFE_PICKLE"
SAFE_INDEX, BIN_INDEX = "model.safetensors.index.json", "pytorch_model.bin.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# What `write_like` copies beside the weights (config, tokenizer, generation settings).
SIDECARS = (".json", ".txt", ".model", ".jinja", ".tiktoken")
# this package's records of a run on the input (they would describe another model's run)
RUN_RECORDS = re.compile(r"(alignment(-\d+)?|barrier|merge)\.json")


class UnsafeCheckpoint(ValueError):
    pass


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file."""


def hub_revision(path: str) -> Tuple[str, Optional[str]]:
    """`owner/name@revision` (MergeKit's spelling, e.g. a Pythia training step) -> (id, rev)."""
    repo, at, revision = path.partition("@")
    return (repo, revision) if at and revision else (path, None)


def resolve(path: str) -> Path:
    """A local directory, or a Hub id (`owner/name`, or `owner/name@revision`) downloaded
    (weights, config, tokenizer) to the HF cache."""
    local = Path(path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise CheckpointError(f"model {path!r} is a file; pass the model's directory")
        return local
    repo, revision = hub_revision(path)
    if path.startswith(("/", ".", "~")) or repo.count("/") > 1:
        raise FileNotFoundError(f"model {path!r} does not exist (neither a directory nor a hub id)")
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=[
            "*.json", *weight_patterns(repo, revision), "*.txt", "*.model", "*.jinja",
            "*.tiktoken", "README.md"]))
    except Exception as e:
        raise FileNotFoundError(f"model {path!r} is not a local directory and could not be "
                                f"fetched from the Hugging Face Hub: {e}") from None


def weight_patterns(repo: str, revision: Optional[str]) -> List[str]:
    """The weight files to fetch: safetensors where the repository has them (as transformers
    reads them), else its pickles. Many repositories ship both (Pythia's do): fetching both
    doubles the download, and `*.bin` also matches training_args.bin and optimizer states."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return ["*.safetensors", "*.bin"]   # (from the cache, as it holds them)
    try:
        files = HfApi().list_repo_files(repo, revision=revision)
    except Exception:   # (snapshot_download, next, names what is wrong)
        return ["*.safetensors", "*.bin"]
    if any(f.endswith(".safetensors") for f in files):
        return ["*.safetensors"]
    return ["pytorch_model*.bin"]


class Checkpoint:
    """The weight files of one model directory: names, shapes, dtypes, tensors on demand."""

    def __init__(self, path: str, allow_unsafe_pickle: bool = False):
        self.path = str(path)
        self.allow_unsafe_pickle = allow_unsafe_pickle
        self.root = resolve(path)
        self._open: Dict[str, object] = {}
        self.files, self.key_file = self._index()

    def _index(self) -> Tuple[List[str], Dict[str, str]]:
        # transformers' order: safetensors before pickles, whatever else lies beside them
        for name in (SAFE_INDEX, "model.safetensors", BIN_INDEX, "pytorch_model.bin"):
            if not (self.root / name).is_file():
                continue
            if name not in (SAFE_INDEX, BIN_INDEX):
                return [name], {k: name for k in self._read_keys(name)}
            try:
                weight_map = json.loads((self.root / name).read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(v, str) for v in weight_map.values()):
                    raise ValueError("'weight_map' must map tensor names to file names")
            except (ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{self.root / name}: not a valid shard index ({e})") \
                    from None
            return sorted(set(weight_map.values())), dict(weight_map)
        raise CheckpointError(f"{self.root}: no model.safetensors, pytorch_model.bin or shard "
                              "index found")

    def _read_keys(self, file: str) -> List[str]:
        return list(self._handle(file).keys())

    def _handle(self, file: str):
        if file not in self._open:
            full = self.root / file
            if not full.is_file():
                raise CheckpointError(f"{full}: listed in the shard index but missing")
            if file.endswith(".safetensors"):
                self._open[file] = SafetensorsFile(full)
            else:
                self._open[file] = _load_pickle(full, self.allow_unsafe_pickle)
        return self._open[file]

    @property
    def is_pickle(self) -> bool:
        return not all(f.endswith(".safetensors") for f in self.files)

    def keys(self) -> List[str]:
        return list(self.key_file)

    def get(self, key: str) -> torch.Tensor:
        handle = self._handle(self.key_file[key])
        try:
            return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]
        except Exception as e:
            raise CheckpointError(f"{self.root / self.key_file[key]}: cannot read {key} ({e})") \
                from None

    def meta(self, key: str) -> Tuple[Tuple[int, ...], torch.dtype]:
        """(shape, dtype) without reading the data."""
        handle = self._handle(self.key_file[key])
        if isinstance(handle, SafetensorsFile):
            return handle.meta(key)
        if key not in handle:
            raise CheckpointError(f"{self.root / self.key_file[key]}: the shard index lists {key} "
                                  "in this file, but the file does not hold it (a stale index?)")
        return tuple(handle[key].shape), handle[key].dtype

    def dtype(self) -> torch.dtype:
        """The dtype of the floating-point weights (the most common one)."""
        counts: Dict[torch.dtype, int] = {}
        for key in self.keys():
            dtype = self.meta(key)[1]
            if dtype.is_floating_point:
                counts[dtype] = counts.get(dtype, 0) + 1
        return max(counts, key=counts.get) if counts else torch.float32

    def fingerprint(self) -> str:
        """Content hash of the weight files (robust to paths and copies)."""
        h = hashlib.blake2b(digest_size=16)
        for file in self.files:
            h.update(file.encode())
            with open(self.root / file, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        return h.hexdigest()


class SafetensorsFile:
    """One safetensors file, read tensor by tensor with plain reads (no mmap): a tensor's
    pages are not left resident after it is freed, so memory stays flat however many blocks
    are read in turn. The format: an 8-byte little-endian header length, a JSON header
    (dtype, shape, byte offsets per tensor), then the raw data."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                if length > 100 << 20 or length > self.path.stat().st_size:
                    raise ValueError("header length out of range")
                header = json.loads(f.read(length))
            self.start = 8 + length
            self.header = {k: v for k, v in header.items() if k != "__metadata__"}
            size = self.path.stat().st_size - self.start
            for key, v in self.header.items():
                begin, end = v["data_offsets"]
                numel = int(torch.Size(v["shape"]).numel())
                if v["dtype"] not in _FROM_NAME or not 0 <= begin <= end <= size or \
                        end - begin != numel * _FROM_NAME[v["dtype"]].itemsize:
                    raise ValueError(f"{key}: inconsistent dtype, shape or offsets")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None

    def keys(self):
        return self.header.keys()

    def meta(self, key: str) -> Tuple[Tuple[int, ...], torch.dtype]:
        if key not in self.header:
            raise CheckpointError(f"{self.path}: the shard index lists {key} in this file, but "
                                  "the file does not hold it (a stale or edited index?)")
        v = self.header[key]
        return tuple(v["shape"]), _FROM_NAME[v["dtype"]]

    def get_tensor(self, key: str) -> torch.Tensor:
        shape, dtype = self.meta(key)
        begin, end = self.header[key]["data_offsets"]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            with open(self.path, "rb", buffering=0) as f:
                f.seek(self.start + begin)
                if f.readinto(view) != end - begin:
                    raise CheckpointError(f"{self.path}: truncated data for {key}")
        return out


def _load_pickle(path: Path, allow_unsafe: bool = False):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        # (the environment variable is for programs that take no flag, e.g. mergekit-yaml)
        if not allow_unsafe and os.environ.get(ALLOW_PICKLE_ENV) != "1":
            raise UnsafeCheckpoint(
                f"{path}: its pickle needs full unpickling, which can run arbitrary code, so it "
                "was refused (the weights-only unpickler rejected it). Convert it to safetensors "
                "in an environment you trust, or - only if you trust its source - pass "
                f"--allow-unsafe-pickle (or set {ALLOW_PICKLE_ENV}=1).") from e
        LOG.warning("%s: fully unpickling a checkpoint on explicit request", path)
        state = torch.load(path, map_location="cpu", weights_only=False)
        return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    except RuntimeError as e:
        if "mmap" not in str(e):
            raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e})") from None
        return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format


# ---- tensor sources: what a layer-wise runner reads weights from ----------------------------------

class CheckpointSource:
    """Tensors of a checkpoint by the model's parameter names (spec aliases and tied weights
    resolved)."""

    def __init__(self, checkpoint: Checkpoint, spec):
        self.checkpoint, self.rules = checkpoint, spec.weight_map()
        self._keys = set(checkpoint.keys())

    def key(self, name: str) -> Optional[str]:
        if name in self._keys:
            return name
        rule = self.rules.get(name)
        if rule is None:
            return None
        for candidate in (rule.name, *rule.aliases):
            if candidate in self._keys:
                return candidate
        return self.key(rule.tied_to) if rule.tied_to else None

    def get(self, name: str) -> Optional[torch.Tensor]:
        key = self.key(name)
        return None if key is None else self.checkpoint.get(key)


class StateSource:
    """Tensors of a state dict already in memory."""

    def __init__(self, state: Mapping[str, torch.Tensor], spec=None):
        self.state, self.rules = state, spec.weight_map() if spec is not None else {}

    def get(self, name: str) -> Optional[torch.Tensor]:
        if name in self.state:
            return self.state[name]
        rule = self.rules.get(name)
        for candidate in ((rule.name, *rule.aliases) if rule else ()):
            if candidate in self.state:
                return self.state[candidate]
        return self.get(rule.tied_to) if rule is not None and rule.tied_to else None


class AlignedSource:
    """Another source's tensors through an alignment (B in A's basis)."""

    def __init__(self, source, alignment):
        self.source, self.alignment = source, alignment

    def get(self, name: str) -> Optional[torch.Tensor]:
        t = self.source.get(name)
        return None if t is None else self.alignment.tensor(name, t)


class BlendSource:
    """The weighted average of several sources already in one basis."""

    def __init__(self, parts: Sequence[Tuple[float, object]]):
        self.parts = list(parts)

    def get(self, name: str) -> Optional[torch.Tensor]:
        tensors = [(w, s.get(name)) for w, s in self.parts]
        if any(t is None for _, t in tensors):
            return None
        return weighted_average([t for _, t in tensors], [w for w, _ in tensors])


def dtype_of(name: Optional[str]) -> Optional[torch.dtype]:
    """A dtype setting (RunSettings.dtype) -> torch dtype; None for auto (the checkpoint's)."""
    return None if name in (None, "auto") else getattr(torch, name)


def weighted_average(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """The one weighted average of this package: float64 accumulation, the first tensor's
    dtype out; non-floating tensors (index buffers) are taken from the first."""
    first = tensors[0]
    if not first.is_floating_point():
        return first
    total = float(sum(weights))
    if total == 0:
        raise ValueError("the model weights sum to zero")
    acc = None
    for t, w in zip(tensors, weights):
        term = float(w) * t.to(first.device, torch.float64)
        acc = term if acc is None else acc + term
    return (acc / total).to(first.dtype)


def average_states(weighted: Sequence[Tuple[float, Mapping[str, torch.Tensor]]]
                   ) -> Dict[str, torch.Tensor]:
    first = weighted[0][1]
    return {k: weighted_average([s[k] for _, s in weighted], [w for w, _ in weighted])
            for k in first}


# ---- streaming writer -----------------------------------------------------------------------------

_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}
_FROM_NAME = {v: k for k, v in _DTYPES.items()}
# (produced, written) floating dtypes whose values the written one holds exactly
_WIDENING = {(torch.float32, torch.float64), (torch.float16, torch.float32),
             (torch.float16, torch.float64), (torch.bfloat16, torch.float32),
             (torch.bfloat16, torch.float64)}
WIDEN_SLICE = 1 << 18   # elements widened and written at a time


def stream_safetensors(path: Path, layout: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]],
                       produce: Callable[[str], torch.Tensor],
                       metadata: Optional[Dict[str, str]] = None, hasher=None) -> None:
    """Write a safetensors file whose tensors are produced one at a time, in `layout` order:
    the header (names, dtypes, shapes, offsets) first, then each tensor's bytes (also fed to
    `hasher`, a hashlib object, when given). A tensor produced in a narrower floating dtype
    than its layout's (float32 sums of float64 statistics) is widened a slice at a time as it
    is written, never as a whole copy."""
    header: Dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, shape, dtype in layout:
        size = int(torch.tensor([], dtype=dtype).element_size()) * int(torch.Size(shape).numel())
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    heap = HeapWatch()
    heap.settle()
    with open(path, "wb") as f:
        def put(data) -> None:
            f.write(data)
            if hasher is not None:
                hasher.update(data)
        put(struct.pack("<Q", len(blob)))
        put(blob)
        for name, shape, dtype in layout:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or \
                    (t.dtype != dtype and (t.dtype, dtype) not in _WIDENING):
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, expected "
                                   f"{tuple(shape)} {dtype}")
            flat = t.detach().to("cpu").contiguous().reshape(-1)
            step = max(1, flat.numel()) if flat.dtype == dtype else WIDEN_SLICE
            for i in range(0, flat.numel(), step):
                put(flat[i:i + step].to(dtype).view(torch.uint8).numpy())
            del t, flat
            heap.check()   # temporaries, not a drifting heap (heap.py)


def write_like(src: Checkpoint, out_dir: Path, transform: Callable[[str, torch.Tensor], torch.Tensor],
               dtype: Optional[torch.dtype] = None, desc: str = "writing",
               copies: Optional[Dict[str, str]] = None) -> None:
    """A transformed copy of `src` in `out_dir`, shard by shard like the input (pickles become
    safetensors), one tensor in memory at a time; config and tokenizer files copied beside.
    `copies`: new key -> the key of `src` it starts as (written in that key's shard)."""
    out_dir = Path(out_dir)
    names = _output_names(src.files)
    shards: Dict[str, List[str]] = {}
    copies = copies or {}
    origin = {key: key for key in src.key_file}
    origin.update(copies)
    for key, from_key in origin.items():
        shards.setdefault(names[src.key_file[from_key]], []).append(key)
    total = sum(len(v) for v in shards.values())
    bar = tqdm(total=total, desc=desc, unit="tensor")
    weight_map = {}
    for out_file, keys in sorted(shards.items()):
        keys = sorted(keys)
        layout = []
        for key in keys:
            shape, stored = src.meta(origin[key])
            layout.append((key, shape, dtype if dtype is not None and stored.is_floating_point
                           else stored))
            weight_map[key] = out_file
        kinds = dict((k, d) for k, _, d in layout)

        def produce(key: str) -> torch.Tensor:
            bar.update(1)
            t = src.get(origin[key])
            kind = kinds[key]
            if not (t.is_floating_point() and kind.is_floating_point):
                return transform(key, t).to(kind)
            if torch.finfo(kind).eps < torch.finfo(t.dtype).eps:
                # widened first (bf16 -> float16: to float32), so the transform's result is
                # rounded once, to what is written
                t = t.to(torch.promote_types(t.dtype, kind))
            out = transform(key, t).to(kind)
            if torch.finfo(kind).max < torch.finfo(t.dtype).max and \
                    not bool(torch.isfinite(out).all()):
                raise CheckpointError(f"{key}: values beyond {kind}'s range "
                                      f"(+-{torch.finfo(kind).max:g}) would be written as inf; "
                                      "write bfloat16 or float32 instead (--dtype)")
            return out
        stream_safetensors(out_dir / out_file, layout, produce)
    bar.close()
    if len(shards) > 1:
        (out_dir / SAFE_INDEX).write_text(json.dumps(
            {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    copy_sidecars(src.root, out_dir)
    if dtype is not None:
        _set_config_dtype(out_dir / "config.json", dtype)


def _output_names(files: Sequence[str]) -> Dict[str, str]:
    if len(files) == 1:
        return {files[0]: "model.safetensors"}
    n = len(files)
    return {f: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, f in enumerate(sorted(files))}


def sidecar_files(src: Path) -> List[Path]:
    """The config, tokenizer and generation files a copy of a model carries beside its weights."""
    return [f for f in sorted(Path(src).iterdir())
            if f.is_file() and f.suffix in SIDECARS and f.name not in (SAFE_INDEX, BIN_INDEX)
            and not RUN_RECORDS.fullmatch(f.name)]


def copy_sidecars(src: Path, dst: Path) -> None:
    for f in sidecar_files(src):
        # contents only (modes from the umask): a read-only source's modes would make the
        # copy read-only, and the config's dtype could not be set in it
        shutil.copyfile(f, Path(dst) / f.name)


def _set_config_dtype(path: Path, dtype: torch.dtype) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    name = str(dtype).replace("torch.", "")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
