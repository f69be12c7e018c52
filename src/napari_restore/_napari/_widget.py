"""The napari dock widget: Restore, Compare & measure, Export, Fine-tune.

The widget is a view of the evented state in :mod:`._state`; it talks only to the public API
(:func:`napari_restore.restore`, :func:`~napari_restore.save`, :func:`~napari_restore.list_models`,
:mod:`napari_restore.training`). Every long job runs in a napari thread worker
(:mod:`._worker`): the viewer never blocks, Cancel stops within one batch and leaves no layer,
errors become napari notifications carrying our error messages, and the widget can run again
afterwards. Qt comes through ``qtpy`` only.
"""
from __future__ import annotations

import inspect
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtWidgets import (QAbstractItemView, QButtonGroup, QCheckBox, QComboBox, QDoubleSpinBox,
                            QFileDialog, QFormLayout, QGroupBox, QHBoxLayout,
                            QHeaderView, QLabel, QLineEdit, QListWidget, QListWidgetItem, QMessageBox,
                            QProgressBar, QPushButton, QRadioButton, QSlider, QSpinBox,
                            QTableWidget, QTableWidgetItem, QTabWidget, QToolButton, QVBoxLayout, QWidget)

from ..errors import InputError, OutputError, RestoreError
from ..volume import Volume
from . import _layers as L
from ._plot import CurvePlot
from ._roi import RoiRow, roi_table, slice_noise
from ._state import (AUTO_MODEL, TASK_LABELS, TASKS, CompareState, ExportState, RestoreState, TrainState,
                     load_settings, save_settings, suggest_mode)
from ._worker import Job, format_eta, start_job

ACCENT = "#2b7bd6"
ROI_LAYER = "ROI"
_EXPORT_FILE = re.compile(r"IM\d{5}\.dcm")
TRAIN_MODES = {"supervised": "Synthetic degradation (clean scans)",
               "self-supervised": "Self-supervised (noisy scans only)",
               "paired": "Paired layers (full dose + low dose)"}


def _notify(kind: str, message: str) -> None:
    from napari.utils import notifications as n

    {"error": n.show_error, "warning": n.show_warning, "info": n.show_info}[kind](message)


def _error_text(exc: BaseException) -> str:
    """Our errors carry a message meant for people; anything else gets its type named."""
    if isinstance(exc, RestoreError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def _hint(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setStyleSheet("color: #9aa4ae; font-size: 11px;")
    return lab


def _primary(button: QPushButton) -> QPushButton:
    button.setStyleSheet(f"QPushButton {{ background-color: {ACCENT}; color: white; font-weight: bold;"
                         " padding: 5px 10px; border-radius: 3px; }"
                         " QPushButton:disabled { background-color: #4a5562; color: #a0a8b0; }")
    return button


def card_html(card: Any) -> str:
    """The model card as a short HTML summary (tooltip and info box)."""
    if card is None:
        return ""
    metrics = ", ".join(f"{k} {v}" for k, v in (card.metrics or {}).items() if isinstance(v, (int, float)))
    data = card.training_data if isinstance(card.training_data, str) else "; ".join(map(str, card.training_data or []))
    rows = [f"<b>{card.name}</b> v{card.version} &middot; {card.task} &middot; {card.modality} &middot; {card.dims}-D",
            card.description, f"<i>trained on:</i> {data}" if data else "",
            f"<i>validation:</i> {metrics}" if metrics else "", f"<i>licence:</i> {card.license}" if card.license else "",
            f"<i>from:</i> {card.source or 'file'} {card.path.parent if card.path else ''}"]
    return "<br>".join(r for r in rows if r)


class _Section(QWidget):
    """A collapsible section (a flat tool button with an arrow and a body)."""

    def __init__(self, title: str, body: QWidget, expanded: bool = False) -> None:
        super().__init__()
        self.button = QToolButton(text=title, checkable=True, checked=expanded)
        self.button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.button.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.button.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.body = body
        body.setVisible(expanded)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.button)
        lay.addWidget(body)
        self.button.toggled.connect(self._toggle)

    def _toggle(self, on: bool) -> None:
        self.button.setArrowType(Qt.DownArrow if on else Qt.RightArrow)
        self.body.setVisible(on)


def _install_view() -> None:
    """Keep the real viewer upright and open series in their plane (the widget gets a proxy)."""
    try:
        import napari

        from ._view import install

        install(napari.current_viewer())
    except Exception:  # no current viewer (a bare widget in a script)
        pass


class RestoreWidget(QWidget):
    """The napari-restore dock widget.

    Public methods (used by the buttons and by tests): :meth:`run_restore`, :meth:`run_preview`,
    :meth:`cancel`, :meth:`add_model_path`, :meth:`show_side_by_side`, :meth:`show_blend`,
    :meth:`add_difference_layer`, :meth:`add_roi_layer`, :meth:`update_roi_stats`,
    :meth:`export_dicom`, :meth:`save_nifti`, :meth:`start_training`, :meth:`stop_training`,
    :meth:`save_trained_model`.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        _install_view()
        self.state = RestoreState()
        self.compare_state = CompareState()
        self.export_state = ExportState()
        self.train_state = TrainState()
        self._states = {"restore": self.state, "export": self.export_state, "train": self.train_state}
        load_settings(self._states)
        self.job: Job | None = None
        self.export_job: Job | None = None
        self.train_job: Job | None = None
        self.last_output: Any = None
        self.last_error: str = ""
        self.roi_rows: list[RoiRow] = []
        self.slice_noise_values: tuple[float | None, float | None] = (None, None)
        self.train_result: Any = None
        self._cards: dict[str, Any] = {}
        self._bundles: dict[str, Any] = {}
        self._saved_visibility: dict[str, bool] | None = None
        self._train_tmp: Path | None = None
        self._updating = False

        tabs = QTabWidget()
        tabs.addTab(self._build_restore_tab(), "Restore")
        self.compare_page = self._build_compare_tab()
        tabs.addTab(self.compare_page, "Compare && measure")
        tabs.addTab(self._build_export_tab(), "Export")
        tabs.addTab(self._build_train_tab(), "Fine-tune")
        self.tabs = tabs
        tabs.currentChanged.connect(self._schedule_roi)
        outer = QVBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        outer.addWidget(tabs)
        self.setMinimumWidth(360)

        for ev in (self.viewer.layers.events.inserted, self.viewer.layers.events.removed,
                   self.viewer.layers.events.reordered):
            ev.connect(self._refresh_layers)
        self.viewer.layers.selection.events.active.connect(self._on_active_layer)
        self.viewer.dims.events.current_step.connect(self._schedule_roi)
        self._roi_timer = QTimer(self, singleShot=True, interval=120)
        self._roi_timer.timeout.connect(self.update_roi_stats)
        self._train_timer = QTimer(self, interval=400)
        self._train_timer.timeout.connect(self._poll_train_log)
        for st in self._states.values():
            st.events.connect(self._on_state_changed)
        self._refresh_layers()
        self._sync_from_state()

    # =========================================================================== building
    def _build_restore_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        self.layer_combo = QComboBox()
        self.layer_combo.currentTextChanged.connect(self._on_layer_chosen)
        form.addRow("Image", self.layer_combo)
        self.layer_info = _hint("Open a CT or MR series (File > Open Folder...) or a NIfTI file.")
        form.addRow("", self.layer_info)
        self.modality_combo = QComboBox()
        for text, value in (("From the file", "auto"), ("CT (HU)", "CT"), ("MR", "MR")):
            self.modality_combo.addItem(text, value)
        self.modality_combo.setToolTip("The intensity model: taken from the DICOM/NIfTI header when known. "
                                       "Set it for images of unknown origin.")
        self.modality_combo.currentIndexChanged.connect(lambda _i: self._refresh_models())
        form.addRow("Modality", self.modality_combo)
        self.task_combo = QComboBox()
        for t in TASKS:
            self.task_combo.addItem(TASK_LABELS[t], t)
        self.task_combo.currentIndexChanged.connect(lambda _i: setattr(self.state, "task", self.task_combo.currentData()))
        form.addRow("Task", self.task_combo)
        self.model_combo = QComboBox()
        self.model_combo.activated.connect(self._on_model_activated)
        self.model_combo.currentIndexChanged.connect(self._on_model_index)
        form.addRow("Model", self.model_combo)
        self.model_info = QLabel()
        self.model_info.setWordWrap(True)
        self.model_info.setTextFormat(Qt.RichText)
        self.model_info.setStyleSheet("color: #b8c2cc; font-size: 11px; border: 1px solid #3b4550;"
                                      " border-radius: 3px; padding: 4px;")
        form.addRow("", self.model_info)
        mode_row = QHBoxLayout()
        self.mode_2d = QRadioButton("Slice by slice (2D)")
        self.mode_3d = QRadioButton("3D")
        self.mode_group = QButtonGroup(self)
        self.mode_group.addButton(self.mode_2d)
        self.mode_group.addButton(self.mode_3d)
        self.mode_2d.toggled.connect(lambda on: on and setattr(self.state, "mode", "2d"))
        self.mode_3d.toggled.connect(lambda on: on and setattr(self.state, "mode", "3d"))
        mode_row.addWidget(self.mode_2d)
        mode_row.addWidget(self.mode_3d)
        mode_row.addStretch()
        form.addRow("Mode", mode_row)
        self.mode_hint = _hint("")
        form.addRow("", self.mode_hint)
        dev_row = QHBoxLayout()
        self.device_combo = QComboBox()
        for text, value in self._devices():
            self.device_combo.addItem(text, value)
        self.device_combo.currentIndexChanged.connect(
            lambda _i: setattr(self.state, "device", self.device_combo.currentData()))
        self.device_label = QLabel()
        self.device_label.setStyleSheet("color: #9aa4ae;")
        dev_row.addWidget(self.device_combo, 1)
        dev_row.addWidget(self.device_label)
        form.addRow("Device", dev_row)
        s_row = QHBoxLayout()
        self.strength_slider = QSlider(Qt.Horizontal)
        self.strength_slider.setRange(0, 100)
        self.strength_slider.setToolTip("0 %: the input unchanged; 100 %: the full restoration. "
                                        "In between, a blend: keeps some of the familiar texture.")
        self.strength_label = QLabel("100 %")
        self.strength_label.setMinimumWidth(40)
        self.strength_slider.valueChanged.connect(self._on_strength)
        s_row.addWidget(self.strength_slider, 1)
        s_row.addWidget(self.strength_label)
        form.addRow("Strength", s_row)
        lay.addLayout(form)

        adv = QWidget()
        af = QFormLayout(adv)
        af.setLabelAlignment(Qt.AlignRight)
        self.batch_spin = QSpinBox(minimum=0, maximum=256, specialValueText="Auto")
        self.batch_spin.setToolTip("Slices (2D) or windows (3D) per forward pass. Auto adapts to free memory.")
        self.batch_spin.valueChanged.connect(lambda v: setattr(self.state, "batch_size", int(v)))
        self.tile_spin = QSpinBox(minimum=0, maximum=1024, singleStep=32, specialValueText="Whole slice")
        self.tile_spin.setToolTip("Tile side in pixels for big images or small GPUs (blended with Gaussian weights).")
        self.tile_spin.valueChanged.connect(lambda v: setattr(self.state, "tile", int(v)))
        self.overlap_spin = QDoubleSpinBox(minimum=0.0, maximum=0.9, singleStep=0.05, decimals=2)
        self.overlap_spin.valueChanged.connect(lambda v: setattr(self.state, "overlap", float(v)))
        self.ensemble_combo = QComboBox()
        for text, n in (("Model's default", 0), ("1 (fastest)", 1), ("2", 2), ("4", 4), ("8 (cleanest)", 8)):
            self.ensemble_combo.addItem(text, n)
        self.ensemble_combo.setToolTip("Run the network on flipped and rotated copies of each slice and average "
                                       "them: a cleaner result for that many times the time.")
        self.ensemble_combo.currentIndexChanged.connect(
            lambda _i: setattr(self.state, "ensemble", int(self.ensemble_combo.currentData())))
        af.addRow("Batch size", self.batch_spin)
        af.addRow("Tile size", self.tile_spin)
        af.addRow("Tile overlap", self.overlap_spin)
        af.addRow("Passes", self.ensemble_combo)
        self.advanced = _Section("Advanced", adv)
        lay.addWidget(self.advanced)

        btns = QHBoxLayout()
        self.preview_button = QPushButton("Preview slice")
        self.preview_button.setToolTip("Restore only the slice on screen (well under a second on a CPU).")
        self.preview_button.clicked.connect(lambda: self.run_preview())
        self.run_button = _primary(QPushButton("Restore volume"))
        self.run_button.clicked.connect(lambda: self.run_restore())
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        btns.addWidget(self.preview_button)
        btns.addWidget(self.run_button, 1)
        btns.addWidget(self.cancel_button)
        lay.addLayout(btns)
        self.progress_bar = QProgressBar()
        self.progress_bar.setTextVisible(True)
        self.progress_bar.setFormat("")
        self.progress_bar.setValue(0)
        lay.addWidget(self.progress_bar)
        self.status_label = _hint("Ready")
        lay.addWidget(self.status_label)
        lay.addStretch()
        return page

    def _build_compare_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        form = QFormLayout()
        self.cmp_input = QComboBox()
        self.cmp_output = QComboBox()
        self.cmp_output.currentTextChanged.connect(self._on_cmp_output)
        self.cmp_input.currentTextChanged.connect(lambda _t: self._schedule_roi())
        form.addRow("Restored", self.cmp_output)
        form.addRow("Input", self.cmp_input)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.grid_button = QPushButton("Side by side", checkable=True)
        self.grid_button.setToolTip("Input and restored side by side; pan, zoom and slice move both.")
        self.grid_button.toggled.connect(self.show_side_by_side)
        self.blend_button = QPushButton("Blend", checkable=True)
        self.blend_button.setToolTip("Restored over input; the slider fades between them.")
        self.blend_button.toggled.connect(self.show_blend)
        self.diff_button = QPushButton("Difference layer")
        self.diff_button.setToolTip("Adds restored - input: what the model removed or added.")
        self.diff_button.clicked.connect(lambda: self.add_difference_layer())
        row.addWidget(self.grid_button)
        row.addWidget(self.blend_button)
        row.addWidget(self.diff_button)
        lay.addLayout(row)
        brow = QHBoxLayout()
        brow.addWidget(QLabel("input"))
        self.blend_slider = QSlider(Qt.Horizontal)
        self.blend_slider.setRange(0, 100)
        self.blend_slider.setValue(50)
        self.blend_slider.setEnabled(False)
        self.blend_slider.valueChanged.connect(lambda v: setattr(self.compare_state, "blend", v / 100.0))
        brow.addWidget(self.blend_slider, 1)
        brow.addWidget(QLabel("restored"))
        lay.addLayout(brow)

        box = QGroupBox("ROI statistics")
        bl = QVBoxLayout(box)
        rrow = QHBoxLayout()
        self.roi_ellipse = QPushButton("Draw ellipse")
        self.roi_rect = QPushButton("Draw rectangle")
        self.roi_ellipse.clicked.connect(lambda: self.add_roi_layer("ellipse"))
        self.roi_rect.clicked.connect(lambda: self.add_roi_layer("rectangle"))
        rrow.addWidget(self.roi_ellipse)
        rrow.addWidget(self.roi_rect)
        bl.addLayout(rrow)
        self.roi_table = QTableWidget(0, 4)
        self.roi_table.setHorizontalHeaderLabels(["ROI", "Input", "Restored", "Noise"])
        self.roi_table.setToolTip("mean ± SD inside each shape; Noise: the SD reduction in percent")
        self.roi_table.verticalHeader().setVisible(False)
        self.roi_table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.roi_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.roi_table.horizontalHeader().setStretchLastSection(True)
        self.roi_table.setMinimumHeight(70)
        self.roi_table.setMaximumHeight(130)
        bl.addWidget(self.roi_table)
        self.noise_label = QLabel("Slice noise (estimated): -")
        self.noise_label.setWordWrap(True)
        bl.addWidget(self.noise_label)
        bl.addWidget(_hint("SD inside each shape on its slice; noise reduction = 1 - SD restored / SD input. "
                           "Slice noise: mode of local 5x5 SDs (soft tissue 0-100 HU for CT)."))
        lay.addWidget(box)
        lay.addStretch()
        return page

    def _build_export_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
        form = QFormLayout()
        self.export_combo = QComboBox()
        self.export_combo.currentTextChanged.connect(self._on_export_layer)
        form.addRow("Layer", self.export_combo)
        self.series_edit = QLineEdit()
        self.series_edit.setPlaceholderText("the source's description + [task]")
        self.series_edit.textChanged.connect(lambda t: setattr(self.export_state, "series_description", t))
        form.addRow("Series description", self.series_edit)
        self.deid_check = QCheckBox("De-identify (remove patient identifiers)")
        self.deid_check.toggled.connect(lambda on: setattr(self.export_state, "deidentify", bool(on)))
        if not self._deidentify_supported():
            self.deid_check.setToolTip("Not available in this version of napari-restore.")
        form.addRow("", self.deid_check)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.dicom_button = _primary(QPushButton("Export DICOM series..."))
        self.dicom_button.setToolTip("A new derived series in the source's study (same patient, frame of "
                                     "reference, geometry); only for layers that come from DICOM.")
        self.dicom_button.clicked.connect(self._ask_export_dicom)
        self.nifti_button = QPushButton("Save NIfTI...")
        self.nifti_button.clicked.connect(self._ask_save_nifti)
        row.addWidget(self.dicom_button)
        row.addWidget(self.nifti_button)
        lay.addLayout(row)
        self.export_progress = QProgressBar()
        self.export_progress.setValue(0)
        lay.addWidget(self.export_progress)
        self.export_status = _hint("")
        lay.addWidget(self.export_status)
        lay.addStretch()
        return page

    def _build_train_tab(self) -> QWidget:
        page = QWidget()
        lay = QVBoxLayout(page)
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
        lay.addWidget(self.train_layers)
        frow = QHBoxLayout()
        self.train_folder = QLineEdit()
        self.train_folder.setPlaceholderText("folder of DICOM / NIfTI scans")
        self.train_folder.textChanged.connect(lambda t: setattr(self.train_state, "folder", t))
        browse = QPushButton("...")
        browse.setMaximumWidth(30)
        browse.clicked.connect(self._browse_train_folder)
        frow.addWidget(self.train_folder, 1)
        frow.addWidget(browse)
        lay.addLayout(frow)
        form = QFormLayout()
        self.train_mode = QComboBox()
        for key, text in TRAIN_MODES.items():
            self.train_mode.addItem(text, key)
        self.train_mode.currentIndexChanged.connect(self._on_train_mode)
        form.addRow("Mode", self.train_mode)
        self.low_combo = QComboBox()
        self.low_combo.setToolTip("Paired mode: the low-dose scan of the same patient (the checked layers are the full-dose side).")
        form.addRow("Low-dose layer", self.low_combo)
        self.train_task = QComboBox()
        for t in ("denoise", "deblur"):
            self.train_task.addItem(TASK_LABELS[t], t)
        self.train_task.currentIndexChanged.connect(
            lambda _i: (setattr(self.train_state, "task", self.train_task.currentData()), self._refresh_train_models()))
        form.addRow("Task", self.train_task)
        self.base_combo = QComboBox()
        form.addRow("Start from", self.base_combo)
        self.epochs_spin = QSpinBox(minimum=1, maximum=1000)
        self.epochs_spin.valueChanged.connect(lambda v: setattr(self.train_state, "epochs", int(v)))
        self.steps_spin = QSpinBox(minimum=1, maximum=100000)
        self.steps_spin.valueChanged.connect(lambda v: setattr(self.train_state, "steps_per_epoch", int(v)))
        er = QHBoxLayout()
        er.addWidget(self.epochs_spin)
        er.addWidget(QLabel("x steps"))
        er.addWidget(self.steps_spin)
        form.addRow("Epochs", er)
        self.name_edit = QLineEdit()
        self.name_edit.textChanged.connect(lambda t: setattr(self.train_state, "name", t))
        form.addRow("Model name", self.name_edit)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.train_button = _primary(QPushButton("Train"))
        self.train_button.clicked.connect(lambda: self.start_training())
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.stop_button.clicked.connect(self.stop_training)
        self.save_model_button = QPushButton("Save model")
        self.save_model_button.setEnabled(False)
        self.save_model_button.clicked.connect(lambda: self.save_trained_model())
        row.addWidget(self.train_button, 1)
        row.addWidget(self.stop_button)
        row.addWidget(self.save_model_button)
        lay.addLayout(row)
        self.train_progress = QProgressBar()
        self.train_progress.setValue(0)
        lay.addWidget(self.train_progress)
        self.curve = CurvePlot()
        lay.addWidget(self.curve)
        self.train_status = _hint("")
        lay.addWidget(self.train_status)
        lay.addStretch()
        return page

    # =========================================================================== state <-> view
    def _sync_from_state(self) -> None:
        self._updating = True
        try:
            s = self.state
            self.task_combo.setCurrentIndex(max(0, TASKS.index(s.task) if s.task in TASKS else 0))
            i = self.device_combo.findData(s.device)
            self.device_combo.setCurrentIndex(i if i >= 0 else 0)
            self.strength_slider.setValue(int(round(s.strength * 100)))
            self.batch_spin.setValue(s.batch_size)
            self.tile_spin.setValue(s.tile)
            self.overlap_spin.setValue(s.overlap)
            self.ensemble_combo.setCurrentIndex(max(0, self.ensemble_combo.findData(s.ensemble)))
            self.deid_check.setChecked(self.export_state.deidentify and self._deidentify_supported())
            self.deid_check.setEnabled(self._deidentify_supported())
            t = self.train_state
            self.train_mode.setCurrentIndex(max(0, self.train_mode.findData(t.mode)))
            self.train_task.setCurrentIndex(max(0, self.train_task.findData(t.task)))
            self.epochs_spin.setValue(t.epochs)
            self.steps_spin.setValue(t.steps_per_epoch)
            self.name_edit.setText(t.name)
            self.train_folder.setText(t.folder)
        finally:
            self._updating = False
        self._on_train_mode()
        self._refresh_models()
        self._update_device_label()
        self._update_buttons()

    def _on_state_changed(self, info: Any = None) -> None:
        name = getattr(getattr(info, "signal", None), "name", "")
        if name == "task":
            i = self.task_combo.findData(self.state.task)
            if i >= 0 and i != self.task_combo.currentIndex():
                self.task_combo.setCurrentIndex(i)
            self._refresh_models()
        elif name == "device":
            self._update_device_label()
        elif name == "mode":
            (self.mode_3d if self.state.mode == "3d" else self.mode_2d).setChecked(True)
        elif name == "strength":
            self.strength_slider.setValue(int(round(self.state.strength * 100)))
        elif name in ("running",):
            self._update_buttons()
        if not self._updating and name not in ("running", "done", "total", "status", "train_loss", "val_loss", "layer"):
            save_settings(self._states)

    def _update_buttons(self) -> None:
        running = self.state.running
        has_layer = self._input_layer() is not None
        self.run_button.setEnabled(not running and has_layer)
        self.preview_button.setEnabled(not running and has_layer)
        self.cancel_button.setEnabled(running)
        exp = self._export_layer()
        busy = self.export_state.running
        self.dicom_button.setEnabled(not busy and exp is not None and self._has_dicom_source(exp))
        self.nifti_button.setEnabled(not busy and exp is not None)
        tr = self.train_state.running
        self.train_button.setEnabled(not tr)
        self.stop_button.setEnabled(tr)
        self.save_model_button.setEnabled(not tr and self.train_result is not None)

    # =========================================================================== layers
    def _image_layers(self) -> list[Any]:
        from napari.layers import Image

        return [lay for lay in self.viewer.layers if isinstance(lay, Image)]

    def _layer(self, name: str | None) -> Any:
        if not name or name not in self.viewer.layers:
            return None
        return self.viewer.layers[name]

    def _input_layer(self) -> Any:
        return self._layer(self.layer_combo.currentText())

    def _export_layer(self) -> Any:
        return self._layer(self.export_combo.currentText())

    def _refresh_layers(self, event: Any = None) -> None:
        images = [lay for lay in self._image_layers() if not lay.name.endswith("[preview]")]
        names = [lay.name for lay in images]
        restored = [lay.name for lay in images if (L.record_of(lay) or {}).get("source")]
        inserted = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        for combo, items, prefer in ((self.layer_combo, names, None), (self.cmp_input, names, None),
                                     (self.cmp_output, restored, "restored"), (self.export_combo, names, "restored"),
                                     (self.low_combo, names, None)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(items)
            target = current if current in items else (items[-1] if items else "")
            if prefer == "restored" and inserted is not None and inserted.name in items:
                target = inserted.name
            if combo is self.layer_combo and not current and items:
                active = self.viewer.layers.selection.active
                target = active.name if active is not None and active.name in items else items[0]
            combo.setCurrentText(target)
            combo.blockSignals(False)
        for lay in images:  # follow renames
            try:
                lay.events.name.disconnect(self._refresh_layers)
            except (TypeError, ValueError, RuntimeError):
                pass
            lay.events.name.connect(self._refresh_layers)
        checked = {self.train_layers.item(i).text() for i in range(self.train_layers.count())
                   if self.train_layers.item(i).checkState() == Qt.Checked}
        self.train_layers.clear()
        for n in names:
            it = QListWidgetItem(n)
            it.setFlags(it.flags() | Qt.ItemIsUserCheckable)
            it.setCheckState(Qt.Checked if n in checked else Qt.Unchecked)
            self.train_layers.addItem(it)
        self._on_layer_chosen(self.layer_combo.currentText())
        self._on_cmp_output(self.cmp_output.currentText())
        self._on_export_layer(self.export_combo.currentText())

    def _on_active_layer(self, event: Any = None) -> None:
        active = self.viewer.layers.selection.active
        if active is not None and self.layer_combo.findText(active.name) >= 0 and not self.state.running \
                and not (L.record_of(active) or {}).get("source"):
            self.layer_combo.setCurrentText(active.name)

    def select_layer(self, name: str) -> None:
        """Choose the input image layer by name."""
        if self.layer_combo.findText(name) < 0:
            raise InputError(f"no image layer named {name!r}")
        self.layer_combo.setCurrentText(name)
        self._on_layer_chosen(name)

    def _on_layer_chosen(self, name: str) -> None:
        layer = self._layer(name)
        self.state.layer = name or None
        if layer is None:
            self.layer_info.setText("Open a CT or MR series (File > Open Folder...) or a NIfTI file.")
            self._update_buttons()
            return
        modality = L.layer_modality(layer)
        shape = " x ".join(str(s) for s in np.shape(layer.data))
        sp = " x ".join(f"{s:.3g}" for s in np.asarray(layer.scale)[-3:])
        src = "DICOM" if self._has_dicom_source(layer) else ("file" if L.record_of(layer) else "no source file")
        self.layer_info.setText(f"{modality if modality != 'OT' else 'unknown modality'} · {shape} voxels · "
                                f"{sp} mm · {src}")
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentIndex(0)
        self.modality_combo.blockSignals(False)
        self._refresh_models()
        self._update_buttons()

    def _modality(self) -> str:
        choice = self.modality_combo.currentData()
        if choice and choice != "auto":
            return choice
        layer = self._input_layer()
        return L.layer_modality(layer) if layer is not None else "OT"

    def _has_dicom_source(self, layer: Any) -> bool:
        rec = L.record_of(layer) or {}
        return (rec.get("meta") or {}).get("dicom_header") is not None

    # =========================================================================== models
    def _devices(self) -> list[tuple[str, str]]:
        out = [("Auto", "auto"), ("CPU", "cpu")]
        try:
            import torch

            for i in range(torch.cuda.device_count()):
                p = torch.cuda.get_device_properties(i)
                out.append((f"GPU {i}: {p.name} ({p.total_memory / 2**30:.0f} GB)", f"cuda:{i}"))
            mps = getattr(torch.backends, "mps", None)
            if mps is not None and mps.is_available():
                out.append(("Apple GPU (MPS)", "mps"))
        except Exception:  # pragma: no cover - a broken driver still leaves the CPU
            pass
        return out

    def _update_device_label(self) -> None:
        try:
            from ..inference import resolve_device

            dev = resolve_device(self.state.device)
            text = {"cpu": "CPU", "cuda": "GPU", "mps": "Apple GPU"}.get(dev.type, dev.type)
            if dev.type == "cuda":
                import torch

                idx = dev.index or 0
                text = f"GPU {idx} ({torch.cuda.get_device_name(idx)})"
            self.device_label.setText(f"runs on: {text}")
        except RestoreError as exc:
            self.device_label.setText(str(exc))

    def _all_cards(self) -> list[Any]:
        from .. import list_models
        from ..models import read_card

        cards = list(list_models())
        for p in list(self.state.extra_models):
            try:
                if p in self._bundles:
                    cards.append(self._bundles[p].card)
                else:
                    cards.append(read_card(p, source="loaded"))
            except RestoreError:
                continue
        return cards

    def _refresh_models(self) -> None:
        task, modality = self.state.task, self._modality()
        cards = [c for c in self._all_cards() if c.task == task
                 and (modality not in ("CT", "MR") or c.modality in (modality, "any"))]
        self._cards = {}
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        auto = "Auto: best per step" if task == "restore" else "Auto: best installed"
        self.model_combo.addItem(auto, AUTO_MODEL)
        for c in cards:
            key = str(c.path.parent if c.path is not None and c.path.name == "model.pt" else c.path) \
                if c.source == "loaded" or c.source == "" else c.name
            if c.path is not None and any(str(c.path).startswith(str(Path(p))) for p in self.state.extra_models):
                key = next(p for p in self.state.extra_models if str(c.path).startswith(str(Path(p))))
            label = f"{c.name} v{c.version} ({c.dims}D{', ' + c.modality if c.modality != 'any' else ''})"
            self.model_combo.addItem(label, key)
            self.model_combo.setItemData(self.model_combo.count() - 1, card_html(c), Qt.ToolTipRole)
            self._cards[key] = c
        self.model_combo.addItem("Load model...", "__load__")
        i = self.model_combo.findData(self.state.model)
        if i < 0:
            i = 0
            self.state.model = AUTO_MODEL
        self.model_combo.setCurrentIndex(i)
        self.model_combo.blockSignals(False)
        self._on_model_index(i)

    def _on_model_index(self, index: int) -> None:
        key = self.model_combo.itemData(index)
        if key == "__load__":
            return
        if key is not None and key != self.state.model:
            self.state.model = key
        card = self._cards.get(key)
        layer = self._input_layer()
        if card is not None:
            self.model_info.setText(card_html(card))
            self.model_combo.setToolTip(card_html(card))
            self._set_mode("3d" if card.dims == 3 else "2d",
                           f"{card.name} is a {card.dims}-D model")
            self.mode_2d.setEnabled(card.dims == 2)
            self.mode_3d.setEnabled(card.dims == 3)
            return
        self.mode_2d.setEnabled(True)
        self.mode_3d.setEnabled(True)
        n = max(0, self.model_combo.count() - 2)
        if self.state.task == "enhance" and n == 0:
            self.model_info.setText("No trained enhance model installed: a classical noise-aware unsharp "
                                    "mask is used.")
        elif n == 0:
            self.model_info.setText(f"<b>No trained {self.state.task} model for {self._modality()} is "
                                    "installed.</b> Train one in the Fine-tune tab, or Load model...")
        else:
            best = self._auto_card()
            self.model_info.setText(("Auto picks " + card_html(best)) if best is not None else
                                    f"The best of {n} installed model(s) for the task, modality and mode.")
        self.model_combo.setToolTip("")
        if layer is not None:
            has3d = any(c.dims == 3 for c in self._cards.values())
            spacing = self._layer_spacing(layer)
            mode, why = suggest_mode(spacing, has3d)
            self._set_mode(mode, why)

    def _auto_card(self) -> Any:
        """The model "Auto" runs for the current task, modality and mode (None for the pipeline)."""
        if self.state.task == "restore":
            return None
        from ..models import find_model

        modality = self._modality()
        return find_model(self.state.task, modality if modality in ("CT", "MR") else "any",
                          3 if self.state.mode == "3d" else 2, self._slice_distance())

    def _slice_distance(self) -> float | None:
        """The input layer's slice distance in mm (what "Auto" picks a model for), if there is a layer."""
        layer = self._input_layer()
        if layer is None:
            return None
        try:
            return L.layer_volume(layer, self._modality()).slice_distance
        except RestoreError:
            return float(np.asarray(layer.scale, dtype=float)[-3]) if layer.ndim >= 3 else None

    def _context_slices(self) -> int:
        """Neighbouring slices per side the chosen 2-D model(s) read (2.5-D models; 0 otherwise)."""
        if self.state.model != AUTO_MODEL:
            cards = [self._cards.get(self.state.model)]
        elif self.state.task == "restore":
            from ..inference import PIPELINE
            from ..models import find_model

            modality = self._modality()
            cards = [find_model(t, modality if modality in ("CT", "MR") else "any", 2, self._slice_distance())
                     for t in PIPELINE]
        else:
            cards = [self._auto_card()]
        return max([c.context for c in cards if c is not None], default=0)

    def _layer_spacing(self, layer: Any) -> tuple[float, float, float]:
        try:
            return L.layer_volume(layer, self._modality()).spacing
        except RestoreError:
            sc = np.asarray(layer.scale, dtype=float)
            return tuple(np.concatenate([np.ones(3), sc])[-3:])  # type: ignore[return-value]

    def _set_mode(self, mode: str, why: str) -> None:
        self.state.mode = mode
        (self.mode_3d if mode == "3d" else self.mode_2d).setChecked(True)
        self.mode_hint.setText(why)

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) == "__load__":
            path = QFileDialog.getExistingDirectory(self, "Model folder (card.json + model.pt) or MONAI bundle")
            if path:
                try:
                    self.add_model_path(path)
                except RestoreError as exc:
                    self._error(exc)
                    self._refresh_models()
            else:
                self._refresh_models()

    def add_model_path(self, path: str | Path) -> Any:
        """Add a model folder / file (or a MONAI bundle folder) to the list and select it; returns its card.

        Raises:
            ModelError: not a model (the message names the file and the problem).
        """
        from ..models import read_card

        path = Path(path)
        key = str(path)
        if path.is_dir() and not (path / "card.json").is_file() and (path / "configs").is_dir():
            from ..training import load_bundle

            loaded = load_bundle(path)
            self._bundles[key] = loaded
            card = loaded.card
        else:
            card = read_card(path, source="loaded")
        if key not in self.state.extra_models:
            self.state.extra_models = [*self.state.extra_models, key]
        if card.task != self.state.task:
            self.state.task = card.task  # refreshes the list
        self._refresh_models()
        i = self.model_combo.findData(key)
        if i >= 0:
            self.model_combo.setCurrentIndex(i)
        return card

    def refresh_models(self) -> None:
        """Re-read the installed models (after training or copying a model folder)."""
        self._refresh_models()
        self._refresh_train_models()

    def _model_arg(self) -> Any:
        key = self.state.model
        if key == AUTO_MODEL:
            return None
        return self._bundles.get(key, key)

    def _on_strength(self, v: int) -> None:
        self.strength_label.setText(f"{v} %")
        if abs(self.state.strength - v / 100.0) > 1e-9:
            self.state.strength = v / 100.0

    # =========================================================================== restore
    def _restore_kwargs(self) -> dict[str, Any]:
        s = self.state
        return {"task": s.task, "model": self._model_arg(), "mode": s.mode, "device": s.device,
                "strength": float(s.strength), "batch_size": s.batch_size or None,
                "tile": s.tile or None, "overlap": float(s.overlap), "ensemble": s.ensemble or None}

    def _begin(self, what: str) -> None:
        self.state.running = True
        self.state.done, self.state.total = 0, 0
        self.progress_bar.setRange(0, 0)  # busy until the first progress report
        self.progress_bar.setFormat(what)
        self.status_label.setText(what + "...")
        self.last_error = ""

    def _end(self) -> None:
        self.state.running = False
        self.job = None
        self._update_buttons()

    def _on_progress(self, done: int, total: int) -> None:
        job = self.job
        self.state.done, self.state.total = int(done), int(total)
        self.progress_bar.setRange(0, max(1, int(total)))
        self.progress_bar.setValue(int(done))
        unit = "slices" if self.state.mode == "2d" else "windows"
        eta = "--:--"
        if job is not None and done > 0:
            eta = format_eta(job.elapsed() / done * (total - done))
        text = f"{done} / {total} {unit} · {eta} left"
        self.progress_bar.setFormat(text)
        self.status_label.setText(text)

    def _error(self, exc: BaseException) -> None:
        self.last_error = _error_text(exc)
        _notify("error", self.last_error)

    def run_restore(self) -> Job | None:
        """Restore the whole input layer in a worker; the result becomes a new layer. Returns the job."""
        if self.state.running:
            return None
        layer = self._input_layer()
        try:
            if layer is None:
                raise InputError("choose an image layer to restore")
            volume = L.layer_volume(layer, self._modality())
        except RestoreError as exc:
            self._error(exc)
            return None
        kwargs = self._restore_kwargs()
        name = L.output_name(layer.name, kwargs["task"], volume.modality)

        def work(progress, cancel):
            from .. import restore

            return restore(volume, progress=progress, cancel=cancel, **kwargs)

        def done(result):
            data = L.output_layer_data(layer, result)
            lk = L.output_layer_kwargs(layer, result, name)
            self.last_output = self._add_or_update(data, lk)  # a re-run replaces its own earlier output
            prov = lk["metadata"][L.LAYER_META_KEY]["provenance"]
            msg = f"{name}: {prov.get('model')} on {prov.get('device')} in {prov.get('seconds', 0):.1f} s"
            if prov.get("warnings"):
                msg += f" · warning: {prov['warnings'][0]}"
            self.status_label.setText(msg)
            self.progress_bar.setFormat("Done · " + format_eta(job.elapsed()))
            self.viewer.layers.selection.active = layer
            self.cmp_output.setCurrentText(name)
            self.cmp_input.setCurrentText(layer.name)
            self.export_combo.setCurrentText(name)
            for w in prov.get("warnings", []):
                _notify("warning", w)

        def cancelled(exc):
            self.status_label.setText("Cancelled: no layer was added.")
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)
            self.progress_bar.setFormat("Cancelled")
            _notify("info", f"Restoration of {layer.name!r} cancelled; nothing was added.")

        def failed(exc):
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)
            self.progress_bar.setFormat("Failed")
            self._error(exc)
            self.status_label.setText("Failed: " + self.last_error)

        self._begin(f"Restoring {layer.name}")
        job = start_job("restore", work, on_result=done, on_error=failed, on_cancelled=cancelled,
                        on_progress=self._on_progress, on_end=self._end)
        self.job = job
        return job

    def _add_or_update(self, data: np.ndarray, kwargs: dict[str, Any]) -> Any:
        """Add an image layer, or refill the layer of that name (cheaper than remove + add)."""
        from napari.layers import Image

        name = kwargs["name"]
        old = self._layer(name)
        if isinstance(old, Image) and old.ndim == data.ndim:
            old.data = data
            for key in ("scale", "translate", "rotate", "shear", "affine", "metadata", "contrast_limits"):
                setattr(old, key, kwargs[key])
            old.refresh()
            return old
        if old is not None:
            self.viewer.layers.remove(old)
        return self.viewer.add_image(data, **kwargs)

    def cancel(self) -> None:
        """Ask the running restoration to stop (within one batch)."""
        if self.job is not None:
            self.job.cancel()
            self.status_label.setText("Cancelling...")

    def _current_plane(self, layer: Any) -> tuple[dict[int, int], int]:
        """``({layer axis: index} of the non-displayed axes, the spatial slicing axis 0..2)``."""
        dims = self.viewer.dims
        point = np.asarray(dims.point, dtype=float)[-layer.ndim:]
        data_pt = np.asarray(layer.world_to_data(point), dtype=float)
        offset = dims.ndim - layer.ndim
        displayed = {d - offset for d in dims.displayed if d - offset >= 0}
        if len(displayed) > 2:  # 3-D rendering: preview the axial plane at the current slice
            displayed = {layer.ndim - 2, layer.ndim - 1}
        lead = {a: int(np.clip(round(data_pt[a]), 0, layer.data.shape[a] - 1))
                for a in range(layer.ndim) if a not in displayed}
        spatial0 = layer.ndim - 3
        slicing = [a - spatial0 for a in lead if a >= spatial0]
        return lead, (slicing[0] if slicing else 0)

    def run_preview(self) -> Job | None:
        """Restore only the plane on screen, as a one-plane layer ``"<name> [preview]"``."""
        if self.state.running:
            return None
        layer = self._input_layer()
        try:
            if layer is None:
                raise InputError("choose an image layer to preview")
            volume = L.layer_volume(layer, self._modality())
            lead, axis = self._current_plane(layer)
            rec = L.record_of(layer) or {}
            axes = tuple(rec.get("layer_axes", (0, 1, 2))) if rec else (0, 1, 2)
            t = lead.get(0, 0) if layer.ndim == 4 else 0
            spatial0 = max(0, layer.ndim - 3)
            k = lead.get(spatial0 + axis, 0) if layer.ndim >= 3 else 0
            slab = 8 if self.state.mode == "3d" else self._context_slices()
            sub, centre = L.plane_subvolume(volume, axes, axis, k, t, slab)
            plane_note = L.preview_plane_note(volume, int(axes[axis]), k)
        except RestoreError as exc:
            self._error(exc)
            return None
        kwargs = self._restore_kwargs()
        name = f"{layer.name} [preview]"

        def work(progress, cancel):
            from .. import restore

            t0 = time.perf_counter()
            out = restore(sub, progress=progress, cancel=cancel, **kwargs)
            return out, time.perf_counter() - t0

        def done(res):
            out, secs = res
            plane = out.array[centre]
            shape = [1 if a in lead else n for a, n in enumerate(np.shape(layer.data))]
            data = plane.reshape(shape)
            prov = (out.meta.get("provenance") or [{}])[-1]
            pk = L.preview_layer_kwargs(layer, name, lead, L.data_linear(layer),
                                        {"source": layer.name, "index": lead, "provenance": prov})
            self.last_preview = self._add_or_update(data, pk)
            self.viewer.layers.selection.active = layer
            self.status_label.setText(f"Preview of {plane_note}: {prov.get('model')} in {secs * 1000:.0f} ms")
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(1)
            self.progress_bar.setFormat(f"Preview · {secs * 1000:.0f} ms")

        def failed(exc):
            self.progress_bar.setRange(0, 1)
            self.progress_bar.setValue(0)
            self.progress_bar.setFormat("Failed")
            self._error(exc)
            self.status_label.setText("Failed: " + self.last_error)

        self._begin("Preview")
        self.job = start_job("preview", work, on_result=done, on_error=failed, on_cancelled=failed,
                             on_end=self._end)
        return self.job

    # =========================================================================== compare
    def _on_cmp_output(self, name: str) -> None:
        out = self._layer(name)
        src = (L.record_of(out) or {}).get("source", {}) if out is not None else {}
        if src.get("layer") and self.cmp_input.findText(src["layer"]) >= 0:
            self.cmp_input.setCurrentText(src["layer"])
        self._schedule_roi()

    def _pair(self) -> tuple[Any, Any]:
        return self._layer(self.cmp_input.currentText()), self._layer(self.cmp_output.currentText())

    def show_side_by_side(self, on: bool = True) -> None:
        """Input and restored in a 1 x 2 grid (one camera: pan, zoom and slice are linked)."""
        inp, out = self._pair()
        if on and (inp is None or out is None):
            _notify("warning", "Restore a layer first: side by side needs an input and a restored layer.")
            self.grid_button.setChecked(False)
            return
        if on:
            self.blend_button.setChecked(False)
            self._save_visibility()
            for lay in self.viewer.layers:
                lay.visible = lay is inp or lay is out
            out.opacity = 1.0
            self.viewer.grid.shape = (1, 2)
            self.viewer.grid.stride = 1
            self.viewer.grid.enabled = True
            self.compare_state.view = "grid"
        else:
            self.viewer.grid.enabled = False
            self._restore_visibility()
            self.compare_state.view = "off"
        if self.grid_button.isChecked() != on:
            self.grid_button.setChecked(on)

    def show_blend(self, on: bool = True) -> None:
        """Restored over input, faded by the blend slider."""
        inp, out = self._pair()
        if on and (inp is None or out is None):
            _notify("warning", "Restore a layer first: blending needs an input and a restored layer.")
            self.blend_button.setChecked(False)
            return
        self.blend_slider.setEnabled(on)
        if on:
            self.grid_button.setChecked(False)
            self._save_visibility()
            for lay in self.viewer.layers:
                lay.visible = lay is inp or lay is out
            layers = self.viewer.layers
            if layers.index(out) < layers.index(inp):
                layers.move(layers.index(out), layers.index(inp) + 1)
            out.blending = "translucent"
            out.opacity = self.compare_state.blend
            self.compare_state.events.blend.connect(self._apply_blend)
            self.compare_state.view = "blend"
        else:
            try:
                self.compare_state.events.blend.disconnect(self._apply_blend)
            except (TypeError, ValueError, RuntimeError):
                pass
            if out is not None:
                out.opacity = 1.0
            self._restore_visibility()
            self.compare_state.view = "off"
        if self.blend_button.isChecked() != on:
            self.blend_button.setChecked(on)

    def _apply_blend(self, value: float) -> None:
        _inp, out = self._pair()
        if out is not None:
            out.opacity = float(value)

    def _save_visibility(self) -> None:
        if self._saved_visibility is None:
            self._saved_visibility = {lay.name: lay.visible for lay in self.viewer.layers}

    def _restore_visibility(self) -> None:
        if self._saved_visibility is None or self.grid_button.isChecked() or self.blend_button.isChecked():
            return
        for name, vis in self._saved_visibility.items():
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = vis
        self._saved_visibility = None

    def add_difference_layer(self) -> Any:
        """Add ``restored - input`` (same geometry) with a diverging colour map; returns the layer."""
        inp, out = self._pair()
        if inp is None or out is None:
            _notify("warning", "Restore a layer first: the difference needs an input and a restored layer.")
            return None
        if np.shape(inp.data) != np.shape(out.data):
            self._error(InputError(f"{out.name!r} and {inp.name!r} differ in shape"))
            return None
        diff = np.asarray(out.data, dtype=np.float32) - np.asarray(inp.data, dtype=np.float32)
        sample = np.abs(diff[..., ::4, ::4])
        lim = float(np.percentile(sample, 99.5)) if sample.size else 1.0
        lim = max(lim, 1e-3)
        name = f"{out.name} - input"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        kw = {"scale": np.asarray(out.scale), "translate": np.asarray(out.translate), "rotate": np.asarray(out.rotate),
              "shear": np.asarray(out.shear), "affine": np.asarray(out.affine.affine_matrix)}
        rec = dict(L.record_of(out) or {})
        rec["difference_of"] = [out.name, inp.name]
        return self.viewer.add_image(diff, name=name, colormap="PiYG", contrast_limits=(-lim, lim),
                                     metadata={L.LAYER_META_KEY + "_difference": rec}, **kw)

    def add_roi_layer(self, kind: str = "ellipse") -> Any:
        """Add (or reuse) the ``ROI`` shapes layer on the input's geometry, in draw-``kind`` mode."""
        inp, _out = self._pair()
        if inp is None:
            inp = self._input_layer()
        if inp is None:
            _notify("warning", "Open an image first.")
            return None
        if ROI_LAYER in self.viewer.layers:
            shapes = self.viewer.layers[ROI_LAYER]
        else:
            shapes = self.viewer.add_shapes(
                ndim=inp.ndim, name=ROI_LAYER, scale=np.asarray(inp.scale), translate=np.asarray(inp.translate),
                rotate=np.asarray(inp.rotate), shear=np.asarray(inp.shear), affine=np.asarray(inp.affine.affine_matrix),
                edge_color="yellow", face_color="transparent", edge_width=2)
            shapes.events.data.connect(self._schedule_roi)
            shapes.events.set_data.connect(self._schedule_roi)
        self.viewer.layers.selection.active = shapes
        shapes.mode = "add_ellipse" if kind == "ellipse" else "add_rectangle"
        return shapes

    def _schedule_roi(self, *args: Any) -> None:
        """Recompute the statistics soon, when the Compare tab is showing (they cost ~0.1 s)."""
        if hasattr(self, "_roi_timer") and hasattr(self, "tabs") and self.tabs.currentWidget() is self.compare_page:
            self._roi_timer.start()

    def update_roi_stats(self) -> list[RoiRow]:
        """Recompute the ROI table and the slice noise estimate; returns the rows."""
        inp, out = self._pair()
        if inp is None:
            inp = self._input_layer()
        self.roi_rows = []
        self.roi_table.setRowCount(0)
        if inp is None:
            return self.roi_rows
        modality = L.layer_modality(inp)
        unit = " HU" if modality == "CT" else ""
        restored = out.data if out is not None and np.shape(out.data) == np.shape(inp.data) else None
        if ROI_LAYER in self.viewer.layers:
            shapes = self.viewer.layers[ROI_LAYER]
            try:
                self.roi_rows = roi_table(list(shapes.data), list(shapes.shape_type), inp.data, restored)
            except RestoreError as exc:
                self.noise_label.setText(str(exc))
        self.roi_table.setHorizontalHeaderLabels(["ROI", f"Input{unit and ' (HU)'}", f"Restored{unit and ' (HU)'}",
                                                  "Noise"])
        for row in self.roi_rows:
            r = self.roi_table.rowCount()
            self.roi_table.insertRow(r)
            red = row.noise_reduction
            cells = [f"{row.shape + 1} {row.kind}", f"{row.mean_in:.1f} ± {row.sd_in:.1f}",
                     "-" if row.sd_out is None else f"{row.mean_out:.1f} ± {row.sd_out:.1f}",
                     "-" if red is None else f"{-red:+.0f} %"]
            for c, text in enumerate(cells):
                item = QTableWidgetItem(text)
                item.setToolTip(f"{row.pixels} pixels on plane {tuple(i + 1 for i in row.index)}")
                self.roi_table.setItem(r, c, item)
        try:
            lead, _axis = self._current_plane(inp)
            idx = tuple(lead.get(a, 0) for a in range(inp.ndim - 2))
            plane_in = np.asarray(inp.data[idx], dtype=np.float32)
            n_in = slice_noise(plane_in, modality)
            n_out = slice_noise(np.asarray(restored[idx], dtype=np.float32), modality, plane_in) \
                if restored is not None else None
            self.slice_noise_values = (n_in, n_out)
            text = f"Slice noise (estimated): input {n_in:.1f}{unit}"
            if n_out is not None:
                text += f", restored {n_out:.1f}{unit}"
                if n_in > 0:
                    text += f" ({100 * (1 - n_out / n_in):.0f} % less)"
            self.noise_label.setText(text)
        except (RestoreError, IndexError, ValueError) as exc:
            self.noise_label.setText(f"Slice noise: {exc}")
        return self.roi_rows

    # =========================================================================== export
    def _on_export_layer(self, name: str) -> None:
        layer = self._layer(name)
        if layer is not None:
            self.series_edit.setPlaceholderText(f"default: {self._default_description(layer)}")
        self._update_buttons()

    def _default_description(self, layer: Any) -> str:
        rec = L.record_of(layer) or {}
        prov = rec.get("provenance") or {}
        desc = (rec.get("meta") or {}).get("description") or layer.name
        return f"{desc} [{prov.get('task', 'restored')}]" if prov else desc

    @staticmethod
    def _deidentify_supported() -> bool:
        from .. import save
        from ..io.dicom_write import write_dicom_series

        return any("deidentify" in inspect.signature(f).parameters for f in (save, write_dicom_series))

    def _export_volume(self, layer: Any, target: Path) -> Any:
        from ..volume import Volume

        data = np.asarray(layer.data)
        if data.ndim == 2:
            data = data[None]
        if L.record_of(layer) is not None:
            return Volume.from_layer(data, layer.metadata)
        return L.layer_volume(layer)

    def _ask_export_dicom(self) -> None:
        layer = self._export_layer()
        if layer is None:
            return
        start = self.export_state.last_folder or str(Path.home())
        suggested = re.sub(r"[^A-Za-z0-9._-]+", "_", layer.name).strip("_") or "restored"
        path, _ = QFileDialog.getSaveFileName(self, "New folder for the DICOM series",
                                              str(Path(start) / suggested), "Folder (*)",
                                              options=QFileDialog.DontConfirmOverwrite)
        if not path:
            return
        folder = Path(path)
        overwrite = False
        if folder.exists():
            others = [p.name for p in folder.iterdir()] if folder.is_dir() else [folder.name]
            if not folder.is_dir() or any(not _EXPORT_FILE.fullmatch(n) for n in others):
                self._error(OutputError("exists and holds other files; choose a new folder name", folder))
                return
            answer = QMessageBox.question(self, "Replace series?",
                                          f"{folder} holds an earlier export ({len(others)} files). Replace it?")
            if answer != QMessageBox.Yes:
                return
            overwrite = True
        self.export_dicom(folder, overwrite=overwrite)

    def _ask_save_nifti(self) -> None:
        layer = self._export_layer()
        if layer is None:
            return
        start = self.export_state.last_folder or str(Path.home())
        suggested = re.sub(r"[^A-Za-z0-9._-]+", "_", layer.name).strip("_") + ".nii.gz"
        path, _ = QFileDialog.getSaveFileName(self, "Save NIfTI", str(Path(start) / suggested),
                                              "NIfTI (*.nii.gz *.nii)")
        if path:  # the dialog itself asked before replacing an existing file
            if not path.endswith((".nii", ".nii.gz")):
                path += ".nii.gz"
            self.save_nifti(path, overwrite=Path(path).exists())

    def export_dicom(self, folder: str | Path, overwrite: bool = False) -> Job | None:
        """Write the export layer as a derived DICOM series into ``folder`` (a worker; returns the job).

        An existing ``folder`` is an error unless ``overwrite`` (the button asks first).
        """
        layer = self._export_layer()
        folder = Path(folder)
        try:
            if layer is None:
                raise OutputError("choose a layer to export", folder)
            if not self._has_dicom_source(layer):
                raise OutputError(f"layer {layer.name!r} does not come from a DICOM series; save it as NIfTI", folder)
            volume = self._export_volume(layer, folder)
            kwargs: dict[str, Any] = {"format": "dicom", "overwrite": overwrite}
            desc = self.export_state.series_description.strip()
            kwargs["series_description"] = desc or self._default_description(layer)
            if self.export_state.deidentify:
                if not self._deidentify_supported():
                    raise OutputError("de-identification is not available in this version; untick it to export", folder)
                kwargs["deidentify"] = True
        except RestoreError as exc:
            self._error(exc)
            return None

        def work(progress, cancel):
            from .. import save

            return save(volume, folder, progress=progress, cancel=cancel, **kwargs)

        return self._start_export(f"DICOM series -> {folder.name}", work, folder)

    def save_nifti(self, path: str | Path, overwrite: bool = False) -> Job | None:
        """Save the export layer as NIfTI (a worker; returns the job). Never replaces a file unless ``overwrite``."""
        layer = self._export_layer()
        path = Path(path)
        try:
            if layer is None:
                raise OutputError("choose a layer to save", path)
            volume = self._export_volume(layer, path)
        except RestoreError as exc:
            self._error(exc)
            return None

        def work(progress, cancel):
            from .. import save

            return save(volume, path, overwrite=overwrite)

        return self._start_export(f"NIfTI -> {path.name}", work, path)

    def _start_export(self, what: str, work: Any, target: Path) -> Job:
        self.export_state.running = True
        self._update_buttons()
        self.export_progress.setRange(0, 0)
        self.export_status.setText(what + "...")

        def progress(done, total):
            self.export_progress.setRange(0, max(1, int(total)))
            self.export_progress.setValue(int(done))

        def done(result):
            self.export_progress.setRange(0, 1)
            self.export_progress.setValue(1)
            self.export_status.setText(f"Written: {result}")
            self.export_state.last_folder = str(Path(result).parent)
            _notify("info", f"Written: {result}")

        def failed(exc):
            self.export_progress.setRange(0, 1)
            self.export_progress.setValue(0)
            self._error(exc)
            self.export_status.setText("Failed: " + self.last_error)

        def end():
            self.export_state.running = False
            self.export_job = None
            self._update_buttons()

        self.last_error = ""
        self.export_job = start_job("export", work, on_result=done, on_error=failed, on_progress=progress, on_end=end)
        return self.export_job

    # =========================================================================== fine-tune
    def _on_train_mode(self, *_: Any) -> None:
        mode = self.train_mode.currentData()
        if mode and mode != self.train_state.mode:
            self.train_state.mode = mode
        self.low_combo.setEnabled(mode == "paired")
        if mode != "supervised":
            self.train_task.setCurrentIndex(self.train_task.findData("denoise"))
        self.train_task.setEnabled(mode == "supervised")
        self._refresh_train_models()

    def _refresh_train_models(self) -> None:
        if not hasattr(self, "base_combo"):
            return
        current = self.base_combo.currentData()
        self.base_combo.clear()
        self.base_combo.addItem("New network (from scratch)", AUTO_MODEL)
        try:
            cards = [c for c in self._all_cards() if c.task == self.train_state.task and c.dims == 2]
        except RestoreError:
            cards = []
        for c in cards:
            key = c.name if c.source in ("bundled", "user") else str(c.path.parent)
            self.base_combo.addItem(f"{c.name} v{c.version}", key)
            self.base_combo.setItemData(self.base_combo.count() - 1, card_html(c), Qt.ToolTipRole)
        i = self.base_combo.findData(current)
        self.base_combo.setCurrentIndex(max(0, i))

    def _browse_train_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Folder of training scans")
        if path:
            self.train_folder.setText(path)
            self.train_from_folder.setChecked(True)

    def _checked_train_layers(self) -> list[Any]:
        out = []
        for i in range(self.train_layers.count()):
            it = self.train_layers.item(i)
            if it.checkState() == Qt.Checked and it.text() in self.viewer.layers:
                out.append(self.viewer.layers[it.text()])
        return out

    def set_train_layers(self, names: list[str]) -> None:
        """Tick the training layers by name (the others are unticked)."""
        for i in range(self.train_layers.count()):
            it = self.train_layers.item(i)
            it.setCheckState(Qt.Checked if it.text() in names else Qt.Unchecked)
        self.train_from_layers.setChecked(True)

    def start_training(self, **overrides: Any) -> Job | None:
        """Fine-tune in a worker with the panel's settings; ``overrides`` go to ``TrainConfig``.

        Layers are written to a temporary folder as NIfTI (with their geometry) and passed as
        data; a single scan is split along z: its last fifth of slices validates.
        """
        if self.train_state.running:
            return None
        try:
            from ..training import TrainConfig

            t = self.train_state
            self._drop_train_tmp()
            self.train_result = None
            tmp = Path(tempfile.mkdtemp(prefix="napari-restore-train-"))
            self._train_tmp = tmp
            low: list[str] = []
            if self.train_from_folder.isChecked():
                if not t.folder or not Path(t.folder).exists():
                    raise InputError("choose an existing folder of scans", t.folder or None)
                data = [t.folder]
                sizes, val = None, []
            else:
                layers = self._checked_train_layers()
                if not layers:
                    raise InputError("tick at least one image layer to train on")
                from .. import save

                data, sizes, val = [], [], []
                for n, lay in enumerate(layers):
                    vol = L.layer_volume(lay)
                    sizes.append(min(np.shape(lay.data)[-2:]))
                    if len(layers) == 1 and t.mode != "paired" and vol.array.ndim == 3 and vol.array.shape[0] >= 5:
                        # one scan: hold out its last fifth of slices (a separate file) for validation
                        nz = vol.array.shape[0]
                        cut = nz - max(1, round(0.2 * nz))
                        for part, (a, b) in (("data", (0, cut)), ("val", (cut, nz))):
                            aff = vol.affine.copy()
                            aff[:3, 3] += a * aff[:3, 0]
                            p = tmp / f"{part}{n:02d}.nii.gz"
                            save(Volume(vol.array[a:b], aff, vol.modality, {"description": lay.name}), p)
                            (data if part == "data" else val).append(str(p))
                        continue
                    p = tmp / f"data{n:02d}.nii.gz"
                    save(vol, p)
                    data.append(str(p))
                if t.mode == "paired":
                    low_layer = self._layer(self.low_combo.currentText())
                    if low_layer is None or low_layer in layers:
                        raise InputError("paired mode: choose a low-dose layer that is not ticked as training data")
                    p = tmp / "low00.nii.gz"
                    from .. import save

                    save(L.layer_volume(low_layer), p)
                    low = [str(p)]
            name = t.name.strip() or "my-finetuned-model"
            cfg: dict[str, Any] = {
                "data": data, "output": str(tmp / name), "mode": t.mode, "task": t.task, "low_data": low,
                "epochs": t.epochs, "steps_per_epoch": t.steps_per_epoch, "name": name,
                "init_model": self.base_combo.currentData() or None, "tensorboard": False,
                "progress_bar": False, "batch_size": 8, "patience": 0,
                "description": f"fine-tuned in napari ({TRAIN_MODES[t.mode]})",
            }
            if sizes:
                side = max(32, min(128, min(sizes) // 16 * 16))
                cfg["patch_size"] = (side, side)
                cfg["val_crop"] = min(256, min(sizes))
                if val:
                    cfg["val_data"] = val
            cfg.update(overrides)
            config = TrainConfig(**cfg)
        except RestoreError as exc:
            self._error(exc)
            self.train_status.setText("Failed: " + self.last_error)
            return None
        except TypeError as exc:  # an unknown override
            self._error(InputError(f"training settings: {exc}"))
            return None
        self._train_log = Path(config.run_dir) / "log.csv" if config.run_dir else config.run_path / "log.csv"
        t.train_loss, t.val_loss = [], []
        self.curve.set_data([], [])
        self.train_result = None
        t.running = True
        self._update_buttons()
        self.train_progress.setRange(0, 0)
        self.train_status.setText("Preparing the data...")
        self.last_error = ""

        def work(progress, cancel):
            from ..training import train

            return train(config, progress=progress, cancel=cancel)

        def prog(step, total):
            self.train_progress.setRange(0, max(1, int(total)))
            self.train_progress.setValue(int(step))
            job = self.train_job
            eta = format_eta(job.elapsed() / step * (total - step)) if job is not None and step else "--:--"
            self.train_status.setText(f"step {step} / {total} · {eta} left")

        def done(result):
            self.train_result = result
            self._poll_train_log()
            best = result.best or {}
            vl = best.get("val_loss")
            self.train_status.setText(f"Trained {result.steps} steps in {result.seconds:.0f} s"
                                      + (f"; best validation loss {vl:.4g}" if vl is not None else "")
                                      + ". Save model to use it.")

        def cancelled(exc):
            self.train_status.setText("Stopped: no model was saved.")
            _notify("info", "Training stopped; no model was saved.")

        def failed(exc):
            self._error(exc)
            self.train_status.setText("Failed: " + self.last_error)

        def end():
            self._train_timer.stop()
            t.running = False
            self.train_job = None
            self.train_progress.setRange(0, 1)
            self.train_progress.setValue(1 if self.train_result is not None else 0)
            self._update_buttons()

        self.train_job = start_job("train", work, on_result=done, on_error=failed, on_cancelled=cancelled,
                                   on_progress=prog, on_end=end)
        self._train_timer.start()
        return self.train_job

    def _poll_train_log(self) -> None:
        path = getattr(self, "_train_log", None)
        if path is None or not path.is_file():
            return
        import csv

        train, val = [], []
        try:
            with open(path, newline="") as fh:
                for row in csv.DictReader(fh):
                    if str(row.get("epoch")) in ("0", ""):
                        continue
                    train.append(float(row["train_loss"]) if row.get("train_loss") else float("nan"))
                    val.append(float(row["val_loss"]) if row.get("val_loss") else float("nan"))
        except (OSError, ValueError, KeyError):
            return
        if train != self.train_state.train_loss or val != self.train_state.val_loss:
            self.train_state.train_loss, self.train_state.val_loss = train, val
            self.curve.set_data(train, val)

    def stop_training(self) -> None:
        """Stop the training run at its next step (no model is saved)."""
        if self.train_job is not None:
            self.train_job.cancel()
            self.train_status.setText("Stopping...")

    def save_trained_model(self, folder: str | Path | None = None, overwrite: bool = False) -> Path | None:
        """Copy the trained model (card + weights) into the user model folder; it appears in the lists at once."""
        from ..models import read_card, user_model_dirs

        res = self.train_result
        if res is None:
            _notify("warning", "Train a model first.")
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
            self._error(OutputError(f"cannot save the model: {exc}", dest))
            return None
        except RestoreError as exc:
            self._error(exc)
            return None
        self.refresh_models()
        if card.task == self.state.task:
            i = self.model_combo.findData(card.name)
            if i >= 0:
                self.model_combo.setCurrentIndex(i)
        self.train_status.setText(f"Saved {card.name} to {dest}; it is in the model list now.")
        _notify("info", f"Model {card.name!r} saved to {dest}")
        return dest

    def _drop_train_tmp(self) -> None:
        """Delete the previous run's temporary folder (layer copies, run logs, unsaved model)."""
        if self._train_tmp is not None and self.train_job is None:
            shutil.rmtree(self._train_tmp, ignore_errors=True)
            self._train_tmp = None

    # =========================================================================== teardown
    def closeEvent(self, event) -> None:  # noqa: N802 - Qt name
        save_settings(self._states)
        for job in (self.job, self.export_job, self.train_job):
            if job is not None:
                job.cancel()
        self._drop_train_tmp()
        super().closeEvent(event)


def make_widget(napari_viewer: Any) -> RestoreWidget:
    """npe2 widget factory."""
    return RestoreWidget(napari_viewer)


__all__ = ["RestoreWidget", "make_widget", "card_html"]
