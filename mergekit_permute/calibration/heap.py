"""The process heap during a long calibration: memory flat in depth without a page fault for
every activation.

glibc raises its mmap threshold after the first large free (and from then on keeps every buffer
of that size in its heap, which fragments) and returns a freed heap top beyond its trim
threshold, so the next batch faults the same activations in again. So: a fixed mmap threshold
(long-lived matrices above it are their own mappings), a trim threshold that keeps a batch's
working set resident, and an explicit trim (HeapWatch) when fragmentation grows the heap beyond
SLACK. Measured at TinyLlama's width in BENCHMARKS.md (`--variant no-heap-tuning`): without
them the peak is hundreds of MiB higher, at a few percent of time. Own mappings for long-lived
buffers and a skeleton built with its transients mmapped measured no different there and were
removed."""

import ctypes
import functools
import os

import torch

MMAP_THRESHOLD = 4 << 20   # bytes; glibc's own ceiling for it is 32 MiB
SLACK = 8 << 20            # heap growth tolerated before the heap is trimmed
_M_MMAP_THRESHOLD = -3
_M_TRIM_THRESHOLD = -1
# Free memory at the heap's top that free() leaves resident (glibc's default, 128 KiB, hands a
# batch's activations back to the OS as they are freed, and the next batch faults them in
# again); HeapWatch trims explicitly instead.
TRIM_THRESHOLD = 64 << 20


@functools.lru_cache(maxsize=None)
def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018  (glibc has both)
        return libc
    except (OSError, AttributeError):  # not glibc
        return None


_owned = {"heap": False}


def own_heap() -> None:
    """This process is ours (our CLI): its allocator may be tuned. A host process (MergeKit,
    a notebook) keeps glibc's settings, which once changed cannot be restored (setting the mmap
    threshold turns glibc's dynamic threshold off for good)."""
    _owned["heap"] = True
    flat_heap()


def flat_heap() -> None:
    """Fix the mmap threshold (glibc otherwise raises it after the first large free, and keeps
    every later buffer of that size in its heap) and raise the trim threshold; in our own
    process only (own_heap)."""
    libc = _libc()
    if libc is not None and _owned["heap"]:
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def trim_heap() -> None:
    """Hand the heap's free pages back to the OS."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _mmapped_chunks() -> int:
    """Bytes glibc serves straight from mmap now (its allocations above the threshold)."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):   # glibc < 2.33
        return 0
    libc.mallinfo2.restype = _MallInfo2   # (a struct returned by value)
    return int(libc.mallinfo2().hblkhd)


def heap_bytes() -> int:
    """The resident memory that is not one of glibc's own mmapped chunks: the heap, plus what
    does not move (code, libraries). Unlike the whole resident memory, it does not grow when
    long-lived matrices (mmapped: above the threshold) come and go."""
    return resident_bytes() - _mmapped_chunks()


def resident_bytes() -> int:
    """The process's resident memory now (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapWatch:
    """Trims the heap when it has grown more than `slack` above its working set. The working
    set is measured where it is known to be whole: at the first `settle()` (after a layer's
    first batch), and again one `check()` after every trim, once the next batch has faulted
    back in what it needs (growth since then is fragmentation, which the next trim returns).
    A bound that stayed at the first measure would be too low as soon as anything long-lived
    joins the working set, and every later batch would trim and fault its pages in again."""

    def __init__(self, slack: int = SLACK):
        self.slack, self.base, self._refit = slack, 0, False

    def settle(self) -> None:
        if not self.base:
            self.base = heap_bytes()

    def check(self) -> None:
        if not self.base:
            return
        now = heap_bytes()
        if self._refit:
            self.base, self._refit = max(self.base, now), False
        elif now > self.base + self.slack:
            trim_heap()
            self._refit = True


def release_memory() -> None:
    """After a block: the heap trimmed and the accelerator's cached blocks freed."""
    trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
