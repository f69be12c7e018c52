"""The PACS dock widget, opened the way a user opens it (Plugins menu -> napari-restore -> PACS), against a
real Orthanc on 127.0.0.1 holding a real CT series from ../shared/data: query, retrieve as a layer with the
source geometry, send a restored layer back as a derived series, and a server that is down.
"""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from _orthanc import ORTHANC_AET, Orthanc, configure_server, free_port

import napari_restore
from napari_restore import pacs
from napari_restore._napari import _layers as L
from napari_restore._napari._reader import read_layers

CT_DIR = "ct/philips-head-phantom/exam/S2010"  # 28 axial CT slices, 5 mm, "STD BRAIN 5MM"
WAIT_MS = 60_000


def _files(folder):
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name != "DIRFILE")


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, shared_data):
    o = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        o.upload(_files(shared_data / CT_DIR))
        yield o
    finally:
        o.stop()


@pytest.fixture()
def configured(orthanc, tmp_path, monkeypatch):
    configure_server(orthanc, "orthanc", tmp_path, monkeypatch)
    pacs.save_server(pacs.Server(name="down", ae_title=ORTHANC_AET, host="127.0.0.1", port=free_port(), timeout=3))


def _panel(viewer):
    _dock, w = viewer.window.add_plugin_dock_widget("napari-restore", "PACS")
    return w


def _search(panel, qtbot, **fields):
    panel.patient_edit.setText(fields.get("patient", ""))
    panel.modality_combo.setCurrentText(fields.get("modality", ""))
    panel.description_edit.setText(fields.get("description", ""))
    panel.search_button.click()
    qtbot.waitUntil(lambda: not panel.jobs.running, timeout=WAIT_MS)


def test_query_retrieve_send_through_the_dock(make_napari_viewer, qtbot, configured, orthanc, shared_data):
    viewer = make_napari_viewer()
    panel = _panel(viewer)
    assert [panel.server_combo.itemText(i) for i in range(panel.server_combo.count())] == ["down", "orthanc"]
    panel.server_combo.setCurrentText("orthanc")
    _search(panel, qtbot, modality="CT", description="BRAIN")
    assert panel.jobs.last_error == "", panel.jobs.last_error
    assert panel.table.rowCount() == 1 and "1 series in 1 study" in panel.jobs.status_label.text()
    cells = [panel.table.item(0, j).text() for j in range(panel.table.columnCount())]
    assert "STD BRAIN 5MM" in cells and "CT" in cells and "28" in cells
    assert cells[0] and "\\" not in cells[0]  # a person's name, not its characters joined by backslashes
    _search(panel, qtbot, modality="MR")
    assert panel.table.rowCount() == 0 and panel.jobs.last_error == ""
    _search(panel, qtbot, modality="CT")

    # double-click retrieves the series as a layer with its source's geometry
    panel.table.cellDoubleClicked.emit(0, 0)
    qtbot.waitUntil(lambda: not panel.jobs.running, timeout=WAIT_MS)
    assert panel.jobs.last_error == "", panel.jobs.last_error
    assert "28 instances (28 retrieved" in panel.jobs.status_label.text()
    assert len(viewer.layers) == 1
    layer = viewer.layers[0]
    (ref_data, ref_kw, _), = read_layers(str(shared_data / CT_DIR))
    np.testing.assert_array_equal(np.asarray(layer.data), ref_data)
    np.testing.assert_allclose(layer.affine.affine_matrix, ref_kw["affine"], atol=1e-4)
    np.testing.assert_allclose(layer.scale, ref_kw["scale"], atol=1e-6)

    # a restored layer (the Restore tab's output layer) goes back as a derived series
    source = L.layer_volume(layer)
    result = napari_restore.restore(source, task="denoise", device="cpu")
    name = layer.name + " [denoised]"
    viewer.add_image(L.output_layer_data(layer, result), **L.output_layer_kwargs(layer, result, name))
    assert panel.send_combo.currentText() == name and panel.send_button.isEnabled()
    panel.send_button.click()
    qtbot.waitUntil(lambda: not panel.jobs.running, timeout=WAIT_MS)
    assert panel.jobs.last_error == "", panel.jobs.last_error
    assert "28 of 28 instances stored" in panel.jobs.status_label.text()
    sent, uid = panel.last_sent
    assert (sent.stored, sent.refused) == (28, [])
    row = panel.rows[0]
    assert uid != row["SeriesInstanceUID"]
    info = orthanc.series_of(uid)
    assert info is not None and len(info["Instances"]) == 28
    ds = pydicom.dcmread(io.BytesIO(orthanc.rest("GET", f"/instances/{info['Instances'][0]}/file").content))
    assert ds.StudyInstanceUID == row["StudyInstanceUID"] and "DERIVED" in ds.ImageType
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == row["SeriesInstanceUID"]
    assert orthanc.password not in panel.jobs.status_label.text()


def test_server_down_is_one_message_and_no_layer(make_napari_viewer, qtbot, configured):
    viewer = make_napari_viewer()
    panel = _panel(viewer)
    panel.server_combo.setCurrentText("orthanc")
    _search(panel, qtbot, modality="CT")
    assert panel.table.rowCount() >= 1  # the source (and a derived series sent by the test above)
    panel.server_combo.setCurrentText("down")  # the server goes away between query and retrieve
    panel.retrieve_button.click()
    qtbot.waitUntil(lambda: not panel.jobs.running, timeout=WAIT_MS)
    status = panel.jobs.status_label.text()
    assert "server down: nothing is listening" in status and status.count("\n") == 0
    assert len(viewer.layers) == 0
    _search(panel, qtbot, modality="CT")
    assert "server down" in panel.jobs.last_error and panel.table.rowCount() == 0
