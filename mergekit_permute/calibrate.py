"""Calibration: run A and B over the same batches, capture features at the spec's feature
points with forward hooks, drop padding, and stream them into CrossStats."""

import logging
from contextlib import contextmanager
from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_permute.spec.base import FeaturePoint, PermutationSpec
from mergekit_permute.stats import CrossStats

LOG = logging.getLogger(__name__)


class NotEnoughTokens(ValueError):
    pass


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenize(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
             model=None) -> List[Dict[str, torch.Tensor]]:
    prepare_tokenizer(tokenizer)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        batches.append(model_inputs(dict(enc), model))
    return batches


def model_inputs(batch: Dict[str, torch.Tensor], model=None) -> Dict[str, torch.Tensor]:
    """Drop tokenizer outputs the model's forward does not take (e.g. token_type_ids)."""
    if model is None or "token_type_ids" not in batch:
        return batch
    import inspect
    if "token_type_ids" not in inspect.signature(model.forward).parameters:
        batch = {k: v for k, v in batch.items() if k != "token_type_ids"}
    return batch


def token_mask(batch: Dict[str, torch.Tensor], special_ids: Sequence[int], keep_special: bool
               ) -> torch.Tensor:
    mask = batch["attention_mask"].bool()
    if not keep_special and special_ids:
        mask &= ~torch.isin(batch["input_ids"], torch.tensor(list(special_ids)))
    return mask


def count_tokens(batches, special_ids, keep_special: bool) -> int:
    return int(sum(token_mask(b, special_ids, keep_special).sum() for b in batches))


def feature_points(spec: PermutationSpec, spaces: Sequence[str], qk: bool = False
                   ) -> List[Tuple[str, FeaturePoint]]:
    """(stats key, point) for every feature point of the requested spaces; with `qk`, also the
    query and key projections' outputs of attention spaces (keys `attn.i@q`, `attn.i@k`)."""
    points = [(f"{s}@{i}", p) for s in spaces for i, p in enumerate(spec.space(s).features)]
    if qk:
        points += [(f"{s}@{view}", spec.writer_point(s, view)) for s in spaces
                   if spec.space(s).kind == "attention" for view in ("q", "k")]
    return points


def select_part(features: torch.Tensor, part) -> torch.Tensor:
    """[..., n] -> [..., n_part]: one view out of a fused projection output."""
    if part is None:
        return features
    fused, j = part
    if fused.layout == "blocks":
        start = sum(fused.sizes[:j])
        return features[..., start:start + fused.sizes[j]]
    heads = fused.num_heads
    # [..., heads * parts * head_dim] -> [..., heads, parts, head_dim] -> [..., heads * head_dim]
    split = features.reshape(*features.shape[:-1], heads, len(fused.parts), -1)
    return split[..., j, :].reshape(*features.shape[:-1], -1)


@contextmanager
def capture(model: torch.nn.Module, points: Sequence[FeaturePoint]) -> Iterator[Dict[str, torch.Tensor]]:
    store: Dict[str, torch.Tensor] = {}
    handles, seen = [], set()
    for point in points:
        key = f"{point.module}:{point.where}"
        if key in seen:  # fused Q and K parts share one hooked output
            continue
        seen.add(key)
        module = model.get_submodule(point.module)
        if point.where == "input":
            def pre(mod, args, kwargs, key=key):
                store[key] = args[0] if args else next(iter(kwargs.values()))
            handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(mod, args, output, key=key):
                store[key] = output[0] if isinstance(output, (tuple, list)) else output
            handles.append(module.register_forward_hook(post))
    try:
        yield store
    finally:
        for h in handles:
            h.remove()


def minimum_tokens(spec: PermutationSpec, spaces: Sequence[str]) -> int:
    """A correlation over fewer tokens than features is rank-deficient and meaningless."""
    return max(spec.space(s).size for s in spaces) if spaces else 0


@torch.no_grad()
def calibrate(model_a, model_b, spec: PermutationSpec, batches, spaces: Sequence[str], *,
              special_ids: Sequence[int] = (), keep_special: bool = True, device="cpu",
              desc: str = "calibrating", qk: bool = False) -> Dict[str, CrossStats]:
    """CrossStats per `space@point` over every non-padding token of `batches`."""
    points = feature_points(spec, spaces, qk)
    available = count_tokens(batches, special_ids, keep_special)
    needed = minimum_tokens(spec, spaces)
    if available < needed:
        raise NotEnoughTokens(
            f"calibration data gives {available} tokens, but the widest space has {needed} "
            f"features: at least {needed} tokens are needed (10x that for a good estimate). "
            "Pass more text (--data / calibration_data) or raise --samples/--max-length."
        )
    stats: Dict[str, CrossStats] = {}
    fp = [p for _, p in points]
    with capture(model_a, fp) as cap_a, capture(model_b, fp) as cap_b:
        for batch in tqdm(batches, desc=desc, unit="batch"):
            mask = token_mask(batch, special_ids, keep_special).reshape(-1).to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            model_a(**inputs)
            model_b(**inputs)
            for key, point in points:
                name = f"{point.module}:{point.where}"
                a, b = (select_part(cap[name], point.part) for cap in (cap_a, cap_b))
                a = a.reshape(mask.shape[0], -1)[mask]  # [B, T, d] -> [tokens, d]
                b = b.reshape(mask.shape[0], -1)[mask]
                if key not in stats:
                    stats[key] = CrossStats.zeros(a.shape[1], b.shape[1], device=device)
                stats[key].update(a, b)
    return {k: v.to("cpu") for k, v in stats.items()}
