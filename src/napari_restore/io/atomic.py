"""Atomic outputs: write into a temporary sibling, then rename into place.

A failure (exception, full disk, SIGKILL) leaves either the complete target or nothing: the
temporary sibling is named ``.<name>.partial-<host>~<pid>~<random>`` and is removed on error.
After a SIGKILL the sibling stays hidden beside the target; the next atomic write to the same
target removes such siblings whose process, on this host, is gone.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError


def _check_target(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise OutputError("exists already; pass overwrite=True (--overwrite) to replace it", target)
    parent = target.parent
    try:  # exist_ok: another writer (a batch rank) may create it between any check and this call
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # includes a file where the folder should be
        raise OutputError(f"cannot create the parent folder: {exc.strerror or exc}", parent) from None
    if not os.access(parent, os.W_OK):
        raise OutputError("folder is not writable", parent)


def current_umask() -> int:
    """The process umask, read without changing it (``os.umask`` is process-wide, racy in threads)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _publishable(path: Path, directory: bool) -> None:
    """Give a temporary file/folder the permissions of a normally created one (mkstemp/mkdtemp use 0600/0700)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def _owner_tag() -> str:
    """``<host>~<pid>~``: who writes a temporary sibling (host reduced to [A-Za-z0-9_])."""
    return f"{re.sub(r'[^A-Za-z0-9_]', '_', socket.gethostname())}~{os.getpid()}~"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def clear_dead_siblings(target: Path) -> list[Path]:
    """Remove ``.<name>.partial-*`` / ``.<name>.old-*`` siblings of ``target`` left by a process of
    this host that no longer runs (a SIGKILL mid-write); returns what was removed."""
    target = Path(target)
    host, _, _ = _owner_tag().partition("~")
    removed = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for kind in ("partial", "old"):
        prefix = f".{target.name}.{kind}-"
        for entry in entries:
            if not entry.name.startswith(prefix):
                continue
            m = re.match(r"([A-Za-z0-9_]+)~(\d+)~", entry.name[len(prefix):])
            if m is None or m.group(1) != host or int(m.group(2)) == os.getpid() or _pid_alive(int(m.group(2))):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    return removed


def _replace(tmp: Path, target: Path) -> None:
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{_owner_tag()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it becomes ``target`` in one rename."""
    target = Path(target)
    _check_target(target, overwrite)
    clear_dead_siblings(target)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{_owner_tag()}", dir=target.parent))
        _publishable(tmp, directory=True)
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", target.parent) from None
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(f"writing failed, nothing was left behind: {_reason(exc)}", target) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path (same suffixes as ``target``); on success it is renamed."""
    target = Path(target)
    _check_target(target, overwrite)
    suffix = "".join(target.suffixes)
    clear_dead_siblings(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.partial-{_owner_tag()}", suffix=suffix,
                                    dir=target.parent)
        os.close(fd)
        _publishable(Path(name), directory=False)
    except OSError as exc:
        raise OutputError(f"cannot write here: {exc.strerror or exc}", target.parent) from None
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"writing failed, nothing was left behind: {_reason(exc)}", target) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _reason(exc: OSError) -> str:
    """One line saying why a write failed: the OS's own words, never a library's wrapped traceback
    (pydicom re-raises an ``OSError`` with its traceback in the message and no errno)."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        cause = cause.__cause__ or cause.__context__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
