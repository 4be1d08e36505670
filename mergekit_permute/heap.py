"""The process heap during a long calibration: memory that stays flat in depth without paying
a page fault for every activation.

glibc serves allocations above its mmap threshold straight from mmap and unmaps them on free,
so every later allocation of that size faults its pages in again (on the 32-layer scale
benchmark that was a third of the forwards' time). Below the threshold, freed memory stays in
the heap for reuse but is not handed back to the OS, and fragmentation between long-lived
buffers lets the heap (and the RSS) drift from run to run. So: a threshold above a small
model's activations (real models' activations exceed any threshold glibc allows and are
mmapped whatever we set), and the heap trimmed whenever the resident memory has grown by more
than SLACK above the first layer's working set (trimming after every batch keeps it flat too,
but every batch then faults its pages in again: 2-3 s of a 20 s run)."""

import ctypes
import functools
import mmap
import os

import torch

MMAP_THRESHOLD = 4 << 20   # bytes; glibc's own ceiling for it is 32 MiB
SLACK = 8 << 20            # resident growth tolerated before the heap is trimmed
_M_MMAP_THRESHOLD = -3


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc has both)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


def flat_heap() -> None:
    """Fix the mmap threshold (glibc otherwise raises it after the first large free, and keeps
    every later buffer of that size in its heap)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_bytes() -> int:
    """The process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapWatch:
    """Trims only when the resident memory grew more than `slack` above what it was at the
    first `settle()`, called once the working set exists (after a layer's first batch: every
    later layer's working set is alike, so later layers are held to the first one's, and the
    fragmentation a trim cannot undo does not ratchet the bound up layer by layer). The base
    stays put after a trim: the pages handed back are faulted in again by the next batch, and
    counting that as new growth would trim (and re-fault) after every batch."""

    def __init__(self, slack: int = SLACK):
        self.slack, self.base = slack, 0

    def settle(self) -> None:
        if not self.base:
            self.base = resident_bytes()

    def check(self) -> None:
        if self.base and resident_bytes() > self.base + self.slack:
            trim_heap()


def empty_outside_heap(shape, dtype: torch.dtype, device="cpu", minimum: int = MMAP_THRESHOLD
                       ) -> torch.Tensor:
    """An uninitialised tensor that, on the CPU and from `minimum` bytes up, is its own
    anonymous mapping, returned to the OS when freed. glibc serves such sizes from a free
    heap chunk whenever one fits, and long-lived matrices parked in the heap that way
    fragment it differently from run to run."""
    shape = tuple(shape)
    nbytes = int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
    if torch.device(device).type != "cpu" or nbytes < minimum or \
            not hasattr(mmap, "MAP_ANONYMOUS"):   # (not a POSIX system)
        return torch.empty(shape, dtype=dtype, device=device)
    private = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(private, dtype=dtype).view(shape)


def release_memory() -> None:
    """After a block: the heap trimmed and the accelerator's cached blocks freed."""
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
