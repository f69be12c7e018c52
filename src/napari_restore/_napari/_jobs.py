"""The job panel every tab uses: progress bar with ETA, a status line, Cancel, and errors shown
both as a napari notification and in the tab's own status line.

One lifecycle for every background job (restore, preview, export, training): ``start`` ->
progress -> exactly one of done / cancelled / failed -> ended. The work runs in a napari thread
worker (:func:`._worker.start_job`); every callback arrives in the GUI thread.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from psygnal import Signal
from qtpy.QtWidgets import QHBoxLayout, QProgressBar, QPushButton, QVBoxLayout, QWidget

from ._common import ERROR_STYLE, HINT_STYLE, error_text, hint, notify
from ._worker import Job, format_eta, start_job


class JobPanel(QWidget):
    """Progress, ETA, status and Cancel for one kind of job at a time.

    Signals: ``running_changed(bool)``; ``error(str)`` (the message, also in the status line).
    With ``with_cancel=False`` the tab places ``cancel_button`` beside its own buttons; otherwise
    it sits at the right of the progress bar.
    """

    running_changed = Signal(bool)
    error = Signal(str)

    def __init__(self, unit: str = "", cancel_text: str = "Cancel", with_cancel: bool = True) -> None:
        super().__init__()
        self.unit = unit
        self.job: Job | None = None
        self.last_error = ""
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("")
        self.progress_bar.setValue(0)
        self.status_label = hint("Ready")
        self.cancel_button = QPushButton(cancel_text)
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        row = QHBoxLayout()
        row.addWidget(self.progress_bar, 1)
        if with_cancel:
            row.addWidget(self.cancel_button)
        lay.addLayout(row)
        lay.addWidget(self.status_label)

    # ------------------------------------------------------------------ status
    @property
    def running(self) -> bool:
        return self.job is not None

    def set_status(self, text: str) -> None:
        """A plain status line (clears an earlier error's colour)."""
        self.status_label.setStyleSheet(HINT_STYLE)
        self.status_label.setText(text)

    def show_error(self, exc: BaseException | str, prefix: str = "") -> str:
        """Notify and show ``exc`` in the status line; returns the message."""
        msg = exc if isinstance(exc, str) else error_text(exc)
        self.last_error = msg
        notify("error", msg)
        self.status_label.setStyleSheet(ERROR_STYLE)
        self.status_label.setText(prefix + msg)
        self.error.emit(msg)
        return msg

    def _bar(self, fmt: str, value: int = 0, maximum: int = 1) -> None:
        self.progress_bar.setRange(0, maximum)
        self.progress_bar.setValue(value)
        self.progress_bar.setFormat(fmt)

    # ------------------------------------------------------------------ lifecycle
    def start(self, what: str, fn: Callable[[Callable[..., None], Callable[[], bool]], Any], *,
              on_result: Callable[[Any], str | None], on_cancelled: Callable[[], str] | None = None,
              on_end: Callable[[], None] | None = None, unit: str | None = None) -> Job | None:
        """Run ``fn(progress, cancel)`` in a worker; returns the job (None when one is running).

        ``on_result(value)`` may return the status text to show; ``on_cancelled()`` returns it
        for a cancelled job. Failures are shown by :meth:`show_error`.
        """
        if self.job is not None:
            return None
        unit = self.unit if unit is None else unit
        self.last_error = ""
        self.progress_bar.setRange(0, 0)  # busy until the first progress report
        self.progress_bar.setFormat(what)
        self.set_status(what + "...")

        def progress(done: int, total: int) -> None:
            job = self.job
            eta = format_eta(job.elapsed() / done * (total - done)) if job is not None and done > 0 else "--:--"
            text = f"{int(done)} / {int(total)} {unit} · {eta} left".replace("  ", " ")
            self.progress_bar.setRange(0, max(1, int(total)))
            self.progress_bar.setValue(int(done))
            self.progress_bar.setFormat(text)
            self.set_status(text)

        def done(value: Any) -> None:
            job = self.job
            self._bar("Done · " + format_eta(job.elapsed() if job is not None else 0), 1)
            try:
                text = on_result(value)  # may set its own bar text (a preview shows its time)
            except Exception as exc:  # showing the result failed: say so, never into Qt's event loop
                failed(exc)
                return
            if text:
                self.set_status(text)

        def cancelled(_exc: BaseException) -> None:
            self._bar("Cancelled")
            self.set_status(on_cancelled() if on_cancelled is not None else "Cancelled.")

        def failed(exc: BaseException) -> None:
            self._bar("Failed")
            self.show_error(exc, "Failed: ")

        def ended() -> None:
            self.job = None
            self.cancel_button.setEnabled(False)
            if on_end is not None:
                on_end()
            self.running_changed.emit(False)

        self.job = start_job(what, fn, on_result=done, on_error=failed, on_cancelled=cancelled,
                             on_progress=progress, on_end=ended)
        self.cancel_button.setEnabled(True)
        self.running_changed.emit(True)
        return self.job

    def cancel(self) -> None:
        """Ask the running job to stop at its next check (within one batch or step)."""
        if self.job is not None:
            self.job.cancel()
            self.set_status("Cancelling...")
