"""Every file featx writes: a temporary file, fsync, rename; every OSError one sentence.

A reader (or a crash) never meets a half-written file at a path featx owns: the bytes go
to ``<name>.<pid>@<host>.tmp`` in the same folder, are flushed to the disk, and replace
the target by an atomic rename, so on a full disk or after a kill the previous file is
still whole.  A temporary file left by a killed process is removed by the next write to
the same path (when its process is gone).  :func:`check_output` tries an output location
before long work starts, and :func:`os_error` turns an ``OSError`` into the one sentence
the user sees (the path and the cause: disk full, read-only, not a folder...).
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
import shutil
import socket
from pathlib import Path

from featx.errors import FeatxError

_HOST = socket.gethostname().replace("/", "_")
_CAUSES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "a part of the path is not a folder",
    errno.EISDIR: "it is a folder",
    errno.ENOENT: "no such file or folder",
    errno.EFBIG: "the file grew beyond the size this system allows",
    errno.ENAMETOOLONG: "the name is too long",
    errno.EEXIST: "something else already exists there",
}


def cause(e: OSError) -> str:
    """What went wrong, in a few words ("the disk is full")."""
    return _CAUSES.get(e.errno) or (e.strerror or str(e) or type(e).__name__).rstrip(".")


def os_error(e: OSError, action: str = "write", path: str | os.PathLike | None = None) -> FeatxError:
    """``cannot <action> <path>: <cause>.`` as a FeatxError."""
    where = path if path is not None else (e.filename if e.filename is not None else "a file")
    return FeatxError(f"cannot {action} {where}: {cause(e)}.")


def temp_path(path: str | os.PathLike) -> Path:
    """This process's temporary name for ``path`` (in the same folder, so renaming is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}@{_HOST}.tmp")


# <name>.<pid>@<host>.tmp, and <name>.<pid>.tmp as featx 0.1 named them
_TEMP = re.compile(r"^(?P<name>.+)\.(?P<pid>\d+)(@(?P<host>[^/]*))?\.tmp$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove temporary files of ``path`` whose process (on this host) is gone; returns them."""
    path = Path(path)
    removed = []
    try:
        candidates = list(path.parent.glob(f"{_glob_escape(path.name)}.*.tmp"))
    except OSError:
        return removed
    for p in candidates:
        m = _TEMP.match(p.name)
        if not m or m.group("name") != path.name or int(m.group("pid")) == os.getpid():
            continue
        if m.group("host") not in (None, _HOST) or _alive(int(m.group("pid"))):
            continue
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed.append(p)
    return removed


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (best effort: not every file system allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "write"):
    """Yield a temporary path to write ``path`` through (for writers that take a path: h5py,
    skops, matplotlib); on success it is synced and renamed onto ``path``, on any error it is
    removed and the previous ``path`` is left as it was.  An OSError becomes a FeatxError."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, "create the folder of", path) from None
    clean_stale_temps(path)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise os_error(e, what, path) from None
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None):
    """``open()`` for writing, through a temporary file renamed onto ``path`` once complete."""
    binary = "b" in mode
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if binary else encoding, newline=newline) as f:
            yield f
            f.flush()


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_open(path) as f:
        f.write(text)
    return Path(path)


def _discard(tmp: Path) -> None:
    with contextlib.suppress(OSError):
        tmp.unlink()


def check_output(path: str | os.PathLike, folder: bool = False, what: str = "output") -> Path:
    """Check before long work that ``path`` (a file, or a folder with ``folder``) can be
    written, without creating anything: what exists of it is of the right kind, and a file
    can be created in the deepest folder of it that exists.  Raises a FeatxError naming the
    path and the cause."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        kind = "a folder" if path.is_dir() else "a file"
        raise FeatxError(f"{what} {path} is {kind}; give the {'folder' if folder else 'file'} to write.")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FeatxError(f"cannot write {what} {path}: {existing} is a file, not a folder.")
    probe = temp_path(existing / ".featx-write-check")
    try:
        with open(probe, "wb") as f:
            f.write(b"\0")
    except OSError as e:
        raise os_error(e, f"write {what} {path} in", existing) from None
    finally:
        _discard(probe)
    return path


def check_free_space(folder: str | os.PathLike, need: int, what: str) -> None:
    """Refuse, before writing ``what``, when the disk of ``folder`` has less than ``need`` bytes free."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # cannot tell: the write itself will say
    if free < need:
        raise FeatxError(f"not enough free space to write {what}: it needs about {_mb(need)}, and the disk of "
                         f"{folder} has {_mb(free)} free.")


def _mb(n: int) -> str:
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def size_text(n: int) -> str:
    """Bytes as the user reads them, the inverse of :func:`parse_size`: ``"512 MB"``, ``"20 KB"``
    (a size under 1 MB no longer reads as 0 MB)."""
    for unit, name in (("g", "GB"), ("m", "MB"), ("k", "KB")):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.3g} {name}"
    return f"{n} bytes"


def parse_size(text: str, option: str = "--memory-budget") -> int:
    """``"512MB"``, ``"4G"``, ``"1.5GiB"`` or a number of bytes -> bytes (at least 1)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]?)(?:i?b)?\s*", str(text).lower())
    value = float(m.group(1)) * _UNITS[m.group(2)] if m else math.nan
    if not (math.isfinite(value) and value >= 1):
        raise FeatxError(f"{option} {text!r} is not a size such as 512MB or 4GB (a positive number of bytes).")
    return int(value)
