"""Learned alignment (`matching: learned`): from activation (or weight) matching, further exact
symmetries of B learned against the merged model's loss.

Every learned map is a reparametrisation of B, composed into the saved transforms, so aligned B
computes exactly B's function:
  residual   a rotation exp(S), S skew (S 1 = 0 for LayerNorm models); foldable norms only;
  V/O        per KV group an invertible map exp(A) on the values, its inverse on W_O's columns;
  Q/K        per KV group M on the queries and M^-T on the keys: a rotation-scaling per RoPE
             frequency pair, a general exp(A) on non-rotary dims; not past per-head Q/K norms;
  SwiGLU     per FF neuron a scale s on up and 1/s on down;
  optional   the FF permutations (learn_permutations) and the KV groups' order (learn_heads),
             straight-through or Sinkhorn (maps.py).
Both models are held whole in memory (the loss needs the whole merged model); from
CHECKPOINT_FROM parameters (and on accelerators) each block is recomputed in the backward pass
with its merged weights built inside, so only A, B and one block's working set are resident.
"""

import contextlib
import copy
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.utils.checkpoint
import transformers
from accelerate import init_empty_weights
from tqdm.auto import tqdm

from mergekit_permute.align.maps import Maps
from mergekit_permute.align.weight_match import weight_match_alignment
from mergekit_permute.calibration.blocks import no_cache
from mergekit_permute.calibration.collect import Workload
from mergekit_permute.core.alignment import Alignment
from mergekit_permute.evaluate import objective_for
from mergekit_permute.io.batches import tokenize
from mergekit_permute.io.checkpoints import CheckpointSource
from mergekit_permute.io.data import chars_for, load_texts
from mergekit_permute.core.permute import (
    Scaled, Transforms, apply_to_tensor, compose, fold_gauge, with_readers,
)
from mergekit_permute.settings import AlignSettings, lambdas_of
from mergekit_permute.spec.base import PermutationSpec

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How the maps are learned: Adam for `steps` steps, a linear warmup then cosine decay of
    `lr`; every step the merged loss at a fixed set of `lambdas` (averaged), or at one lambda
    drawn uniformly from `lambda_range`."""

    steps: int
    lr: float
    lambdas: Tuple[float, ...] = (0.5,)
    lambda_range: Optional[Tuple[float, float]] = None
    permute_ffn: bool = False
    permute_heads: bool = False
    estimator: str = "ste"
    plateau: str = "backoff"
    warmup: float = 0.05
    seed: int = 0

    @property
    def eval_every(self) -> int:
        return max(5, self.steps // 30)

    @property
    def patience(self) -> int:
        """Steps without a better held-out loss before backing off (a third of the run: the
        held-out loss of one slice is noisy, and the decaying rate still improves late)."""
        return max(self.steps // 3, 4 * self.eval_every)

    # A run whose held-out loss has not improved for `patience` steps goes back to its best
    # maps with the rate times BACKOFF (Adam's moments reset) and goes on; after max_backoffs
    # it stops. A rate too high for the models (the held-out loss rising from the warmup on)
    # thus costs steps, not the run; a run that improves within every `patience` is unchanged.
    BACKOFF = 0.5

    @property
    def max_backoffs(self) -> int:
        return 2 if self.plateau == "backoff" else 0

    @property
    def held_out_lambdas(self) -> Tuple[float, ...]:
        return (sum(self.lambda_range) / 2,) if self.lambda_range else self.lambdas

    def lr_factor(self, step: int) -> float:
        warm = max(1, int(self.warmup * self.steps))
        if step <= warm:
            return step / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, self.steps - warm)))

    def lambdas_at(self, gen: torch.Generator) -> Tuple[float, ...]:
        if self.lambda_range is None:
            return self.lambdas
        lo, hi = self.lambda_range
        return (lo + (hi - lo) * float(torch.rand((), generator=gen)),)


# From this many parameters per model, the loss recomputes each block in the backward pass
# (torch.utils.checkpoint) with its merged weights built inside, so only the blocks' outputs
# are kept: memory is A and B plus one block's weights and activations, not a whole merged
# model with every activation (on an accelerator always: memory is what binds there).
CHECKPOINT_FROM = 100_000_000


class _Problem:
    """A (folded) and B (aligned by a start, folded the same way) on one device, and the merged
    model's loss for a set of maps. `dtype`: how A and B are held (the maps stay float32;
    bfloat16 forwards under autocast on accelerators). `checkpoint`: blocks recomputed in the
    backward pass, their weights merged inside (CHECKPOINT_FROM)."""

    def __init__(self, spec: PermutationSpec, model, state_a, state_b, start: Alignment,
                 device: str, dtype: torch.dtype = torch.float32, checkpoint: bool = False):
        self.spec, self.start, self.device = spec, start, device
        self.dtype, self.checkpoint = dtype, checkpoint
        self.rules = spec.weight_map()
        self.reader_views = spec.reader_views()
        gauge_a = fold_gauge(spec, start.gains_a) if start.folded else None
        held = lambda t: t.to(device, dtype) if t.is_floating_point() else t.to(device)  # noqa: E731
        # The frame the maps act in: A with its gains folded, B aligned and folded the same way.
        self.a = {k: held(gauge_a.apply(self.rules[k].name, v) if gauge_a and k in self.rules
                          else v) for k, v in state_a.items()}
        self.b = {}
        for k, v in state_b.items():
            rule = self.rules.get(k)
            t = start.fold.apply(rule.name, v) if start.folded and rule else v
            self.b[k] = held(apply_to_tensor(rule, t, start.transforms) if rule else t)
        self.model = model
        prefix = f"{spec.blocks}."
        self.blocks = [[k for k in self.a if k.startswith(f"{prefix}{i}.")]
                       for i in range(spec.num_layers)]
        inside = {k for names in self.blocks for k in names}
        self.outside = [k for k in self.a if k not in inside]

    def _merged(self, names, t, lam: float) -> Dict[str, torch.Tensor]:
        """lam A + (1 - lam) B mapped by `t`, for `names`, in float32."""
        out = {}
        for k in names:
            a = self.a[k]
            if not a.is_floating_point():
                out[k] = a
                continue
            b = self.b[k].float()
            if k in self.rules:
                b = apply_to_tensor(self.rules[k], b, t, exact=False)
            out[k] = torch.lerp(b, a.float(), lam)   # lam A + (1 - lam) B
        return out

    def _autocast(self):
        kind = torch.device(self.device).type
        if kind == "cpu" or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(kind, dtype=self.dtype)

    def loss(self, maps: "Maps", batches, lambdas: Sequence[float], hard: bool = False
             ) -> torch.Tensor:
        t = with_readers(maps.transforms(hard), self.reader_views)
        if self.checkpoint:
            return self._checkpointed_loss(t, batches, lambdas)
        b = {k: apply_to_tensor(self.rules[k], v, t, exact=False) if k in self.rules else v
             for k, v in self.b.items()}
        total = 0.0
        for lam in lambdas:
            params = {k: torch.lerp(b[k], a, lam) if a.is_floating_point() else a
                      for k, a in self.a.items()}
            for batch in batches:
                inputs = {k: v.to(self.device) for k, v in batch.items()}
                with self._autocast():
                    total = total + torch.func.functional_call(self.model, params, args=(),
                                                               kwargs=inputs).loss
        return total / (len(lambdas) * len(batches))

    def _checkpointed_loss(self, t, batches, lambdas: Sequence[float]) -> torch.Tensor:
        total = 0.0
        for lam in lambdas:
            params = self._merged(self.outside, t, lam)   # embeddings, final norm, head
            with _blocks_checkpointed(self, t, lam):
                for batch in batches:
                    # (a KV cache would take each block's keys again when it is recomputed)
                    inputs = {**{k: v.to(self.device) for k, v in batch.items()},
                              **no_cache(self.model)}
                    with self._autocast():
                        total = total + torch.func.functional_call(
                            self.model, params, args=(), kwargs=inputs, strict=False).loss
        return total / (len(lambdas) * len(batches))


@contextlib.contextmanager
def _blocks_checkpointed(problem: _Problem, t, lam: float):
    """Inside, block i's forward is checkpointed: its merged weights are built from A, B and the
    maps `t` inside the recomputed function, so neither they nor its activations outlive it."""
    blocks = problem.model.get_submodule(problem.spec.blocks)
    inside = [False]

    def wrap(i: int, block: torch.nn.Module):
        own = block.forward

        prefix = f"{problem.spec.blocks}.{i}."

        def run(*args, **kwargs):
            with torch.autocast(torch.device(problem.device).type, enabled=False):
                # the maps act in float32; only the block's own forward runs in bf16
                params = {k[len(prefix):]: v for k, v in
                          problem._merged(problem.blocks[i], t, lam).items()}
            inside[0] = True
            try:
                return torch.func.functional_call(block, params, args, kwargs, strict=False)
            finally:
                inside[0] = False

        def forward(*args, **kwargs):
            if inside[0]:   # functional_call calling the block itself
                return own(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)
        return forward

    for i, block in enumerate(blocks):
        block.forward = wrap(i, block)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward   # the class's own again


def learn(spec: PermutationSpec, model, states: List[Mapping], starts: Sequence[Alignment],
          batches: Tuple[List[Dict], List[Dict]], schedule: Schedule,
          device: str = "cpu", dtype: torch.dtype = torch.float32,
          checkpoint: bool = False) -> Alignment:
    """The best of `starts` (by held-out merged loss) refined by gradient descent. `model` is
    any instance of the architecture, its parameters possibly on the meta device (a container
    for functional calls); `batches` are the (train, held-out) loss batches of the calibration
    text; `dtype` and `checkpoint` as in _Problem. `states` [A's, B's] is emptied once the
    problem holds its own (folded, aligned) copies: the caller's tensors need not outlive it."""
    started = time.perf_counter()
    train, held_out = batches
    work = copy.deepcopy(model).eval()
    for name, buf in list(work.named_buffers()):   # (rotary frequencies: the weights come in)
        module, _, attr = name.rpartition(".")
        work.get_submodule(module)._buffers[attr] = buf.to(device)
    for p in work.parameters():
        p.requires_grad_(False)
    problem, maps, start_loss = _best_start(spec, work, states, starts, held_out, schedule,
                                            device, dtype, checkpoint)
    states.clear()
    best_state, best_step, best, step = copy.deepcopy(maps.state_dict()), 0, start_loss, 0
    opt = torch.optim.Adam(maps.parameters(), lr=schedule.lr)
    rate = [1.0]   # the schedule's factor, times BACKOFF at each back-off
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: rate[0] * schedule.lr_factor(i + 1))
    backoffs: List[Tuple[int, float]] = []   # (step, rate from then on)
    since = 0   # the last step that improved or backed off
    gen = torch.Generator().manual_seed(schedule.seed)
    recent: List[float] = []
    checks: List[Tuple[int, float]] = [(0, round(start_loss, 6))]   # (step, held-out loss)
    bar = tqdm(range(1, schedule.steps + 1), desc="learning maps", unit="step")
    for step in bar:
        try:
            loss = problem.loss(maps, [train[(step - 1) % len(train)]], schedule.lambdas_at(gen))
            if not torch.isfinite(loss):
                raise FloatingPointError("the merged loss is not finite")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            recent = (recent + [loss.item()])[-schedule.eval_every:]
            if step % schedule.eval_every and step != schedule.steps:
                continue
            with torch.no_grad():
                # judged as it will be kept: soft permutations projected
                val = float(problem.loss(maps, held_out, schedule.held_out_lambdas, hard=True))
            if val != val:
                raise FloatingPointError("the held-out loss is not finite")
        except (torch.linalg.LinAlgError, FloatingPointError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not isinstance(e, torch.linalg.LinAlgError) \
                    and "singular" not in str(e).lower():
                raise
            LOG.warning("learned alignment: step %d failed (%s; the learning rate %g may be "
                        "too high); keeping the best maps, from step %d", step,
                        str(e).splitlines()[0], schedule.lr, best_step)
            break
        bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}", held_out=f"{best:.4f}")
        checks.append((step, round(val, 6)))
        if val < best - 1e-6:
            best, best_step, best_state = val, step, copy.deepcopy(maps.state_dict())
            since = step
        elif step - since >= schedule.patience and step < schedule.steps:
            if len(backoffs) == schedule.max_backoffs:
                LOG.info("held-out loss stopped improving at step %d", best_step)
                break
            rate[0] *= schedule.BACKOFF
            backoffs.append((step, schedule.lr * rate[0]))
            LOG.info("held-out loss not improved since step %d (best at step %d): back to the "
                     "best maps, learning rate x%g from step %d", since, best_step,
                     schedule.BACKOFF, step)
            maps.load_state_dict(best_state)
            opt.state.clear()   # Adam's moments belong to the abandoned path
            for group in opt.param_groups:
                group["lr"] = schedule.lr * rate[0] * schedule.lr_factor(step + 1)
            since = step
    bar.close()
    maps.load_state_dict(best_state)
    out = _composed(problem.start, maps)
    out.info["learned"] = {"steps_run": step, "best_step": best_step,
                           "start": problem.start.info.get("matching", "activations"),
                           "held_out_loss_start": round(start_loss, 6),
                           "held_out_loss_best": round(best, 6),
                           "train_loss_last": round(sum(recent) / max(len(recent), 1), 6),
                           "held_out_checks": checks,
                           "backoffs": backoffs,
                           "passages": sum(_rows(b) for b in train),
                           "held_out_passages": sum(_rows(b) for b in held_out),
                           "lambdas": list(schedule.lambda_range or schedule.lambdas),
                           "lambda_sampling": "uniform" if schedule.lambda_range else "fixed",
                           "on_plateau": schedule.plateau,
                           "lr": schedule.lr, "schedule": "linear warmup, cosine decay",
                           **({"permutation_estimator": schedule.estimator}
                              if schedule.permute_ffn or schedule.permute_heads else {}),
                           "maps": sorted({n.split(".")[0] for n, _ in maps.named_parameters()})}
    out.timings["learn_seconds"] = round(time.perf_counter() - started, 2)
    LOG.info("learned alignment: held-out merged loss %.4f -> %.4f (step %d of %d)",
             start_loss, best, best_step, step)
    return out


def _rows(batch: Dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


def _shape(reader, name: str) -> Optional[Tuple[int, ...]]:
    """A tensor's shape (None: absent), from a checkpoint's header without reading it."""
    if isinstance(reader, CheckpointSource):
        key = reader.key(name)
        return None if key is None else tuple(reader.checkpoint.meta(key)[0])
    t = reader.get(name)
    return None if t is None else tuple(t.shape)


class _Float32View(Mapping):
    """`names` of a checkpoint reader as float32 tensors, read when asked for."""

    def __init__(self, reader, names: Sequence[str]):
        self.reader, self.names = reader, list(names)

    def __getitem__(self, name: str) -> torch.Tensor:
        t = self.reader.get(name)
        return t.float() if t.is_floating_point() else t

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


@torch.no_grad()
def _best_start(spec: PermutationSpec, model, states, starts: Sequence[Alignment], held_out,
                schedule: Schedule, device: str, dtype: torch.dtype, checkpoint: bool
                ) -> Tuple[_Problem, Maps, float]:
    """The start with the lowest held-out merged loss, its maps at the identity, that loss.
    One problem (a copy of A and B) exists at a time: a better start's is built again."""
    def build(candidate: Alignment) -> Tuple[_Problem, Maps, float]:
        problem = _Problem(spec, model, *states, candidate, device, dtype, checkpoint)
        maps = Maps(spec, candidate.folded, schedule.permute_ffn, schedule.estimator,
                    schedule.permute_heads).to(device)
        return problem, maps, float(problem.loss(maps, held_out, schedule.held_out_lambdas))

    losses = []
    for i, candidate in enumerate(starts):
        problem, maps, loss = build(candidate)
        losses.append(loss)
        if i < len(starts) - 1:
            del problem, maps
    best = min(range(len(starts)), key=losses.__getitem__)
    if best != len(starts) - 1:
        del problem, maps
        problem, maps, _ = build(starts[best])
    return problem, maps, losses[best]


def _composed(start: Alignment, maps: Maps) -> Alignment:
    """`start` followed by the learned maps, in float64 (rotations orthogonal to rounding)."""
    with torch.no_grad():
        learned = maps.to(torch.float64).final()
    transforms: Transforms = {}
    for space, views in start.transforms.items():
        transforms[space] = {}
        for view, t0 in views.items():
            t1 = learned[space][view]
            if isinstance(t1, Scaled):
                t1 = Scaled(t1.index.cpu(), t1.scale.detach().cpu().double())
            elif t1.is_floating_point():
                t1 = t1.detach().cpu().double()
            transforms[space][view] = compose(t0, t1)
    return Alignment(spec=start.spec, transforms=transforms, settings=start.settings,
                     report=start.report, info=dict(start.info), gains_a=start.gains_a,
                     gains_b=start.gains_b, timings=dict(start.timings))


def learn_alignment(work: Workload, start: Alignment, settings: AlignSettings) -> Alignment:
    """`start` refined by learned exact symmetries on the calibration text: both models whole
    in memory, a held-out tenth of the batches for early stopping."""
    pair, spec = work.pair, work.pair.spec
    objective = objective_for(spec.architecture)
    if objective == "cls":
        raise ValueError(f"matching=learned needs a language-model loss; {spec.architecture} "
                         "has a task head (align it with matching=activations)")
    texts = load_texts(work.data, max(settings.samples, settings.learn_samples),
                       max_chars=chars_for(settings.max_length))
    # Shuffled (seeded): text files are often ordered (by date, by play), and both the held-out
    # slice and every stretch of steps should sample all of the text, not its last era.
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    texts = [texts[i] for i in order]
    batches = tokenize(pair.tokenizer, texts, settings.max_length, settings.batch_size,
                       spec.architecture, objective)
    if len(batches) < 2:
        raise ValueError("matching=learned needs at least two calibration batches (one held "
                         "out to stop early); raise --samples or lower --batch-size")
    if len(texts) < settings.learn_samples:
        LOG.info("learned alignment: %s holds %d passages, fewer than learn_samples=%d; "
                 "learning on all of them", work.data, len(texts), settings.learn_samples)
    # Held out: a tenth of the calibration passages' batches (what judging a step costs does not
    # grow with learn_samples); learned on: every other batch, each seen once per epoch.
    held = max(1, min(len(batches), -(-settings.samples // settings.batch_size)) // 10)
    with init_empty_weights(include_buffers=False):   # every weight comes from A and B
        container = getattr(transformers, spec.architecture)(pair.config)
    container.tie_weights()   # (not done on the meta device)
    # The model's own parameter names (checkpoints may use legacy aliases, e.g. embed_out),
    # one per tied group: functional_call refuses two values for tied weights.
    unique = [n for n, _ in container.named_parameters()] + [n for n, _ in container.named_buffers()]
    sa, sb = work.readers()
    shapes = {n: _shape(sa, n) for n in unique}
    names = [n for n in unique if shapes[n] is not None]
    # Read tensor by tensor as the problem is built: only the problem's own copies of A and B
    # are ever whole in memory.
    state_a, state_b = _Float32View(sa, names), _Float32View(sb, names)
    # Accelerators: A and B held in the checkpoint's half dtype, bfloat16 forwards, every block
    # recomputed in the backward pass; the CPU: float32, blocks recomputed from CHECKPOINT_FROM.
    stored = next(t.dtype for t in map(sa.get, names) if t.is_floating_point())
    accelerated = torch.device(work.device).type != "cpu"
    dtype = stored if accelerated and stored in (torch.bfloat16, torch.float16) else torch.float32
    checkpoint = accelerated or sum(math.prod(shapes[n]) for n in names) >= CHECKPOINT_FROM
    starts = [start]
    if settings.learn_init == "best":
        try:   # (weight matching reads every weight many times: whole float32 copies, briefly)
            starts.append(weight_match_alignment(
                spec, dict(state_a), dict(state_b),
                settings.model_copy(update={"matching": "weights"})))
        except ValueError as e:   # settings weight matching cannot honour (residual=first, ...)
            LOG.info("learn_init=best: no weight-matching start (%s)", e)
    fixed, span = lambdas_of(settings.learn_lambdas)
    schedule = Schedule(steps=settings.learn_steps, lr=settings.learn_lr, lambdas=fixed or (0.5,),
                        lambda_range=span, permute_ffn=settings.learn_permutations,
                        permute_heads=settings.learn_heads, estimator=settings.learn_estimator,
                        plateau=settings.learn_plateau)
    states = [state_a, state_b]
    return learn(spec, container, states, starts,
                 (batches[:-held], batches[-held:]), schedule, work.device, dtype, checkpoint)
