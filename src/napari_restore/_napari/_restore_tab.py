"""The Restore tab: the input layer, task, model (with its collapsible card), mode, device,
strength and advanced settings; Preview slice, Restore volume and their job panel.

It edits :class:`._state.RestoreState` and announces a finished restoration through
``events.restored``; it never touches another tab's controls.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QButtonGroup, QComboBox, QFileDialog, QFormLayout, QHBoxLayout,
                            QLabel, QPushButton, QRadioButton, QSlider, QVBoxLayout, QWidget)

from ..errors import InputError, RestoreError
from ..geometry import largest_step
from . import _layers as L
from ._catalogue import AUTO_MODEL, ModelCatalogue
from ._common import Section, card_html, card_title, fill_combo, hint, layer_named, notify, primary
from ._jobs import JobPanel
from ._state import TASK_LABELS, TASKS, RestoreState, WidgetEvents, suggest_mode
from ._warmup import AdvancedOptions, ModelWarmer
from ._worker import Job

NO_LAYER = "Open a CT or MR series (File > Open Folder...) or a NIfTI file."


def available_devices() -> list[tuple[str, str]]:
    """``[(label, device)]``: Auto, CPU and every GPU torch sees."""
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


def device_text(device: str) -> str:
    """``"runs on: GPU 0 (name)"`` for a device choice (the error text when it is unusable)."""
    try:
        from ..inference import resolve_device

        dev = resolve_device(device)
        text = {"cpu": "CPU", "cuda": "GPU", "mps": "Apple GPU"}.get(dev.type, dev.type)
        if dev.type == "cuda":
            import torch

            idx = dev.index or 0
            text = f"GPU {idx} ({torch.cuda.get_device_name(idx)})"
        return f"runs on: {text}"
    except RestoreError as exc:
        return str(exc)


def current_plane(viewer: Any, layer: Any) -> tuple[dict[int, int], int]:
    """``({layer axis: index} of the non-displayed axes, the spatial slicing axis 0..2)``."""
    dims = viewer.dims
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


def add_or_update(viewer: Any, data: np.ndarray, kwargs: dict[str, Any]) -> Any:
    """Add an image layer, or refill the layer of that name (cheaper than remove + add)."""
    from napari.layers import Image

    old = layer_named(viewer, kwargs["name"])
    if isinstance(old, Image) and old.ndim == data.ndim:
        old.data = data
        for key in ("scale", "translate", "rotate", "shear", "affine", "metadata", "contrast_limits"):
            setattr(old, key, kwargs[key])
        old.refresh()
        return old
    if old is not None:
        viewer.layers.remove(old.name)
    return viewer.add_image(data, **kwargs)


def screen_plane(viewer: Any, layer: Any, volume: Any, slab: int) -> tuple[dict[int, int], Any, int, str]:
    """The plane on screen as a small Volume: ``(lead index, sub-volume, its centre, a note naming it)``;
    ``slab``: extra planes either side (what a 2.5-D or 3-D model reads)."""
    lead, axis = current_plane(viewer, layer)
    rec = L.record_of(layer) or {}
    axes = tuple(rec.get("layer_axes", (0, 1, 2))) if rec else (0, 1, 2)
    t = lead.get(0, 0) if layer.ndim == 4 else 0
    k = lead.get(max(0, layer.ndim - 3) + axis, 0) if layer.ndim >= 3 else 0
    sub, centre = L.plane_subvolume(volume, axes, axis, k, t, slab)
    return lead, sub, centre, L.preview_plane_note(volume, int(axes[axis]), k)


def layer_summary(layer: Any) -> str:
    """``"CT · 28 x 512 x 512 voxels · 5 x 0.45 x 0.45 mm · DICOM"``."""
    modality = L.layer_modality(layer)
    shape = " x ".join(str(s) for s in np.shape(layer.data))
    sp = " x ".join(f"{s:.3g}" for s in np.asarray(layer.scale)[-3:])
    rec = L.record_of(layer)
    src = "DICOM" if (rec or {}).get("meta", {}).get("dicom_header") is not None else ("file" if rec else "no source file")
    return f"{modality if modality != 'OT' else 'unknown modality'} · {shape} voxels · {sp} mm · {src}"


def layer_facts(layer: Any, modality: str) -> tuple[float | None, tuple[float, float, float]]:
    """``(slice distance, spacing)`` of a layer in mm (what Auto and the mode are chosen for)."""
    try:
        vol = L.layer_volume(layer, modality)
        return largest_step(vol), vol.spacing
    except RestoreError:
        sc = np.concatenate([np.ones(3), np.asarray(layer.scale, dtype=float)])[-3:]
        return (float(sc[0]) if layer.ndim >= 3 else None), tuple(sc)  # type: ignore[return-value]


class RestoreTab(QWidget):
    """Restore panel over ``state`` (:class:`RestoreState`) and the shared ``catalogue``."""

    def __init__(self, viewer: Any, state: RestoreState, catalogue: ModelCatalogue, events: WidgetEvents) -> None:
        super().__init__()
        self.viewer, self.state, self.catalogue, self.events = viewer, state, catalogue, events
        self.cards: dict[str, Any] = {}
        self.last_output: Any = None
        self.last_preview: Any = None
        self.warmer = ModelWarmer()
        self._mode_by_user = False
        self.jobs = JobPanel(with_cancel=False)
        self.jobs.running_changed.connect(self._on_running)
        self._build()

    # ------------------------------------------------------------------ building
    def _build(self) -> None:
        lay = QVBoxLayout(self)
        form = QFormLayout()
        form.setLabelAlignment(Qt.AlignRight)
        self.layer_combo = QComboBox()
        self.layer_combo.currentTextChanged.connect(self._on_layer_chosen)
        form.addRow("Image", self.layer_combo)
        self.layer_info = hint(NO_LAYER)
        form.addRow("", self.layer_info)
        self.modality_combo = QComboBox()
        for text, value in (("From the file", "auto"), ("CT (HU)", "CT"), ("MR", "MR")):
            self.modality_combo.addItem(text, value)
        self.modality_combo.setToolTip("The intensity model: taken from the DICOM/NIfTI header when known. "
                                       "Set it for images of unknown origin.")
        self.modality_combo.currentIndexChanged.connect(lambda _i: self.refresh_models())
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
        self.card_section = Section("Model card", self.model_info)  # collapsed: Restore stays in view
        form.addRow("", self.card_section)
        mode_row = QHBoxLayout()
        self.mode_2d = QRadioButton("Slice by slice (2D)")
        self.mode_3d = QRadioButton("3D")
        self.mode_group = QButtonGroup(self)
        for b, m in ((self.mode_2d, "2d"), (self.mode_3d, "3d")):
            self.mode_group.addButton(b)
            b.toggled.connect(lambda on, m=m: on and setattr(self.state, "mode", m))
            b.clicked.connect(lambda _c=False: setattr(self, "_mode_by_user", True))  # kept until the layer changes
            mode_row.addWidget(b)
        mode_row.addStretch()
        form.addRow("Mode", mode_row)
        self.mode_hint = hint()
        form.addRow("", self.mode_hint)
        dev_row = QHBoxLayout()
        self.device_combo = QComboBox()
        for text, value in available_devices():
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
        self.advanced = AdvancedOptions(self.state)
        self.batch_spin, self.tile_spin = self.advanced.batch_spin, self.advanced.tile_spin
        self.overlap_spin, self.ensemble_combo = self.advanced.overlap_spin, self.advanced.ensemble_combo
        lay.addWidget(self.advanced)
        btns = QHBoxLayout()
        self.preview_button = QPushButton("Preview slice")
        self.preview_button.setToolTip("Restore only the slice on screen (well under a second on a CPU once the "
                                       "model has run once, which it does in the background when chosen).")
        self.preview_button.clicked.connect(lambda: self.run_preview())
        self.run_button = primary(QPushButton("Restore volume"))
        self.run_button.clicked.connect(lambda: self.run_restore())
        self.cancel_button = self.jobs.cancel_button
        btns.addWidget(self.preview_button)
        btns.addWidget(self.run_button, 1)
        btns.addWidget(self.cancel_button)
        lay.addLayout(btns)
        lay.addWidget(self.jobs)
        lay.addStretch()

    # ------------------------------------------------------------------ state <-> view
    def sync_from_state(self) -> None:
        """Show every field of the state (after the settings are loaded)."""
        s = self.state
        self.task_combo.setCurrentIndex(max(0, TASKS.index(s.task) if s.task in TASKS else 0))
        i = self.device_combo.findData(s.device)
        self.device_combo.setCurrentIndex(max(i, 0))
        if i < 0:  # a remembered device this machine lacks (cuda:1 on a laptop): the state follows the view
            s.device = self.device_combo.currentData()
        self.strength_slider.setValue(int(round(s.strength * 100)))
        self.advanced.sync_from_state()
        self.refresh_models()
        self.device_label.setText(device_text(s.device))
        self.update_buttons()

    def on_state_changed(self, name: str) -> None:
        s = self.state
        if name == "task":
            i = self.task_combo.findData(s.task)
            if i >= 0 and i != self.task_combo.currentIndex():
                self.task_combo.setCurrentIndex(i)
            self.refresh_models()
        elif name == "device":
            self.device_label.setText(device_text(s.device))
            self.warm_up()
        elif name == "mode":
            (self.mode_3d if s.mode == "3d" else self.mode_2d).setChecked(True)
            if s.model == AUTO_MODEL:  # Auto picks per mode: say which, and warm that one
                self._show_card(*self.catalogue.auto_note(s.task, self.modality(), s.mode, self._volume_facts()[0],
                                                          len(self.cards)))
                self.warm_up()
        elif name == "strength":
            self.strength_slider.setValue(int(round(s.strength * 100)))

    def _on_strength(self, v: int) -> None:
        self.strength_label.setText(f"{v} %")
        if abs(self.state.strength - v / 100.0) > 1e-9:
            self.state.strength = v / 100.0

    def _on_running(self, running: bool) -> None:
        self.state.running = running
        self.update_buttons()

    def update_buttons(self) -> None:
        running = self.jobs.running
        has_layer = self.input_layer() is not None
        self.run_button.setEnabled(not running and has_layer)
        self.preview_button.setEnabled(not running and has_layer)
        self.cancel_button.setEnabled(running)

    # ------------------------------------------------------------------ layers
    def input_layer(self) -> Any:
        return layer_named(self.viewer, self.layer_combo.currentText())

    def refresh_layers(self, names: list[str], new_data: bool) -> None:
        """The viewer's image layers changed; ``new_data``: a layer that is not a result was added."""
        if not self.layer_combo.currentText() and names:
            active = self.viewer.layers.selection.active
            target = active.name if active is not None and active.name in names else names[0]
        else:
            target = None
        fill_combo(self.layer_combo, names, target)
        if new_data and not self.jobs.running:  # a previous series' result no longer describes the view
            self.jobs.set_status("Ready")
            self.jobs.progress_bar.setFormat("")
            self.jobs.progress_bar.setValue(0)
        name = self.layer_combo.currentText()
        if (name or None) != self.state.layer:  # the same input keeps the modality and mode the user set
            self._on_layer_chosen(name)
        else:
            self.update_buttons()

    def on_active_layer(self, active: Any) -> None:
        if active is not None and self.layer_combo.findText(active.name) >= 0 and not self.jobs.running \
                and not (L.record_of(active) or {}).get("source"):
            self.layer_combo.setCurrentText(active.name)

    def select_layer(self, name: str) -> None:
        """Choose the input image layer by name."""
        if self.layer_combo.findText(name) < 0:
            raise InputError(f"no image layer named {name!r}")
        self.layer_combo.setCurrentText(name)
        self._on_layer_chosen(name)

    def _on_layer_chosen(self, name: str) -> None:
        layer = layer_named(self.viewer, name)
        self._mode_by_user = False
        self.state.layer = name or None
        if layer is None:
            self.layer_info.setText(NO_LAYER)
            self.update_buttons()
            return
        self.layer_info.setText(layer_summary(layer))
        self.modality_combo.blockSignals(True)
        self.modality_combo.setCurrentIndex(0)
        self.modality_combo.blockSignals(False)
        self.refresh_models()
        self.update_buttons()

    def modality(self) -> str:
        """The chosen modality, else the input layer's (``"OT"`` when unknown)."""
        choice = self.modality_combo.currentData()
        if choice and choice != "auto":
            return choice
        layer = self.input_layer()
        return L.layer_modality(layer) if layer is not None else "OT"

    def _volume_facts(self) -> tuple[float | None, tuple[float, float, float] | None]:
        layer = self.input_layer()
        return layer_facts(layer, self.modality()) if layer is not None else (None, None)

    # ------------------------------------------------------------------ models
    def refresh_models(self) -> None:
        """Refill the model list for the task and modality (keeps the choice when it is still there)."""
        task, modality = self.state.task, self.modality()
        choices = self.catalogue.choices(task, modality)
        self.cards = {c.key: c.card for c in choices}
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        self.model_combo.addItem("Auto: best per step" if task == "restore" else "Auto: best installed", AUTO_MODEL)
        for c in choices:
            self.model_combo.addItem(c.label, c.key)
            self.model_combo.setItemData(self.model_combo.count() - 1, card_html(c.card), Qt.ToolTipRole)
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
        card = self.cards.get(key)
        if card is not None:
            self._show_card(card_html(card), card_title(card))
            self.model_combo.setToolTip(card_html(card))
            self._set_mode("3d" if card.dims == 3 else "2d", f"{card.name} is a {card.dims}-D model")
            self.mode_2d.setEnabled(card.dims == 2)
            self.mode_3d.setEnabled(card.dims == 3)
            self.warm_up()
            return
        self.mode_2d.setEnabled(True)
        self.mode_3d.setEnabled(True)
        distance, spacing = self._volume_facts()
        if spacing is not None and not self._mode_by_user:
            self._set_mode(*suggest_mode(spacing, any(c.dims == 3 for c in self.cards.values())))
        self._show_card(*self.catalogue.auto_note(self.state.task, self.modality(), self.state.mode, distance,
                                                  len(self.cards)))
        self.model_combo.setToolTip("")
        self.warm_up()

    def _show_card(self, html: str, title: str, expand: bool = False) -> None:
        self.model_info.setText(html)
        self.card_section.set_title(title)
        if expand:
            self.card_section.button.setChecked(True)

    def _set_mode(self, mode: str, why: str) -> None:
        self.state.mode = mode
        (self.mode_3d if mode == "3d" else self.mode_2d).setChecked(True)
        self.mode_hint.setText(why)

    def _on_model_activated(self, index: int) -> None:
        if self.model_combo.itemData(index) != "__load__":
            return
        path = QFileDialog.getExistingDirectory(self, "Model folder (card.json + model.pt) or MONAI bundle")
        try:
            if path:
                self.add_model_path(path)
                return
        except RestoreError as exc:
            self.jobs.show_error(exc)
        self.refresh_models()

    def add_model_path(self, path: str | Path) -> Any:
        """Add a model folder / file (or a MONAI bundle folder) to the list and select it; returns its card.

        Raises:
            ModelError: not a model (the message names the file and the problem).
        """
        key, card = self.catalogue.add_path(path)
        if key not in self.state.extra_models:
            self.state.extra_models = [*self.state.extra_models, key]
        if card.task != self.state.task:
            self.state.task = card.task  # refreshes the list
        self.refresh_models()
        i = self.model_combo.findData(key)
        if i >= 0:
            self.model_combo.setCurrentIndex(i)
        self.events.models_changed.emit()
        return card

    def restore_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :func:`napari_restore.restore` for the panel's choices."""
        return self.state.to_options(self.catalogue.model_arg(self.state.model)).to_dict()

    def warm_up(self) -> Job | None:
        """Load and run the chosen model in the background (see :class:`ModelWarmer`)."""
        layer = self.input_layer()
        if layer is None or self.state.task == "enhance":
            return None
        try:
            return self.warmer.warm(layer.name, L.layer_volume(layer, self.modality()), self.restore_kwargs())
        except RestoreError:
            return None

    # ------------------------------------------------------------------ restore and preview
    def _volume(self, what: str) -> Any:
        layer = self.input_layer()
        if layer is None:
            raise InputError(f"choose an image layer to {what}")
        return layer, L.layer_volume(layer, self.modality())

    def run_restore(self) -> Job | None:
        """Restore the whole input layer in a worker; the result becomes a new layer. Returns the job."""
        if self.jobs.running:
            return None
        try:
            layer, volume = self._volume("restore")
            kwargs = self.restore_kwargs()
        except RestoreError as exc:
            self.jobs.show_error(exc)
            return None
        name = L.output_name(layer.name, kwargs["task"], volume.modality)
        layer_name = layer.name

        def work(progress, cancel):
            from .. import restore

            return restore(volume, progress=progress, cancel=cancel, **kwargs)

        def done(result):
            src = layer_named(self.viewer, layer_name)
            if src is None:
                notify("warning", f"{layer_name!r} was removed while it was restored; the result is not shown.")
                return f"{layer_name!r} was removed: nothing was added."
            lk = L.output_layer_kwargs(src, result, name)
            self.last_output = add_or_update(self.viewer, L.output_layer_data(src, result), lk)
            prov = lk["metadata"][L.LAYER_META_KEY]["provenance"]
            self.viewer.layers.selection.active = self.viewer.layers[layer_name]
            self.events.restored.emit(layer_name, name)
            for w in prov.get("warnings", []):
                notify("warning", w)
            msg = f"{name}: {prov.get('model')} on {prov.get('device')} in {prov.get('seconds', 0):.1f} s"
            return msg + (f" · warning: {prov['warnings'][0]}" if prov.get("warnings") else "")

        def cancelled():
            notify("info", f"Restoration of {layer_name!r} cancelled; nothing was added.")
            return "Cancelled: no layer was added."

        unit = "slices" if self.state.mode == "2d" else "windows"
        return self.jobs.start(f"Restoring {layer_name}", work, on_result=done, on_cancelled=cancelled, unit=unit)

    def run_preview(self) -> Job | None:
        """Restore only the plane on screen, as a one-plane layer ``"<name> [preview]"``."""
        if self.jobs.running:
            return None
        try:
            layer, volume = self._volume("preview")
            slab = 8 if self.state.mode == "3d" else self.catalogue.context_slices(
                self.state.model, self.state.task, self.modality(), largest_step(volume), self.cards)
            lead, sub, centre, plane_note = screen_plane(self.viewer, layer, volume, slab)
            kwargs = self.restore_kwargs()
        except RestoreError as exc:
            self.jobs.show_error(exc)
            return None
        name, layer_name = f"{layer.name} [preview]", layer.name
        shape_in, linear = np.shape(layer.data), L.data_linear(layer)

        def work(progress, cancel):
            from .. import restore

            t0 = time.perf_counter()
            out = restore(sub, progress=progress, cancel=cancel, **kwargs)
            return out, time.perf_counter() - t0

        def done(res):
            out, secs = res
            src = layer_named(self.viewer, layer_name)
            if src is None:
                return f"{layer_name!r} was removed: no preview."
            data = out.array[centre].reshape([1 if a in lead else n for a, n in enumerate(shape_in)])
            prov = (out.meta.get("provenance") or [{}])[-1]
            pk = L.preview_layer_kwargs(src, name, lead, linear, {"source": layer_name, "index": lead, "provenance": prov})
            self.last_preview = add_or_update(self.viewer, data, pk)
            self.viewer.layers.selection.active = self.viewer.layers[layer_name]
            self.jobs.progress_bar.setFormat(f"Preview · {secs * 1000:.0f} ms")
            return f"Preview of {plane_note}: {prov.get('model')} in {secs * 1000:.0f} ms"

        return self.jobs.start("Preview", work, on_result=done, on_cancelled=lambda: "Preview cancelled.")
