"""The generated CT phantom (core), its DICOM/NIfTI export script and the napari sample data."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

import napari_restore as nr
from napari_restore.sample import HU, fbp_like_noise, make_ct_phantom
from napari_restore.volume import LAYER_META_KEY

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(shape=(8, 96, 96), spacing=(2.5, 0.8, 0.8))


@pytest.fixture(scope="module")
def clean():
    return make_ct_phantom(noisy=False)


@pytest.fixture(scope="module")
def noisy():
    return make_ct_phantom(noisy=True)


def _index_of(vol: nr.Volume, lps_mm) -> tuple[int, int, int]:
    """Nearest voxel index (k, j, i) of an LPS point."""
    kji = np.linalg.solve(vol.affine[:3, :3], np.asarray(lps_mm, float) - vol.affine[:3, 3])
    return tuple(int(round(v)) for v in kji)


def test_phantom_geometry_and_metadata(noisy):
    vol = noisy
    assert vol.array.shape == (24, 192, 192) and vol.array.dtype == np.float32
    assert vol.modality == "CT"
    np.testing.assert_allclose(vol.spacing, (2.5, 0.8, 0.8))
    # axial: columns run to the patient's left (+x), rows to posterior (+y), slices superior
    np.testing.assert_allclose(vol.affine[:3, :3], [[0, 0, 0.8], [0, 0.8, 0], [2.5, 0, 0]])
    centre = vol.affine @ np.r_[(np.array(vol.array.shape) - 1) / 2, 1]
    np.testing.assert_allclose(centre[:3], 0, atol=1e-9)  # centred on the isocentre
    assert vol.meta["description"] == "Sample CT phantom"
    assert vol.meta["window"] == (40.0, 400.0)
    header = vol.meta["dicom_header"]
    assert isinstance(header, pydicom.Dataset) and "PixelData" not in header
    assert header.Modality == "CT"
    assert header.StudyInstanceUID == vol.meta["study_uid"]
    assert header.SeriesInstanceUID == vol.meta["series_uid"]
    assert header.FrameOfReferenceUID == vol.meta["frame_of_reference_uid"]
    np.testing.assert_allclose(np.asarray(header.ImagePositionPatient, float), vol.origin, atol=1e-3)
    for uid in (vol.meta["study_uid"], vol.meta["series_uid"], vol.meta["frame_of_reference_uid"]):
        assert pydicom.uid.UID(uid).is_valid


def test_phantom_materials_in_hu(clean):
    vol = clean
    k = vol.array.shape[0] // 2
    assert vol.array[k, 0, 0] == pytest.approx(HU["air"], abs=1)  # corner: air
    assert vol.array[k, 96, 96] == pytest.approx(HU["brain"], abs=5)  # near the centre: brain
    # the skull on the left-right axis is bone (cortical tables ~1000 HU, blurred by the PSF)
    # with soft tissue and fat outside it
    row = vol.array[k, 96]
    assert row.max() > 800
    assert np.any(np.abs(row - HU["fat"]) < 30)
    # inserts of different HU: each is flat at its nominal value in its centre
    half = 0.5 * 192 * 0.8
    from napari_restore.sample import INSERTS

    values = []
    for name, value, angle in INSERTS:
        a = np.deg2rad(angle)
        lps = (0.45 * half * np.sin(a), -1.1 * 0.45 * half * np.cos(a), vol.affine[2, 3] + k * 2.5)
        kk, j, i = _index_of(vol, lps)
        patch = vol.array[kk, j - 2:j + 3, i - 2:i + 3]
        assert patch.mean() == pytest.approx(value, abs=2), name
        values.append(patch.mean())
    assert len({round(v) for v in values}) == len(INSERTS)
    # fine structures: the tiny calcifications and the bars make edges well above the background
    assert (vol.array[k] > 300).sum() > 0
    assert vol.array.min() >= -1000.5 and vol.array.max() <= 1000.5


def test_noise_is_ct_like_and_reproducible(clean, noisy):
    noise = noisy.array - clean.array
    assert noise.std() == pytest.approx(25.0, rel=0.05)
    assert abs(noise.mean()) < 1.0
    # FBP-like texture: the noise power spectrum is low at DC and peaks at mid frequencies
    nps = np.mean(np.abs(np.fft.fft2(noise, axes=(1, 2))) ** 2, axis=0)
    fy, fx = np.meshgrid(np.fft.fftfreq(192), np.fft.fftfreq(192), indexing="ij")
    f = np.hypot(fy, fx) / 0.5
    band = [nps[(f >= lo) & (f < lo + 0.1)].mean() for lo in np.arange(0, 1.0, 0.1)]
    peak = int(np.argmax(band))
    assert 1 <= peak <= 6, band
    assert band[0] < 0.5 * band[peak] and band[-1] < 0.5 * band[peak]
    # neighbouring pixels are correlated (not white noise)
    corr = np.corrcoef(noise[:, :, :-1].ravel(), noise[:, :, 1:].ravel())[0, 1]
    assert abs(corr) > 0.1
    # same seed, same noise; another seed, other noise
    np.testing.assert_array_equal(make_ct_phantom(**SMALL, seed=3).array, make_ct_phantom(**SMALL, seed=3).array)
    assert not np.array_equal(fbp_like_noise((2, 32, 32), 10, 1), fbp_like_noise((2, 32, 32), 10, 2))
    assert make_ct_phantom(**SMALL, noise_hu=10).array.std() < make_ct_phantom(**SMALL, noise_hu=50).array.std()


def test_phantom_honours_shape_and_spacing():
    vol = make_ct_phantom(shape=(6, 64, 80), spacing=(3.0, 1.0, 0.9), noisy=False)
    assert vol.array.shape == (6, 64, 80)
    np.testing.assert_allclose(vol.spacing, (3.0, 1.0, 0.9))
    assert (vol.array > 500).any() and (vol.array < -900).any()
    with pytest.raises(ValueError):
        make_ct_phantom(shape=(0, 10, 10))


def test_phantom_exports_as_dicom_like_a_real_scan(tmp_path):
    vol = make_ct_phantom(**SMALL)
    out = nr.save(vol, tmp_path / "phantom", format="dicom")
    (back,) = nr.load(out)
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-3)
    slope = float(pydicom.dcmread(next(out.iterdir()), stop_before_pixels=True).RescaleSlope)
    assert np.abs(back.array - vol.array).max() <= slope / 2 + 1e-4
    ds = pydicom.dcmread(sorted(out.iterdir())[0], stop_before_pixels=True)
    assert ds.PatientName == "Phantom^Sample"
    assert ds.StudyInstanceUID == vol.meta["study_uid"]
    assert ds.FrameOfReferenceUID == vol.meta["frame_of_reference_uid"]
    res = subprocess.run(["dciodvfy", str(sorted(out.iterdir())[0])], capture_output=True, text=True, timeout=60)
    errors = [line for line in (res.stdout + res.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_make_sample_script_writes_dicom_and_nifti(tmp_path):
    spec = importlib.util.spec_from_file_location("make_sample", REPO / "sample_data" / "make_sample.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "out"
    assert module.main(["--out", str(out), "--shape", "6", "64", "64"]) == 0
    assert (out / ".gitignore").read_text().strip().endswith("*")
    for stem in ("ct_phantom_noisy", "ct_phantom_clean"):
        (nifti,) = nr.load(out / f"{stem}.nii.gz")
        (dicom,) = nr.load(out / stem)
        assert nifti.array.shape == dicom.array.shape == (6, 64, 64)
        np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-3)
        assert np.abs(dicom.array - nifti.array).max() < 1.0
    (noisy,), (clean,) = nr.load(out / "ct_phantom_noisy"), nr.load(out / "ct_phantom_clean")
    assert noisy.meta["study_uid"] == clean.meta["study_uid"] != ""
    assert noisy.meta["series_uid"] != clean.meta["series_uid"]
    assert module.main(["--out", str(out), "--shape", "6", "64", "64"]) == 1  # exists: refused
    assert module.main(["--out", str(out), "--shape", "6", "64", "64", "--overwrite"]) == 0


def test_napari_sample_data_loads_as_layers(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample("napari-restore", "ct_phantom_noisy")
    viewer.open_sample("napari-restore", "ct_phantom_clean")
    assert [layer.name for layer in viewer.layers] == ["CT phantom (noisy)", "CT phantom (clean)"]
    noisy, clean = viewer.layers
    for layer in viewer.layers:
        record = layer.metadata[LAYER_META_KEY]
        assert record["modality"] == "CT" and record["meta"]["dicom_header"] is not None
        assert layer.data.shape == (24, 192, 192)
        assert tuple(layer.contrast_limits) == (-160.0, 240.0)
        vol = nr.Volume.from_layer(layer.data, layer.metadata)
        np.testing.assert_allclose(layer._data_to_world.affine_matrix, vol.world_affine(), atol=1e-9)
    assert np.array_equal(noisy._data_to_world.affine_matrix, clean._data_to_world.affine_matrix)
    assert (np.asarray(noisy.data) - np.asarray(clean.data)).std() == pytest.approx(25, rel=0.05)
