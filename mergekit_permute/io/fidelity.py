"""How closely a written model computes B's function, next to what storing B's function in
the written dtype costs anyway.

A rotated residual cannot be stored exactly in bf16: aligned B, rounded once to the
checkpoint's dtype, differs from B by rounding. The honest yardstick is the rounding itself:
B's own float32 original stored in that dtype. For a checkpoint that exists only in bf16 that
original is emulated: B plus uniform noise below half a unit in the last place, a float32
model that rounds to B exactly. Both are measured on the same short token sequences, on the
real model class, streamed module by module (one module's weights in memory at a time).
"""

import logging
import math
from typing import Dict, Optional

import numpy as np
import torch
import transformers
from accelerate import init_empty_weights

from mergekit_permute.io.checkpoints import Checkpoint, CheckpointSource
from mergekit_permute.spec.base import PermutationSpec

LOG = logging.getLogger(__name__)
ROWS, TOKENS = 2, 32   # the probe: fixed-seed token ids (a numerical check, not a quality one)
SLAB = 1 << 22         # elements
# A written model fails the check beyond this, or beyond RATIO x the cost of storing B's own
# function in the written dtype. Exact symmetries measure ~1e-6 in float32 and 0.6-0.8x the
# rounding baseline in bf16 (BENCHMARKS.md, scale); a missed symmetry rule measures ~0.1-1.
FLOOR, RATIO = 1e-3, 10.0


class FunctionCheckFailed(ValueError):
    pass


def require_function(check: Dict[str, object], what: str) -> None:
    """Refuse a written model that does not compute B's function (a bug, or a feature of the
    architecture that its spec does not cover), before it lands."""
    limit = max(FLOOR, RATIO * float(check["rounding_baseline"]))
    if not float(check["aligned_vs_b"]) <= limit:
        raise FunctionCheckFailed(
            f"{what} does not compute the original model's function: relative logit "
            f"difference {float(check['aligned_vs_b']):.3g} against {float(check['rounding_baseline']):.3g} "
            f"for storing it in {check['dtype']} (limit {limit:.3g}); nothing was written. The "
            "architecture likely has a feature its permutation spec does not cover: please "
            "report it with the model's config.json")


class _Noisy:
    """A source's tensors plus uniform noise within +-0.49 units in the last place of
    `dtype`: a float32 model that `dtype` rounds back to the source exactly."""

    def __init__(self, source, dtype: torch.dtype):
        # mantissa bits: eps is 2^-bits
        self.source, self.bits = source, -int(math.log2(torch.finfo(dtype).eps))

    def get(self, name: str) -> Optional[torch.Tensor]:
        t = self.source.get(name)
        if t is None or not t.is_floating_point():
            return t
        rng = np.random.default_rng(sum(map(ord, name)))   # (deterministic per name)
        out = torch.empty(t.shape, dtype=torch.float32)
        flat, into = t.reshape(-1), out.view(-1)
        for i in range(0, flat.numel(), SLAB):   # (an embedding's temporaries: a slab at a time)
            into[i:i + SLAB] = self._noisy(flat[i:i + SLAB].to(torch.float32), rng)
        return out

    def _noisy(self, t: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:   # t: [n]
        if self.bits == 7:
            # bfloat16 is float32's upper half, and float32 bit patterns of one sign are
            # ordered like their values: up to 0x7fff units of float32's last place either
            # way rounds back (to nearest) to the same bfloat16, across binade edges too
            r = torch.from_numpy(rng.integers(-0x7FFF, 0x8000, t.numel(), dtype=np.int32))
            return torch.where(t == 0, t, (t.view(torch.int32) + r).view(torch.float32))
        mantissa, exponent = torch.frexp(t)
        # the spacing below a power of two is half the one above it: the smaller one
        exponent = exponent - (mantissa.abs() == 0.5).int()
        ulp = torch.ldexp(torch.ones_like(t), exponent - 1 - self.bits)
        noise = torch.from_numpy(rng.uniform(-0.49, 0.49, t.numel()).astype(np.float32))
        return torch.where(t == 0, t, t + noise * ulp)


class _Rounded:
    def __init__(self, source, dtype: torch.dtype):
        self.source, self.dtype = source, dtype

    def get(self, name: str) -> Optional[torch.Tensor]:
        t = self.source.get(name)
        return t.to(self.dtype) if t is not None and t.is_floating_point() else t


@torch.no_grad()
def streamed_logits(spec: PermutationSpec, config, source, input_ids: torch.Tensor,
                    device="cpu") -> torch.Tensor:
    """The model's float32 logits on `input_ids`, every module's weights loaded from `source`
    as it is called and dropped after."""
    with init_empty_weights(include_buffers=False):
        model = getattr(transformers, spec.architecture)(config).eval()
    for name, buf in list(model.named_buffers()):
        module, _, attr = name.rpartition(".")
        model.get_submodule(module)._buffers[attr] = buf.to(device)
    hooks = []
    for mname, module in model.named_modules(remove_duplicate=False):
        names = [a for a, p in module._parameters.items() if p is not None]
        if not names:
            continue

        def load(m, _args, mname=mname, names=names):
            for a in names:
                t = source.get(f"{mname}.{a}" if mname else a)
                if t is None:
                    raise KeyError(f"{mname}.{a}: not in the checkpoint")
                m._parameters[a] = torch.nn.Parameter(
                    t.to(device, torch.float32 if t.is_floating_point() else t.dtype),
                    requires_grad=False)

        def drop(m, _args, _out, names=names):
            for a in names:
                p = m._parameters[a]
                m._parameters[a] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        hooks += [module.register_forward_pre_hook(load), module.register_forward_hook(drop)]
    try:
        out = model(input_ids=input_ids.to(device))
    finally:
        for h in hooks:
            h.remove()
    for field in ("logits", "prediction_logits", "last_hidden_state"):   # (a bare encoder's)
        if getattr(out, field, None) is not None:
            return getattr(out, field).float().cpu()
    raise ValueError(f"{spec.architecture}: its output holds no logits to compare")


def probe_ids(config) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    tokens = min(TOKENS, getattr(config, "max_position_embeddings", TOKENS))
    return torch.randint(4, config.vocab_size, (ROWS, tokens), generator=gen)


def _relative(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm((x - ref).double())
                 / torch.linalg.vector_norm(ref.double()).clamp_min(1e-30))


def fidelity(spec: PermutationSpec, config, original: Checkpoint, written: Checkpoint,
             device="cpu") -> Dict[str, object]:
    """{dtype, aligned_vs_b, rounding_baseline}: relative logit differences (L2 over the
    probe's logits) of the written model against B, and of B's float32 original against
    that original stored in the written dtype."""
    b = CheckpointSource(original, spec)
    out = CheckpointSource(written, spec)
    ids = probe_ids(config)
    stored = {original.meta(k)[1] for k in original.keys() if original.meta(k)[1].is_floating_point}
    dtypes = {written.meta(k)[1] for k in written.keys() if written.meta(k)[1].is_floating_point}
    dtype = min(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
    ref = streamed_logits(spec, config, b, ids, device)
    aligned = _relative(streamed_logits(spec, config, out, ids, device), ref)
    if all(torch.finfo(d).bits > torch.finfo(dtype).bits for d in stored):
        # B is stored wider than written: B itself, rounded
        rounded = streamed_logits(spec, config, _Rounded(b, dtype), ids, device)
        rounding = _relative(rounded, ref)
    else:
        # B's float32 original, emulated: it rounds to B, whose logits are `ref`
        rounding = _relative(ref, streamed_logits(spec, config, _Noisy(b, dtype), ids, device))
    result = {"dtype": str(dtype).replace("torch.", ""), "aligned_vs_b": aligned,
              "rounding_baseline": rounding,
              "probe": f"{ROWS} x {TOKENS} fixed-seed token ids, float32 logits, "
                       "relative L2 difference"}
    LOG.info("aligned B vs B: %.2e relative logit difference (%s rounding of B's float32 "
             "original: %.2e)", aligned, result["dtype"], rounding)
    return result
