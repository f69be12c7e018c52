"""The Fine-tune tab: layers or a folder of scans, mode, task, the model to start from, epochs,
the live loss curves, Stop, and Save model (the model then appears in the Restore tab's list
through ``events.models_changed``).

The data preparation is Qt-free (:mod:`._train_prep`); this tab only collects the choices.
"""
from __future__ import annotations

import csv
import shutil
import tempfile
from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                            QListWidget, QListWidgetItem, QMessageBox, QPushButton, QRadioButton, QSpinBox,
                            QVBoxLayout, QWidget)

from ..constants import TRAIN_TASKS
from ..errors import OutputError, RestoreError
from . import _layers as L
from ._catalogue import AUTO_MODEL, ModelCatalogue
from ._common import card_html, fill_combo, layer_named, notify, primary
from ._jobs import JobPanel
from ._plot import CurvePlot
from ._state import TASK_LABELS, TrainState, WidgetEvents
from ._train_prep import TRAIN_MODES, TrainRequest, prepare_training
from ._worker import Job


def read_loss_log(path: Path) -> tuple[list[float], list[float]] | None:
    """``(train losses, validation losses)`` per epoch from a run's ``log.csv`` (None if unreadable)."""
    train, val = [], []
    try:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                if str(row.get("epoch")) in ("0", ""):
                    continue
                train.append(float(row["train_loss"]) if row.get("train_loss") else float("nan"))
                val.append(float(row["val_loss"]) if row.get("val_loss") else float("nan"))
    except (OSError, ValueError, KeyError):
        return None
    return train, val


class TrainTab(QWidget):
    """Fine-tune panel over ``state`` (:class:`TrainState`)."""

    def __init__(self, viewer: Any, state: TrainState, catalogue: ModelCatalogue, events: WidgetEvents) -> None:
        super().__init__()
        self.viewer, self.state, self.catalogue, self.events = viewer, state, catalogue, events
        self.train_result: Any = None
        self.closing = False
        self._tmp: Path | None = None
        self._log: Path | None = None
        self.jobs = JobPanel(unit="steps", with_cancel=False)
        self.jobs.running_changed.connect(self._on_running)
        self._timer = QTimer(self, interval=400)
        self._timer.timeout.connect(self.poll_log)
        self._build()

    def _build(self) -> None:
        lay = QVBoxLayout(self)
        src = QHBoxLayout()
        self.train_from_layers = QRadioButton("Layers")
        self.train_from_folder = QRadioButton("Folder of scans")
        self.train_from_layers.setChecked(True)
        src.addWidget(self.train_from_layers)
        src.addWidget(self.train_from_folder)
        src.addStretch()
        lay.addLayout(src)
        self.train_layers = QListWidget()
        self.train_layers.setMaximumHeight(90)
        self.train_layers.itemChanged.connect(lambda _it: self.refresh_models())
        lay.addWidget(self.train_layers)
        frow = QHBoxLayout()
        self.train_folder = QLineEdit()
        self.train_folder.setPlaceholderText("folder of DICOM / NIfTI scans")
        self.train_folder.textChanged.connect(lambda t: setattr(self.state, "folder", t))
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_folder)
        frow.addWidget(self.train_folder, 1)
        frow.addWidget(browse)
        lay.addLayout(frow)
        form = QFormLayout()
        self.train_mode = QComboBox()
        for key, text in TRAIN_MODES.items():
            self.train_mode.addItem(text, key)
        self.train_mode.currentIndexChanged.connect(self._on_mode)
        form.addRow("Mode", self.train_mode)
        self.low_combo = QComboBox()
        self.low_combo.setToolTip("Paired mode: the low-dose scan of the same patient (the checked layers are the full-dose side).")
        form.addRow("Low-dose layer", self.low_combo)
        self.train_task = QComboBox()
        for t in TRAIN_TASKS:
            self.train_task.addItem(TASK_LABELS[t], t)
        self.train_task.currentIndexChanged.connect(
            lambda _i: (setattr(self.state, "task", self.train_task.currentData()), self.refresh_models()))
        form.addRow("Task", self.train_task)
        self.base_combo = QComboBox()
        self.base_combo.currentIndexChanged.connect(self._on_base)
        form.addRow("Start from", self.base_combo)
        self.other_modalities = QCheckBox("Show models of other modalities")
        self.other_modalities.toggled.connect(lambda _on: self.refresh_models())
        form.addRow("", self.other_modalities)
        self.epochs_spin = QSpinBox(minimum=1, maximum=1000)
        self.epochs_spin.valueChanged.connect(lambda v: setattr(self.state, "epochs", int(v)))
        self.steps_spin = QSpinBox(minimum=1, maximum=100000)
        self.steps_spin.valueChanged.connect(lambda v: setattr(self.state, "steps_per_epoch", int(v)))
        er = QHBoxLayout()
        er.addWidget(self.epochs_spin)
        er.addWidget(QLabel("x steps"))
        er.addWidget(self.steps_spin)
        form.addRow("Epochs", er)
        self.name_edit = QLineEdit()
        self.name_edit.textChanged.connect(lambda t: setattr(self.state, "name", t))
        form.addRow("Model name", self.name_edit)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.train_button = primary(QPushButton("Train"))
        self.train_button.clicked.connect(lambda: self.start_training())
        self.stop_button = self.jobs.cancel_button
        self.stop_button.setText("Stop")
        self.save_model_button = QPushButton("Save model")
        self.save_model_button.setEnabled(False)
        self.save_model_button.clicked.connect(lambda: self.save_trained_model())
        row.addWidget(self.train_button, 1)
        row.addWidget(self.stop_button)
        row.addWidget(self.save_model_button)
        lay.addLayout(row)
        lay.addWidget(self.jobs)
        self.train_progress, self.train_status = self.jobs.progress_bar, self.jobs.status_label
        self.curve = CurvePlot()
        lay.addWidget(self.curve)
        lay.addStretch()

    # ------------------------------------------------------------------ state <-> view
    def sync_from_state(self) -> None:
        t = self.state
        self.train_mode.setCurrentIndex(max(0, self.train_mode.findData(t.mode)))
        self.train_task.setCurrentIndex(max(0, self.train_task.findData(t.task)))
        self.epochs_spin.setValue(t.epochs)
        self.steps_spin.setValue(t.steps_per_epoch)
        self.name_edit.setText(t.name)
        self.train_folder.setText(t.folder)
        self._on_mode()
        self.update_buttons()

    def _on_running(self, running: bool) -> None:
        if not running:
            self._timer.stop()
            self.poll_log()
            if self.closing:
                self.drop_tmp()
        self.state.running = running
        self.update_buttons()

    def update_buttons(self) -> None:
        tr = self.jobs.running
        self.train_button.setEnabled(not tr)
        self.stop_button.setEnabled(tr)
        self.save_model_button.setEnabled(not tr and self.train_result is not None)

    def _on_mode(self, *_: Any) -> None:
        mode = self.train_mode.currentData()
        if mode and mode != self.state.mode:
            self.state.mode = mode
        self.low_combo.setEnabled(mode == "paired")
        if mode != "supervised":
            self.train_task.setCurrentIndex(self.train_task.findData("denoise"))
        self.train_task.setEnabled(mode == "supervised")
        self.refresh_models()

    def _on_base(self, _index: int) -> None:
        key = self.base_combo.currentData()
        if key is not None and key != self.state.base_model:
            self.state.base_model = key

    def data_modality(self) -> str:
        """The modality of the ticked layers (``"OT"`` for a folder or mixed layers)."""
        if self.train_from_folder.isChecked():
            return "OT"
        mods = {L.layer_modality(lay) for lay in self._checked_layers()}
        return mods.pop() if len(mods) == 1 else "OT"

    def refresh_models(self) -> None:
        """The models a fine-tune can start from: the data's modality first, others on request."""
        self.base_combo.blockSignals(True)
        try:
            self.base_combo.clear()
            self.base_combo.addItem("New network (from scratch)", AUTO_MODEL)
            for c in self.catalogue.base_choices(self.state.task, self.data_modality(), self.other_modalities.isChecked()):
                self.base_combo.addItem(c.label, c.key)
                self.base_combo.setItemData(self.base_combo.count() - 1, card_html(c.card), Qt.ToolTipRole)
            i = self.base_combo.findData(self.state.base_model)
            self.base_combo.setCurrentIndex(max(0, i))
        finally:
            self.base_combo.blockSignals(False)
        self._on_base(self.base_combo.currentIndex())

    # ------------------------------------------------------------------ layers
    def refresh_layers(self, names: list[str]) -> None:
        fill_combo(self.low_combo, names)
        checked = {it.text() for it in self._items() if it.checkState() == Qt.Checked}
        self.train_layers.blockSignals(True)
        self.train_layers.clear()
        for n in names:
            it = QListWidgetItem(n)
            it.setFlags(it.flags() | Qt.ItemIsUserCheckable)
            it.setCheckState(Qt.Checked if n in checked else Qt.Unchecked)
            self.train_layers.addItem(it)
        self.train_layers.blockSignals(False)
        self.refresh_models()

    def _items(self) -> list[QListWidgetItem]:
        return [self.train_layers.item(i) for i in range(self.train_layers.count())]

    def _checked_layers(self) -> list[Any]:
        return [layer_named(self.viewer, it.text()) for it in self._items()
                if it.checkState() == Qt.Checked and it.text() in self.viewer.layers]

    def set_train_layers(self, names: list[str]) -> None:
        """Tick the training layers by name (the others are unticked)."""
        for it in self._items():
            it.setCheckState(Qt.Checked if it.text() in names else Qt.Unchecked)
        self.train_from_layers.setChecked(True)
        self.refresh_models()

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of training scans")
        if path:
            self.train_folder.setText(path)
            self.train_from_folder.setChecked(True)
            self.refresh_models()

    # ------------------------------------------------------------------ training
    def request(self) -> TrainRequest:
        """The panel's choices (the ticked layers as Volumes)."""
        t = self.state
        req = TrainRequest(mode=t.mode, task=t.task, epochs=t.epochs, steps_per_epoch=t.steps_per_epoch,
                           name=t.name, base_model=self.base_combo.currentData() or "")
        if self.train_from_folder.isChecked():
            req.folder, req.from_folder = t.folder, True
        else:
            req.layers = [(lay.name, L.layer_volume(lay)) for lay in self._checked_layers()]
        if t.mode == "paired":
            low = layer_named(self.viewer, self.low_combo.currentText())
            req.low = (low.name, L.layer_volume(low)) if low is not None else None
        return req

    def start_training(self, **overrides: Any) -> Job | None:
        """Fine-tune in a worker with the panel's settings; ``overrides`` go to ``TrainConfig``."""
        if self.jobs.running:
            return None
        self.drop_tmp()
        self.train_result = None
        try:
            request = self.request()
            self._tmp = tmp = Path(tempfile.mkdtemp(prefix="napari-restore-train-"))
            # the settings are checked here; the layers are written in the worker (big volumes take a while)
            prepare_training(request, tmp, dry_run=True, **overrides)
        except RestoreError as exc:
            self.jobs.show_error(exc, "Failed: ")
            return None
        self._log = None
        self.state.train_loss, self.state.val_loss = [], []
        self.curve.set_data([], [])

        def work(progress, cancel):
            from ..training import train

            config = prepare_training(request, tmp, **overrides)
            self._log = (Path(config.run_dir) if config.run_dir else config.run_path) / "log.csv"
            return train(config, progress=progress, cancel=cancel)

        def done(result):
            self.train_result = result
            vl = (result.best or {}).get("val_loss")
            return (f"Trained {result.steps} steps in {result.seconds:.0f} s"
                    + (f"; best validation loss {vl:.4g}" if vl is not None else "") + ". Save model to use it.")

        def cancelled():
            notify("info", "Training stopped; no model was saved.")
            return "Stopped: no model was saved."

        job = self.jobs.start("Preparing the data", work, on_result=done, on_cancelled=cancelled)
        self._timer.start()
        return job

    def poll_log(self) -> None:
        """Read the run's loss log into the state and the curve."""
        read = read_loss_log(self._log) if self._log is not None and self._log.is_file() else None
        if read is not None and (read[0] != self.state.train_loss or read[1] != self.state.val_loss):
            self.state.train_loss, self.state.val_loss = read
            self.curve.set_data(*read)

    def stop_training(self) -> None:
        """Stop the training run at its next step (no model is saved)."""
        self.jobs.cancel()

    def save_trained_model(self, folder: str | Path | None = None, overwrite: bool = False) -> Path | None:
        """Copy the trained model (card + weights) into the user model folder; it appears in the lists at once."""
        from ..models import read_card, user_model_dirs

        res = self.train_result
        if res is None:
            notify("warning", "Train a model first.")
            return None
        src = Path(res.model_dir)
        dest = Path(folder) if folder else user_model_dirs()[0] / src.name
        try:
            if dest.exists():
                if not overwrite and folder is None:
                    answer = QMessageBox.question(self, "Replace model?", f"{dest} exists. Replace it?")
                    overwrite = answer == QMessageBox.Yes
                if not overwrite:
                    raise OutputError("a model folder of this name exists already; choose another model name", dest)
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(src, dest)
            card = read_card(dest)
        except OSError as exc:
            self.jobs.show_error(OutputError(f"cannot save the model: {exc}", dest))
            return None
        except RestoreError as exc:
            self.jobs.show_error(exc)
            return None
        self.events.models_changed.emit()
        self.events.model_saved.emit(card.name)
        self.jobs.set_status(f"Saved {card.name} to {dest}; it is in the model list now.")
        notify("info", f"Model {card.name!r} saved to {dest}")
        return dest

    def drop_tmp(self) -> None:
        """Delete the previous run's temporary folder (layer copies, run logs, unsaved model)."""
        if self._tmp is not None and not self.jobs.running:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
