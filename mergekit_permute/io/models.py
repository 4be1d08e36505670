"""Opening model pairs and checking that they can be aligned, before any expensive work;
loading whole models where a caller needs one in memory (barrier sweeps, weight matching)."""

import hashlib
import logging
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Tuple

import torch
import transformers

from mergekit_permute.io.checkpoints import (
    ALLOW_PICKLE_ENV, Checkpoint, CheckpointSource, UnsafeCheckpoint, resolve,
)
from mergekit_permute.spec import PermutationSpec, architecture_of, spec_for_config

LOG = logging.getLogger(__name__)
__all__ = ["ALLOW_PICKLE_ENV", "IncompatibleModels", "Pair", "UnsafeCheckpoint", "check_pair",
           "load_config", "load_model", "load_tokenizer", "open_pair"]


class IncompatibleModels(ValueError):
    pass


def load_config(path: str):
    root = resolve(path)
    try:
        return transformers.AutoConfig.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"cannot read a model config from {path!r}: {e}") from e


def check_pair(config_a, config_b) -> PermutationSpec:
    arch_a, arch_b = architecture_of(config_a), architecture_of(config_b)
    if arch_a != arch_b:
        raise IncompatibleModels(f"model A is {arch_a} but model B is {arch_b}; both must share "
                                 "one architecture")
    spec_a, spec_b = spec_for_config(config_a), spec_for_config(config_b)
    if spec_a.num_layers != spec_b.num_layers:
        raise IncompatibleModels(f"layer counts differ: A has {spec_a.num_layers}, "
                                 f"B has {spec_b.num_layers}")
    for wa, wb in zip(spec_a.weights, spec_b.weights):
        if wa.shape != wb.shape:
            raise IncompatibleModels(f"{wa.name}: shape {wa.shape} in A but {wb.shape} in B "
                                     "(different widths or vocabularies)")
    tied_a, tied_b = (sorted(w.name for w in s.weights if w.tied_to) for s in (spec_a, spec_b))
    if tied_a != tied_b:
        which = "A" if len(tied_a) > len(tied_b) else "B"
        raise IncompatibleModels(f"model {which} ties its output head to the embeddings "
                                 "(tie_word_embeddings) and the other does not; both must be "
                                 "tied or both untied (`mergekit-permute untie MODEL --out "
                                 "COPY` unties one, keeping its function)")
    if spec_a != spec_b:
        raise IncompatibleModels("the models' attention head layouts differ (heads, KV heads, "
                                 "head_dim or rotary dims)")
    return spec_a


def check_tokenizers(tok_a, tok_b) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise IncompatibleModels("the two tokenizers have different vocabularies; alignment "
                                 "needs both models to read the same tokens")


# Files one of which a saved tokenizer holds (fast, sentencepiece, BPE, WordPiece, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model", "tokenizer.tiktoken")


def load_tokenizer(path: str):
    root = resolve(path)
    if not any((Path(root) / f).is_file() for f in TOKENIZER_FILES):
        raise IncompatibleModels(
            f"model {path} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])}, "
            "...): the models must be checked to read the same tokens, and the outputs carry "
            "the tokenizer. Save it beside the weights (tokenizer.save_pretrained(DIR)) or copy "
            "the tokenizer files of the model it was trained with")
    try:
        return transformers.AutoTokenizer.from_pretrained(root, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as e:
        raise IncompatibleModels(f"model {path}: its tokenizer cannot be loaded ({e})") from None


@dataclass
class Pair:
    """Two checkpoints of one architecture, opened (not loaded) and checked."""

    spec: PermutationSpec
    path_a: str
    path_b: str
    config: object
    checkpoint_a: Checkpoint
    checkpoint_b: Checkpoint
    tokenizer: object

    def source(self, which: str) -> CheckpointSource:
        return CheckpointSource(self.checkpoint_a if which == "a" else self.checkpoint_b,
                                self.spec)


def open_checkpoint(path: str, spec: PermutationSpec, allow_unsafe_pickle: bool = False
                    ) -> Checkpoint:
    checkpoint = Checkpoint(path, allow_unsafe_pickle)
    if checkpoint.is_pickle:
        LOG.warning("%s ships pickle weights only; they are read with the weights-only "
                    "unpickler. Convert them to safetensors (model.save_pretrained) to avoid "
                    "pickles.", path)
    spec.check_state_dict({k: checkpoint.meta(k)[0] for k in checkpoint.keys()})
    return checkpoint


def open_pair(path_a: str, path_b: str, allow_unsafe_pickle: bool = False) -> Pair:
    """Configs, architectures, widths, tokenizers and checkpoint contents, all checked."""
    config_a = load_config(path_a)
    spec = check_pair(config_a, load_config(path_b))
    tok_a, tok_b = load_tokenizer(path_a), load_tokenizer(path_b)
    check_tokenizers(tok_a, tok_b)
    return Pair(spec, path_a, path_b, config_a,
                open_checkpoint(path_a, spec, allow_unsafe_pickle),
                open_checkpoint(path_b, spec, allow_unsafe_pickle), tok_a)


def scan(checkpoint: Checkpoint) -> str:
    """Content hash of the weights (the statistics-cache key); refuses NaN or inf."""
    h = hashlib.sha256()   # (hardware-accelerated on current CPUs, unlike blake2b)
    bad = []
    for key in sorted(checkpoint.keys()):
        t = checkpoint.get(key)
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
        if t.is_floating_point() and not _all_finite(t):
            bad.append(key)
    if bad:
        raise IncompatibleModels(f"{checkpoint.path}: NaN or inf in {bad[:5]}")
    return h.hexdigest()


def _all_finite(t: torch.Tensor) -> bool:
    """For float32 and narrower, a float64 sum is finite exactly when every element is (it
    cannot overflow: n times float32's largest value stays far inside float64's range), and it
    is cheaper than isfinite."""
    if t.dtype == torch.float64:
        return bool(torch.isfinite(t).all())
    return bool(torch.isfinite(t.sum(dtype=torch.float64)))


def scan_pair(pair: Pair) -> Tuple[str, str]:
    """Both checkpoints' `scan`, side by side (hashing and the NaN check release the GIL)."""
    with ThreadPoolExecutor(2) as pool:
        return tuple(pool.map(scan, (pair.checkpoint_a, pair.checkpoint_b)))


def load_state(checkpoint: Checkpoint, dtype=None) -> Dict[str, torch.Tensor]:
    """A whole checkpoint in memory (weight matching and learned alignment need one)."""
    return {k: (t.to(dtype) if dtype is not None and t.is_floating_point() else t)
            for k, t in ((k, checkpoint.get(k)) for k in checkpoint.keys())}


def load_model(path: str, device="cpu", dtype=torch.float32, allow_unsafe_pickle: bool = False):
    """A whole model in memory (barrier sweeps evaluate whole models)."""
    config = load_config(path)
    cls = getattr(transformers, architecture_of(config))
    try:
        model = cls.from_pretrained(resolve(path), dtype=dtype, trust_remote_code=False)
    except pickle.UnpicklingError as e:
        checkpoint = Checkpoint(path, allow_unsafe_pickle)   # refused unless opted in
        model = cls(config).to(dtype)
        state = load_state(checkpoint)
        if not state:
            raise UnsafeCheckpoint(f"{path}: unreadable pickle ({e})") from e
        model.load_state_dict(state, strict=False)
        model.tie_weights()
    return model.to(device).eval()
