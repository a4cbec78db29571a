"""Atomic file output: nothing half-written is ever left at the destination.

Every file oamipc writes (ONNX models, reports, saved programs) goes through
:func:`atomic_output`: the writer fills a temporary file in the destination's directory (same
file system, so the final ``os.replace`` is atomic), and only a writer that returned normally gets
its file renamed into place.  On any exception -- including ``KeyboardInterrupt`` and a full
disk -- the temporary file is removed and the destination is left as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from oamipc.errors import OutputError


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early, before any expensive work, if ``path`` cannot be written.

    Permission bits are not enough (root ignores them; read-only and pseudo file systems do not
    show in them), so this creates and removes a probe file where the output will go.
    """
    dest = Path(path)
    parent = dest.parent if str(dest.parent) else Path(".")
    if dest.is_dir():
        raise OutputError(f"output path {dest} is a directory: give a file name, e.g. {dest / 'model.onnx'}")
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot write {dest}: {parent} is a file, not a directory; choose another path")
    if not parent.is_dir():
        raise OutputError(f"cannot write {dest}: directory {parent} does not exist; create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".probe", dir=parent)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: directory {parent} is not writable "
                          f"({exc.strerror or exc}); choose another path") from exc
    os.close(fd)
    os.unlink(probe)
    return dest


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc``, or an exception it was raised from, says the disk (or the quota) is full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def write_error(dest: Path, exc: OSError) -> OutputError:
    """The one-line error for a failed write of ``dest``; a full disk says where to free space."""
    if is_disk_full(exc):
        where = dest.parent if str(dest.parent) else Path(".")
        return OutputError(f"cannot write {dest}: no space left on the disk of {where.resolve()}; "
                           f"free disk space there (or choose another path) and run again")
    return OutputError(f"cannot write {dest}: {exc.strerror or exc}; check the path and free disk space")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it to ``path`` when the block succeeds."""
    dest = check_writable(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {dest}: {exc.strerror or exc}; choose another path") from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file private (0600); give the result the usual permissions.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dest)
    except OSError as exc:
        raise write_error(dest, exc) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
