"""Long jobs (restore, export, training) in napari thread workers, never in the GUI thread.

:func:`start_job` runs ``fn(progress, cancel)`` in a :func:`napari.qt.threading.create_worker`
thread. ``progress(*args)`` may be called from the worker thread at any rate; the calls reach
``on_progress`` in the GUI thread through a queued Qt signal. ``cancel()`` turns True once
:meth:`Job.cancel` is called, and the job's function is expected to raise
:class:`~napari_restore.errors.Cancelled` at its next check (the engine checks before every
batch). The function never lets an exception escape the worker: the outcome arrives as exactly
one of ``on_result(value)``, ``on_cancelled(exc)`` or ``on_error(exc)``, then ``on_end()``, all in
the GUI thread. Torch's GPU cache is emptied when a job ends.
"""
from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from typing import Any

from qtpy.QtCore import QObject, Signal

from ..errors import Cancelled


class Job(QObject):
    """A running job: its signals, its cancel flag and its start time."""

    progress = Signal(object)  # a tuple of the arguments the job passed to progress(...)
    outcome = Signal(str, object)  # ("ok" | "cancelled" | "error", value or exception)

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.started = time.perf_counter()
        self._cancel = threading.Event()
        self.worker: Any = None
        self.finished = False

    def cancel(self) -> None:
        """Ask the job to stop at its next check (within one batch)."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


def release_gpu_memory() -> None:
    """Free torch's cached GPU memory after a collection (no-op without CUDA: a full
    ``gc.collect`` costs ~0.5 s in a napari process, too much for a slice preview)."""
    try:
        import torch

        if torch.cuda.is_available():
            gc.collect()
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - a broken driver must not break the widget
        pass


def start_job(name: str, fn: Callable[[Callable[..., None], Callable[[], bool]], Any], *,
              on_result: Callable[[Any], None], on_error: Callable[[BaseException], None],
              on_cancelled: Callable[[BaseException], None] | None = None,
              on_progress: Callable[..., None] | None = None,
              on_end: Callable[[], None] | None = None) -> Job:
    """Start ``fn(progress, cancel)`` in a napari thread worker; returns the :class:`Job`.

    Args:
        name: what the job is (for messages).
        fn: the work; may call ``progress(*args)`` and must poll ``cancel()``.
        on_result / on_error / on_cancelled / on_progress / on_end: GUI-thread callbacks.
    """
    from napari.qt.threading import create_worker

    job = Job(name)

    def progress(*args: Any) -> None:
        job.progress.emit(args)

    def work() -> tuple[str, Any]:
        try:
            return "ok", fn(progress, job._cancel.is_set)
        except Cancelled as exc:
            return "cancelled", exc
        except BaseException as exc:  # reported to the GUI thread, never raised in the worker
            return "error", exc
        finally:
            release_gpu_memory()

    def dispatch(kind: str, value: Any) -> None:
        job.finished = True
        try:
            if kind == "ok":
                on_result(value)
            elif kind == "cancelled":
                (on_cancelled or on_error)(value)
            else:
                on_error(value)
        finally:
            if on_end is not None:
                on_end()

    if on_progress is not None:
        job.progress.connect(lambda args: on_progress(*args))
    job.outcome.connect(dispatch)
    worker = create_worker(work)
    worker.returned.connect(lambda res: job.outcome.emit(*res))
    job.worker = worker
    worker.start()
    return job


def format_eta(seconds: float) -> str:
    """``"0:42"`` / ``"1:02:03"`` for a number of seconds (``"--:--"`` when unknown)."""
    if seconds != seconds or seconds < 0 or seconds == float("inf"):
        return "--:--"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
