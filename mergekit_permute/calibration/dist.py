"""torch.distributed: calibration batches split across ranks, statistics all-reduced.

Run under `torchrun --nproc-per-node N -m mergekit_permute align ...` (NCCL on GPUs, gloo on
CPU): every rank tokenizes the same text, calibrates every N-th batch, and the layer sums are
added across ranks as each layer completes (a rank with no batch adds zeros); rank 0 solves and
writes. With one process (no torchrun) every method here is the identity, so the plain run is
the same code.
"""

import logging
import os
from typing import Dict, List, Sequence, TypeVar

import torch
import torch.distributed as td

from mergekit_permute.calibration.stats import SUMS, CrossStats

LOG = logging.getLogger(__name__)
T = TypeVar("T")


class Distributed:
    """The current process group (or a single process)."""

    def __init__(self):
        self.active = td.is_available() and td.is_initialized()
        self.rank = td.get_rank() if self.active else 0
        self.size = td.get_world_size() if self.active else 1

    @property
    def device_index(self) -> int:
        """This rank's GPU on its own node (torchrun's LOCAL_RANK; the rank on one node)."""
        return int(os.environ.get("LOCAL_RANK", self.rank))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: Sequence[T]) -> List[T]:
        return list(items[self.rank::self.size])

    def reduce(self, stats: Dict[str, CrossStats]) -> Dict[str, CrossStats]:
        """Sum every rank's statistics (in a fixed key order, so every rank agrees; every rank
        must hold the same keys, zeros where it saw no tokens). The sums are shifted
        (stats.py): every rank re-centres its own onto the shifts of the first rank that saw
        tokens, broadcast from it, so the all-reduced sums are about one shift, exactly."""
        if not self.active:
            return stats
        device = _device()
        keys = sorted(stats)
        # per key, the first rank with tokens (its shifts are everyone's); `size`: none has
        owners = torch.tensor([float(self.rank if stats[k]._fixed else self.size) for k in keys],
                              dtype=torch.float64, device=device)
        td.all_reduce(owners, op=td.ReduceOp.MIN)
        out = {}
        for key, owner in zip(keys, owners.tolist()):
            shifts = [stats[key].shift_a.to(device).clone(), stats[key].shift_b.to(device).clone()]
            for shift in shifts:
                td.broadcast(shift, src=int(owner) if owner < self.size else 0)
            stats[key].recenter_(*(s.to(stats[key].shift_a.device) for s in shifts))
            tensors = {n: t.to(device) for n, t in stats[key].tensors().items()}
            for name in SUMS:
                td.all_reduce(tensors[name])
            out[key] = CrossStats.from_tensors({n: t.cpu() for n, t in tensors.items()})
        return out

    def total(self, count: int) -> int:
        if not self.active:
            return count
        t = torch.tensor(float(count), dtype=torch.float64, device=_device())
        td.all_reduce(t)
        return int(t.item())

    def barrier(self) -> None:
        if self.active:
            td.barrier()

    def close(self) -> None:
        """Leave the process group (every rank, once its last collective is done)."""
        if self.active and td.is_initialized():
            td.destroy_process_group()


def _device() -> torch.device:
    if td.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_from_env(device: str) -> Distributed:
    """Join the process group torchrun describes (WORLD_SIZE > 1), else a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not td.is_initialized():
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        td.init_process_group(backend)
        LOG.info("rank %d of %d (%s)", td.get_rank(), td.get_world_size(), backend)
    return Distributed()
