"""Calibration: run A and B over the same batches, block by block (blocks.py), capture
features at the spec's feature points with forward hooks, drop padding, and stream them into
statistics. A layer's statistics are handed on as soon as its block has run."""

import inspect
import logging
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_permute.blocks import BlockModel
from mergekit_permute.data import clip_texts
from mergekit_permute.heap import HeapWatch, flat_heap, release_memory
from mergekit_permute.spec.base import FeaturePoint, PermutationSpec
from mergekit_permute.stats import CrossStats, ResidualSummary, Statistics

LOG = logging.getLogger(__name__)
Points = List[Tuple[str, FeaturePoint]]
# Called once per completed layer (None: the embeddings) with that layer's statistics.
OnLayer = Callable[[Optional[int], Dict[str, CrossStats]], None]
# Called after each layer but the last with (layer, hidden A, hidden B, residual summary).
Checkpoint = Callable[[int, List[torch.Tensor], List[torch.Tensor], ResidualSummary], None]


class NotEnoughTokens(ValueError):
    pass


def prepare_tokenizer(tokenizer):
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def tokenize(tokenizer, texts: Sequence[str], max_length: int, batch_size: int,
             architecture: Optional[str] = None) -> List[Dict[str, torch.Tensor]]:
    """Batches of at most `max_length` tokens a row. Rows are cut to what that many tokens can
    use before the tokenizer sees them (data.clip_texts): a huge row costs nothing."""
    prepare_tokenizer(tokenizer)
    batches = []
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(clip_texts(texts[i:i + batch_size], max_length), padding=True,
                        truncation=True, max_length=max_length, return_tensors="pt")
        batches.append(model_inputs(dict(enc), architecture))
    return batches


def model_inputs(batch: Dict[str, torch.Tensor], architecture: Optional[str] = None
                 ) -> Dict[str, torch.Tensor]:
    """Drop tokenizer outputs the model's forward does not take (e.g. token_type_ids)."""
    if architecture is None or "token_type_ids" not in batch:
        return batch
    import transformers
    forward = getattr(transformers, architecture).forward
    if "token_type_ids" not in inspect.signature(forward).parameters:
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


def feature_points(spec: PermutationSpec, spaces: Sequence[str], qk: bool = False) -> Points:
    """(stats key, point) for every feature point of the requested spaces; with `qk`, also the
    query and key projections' outputs of attention spaces (keys `attn.i@q`, `attn.i@k`)."""
    points = [(f"{s}@{i}", p) for s in spaces for i, p in enumerate(spec.space(s).features)]
    if qk:
        points += [(f"{s}@{view}", spec.writer_point(s, view)) for s in spaces
                   if spec.space(s).kind == "attention" for view in ("q", "k")]
    return points


def point_size(spec: PermutationSpec, key: str) -> int:
    """Features at a stats key's point (the same in A and B): its space's size, or its
    query/key view's for `space@q` / `space@k`."""
    space, view = key.split("@", 1)
    return spec.space(space).views[view] if view in ("q", "k") else spec.space(space).size


def select_part(features: torch.Tensor, part) -> torch.Tensor:
    """[..., n] -> [..., n_part]: one view out of a fused projection output."""
    if part is None:
        return features
    fused, j = part
    return features.index_select(-1, fused.part_index(j).to(features.device))


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


def check_tokens(available: int, spec: PermutationSpec, spaces: Sequence[str]) -> None:
    needed = minimum_tokens(spec, spaces)
    if available < needed:
        raise NotEnoughTokens(
            f"calibration data gives {available} tokens, but the widest space has {needed} "
            f"features: at least {needed} tokens are needed (10x that for a good estimate). "
            "Pass more text (--data / calibration_data) or raise --samples/--max-length."
        )


@torch.no_grad()
def calibrate_pair(spec: PermutationSpec, model_a: BlockModel, model_b: BlockModel, batches,
                   points: Points, masks: Sequence[torch.Tensor], *,
                   on_layer: Optional[OnLayer] = None, reduce=None, desc: str = "calibrating",
                   keep: bool = True, buffer_device=None, resume=None,
                   checkpoint: Optional[Checkpoint] = None) -> Statistics:
    """Statistics of every point over every unmasked token of `batches`, layer by layer:
    residual points go into the residual summary in depth order, the others are handed to
    `on_layer` (and kept in memory when `keep`). `reduce` (an all-reduce over ranks) is
    applied to each layer's sums before use. `buffer_device` (e.g. "cpu" for a small GPU)
    holds the hidden states between blocks; by default they stay where the block ran.
    `resume` (stats_cache.Resume) continues an interrupted run after its last checkpointed
    layer; `checkpoint(layer, hidden_a, hidden_b, residual)` is offered each layer's end."""
    flat_heap()
    by_layer: Dict[Optional[int], Points] = {}
    for key, point in points:
        by_layer.setdefault(spec.layer_of(point.module), []).append((key, point))
    stats = Statistics()
    heap = HeapWatch()
    flat_masks = [m.reshape(-1) for m in masks]
    # per batch: the unmasked rows of its [B * T] tokens (None: every row), found once
    kept = [None if bool(m.all()) else m.nonzero().squeeze(1) for m in flat_masks]

    def finish(layer: Optional[int], layer_stats: Dict[str, CrossStats]) -> None:
        # A point no batch reached (a rank with no batch, under torch.distributed) holds zero
        # sums of its shape: every rank all-reduces the same keys, in the same order.
        for key, _ in by_layer.get(layer, []):
            if key not in layer_stats:
                size = point_size(spec, key)
                layer_stats[key] = CrossStats.zeros(size, size)
        if reduce is not None:
            layer_stats = reduce(layer_stats)
        for key, point in by_layer.get(layer, []):
            if key.startswith("residual@"):
                stats.residual.add(layer_stats.pop(key))
        if on_layer is not None:
            on_layer(layer, layer_stats)
        if keep:
            stats._layers.update(layer_stats)

    def update(layer_stats, layer_points, cap_a, cap_b, j):
        rows = kept[j]
        for key, point in layer_points:
            name = f"{point.module}:{point.where}"
            a, b = (select_part(cap[name], point.part) for cap in (cap_a, cap_b))
            a, b = _tokens(a, flat_masks[j], rows), _tokens(b, flat_masks[j], rows)
            if key not in layer_stats:
                layer_stats[key] = CrossStats.zeros(a.shape[1], b.shape[1], device=a.device)
            layer_stats[key].update(a, b)

    # The embeddings: catch every block's inputs, with the pre-block feature points hooked.
    pre_points = by_layer.get(None, [])
    calls_a, calls_b, hidden_a, hidden_b = [], [], [], []
    pre_stats: Dict[str, CrossStats] = {}
    for model in (model_a, model_b):
        model.load(None)
    with capture(model_a.model, [p for _, p in pre_points]) as cap_a, \
            capture(model_b.model, [p for _, p in pre_points]) as cap_b:
        for j, batch in enumerate(batches):
            ha, ca = model_a.catch(batch)
            hb, cb = model_b.catch(batch)
            hidden_a.append(_park(ha, buffer_device))
            hidden_b.append(_park(hb, buffer_device))
            calls_a.append(ca)
            calls_b.append(cb)
            if resume is None:
                update(pre_stats, pre_points, cap_a, cap_b, j)
    for model in (model_a, model_b):
        model.free(None)
    if resume is None:
        finish(None, {k: v.to("cpu") for k, v in pre_stats.items()})
    else:   # the blocks' arguments recomputed, their hidden states as checkpointed
        _check_resumed(resume, hidden_a, hidden_b)
        hidden_a = [_park(h.to(c.device), buffer_device) for h, c in zip(resume.hidden_a, hidden_a)]
        hidden_b = [_park(h.to(c.device), buffer_device) for h, c in zip(resume.hidden_b, hidden_b)]
        stats.residual = resume.residual
    start = 0 if resume is None else resume.next_layer

    for layer in tqdm(range(start, spec.num_layers), desc=desc, unit="layer", initial=start,
                      total=spec.num_layers):
        layer_points = by_layer.get(layer, [])
        layer_stats: Dict[str, CrossStats] = {}
        model_a.load(layer)
        model_b.load(layer)
        with capture(model_a.model, [p for _, p in layer_points]) as cap_a, \
                capture(model_b.model, [p for _, p in layer_points]) as cap_b:
            for j in range(len(flat_masks)):
                ha = model_a.run(layer, hidden_a[j].to(model_a.device), calls_a[j][layer])
                hb = model_b.run(layer, hidden_b[j].to(model_b.device), calls_b[j][layer])
                update(layer_stats, layer_points, cap_a, cap_b, j)
                _store(hidden_a, j, ha)
                _store(hidden_b, j, hb)
                del ha, hb
                cap_a.clear()   # this batch's features, not held through the next forward
                cap_b.clear()
                if j == 0:   # the working set now exists (the first layer's is the bound)
                    heap.settle()
                else:
                    heap.check()
        model_a.free(layer)
        model_b.free(layer)
        release_memory()
        finish(layer, {k: v.to("cpu") for k, v in layer_stats.items()})
        if checkpoint is not None and layer + 1 < spec.num_layers:
            checkpoint(layer, hidden_a, hidden_b, stats.residual)
    for model in (model_a, model_b):
        model.free(None)   # (the spare block buffers too)
    stats.tokens = int(sum(int(m.sum()) for m in flat_masks))
    return stats


def _check_resumed(resume, hidden_a: List[torch.Tensor], hidden_b: List[torch.Tensor]) -> None:
    for saved, now in ((resume.hidden_a, hidden_a), (resume.hidden_b, hidden_b)):
        if [(h.shape, h.dtype) for h in saved] != [(h.shape, h.dtype) for h in now]:
            raise ValueError(
                f"the interrupted run kept in {resume.path} computed its hidden states in "
                f"another shape or dtype ({saved[0].dtype} against {now[0].dtype} now): run "
                "with its --device/--dtype to continue it, or with --no-cache to start over")


def _tokens(features: torch.Tensor, mask: torch.Tensor, rows: Optional[torch.Tensor]
            ) -> torch.Tensor:
    """[B, T, d] -> [tokens, d]: the unmasked tokens' rows (`rows`, the indices of `mask`'s
    true entries; None when every token counts, and then a view)."""
    flat = features.reshape(mask.shape[0], -1)   # [B * T, d]
    return flat if rows is None else flat.index_select(0, rows.to(flat.device))


def _park(hidden: torch.Tensor, device) -> torch.Tensor:
    if device is None or hidden.device == torch.device(device):
        return hidden
    out = hidden.to(device)
    return out.pin_memory() if out.device.type == "cpu" and torch.cuda.is_available() else out


def _store(buffers: List[torch.Tensor], j: int, hidden: torch.Tensor) -> None:
    """A block's output into the buffer of its input, in place: the buffers stay where they
    were allocated instead of moving through the heap with every batch."""
    if buffers[j].shape == hidden.shape and buffers[j].dtype == hidden.dtype:
        buffers[j].copy_(hidden)
    else:
        buffers[j] = _park(hidden, buffers[j].device)


def calibrate(model_a, model_b, spec: PermutationSpec, batches, spaces: Sequence[str], *,
              special_ids: Sequence[int] = (), keep_special: bool = True, device="cpu",
              desc: str = "calibrating", qk: bool = False) -> Statistics:
    """Statistics of two models already in memory (same code path as from disk)."""
    check_tokens(count_tokens(batches, special_ids, keep_special), spec, spaces)
    masks = [token_mask(b, special_ids, keep_special) for b in batches]
    return calibrate_pair(spec, BlockModel(spec, model_a, device=device),
                          BlockModel(spec, model_b, device=device), batches,
                          feature_points(spec, spaces, qk), masks, desc=desc)
