"""Atomic output directories: built beside the target, moved into place only when complete.

A killed run leaves a `.NAME.partial-PID-*` directory; the next run into the same place reports
and removes it (if its process is gone). The final rename never replaces an output that
appeared while this run worked, unless --overwrite: a directory that is not empty cannot be
renamed over, so two runs racing into one place cannot both "succeed".
"""

import errno
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOG = logging.getLogger(__name__)


def check_output_dir(out: Path, overwrite: bool) -> None:
    """Refuse to clobber a finished model unless asked (checked before any expensive work)."""
    from mergekit_permute.preflight import check_output
    check_output(out, overwrite)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_partials(out: Path) -> None:
    """Remove what killed runs into `out` left behind (their processes are gone)."""
    prefix = f".{out.name}.partial-"
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
    out = Path(out).expanduser().absolute()
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700; outputs follow the umask
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if overwrite and out.exists():
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
