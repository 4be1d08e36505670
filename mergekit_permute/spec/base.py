"""The permutation spec: one declarative table per architecture.

A space is a set of features that may be reordered or rotated without changing the function
(one layer's FF neurons, one layer's heads x head_dim, the residual stream), seen through
views (queries, keys, values, output columns). Every weight lists, per axis, the space and
view it lies in and whether it writes ("out"), reads ("in") or scales ("elem") it; fused axes
(c_attn, query_key_value) concatenate views. Everything else is generic code driven by this.
"""

from __future__ import annotations

from typing import Dict, List, Literal, Optional, Tuple, Union

import torch
from pydantic import BaseModel, ConfigDict, model_validator

Role = Literal["out", "in", "elem"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class HeadLayout(_Frozen):
    """Head structure of an attention space (GQA when num_kv_heads < num_heads)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    # Dimensions inside a Q/K head that must not move: RoPE pairs dimensions by frequency.
    # 0 = every Q/K dimension may move (absolute positions, e.g. BERT, GPT-2).
    qk_frozen_dims: int = 0

    @model_validator(mode="after")
    def _check(self) -> "HeadLayout":
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if not 0 <= self.qk_frozen_dims <= self.head_dim:
            raise ValueError("qk_frozen_dims must lie in [0, head_dim]")
        return self

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads


class Space(_Frozen):
    name: str
    kind: Literal["residual", "ffn", "attention"]
    size: int
    heads: Optional[HeadLayout] = None
    features: Tuple[FeaturePoint, ...] = ()
    layer: Optional[int] = None
    # The model's output is expressed in this basis (a bare encoder's hidden states), so only
    # the identity keeps its function.
    frozen: bool = False
    # SwiGLU: the gate projection writes the FF space through a non-homogeneous activation, so
    # it is its own view ("gate": permuted only) while up / down (view "") may also be scaled.
    gated: bool = False

    @model_validator(mode="after")
    def _check(self) -> "Space":
        if (self.kind == "attention") != (self.heads is not None):
            raise ValueError(f"space {self.name}: head layout is required for attention only")
        if self.heads and self.size != self.heads.num_heads * self.heads.head_dim:
            raise ValueError(f"space {self.name}: size != num_heads * head_dim")
        return self

    @property
    def views(self) -> Dict[str, int]:
        """View name -> length of the axis it indexes."""
        if self.heads is None:
            return {"": self.size, "gate": self.size} if self.gated else {"": self.size}
        kv = self.heads.num_kv_heads * self.heads.head_dim
        return {"q": self.size, "k": kv, "v": kv, "o": self.size}


class Bind(_Frozen):
    """One axis lies wholly in one view of one space."""

    space: str
    view: str = ""
    role: Role


class Fused(_Frozen):
    """An axis that concatenates several views (e.g. c_attn = [Q | K | V]).

    layout "blocks": [part0 | part1 | ...] each part its full view;
    layout "per_head": (heads, parts, head_dim), heads interleaved as GPT-NeoX stores them.
    A part of None is an untouched segment of the given size.
    """

    parts: Tuple[Optional[Bind], ...]
    sizes: Tuple[int, ...]
    layout: Literal["blocks", "per_head"] = "blocks"
    num_heads: int = 1

    def part_index(self, j: int) -> torch.Tensor:
        """Positions of part j along the fused axis, in the order of that part's view."""
        if self.layout == "blocks":
            start = sum(self.sizes[:j])
            return torch.arange(start, start + self.sizes[j])
        # per_head: the axis is [heads, parts, head_dim] flattened; part j is [:, j, :]
        head_dim = self.sizes[j] // self.num_heads
        idx = (torch.arange(self.num_heads)[:, None] * (len(self.parts) * head_dim)
               + j * head_dim + torch.arange(head_dim)[None, :])           # [heads, head_dim]
        return idx.reshape(-1)


Axis = Union[None, Bind, Fused]


class FeaturePoint(_Frozen):
    """Where a space's features are read during calibration: a module's input or output;
    `part` picks one part of a fused output (e.g. Q out of GPT-2's [Q | K | V] c_attn)."""

    module: str
    where: Literal["input", "output"]
    part: Optional[Tuple[Fused, int]] = None


class WeightRule(_Frozen):
    """A tensor of the checkpoint, its shape, and one binding per axis (None = untouched)."""

    name: str
    shape: Tuple[int, ...]
    axes: Tuple[Axis, ...]
    layer: Optional[int] = None
    # Also present under these names (tied or legacy); they follow the same rule.
    aliases: Tuple[str, ...] = ()
    # Saved checkpoints may omit it because it is tied to another weight.
    tied_to: Optional[str] = None
    # A tensor the class does not use that checkpoints may ship (an MLM checkpoint's pooler and
    # next-sentence head): transformed where present, never demanded.
    optional: bool = False
    # The axis that indexes the vocabulary (embeddings, LM heads, output biases): MergeKit
    # resizes and reorders it when tokenizers are merged.
    vocab_axis: Optional[int] = None

    @model_validator(mode="after")
    def _check(self) -> "WeightRule":
        if len(self.axes) != len(self.shape):
            raise ValueError(f"{self.name}: {len(self.axes)} axis bindings for shape {self.shape}")
        return self


class NormFold(_Frozen):
    """A norm whose gain may be folded into the weights that read its output (their input
    axis), leaving a gain of ones; a LayerNorm's bias then becomes bias / gain. An RMSNorm
    then commutes with any orthogonal map of the residual, a LayerNorm with those that keep
    the all-ones vector (its mean subtraction)."""

    norm: str
    readers: Tuple[str, ...]
    bias: Optional[str] = None
    # The norm multiplies by (offset + stored weight): 1.0 for Gemma's (1 + w) RMSNorm.
    offset: float = 0.0


class PermutationSpec(_Frozen):
    """The complete, self-validating table for one model configuration."""

    family: str
    architecture: str
    spaces: Tuple[Space, ...]
    weights: Tuple[WeightRule, ...]
    num_layers: int
    # Module path of the ModuleList holding the blocks (layer-wise execution runs them one by
    # one); every tensor with `layer = i` lives under f"{blocks}.{i}.".
    blocks: str
    # Present only where every residual norm can be folded (pre-norm models): this is what
    # admits an orthogonal residual alignment (the head must also be untied).
    norm_folds: Tuple[NormFold, ...] = ()
    # LayerNorm subtracts the mean: residual maps must then keep the all-ones vector.
    residual_centered: bool = False

    @model_validator(mode="after")
    def _validate(self) -> "PermutationSpec":
        spaces = {s.name: s for s in self.spaces}
        if len(spaces) != len(self.spaces):
            raise ValueError(f"{self.family}: duplicate space names")
        names = [w.name for w in self.weights]
        if len(set(names)) != len(names):
            raise ValueError(f"{self.family}: duplicate weight names")
        used = set()
        for w in self.weights:
            for dim, axis in zip(w.shape, w.axes):
                for bind, size in _bindings(axis, dim, w.name):
                    space = spaces.get(bind.space)
                    if space is None:
                        raise ValueError(f"{w.name}: unknown space {bind.space!r}")
                    views = space.views
                    if bind.view not in views:
                        raise ValueError(f"{w.name}: space {space.name} has no view {bind.view!r}")
                    if views[bind.view] != size:
                        raise ValueError(
                            f"{w.name}: axis of size {size} bound to {space.name}"
                            f"[{bind.view or 'all'}] of size {views[bind.view]}"
                        )
                    used.add(space.name)
        for w in self.weights:
            if w.layer is not None and not w.name.startswith(f"{self.blocks}.{w.layer}."):
                raise ValueError(f"{w.name}: layer {w.layer} tensor outside {self.blocks}")
        unused = set(spaces) - used
        if unused:
            raise ValueError(f"{self.family}: spaces that act on no weight: {sorted(unused)}")
        by_name = {w.name: w for w in self.weights}
        for fold in self.norm_folds:
            for name in (fold.norm, *fold.readers, *((fold.bias,) if fold.bias else ())):
                if name not in by_name:
                    raise ValueError(f"{self.family}: norm fold names unknown weight {name}")
        return self

    @property
    def qk_normed(self) -> bool:
        """Per-head norms on queries and keys (Qwen3's q_norm/k_norm, per-dim gains shared
        by all heads): heads may move, but no map may act inside a head's Q/K dims."""
        return any(w.name.endswith(("q_norm.weight", "k_norm.weight")) for w in self.weights)

    def orthogonal_residual_error(self) -> Optional[str]:
        """Why an orthogonal residual map is not function-preserving here (None if it is)."""
        if not self.norm_folds:
            return (f"{self.architecture} normalises the residual stream itself (post-LayerNorm):"
                    " an orthogonal residual map needs pre-norm models whose norms fold into "
                    "their readers (Llama family, GPT-NeoX, untied GPT-2)")
        folded = {f.norm for f in self.norm_folds}
        scaled = [w.name for w in self.weights
                  if any(isinstance(a, Bind) and a.role == "elem" for a in w.axes)
                  and w.name not in folded]
        if scaled:
            return f"{self.architecture}: residual gains that cannot be folded: {scaled[:3]}"
        tied = [w.name for w in self.weights if w.tied_to and any(
            isinstance(a, Bind) and a.space == "residual" for a in w.axes)
            and any(w.name in f.readers for f in self.norm_folds)]
        if tied:
            return (f"{self.architecture}: the final norm's gain cannot be folded into a head "
                    f"tied to the embeddings ({tied[0]}); untie both models first "
                    "(`mergekit-permute untie MODEL --out COPY`: same function, the head becomes "
                    "its own tensor) or use a permutation policy")
        return None

    def writer_point(self, space: str, view: str) -> Optional[FeaturePoint]:
        """The projection output that *writes* a view (e.g. the queries of an attention space):
        the output of the first 2-D weight with an "out" binding to it, fused part included."""
        for w in self.weights:
            if not w.name.endswith(".weight") or len(w.shape) != 2:
                continue
            for axis in w.axes:
                parts = axis.parts if isinstance(axis, Fused) else (axis,)
                for j, bind in enumerate(parts):
                    if bind is not None and (bind.space, bind.view, bind.role) == (space, view, "out"):
                        return FeaturePoint(module=w.name[: -len(".weight")], where="output",
                                            part=(axis, j) if isinstance(axis, Fused) else None)
        return None

    def reader_views(self) -> List[Tuple[str, str]]:
        """Every (space, view) some weight reads through (an "in" axis, fused parts included)."""
        found = []
        for w in self.weights:
            for axis in w.axes:
                for bind in (axis.parts if isinstance(axis, Fused) else (axis,)):
                    if isinstance(bind, Bind) and bind.role == "in" \
                            and (bind.space, bind.view) not in found:
                        found.append((bind.space, bind.view))
        return found

    def reader(self, space: str) -> Tuple[WeightRule, int]:
        """The 2-D weight that reads a space (its "in" axis), e.g. the FF down projection."""
        for w in self.weights:
            for axis, bind in enumerate(w.axes):
                if len(w.shape) == 2 and isinstance(bind, Bind) and bind.space == space \
                        and bind.role == "in":
                    return w, axis
        raise ValueError(f"space {space} has no reading weight")

    def layer_of(self, module: str) -> Optional[int]:
        """The block a module path lies in (None: embeddings or head)."""
        prefix = self.blocks + "."
        if not module.startswith(prefix):
            return None
        return int(module[len(prefix):].split(".", 1)[0])

    def layer_tensors(self, layer: Optional[int]) -> List[WeightRule]:
        return [w for w in self.weights if w.layer == layer]

    def space(self, name: str) -> Space:
        for s in self.spaces:
            if s.name == name:
                return s
        raise KeyError(name)

    def weight_map(self) -> Dict[str, WeightRule]:
        """Every name a tensor may carry (aliases included) -> its rule."""
        out: Dict[str, WeightRule] = {}
        for w in self.weights:
            out[w.name] = w
            for alias in w.aliases:
                out[alias] = w
        return out

    def check_state_dict(self, shapes: Dict[str, Tuple[int, ...]]) -> None:
        """Refuse a checkpoint whose tensors this spec does not cover exactly."""
        rules = self.weight_map()
        unknown = sorted(n for n in shapes if n not in rules and not _is_buffer(n))
        if unknown:
            raise ValueError(
                f"{self.architecture}: tensors not covered by the permutation spec: "
                f"{unknown[:8]}{' ...' if len(unknown) > 8 else ''}. The checkpoint does not "
                "match the architecture named in its config."
            )
        for name, shape in shapes.items():
            rule = rules.get(name)
            if rule is not None and tuple(shape) != rule.shape:
                raise ValueError(
                    f"{name}: shape {tuple(shape)} in the checkpoint, {rule.shape} expected "
                    "from its config."
                )
        present = set(shapes)
        missing = [
            w.name
            for w in self.weights
            if w.tied_to is None and not w.optional
            and not present.intersection((w.name, *w.aliases))
        ]
        if missing:
            raise ValueError(f"{self.architecture}: checkpoint lacks {missing[:8]}")


def _is_buffer(name: str) -> bool:
    # Non-learned index buffers some checkpoints carry (position_ids etc.); never permuted.
    # (GPT-2's causal mask `h.N.attn.bias`, in older checkpoints: not `attn.c_attn.bias`)
    return name.endswith((".position_ids", ".token_type_ids", ".masked_bias", "attention.bias",
                          ".attn.bias", ".rotary_emb.inv_freq"))


def _bindings(axis: Axis, dim: int, weight: str):
    """(Bind, axis length) for every space binding of one axis."""
    if axis is None:
        return []
    if isinstance(axis, Bind):
        return [(axis, dim)]
    if len(axis.parts) != len(axis.sizes):
        raise ValueError(f"{weight}: fused axis parts and sizes differ in length")
    if sum(axis.sizes) != dim:
        raise ValueError(f"{weight}: fused sizes {axis.sizes} do not add up to {dim}")
    return [(p, s) for p, s in zip(axis.parts, axis.sizes) if p is not None]


Space.model_rebuild()
