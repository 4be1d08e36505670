"""Layer-wise execution: a model run one block at a time over fixed calibration batches.

GPTQ's "catch the first layer's inputs": a skeleton on the meta device runs its embeddings and
records what every block receives (hidden states, masks, position embeddings); then each block
is loaded alone, run over every batch and freed. Memory: one block and the hidden states.
"""

import inspect
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch
import transformers
from accelerate import init_empty_weights

from mergekit_permute.spec.base import PermutationSpec

LOG = logging.getLogger(__name__)
Caught = Tuple[torch.Tensor, List[Tuple[tuple, Dict[str, Any]]]]  # hidden, per block (args, kwargs)


class _Stop(Exception):
    """Raised by the last block's recorder: nothing after the blocks is needed."""


class BlockRunError(ValueError):
    """A block that cannot run standalone (the message names it and what failed)."""


class BlockModel:
    """One model, executed block by block. `source` (a TensorSource) supplies the weights of
    a skeleton built on the meta device; without it `model` already holds its weights."""

    def __init__(self, spec: PermutationSpec, model: torch.nn.Module, source=None,
                 device="cpu", dtype: Optional[torch.dtype] = None):
        self.spec, self.model, self.source = spec, model.eval(), source
        self.device = torch.device(device)
        self.dtype = dtype
        self.blocks = model.get_submodule(spec.blocks)
        # a freed block's weight buffers, by (shape, dtype): the next block (every block has
        # the same shapes) is copied into them instead of into fresh memory it must fault in
        self._spare: Dict[Tuple[torch.Size, torch.dtype], List[torch.Tensor]] = {}
        self._hooks: List[Any] = []   # loading outside the blocks on first call (load(None))
        if len(self.blocks) != spec.num_layers:
            raise BlockRunError(f"{spec.blocks} holds {len(self.blocks)} blocks, the config "
                                f"{spec.num_layers}")
        if source is not None:  # buffers (rotary frequencies, position ids) are built on init
            for name, buf in list(model.named_buffers()):
                module, _, attr = name.rpartition(".")
                model.get_submodule(module)._buffers[attr] = buf.to(self.device)

    @staticmethod
    def skeleton(spec: PermutationSpec, config, source, device="cpu",
                 dtype: torch.dtype = torch.float32) -> "BlockModel":
        """A model with no weights yet: parameters on the meta device, buffers real."""
        cls = getattr(transformers, spec.architecture)
        with init_empty_weights(include_buffers=False):
            model = cls(config)
        return BlockModel(spec, model, source, device, dtype)

    # ---- weights ----
    def _params(self, layer: Optional[int]):
        prefix = f"{self.spec.blocks}."
        for name, _ in self.model.named_parameters(remove_duplicate=False):
            inside = name.startswith(prefix)
            if (layer is None and not inside) or \
                    (layer is not None and name.startswith(f"{prefix}{layer}.")):
                yield name

    def _set(self, name: str, tensor: torch.Tensor) -> None:
        module, _, attr = name.rpartition(".")
        self.model.get_submodule(module)._parameters[attr] = torch.nn.Parameter(
            tensor, requires_grad=False)

    def load(self, layer: Optional[int]) -> None:
        """Materialise block `layer` from the source. With `layer` None, what lies outside the
        blocks is materialised module by module as the embedding pass first calls it, so a
        head after the blocks (a vocabulary-sized matrix) is never loaded."""
        if self.source is None:
            return
        if layer is None:
            self._load_on_call()
            return
        self._load_names(self._params(layer))

    def _load_on_call(self) -> None:
        params = set(self._params(None))
        inside = f"{self.spec.blocks}."
        for mname, module in self.model.named_modules(remove_duplicate=False):
            if mname == self.spec.blocks or mname.startswith(inside):
                continue
            names = [n for n in (f"{mname}.{a}" if mname else a
                                 for a, p in module._parameters.items() if p is not None)
                     if n in params]
            if not names:
                continue
            if self._gather_only(module):
                # a lookup of stored values cast afterwards is the lookup of cast values:
                # the table stays in its stored dtype (half a float32 copy)
                names = [(n, None) for n in names]
                self._hooks.append(module.register_forward_hook(
                    lambda _m, _i, out: out.to(self.dtype), prepend=True))
            self._hooks.append(module.register_forward_pre_hook(
                lambda m, _i, names=names: self._load_names(
                    n for n in names if getattr(m, _attr(n)).is_meta)))

    def _gather_only(self, module: torch.nn.Module) -> bool:
        return type(module) is torch.nn.Embedding and module.max_norm is None and \
            self.dtype is not None and module.weight.dtype.is_floating_point

    def _load_names(self, names) -> None:
        for entry in names:
            name, cast = entry if isinstance(entry, tuple) else (entry, True)
            tensor = self.source.get(name)
            if tensor is None:  # e.g. a head tied to the embeddings and not stored
                continue
            dtype = self.dtype if cast and tensor.is_floating_point() and self.dtype \
                else tensor.dtype
            # a copy: callers may correct a loaded block in place (REPAIR), never the source
            spare = self._spare.get((tensor.shape, dtype))
            buffer = spare.pop() if spare else \
                torch.empty(tensor.shape, dtype=dtype, device=self.device)
            self._set(name, buffer.copy_(tensor))

    def free(self, layer: Optional[int]) -> None:
        """Back to the meta device; a block's buffers are kept for the next block (`layer`
        None frees everything, spares included)."""
        if self.source is None:
            return
        if layer is None:
            self._spare.clear()
            for hook in self._hooks:
                hook.remove()
            self._hooks.clear()
        for name in self._params(layer):
            module, _, attr = name.rpartition(".")
            param = self.model.get_submodule(module)._parameters[attr]
            if layer is not None and not param.is_meta:
                self._spare.setdefault((param.shape, param.dtype), []).append(param.data)
            self._set(name, torch.empty(param.shape, dtype=param.dtype, device="meta"))

    # ---- execution ----
    def catch(self, batch: Dict[str, torch.Tensor]) -> Caught:
        """Run the embeddings on one batch and record every block's inputs."""
        calls: List[Optional[Tuple[tuple, Dict[str, Any]]]] = [None] * len(self.blocks)

        def recorder(i: int):
            def forward(*args, **kwargs):
                calls[i] = (args, kwargs)
                if i == len(self.blocks) - 1:
                    raise _Stop()
                return args[0] if args else kwargs["hidden_states"]
            return forward

        # A block may carry its own instance-level forward (e.g. an accelerate hook): restore it.
        own = [block.__dict__.get("forward") for block in self.blocks]
        for i, block in enumerate(self.blocks):
            block.forward = recorder(i)
        inputs = {k: v.to(self.device) for k, v in batch.items() if k != "labels"}
        try:
            self.model(**inputs, **no_cache(self.model))
        except _Stop:
            pass
        except Exception as e:
            raise BlockRunError(f"{self.spec.architecture}: the embeddings could not run on "
                                f"their own before the blocks ({type(e).__name__}: {e})") from e
        finally:
            for block, forward in zip(self.blocks, own):
                del block.forward
                if forward is not None:
                    block.forward = forward
        if any(c is None for c in calls):
            raise BlockRunError(f"{self.spec.architecture}: not every block of {self.spec.blocks}"
                                " was called in order, so the model cannot run block by block")
        args, kwargs = calls[0]
        hidden = args[0] if args else kwargs["hidden_states"]
        # every call without its hidden states (run() puts each layer's in): the embeddings'
        # output is kept once, where the caller parks it (the host, when the device is short)
        calls = [((None, *a[1:]), k) if a else (a, {**k, "hidden_states": None})
                 for a, k in calls]
        return hidden, calls

    def run(self, layer: int, hidden: torch.Tensor, call: Tuple[tuple, Dict[str, Any]]
            ) -> torch.Tensor:
        args, kwargs = call
        if args:
            args = (hidden, *args[1:])
        else:
            kwargs = {**kwargs, "hidden_states": hidden}
        try:
            out = self.blocks[layer](*args, **kwargs)
        except Exception as e:
            raise BlockRunError(f"{self.spec.architecture}: block {layer} of {self.spec.blocks} "
                                f"could not run standalone ({type(e).__name__}: {e})") from e
        return out[0] if isinstance(out, (tuple, list)) else out


def _attr(name) -> str:
    return (name[0] if isinstance(name, tuple) else name).rpartition(".")[2]


def no_cache(model) -> Dict[str, Any]:
    """A KV cache would grow with every batch and leak state between runs of a block."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters \
        else {}
