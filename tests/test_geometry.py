"""Every slice where the scanner put it: an unevenly spaced series built from real phantom slices
(4 mm then 7 mm steps, one duplicated position) through the reader, the DICOM and NIfTI writers,
restoration, the CLI and napari; series shown in their own plane."""
from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

import napari_restore as nr
from napari_restore.errors import InputError, OutputError
from napari_restore.geometry import describe_steps, survey_gap, uniform_runs

from _irregular import OFFSETS_MM, make_irregular_series, slices_by_position


@pytest.fixture(scope="module")
def irregular(tmp_path_factory, shared_data) -> tuple[Path, list[float]]:
    return make_irregular_series(shared_data, tmp_path_factory.mktemp("irr") / "series")


@pytest.fixture(scope="module")
def irregular_volume(irregular) -> nr.Volume:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = nr.load(irregular[0])[0]
    vol.meta["_caught"] = [str(w.message) for w in caught]
    return vol


def test_runs_and_steps_in_words():
    off = np.array(OFFSETS_MM, float)
    assert uniform_runs(off) == [(0, 14), (14, 26)]
    assert describe_steps(off) == "4 mm (slices 1-14), 7 mm (slices 15-26)"
    assert uniform_runs(np.arange(5) * 2.5) == [(0, 5)]
    assert survey_gap(np.arange(10) * 52.0, 5.0) and not survey_gap(np.arange(10) * 5.0, 5.0)


def test_reader_keeps_every_position_and_says_so(irregular, irregular_volume):
    folder, source = irregular
    vol = irregular_volume
    assert vol.array.shape[0] == 26  # the duplicate dropped, and said so
    notes = " | ".join(vol.meta["warnings"])
    assert "DUPLICATE.dcm" in notes and "4 mm (slices 1-14), 7 mm (slices 15-26)" in notes
    assert not vol.is_uniform and vol.uniform_runs() == [(0, 14), (14, 26)]
    np.testing.assert_allclose(vol.slice_offsets, np.array(source) - source[0], atol=1e-3)
    # the affine alone would misplace slice 14 by centimetres; the positions do not
    mean_pred = vol.affine[:3, 3] + 14 * vol.affine[:3, 0]
    assert np.linalg.norm(mean_pred - vol.slice_positions[14]) > 10


def test_dicom_export_puts_every_slice_on_its_source(irregular_volume, tmp_path):
    vol = irregular_volume
    out = nr.save(vol.copy_with(vol.array + 1.0), tmp_path / "derived", format="dicom")
    files = sorted(out.iterdir())
    assert len(files) == 26
    src_by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f
                  for _, f in slices_by_position(Path(vol.meta["source_path"]))}
    worst = 0.0
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        src = pydicom.dcmread(src_by_uid[ref], stop_before_pixels=True)
        worst = max(worst, float(np.max(np.abs(np.subtract(ds.ImagePositionPatient, src.ImagePositionPatient, dtype=float)))))
        assert float(ds.SliceThickness) == float(src.SliceThickness)
    assert worst <= 0.01
    # SimpleITK reads the same positions back (one file at a time: it keeps each slice's origin)
    import SimpleITK as sitk

    origins = np.array([sitk.ReadImage(str(f)).GetOrigin() for f in files])
    d = (origins - origins[0]) @ np.cross(vol.affine[:3, 2], vol.affine[:3, 1]) / np.linalg.norm(
        np.cross(vol.affine[:3, 2], vol.affine[:3, 1]))
    np.testing.assert_allclose(np.sort(np.abs(d)), np.array(OFFSETS_MM, float), atol=0.01)


def test_nifti_refuses_uneven_steps_unless_resampled(irregular_volume, tmp_path):
    vol = irregular_volume
    target = tmp_path / "out.nii.gz"
    with pytest.raises(OutputError, match=r"4 mm \(slices 1-14\), 7 mm \(slices 15-26\)") as info:
        nr.save(vol, target)
    assert str(target) in str(info.value) and not target.exists()
    with pytest.raises(OutputError, match="unevenly spaced"):
        nr.save(vol, tmp_path / "out.mha")
    written = nr.save(vol, target, resample="uniform")
    back = nr.load(written)[0]
    assert back.array.shape[0] == 35 and abs(back.spacing[0] - 4.0) < 1e-3
    # grid points that fall on a source slice hold that slice exactly (offset 52 mm = slice 14, 136 mm = slice 26)
    np.testing.assert_allclose(back.array[13], vol.array[13], atol=1e-3)
    np.testing.assert_allclose(back.array[34], vol.array[25], atol=1e-3)
    res = vol.resampled_uniform()
    assert res.meta["provenance"][-1]["step"] == "resample_uniform"
    assert res.meta["provenance"][-1]["step_mm"] == 4.0


def test_neighbour_reading_restore_works_per_run(irregular_volume):
    """A 2.5-D model never reads across the 4 -> 7 mm change: the whole series restores exactly as
    its two runs do alone, and the result says so."""
    crop = irregular_volume.copy_with(irregular_volume.array[:, 192:320, 192:320])
    crop.meta = dict(irregular_volume.meta)
    whole = nr.restore(crop, model="denoise-ct-25d", device="cpu")
    assert any("2 uniform runs" in w for w in whole.meta["warnings"])
    for a, b in crop.uniform_runs():
        part = nr.restore(crop.subvolume(a, b), model="denoise-ct-25d", device="cpu")
        np.testing.assert_allclose(whole.array[a:b], part.array, atol=1e-4)
    assert np.allclose(whole.slice_positions, irregular_volume.slice_positions)


def test_unorderable_positions_refused(shared_data, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for i, (_, f) in enumerate(slices_by_position(shared_data / "ct/philips-head-phantom/exam/S2010")[:4]):
        ds = pydicom.dcmread(f)
        if i == 2:
            del ds.ImagePositionPatient
        ds.save_as(folder / f.name)
    with pytest.raises(InputError, match="ImagePositionPatient") as info:
        nr.load(folder)
    assert folder.name in str(info.value)


def test_cli_refuses_nifti_and_warns_once(irregular, tmp_path):
    exe = [sys.executable, "-m", "napari_restore.cli"]
    out = tmp_path / "o.nii.gz"
    r = subprocess.run(exe + ["restore", str(irregular[0]), str(out), "--model", "denoise-ct", "--device", "cpu"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "unevenly spaced" in r.stderr and not out.exists()
    r = subprocess.run(exe + ["restore", str(irregular[0]), str(out), "--model", "denoise-ct", "--device", "cpu",
                              "--resample-uniform"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("non-uniform slice spacing") == 1 and r.stderr.count("DUPLICATE.dcm") == 1
    assert nr.load(out)[0].array.shape[0] == 35


def test_napari_shows_exact_runs_and_notifies(make_napari_viewer, irregular):
    from napari.utils.notifications import notification_manager

    notes: list[str] = []
    notification_manager.notification_ready.connect(lambda n: notes.append(str(n.message)))
    viewer = make_napari_viewer()
    viewer.open(str(irregular[0]), plugin="napari-restore")
    names = [lay.name for lay in viewer.layers]
    assert len(names) == 2 and "[slices 1-14, 4 mm]" in names[0] and "[slices 15-26, 7 mm]" in names[1]
    source = irregular[1]
    world_s = [viewer.layers[0].data_to_world((k, 0, 0))[0] for k in range(14)]
    world_s += [viewer.layers[1].data_to_world((k, 0, 0))[0] for k in range(12)]
    np.testing.assert_allclose(np.array(world_s) - world_s[0], np.array(source) - source[0], atol=0.01)
    assert sum("non-uniform slice spacing" in n for n in notes) == 1
    assert sum("DUPLICATE.dcm" in n for n in notes) == 1
    # the parts export back to exactly their source slices
    from napari_restore._napari._layers import layer_volume

    part = layer_volume(viewer.layers[1])
    assert part.is_uniform and len(part.meta["source_sops"]) == 12


def test_sagittal_series_opens_sagittal_superior_up(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    viewer.open(str(shared_data / "mr/uih-t1-sag"), plugin="napari-restore")
    layer = viewer.layers[0]
    assert viewer.dims.order == (2, 0, 1)  # slider: L; on screen: S (vertical) x P (horizontal)
    assert str(viewer.camera.orientation2d[0]) in ("up", "VerticalAxisOrientation.UP")
    # the slider runs through the series' own slices: one step of it is one sagittal slice
    assert viewer.dims.range[2].step == pytest.approx(layer.scale[2], rel=1e-6)
    assert layer.data.shape[2] == nr.load(shared_data / "mr/uih-t1-sag")[0].array.shape[0]


def test_reformatted_views_keep_superior_up(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    viewer.open(str(shared_data / "ct/philips-head-phantom/exam/S2010"), plugin="napari-restore")
    assert viewer.dims.order == (0, 1, 2)
    assert "down" in str(viewer.camera.orientation2d[0])  # axial: P down, anterior up
    viewer.dims.order = (1, 0, 2)  # coronal reformat
    assert "up" in str(viewer.camera.orientation2d[0]).lower()
    viewer.dims.order = (2, 0, 1)  # sagittal reformat
    assert "up" in str(viewer.camera.orientation2d[0]).lower()
    viewer.dims.order = (0, 1, 2)
    assert "down" in str(viewer.camera.orientation2d[0]).lower()


def test_batch_manifest_records_geometry_notes(irregular, tmp_path):
    import csv

    out = tmp_path / "batch"
    r = subprocess.run([sys.executable, "-m", "napari_restore.cli", "batch", str(irregular[0].parent), str(out),
                        "--model", "denoise-ct", "--device", "cpu", "--no-progress", "--pool", "thread"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert len(rows) == 1
    assert "non-uniform slice spacing" in rows[0]["warnings"] and "DUPLICATE.dcm" in rows[0]["warnings"]
    exported = slices_by_position(next(p for p in out.rglob("*") if p.is_dir() and any(p.glob("*.dcm"))))
    np.testing.assert_allclose([d - exported[0][0] for d, _ in exported], np.array(irregular[1]) - irregular[1][0],
                               atol=0.01)


def test_cli_deidentified_export_is_named_safely(shared_data, tmp_path):
    exe = [sys.executable, "-m", "napari_restore.cli", "restore", str(shared_data / "ct/philips-head-phantom/exam/S2010")]
    r = subprocess.run(exe + [str(tmp_path / "a"), "--model", "denoise-ct", "--device", "cpu", "--deidentify"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(sorted((tmp_path / "a").iterdir())[0], stop_before_pixels=True)
    assert ds.SeriesDescription == "denoise denoise-ct, de-identified"
    r = subprocess.run(exe + [str(tmp_path / "b"), "--model", "denoise-ct", "--device", "cpu", "--deidentify",
                              "--deidentify-keep-description"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    ds = pydicom.dcmread(sorted((tmp_path / "b").iterdir())[0], stop_before_pixels=True)
    assert ds.SeriesDescription.startswith("STD BRAIN 5MM")
