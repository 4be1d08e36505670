"""Structured attention permutations and their flat views.

Convention everywhere: a permutation p maps a *new* position to the *source* position in B
(new = old[p], i.e. torch.index_select). A head permutation moves whole KV groups, reorders
query heads inside their group, and permutes dimensions inside each head: one shared
permutation for Q and K (q.k must be preserved), one for V and O.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import torch

from mergekit_permute.spec.base import HeadLayout


@dataclass(frozen=True)
class HeadPerm:
    group: torch.Tensor      # [kv_heads]: new KV group -> source KV group
    query: torch.Tensor      # [kv_heads, group_size]: new slot in group -> source slot
    qk_inner: torch.Tensor   # [kv_heads, head_dim]: per new KV group, new dim -> source dim
    vo_inner: torch.Tensor   # [kv_heads, head_dim]

    @staticmethod
    def identity(layout: HeadLayout) -> "HeadPerm":
        kv, g, d = layout.num_kv_heads, layout.group_size, layout.head_dim
        return HeadPerm(group=torch.arange(kv), query=torch.arange(g).repeat(kv, 1),
                        qk_inner=torch.arange(d).repeat(kv, 1),
                        vo_inner=torch.arange(d).repeat(kv, 1))

    @staticmethod
    def random(layout: HeadLayout, gen: torch.Generator, qk_follows_vo: bool = False) -> "HeadPerm":
        """Uniform over the valid set. `qk_follows_vo` restricts Q/K to what matching on V/O
        features can recover: V's inner permutation where every Q/K dim may move, the
        identity where some are rotary."""
        kv, g, d, f = (layout.num_kv_heads, layout.group_size, layout.head_dim,
                       layout.qk_frozen_dims)
        perm = HeadPerm(
            group=torch.randperm(kv, generator=gen),
            query=torch.stack([torch.randperm(g, generator=gen) for _ in range(kv)]),
            # RoPE dimensions (the first qk_frozen_dims of a head) never move.
            qk_inner=torch.stack([torch.cat([torch.arange(f), f + torch.randperm(d - f, generator=gen)])
                                  for _ in range(kv)]),
            vo_inner=torch.stack([torch.randperm(d, generator=gen) for _ in range(kv)]),
        )
        if qk_follows_vo:
            qk = perm.vo_inner if f == 0 else torch.arange(d).repeat(kv, 1)
            perm = HeadPerm(perm.group, perm.query, qk, perm.vo_inner)
        return perm

    def views(self, layout: HeadLayout) -> Dict[str, torch.Tensor]:
        """Flat index permutations for the q, k, v rows and the o columns."""
        g, d = layout.group_size, layout.head_dim
        src_group = self.group                                   # [kv]
        src_query = src_group[:, None] * g + self.query          # [kv, g] source query head
        k = (src_group[:, None] * d + self.qk_inner).reshape(-1)            # [kv*d]
        v = (src_group[:, None] * d + self.vo_inner).reshape(-1)            # [kv*d]
        # [kv, g, d] -> [kv*g*d]: every query head of a group shares the group's inner perm.
        q = (src_query[:, :, None] * d + self.qk_inner[:, None, :]).reshape(-1)
        o = (src_query[:, :, None] * d + self.vo_inner[:, None, :]).reshape(-1)
        return {"q": q, "k": k, "v": v, "o": o}


def flat_views(perm: torch.Tensor, layout: Optional[HeadLayout]) -> Dict[str, torch.Tensor]:
    """The same flat permutation on every view (ignore_heads ablation; MHA only)."""
    if layout is not None and layout.num_kv_heads != layout.num_heads:
        raise ValueError("ignore_heads needs multi-head attention with as many KV as query heads")
    return {"q": perm, "k": perm, "v": perm, "o": perm}
