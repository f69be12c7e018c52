"""The do-no-harm guard: outside a model card's trusted range, restore() warns, and the warning
reaches the CLI's stderr, the widget (notification and status line) and the batch manifest."""
from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import napari_restore as nr
from napari_restore.errors import ModelError
from napari_restore.guard import check_trusted_range, measure
from napari_restore.models import ModelCard, load_model

CT = "ct/siemens-body-j2k"
OUTSIDE = "outside the range it was trained and tested on"


@pytest.fixture(scope="module")
def body(shared_data) -> nr.Volume:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = nr.load(shared_data / CT)[0]
    return vol.copy_with(vol.array[8:12, 128:384, 128:384])


def _noisy(vol: nr.Volume, sd: float) -> nr.Volume:
    rng = np.random.default_rng(1)
    return vol.copy_with(vol.array + rng.normal(0, sd, vol.array.shape).astype(np.float32))


def test_measure_and_range(body):
    m = measure(body)
    assert abs(m["pixel_mm"] - 0.977) < 0.01 and m["slice_thickness_mm"] == 3.0
    assert 6 < m["noise_sd_hu"] < 16  # the scan's own ~10 HU
    card = load_model("denoise-ct").card
    assert card.trusted_range["noise_sd_hu"] == [5, 55]
    assert check_trusted_range(_noisy(body, 20), card) == []
    notes = check_trusted_range(_noisy(body, 120), card)
    assert len(notes) == 1 and "noise SD" in notes[0] and OUTSIDE in notes[0]


def _blurred(vol: nr.Volume, fwhm_vox: float) -> nr.Volume:
    from scipy import ndimage as ndi

    s = fwhm_vox / 2.3548
    return vol.copy_with(ndi.gaussian_filter(vol.array, (0, s, s)).astype(np.float32))


def test_the_guard_tells_a_deblurrer_that_its_input_is_already_sharp(body, shared_data):
    ct, mr_card = load_model("deblur-ct").card, load_model("deblur-mr-25d").card
    native = measure(body)["edge_fwhm_voxels"]
    assert native < 1.7 and measure(_blurred(body, 3.0))["edge_fwhm_voxels"] > native + 1.0
    notes = check_trusted_range(body, ct)
    assert len(notes) == 1 and "edge spread" in notes[0] and "already sharp" in notes[0]
    assert check_trusted_range(_blurred(body, 3.0), ct) == []
    assert check_trusted_range(body, load_model("denoise-ct").card) == []  # denoisers do not care
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mr = nr.load(shared_data / "mr" / "nifti" / "seg3d_MR.nii.gz")[0]
    mr = mr.copy_with(mr.array[78:82])
    # the MR deblurrers 0.3.0 leave a sharp MR sharp (docs/robustness.md): no lower bound, only an upper one
    assert check_trusted_range(mr, mr_card) == [] and check_trusted_range(_blurred(mr, 3.0), mr_card) == []
    notes = check_trusted_range(_blurred(mr, 8.0), mr_card)  # edge spread 6.9 voxels: wider than it trained on
    assert len(notes) == 1 and "edge spread" in notes[0] and "already sharp" not in notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = nr.restore(body, task="deblur", model="deblur-ct", device="cpu")
    assert any("already sharp" in w for w in out.meta["warnings"])


def test_bad_trusted_range_is_a_model_error():
    card = load_model("denoise-ct").card.to_dict()
    card["trusted_range"] = {"pixel_mm": [1.0, 0.5]}
    with pytest.raises(ModelError, match="trusted_range.pixel_mm"):
        ModelCard.from_dict(card, "card.json")
    card["trusted_range"] = {"dose": [0, 1]}
    with pytest.raises(ModelError, match="unknown key"):
        ModelCard.from_dict(card, "card.json")


def test_restore_records_the_warning(body):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = nr.restore(_noisy(body, 120), model="denoise-ct", device="cpu")
        ok = nr.restore(_noisy(body, 20), model="denoise-ct", device="cpu")
    assert any(OUTSIDE in w for w in out.meta["warnings"])
    assert any(OUTSIDE in w for w in out.meta["provenance"][-1]["warnings"])
    assert not any(OUTSIDE in w for w in ok.meta.get("warnings", []))


def test_cli_and_batch_show_the_warning(body, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    nr.save(_noisy(body, 120), src / "noisy.nii.gz")
    exe = [sys.executable, "-m", "napari_restore.cli"]
    r = subprocess.run(exe + ["restore", str(src / "noisy.nii.gz"), str(tmp_path / "o.nii.gz"), "--modality", "CT",
                              "--model", "denoise-ct", "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count(OUTSIDE) == 1
    out = tmp_path / "batch"
    r = subprocess.run(exe + ["batch", str(src), str(out), "--model", "denoise-ct", "--device", "cpu", "--no-progress",
                              "--pool", "thread"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 1 and OUTSIDE in rows[0]["warnings"]


def test_widget_shows_the_warning(make_napari_viewer, qtbot, body):
    from napari.utils.notifications import notification_manager

    notes: list[str] = []
    notification_manager.notification_ready.connect(lambda n: notes.append(str(n.message)))
    viewer = make_napari_viewer()
    data, kwargs, _ = _noisy(body, 120).to_layer_tuple()
    viewer.add_image(data, **{**kwargs, "name": "noisy body"})
    _, w = viewer.window.add_plugin_dock_widget("napari-restore", "Restore")
    w.restore_tab.select_layer("noisy body")
    w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData("denoise-ct"))
    w.restore_tab.run_restore()
    qtbot.waitUntil(lambda: not w.state.running, timeout=120_000)
    assert w.last_error == ""
    assert any(OUTSIDE in n for n in notes)
    assert OUTSIDE in w.restore_tab.jobs.status_label.text() or "warning" in w.restore_tab.jobs.status_label.text().lower()
