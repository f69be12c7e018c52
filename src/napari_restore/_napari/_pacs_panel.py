"""The PACS dock widget: pick a configured server, query it, retrieve a series as a layer, and send a
restored layer back as a derived DICOM series.

Every network step runs through one :class:`._jobs.JobPanel` (progress, ETA, Cancel, the error in
the status line). A retrieve opens its layers only when the whole series arrived: a partial one is
reported and nothing is added. "Send to PACS" writes the same derived series as "Export DICOM"
(optionally de-identified) and reports the instances stored and refused. The query/retrieve/send
logic is Qt-free in :mod:`napari_restore.pacs`; layers are handled by name (the plugin viewer proxy).
"""
from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QFormLayout, QGroupBox, QHBoxLayout,
                            QHeaderView, QLineEdit, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout,
                            QWidget)

from ..errors import InputError, RestoreError
from . import _layers as L
from ._common import fill_combo, hint, image_layer_names, layer_named, notify, primary
from ._export_tab import ExportTab, deidentify_supported, dicom_export_problem, export_volume
from ._jobs import JobPanel
from ._worker import Job

MODALITIES = ("", "CT", "MR", "PT", "CR", "DX", "US", "NM", "XA", "MG")


def _table_columns() -> tuple[tuple[str, str], ...]:
    from ..pacs.workflow import TABLE_COLUMNS

    return TABLE_COLUMNS


class PacsPanel(QWidget):
    """Query/retrieve/send panel. Public for scripts and tests: ``search()``, ``retrieve(row=None)``,
    ``send()``, ``rows`` (the last query's results as DICOM keyword dicts), ``jobs`` (the JobPanel),
    ``last_sent`` (``(SendResult, SeriesInstanceUID)`` of the last send)."""

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.rows: list[dict[str, Any]] = []
        self.last_sent: tuple[Any, str] | None = None
        self.jobs = JobPanel(unit="instances")
        self.jobs.running_changed.connect(lambda _r: self.update_buttons())
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)

        row = QHBoxLayout()
        self.server_combo = QComboBox()
        self.server_combo.setToolTip("Servers configured with `napari-restore pacs add` (pacs.json)")
        self.server_combo.currentTextChanged.connect(lambda _t: self.update_buttons())
        self.reload_button = QPushButton("Reload")
        self.reload_button.setToolTip("Read the server list again")
        self.reload_button.clicked.connect(self.reload_servers)
        row.addWidget(self.server_combo, 1)
        row.addWidget(self.reload_button)
        form = QFormLayout()
        form.addRow("Server", row)
        self.patient_edit = QLineEdit(placeholderText="name, wildcards * ?")
        self.patient_id_edit = QLineEdit(placeholderText="exact ID")
        self.date_from = QLineEdit(placeholderText="YYYYMMDD")
        self.date_to = QLineEdit(placeholderText="YYYYMMDD")
        dates = QHBoxLayout()
        dates.addWidget(self.date_from)
        dates.addWidget(hint("to"))
        dates.addWidget(self.date_to)
        self.modality_combo = QComboBox()
        self.modality_combo.setEditable(True)
        self.modality_combo.addItems(MODALITIES)
        self.description_edit = QLineEdit(placeholderText="text in the series description")
        form.addRow("Patient", self.patient_edit)
        form.addRow("Patient ID", self.patient_id_edit)
        form.addRow("Study date", dates)
        form.addRow("Modality", self.modality_combo)
        form.addRow("Description", self.description_edit)
        for edit in (self.patient_edit, self.patient_id_edit, self.date_from, self.date_to, self.description_edit):
            edit.returnPressed.connect(self.search)
        lay.addLayout(form)

        self.search_button = primary(QPushButton("Search"))
        self.search_button.clicked.connect(self.search)
        lay.addWidget(self.search_button)
        cols = _table_columns()
        self.table = QTableWidget(0, len(cols))
        self.table.setHorizontalHeaderLabels([h for h, _k in cols])
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setMinimumHeight(160)
        self.table.cellDoubleClicked.connect(lambda r, _c: self.retrieve(r))
        self.table.itemSelectionChanged.connect(self.update_buttons)
        lay.addWidget(self.table, 1)
        self.retrieve_button = QPushButton("Retrieve series")
        self.retrieve_button.setToolTip("Retrieve the selected series and open it as a layer (or double-click a row)")
        self.retrieve_button.clicked.connect(lambda: self.retrieve())
        lay.addWidget(self.retrieve_button)

        box = QGroupBox("Send a restored layer")
        bl = QFormLayout(box)
        self.send_combo = QComboBox()
        self.send_combo.currentTextChanged.connect(lambda _t: self.update_buttons())
        bl.addRow("Layer", self.send_combo)
        self.deid_check = QCheckBox("De-identify (remove patient identifiers)")
        self.deid_check.setEnabled(deidentify_supported())
        bl.addRow("", self.deid_check)
        self.send_button = QPushButton("Send to PACS")
        self.send_button.setToolTip("Store the layer as a new derived series in its source's study (the same "
                                    "series as Export DICOM) on the chosen server")
        self.send_button.clicked.connect(self.send)
        bl.addRow(self.send_button)
        self.send_note = hint()
        bl.addRow(self.send_note)
        lay.addWidget(box)
        lay.addWidget(self.jobs)
        self.setMinimumWidth(380)

        layers = self.viewer.layers
        for e in (layers.events.inserted, layers.events.removed, layers.events.reordered):
            e.connect(self.refresh_layers)
        self.reload_servers()
        self.refresh_layers()

    # ------------------------------------------------------------------ servers and layers
    def reload_servers(self) -> None:
        """Fill the server list from the PACS configuration."""
        try:
            from ..pacs import config_path, load_servers

            names = list(load_servers())
        except RestoreError as exc:
            self.jobs.show_error(exc)
            names = []
        else:
            if not names:
                self.jobs.set_status(f"No PACS server configured ({config_path()}): add one with "
                                     "`napari-restore pacs add NAME ...`, then Reload.")
        fill_combo(self.server_combo, names, self.server_combo.currentText() or (names[0] if names else None))
        self.update_buttons()

    def select_server(self, name: str) -> None:
        self.reload_servers()
        self.server_combo.setCurrentText(name)

    def refresh_layers(self, event: Any = None) -> None:
        """The layer list changed: offer every image layer, a newly restored one first."""
        names = image_layer_names(self.viewer)
        inserted = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        target = None
        if inserted is not None and (L.record_of(inserted) or {}).get("source") and inserted.name in names:
            target = inserted.name
        restored = [n for n in names if (L.record_of(self.viewer.layers[n]) or {}).get("source")]
        fill_combo(self.send_combo, names, target or (restored[-1] if restored and not
                                                      self.send_combo.currentText() else None))
        self.update_buttons()

    def update_buttons(self) -> None:
        busy = self.jobs.running
        has_server = bool(self.server_combo.currentText())
        self.search_button.setEnabled(has_server and not busy)
        self.retrieve_button.setEnabled(has_server and not busy and self.selected_row() is not None)
        layer = layer_named(self.viewer, self.send_combo.currentText())
        problem = dicom_export_problem(layer) if layer is not None else ""
        self.send_button.setEnabled(has_server and not busy and layer is not None and not problem)
        self.send_note.setText(("Cannot send: " + problem) if problem else "")
        self.send_note.setVisible(bool(problem))

    def selected_row(self) -> int | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        return rows[0].row() if rows else None

    # ------------------------------------------------------------------ query
    def query(self) -> dict[str, Any]:
        """The query fields as :func:`napari_restore.pacs.find` keywords (raises InputError on a bad date)."""
        from ..pacs.workflow import date_range

        text = {"patient": self.patient_edit.text(), "patient_id": self.patient_id_edit.text(),
                "modality": self.modality_combo.currentText(), "description": self.description_edit.text()}
        q: dict[str, Any] = {k: v.strip() for k, v in text.items() if v.strip()}
        if "modality" in q:
            q["modality"] = q["modality"].upper()
        q["date"] = date_range(self.date_from.text(), self.date_to.text())
        return q

    def search(self) -> Job | None:
        """Query the chosen server (series level); the results fill the table."""
        server = self.server_combo.currentText()
        try:
            if not server:
                raise InputError("choose a PACS server (configure one with `napari-restore pacs add`)")
            q = self.query()
        except RestoreError as exc:
            self.jobs.show_error(exc)
            return None
        self._fill([])

        def work(progress, cancel):
            from ..pacs import find

            return find(server, level="series", **q)

        def done(rows):
            self._fill(rows)
            n_studies = len({r.get("StudyInstanceUID") for r in rows})
            return f"{server}: {len(rows)} series in {n_studies} {'study' if n_studies == 1 else 'studies'}."

        return self.jobs.start(f"Query {server}", work, on_result=done, unit="")

    def _fill(self, rows: list[dict[str, Any]]) -> None:
        from ..pacs.workflow import table_row

        self.rows = list(rows)
        self.table.setRowCount(len(rows))
        for i, r in enumerate(rows):
            for j, text in enumerate(table_row(r)):
                item = QTableWidgetItem(text)
                item.setToolTip(f"Study {r.get('StudyInstanceUID', '')}\nSeries {r.get('SeriesInstanceUID', '')}")
                self.table.setItem(i, j, item)
        if rows:
            self.table.selectRow(0)
        self.update_buttons()

    # ------------------------------------------------------------------ retrieve
    def retrieve(self, row: int | None = None) -> Job | None:
        """Retrieve a result row's series (default: the selected row) and open it as layers, only
        when all its instances arrived."""
        server = self.server_combo.currentText()
        row = self.selected_row() if row is None else row
        if row is None or not 0 <= row < len(self.rows) or not server:
            self.jobs.show_error(InputError("choose a series in the results (search first)"))
            return None
        r = self.rows[row]
        study, series = r.get("StudyInstanceUID"), r.get("SeriesInstanceUID")
        label = r.get("SeriesDescription") or series

        def work(progress, cancel):
            import warnings

            from .. import load
            from ..pacs.workflow import retrieve_series
            from ._reader import display_parts, volume_to_layer_data

            got = retrieve_series(server, study, series, progress=progress, cancel=cancel)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                volumes = load(got.folder)
            if not volumes:
                raise InputError("the retrieved series holds no image", got.folder)
            notes = [w for v in volumes for w in v.meta.get("warnings", [])]
            layers = [volume_to_layer_data(p, visible=(n == 0)) for n, v in enumerate(volumes)
                      for p in display_parts(v)]
            return got, layers, notes

        def done(value):
            got, layers, notes = value
            names = []
            for data, kwargs, _kind in layers:
                names.append(self.viewer.add_image(data, **kwargs).name)
            for note in dict.fromkeys(notes):
                notify("warning", note)
            text = (f"Opened {', '.join(names)}: {got.expected} instances ({got.fetched} retrieved, "
                    f"{got.skipped} already here).")
            notify("info", text)
            return text

        return self.jobs.start(f"Retrieve {label}", work, on_result=done,
                               on_cancelled=lambda: "Cancelled: nothing was opened (what arrived stays in the cache "
                                                    "for the next retrieve).")

    # ------------------------------------------------------------------ send
    def send(self) -> Job | None:
        """Store the chosen layer as a derived DICOM series on the chosen server."""
        server = self.server_combo.currentText()
        layer = layer_named(self.viewer, self.send_combo.currentText())
        try:
            if not server:
                raise InputError("choose a PACS server")
            if layer is None:
                raise InputError("choose a layer to send")
            problem = dicom_export_problem(layer)
            if problem:
                raise InputError(problem)
            kwargs: dict[str, Any] = {"series_description": ExportTab._default_description(layer)}
            if self.deid_check.isChecked():
                kwargs["deidentify"] = True
            volume = export_volume(layer)
        except RestoreError as exc:
            self.jobs.show_error(exc)
            return None
        name = layer.name

        def work(progress, cancel):
            from ..pacs.workflow import send_volume

            return send_volume(server, volume, progress=progress, cancel=cancel, **kwargs)

        def done(value):
            result, uid = value
            self.last_sent = (result, uid)
            text = f"Sent {name} to {server}: {result.summary()}."
            if result.refused:
                self.jobs.show_error(text)
                return None
            notify("info", text)
            return text

        return self.jobs.start(f"Send {name} -> {server}", work, on_result=done,
                               on_cancelled=lambda: "Cancelled: the server may hold part of the series.")

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt name
        self.jobs.cancel()
        super().closeEvent(event)


def make_pacs_panel(napari_viewer: Any) -> PacsPanel:
    """npe2 widget factory."""
    return PacsPanel(napari_viewer)


__all__ = ["PacsPanel", "make_pacs_panel"]
