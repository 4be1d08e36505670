"""align(): the one entry point every caller uses (the CLI, a MergeKit `permute` run, barrier
sweeps, the demo): checkpoints -> calibration batches -> layer-wise statistics (cached) ->
transforms solved on every core as layers complete -> an Alignment."""

import logging
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mergekit_permute.alignment import Alignment
from mergekit_permute.blocks import BlockModel
from mergekit_permute.calibrate import (
    calibrate_pair, check_tokens, count_tokens, feature_points, tokenize, token_mask,
)
from mergekit_permute.data import fingerprint, load_texts
from mergekit_permute.dist import Distributed
from mergekit_permute.heap import flat_heap
from mergekit_permute.models import Pair, load_state, open_pair, scan_pair
from mergekit_permute.settings import AlignSettings, check_settings, residual_policy
from mergekit_permute.solve import Solver, assemble
from mergekit_permute.spec.base import PermutationSpec
from mergekit_permute.stats import CrossStats, Statistics
from mergekit_permute.stats_cache import CacheMode, StatsCache, cache_key

LOG = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def calibration_spaces(spec: PermutationSpec) -> List[str]:
    """Every space whose statistics any setting could use."""
    return [s.name for s in spec.spaces if not s.frozen]


def compute_dtype(device: str, dtype: Optional[str], stored: torch.dtype) -> torch.dtype:
    """Forwards run in the checkpoint's dtype on a GPU (`auto`) and in float32 on the CPU."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return stored if dtype in (None, "auto") else DTYPES[dtype]


@dataclass
class Calibration:
    """Tokenized calibration text for one pair, with its provenance."""

    texts: List[str]
    batches: List[Dict[str, torch.Tensor]]
    masks: List[torch.Tensor]
    source: str

    @property
    def tokens(self) -> int:
        return int(sum(int(m.sum()) for m in self.masks))

    def info(self, tokens: int) -> Dict:
        return {"source": self.source, "passages": len(self.texts),
                "fingerprint": fingerprint(self.texts), "tokens": tokens}


def prepare_calibration(pair: Pair, data: str, settings: AlignSettings) -> Calibration:
    from mergekit_permute.preflight import check_max_length
    check_max_length(settings.max_length, [(f"model {pair.path_a}", pair.config)])
    texts = load_texts(data, settings.samples)
    tok = pair.tokenizer
    batches = tokenize(tok, texts, settings.max_length, settings.batch_size,
                       pair.spec.architecture)
    special = tok.all_special_ids
    check_tokens(count_tokens(batches, special, settings.keep_special_tokens), pair.spec,
                 calibration_spaces(pair.spec))
    masks = [token_mask(b, special, settings.keep_special_tokens) for b in batches]
    return Calibration(texts, batches, masks, data)


GiB = float(1 << 30)


def available_memory(device: str) -> int:
    """Bytes free on the device (a GPU's free memory, or the host's MemAvailable)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return int(torch.cuda.mem_get_info(dev)[0])
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62   # unknown: do not refuse


def memory_plan(pair: Pair, calib: Calibration, device: str, dtype: Optional[str]) -> Dict:
    """What layer-wise calibration needs at its peak: both models' embeddings and head or two
    blocks (the larger), the two hidden-state buffers, one block's activations, and one
    layer's statistics (float64 sums and their correlation, on the host). Decides whether the
    hidden states stay on the device or wait on the host."""
    spec, ckpt = pair.spec, pair.checkpoint_a
    size = compute_dtype(device, dtype, ckpt.dtype()).itemsize
    source = pair.source("a")

    def weight_bytes(rules) -> int:
        total = 0
        for rule in rules:
            key = source.key(rule.name)
            if key is not None:
                shape = ckpt.meta(key)[0]
                total += int(torch.Size(shape).numel()) * size
        return total
    outside = weight_bytes([w for w in spec.weights if w.layer is None])
    block = weight_bytes(spec.layer_tensors(0))
    hidden_size = spec.space("residual").size
    padded = sum(int(b["input_ids"].numel()) for b in calib.batches)
    widest = max(s.size for s in spec.spaces)
    batch_tokens = max(int(b["input_ids"].numel()) for b in calib.batches)
    plan = {"weights": 2 * max(outside, block),
            "hidden": 2 * padded * hidden_size * size,
            "activations": 8 * batch_tokens * widest * size,
            "statistics": 3 * widest * widest * 8}
    free = available_memory(device)
    plan["buffer_device"] = None
    on_device = plan["weights"] + plan["activations"] + plan["hidden"]
    if torch.device(device).type == "cuda" and on_device > 0.9 * free:
        plan["buffer_device"] = "cpu"   # the hidden states wait on the host between blocks
        on_device -= plan["hidden"]
    host = plan["statistics"] + (plan["hidden"] if plan["buffer_device"] == "cpu" else 0)
    if torch.device(device).type == "cpu":
        host += on_device
        on_device = 0
    for where, need, have in (("device " + device, on_device, free),
                              ("host", host, available_memory("cpu"))):
        if need > have:
            raise MemoryError(
                f"layer-wise calibration needs about {need / GiB:.1f} GiB on the {where} "
                f"(two blocks or the embeddings {plan['weights'] / GiB:.2f}, hidden states "
                f"{plan['hidden'] / GiB:.2f}, one layer's statistics "
                f"{plan['statistics'] / GiB:.2f}), but {have / GiB:.1f} GiB are free. Lower "
                "--samples, --max-length or --batch-size, or use a larger device.")
    return plan


def block_models(pair: Pair, device: str, dtype: Optional[str], sources=None):
    stored = pair.checkpoint_a.dtype()
    run_dtype = compute_dtype(device, dtype, stored)
    sources = sources or (pair.source("a"), pair.source("b"))
    return tuple(BlockModel.skeleton(pair.spec, pair.config, s, device, run_dtype)
                 for s in sources)


def statistics(pair: Pair, calib: Calibration, settings: AlignSettings, *, qk: bool,
               device: str = "cpu", dtype: Optional[str] = None, cache: CacheMode = "use",
               on_layer: Optional[Callable] = None, keep: bool = True, sources=None,
               fingerprints: Optional[Sequence[str]] = None,
               dist: Optional[Distributed] = None) -> Statistics:
    """Calibration statistics of a pair: from a valid cache entry, or computed layer by layer
    (and cached), as `cache` (stats_cache.CacheMode) says. `on_layer(layer, stats)` sees every
    layer's statistics either way; `keep` holds them in memory for later (several methods on
    one set of statistics). `sources`
    replace the checkpoints' weights (e.g. a running average); they are not cached unless
    `fingerprints` name them."""
    spec = pair.spec
    dist = dist or Distributed()
    points = feature_points(spec, calibration_spaces(spec), qk)
    store = None
    if cache != "off" and (sources is None or fingerprints is not None):
        fa, fb = fingerprints or scan_pair(pair)
        key = cache_key(fa, fb, fingerprint(calib.texts), settings.calibration_key(), qk)
        store = StatsCache(key, expected_shapes(spec, points), spec.space("residual").size)
    entry = store.load() if store is not None and cache == "use" else None
    if entry is not None:
        stats = entry.statistics() if not keep else Statistics(residual=entry.residual,
                                                               tokens=entry.statistics().tokens)
        for _, layer_stats in entry.layers():
            if on_layer is not None:
                on_layer(None, layer_stats)
            if keep:
                stats._layers.update(layer_stats)
        return stats
    # An interrupted run's checkpoint is continued (one process: with several, every rank
    # holds only its share of the hidden states).
    resume = store.resumable() if store is not None and cache == "use" and dist.size == 1 \
        else None
    writer = store.writer(resume) if store is not None and dist.is_main else None
    resume = writer.resumed if writer is not None else None
    resumed_layers: Dict[str, CrossStats] = {}
    if resume is not None:
        LOG.info("continuing an interrupted calibration at layer %d of %d (%s)",
                 resume.next_layer, spec.num_layers, resume.path)
        for layer_stats in resume.layers():
            if on_layer is not None:
                on_layer(None, layer_stats)
            if keep:
                resumed_layers.update(layer_stats)

    def layer_done(layer, layer_stats):
        if writer is not None:
            writer.layer(layer, layer_stats)
        if on_layer is not None:
            on_layer(layer, layer_stats)

    plan = memory_plan(pair, calib, device, dtype)
    model_a, model_b = block_models(pair, device, dtype, sources)
    batches, masks = dist.shard(calib.batches), dist.shard(calib.masks)
    try:
        stats = calibrate_pair(spec, model_a, model_b, batches, points, masks,
                               on_layer=layer_done, keep=keep, reduce=dist.reduce,
                               buffer_device=plan["buffer_device"], resume=resume,
                               checkpoint=writer.checkpoint if writer is not None
                               and dist.size == 1 else None)
        stats._layers.update(resumed_layers)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    stats.tokens = dist.total(sum(int(m.sum()) for m in masks))
    if writer is not None:
        writer.finish(stats.residual, stats.tokens)
    return stats


def expected_shapes(spec: PermutationSpec, points) -> Dict[str, tuple]:
    """Stats key -> (features of A, features of B) for every non-residual point."""
    shapes = {}
    for key, _ in points:
        space, point = key.split("@")
        if space == "residual":
            continue
        n = spec.space(space).views[point] if point in ("q", "k") else spec.space(space).size
        shapes[key] = (n, n)
    return shapes


def pair_gains(pair: Pair, sources=None):
    """A's and B's norm gains (float64) for folding; read from the checkpoints."""
    sa, sb = sources or (pair.source("a"), pair.source("b"))
    names = [f.norm for f in pair.spec.norm_folds]
    return tuple({n: s.get(n).detach().to("cpu", torch.float64) for n in names} for s in (sa, sb))


def align(model_a: str, model_b: str, data: Optional[str], settings: AlignSettings, *,
          device: str = "cpu", dtype: Optional[str] = None, workers: Optional[int] = None,
          cache: CacheMode = "use", pair: Optional[Pair] = None, sources=None,
          dist: Optional[Distributed] = None) -> Alignment:
    """B's transforms into A's basis. Activation matching: layer-wise calibration, each
    layer's spaces solved in a process pool while later layers are calibrated. Weight
    matching: both whole models in memory (it reads every weight of every space at once)."""
    start = time.perf_counter()
    flat_heap()
    dist = dist or Distributed()
    pair = pair or open_pair(model_a, model_b)
    spec = pair.spec
    check_settings(spec, settings)
    if not settings.function_preserving:
        LOG.warning("attention=ignore_heads is NOT function-preserving (paper ablation only)")
    info: Dict = {"model_a": model_a, "model_b": model_b, "matching": settings.matching}
    if settings.aligns_nothing:
        alignment = Alignment.identity(spec, settings)
    elif settings.matching == "learned":
        start_settings = settings.model_copy(update={"matching": "activations"})
        alignment = align(model_a, model_b, data, start_settings, device=device, dtype=dtype,
                          workers=workers, cache=cache, pair=pair, sources=sources,
                          dist=dist)
        if dist.is_main:
            alignment = learn_alignment(pair, alignment, data, settings, device, sources)
        alignment.settings = settings
        info["data"] = alignment.info.get("data")
    elif settings.matching == "weights":
        from mergekit_permute.weight_match import weight_match_alignment
        sa, sb = sources or (pair.source("a"), pair.source("b"))
        states = [load_state(c) for c in (pair.checkpoint_a, pair.checkpoint_b)] \
            if sources is None else [_state_of(s, pair) for s in (sa, sb)]
        alignment = weight_match_alignment(spec, states[0], states[1], settings)
        info["data"] = None
    else:
        calib = prepare_calibration(pair, data, settings)
        solver = Solver(spec, settings, workers if dist.is_main else 1,
                        overlap=torch.device(device).type != "cpu")
        try:
            stats = statistics(pair, calib, settings, qk=settings.needs_qk_features,
                               device=device, dtype=dtype, cache=cache, keep=False,
                               sources=sources, dist=dist,
                               on_layer=lambda _, s: dist.is_main and solver.submit_layer(s))
        except BaseException:
            solver.close()
            raise
        gains = pair_gains(pair, sources) if residual_policy(settings, spec) == "orthogonal" \
            else ({}, {})
        alignment = assemble(spec, settings, solver.results(), stats.residual, gains)
        info["data"] = calib.info(stats.tokens)
    alignment.info = {**info, **alignment.info}
    alignment.timings["total_seconds"] = round(time.perf_counter() - start, 2)
    return alignment


def learn_alignment(pair: Pair, start: Alignment, data: str, settings: AlignSettings,
                    device: str = "cpu", sources=None) -> Alignment:
    """`start` refined by learned exact symmetries (learn.py) on the calibration text: both
    models whole in memory, a held-out tenth of the batches for early stopping."""
    import transformers

    from mergekit_permute.barrier import eval_batches, objective_for
    from mergekit_permute.learn import Schedule, learn
    from mergekit_permute.settings import lambdas_of
    spec = pair.spec
    objective = objective_for(spec.architecture)
    if objective == "cls":
        raise ValueError(f"matching=learned needs a language-model loss; {spec.architecture} "
                         "has a task head (align it with matching=activations)")
    texts = load_texts(data, settings.samples)
    batches = eval_batches(pair.tokenizer, texts, objective, max_length=settings.max_length,
                           batch_size=settings.batch_size, seed=0,
                           architecture=spec.architecture)
    if len(batches) < 2:
        raise ValueError("matching=learned needs at least two calibration batches (one held "
                         "out to stop early); raise --samples or lower --batch-size")
    held = max(1, len(batches) // 10)
    sa, sb = sources or (pair.source("a"), pair.source("b"))
    container = getattr(transformers, spec.architecture)(pair.config)
    # The model's own parameter names (checkpoints may use legacy aliases, e.g. embed_out),
    # one per tied group: functional_call refuses two values for tied weights.
    unique = [n for n, _ in container.named_parameters()] + [n for n, _ in container.named_buffers()]
    names = [n for n in unique if sa.get(n) is not None]

    def state(source):
        return {n: (t.float() if t.is_floating_point() else t)
                for n, t in ((n, source.get(n)) for n in names)}
    state_a, state_b = state(sa), state(sb)
    starts = [start]
    if settings.learn_init == "best":
        from mergekit_permute.weight_match import weight_match_alignment
        try:
            starts.append(weight_match_alignment(
                spec, state_a, state_b, settings.model_copy(update={"matching": "weights"})))
        except ValueError as e:   # settings weight matching cannot honour (residual=first, ...)
            LOG.info("learn_init=best: no weight-matching start (%s)", e)
    fixed, span = lambdas_of(settings.learn_lambdas)
    schedule = Schedule(steps=settings.learn_steps, lr=settings.learn_lr, lambdas=fixed or (0.5,),
                        lambda_range=span, permute_ffn=settings.learn_permutations)
    return learn(spec, container, state_a, state_b, starts, (batches[:-held], batches[-held:]),
                 schedule, device)


def _state_of(source, pair: Pair) -> Dict[str, torch.Tensor]:
    return {name: source.get(name) for name in pair.checkpoint_a.keys()}


def align_pair(model_a: str, model_b: str, data: Optional[str], settings: AlignSettings, *,
               device: str = "cpu", cache: CacheMode = "use", workers: Optional[int] = 1):
    """align(), then both models loaded whole: (alignment, model A, model B, tokenizer). For
    small models and tests; the CLI streams instead."""
    from mergekit_permute.models import load_model
    pair = open_pair(model_a, model_b)
    alignment = align(model_a, model_b, data, settings, device=device, workers=workers,
                      cache=cache, pair=pair)
    return alignment, load_model(model_a, device), load_model(model_b, device), pair.tokenizer
