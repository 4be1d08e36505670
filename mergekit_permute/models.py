"""Loading model pairs and checking that they can be aligned, before any expensive work."""

import logging
import os
import pickle
from pathlib import Path
from typing import Tuple

import torch
import transformers

from mergekit_permute.spec import PermutationSpec, architecture_of, spec_for_config

LOG = logging.getLogger(__name__)


class IncompatibleModels(ValueError):
    pass


class UnsafeCheckpoint(ValueError):
    pass


ALLOW_PICKLE_ENV = "MERGEKIT_PERMUTE_ALLOW_UNSAFE_PICKLE"


def load_config(path: str):
    if not Path(path).exists() and (path.startswith(("/", ".", "~")) or path.count("/") > 1):
        raise FileNotFoundError(f"model {path!r} does not exist (neither a directory nor a hub id)")
    try:
        return transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    except OSError as e:
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
    if spec_a != spec_b:
        raise IncompatibleModels("the models' head layouts differ")
    return spec_a


def check_tokenizers(tok_a, tok_b) -> None:
    if tok_a.get_vocab() != tok_b.get_vocab():
        raise IncompatibleModels("the two tokenizers have different vocabularies; alignment "
                                 "needs both models to read the same tokens")


def load_tokenizer(path: str):
    return transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def load_model(path: str, device="cpu", dtype=torch.float32):
    config = load_config(path)
    cls = getattr(transformers, architecture_of(config))
    weights = {p.suffix for p in Path(path).glob("*") if p.is_file()} if Path(path).is_dir() else set()
    if weights and ".safetensors" not in weights and weights & {".bin", ".pt", ".pth"}:
        LOG.warning("%s ships pickle weights only; they are read with the weights-only unpickler. "
                    "Convert them to safetensors (model.save_pretrained) to avoid pickles.", path)
    try:
        model = cls.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    except pickle.UnpicklingError as e:
        if os.environ.get(ALLOW_PICKLE_ENV) != "1":
            raise UnsafeCheckpoint(
                f"{path}: its pickle needs full unpickling, which can run arbitrary code, so it "
                "was refused (the weights-only unpickler rejected it). Convert it to safetensors "
                "in an environment you trust, or - only if you trust its source - pass "
                f"--allow-unsafe-pickle (or set {ALLOW_PICKLE_ENV}=1).") from e
        LOG.warning("%s: fully unpickling a checkpoint on explicit request", path)
        model = _load_unsafe(cls, path, dtype)
    return model.to(device).eval()


def _load_unsafe(cls, path: str, dtype):
    config = load_config(path)
    model = cls(config).to(dtype)
    state = {}
    for f in sorted(Path(path).glob("*.bin")):
        state.update(torch.load(f, map_location="cpu", weights_only=False))
    model.load_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)},
                          strict=False)
    model.tie_weights()
    return model


def load_pair(path_a: str, path_b: str, device="cpu", dtype=torch.float32
              ) -> Tuple[PermutationSpec, object, object, object]:
    """(spec, model A, model B, tokenizer), checked for compatibility first."""
    spec = check_pair(load_config(path_a), load_config(path_b))
    tok_a, tok_b = load_tokenizer(path_a), load_tokenizer(path_b)
    check_tokenizers(tok_a, tok_b)
    model_a, model_b = load_model(path_a, device, dtype), load_model(path_b, device, dtype)
    for model in (model_a, model_b):
        state = model.state_dict()
        spec.check_state_dict({k: tuple(v.shape) for k, v in state.items()})
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise IncompatibleModels(f"{model.name_or_path}: NaN or inf in {bad[:5]}")
    return spec, model_a, model_b, tok_a
