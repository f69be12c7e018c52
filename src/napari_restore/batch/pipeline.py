"""Reader pool -> model -> writer pool, with bounded queues so memory stays flat.

``readers`` threads decode series (pydicom, nibabel and the JPEG decoders release the GIL for the
heavy part) into a queue of at most ``prefetch`` volumes; the calling thread restores them one at
a time (the model and the compute device are used by one thread only); ``writers`` threads write
the results from a queue of at most ``writers`` volumes. At most
``readers + prefetch + 1 + 2 * writers`` series are in memory, whatever the tree's size.

Errors stay with their series: a series that cannot be read, restored or written is reported as
failed with its message and the pipeline goes on. ``stop`` (a :class:`threading.Event`) ends the
run early: readers stop taking series, the current write is cancelled (nothing half-written is
left: outputs are atomic).
"""
from __future__ import annotations

import contextlib
import glob
import os
import queue
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
from .walk import SeriesItem
from .lifeline import pool_kwargs

_END = object()


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
            for the GIL, which pure-Python DICOM parsing would hold) or ``"thread"``. With
            processes, ``read`` and ``write`` must be picklable (module-level functions or
            :func:`functools.partial` of them).
        stop: set it to end the run early (Ctrl-C).
    """

    def __init__(self, read: Callable, compute: Callable, write: Callable, finished: Callable[[Outcome], None], *,
                 readers: int = 2, writers: int = 2, prefetch: int = 1, pool: str = "process",
                 stop: threading.Event | None = None):
        if pool not in ("process", "thread"):
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
            return self._run_processes(jobs)
        old = sys.getswitchinterval()
        sys.setswitchinterval(min(old, 2e-4))  # the model thread gets the GIL back quickly between ops
        try:
            return self._run_threads(jobs)
        finally:
            sys.setswitchinterval(old)

    # -- processes
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

    def _run_processes(self, jobs: list[tuple[SeriesItem, Path]]) -> None:
        import multiprocessing as mp
        from collections import deque
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        ctx = mp.get_context("spawn")  # never fork a process that runs torch threads
        todo = iter(jobs)
        pending: deque = deque()
        slots = threading.BoundedSemaphore(self.writers + 1)  # results waiting for or in a writer
        rpool = ProcessPoolExecutor(self.readers, mp_context=ctx, **pool_kwargs())
        wpool = ProcessPoolExecutor(self.writers, mp_context=ctx, **pool_kwargs())
        writes: list = []

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
            rpool = ProcessPoolExecutor(self.readers, mp_context=ctx, **pool_kwargs())
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
                    if isinstance(exc, BrokenProcessPool):
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
                except BrokenProcessPool:  # a writer process died earlier: its series is failed, go on
                    wpool.shutdown(wait=False)
                    wpool = ProcessPoolExecutor(self.writers, mp_context=ctx, **pool_kwargs())
                    wfut = wpool.submit(_timed, self.write, result, item, output)
                del result
                wfut.add_done_callback(lambda f, o=out: written(f, o))
                writes.append(wfut)
        except BaseException:
            self.stop.set()
            raise
        finally:
            for _, fut in pending:
                fut.cancel()
            rpool.shutdown(wait=not self.stop.is_set(), cancel_futures=True)
            wpool.shutdown(wait=True)

    # -- threads
    def _run_threads(self, jobs: list[tuple[SeriesItem, Path]]) -> None:
        todo = iter(jobs)
        take = threading.Lock()
        in_q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        out_q: queue.Queue = queue.Queue(maxsize=self.writers)
        errors: list[BaseException] = []

        def reader() -> None:
            try:
                while not self.stop.is_set():
                    with take:
                        job = next(todo, None)
                    if job is None:
                        break
                    item, output = job
                    t0 = time.perf_counter()
                    try:
                        self._hold(1)
                        vol, err = self.read(item), None
                    except Exception as exc:  # noqa: BLE001 - recorded for this series
                        vol, err = None, exc
                        self._hold(-1)
                    out = Outcome(item, output, read_s=time.perf_counter() - t0)
                    if err is not None:
                        out.status, out.error = "failed", _message(err)
                        self.finished(out)
                        continue
                    out.modality = vol.modality
                    self._put(in_q, (out, vol))
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
            finally:
                in_q.put(_END)

        def writer() -> None:
            while True:
                msg = out_q.get()
                if msg is _END:
                    return
                out, vol = msg
                t0 = time.perf_counter()
                try:
                    self.write(vol, out.item, out.output)
                except Cancelled:
                    out.status, out.error = "cancelled", "cancelled"
                except Exception as exc:  # noqa: BLE001 - recorded for this series
                    out.status, out.error = "failed", _message(exc)
                finally:
                    del vol
                    self._hold(-1)
                out.write_s = time.perf_counter() - t0
                if out.status != "cancelled":
                    self.finished(out)

        rthreads = [threading.Thread(target=reader, name=f"batch-reader-{i}", daemon=True) for i in range(self.readers)]
        wthreads = [threading.Thread(target=writer, name=f"batch-writer-{i}", daemon=True) for i in range(self.writers)]
        for t in rthreads + wthreads:
            t.start()
        ended = 0
        try:
            while ended < len(rthreads):
                t0 = time.perf_counter()
                msg = in_q.get()
                self.idle_s += time.perf_counter() - t0
                if msg is _END:
                    ended += 1
                    continue
                out, vol = msg
                if self.stop.is_set():
                    del vol
                    self._hold(-1)
                    continue
                t0 = time.perf_counter()
                try:
                    result, info = self.compute(vol, out.item)
                except Cancelled:
                    self._hold(-1)
                    continue
                except Exception as exc:  # noqa: BLE001 - recorded for this series
                    out.compute_s = time.perf_counter() - t0
                    out.status, out.error = "failed", _message(exc)
                    out.warnings = list(vol.meta.get("warnings", []))
                    del vol
                    self._hold(-1)
                    self.finished(out)
                    continue
                out.compute_s = time.perf_counter() - t0
                out.shape = tuple(result.array.shape)
                out.model, out.model_version = info.get("model", ""), info.get("model_version", "")
                out.warnings = list(result.meta.get("warnings", []))
                del vol
                self._put(out_q, (out, result))
                del result
        except BaseException:
            self.stop.set()  # Ctrl-C or a bug: readers stop, the current writes are cancelled
            raise
        finally:
            if self.stop.is_set():
                _drain(in_q)
            for _ in wthreads:
                out_q.put(_END)
            for t in wthreads:
                t.join()
            for t in rthreads:
                t.join(timeout=0.1 if self.stop.is_set() else None)
        if errors:
            raise errors[0]

    def _put(self, q: queue.Queue, msg) -> None:
        while True:
            try:
                q.put(msg, timeout=0.2)
                return
            except queue.Full:
                if self.stop.is_set():
                    self._hold(-1)
                    return


def _drain(q: queue.Queue) -> None:
    with contextlib.suppress(queue.Empty):
        while True:
            q.get_nowait()


__all__ = ["Pipeline", "Outcome", "read_item", "write_item", "write_result", "clear_stale"]
