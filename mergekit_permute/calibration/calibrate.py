"""Calibration: run A and B over the same batches, block by block (blocks.py), capture
features at the spec's feature points with forward hooks, drop padding, and stream them into
statistics. A layer's statistics are handed on as soon as its block has run."""

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm

from mergekit_permute.calibration.blocks import BlockModel
from mergekit_permute.calibration.heap import HeapWatch, flat_heap, release_memory
from mergekit_permute.spec.base import FeaturePoint, PermutationSpec
from mergekit_permute.calibration.stats import CrossStats, ResidualSummary, Statistics

LOG = logging.getLogger(__name__)
Points = List[Tuple[str, FeaturePoint]]
# Called once per completed layer (None: the embeddings) with that layer's statistics.
OnLayer = Callable[[Optional[int], Dict[str, CrossStats]], None]
# Called after each layer but the last with (layer, hidden A, hidden B, residual summary).
Checkpoint = Callable[[int, List[torch.Tensor], List[torch.Tensor], ResidualSummary], None]


class NotEnoughTokens(ValueError):
    pass


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
            "Pass more text (align: --data; barrier: --calibration; a recipe: calibration_data) "
            "or raise --samples/--max-length."
        )


@dataclass
class Hooks:
    """What a calibration hands on: each completed layer's statistics (`on_layer`), an
    all-reduce over ranks applied to them first (`reduce`), and the state after each layer but
    the last, for a resumable checkpoint (`checkpoint`)."""

    on_layer: Optional[OnLayer] = None
    reduce: Optional[Callable[[Dict[str, CrossStats]], Dict[str, CrossStats]]] = None
    checkpoint: Optional[Checkpoint] = None


class PairCalibration:
    """Both models over the same batches, block by block: `catch` runs the embeddings and
    records every block's inputs, `run_layer` runs one block of each model over every batch
    with its feature points hooked, `finish_layer` hands the layer's statistics on. Residual
    points go into the residual summary in depth order; with `keep` the others stay in memory.
    `buffer_device` (e.g. "cpu" for a small GPU) holds the hidden states between blocks."""

    def __init__(self, spec: PermutationSpec, models: Tuple[BlockModel, BlockModel],
                 points: Points, masks: Sequence[torch.Tensor], hooks: Hooks = Hooks(), *,
                 keep: bool = True, buffer_device=None, products: torch.dtype = torch.float32):
        self.spec, self.models, self.hooks, self.keep = spec, models, hooks, keep
        self.buffer_device, self.products = buffer_device, products
        self.by_layer: Dict[Optional[int], Points] = {}
        for key, point in points:
            self.by_layer.setdefault(spec.layer_of(point.module), []).append((key, point))
        self.masks = [m.reshape(-1) for m in masks]
        # per batch: the unmasked rows of its [B * T] tokens (None: every row), found once
        self.kept = [None if bool(m.all()) else m.nonzero().squeeze(1) for m in self.masks]
        self.stats = Statistics()
        self.hidden: Tuple[List[torch.Tensor], List[torch.Tensor]] = ([], [])
        self.calls: Tuple[List, List] = ([], [])
        self.heap = HeapWatch()

    def catch(self, batches, resume=None) -> int:
        """The blocks' inputs of every batch (statistics of the pre-block points unless
        resuming); returns the first layer to run."""
        pre_points = self.by_layer.get(None, [])
        pre_stats: Dict[str, CrossStats] = {}
        for model in self.models:
            model.load(None)
        with capture(self.models[0].model, [p for _, p in pre_points]) as cap_a, \
                capture(self.models[1].model, [p for _, p in pre_points]) as cap_b:
            for j, batch in enumerate(batches):
                for model, hidden, calls in zip(self.models, self.hidden, self.calls):
                    h, c = model.catch(batch)
                    hidden.append(_park(h, self.buffer_device))
                    calls.append(c)
                if resume is None:
                    self._update(pre_stats, pre_points, (cap_a, cap_b), j)
        for model in self.models:
            model.free(None)
        if resume is None:
            self.finish_layer(None, {k: v.to("cpu") for k, v in pre_stats.items()})
            return 0
        # the blocks' arguments recomputed, their hidden states as checkpointed
        _check_resumed(resume, *self.hidden)
        self.hidden = tuple([_park(h.to(c.device), self.buffer_device) for h, c in zip(saved, now)]
                            for saved, now in ((resume.hidden_a, self.hidden[0]),
                                               (resume.hidden_b, self.hidden[1])))
        self.stats.residual = resume.residual
        return resume.next_layer

    def run_layer(self, layer: int) -> None:
        points = self.by_layer.get(layer, [])
        layer_stats: Dict[str, CrossStats] = {}
        for model in self.models:
            model.load(layer)
        with capture(self.models[0].model, [p for _, p in points]) as cap_a, \
                capture(self.models[1].model, [p for _, p in points]) as cap_b:
            for j in range(len(self.masks)):
                outs = [model.run(layer, hidden[j].to(model.device), calls[j][layer])
                        for model, hidden, calls in zip(self.models, self.hidden, self.calls)]
                self._update(layer_stats, points, (cap_a, cap_b), j)
                for hidden, out in zip(self.hidden, outs):
                    _store(hidden, j, out)
                del outs
                cap_a.clear()   # this batch's features, not held through the next forward
                cap_b.clear()
                if j == 0:   # the working set now exists (the first layer's is the bound)
                    self.heap.settle()
                else:
                    self.heap.check()
        for model in self.models:
            model.free(layer)
        release_memory()
        self.finish_layer(layer, {k: v.to("cpu") for k, v in layer_stats.items()})
        if self.hooks.checkpoint is not None and layer + 1 < self.spec.num_layers:
            self.hooks.checkpoint(layer, *self.hidden, self.stats.residual)

    def finish_layer(self, layer: Optional[int], layer_stats: Dict[str, CrossStats]) -> None:
        # A point no batch reached (a rank with no batch, under torch.distributed) holds zero
        # sums of its shape: every rank all-reduces the same keys, in the same order.
        for key, _ in self.by_layer.get(layer, []):
            if key not in layer_stats:
                size = point_size(self.spec, key)
                layer_stats[key] = CrossStats.zeros(size, size)
        if self.hooks.reduce is not None:
            layer_stats = self.hooks.reduce(layer_stats)
        for key, _ in self.by_layer.get(layer, []):
            if key.startswith("residual@"):
                self.stats.residual.add(layer_stats.pop(key))
        if self.hooks.on_layer is not None:
            self.hooks.on_layer(layer, layer_stats)
        if self.keep:
            self.stats.update(layer_stats)

    def done(self) -> Statistics:
        for model in self.models:
            model.free(None)   # (the spare block buffers too)
        self.stats.tokens = int(sum(int(m.sum()) for m in self.masks))
        return self.stats

    def _update(self, layer_stats: Dict[str, CrossStats], points: Points, caps, j: int) -> None:
        for key, point in points:
            name = f"{point.module}:{point.where}"
            a, b = (_tokens(select_part(cap[name], point.part), self.masks[j], self.kept[j])
                    for cap in caps)
            if key not in layer_stats:
                layer_stats[key] = CrossStats.zeros(a.shape[1], b.shape[1], device=a.device,
                                                    products=self.products)
            layer_stats[key].update(a, b)


@torch.no_grad()
def calibrate_pair(spec: PermutationSpec, models: Tuple[BlockModel, BlockModel], batches,
                   points: Points, masks: Sequence[torch.Tensor], hooks: Hooks = Hooks(), *,
                   keep: bool = True, buffer_device=None, resume=None,
                   products: torch.dtype = torch.float32) -> Statistics:
    """Statistics of every point over every unmasked token of `batches`, layer by layer (see
    PairCalibration); `resume` (calibration.resume.Resume) continues an interrupted run after
    its last checkpointed layer."""
    flat_heap()
    run = PairCalibration(spec, models, points, masks, hooks, keep=keep,
                          buffer_device=buffer_device, products=products)
    start = run.catch(batches, resume)
    for layer in tqdm(range(start, spec.num_layers), desc="calibrating", unit="layer",
                      initial=start, total=spec.num_layers):
        run.run_layer(layer)
    return run.done()


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
              qk: bool = False) -> Statistics:
    """Statistics of two models already in memory (same code path as from disk)."""
    check_tokens(count_tokens(batches, special_ids, keep_special), spec, spaces)
    masks = [token_mask(b, special_ids, keep_special) for b in batches]
    return calibrate_pair(spec, (BlockModel(spec, model_a, device=device),
                                 BlockModel(spec, model_b, device=device)), batches,
                          feature_points(spec, spaces, qk), masks)
