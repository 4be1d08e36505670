"""The learnable exact symmetries of one architecture (`Maps`), as a transform set: every map
a reparametrisation of B (learn.py learns them against the merged model's loss)."""

import math
from typing import Sequence

import torch

from mergekit_permute.core.match import assign
from mergekit_permute.core.permute import Scaled, Transforms, identity_transforms
from mergekit_permute.spec.base import HeadLayout, PermutationSpec


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


class Maps(torch.nn.Module):
    """The learnable exact symmetries of one architecture, all at the identity at the start."""

    def __init__(self, spec: PermutationSpec, rotate_residual: bool, permute_ffn: bool = False,
                 estimator: str = "ste", permute_heads: bool = False):
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
        # Head permutations the same way, over KV groups (a group moves with its query heads).
        self.head_scores = torch.nn.ParameterDict()
        learn_qk = not spec.qk_normed
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
                if permute_heads and h.num_kv_heads > 1:
                    self.head_scores[key] = torch.nn.Parameter(torch.eye(h.num_kv_heads))
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
                if key in self.head_scores:   # new group g <- old group p[g], then its maps
                    g = self._permutation(self.head_scores[key], hard)             # [kv, kv]
                    for view, n in space.views.items():
                        per_group = n // h.num_kv_heads   # head_dim (k, v), group_size * head_dim
                        eye = torch.eye(per_group, dtype=g.dtype, device=g.device)
                        within = views.get(view, torch.eye(n, dtype=g.dtype, device=g.device))
                        views[view] = torch.kron(g, eye) @ within                   # [n, n]
                out[space.name].update(views)
            elif key in self.ffn_scores:
                m = self._permutation(self.ffn_scores[key], hard)
                out[space.name] = {view: m for view in space.views}
                if key in self.ffn:
                    out[space.name][""] = m * self.ffn[key].exp()[None, :]
            elif key in self.ffn:
                out[space.name][""] = Scaled(torch.arange(space.size), self.ffn[key].exp())
        return out

    def _permutation(self, scores: torch.Tensor, hard: bool) -> torch.Tensor:
        """[n, n] M (h' = h @ M) of learned scores [old, new]. ste: their assignment (hard,
        exact) carrying the scores' gradient; sinkhorn: sinkhorn(scores / tau) unless `hard`."""
        if self.estimator == "sinkhorn" and not hard:
            return sinkhorn(scores / sinkhorn_tau(len(scores)))
        p = hard_permutation(scores)
        onehot = torch.zeros_like(scores)
        onehot[p, torch.arange(len(p))] = 1.0        # M[p[i], i] = 1
        return onehot + (scores - scores.detach())   # = onehot exactly

    def final(self) -> Transforms:
        """The learned maps with every learned permutation matrix as its permutation."""
        out = self.transforms(hard=True)
        for space in self.spec.spaces:
            key = space.name.replace(".", "_")
            if key in self.ffn_scores:
                p = hard_permutation(self.ffn_scores[key])
                out[space.name] = {view: p for view in space.views}
                if key in self.ffn:
                    out[space.name][""] = Scaled(p, self.ffn[key].exp().detach())
            elif key in self.head_scores and not (key in self.qk_log_r or key in self.qk_free):
                # Q/K not learned (per-head norms): their views stay index permutations
                p, kv = hard_permutation(self.head_scores[key]), space.heads.num_kv_heads
                for view in ("q", "k"):
                    per_group = space.views[view] // kv
                    out[space.name][view] = (p[:, None] * per_group
                                             + torch.arange(per_group)).reshape(-1)  # [kv * n]
        return out


def hard_permutation(scores: torch.Tensor) -> torch.Tensor:
    """The assignment of scores [old, new]: new feature i <- old feature p[i]."""
    perm, _ = assign(scores.detach().cpu().double().numpy().T)        # rows: new
    return torch.from_numpy(perm)
