"""Statistics of one model pair: its calibration batches, the memory a layer-wise run needs,
and the statistics themselves, read from a valid cache entry or computed block by block (and
cached; an interrupted run is continued)."""

import functools
import hashlib
import json
import logging
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from mergekit_permute.calibration.blocks import BlockModel
from mergekit_permute.calibration.cache import CacheMode, StatsCache, cache_key
from mergekit_permute.calibration.calibrate import (
    Hooks, calibrate_pair, check_tokens, count_tokens, feature_points, point_size, token_mask,
)
from mergekit_permute.calibration.dist import Distributed
from mergekit_permute.calibration.resume import EntryWriter, resumable
from mergekit_permute.calibration.stats import CrossStats, Statistics
from mergekit_permute.core.permute import norm_gains
from mergekit_permute.io.batches import tokenize
from mergekit_permute.io.checkpoints import dtype_of
from mergekit_permute.io.data import chars_for, fingerprint, load_texts
from mergekit_permute.io.models import Pair, load_state, scan_pair
from mergekit_permute.io.preflight import check_max_length
from mergekit_permute.settings import AlignSettings
from mergekit_permute.spec.base import PermutationSpec

LOG = logging.getLogger(__name__)


@dataclass
class Workload:
    """What one alignment of B into A's basis reads, and where it runs."""

    pair: Pair
    data: Optional[str] = None
    device: str = "cpu"
    dtype: Optional[str] = None            # the forwards' dtype on a GPU (None: the checkpoint's)
    workers: Optional[int] = None          # assignment solvers (None: every core)
    cache: CacheMode = "use"
    dist: Distributed = field(default_factory=Distributed)
    sources: Optional[Tuple] = None        # weights replacing the checkpoints' (running average)
    fingerprints: Optional[Tuple[str, str]] = None   # names `sources` for the cache
    shared: Optional[Statistics] = None    # statistics several methods share (barrier sweeps)
    _states: Optional[Tuple[Dict, Dict]] = None

    def readers(self) -> Tuple:
        return self.sources or (self.pair.source("a"), self.pair.source("b"))

    def states(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Both models whole in memory (weight matching and learning read every weight)."""
        if self._states is None:
            keys = self.pair.checkpoint_a.keys()
            self._states = (load_state(self.pair.checkpoint_a), load_state(self.pair.checkpoint_b)) \
                if self.sources is None else \
                tuple({k: s.get(k) for k in keys} for s in self.sources)
        return self._states

    def gains(self) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """A's and B's norm gains (float64) for folding."""
        return tuple(norm_gains(self.pair.spec, s) for s in self.readers())


def calibration_spaces(spec: PermutationSpec) -> List[str]:
    """Every space whose statistics any setting could use."""
    return [s.name for s in spec.spaces if not s.frozen]


@functools.lru_cache(maxsize=None)
def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bfloat16 natively (Linux flags avx512_bf16 / amx_bf16; oneDNN
    emulates it on other AVX-512 CPUs, slower than float32)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def product_dtype(choice: str, device: str, stored: torch.dtype) -> torch.dtype:
    """The dtype of the feature cross products summed into the statistics (the setting
    `stats_products`; auto: bfloat16 for half-precision checkpoints on a CUDA GPU). Not on the
    CPU, even with native bfloat16: there they measured no gain in time on a quiet machine
    (and one TinyLlama-width run with them peaked higher with every layer, 4321 MiB above
    import at 22 layers against 1240 with float32, not reproduced since; BENCHMARKS.md)."""
    if choice != "auto":
        return getattr(torch, choice)
    native = torch.device(device).type == "cuda"
    return torch.bfloat16 if native and stored in (torch.bfloat16, torch.float16) \
        else torch.float32


def compute_dtype(device: str, dtype: Optional[str], stored: torch.dtype) -> torch.dtype:
    """Forwards run in the checkpoint's dtype on a GPU (`auto`) and in float32 on the CPU."""
    if torch.device(device).type == "cpu":
        return torch.float32
    return dtype_of(dtype) or stored


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

    def token_fingerprint(self) -> str:
        """The token ids and counted positions (the tokenizer's and max_length's output)."""
        h = hashlib.sha256()
        for batch, mask in zip(self.batches, self.masks):
            for name in sorted(batch):
                h.update(name.encode())
                h.update(batch[name].contiguous().numpy().tobytes())
            h.update(mask.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def info(self, tokens: int) -> Dict:
        return {"source": self.source, "passages": len(self.texts),
                "fingerprint": fingerprint(self.texts), "tokens": tokens}


def prepare_calibration(pair: Pair, data: str, settings: AlignSettings) -> Calibration:
    check_max_length(settings.max_length, [(f"model {pair.path_a}", pair.config)])
    texts = load_texts(data, settings.samples, max_chars=chars_for(settings.max_length))
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


def _config_fingerprint(pair: Pair) -> str:
    """The config the forwards run with, less its provenance (path, versions)."""
    config = {k: v for k, v in pair.config.to_dict().items()
              if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _store(work: "Workload", calib: Calibration, settings: AlignSettings, qk: bool, points
           ) -> Optional[StatsCache]:
    """The cache entry these statistics belong in (None: not cached)."""
    if work.cache == "off" or (work.sources is not None and work.fingerprints is None):
        return None
    fa, fb = work.fingerprints or scan_pair(work.pair)
    stored = work.pair.checkpoint_a.dtype()
    # the statistics also depend on these; left out, a run could read statistics computed in
    # another dtype or with another tokenizer or config (not bit-identical to its own)
    context = {"tokens": calib.token_fingerprint(), "config": _config_fingerprint(work.pair),
               "device": torch.device(work.device).type,
               "forwards": str(compute_dtype(work.device, work.dtype, stored)),
               "products": str(product_dtype(settings.stats_products, work.device, stored))}
    key = cache_key(fa, fb, fingerprint(calib.texts), settings.calibration_key(), qk, context)
    spec = work.pair.spec
    expected = {k: (point_size(spec, k),) * 2 for k, _ in points if not k.startswith("residual@")}
    return StatsCache(key, expected, spec.space("residual").size)


def statistics(work: "Workload", calib: Calibration, settings: AlignSettings, *, qk: bool,
               on_layer: Optional[Callable] = None, keep: bool = True) -> Statistics:
    """Calibration statistics of a pair: from a valid cache entry, or computed layer by layer
    (and cached), as `work.cache` says. `on_layer(layer, stats, own)` sees every layer's
    statistics either way, `own` when nothing else reads them afterwards (it may spend them);
    `keep` holds them in memory (several methods on one set of statistics).
    `work.sources` replace the checkpoints' weights (e.g. a running average); they are not
    cached unless `work.fingerprints` name them."""
    pair, dist, cache = work.pair, work.dist, work.cache
    device, dtype, sources = work.device, work.dtype, work.sources
    spec = pair.spec
    points = feature_points(spec, calibration_spaces(spec), qk)
    store = _store(work, calib, settings, qk, points)
    entry = store.load() if store is not None and cache == "use" else None
    if dist.size > 1 and dist.total(int(entry is not None)) < dist.size:
        # every rank reads the cache or none does (a node-local cache may differ): a rank that
        # returned here would leave the others waiting in their all-reduces
        entry = None
    if entry is not None:
        stats = entry.statistics() if not keep else Statistics(residual=entry.residual,
                                                               tokens=entry.statistics().tokens)
        for _, layer_stats in entry.layers():
            if on_layer is not None:
                on_layer(None, layer_stats, not keep)
            if keep:
                stats.update(layer_stats)
        return stats
    # An interrupted run's checkpoint is continued (one process: with several, every rank
    # holds only its share of the hidden states).
    resume = resumable(store) if store is not None and cache == "use" and dist.size == 1 \
        else None
    writer = EntryWriter(store, resume) if store is not None and dist.is_main else None
    resume = writer.resumed if writer is not None else None
    resumed_layers: Dict[str, CrossStats] = {}
    if resume is not None:
        LOG.info("continuing an interrupted calibration at layer %d of %d (%s)",
                 resume.next_layer, spec.num_layers, resume.path)
        for layer_stats in resume.layers():
            if on_layer is not None:
                on_layer(None, layer_stats, not keep)
            if keep:
                resumed_layers.update(layer_stats)

    def layer_done(layer, layer_stats):
        if writer is not None:
            writer.layer(layer, layer_stats)
        if on_layer is not None:
            on_layer(layer, layer_stats, writer is None and not keep)

    batches, masks = dist.shard(calib.batches), dist.shard(calib.masks)
    hooks = Hooks(on_layer=layer_done, reduce=dist.reduce,
                  checkpoint=writer.checkpoint if writer is not None and dist.size == 1 else None)
    try:   # a refusal (memory) or failure leaves no partial entry behind
        plan = memory_plan(pair, calib, device, dtype)
        models = block_models(pair, device, dtype, sources)
        products = product_dtype(settings.stats_products, device, pair.checkpoint_a.dtype())
        if products != torch.float32:
            LOG.info("statistics: %s cross products (stats_products=%s)",
                     str(products).removeprefix("torch."), settings.stats_products)
        stats = calibrate_pair(spec, models, batches, points, masks, hooks, keep=keep,
                               buffer_device=plan["buffer_device"], resume=resume,
                               products=products)
        stats.update(resumed_layers)
    except BaseException:
        if writer is not None:
            writer.abandon()
        raise
    stats.tokens = dist.total(sum(int(m.sum()) for m in masks))
    if writer is not None:
        writer.finish(stats.residual, stats.tokens)
    return stats
