"""The widget's Qt-free parts and the clinician-facing fixes of the tab redesign, opened the way a
user opens the widget (Plugins menu: napari hands it the public-only viewer proxy).

Real data: the small real abdominal CT ``example_ct_sm.nii.gz`` and the MR ``T1.nii.gz``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

import napari_restore
from napari_restore.models import find_model, read_card

from _engine_helpers import save_tiny, trained_tiny_network
from _widget_helpers import CT_NIFTI, TINY
from _widget_helpers import open_layers as _open, plugin_widget as _widget, wait as _wait

from napari_restore._napari._catalogue import ModelCatalogue
from napari_restore._napari._plot import CurvePlot
from napari_restore._napari._train_prep import TrainRequest, prepare_training

MR_NIFTI = "mr/nifti/T1.nii.gz"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, shared_data) -> Path:
    """A user model folder: the trained tiny CT denoiser and a tiny MR one."""
    root = tmp_path_factory.mktemp("models")
    save_tiny(root / TINY, trained_tiny_network(shared_data))
    save_tiny(root / "tiny-mr-denoise", name="tiny-mr-denoise", modality="MR")
    return root


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path, model_dir):
    monkeypatch.setenv("NAPARI_RESTORE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(model_dir))


def _drawn(shot: np.ndarray) -> bool:
    """The canvas shows an image: many grey levels, not one colour."""
    grey = shot[..., :3].mean(-1)
    return len(np.unique(grey.astype(np.uint8))) > 30 and grey.std() > 2


def _restore(w, qtbot, layer_name: str):
    w.restore_tab.select_layer(layer_name)
    w.restore_tab.model_combo.setCurrentIndex(w.restore_tab.model_combo.findData(TINY))
    w.restore_tab.run_restore()
    _wait(qtbot, lambda: not w.state.running)
    assert w.last_error == "", w.last_error
    return w.restore_tab.last_output.name


# --------------------------------------------------------------------------- Qt-free parts
def test_catalogue_lists_models_by_task_and_modality_and_the_data_modality_first(model_dir):
    cat = ModelCatalogue()
    ct = [c.key for c in cat.choices("denoise", "CT")]
    mr = [c.key for c in cat.choices("denoise", "MR")]
    assert TINY in ct and "tiny-mr-denoise" not in ct
    assert "tiny-mr-denoise" in mr and TINY not in mr
    assert {TINY, "tiny-mr-denoise"} <= {c.key for c in cat.choices("denoise", "OT")}  # unknown: every model
    base = [c.key for c in cat.base_choices("denoise", "MR")]
    assert "tiny-mr-denoise" in base and TINY not in base  # no CT start for MR data unless asked
    every = cat.base_choices("denoise", "MR", every_modality=True)
    keys = [c.key for c in every]
    assert keys.index("tiny-mr-denoise") < keys.index(TINY) and "(CT)" in every[keys.index(TINY)].label
    with pytest.raises(napari_restore.ModelError, match="no-such-model"):
        cat.add_path(model_dir / "no-such-model")


def test_training_preparation_splits_one_scan_and_names_the_layers_not_the_files(shared_data, tmp_path):
    vol = napari_restore.load(shared_data / CT_NIFTI)[0]
    req = TrainRequest(name="mine", base_model=TINY, layers=[("abdomen CT", vol)])
    cfg = prepare_training(req, tmp_path, epochs=1)
    assert len(cfg.data) == 1 and len(cfg.val_data) == 1 and cfg.init_model == TINY and cfg.epochs == 1
    train_part, val_part = (napari_restore.load(p)[0] for p in (cfg.data[0], cfg.val_data[0]))
    assert train_part.array.shape[0] + val_part.array.shape[0] == vol.array.shape[0] == 30
    np.testing.assert_allclose(val_part.array, vol.array[train_part.array.shape[0]:], atol=1e-3)
    # the held-out slices keep their place in the patient
    np.testing.assert_allclose(val_part.affine[:3, 3], vol.affine[:3, 3] + train_part.array.shape[0] * vol.affine[:3, 0],
                               atol=1e-3)
    assert cfg.data_description == ["napari layer 'abdomen CT'"]
    with pytest.raises(napari_restore.InputError, match="tick at least one"):
        prepare_training(TrainRequest(), tmp_path)
    with pytest.raises(napari_restore.InputError, match="existing folder"):
        prepare_training(TrainRequest(from_folder=True, folder=str(tmp_path / "missing")), tmp_path)
    with pytest.raises(napari_restore.InputError, match="low-dose layer"):
        prepare_training(TrainRequest(mode="paired", layers=[("a", vol)], low=("a", vol)), tmp_path / "paired")
    with pytest.raises(napari_restore.InputError, match="training settings"):
        prepare_training(req, tmp_path / "unknown", no_such_option=1)


def test_auto_never_picks_a_model_worse_than_its_input_or_than_its_start(model_dir, tmp_path, monkeypatch):
    root = tmp_path / "models"
    save_tiny(root / "worse", name="worse", version="9.0.0", metrics={"psnr_gain_db": -0.149, "val_psnr": 30.0})
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(root))
    # the highest version of all (the shipped ones included), but worse than its input
    assert find_model("denoise", "CT", 2).name not in ("worse", "better")
    save_tiny(root / "better", name="better", version="9.0.1",
              metrics={"psnr_gain_db": 1.0, "val_psnr": 31.0, "val_psnr_init": 31.5})
    assert find_model("denoise", "CT", 2).name not in ("worse", "better")  # gains over its input, loses to its start
    save_tiny(root / "best", name="best", version="9.0.2",
              metrics={"psnr_gain_db": 1.2, "val_psnr": 31.7, "val_psnr_init": 31.5})
    assert find_model("denoise", "CT", 2).name == "best"
    assert read_card(root / "worse").auto_eligible() is False  # still listed and usable by name
    assert "worse" in [c.name for c in napari_restore.list_models(task="denoise")]


def test_curve_labels_fit_and_the_legend_stays_off_the_curves(qtbot):
    plot = CurvePlot()
    qtbot.addWidget(plot)
    plot.resize(360, 150)
    plot.set_data([0.123456, 0.01, 0.0031], [0.2, 0.02, 0.00456])
    area = plot.plot_area()
    fm = plot.fontMetrics()
    assert area.left() >= max(fm.horizontalAdvance(t) for t in plot.y_labels()) + 4
    assert area.top() >= fm.height() + 2 and area.bottom() <= plot.height() - fm.height()
    img = plot.grab().toImage()
    from napari_restore._napari._plot import TRAIN_COLOUR
    def near(c):
        return abs(c.red() - TRAIN_COLOUR.red()) + abs(c.green() - TRAIN_COLOUR.green()) + abs(c.blue() - TRAIN_COLOUR.blue()) < 60

    legend_rows = [y for y in range(int(area.top())) for x in range(int(area.left()), int(area.right()))
                   if near(img.pixelColor(x, y))]
    assert legend_rows, "the legend is drawn above the plot area"


# --------------------------------------------------------------------------- the tabs, as a user opens them
def test_side_by_side_and_blend_show_both_layers_through_the_plugin_dock(make_napari_viewer, qtbot, shared_data):
    viewer = make_napari_viewer(show=True)  # a hidden viewer's canvas screenshots black
    _open(viewer, shared_data, CT_NIFTI).name = "other"  # another series in the viewer
    src = _open(viewer, shared_data, CT_NIFTI)
    viewer.dims.set_point(0, float(np.mean(src.extent.world[:, 0])))
    w = _widget(viewer)
    assert type(w.viewer).__name__ == "PublicOnlyProxy"  # what napari hands a plugin
    out_name = _restore(w, qtbot, src.name)
    out = viewer.layers[out_name]
    w.compare_tab.grid_button.click()
    assert viewer.grid.enabled and src.visible and out.visible and not viewer.layers["other"].visible
    qtbot.wait(300)
    shot = viewer.screenshot(canvas_only=True, flash=False)
    half = shot.shape[1] // 2
    assert _drawn(shot[:, :half]) and _drawn(shot[:, half:]), "side by side leaves a cell blank"
    w.compare_tab.grid_button.click()
    assert viewer.layers["other"].visible  # the view is back as it was
    w.compare_tab.blend_button.click()
    w.compare_tab.blend_slider.setValue(40)
    assert src.visible and out.visible and out.opacity == pytest.approx(0.4)
    qtbot.wait(300)
    assert _drawn(viewer.screenshot(canvas_only=True, flash=False)), "blend draws a blank canvas"
    w.compare_tab.blend_button.click()


def test_export_keeps_the_restored_layer_and_says_why_dicom_is_off(make_napari_viewer, qtbot, shared_data, tmp_path):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    out_name = _restore(w, qtbot, src.name)
    ex = w.export_tab
    assert ex.export_combo.currentText() == out_name
    diff = w.compare_tab.add_difference_layer()
    assert diff is not None and ex.export_combo.currentText() == out_name  # not switched to the difference
    assert "not come from a DICOM series (its source is a NIfTI file)" in ex.dicom_note.text()
    ex.export_combo.setCurrentText(diff.name)
    assert not ex.dicom_button.isEnabled() and "difference image" in ex.dicom_note.text()
    # an error shows in the tab's own status line, not only as a notification
    ex.export_combo.setCurrentText(out_name)
    ex.export_dicom(tmp_path / "dicom")
    assert "does not come from a DICOM series" in ex.jobs.status_label.text() and not (tmp_path / "dicom").exists()
    assert w.last_error == ex.jobs.last_error != ""


def test_status_resets_for_new_data_and_compare_refuses_a_layer_against_itself(make_napari_viewer, qtbot, shared_data):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    out_name = _restore(w, qtbot, src.name)
    assert out_name in w.restore_tab.jobs.status_label.text()
    rt = w.restore_tab
    rt.modality_combo.setCurrentIndex(rt.modality_combo.findData("MR"))  # the user's choice for this input
    viewer.add_shapes(name="marks")  # the layer list changes, the input does not: the choice stays
    assert rt.layer_combo.currentText() == src.name and rt.modality_combo.currentData() == "MR"
    other = _open(viewer, shared_data, CT_NIFTI)  # new data: the old result no longer describes the view
    assert rt.jobs.status_label.text() == "Ready"
    viewer.layers.remove(other.name)
    viewer.layers.remove(src.name)
    w.tabs.setCurrentWidget(w.compare_tab)
    cmp = w.compare_tab
    assert cmp.cmp_output.currentText() == out_name
    cmp.update_roi_stats()
    assert cmp.slice_noise_values[1] is None and "% less" not in cmp.noise_label.text()
    cmp.grid_button.click()
    assert not viewer.grid.enabled and "was removed" in cmp.status_label.text()


def test_start_from_lists_the_layer_modality_and_others_on_request(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    mr = _open(viewer, shared_data, MR_NIFTI, modality="MR")
    w = _widget(viewer)
    tr = w.train_tab
    tr.set_train_layers([mr.name])
    items = [tr.base_combo.itemData(i) for i in range(tr.base_combo.count())]
    assert "tiny-mr-denoise" in items and TINY not in items
    tr.other_modalities.setChecked(True)
    items = [tr.base_combo.itemData(i) for i in range(tr.base_combo.count())]
    assert items.index("tiny-mr-denoise") < items.index(TINY)


def test_the_model_warms_up_in_the_background_so_the_first_preview_is_fast(make_napari_viewer, qtbot, shared_data):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    rt = w.restore_tab
    rt.select_layer(src.name)
    rt.model_combo.setCurrentIndex(rt.model_combo.findData(TINY))
    # choosing the model starts (or queues) its warm-up
    _wait(qtbot, lambda: rt.warmer.job is None and any(repr(TINY) in key for key in rt.warmer.warmed))
    t0 = time.perf_counter()
    rt.run_preview()
    _wait(qtbot, lambda: not w.state.running)
    first = time.perf_counter() - t0
    assert w.last_error == "" and f"{src.name} [preview]" in viewer.layers
    assert first < 1.5, f"the first preview took {first:.2f} s"
    assert not rt.card_section.button.isChecked()  # the card is collapsed: Restore volume stays in view


def test_a_fine_tuned_model_names_its_layers_and_is_auto_only_when_it_beats_its_start(
        make_napari_viewer, qtbot, shared_data, model_dir):
    viewer = make_napari_viewer()
    src = _open(viewer, shared_data, CT_NIFTI)
    w = _widget(viewer)
    tr = w.train_tab
    tr.set_train_layers([src.name])
    tr.base_combo.setCurrentIndex(tr.base_combo.findData(TINY))
    assert w.train_state.base_model == TINY
    tr.epochs_spin.setValue(1)
    tr.steps_spin.setValue(2)
    tr.name_edit.setText("parts-finetuned")
    assert tr.start_training(batch_size=2, patch_size=(32, 32), val_slices=2, val_crop=64, lr=1e-12) is not None
    _wait(qtbot, lambda: not w.train_state.running, timeout=120_000)
    assert w.last_error == "", w.last_error
    dest = tr.save_trained_model()
    text = (dest / "card.json").read_text()
    card = json.loads(text)
    assert card["training_data"] == [f"napari layer {src.name!r}"] and "napari-restore-train-" not in text
    m = card["metrics"]
    assert card["training"]["init_model"].startswith(TINY) and "val_psnr_init" in m
    # lr 1e-12: the weights barely move, but two steps of batch 2 re-estimate the batch-norm statistics:
    # worse than the model it started from on the same validation data, so Auto keeps the original
    assert m["val_psnr"] < m["val_psnr_init"] and not read_card(dest).auto_eligible()
    assert find_model("denoise", "CT", 2, 3.0).name != "parts-finetuned"
    assert w.restore_tab.model_combo.findData("parts-finetuned") > 0  # listed all the same


def test_remembered_options_out_of_range_fall_back_to_their_defaults(tmp_path):
    from napari_restore._napari._state import RestoreState, load_settings

    path = tmp_path / "widget.json"
    path.write_text(json.dumps({"restore": {"strength": 5.0, "ensemble": 3, "tile": 256, "extra_models": [1, 2]}}))
    state = RestoreState()
    load_settings({"restore": state}, path)
    assert state.strength == 1.0 and state.ensemble == 0  # out of range: the defaults
    assert state.tile == 256 and state.extra_models == []  # a valid one stays; a list of non-paths is ignored
    state.to_options()  # every run accepts what was loaded
