"""The Compare & measure tab: side by side, blend, the difference layer, ROI statistics and the
slice noise estimate, for a restored layer and its input.

Layers are handled by name (the plugin's viewer is napari's public-only proxy, whose layer
objects are new wrappers on every access). It follows ``events.restored`` to pick the pair.
"""
from __future__ import annotations

from typing import Any

import numpy as np
from psygnal import Signal
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QAbstractItemView, QComboBox, QFormLayout, QGroupBox, QHBoxLayout, QHeaderView,
                            QLabel, QPushButton, QSlider, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from ..errors import InputError, RestoreError
from . import _layers as L
from ._common import ERROR_STYLE, HINT_STYLE, fill_combo, hint, layer_named, notify
from ._roi import RoiRow, roi_table, slice_noise
from ._restore_tab import current_plane
from ._state import CompareState

ROI_LAYER = "ROI"


class CompareTab(QWidget):
    """Compare panel over ``state`` (:class:`CompareState`)."""

    def __init__(self, viewer: Any, state: CompareState) -> None:
        super().__init__()
        self.viewer, self.state = viewer, state
        self.roi_rows: list[RoiRow] = []
        self.slice_noise_values: tuple[float | None, float | None] = (None, None)
        self._saved_visibility: dict[str, bool] | None = None
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.cmp_input = QComboBox()
        self.cmp_output = QComboBox()
        self.cmp_output.currentTextChanged.connect(self._on_output)
        self.cmp_input.currentTextChanged.connect(lambda _t: self.changed())
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
        for b in (self.grid_button, self.blend_button, self.diff_button):
            row.addWidget(b)
        lay.addLayout(row)
        brow = QHBoxLayout()
        brow.addWidget(QLabel("input"))
        self.blend_slider = QSlider(Qt.Horizontal)
        self.blend_slider.setRange(0, 100)
        self.blend_slider.setValue(50)
        self.blend_slider.setEnabled(False)
        self.blend_slider.valueChanged.connect(lambda v: setattr(self.state, "blend", v / 100.0))
        brow.addWidget(self.blend_slider, 1)
        brow.addWidget(QLabel("restored"))
        lay.addLayout(brow)
        lay.addWidget(self._build_roi_box())
        self.status_label = hint()
        lay.addWidget(self.status_label)
        lay.addStretch()
        self.state.events.blend.connect(self._apply_blend)

    def _build_roi_box(self) -> QGroupBox:
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
        bl.addWidget(hint("SD inside each shape on its slice; noise reduction = 1 - SD restored / SD input. "
                          "Slice noise: mode of local 5x5 SDs (soft tissue 0-100 HU for CT)."))
        return box

    # ------------------------------------------------------------------ signals
    #: asks for the ROI statistics to be recomputed soon (the assembler schedules it: ~0.1 s each)
    roi_requested = Signal()

    def changed(self, *_args: Any) -> None:
        self.roi_requested.emit()

    def _say(self, text: str, error: bool = False) -> None:
        self.status_label.setStyleSheet(ERROR_STYLE if error else HINT_STYLE)
        self.status_label.setText(text)

    def refresh_layers(self, names: list[str], restored: list[str]) -> None:
        fill_combo(self.cmp_input, names)
        fill_combo(self.cmp_output, restored)
        self._on_output(self.cmp_output.currentText())

    def on_restored(self, input_name: str, output_name: str) -> None:
        """A restoration finished: compare its result with its input."""
        self.cmp_output.setCurrentText(output_name)
        self.cmp_input.setCurrentText(input_name)

    def _on_output(self, name: str) -> None:
        out = layer_named(self.viewer, name)
        src = (L.record_of(out) or {}).get("source", {}) if out is not None else {}
        if src.get("layer") and self.cmp_input.findText(src["layer"]) >= 0:
            self.cmp_input.setCurrentText(src["layer"])
        self.changed()

    def pair(self) -> tuple[Any, Any]:
        """``(input layer, restored layer)``; either is None when missing."""
        return layer_named(self.viewer, self.cmp_input.currentText()), layer_named(self.viewer, self.cmp_output.currentText())

    def checked_pair(self, what: str) -> tuple[Any, Any] | None:
        """The pair, or None after saying why it cannot be compared (missing, the same layer, its
        recorded input removed)."""
        inp, out = self.pair()
        why = ""
        if out is None:
            why = f"Restore a layer first: {what} needs an input and a restored layer."
        elif inp is None or inp.name == out.name:
            src = (L.record_of(out) or {}).get("source", {}).get("layer")
            why = (f"The input layer {src!r} of {out.name!r} was removed: {what} needs it." if src
                   else f"Choose the input layer to compare {out.name!r} with.")
        if why:
            notify("warning", why)
            self._say(why, error=True)
            return None
        self._say("")
        return inp, out

    # ------------------------------------------------------------------ views
    def show_side_by_side(self, on: bool = True) -> None:
        """Input and restored in a 1 x 2 grid (one camera: pan, zoom and slice are linked)."""
        pair = self.checked_pair("side by side") if on else self.pair()
        if on and pair is None:
            self.grid_button.setChecked(False)
            return
        inp, out = pair
        if on:
            self.blend_button.setChecked(False)
            self._show_only(inp, out)
            out.opacity = 1.0
            self.viewer.grid.shape = (1, 2)
            self.viewer.grid.stride = 1
            self.viewer.grid.enabled = True
            self.state.view = "grid"
        else:
            self.viewer.grid.enabled = False
            self._restore_visibility()
            self.state.view = "off"
        if self.grid_button.isChecked() != on:
            self.grid_button.setChecked(on)

    def show_blend(self, on: bool = True) -> None:
        """Restored over input, faded by the blend slider."""
        pair = self.checked_pair("blending") if on else self.pair()
        if on and pair is None:
            self.blend_button.setChecked(False)
            return
        inp, out = pair
        self.blend_slider.setEnabled(on)
        if on:
            self.grid_button.setChecked(False)
            self._show_only(inp, out)
            layers = self.viewer.layers
            names = [lay.name for lay in layers]
            if names.index(out.name) < names.index(inp.name):
                layers.move(names.index(out.name), names.index(inp.name) + 1)
            out.blending = "translucent"
            out.opacity = self.state.blend
            self.state.view = "blend"
        else:
            if out is not None:
                out.opacity = 1.0
            self._restore_visibility()
            self.state.view = "off"
        if self.blend_button.isChecked() != on:
            self.blend_button.setChecked(on)

    def _apply_blend(self, value: float) -> None:
        _inp, out = self.pair()
        if out is not None and self.state.view == "blend":
            out.opacity = float(value)

    def _show_only(self, inp: Any, out: Any) -> None:
        """Hide every layer but the pair (remembering what was visible, for when the view is turned off)."""
        if self._saved_visibility is None:
            self._saved_visibility = {lay.name: lay.visible for lay in self.viewer.layers}
        keep = {inp.name, out.name}
        for lay in self.viewer.layers:
            lay.visible = lay.name in keep

    def _restore_visibility(self) -> None:
        if self._saved_visibility is None or self.grid_button.isChecked() or self.blend_button.isChecked():
            return
        for name, vis in self._saved_visibility.items():
            if name in self.viewer.layers:
                self.viewer.layers[name].visible = vis
        self._saved_visibility = None

    def add_difference_layer(self) -> Any:
        """Add ``restored - input`` (same geometry) with a diverging colour map; returns the layer."""
        pair = self.checked_pair("the difference")
        if pair is None:
            return None
        inp, out = pair
        if np.shape(inp.data) != np.shape(out.data):
            msg = str(InputError(f"{out.name!r} and {inp.name!r} differ in shape"))
            notify("error", msg)
            self._say(msg, error=True)
            return None
        diff = np.asarray(out.data, dtype=np.float32) - np.asarray(inp.data, dtype=np.float32)
        sample = np.abs(diff[..., ::4, ::4])
        lim = max(float(np.percentile(sample, 99.5)) if sample.size else 1.0, 1e-3)
        name = f"{out.name} - input"
        if name in self.viewer.layers:
            self.viewer.layers.remove(name)
        kw = {"scale": np.asarray(out.scale), "translate": np.asarray(out.translate), "rotate": np.asarray(out.rotate),
              "shear": np.asarray(out.shear), "affine": np.asarray(out.affine.affine_matrix)}
        rec = dict(L.record_of(out) or {})
        rec["difference_of"] = [out.name, inp.name]
        return self.viewer.add_image(diff, name=name, colormap="PiYG", contrast_limits=(-lim, lim),
                                     metadata={L.LAYER_META_KEY + "_difference": rec}, **kw)

    # ------------------------------------------------------------------ ROI statistics
    def add_roi_layer(self, kind: str = "ellipse") -> Any:
        """Add (or reuse) the ``ROI`` shapes layer on the input's geometry, in draw-``kind`` mode."""
        inp, _out = self.pair()
        if inp is None:
            notify("warning", "Open an image first.")
            return None
        if ROI_LAYER in self.viewer.layers:
            shapes = self.viewer.layers[ROI_LAYER]
        else:
            shapes = self.viewer.add_shapes(
                ndim=inp.ndim, name=ROI_LAYER, scale=np.asarray(inp.scale), translate=np.asarray(inp.translate),
                rotate=np.asarray(inp.rotate), shear=np.asarray(inp.shear), affine=np.asarray(inp.affine.affine_matrix),
                edge_color="yellow", face_color="transparent", edge_width=2)
            shapes.events.data.connect(self.changed)
            shapes.events.set_data.connect(self.changed)
        self.viewer.layers.selection.active = shapes
        shapes.mode = "add_ellipse" if kind == "ellipse" else "add_rectangle"
        return shapes

    def update_roi_stats(self) -> list[RoiRow]:
        """Recompute the ROI table and the slice noise estimate; returns the rows."""
        inp, out = self.pair()
        if out is not None and inp is not None and out.name == inp.name:
            out = None  # never a layer against itself
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
        self._slice_noise(inp, restored, modality, unit)
        return self.roi_rows

    def _slice_noise(self, inp: Any, restored: Any, modality: str, unit: str) -> None:
        try:
            lead, _axis = current_plane(self.viewer, inp)
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
