"""Output directories: checked before any work, built beside the target, moved into place only
when complete.

An output is refused when it is empty, the working directory (or above it), a symbolic link
(or a loop of them), or is, contains or lies inside any input (models, data, alignments, the
statistics cache). `--overwrite` replaces only a directory this tool or MergeKit wrote (it holds
one of OURS) or an empty one. A killed run leaves a `.NAME.partial-PID-*` directory; the next
run into the same place reports and removes it (if its process is gone).
"""

import errno
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Tuple

from mergekit_permute.io.preflight import PreflightError

LOG = logging.getLogger(__name__)
# Files that mark a directory written by mergekit-permute (align, apply, barrier, merge, untie) or by
# MergeKit (every merge writes its recipe as mergekit_config.yml).
OURS = ("alignment.json", "alignment-1.json", "permutations.safetensors", "barrier.json",
        "merge.json", "mergekit_config.yml", "untied.json")
Inputs = Iterable[Tuple[str, Optional[str]]]   # (what it is, a path or hub id) pairs


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def follow_umask(path: Path, mode: int = 0o666) -> None:
    """Give a file the mode a plain open() would have (tempfile and some writers make 0600)."""
    os.chmod(path, mode & ~_umask())


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def written_by_us(path: Path) -> bool:
    return any((path / name).is_file() for name in OURS)


def _resolve(out) -> Path:
    """The absolute output path; refuses an empty one, a symlink and a loop of them."""
    if out is None or not str(out).strip():
        raise PreflightError("the output path is empty (an unset shell variable?); name the "
                             "directory to write, e.g. --out merged-model")
    path = Path(str(out)).expanduser().absolute()
    if path.name == "..":   # (absolute() keeps it: `x/..` would not compare equal to its target)
        path = path.resolve()
    if path.is_symlink():
        try:
            target = path.resolve(strict=True)
        except (RuntimeError, OSError):
            raise PreflightError(f"{path} is a symbolic link that loops or points nowhere; "
                                 "choose another output directory") from None
        raise PreflightError(f"{path} is a symbolic link (to {target}); pass the real directory "
                             "or another output path")
    try:
        return path.parent.resolve(strict=False) / path.name
    except (RuntimeError, OSError):
        raise PreflightError(f"{path}: a symbolic link in its parents loops; choose another "
                             "output directory") from None


def _local(path: Optional[str]) -> Optional[Path]:
    if not path:
        return None
    p = Path(str(path)).expanduser()
    try:
        return p.resolve(strict=True)
    except (OSError, RuntimeError):
        return None   # a hub id, or nothing there (its own check names it)


def check_overlap(out, inputs: Inputs) -> None:
    """The output is none of the inputs, holds none and lies in none (nor is it the working
    directory, the root or home)."""
    out = _resolve(out)
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise PreflightError(f"the output {out} is the working directory or contains it; name a "
                             "new directory to write (e.g. merged-model)")
    if out == Path(out.anchor) or out == Path.home().resolve():
        raise PreflightError(f"the output {out} is the filesystem root or the home directory; "
                             "name a new directory to write")
    for what, given in inputs:
        source = _local(given)
        if source is None:
            continue
        if out == source:
            relation = "is"
        elif source.is_relative_to(out):
            relation = "contains"
        elif out.is_relative_to(source):
            relation = "lies inside"
        else:
            continue
        raise PreflightError(f"the output {out} {relation} the {what} {given}; an output never "
                             "touches the inputs: choose another output directory")


def check_output(out, overwrite: bool, inputs: Inputs = (), need_bytes: int = 0) -> Path:
    """The output can be written where it is asked for without touching anything the user
    owns, and has room for `need_bytes`; returns its absolute path."""
    path = _resolve(out)
    check_overlap(path, inputs)
    if path.exists() and not path.is_dir():
        raise PreflightError(f"{path} exists and is not a directory; choose another output")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise PreflightError(f"{path} already exists and is not empty; pass --overwrite to "
                                 "replace it, or choose another output directory")
        if not written_by_us(path):
            raise PreflightError(
                f"{path} holds files that mergekit-permute or MergeKit did not write (none of "
                f"{', '.join(OURS)}); --overwrite replaces only such outputs. Remove it yourself "
                "or choose another output directory")
    if path.is_dir() and os.path.ismount(path):
        raise PreflightError(
            f"{path} is a mount point: an output is built beside it (in {path.parent}) and "
            "moved into place, which cannot cross filesystems; name a new directory inside it, "
            f"e.g. --out {path / 'merged-model'}")
    # Where the output is built and renamed from (atomic_dir): its parent, or the first of its
    # parents that exists; that is what must be writable and have room.
    anchor = next((p for p in path.parents if p.exists()), Path("/"))
    if not anchor.is_dir():
        raise PreflightError(f"cannot create {path}: {anchor} is a file, not a directory")
    if str(anchor).startswith(("/proc", "/sys", "/dev")):
        raise PreflightError(f"cannot write {path}: {anchor} is a virtual filesystem")
    try:   # a real probe: permissions, read-only mounts, quotas all show here
        fd, probe = tempfile.mkstemp(prefix=".mergekit-permute-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise PreflightError(f"cannot write {path}: {anchor} is not writable ({e.strerror})") \
            from None
    check_space(path, need_bytes)
    return path


def check_space(path: Path, need_bytes: int) -> None:
    """Room for `need_bytes` (every file a command writes) where `path` will be created."""
    if not need_bytes:
        return
    anchor = next((p for p in path.parents if p.exists()), Path("/"))   # (atomic_dir's)
    free = shutil.disk_usage(anchor).free
    if free < need_bytes * 1.05:
        raise PreflightError(f"{path} needs about {human_bytes(need_bytes)}, but {anchor} has "
                             f"{human_bytes(free)} free")


def clean_stale_partials(out: Path) -> None:
    """Remove what killed runs into `out` left behind (their processes are gone)."""
    for prefix in (f".{out.name}.partial-", f".{out.name}.old-"):
        for path in out.parent.glob(prefix + "*"):
            try:
                pid = int(path.name[len(prefix):].split("-", 1)[0])
            except ValueError:
                continue
            if pid != os.getpid() and not process_alive(pid):
                LOG.warning("removing %s, left by an interrupted run (process %d)", path, pid)
                shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary directory beside `out` (checked by `check_output` first), renamed to `out`
    when the block completes; removed if it fails. A full disk is one clear error."""
    out = _resolve(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    follow_umask(tmp, 0o777)   # mkdtemp makes 0700
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise PreflightError(f"no space left while writing {out} ({e.strerror}); nothing "
                                 "was written. Free space or choose another output directory") \
                from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if overwrite and out.is_dir() and any(out.iterdir()) and written_by_us(out):
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        try:
            os.rename(tmp, out)   # onto nothing or an empty directory; never a non-empty one
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            keep = out.parent / f"{out.name}.conflict-{os.getpid()}"
            tmp.rename(keep)
            raise FileExistsError(f"{out} appeared while this run was writing and was left "
                                  f"untouched; this run's result is in {keep} (pass --overwrite "
                                  "to replace an existing output)") from None
    LOG.info("wrote %s", out)
