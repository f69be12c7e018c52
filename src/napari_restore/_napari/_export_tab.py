"""The Export tab: a layer as a derived DICOM series (in its source's study) or as NIfTI, with a
series description and optional de-identification; says why a layer cannot go to DICOM.

It follows ``events.restored`` to offer the new result; it never changes the choice because some
other layer (a difference image, an ROI) was added.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
from qtpy.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QHBoxLayout, QLineEdit, QMessageBox,
                            QPushButton, QVBoxLayout, QWidget)

from ..errors import OutputError, RestoreError
from . import _layers as L
from ._common import fill_combo, hint, layer_named, notify, primary
from ._jobs import JobPanel
from ._state import ExportState
from ._worker import Job

_EXPORT_FILE = re.compile(r"IM\d{5}\.dcm")


def dicom_export_problem(layer: Any) -> str:
    """Why ``layer`` cannot be written as a derived DICOM series (``""`` when it can)."""
    meta = getattr(layer, "metadata", None) or {}
    if L.LAYER_META_KEY + "_difference" in meta:
        return f"{layer.name!r} is a difference image, not an image of the patient: save it as NIfTI."
    if L.LAYER_META_KEY + "_preview" in meta:
        return f"{layer.name!r} is a one-slice preview: restore the volume to export it."
    rec = L.record_of(layer)
    if rec is None:
        return f"layer {layer.name!r} does not come from a DICOM series (it has no source file): save it as NIfTI."
    if (rec.get("meta") or {}).get("dicom_header") is None:
        src = str((rec.get("meta") or {}).get("source_path") or "").lower()
        kind = next((k for ext, k in ((".nii", "NIfTI"), (".nii.gz", "NIfTI"), (".mha", "MetaImage"),
                                      (".mhd", "MetaImage"), (".nrrd", "NRRD"), (".nhdr", "NRRD")) if src.endswith(ext)),
                    "non-DICOM")
        return f"layer {layer.name!r} does not come from a DICOM series (its source is a {kind} file): save it as NIfTI."
    return ""


def export_volume(layer: Any) -> Any:
    """The Volume to write for ``layer`` (its record's geometry and DICOM source when it has one)."""
    from ..volume import Volume

    data = np.asarray(layer.data)
    if data.ndim == 2:
        data = data[None]
    if L.record_of(layer) is not None:
        return Volume.from_layer(data, layer.metadata)
    return L.layer_volume(layer)


def deidentify_supported() -> bool:
    import inspect

    from .. import save
    from ..io.dicom_write import write_dicom_series

    return any("deidentify" in inspect.signature(f).parameters for f in (save, write_dicom_series))


class ExportTab(QWidget):
    """Export panel over ``state`` (:class:`ExportState`)."""

    def __init__(self, viewer: Any, state: ExportState) -> None:
        super().__init__()
        self.viewer, self.state = viewer, state
        self.jobs = JobPanel(unit="files", with_cancel=False)
        self.jobs.running_changed.connect(self._on_running)
        lay = QVBoxLayout(self)
        form = QFormLayout()
        self.export_combo = QComboBox()
        self.export_combo.currentTextChanged.connect(self._on_layer)
        form.addRow("Layer", self.export_combo)
        self.series_edit = QLineEdit()
        self.series_edit.setPlaceholderText("the source's description + [task]")
        self.series_edit.textChanged.connect(lambda t: setattr(self.state, "series_description", t))
        form.addRow("Series description", self.series_edit)
        self.deid_check = QCheckBox("De-identify (remove patient identifiers)")
        self.deid_check.toggled.connect(lambda on: setattr(self.state, "deidentify", bool(on)))
        form.addRow("", self.deid_check)
        lay.addLayout(form)
        row = QHBoxLayout()
        self.dicom_button = primary(QPushButton("Export DICOM series..."))
        self.dicom_button.setToolTip("A new derived series in the source's study (same patient, frame of "
                                     "reference, geometry); only for layers that come from DICOM.")
        self.dicom_button.clicked.connect(self._ask_export_dicom)
        self.nifti_button = QPushButton("Save NIfTI...")
        self.nifti_button.clicked.connect(self._ask_save_nifti)
        row.addWidget(self.dicom_button)
        row.addWidget(self.nifti_button)
        row.addWidget(self.jobs.cancel_button)
        lay.addLayout(row)
        self.dicom_note = hint()
        lay.addWidget(self.dicom_note)
        lay.addWidget(self.jobs)
        self.export_progress, self.export_status = self.jobs.progress_bar, self.jobs.status_label
        lay.addStretch()

    def sync_from_state(self) -> None:
        ok = deidentify_supported()
        self.deid_check.setChecked(self.state.deidentify and ok)
        self.deid_check.setEnabled(ok)
        if not ok:
            self.deid_check.setToolTip("Not available in this version of napari-restore.")
        self.update_buttons()

    def _on_running(self, running: bool) -> None:
        self.state.running = running
        self.update_buttons()

    def export_layer(self) -> Any:
        return layer_named(self.viewer, self.export_combo.currentText())

    def refresh_layers(self, names: list[str]) -> None:
        exportable = [n for n in names if not (layer_named(self.viewer, n).metadata or {}).get(L.LAYER_META_KEY + "_difference")]
        fill_combo(self.export_combo, exportable + [n for n in names if n not in exportable])
        self._on_layer(self.export_combo.currentText())

    def on_restored(self, input_name: str, output_name: str) -> None:
        self.export_combo.setCurrentText(output_name)

    def _on_layer(self, name: str) -> None:
        layer = layer_named(self.viewer, name)
        if layer is not None:
            self.series_edit.setPlaceholderText(f"default: {self._default_description(layer)}")
        self.update_buttons()

    def update_buttons(self) -> None:
        exp = self.export_layer()
        busy = self.jobs.running
        problem = dicom_export_problem(exp) if exp is not None else ""
        self.dicom_button.setEnabled(not busy and exp is not None and not problem)
        self.nifti_button.setEnabled(not busy and exp is not None)
        self.dicom_note.setText(("DICOM export is off: " + problem) if problem else "")
        self.dicom_note.setVisible(bool(problem))

    @staticmethod
    def _default_description(layer: Any) -> str:
        rec = L.record_of(layer) or {}
        prov = rec.get("provenance") or {}
        desc = (rec.get("meta") or {}).get("description") or layer.name
        return f"{desc} [{prov.get('task', 'restored')}]" if prov else desc

    # ------------------------------------------------------------------ dialogs
    def _start_folder(self) -> Path:
        return Path(self.state.last_folder or str(Path.home()))

    def _ask_export_dicom(self) -> None:
        layer = self.export_layer()
        if layer is None:
            return
        suggested = re.sub(r"[^A-Za-z0-9._-]+", "_", layer.name).strip("_") or "restored"
        path, _ = QFileDialog.getSaveFileName(self, "New folder for the DICOM series",
                                              str(self._start_folder() / suggested), "Folder (*)",
                                              options=QFileDialog.DontConfirmOverwrite)
        if not path:
            return
        folder = Path(path)
        overwrite = False
        if folder.exists():
            others = [p.name for p in folder.iterdir()] if folder.is_dir() else [folder.name]
            if not folder.is_dir() or any(not _EXPORT_FILE.fullmatch(n) for n in others):
                self.jobs.show_error(OutputError("exists and holds other files; choose a new folder name", folder))
                return
            answer = QMessageBox.question(self, "Replace series?",
                                          f"{folder} holds an earlier export ({len(others)} files). Replace it?")
            if answer != QMessageBox.Yes:
                return
            overwrite = True
        self.export_dicom(folder, overwrite=overwrite)

    def _ask_save_nifti(self) -> None:
        layer = self.export_layer()
        if layer is None:
            return
        suggested = re.sub(r"[^A-Za-z0-9._-]+", "_", layer.name).strip("_") + ".nii.gz"
        path, _ = QFileDialog.getSaveFileName(self, "Save NIfTI", str(self._start_folder() / suggested),
                                              "NIfTI (*.nii.gz *.nii)")
        if path:  # the dialog itself asked before replacing an existing file
            if not path.endswith((".nii", ".nii.gz")):
                path += ".nii.gz"
            self.save_nifti(path, overwrite=Path(path).exists())

    # ------------------------------------------------------------------ jobs
    def dicom_kwargs(self, layer: Any, folder: Path, overwrite: bool) -> dict[str, Any]:
        """``save(..., format="dicom")`` arguments for ``layer`` (raises the reason it cannot be written)."""
        problem = dicom_export_problem(layer)
        if problem:
            raise OutputError(problem, folder)
        kwargs: dict[str, Any] = {"format": "dicom", "overwrite": overwrite,
                                  "series_description": self.state.series_description.strip()
                                  or self._default_description(layer)}
        if self.state.deidentify:
            if not deidentify_supported():
                raise OutputError("de-identification is not available in this version; untick it to export", folder)
            kwargs["deidentify"] = True
        return kwargs

    def export_dicom(self, folder: str | Path, overwrite: bool = False) -> Job | None:
        """Write the export layer as a derived DICOM series into ``folder`` (a worker; returns the job).

        An existing ``folder`` is an error unless ``overwrite`` (the button asks first).
        """
        layer = self.export_layer()
        folder = Path(folder)
        try:
            if layer is None:
                raise OutputError("choose a layer to export", folder)
            kwargs = self.dicom_kwargs(layer, folder, overwrite)
            volume = export_volume(layer)
        except RestoreError as exc:
            self.jobs.show_error(exc)
            return None

        def work(progress, cancel):
            from .. import save

            return save(volume, folder, progress=progress, cancel=cancel, **kwargs)

        return self._start(f"DICOM series -> {folder.name}", work)

    def save_nifti(self, path: str | Path, overwrite: bool = False) -> Job | None:
        """Save the export layer as NIfTI (a worker; returns the job). Never replaces a file unless ``overwrite``."""
        layer = self.export_layer()
        path = Path(path)
        try:
            if layer is None:
                raise OutputError("choose a layer to save", path)
            volume = export_volume(layer)
        except RestoreError as exc:
            self.jobs.show_error(exc)
            return None

        def work(progress, cancel):
            from .. import save

            return save(volume, path, overwrite=overwrite)

        return self._start(f"NIfTI -> {path.name}", work)

    def _start(self, what: str, work: Any) -> Job | None:
        def done(result):
            self.state.last_folder = str(Path(result).parent)
            notify("info", f"Written: {result}")
            return f"Written: {result}"

        return self.jobs.start(what, work, on_result=done, on_cancelled=lambda: "Cancelled: nothing was written.")
