"""The dock widget in a real napari viewer (under Xvfb): restore, preview, cancel, errors, compare,
ROI statistics, export, settings and a short fine-tune run.

Real data through the plugin's reader: the 28-slice 5 mm CT head phantom (DICOM) and the small
real abdominal CT ``example_ct_sm.nii.gz``. Models are the tiny networks of ``_engine_helpers``
(no trained weights ship), saved into a temporary user model folder.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import napari_restore
from napari_restore.metrics import noise_sd_estimate
from napari_restore.volume import LAYER_META_KEY, Volume

from _engine_helpers import save_tiny, trained_tiny_network
from _widget_helpers import CT_NIFTI, TINY
from _widget_helpers import open_layers as _open, plugin_widget as _widget, wait as _wait

from napari_restore._napari._state import load_settings, RestoreState, settings_path, suggest_mode

CT_5MM = "ct/philips-head-phantom/exam/S2010"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data) -> Path:
    """A user model folder holding the trained tiny CT denoiser (2-D)."""
    root = tmp_path_factory.mktemp("models")
    save_tiny(root / TINY, trained_tiny_network(shared_data))
    return root


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, model_dir):
    """Settings and models in temporary folders, never the user's."""
    monkeypatch.setenv("NAPARI_RESTORE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(model_dir))


def _world(layer, index) -> np.ndarray:
    return np.asarray(layer.data_to_world(np.asarray(index, dtype=float)))


# --------------------------------------------------------------------------- restore
def test_restore_dicom_series_gives_a_new_layer_with_geometry_and_provenance(make_napari_viewer, qtbot,
                                                                              shared_data, tmp_path):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_5MM)
    before = np.array(src.data, copy=True)
    meta_before = dict(src.metadata[LAYER_META_KEY])
    w = _widget(viewer)
    w.restore_tab.select_layer(src.name)
    assert w.state.mode == "2d"  # 5 mm slices: slice by slice
    assert w.restore_tab.model_combo.findData(TINY) > 0 and TINY in w.restore_tab.model_combo.itemData(w.restore_tab.model_combo.findData(TINY), 3)
    w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData(TINY))
    w.state.strength = 0.8
    seen = []
    job = w.restore_tab.run_restore()
    job.progress.connect(lambda args: seen.append(args))
    assert w.state.running and not w.restore_tab.run_button.isEnabled() and w.restore_tab.cancel_button.isEnabled()
    _wait(qtbot, lambda: not w.state.running)
    assert w.last_error == ""
    out = viewer.layers[f"{src.name} [denoise-ct]"]
    assert seen and seen[-1] == (28, 28) and "Done" in w.restore_tab.jobs.progress_bar.format()
    # geometry, display and provenance
    assert out.data.shape == src.data.shape and out.data.dtype == np.float32
    for attr in ("scale", "translate"):
        np.testing.assert_allclose(getattr(out, attr), getattr(src, attr))
    np.testing.assert_allclose(out.affine.affine_matrix, src.affine.affine_matrix)
    np.testing.assert_allclose(_world(out, (27, 511, 0)), _world(src, (27, 511, 0)))
    assert tuple(out.contrast_limits) == tuple(src.contrast_limits) and out.colormap.name == src.colormap.name
    rec = out.metadata[LAYER_META_KEY]
    assert rec["source"]["layer"] == src.name and rec["source"]["series_uid"] == meta_before["meta"]["series_uid"]
    prov = rec["provenance"]
    assert prov["model"] == TINY and prov["model_version"] == "0.0.1" and prov["strength"] == 0.8
    assert prov["mode"] == "2d" and prov["task"] == "denoise" and prov["time"]
    np.testing.assert_allclose(rec["affine_lps"], meta_before["affine_lps"])
    # the input is untouched, the output is a restoration of it
    np.testing.assert_array_equal(src.data, before)
    assert set(src.metadata[LAYER_META_KEY]) == set(meta_before) and "provenance" not in src.metadata[LAYER_META_KEY]
    assert not np.array_equal(out.data, src.data) and np.isfinite(out.data).all()
    assert abs(float(out.data.mean()) - float(src.data.mean())) < 20.0
    # the widget can run again
    assert w.restore_tab.run_button.isEnabled() and not w.restore_tab.cancel_button.isEnabled()

    # export the restored layer as a derived DICOM series: same geometry, new description
    assert w.export_tab.export_combo.currentText() == out.name and w.export_tab.dicom_button.isEnabled()
    w.export_tab.series_edit.setText("PHANTOM 5MM DENOISED")
    target = tmp_path / "derived"
    w.export_tab.export_dicom(target)
    _wait(qtbot, lambda: not w.export_state.running)
    assert w.last_error == "", w.last_error
    back = napari_restore.load(target)[0]
    assert back.meta["description"] == "PHANTOM 5MM DENOISED"
    np.testing.assert_allclose(back.affine, meta_before["affine_lps"], atol=1e-3)
    assert back.meta["study_uid"] == meta_before["meta"]["study_uid"]
    assert back.meta["series_uid"] != meta_before["meta"]["series_uid"]
    np.testing.assert_allclose(back.array, Volume.from_layer(out.data, out.metadata).array, atol=1.0)
    # never overwrites silently
    stamp = sorted(p.stat().st_mtime_ns for p in target.iterdir())
    w.export_tab.export_dicom(target)
    _wait(qtbot, lambda: not w.export_state.running)
    assert "exists" in w.last_error and str(target) in w.last_error
    assert sorted(p.stat().st_mtime_ns for p in target.iterdir()) == stamp


def test_preview_restores_only_the_slice_on_screen(make_napari_viewer, qtbot, shared_data):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    w.restore_tab.select_layer(src.name)
    w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData(TINY))
    k = 7
    viewer.dims.set_current_step(0, k)
    times = []
    for _ in range(2):  # the first run pays the imports
        t0 = time.perf_counter()
        w.restore_tab.run_preview()
        _wait(qtbot, lambda: not w.state.running)
        times.append(time.perf_counter() - t0)
    assert w.last_error == ""
    prev = viewer.layers[f"{src.name} [preview]"]
    assert prev.data.shape == (1, *src.data.shape[1:])
    # placed where slice k is in the world
    np.testing.assert_allclose(_world(prev, (0, 5, 9)), _world(src, (k, 5, 9)), atol=1e-6)
    # the same numbers as restoring the whole volume with the same model
    full = napari_restore.restore(Volume.from_layer(src.data, src.metadata), model=TINY)
    np.testing.assert_allclose(prev.data[0], full.array[k], atol=1e-3)
    assert times[1] < 1.5, f"preview took {times[1]:.2f} s"
    assert "ms" in w.restore_tab.jobs.status_label.text()
    w.restore_tab.ensemble_combo.setCurrentIndex(w.restore_tab.ensemble_combo.findData(2))  # Advanced > Passes: flip-averaged
    assert w.state.ensemble == 2
    w.restore_tab.run_preview()
    _wait(qtbot, lambda: not w.state.running)
    two = napari_restore.restore(Volume.from_layer(src.data, src.metadata), model=TINY, ensemble=2)
    np.testing.assert_allclose(viewer.layers[f"{src.name} [preview]"].data[0], two.array[k], atol=1e-3)
    assert not np.allclose(two.array[k], full.array[k], atol=1e-2)


def test_preview_of_a_context_model_reads_the_neighbouring_slices(make_napari_viewer, qtbot, shared_data, tmp_path):
    import torch

    from _engine_helpers import TINY_ARGS
    from napari_restore.networks import build_network

    args = {**TINY_ARGS, "context": 1}
    net = build_network("ResidualUNet", args)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = save_tiny(tmp_path / "tiny-25d", net, name="tiny-25d", args=args)
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    w.restore_tab.select_layer(src.name)
    w.restore_tab.add_model_path(folder)
    k = 7
    viewer.dims.set_current_step(0, k)
    w.restore_tab.run_preview()
    _wait(qtbot, lambda: not w.state.running)
    assert w.last_error == ""
    prev = viewer.layers[f"{src.name} [preview]"]
    vol = Volume.from_layer(src.data, src.metadata)
    full = napari_restore.restore(vol, model=folder)
    np.testing.assert_allclose(prev.data[0], full.array[k], atol=1e-3)
    alone = napari_restore.restore(vol.copy_with(vol.array[k:k + 1]), model=folder)  # no neighbours
    assert np.abs(alone.array[0] - full.array[k]).max() > 1.0


def test_cancel_mid_run_leaves_no_layer_and_the_widget_runs_again(make_napari_viewer, qtbot, shared_data, monkeypatch):
    from napari_restore.networks import ResidualUNet

    real = ResidualUNet.forward

    def slow(self, x):  # a real model's pace (the tiny one finishes 30 slices before a click lands)
        time.sleep(0.05)
        return real(self, x)

    monkeypatch.setattr(ResidualUNet, "forward", slow)
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    w.restore_tab.select_layer(src.name)
    w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData(TINY))
    w.restore_tab.batch_spin.setValue(1)  # 30 batches: room to cancel mid-run
    seen = []

    def on_progress(args):
        seen.append(args)
        if len(seen) == 2:
            w.restore_tab.cancel_button.click()

    w.restore_tab.run_restore().progress.connect(on_progress)
    _wait(qtbot, lambda: not w.state.running)
    assert 2 <= seen[-1][0] < seen[-1][1] == 30
    assert "Cancelled" in w.restore_tab.jobs.progress_bar.format() and w.last_error == ""
    assert [lay.name for lay in viewer.layers] == [src.name]
    assert w.restore_tab.run_button.isEnabled()
    w.restore_tab.run_restore()
    _wait(qtbot, lambda: not w.state.running)
    assert f"{src.name} [denoise-ct]" in viewer.layers


def test_errors_become_notifications_and_the_widget_recovers(make_napari_viewer, qtbot, shared_data, tmp_path):
    from napari.utils.notifications import notification_manager

    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    w.restore_tab.select_layer(src.name)
    bad = tmp_path / "broken-model"
    save_tiny(bad, name="broken-model")
    (bad / "model.pt").write_bytes(b"not a torch file")
    w.restore_tab.add_model_path(bad)
    assert w.state.model == str(bad)
    n_before = len(notification_manager.records)
    w.restore_tab.run_restore()
    _wait(qtbot, lambda: not w.state.running)
    assert str(bad) in w.last_error and "refused to load" in w.last_error
    assert any(str(bad) in str(r.message) for r in notification_manager.records[n_before:])
    assert [lay.name for lay in viewer.layers] == [src.name] and "Failed" in w.restore_tab.jobs.progress_bar.format()
    # an unknown model file name: ModelError before anything runs; then a good model works
    with pytest.raises(napari_restore.ModelError, match="not-a-model"):
        w.restore_tab.add_model_path(tmp_path / "not-a-model")
    w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData(TINY))
    w.restore_tab.run_restore()
    _wait(qtbot, lambda: not w.state.running)
    assert w.last_error == "" and f"{src.name} [denoise-ct]" in viewer.layers


# --------------------------------------------------------------------------- compare and measure
def test_compare_views_difference_and_roi_statistics(make_napari_viewer, qtbot, shared_data):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    w.restore_tab.select_layer(src.name)
    w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData(TINY))
    w.restore_tab.run_restore()
    _wait(qtbot, lambda: not w.state.running)
    out = w.restore_tab.last_output
    assert w.compare_tab.cmp_output.currentText() == out.name and w.compare_tab.cmp_input.currentText() == src.name
    # side by side: a 1 x 2 grid of the two layers, one camera; off restores the view
    w.compare_tab.grid_button.click()
    assert viewer.grid.enabled and src.visible and out.visible
    w.compare_tab.grid_button.click()
    assert not viewer.grid.enabled
    w.compare_tab.blend_button.click()
    w.compare_tab.blend_slider.setValue(30)
    assert out.opacity == pytest.approx(0.3) and viewer.layers.index(out) > viewer.layers.index(src)
    w.compare_tab.blend_button.click()
    assert out.opacity == 1.0
    diff = w.compare_tab.add_difference_layer()
    np.testing.assert_allclose(diff.data, out.data - src.data, atol=1e-4)
    np.testing.assert_allclose(diff.scale, src.scale)
    # ROI: a rectangle with half-pixel corners covers rows 40..59 and columns 50..69 exactly
    k = 12
    viewer.dims.set_current_step(0, k)
    roi = w.compare_tab.add_roi_layer("rectangle")
    assert roi.mode == "add_rectangle" and roi.ndim == src.ndim
    roi.add_rectangles(np.array([[k, 39.5, 49.5], [k, 39.5, 69.5], [k, 59.5, 69.5], [k, 59.5, 49.5]]))
    roi.add_ellipses(np.array([[k, 20, 30], [k, 20, 60], [k, 40, 60], [k, 40, 30]]))
    w.tabs.setCurrentWidget(w.compare_page)
    rows = w.compare_tab.update_roi_stats()
    assert len(rows) == 2
    box_in = src.data[k, 40:60, 50:70].astype(np.float64)
    box_out = out.data[k, 40:60, 50:70].astype(np.float64)
    r = rows[0]
    assert r.kind == "rectangle" and r.index == (k,) and r.pixels == 400
    assert r.mean_in == pytest.approx(box_in.mean(), abs=1e-3) and r.sd_in == pytest.approx(box_in.std(ddof=1), rel=1e-4)
    assert r.mean_out == pytest.approx(box_out.mean(), abs=1e-3)
    assert r.noise_reduction == pytest.approx(100 * (1 - box_out.std(ddof=1) / box_in.std(ddof=1)), abs=1e-3)
    assert rows[1].kind == "ellipse" and 0.95 * np.pi * 10 * 15 < rows[1].pixels < 1.05 * np.pi * 10 * 15
    assert w.compare_tab.roi_table.rowCount() == 2 and f"{r.mean_in:.1f}" in w.compare_tab.roi_table.item(0, 1).text()
    assert "(HU)" in w.compare_tab.roi_table.horizontalHeaderItem(1).text()
    plane = src.data[k].astype(np.float64)
    expect = noise_sd_estimate(plane, (plane >= 0) & (plane <= 100))
    assert w.compare_tab.slice_noise_values[0] == pytest.approx(expect, rel=1e-6)
    assert w.compare_tab.slice_noise_values[1] is not None and "HU" in w.compare_tab.noise_label.text()


# --------------------------------------------------------------------------- export, settings
def test_save_nifti_keeps_geometry_never_overwrites_and_dicom_needs_a_dicom_source(make_napari_viewer, qtbot,
                                                                                  shared_data, tmp_path):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    w.export_tab.export_combo.setCurrentText(src.name)
    assert not w.export_tab.dicom_button.isEnabled() and w.export_tab.nifti_button.isEnabled()
    target = tmp_path / "out.nii.gz"
    w.export_tab.save_nifti(target)
    _wait(qtbot, lambda: not w.export_state.running)
    assert w.last_error == "" and target.is_file()
    back = napari_restore.load(target)[0]
    orig = napari_restore.load(shared_data / CT_NIFTI)[0]
    np.testing.assert_allclose(back.affine, orig.affine, atol=1e-4)
    np.testing.assert_allclose(back.array, orig.array, atol=1e-3)
    stamp = target.stat().st_mtime_ns
    w.export_tab.save_nifti(target)
    _wait(qtbot, lambda: not w.export_state.running)
    assert "exists" in w.last_error and target.stat().st_mtime_ns == stamp
    w.export_tab.export_dicom(tmp_path / "dicom")
    assert "does not come from a DICOM series" in w.last_error and not (tmp_path / "dicom").exists()


def test_settings_are_remembered_in_the_redirected_config_dir(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    w = _widget(viewer)
    w.restore_tab.task_combo.setCurrentIndex(w.restore_tab.task_combo.findData("enhance"))
    w.restore_tab.strength_slider.setValue(65)
    w.restore_tab.tile_spin.setValue(256)
    w.restore_tab.ensemble_combo.setCurrentIndex(w.restore_tab.ensemble_combo.findData(8))
    path = settings_path()
    _wait(qtbot, lambda: path.is_file() and '"ensemble": 8' in path.read_text(), timeout=5000)  # written once, soon
    assert path.parent == tmp_path / "config"
    saved = json.loads(path.read_text())["restore"]
    assert saved["task"] == "enhance" and saved["strength"] == pytest.approx(0.65) and saved["tile"] == 256
    w2 = _widget(make_napari_viewer())  # a new viewer: a new widget reads the settings
    assert w2.state.task == "enhance" and w2.restore_tab.strength_slider.value() == 65 and w2.restore_tab.tile_spin.value() == 256
    assert saved["ensemble"] == 8 and w2.restore_tab.ensemble_combo.currentData() == 8
    path.write_text("{not json")
    fresh = RestoreState()
    load_settings({"restore": fresh})  # a corrupt file leaves the defaults
    assert fresh.task == "denoise"


def test_mode_is_preselected_from_the_voxel_spacing():
    assert suggest_mode((5.0, 0.45, 0.45), True)[0] == "2d"
    assert suggest_mode((1.0, 0.8, 0.8), True)[0] == "3d"
    assert suggest_mode((1.0, 0.8, 0.8), False)[0] == "2d"
    assert suggest_mode((2.0, 0.5, 0.5), True)[0] == "2d"  # 4x the in-plane pixel


# --------------------------------------------------------------------------- fine-tune
def test_fine_tune_a_few_steps_and_the_model_appears_in_the_list(make_napari_viewer, qtbot, shared_data, model_dir):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    w.train_tab.set_train_layers([src.name])
    w.train_tab.base_combo.setCurrentIndex(w.train_tab.base_combo.findData(TINY))
    w.train_tab.epochs_spin.setValue(2)
    w.train_tab.steps_spin.setValue(2)
    w.train_tab.name_edit.setText("widget-finetuned")
    job = w.train_tab.start_training(batch_size=2, patch_size=(32, 32), val_slices=2, val_crop=64)
    assert job is not None, w.last_error
    assert w.train_tab.stop_button.isEnabled() and not w.train_tab.train_button.isEnabled()
    _wait(qtbot, lambda: not w.train_state.running, timeout=120_000)
    assert w.last_error == "", w.last_error
    assert w.train_tab.train_result is not None and w.train_tab.train_result.steps == 4
    assert len(w.train_state.train_loss) == 2 and len(w.train_state.val_loss) == 2
    assert w.train_tab.curve.train == w.train_state.train_loss
    assert w.train_tab.save_model_button.isEnabled()
    dest = w.train_tab.save_trained_model()
    assert dest == model_dir / "widget-finetuned" and (dest / "card.json").is_file()
    assert w.restore_tab.model_combo.findData("widget-finetuned") > 0
    card = json.loads((dest / "card.json").read_text())
    assert card["task"] == "denoise" and card["modality"] == "CT"
    # Stop: ends within a step, saves nothing, and the panel can train again
    w.train_tab.name_edit.setText("widget-stopped")
    w.train_tab.epochs_spin.setValue(50)
    job = w.train_tab.start_training(batch_size=2, patch_size=(32, 32), val_slices=2, val_crop=64)
    job.progress.connect(lambda args: w.train_tab.stop_button.click())
    _wait(qtbot, lambda: not w.train_state.running, timeout=120_000)
    assert w.train_tab.train_result is None and "Stopped" in w.train_tab.train_status.text() and w.train_tab.train_button.isEnabled()
    assert not (model_dir / "widget-stopped").exists() and w.last_error == ""


def test_plain_2d_and_4d_layers_restore_into_layers_of_their_own_shape(make_napari_viewer, qtbot, shared_data):
    """Layers without a file behind them (numpy arrays): 2-D and 3-D+time, modality set by hand."""
    ct = napari_restore.load(shared_data / CT_NIFTI)[0].array
    viewer = make_napari_viewer()
    two = viewer.add_image(ct[10], name="slice", scale=(0.7, 0.7), translate=(5.0, -3.0))
    four = viewer.add_image(np.stack([ct[4:8], ct[8:12]]), name="time", scale=(1, 3, 0.8, 0.8))
    w = _widget(viewer)
    for layer in (two, four):
        w.restore_tab.select_layer(layer.name)
        w.restore_tab.modality_combo.setCurrentIndex(w.restore_tab.modality_combo.findData("CT"))
        w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData(TINY))
        assert w.state.model == TINY
        w.restore_tab.run_restore()
        _wait(qtbot, lambda: not w.state.running)
        assert w.last_error == "", w.last_error
        out = viewer.layers[f"{layer.name} [denoise-ct]"]
        assert out.data.shape == layer.data.shape
        np.testing.assert_allclose(out.scale, layer.scale)
        np.testing.assert_allclose(out.translate, layer.translate)
        assert out.metadata[LAYER_META_KEY]["provenance"]["model"] == TINY
        assert not np.array_equal(out.data, layer.data)
