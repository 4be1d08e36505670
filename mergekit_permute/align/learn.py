"""Learned alignment (`matching: learned`): from activation (or weight) matching, further exact
symmetries of B learned against the merged model's loss.

Every learned map is a reparametrisation of B, composed into the saved transforms, so aligned B
computes exactly B's function:
  residual   a rotation exp(S), S skew (S 1 = 0 for LayerNorm models); foldable norms only;
  V/O        per KV group an invertible map exp(A) on the values, its inverse on W_O's columns;
  Q/K        per KV group M on the queries and M^-T on the keys: a rotation-scaling per RoPE
             frequency pair, a general exp(A) on non-rotary dims; not past per-head Q/K norms;
  SwiGLU     per FF neuron a scale s on up and 1/s on down.
Both models are held whole in memory (the loss needs the whole merged model).
"""

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import transformers
from tqdm.auto import tqdm

from mergekit_permute.align.weight_match import weight_match_alignment
from mergekit_permute.calibration.collect import Workload
from mergekit_permute.core.alignment import Alignment
from mergekit_permute.core.match import assign
from mergekit_permute.evaluate import objective_for
from mergekit_permute.io.batches import tokenize
from mergekit_permute.io.data import chars_for, load_texts
from mergekit_permute.core.permute import (
    Scaled, Transforms, apply_to_tensor, compose, fold_gauge, identity_transforms,
)
from mergekit_permute.settings import AlignSettings, lambdas_of
from mergekit_permute.spec.base import HeadLayout, PermutationSpec

LOG = logging.getLogger(__name__)


SINKHORN_MARGIN = 3.0    # initial logit of a neuron's own match over all n - 1 others together
SINKHORN_ITERS = 20


def sinkhorn_tau(n: int) -> float:
    """Temperature at which identity scores give P_ii ~ 1 / (1 + e^-SINKHORN_MARGIN) ~ 0.95: soft
    enough to carry gradient (a colder P ~ I is flat: learning never leaves the start), close
    enough to B's own function to start from."""
    return 1.0 / (math.log(max(n - 1, 1)) + SINKHORN_MARGIN)


def sinkhorn(logits: torch.Tensor, iters: int = SINKHORN_ITERS) -> torch.Tensor:
    """[n, n] doubly-stochastic matrix: alternate row and column normalisation in log space."""
    log_p = logits
    for _ in range(iters):
        log_p = log_p - torch.logsumexp(log_p, dim=1, keepdim=True)
        log_p = log_p - torch.logsumexp(log_p, dim=0, keepdim=True)
    return log_p.exp()


def _block_diag(blocks: torch.Tensor, owners: Sequence[int]) -> torch.Tensor:
    """[len(owners) * d] square matrix with blocks[owners[i]] on its i-th diagonal block."""
    return torch.block_diag(*[blocks[o] for o in owners])


def _qk_norms(spec: PermutationSpec) -> bool:
    return any(w.name.endswith(("q_norm.weight", "k_norm.weight")) for w in spec.weights)


class Maps(torch.nn.Module):
    """The learnable exact symmetries of one architecture, all at the identity at the start."""

    def __init__(self, spec: PermutationSpec, rotate_residual: bool, permute_ffn: bool = False,
                 estimator: str = "ste"):
        super().__init__()
        self.spec, self.estimator = spec, estimator
        d = spec.space("residual").size
        self.rotate_residual = rotate_residual
        self.residual = torch.nn.Parameter(torch.zeros(d, d)) if rotate_residual else None
        self.vo = torch.nn.ParameterDict()
        self.qk_free = torch.nn.ParameterDict()
        self.qk_log_r = torch.nn.ParameterDict()
        self.qk_angle = torch.nn.ParameterDict()
        self.ffn = torch.nn.ParameterDict()
        # FF permutations from scores [old, new]. ste: their assignment is the permutation
        # used (hard, exact) while their gradient is the permuted weights' own. sinkhorn: the
        # soft doubly-stochastic sinkhorn(scores / tau) is used while learning (B's function
        # only approximately kept), its assignment at the end.
        self.ffn_scores = torch.nn.ParameterDict()
        learn_qk = not _qk_norms(spec)
        for space in spec.spaces:
            key = space.name.replace(".", "_")
            if space.kind == "attention":
                h = space.heads
                self.vo[key] = torch.nn.Parameter(torch.zeros(h.num_kv_heads, h.head_dim, h.head_dim))
                if learn_qk:
                    rot, free = h.qk_frozen_dims, h.head_dim - h.qk_frozen_dims
                    if rot:
                        self.qk_log_r[key] = torch.nn.Parameter(torch.zeros(h.num_kv_heads, rot // 2))
                        self.qk_angle[key] = torch.nn.Parameter(torch.zeros(h.num_kv_heads, rot // 2))
                    if free:
                        self.qk_free[key] = torch.nn.Parameter(torch.zeros(h.num_kv_heads, free, free))
            elif space.kind == "ffn":
                if space.gated:
                    self.ffn[key] = torch.nn.Parameter(torch.zeros(space.size))
                if permute_ffn:
                    self.ffn_scores[key] = torch.nn.Parameter(torch.eye(space.size))

    def _qk_block(self, key: str, h: HeadLayout) -> torch.Tensor:
        """[kv, d, d]: per KV group the map on query dims (h' = h @ M)."""
        d, rot = h.head_dim, h.qk_frozen_dims
        like = next(self.parameters())
        m = torch.eye(d, dtype=like.dtype, device=like.device).repeat(h.num_kv_heads, 1, 1)
        if key in self.qk_log_r:
            half = rot // 2
            r = self.qk_log_r[key].exp()
            c, s = r * self.qk_angle[key].cos(), r * self.qk_angle[key].sin()   # [kv, half]
            g = torch.arange(h.num_kv_heads, device=m.device)[:, None]         # [kv, 1]
            i = torch.arange(half, device=m.device)[None, :]
            j = i + half                 # rotate_half pairs dim i with i + rot/2
            m = m.index_put((g, i, i), c).index_put((g, j, j), c)
            m = m.index_put((g, i, j), s).index_put((g, j, i), -s)
        if key in self.qk_free:
            free = torch.matrix_exp(self.qk_free[key])                          # [kv, f, f]
            m = torch.cat([m[:, :rot], torch.cat([m[:, rot:, :rot], free], 2)], 1)
        return m

    def transforms(self, hard: bool = False) -> Transforms:
        """The learned maps as a transform set (identity where nothing is learned); `hard`:
        soft permutations as their nearest permutation (what `final` will keep)."""
        out: Transforms = identity_transforms(self.spec)
        if self.residual is not None:
            a = self.residual - self.residual.T
            if self.spec.residual_centered:   # keep the all-ones vector: S 1 = 0
                d = a.shape[0]
                p = torch.eye(d, dtype=a.dtype, device=a.device) - 1.0 / d
                a = p @ a @ p
            out["residual"] = {"": torch.matrix_exp(a)}
        for space in self.spec.spaces:
            key = space.name.replace(".", "_")
            if space.kind == "attention":
                h = space.heads
                groups = [i // h.group_size for i in range(h.num_heads)]
                c = torch.matrix_exp(self.vo[key])                              # [kv, d, d]
                views = {"v": _block_diag(c, range(h.num_kv_heads)), "o": _block_diag(c, groups)}
                if key in self.qk_log_r or key in self.qk_free:
                    b = self._qk_block(key, h)
                    views["q"] = _block_diag(b, groups)
                    views["k"] = _block_diag(torch.linalg.inv(b).transpose(1, 2),
                                             range(h.num_kv_heads))
                out[space.name].update(views)
            elif key in self.ffn_scores:
                scores = self.ffn_scores[key]
                if self.estimator == "sinkhorn" and not hard:
                    m = sinkhorn(scores / sinkhorn_tau(len(scores)))
                else:
                    p = self.hard_permutation(key)
                    onehot = torch.zeros_like(scores)
                    onehot[p, torch.arange(len(p))] = 1.0        # h' = h @ M, M[p[i], i] = 1
                    m = onehot + (scores - scores.detach())   # = onehot exactly
                out[space.name] = {view: m for view in space.views}
                if key in self.ffn:
                    out[space.name][""] = m * self.ffn[key].exp()[None, :]
            elif key in self.ffn:
                out[space.name][""] = Scaled(torch.arange(space.size), self.ffn[key].exp())
        return out

    def hard_permutation(self, key: str) -> torch.Tensor:
        """The assignment of the scores: new feature i <- old feature p[i]."""
        scores = self.ffn_scores[key].detach().cpu().double().numpy()   # [old, new]
        perm, _ = assign(scores.T)                                       # rows: new
        return torch.from_numpy(perm)

    def final(self) -> Transforms:
        """The learned maps with every learned permutation matrix as its permutation."""
        out = self.transforms(hard=True)
        for space in self.spec.spaces:
            key = space.name.replace(".", "_")
            if key in self.ffn_scores:
                p = self.hard_permutation(key)
                out[space.name] = {view: p for view in space.views}
                if key in self.ffn:
                    out[space.name][""] = Scaled(p, self.ffn[key].exp().detach())
        return out


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
    estimator: str = "ste"
    warmup: float = 0.05
    seed: int = 0

    @property
    def eval_every(self) -> int:
        return max(5, self.steps // 30)

    @property
    def patience(self) -> int:
        """Steps without a better held-out loss before stopping (a third of the run: the
        held-out loss of one slice is noisy, and the decaying rate still improves late)."""
        return max(self.steps // 3, 4 * self.eval_every)

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


class _Problem:
    """A (folded) and B (aligned by a start, folded the same way) on one device, and the merged
    model's loss for a set of maps."""

    def __init__(self, spec: PermutationSpec, model, state_a, state_b, start: Alignment,
                 device: str):
        self.spec, self.start, self.device = spec, start, device
        self.rules = spec.weight_map()
        gauge_a = fold_gauge(spec, start.gains_a) if start.folded else None
        # The frame the maps act in: A with its gains folded, B aligned and folded the same way.
        self.a = {k: (gauge_a.apply(self.rules[k].name, v) if gauge_a and k in self.rules
                      else v).to(device) for k, v in state_a.items()}
        self.b = {}
        for k, v in state_b.items():
            rule = self.rules.get(k)
            t = start.fold.apply(rule.name, v) if start.folded and rule else v
            self.b[k] = (apply_to_tensor(rule, t, start.transforms) if rule else t).to(device)
        self.model = model

    def loss(self, maps: "Maps", batches, lambdas: Sequence[float], hard: bool = False
             ) -> torch.Tensor:
        t = maps.transforms(hard)
        b = {k: apply_to_tensor(self.rules[k], v, t, exact=False) if k in self.rules else v
             for k, v in self.b.items()}
        total = 0.0
        for lam in lambdas:
            params = {k: (lam * a + (1 - lam) * b[k]) if a.is_floating_point() else a
                      for k, a in self.a.items()}
            for batch in batches:
                inputs = {k: v.to(self.device) for k, v in batch.items()}
                total = total + torch.func.functional_call(self.model, params, args=(),
                                                           kwargs=inputs).loss
        return total / (len(lambdas) * len(batches))


def learn(spec: PermutationSpec, model, states: Tuple[Dict, Dict], starts: Sequence[Alignment],
          batches: Tuple[List[Dict], List[Dict]], schedule: Schedule,
          device: str = "cpu") -> Alignment:
    """The best of `starts` (by held-out merged loss) refined by gradient descent. `model` is
    any instance of the architecture (a container for functional calls); `batches` are the
    (train, held-out) loss batches of the calibration text."""
    started = time.perf_counter()
    train, held_out = batches
    work = copy.deepcopy(model).to(device).eval()
    for p in work.parameters():
        p.requires_grad_(False)
    problem, maps, start_loss = _best_start(spec, work, states, starts, held_out, schedule,
                                            device)
    best_state, best_step, best, step = copy.deepcopy(maps.state_dict()), 0, start_loss, 0
    opt = torch.optim.Adam(maps.parameters(), lr=schedule.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: schedule.lr_factor(i + 1))
    gen = torch.Generator().manual_seed(schedule.seed)
    recent: List[float] = []
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
        if val < best - 1e-6:
            best, best_step, best_state = val, step, copy.deepcopy(maps.state_dict())
        elif step - best_step >= schedule.patience:
            LOG.info("held-out loss stopped improving at step %d", best_step)
            break
    bar.close()
    maps.load_state_dict(best_state)
    out = _composed(problem.start, maps)
    out.info["learned"] = {"steps_run": step, "best_step": best_step,
                           "start": problem.start.info.get("matching", "activations"),
                           "held_out_loss_start": round(start_loss, 6),
                           "held_out_loss_best": round(best, 6),
                           "train_loss_last": round(sum(recent) / max(len(recent), 1), 6),
                           "lambdas": list(schedule.lambda_range or schedule.lambdas),
                           "lambda_sampling": "uniform" if schedule.lambda_range else "fixed",
                           "lr": schedule.lr, "schedule": "linear warmup, cosine decay",
                           **({"permutation_estimator": schedule.estimator}
                              if schedule.permute_ffn else {}),
                           "maps": sorted({n.split(".")[0] for n, _ in maps.named_parameters()})}
    out.timings["learn_seconds"] = round(time.perf_counter() - started, 2)
    LOG.info("learned alignment: held-out merged loss %.4f -> %.4f (step %d of %d)",
             start_loss, best, best_step, step)
    return out


@torch.no_grad()
def _best_start(spec: PermutationSpec, model, states, starts: Sequence[Alignment], held_out,
                schedule: Schedule, device: str) -> Tuple[_Problem, Maps, float]:
    """The start with the lowest held-out merged loss, its maps at the identity, that loss."""
    best = (None, None, float("inf"))
    for candidate in starts:
        problem = _Problem(spec, model, *states, candidate, device)
        maps = Maps(spec, candidate.folded, schedule.permute_ffn, schedule.estimator).to(device)
        loss = float(problem.loss(maps, held_out, schedule.held_out_lambdas))
        if loss < best[2]:
            best = (problem, maps, loss)
    return best


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
    texts = load_texts(work.data, settings.samples, max_chars=chars_for(settings.max_length))
    batches = tokenize(pair.tokenizer, texts, settings.max_length, settings.batch_size,
                       spec.architecture, objective)
    if len(batches) < 2:
        raise ValueError("matching=learned needs at least two calibration batches (one held "
                         "out to stop early); raise --samples or lower --batch-size")
    held = max(1, len(batches) // 10)
    container = getattr(transformers, spec.architecture)(pair.config)
    # The model's own parameter names (checkpoints may use legacy aliases, e.g. embed_out),
    # one per tied group: functional_call refuses two values for tied weights.
    unique = [n for n, _ in container.named_parameters()] + [n for n, _ in container.named_buffers()]
    sa, sb = work.readers()
    names = [n for n in unique if sa.get(n) is not None]
    state_a, state_b = ({n: (t.float() if t.is_floating_point() else t)
                         for n, t in ((n, source.get(n)) for n in names)} for source in (sa, sb))
    starts = [start]
    if settings.learn_init == "best":
        try:
            starts.append(weight_match_alignment(
                spec, state_a, state_b, settings.model_copy(update={"matching": "weights"})))
        except ValueError as e:   # settings weight matching cannot honour (residual=first, ...)
            LOG.info("learn_init=best: no weight-matching start (%s)", e)
    fixed, span = lambdas_of(settings.learn_lambdas)
    schedule = Schedule(steps=settings.learn_steps, lr=settings.learn_lr, lambdas=fixed or (0.5,),
                        lambda_range=span, permute_ffn=settings.learn_permutations,
                        estimator=settings.learn_estimator)
    return learn(spec, container, (state_a, state_b), starts,
                 (batches[:-held], batches[-held:]), schedule, work.device)
