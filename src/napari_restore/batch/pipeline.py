"""Reader pool -> model -> writer pool, with bounded read-ahead so memory stays flat.

A pool of ``readers`` decodes series, at most ``readers + prefetch`` ahead of the model; the
calling thread restores them one at a time (the model and the compute device are used by one
thread only); a pool of ``writers`` writes the results, at most ``writers + 1`` waiting for or in
a writer. At most ``readers + prefetch + 1 + 2 * writers`` series are in memory, whatever the
tree's size. One code path for both kinds of pool: ``pool="process"`` (the default; spawned
worker processes that die with the batch, see :mod:`.lifeline`) or ``pool="thread"`` (the same
loop over a thread pool: quicker to start, for small trees and tests).

Errors stay with their series: a series that cannot be read, restored or written is reported as
failed with its message and the pipeline goes on. ``stop`` (a :class:`threading.Event`) ends the
run early: no new series is read, queued reads are cancelled, the restoration in progress is
cancelled (``compute`` passes ``stop.is_set`` as restore's ``cancel``) and the writes already
started finish (nothing half-written is left: outputs are atomic).
"""
from __future__ import annotations

import contextlib
import glob
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Cancelled, InputError
from ..volume import Volume
from .lifeline import pool_kwargs
from .walk import SeriesItem

POOLS = ("process", "thread")


@dataclass
class Outcome:
    """What happened to one series; becomes a manifest row."""

    item: SeriesItem
    output: Path
    status: str = "done"
    modality: str = ""
    error: str = ""
    warnings: list[str] = field(default_factory=list)
    model: str = ""
    model_version: str = ""
    shape: tuple[int, ...] = ()
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0

    @property
    def seconds(self) -> float:
        return self.read_s + self.compute_s + self.write_s

    @property
    def slices(self) -> int:
        if not self.shape:
            return self.item.slices
        n = 1
        for s in self.shape[:-2]:
            n *= int(s)
        return n


def _message(exc: BaseException) -> str:
    from ..errors import RestoreError

    if isinstance(exc, RestoreError):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory: the series is too large for this machine"
    return f"{type(exc).__name__}: {exc}"


# ----------------------------------------------------------------------------- read / write one series
def _timed(fn: Callable, *args):
    """``(fn(*args), seconds)``: runs in a worker process."""
    t0 = time.perf_counter()
    return fn(*args), time.perf_counter() - t0


def read_item(item: SeriesItem, max_voxels: int | None = None) -> Volume:
    """Decode one item into a Volume (the same reader as :func:`napari_restore.load`).

    Raises:
        InputError: unreadable, corrupt, or more than ``max_voxels`` voxels.
    """
    where = item.files[0] if item.files else item.input
    if item.kind == "error":
        raise InputError(item.error.removeprefix(f"{where}: ") or "unreadable", where)
    if max_voxels is not None and item.voxels > max_voxels:
        raise InputError(f"too large: {'x'.join(map(str, item.shape))} = {item.voxels} voxels, more than the "
                         f"limit of {max_voxels} (--max-voxels)", os.path.dirname(where) if item.kind != "file" else where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if item.kind == "file":
            from ..io import load

            vol = load(item.files[0])[0]
        else:
            from ..io import dicom_read as dr

            frames = []
            for f in item.files:
                frames.extend(fr for fr in dr.frames_of(Path(f)) if dr.series_key(fr) == item.key)
            if not frames:
                raise InputError("the series' files changed since the tree was walked (no frame left)", where)
            vol = dr.build_volume(dr.Series(item.key, frames))
    if max_voxels is not None and vol.array.size > max_voxels:
        raise InputError(f"too large: shape {vol.array.shape} has more than {max_voxels} voxels (--max-voxels)", where)
    return vol


def clear_stale(output: Path) -> None:
    """Remove what a killed run may have left next to ``output`` (``.name.partial-*``, ``.name.old-*``)."""
    for pattern in (f".{output.name}.partial-*", f".{output.name}.old-*"):
        for p in glob.glob(os.path.join(glob.escape(str(output.parent)), pattern)):
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(p)


def write_item(volume: Volume, output: Path, fmt: str, cancel: Callable[[], bool] | None = None,
               deidentify: Any = None, accept_burned_in: bool = False) -> Path:
    """Write one result atomically, replacing any earlier (complete) output at ``output``."""
    from ..io import save

    clear_stale(output)
    if fmt == "dicom":
        kwargs: dict[str, Any] = {"format": "dicom", "cancel": cancel}
        if deidentify is not None:
            kwargs.update(deidentify=deidentify, accept_burned_in=accept_burned_in)
        written = save(volume, output, overwrite=True, **kwargs)
    else:
        written = save(volume, output, format="nifti", overwrite=True)
    return Path(written)


def write_result(volume: Volume, item: SeriesItem, output: Path, fmt: str = "auto", deidentify: Any = None,
                 accept_burned_in: bool = False) -> Path:
    """Write one item's result: ``fmt`` ``"auto"`` = DICOM for DICOM input, NIfTI for a NIfTI/MHA input."""
    as_dicom = fmt == "dicom" or (fmt == "auto" and item.kind != "file")
    return write_item(volume, output, "dicom" if as_dicom else "nifti", deidentify=deidentify,
                      accept_burned_in=accept_burned_in)


# ----------------------------------------------------------------------------- the pipeline
class Pipeline:
    """Runs ``read -> compute -> write`` over items with bounded memory.

    Args:
        read: ``read(item) -> Volume`` (called in reader threads).
        compute: ``compute(volume, item) -> (Volume, info dict)`` (called in this thread only).
        write: ``write(volume, item, output) -> None`` (called in writer threads).
        finished: ``finished(outcome)`` for every item, from whichever thread ended it (thread-safe
            on the caller's side).
        readers, writers, prefetch: pool sizes and the read-ahead queue length.
        pool: ``"process"`` (default: reader and writer processes; the model thread never waits
            for the GIL, which pure-Python DICOM parsing would hold) or ``"thread"`` (the same code
            path over threads). With processes, ``read`` and ``write`` must be picklable
            (module-level functions or :func:`functools.partial` of them).
        stop: set it to end the run early (Ctrl-C).
    """

    def __init__(self, read: Callable, compute: Callable, write: Callable, finished: Callable[[Outcome], None], *,
                 readers: int = 2, writers: int = 2, prefetch: int = 1, pool: str = "process",
                 stop: threading.Event | None = None):
        if pool not in POOLS:
            raise ValueError(f"pool must be 'process' or 'thread', got {pool!r}")
        self.pool = pool
        self.read, self.compute, self.write, self.finished = read, compute, write, finished
        self.readers, self.writers = max(1, int(readers)), max(1, int(writers))
        self.prefetch = max(1, int(prefetch))
        self.stop = stop or threading.Event()
        self.idle_s = 0.0  # time the model waited for a series to be read
        self.in_flight = 0
        self.peak_in_flight = 0
        self._count_lock = threading.Lock()

    def _hold(self, n: int) -> None:
        with self._count_lock:
            self.in_flight += n
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)

    def run(self, jobs: list[tuple[SeriesItem, Path]]) -> None:
        """Process every ``(item, output)``; returns when all are finished (or ``stop`` was set)."""
        if not jobs:
            return
        if self.pool == "process":
            return self._run(jobs)
        old = sys.getswitchinterval()
        sys.setswitchinterval(min(old, 2e-4))  # threads: the model thread gets the GIL back quickly between ops
        try:
            return self._run(jobs)
        finally:
            sys.setswitchinterval(old)

    def _executor(self, workers: int, role: str):
        """A reader or writer pool of the chosen kind (processes are spawned and die with this one)."""
        if self.pool == "thread":
            from concurrent.futures import ThreadPoolExecutor

            return ThreadPoolExecutor(workers, thread_name_prefix=f"batch-{role}")
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # never fork a process that runs torch threads
        return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), **pool_kwargs())

    def _compute_one(self, out: Outcome, vol: Volume):
        """Restore one volume in this thread; returns the result or None (the outcome is then final)."""
        t0 = time.perf_counter()
        try:
            result, info = self.compute(vol, out.item)
        except Cancelled:
            return None
        except Exception as exc:  # noqa: BLE001 - recorded for this series
            out.compute_s = time.perf_counter() - t0
            out.status, out.error = "failed", _message(exc)
            out.warnings = list(vol.meta.get("warnings", []))
            self.finished(out)
            return None
        out.compute_s = time.perf_counter() - t0
        out.shape = tuple(result.array.shape)
        out.model, out.model_version = info.get("model", ""), info.get("model_version", "")
        out.warnings = list(result.meta.get("warnings", []))
        return result

    def _run(self, jobs: list[tuple[SeriesItem, Path]]) -> None:
        from collections import deque
        from concurrent.futures import BrokenExecutor

        todo = iter(jobs)
        pending: deque = deque()
        slots = threading.BoundedSemaphore(self.writers + 1)  # results waiting for or in a writer
        rpool = self._executor(self.readers, "reader")
        wpool = self._executor(self.writers, "writer")

        def fill() -> None:
            while len(pending) < self.readers + self.prefetch and not self.stop.is_set():
                job = next(todo, None)
                if job is None:
                    return
                self._hold(1)
                pending.append((job, rpool.submit(_timed, self.read, job[0])))

        def restart_readers() -> None:
            """A reader process died (a decoder crashed): new pool, the other queued reads again."""
            nonlocal rpool
            rpool.shutdown(wait=False, cancel_futures=True)
            rpool = self._executor(self.readers, "reader")
            for k, (job, _) in enumerate(list(pending)):
                pending[k] = (job, rpool.submit(_timed, self.read, job[0]))

        def written(fut, out: Outcome) -> None:
            slots.release()
            self._hold(-1)
            try:
                out.write_s = fut.result()[1]
            except BaseException as exc:  # noqa: BLE001 - recorded for this series (or a cancelled future)
                out.status, out.error = "failed", _message(exc)
            self.finished(out)

        try:
            fill()
            while pending and not self.stop.is_set():
                (item, output), fut = pending.popleft()
                t0 = time.perf_counter()
                try:
                    vol, read_s = fut.result()
                except Exception as exc:  # noqa: BLE001 - recorded for this series
                    self.idle_s += time.perf_counter() - t0
                    self._hold(-1)
                    msg = _message(exc)
                    if isinstance(exc, BrokenExecutor):
                        msg = f"the reader process died while reading this series (a decoder crash?): {exc}"
                        restart_readers()
                    fill()
                    self.finished(Outcome(item, output, status="failed", error=msg))
                    continue
                self.idle_s += time.perf_counter() - t0
                fill()  # the next reads start before this series is restored
                out = Outcome(item, output, read_s=read_s, modality=vol.modality)
                result = self._compute_one(out, vol)
                del vol
                if result is None:
                    self._hold(-1)
                    continue
                slots.acquire()
                try:
                    wfut = wpool.submit(_timed, self.write, result, item, output)
                except BrokenExecutor:  # a writer process died earlier: its series is failed, go on
                    wpool.shutdown(wait=False)
                    wpool = self._executor(self.writers, "writer")
                    wfut = wpool.submit(_timed, self.write, result, item, output)
                del result
                wfut.add_done_callback(lambda f, o=out: written(f, o))
        except BaseException:
            self.stop.set()  # Ctrl-C or a bug: no new reads, the queued ones are cancelled
            raise
        finally:
            for _, fut in pending:
                fut.cancel()
            rpool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)
            wpool.shutdown(wait=True)


__all__ = ["Pipeline", "Outcome", "read_item", "write_item", "write_result", "clear_stale"]
