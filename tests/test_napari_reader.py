"""The npe2 reader in a real napari viewer (under Xvfb): claims, errors, geometry, overlay, screenshot.

Geometry is checked against the DICOM headers themselves (read here with pydicom), not against
our reader: in napari's world, (S, P, L) mm, voxel ``(k, 0, 0)`` must sit at the reversed
ImagePositionPatient of its slice, and one step along a row/column must be the reversed
ImageOrientationPatient vector times the pixel spacing.
"""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_restore import Volume
from napari_restore.errors import InputError
from napari_restore.volume import LAYER_META_KEY

from napari.layers import Image, Layer

from napari_restore._napari._reader import napari_get_reader, volume_to_layer_data

PLUGIN = "napari-restore"
CT_5MM = "ct/philips-head-phantom/exam/S2010"
CT_1MM = "ct/philips-head-phantom/exam/S2020"
CT_EXAM = "ct/philips-head-phantom/exam"
CT_TILT = "ct/philips-head-phantom/tilt/S3010"
MR_OBLIQUE = "fixtures/dicom2nifti/hitachi/anatomical/001"
MR_4D = "fixtures/ge-epi-4d/mr_0004"
CT_NIFTI = "ct/nifti/example_ct_sm.nii.gz"
SPL = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], float)


# --------------------------------------------------------------------------- helpers
def _headers(folder: Path) -> list[pydicom.Dataset]:
    """Headers of the image files of a single-frame series folder."""
    out = []
    for p in sorted(folder.iterdir()):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        if "ImagePositionPatient" in ds:
            out.append(ds)
    return out


def _layers_of(path: Path) -> list[Layer]:
    """napari layers built from what the reader returns (what viewer.open adds)."""
    reader = napari_get_reader(str(path))
    assert reader is not None, f"the reader declined {path}"
    return [Layer.create(*t) for t in reader(str(path))]


def _world(layer: Layer, index) -> np.ndarray:
    """World (S, P, L) mm of a *Volume* index ``(k, j, i)``: the layer's data axes may be permuted."""
    axes = layer.metadata[LAYER_META_KEY]["layer_axes"]
    index = np.asarray(index, float)
    return np.asarray(layer.data_to_world(index[list(axes)]), float)


def _assert_geometry_matches_headers(layer: Layer, headers: list[pydicom.Dataset], atol: float = 1e-3) -> None:
    """Every header's slice is one layer slice: same corner position and row/column steps."""
    record = layer.metadata[LAYER_META_KEY]
    axes = list(record["layer_axes"])
    world = SPL @ np.asarray(record["affine_lps"])
    inverse = [int(a) for a in np.argsort(axes)]  # layer data axis d is Volume axis axes[d]
    np.testing.assert_allclose(layer._data_to_world.affine_matrix[:, inverse + [3]], world, atol=1e-9)
    nz = layer.data.shape[axes.index(0)]
    corners = np.array([_world(layer, (k, 0, 0)) for k in range(nz)])
    assert len(headers) == nz
    for ds in headers:
        ipp = np.asarray(ds.ImagePositionPatient, float)[::-1]
        k = int(np.argmin(np.linalg.norm(corners - ipp, axis=1)))
        np.testing.assert_allclose(corners[k], ipp, atol=atol)
        iop = np.asarray(ds.ImageOrientationPatient, float)
        drow, dcol = (float(v) for v in ds.PixelSpacing)
        # column index i moves along IOP[:3] by the column spacing, row index j along IOP[3:]
        np.testing.assert_allclose(_world(layer, (k, 0, 1)) - corners[k], iop[:3][::-1] * dcol, atol=atol)
        np.testing.assert_allclose(_world(layer, (k, 1, 0)) - corners[k], iop[3:][::-1] * drow, atol=atol)


def _centre_of_mass_world(layer: Layer, threshold: float = -300.0) -> np.ndarray:
    """World (S, P, L) mm of the centre of mass of voxels above ``threshold`` HU."""
    idx = np.argwhere(np.asarray(layer.data) > threshold).mean(axis=0)
    return np.asarray(layer.data_to_world(idx), float)


# --------------------------------------------------------------------------- claims
def test_manifest_is_discovered_and_valid():
    from npe2 import PluginManager

    pm = PluginManager.instance()
    pm.discover()
    mf = pm.get_manifest(PLUGIN)
    assert {r.command for r in mf.contributions.readers} == {f"{PLUGIN}.get_reader"}
    assert {w.command for w in mf.contributions.writers} == {f"{PLUGIN}.write_volume", f"{PLUGIN}.write_dicom"}
    assert {s.key for s in mf.contributions.sample_data} == {"ct_phantom_noisy", "ct_phantom_clean"}
    for name in ("x/scan.nii.gz", "x/S2010/I10", "x/CT.1.3.12.2.1107.5.1.4.60064.3000002212080811"):
        assert PLUGIN in {r.plugin_name for r in pm.iter_compatible_readers([name])}, name
    for name in ("x/photo.png", "x/stack.tif", "x/notes.txt", "x/cells.h5", "x/movie.mp4", "x/slide.jp2"):
        assert PLUGIN not in {r.plugin_name for r in pm.iter_compatible_readers([name])}, name


def test_reader_declines_what_it_cannot_read(tmp_path, shared_data):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    fake_dcm = tmp_path / "fake.dcm"
    fake_dcm.write_text("hello, I am not DICOM" * 20)
    fake_nii = tmp_path / "fake.nii"
    fake_nii.write_bytes(b"\x00" * 400)
    not_gzip = tmp_path / "fake.nii.gz"
    not_gzip.write_bytes(b"plain bytes, not gzip")
    fake_nrrd = tmp_path / "fake.nrrd"
    fake_nrrd.write_text("PNG?")
    raw_samples = tmp_path / "0.0"  # raw int16 samples that look like a bare dataset's first element
    raw_samples.write_bytes(struct.pack("<512h", 8, *([0] * 511)))
    empty = tmp_path / "empty"
    empty.mkdir()
    no_dicom = tmp_path / "no_dicom"
    no_dicom.mkdir()
    (no_dicom / "a.txt").write_text("x")
    (no_dicom / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 200)
    for p in (text, fake_dcm, fake_nii, not_gzip, fake_nrrd, raw_samples, empty, no_dicom, tmp_path / "missing.dcm",
              shared_data / "README.md", shared_data / "ct" / "nifti"):  # the last: NIfTI only, no DICOM
        assert napari_get_reader(str(p)) is None, p
    assert napari_get_reader([str(shared_data / CT_NIFTI), str(text)]) is None
    assert napari_get_reader([]) is None


def test_reader_claims_images(shared_data):
    for rel in (CT_5MM, CT_EXAM, CT_NIFTI, "mr/nifti/T1.nii.gz", MR_OBLIQUE + "/001.dcm",
                CT_5MM + "/I10"):  # a DICOM file without a suffix, as napari passes a dropped file
        assert callable(napari_get_reader(str(shared_data / rel))), rel


def test_corrupt_claimed_files_raise_input_error_naming_the_file(tmp_path):
    # a NIfTI header that passes the cheap check, with its data cut off
    truncated = tmp_path / "truncated.nii.gz"
    header = struct.pack("<i", 348) + b"\x00" * 36 + struct.pack("<8h", 3, 64, 64, 64, 1, 1, 1, 1)
    header += b"\x00" * (348 - len(header))
    with gzip.open(truncated, "wb") as fh:
        fh.write(header + b"\x00" * 4 + b"\x01" * 100)
    # a DICOM preamble followed by garbage
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    for path in (truncated, broken):
        reader = napari_get_reader(str(path))
        assert reader is not None, path
        with pytest.raises(InputError, match=path.name):
            reader(str(path))


# --------------------------------------------------------------------------- geometry
def test_tilted_series_layer_geometry_matches_dicom_headers(shared_data):
    (layer,) = _layers_of(shared_data / CT_TILT)
    headers = _headers(shared_data / CT_TILT)
    tilt = float(headers[0].GantryDetectorTilt)
    assert abs(tilt) > 10  # the fixture really is tilted
    _assert_geometry_matches_headers(layer, headers)
    # the tilt is a shear: the slice step is not perpendicular to the rows
    world = layer._data_to_world.affine_matrix
    step, row_dir = world[:3, 0], world[:3, 1]
    angle = np.degrees(np.arccos(abs(step @ row_dir) / np.linalg.norm(step) / np.linalg.norm(row_dir)))
    assert abs(90 - angle - abs(tilt)) < 0.1
    # voxel values: one slice equals the file at that position, rescaled to HU
    ds = pydicom.dcmread(sorted((shared_data / CT_TILT).iterdir())[5])
    corners = np.array([_world(layer, (k, 0, 0)) for k in range(layer.data.shape[0])])
    k = int(np.argmin(np.linalg.norm(corners - np.asarray(ds.ImagePositionPatient, float)[::-1], axis=1)))
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_allclose(layer.data[k], hu, atol=1e-3)


def test_oblique_series_layer_geometry_matches_dicom_headers(shared_data):
    layers = _layers_of(shared_data / MR_OBLIQUE)
    headers = _headers(shared_data / MR_OBLIQUE)
    iop = np.asarray(headers[0].ImageOrientationPatient, float)
    assert np.min(np.abs(np.abs(iop[:3]) - 1)) > 0.2  # really oblique, not near an axis
    _assert_geometry_matches_headers(layers[0], headers)
    # a sagittal-ish series: the layer's data axes are permuted so napari can draw it, and the
    # Volume comes back in its own axis order
    record = layers[0].metadata[LAYER_META_KEY]
    assert tuple(record["layer_axes"]) != (0, 1, 2)
    back = Volume.from_layer(layers[0].data, layers[0].metadata)
    assert back.array.shape[0] == len(headers)
    np.testing.assert_array_equal(back.affine, record["affine_lps"])
    np.testing.assert_array_equal(np.transpose(back.array, record["layer_axes"]), layers[0].data)


@pytest.mark.parametrize("plane", ["axial", "axial_descending", "sagittal", "coronal"])
def test_layer_axes_make_every_plane_drawable(plane):
    """napari draws data axes (1, 2) against world axes (P, L): that block must be invertible."""
    cols = {  # LPS direction of the k, j, i steps
        "axial": [(0, 0, 1), (0, 1, 0), (1, 0, 0)],
        "axial_descending": [(0, 0, -1), (0, 1, 0), (1, 0, 0)],
        "sagittal": [(1, 0, 0), (0, 0, -1), (0, 1, 0)],
        "coronal": [(0, 1, 0), (0, 0, -1), (1, 0, 0)],
    }[plane]
    affine = np.eye(4)
    affine[:3, :3] = np.array(cols, float).T * np.array([3.0, 0.5, 0.7])
    affine[:3, 3] = (10, -20, 30)
    vol = Volume(np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6), affine, "MR")
    data, kwargs, _ = volume_to_layer_data(vol)
    layer = Image(data, **kwargs)
    axes = list(kwargs["metadata"][LAYER_META_KEY]["layer_axes"])
    assert (axes == [0, 1, 2]) == plane.startswith("axial")
    if axes == [0, 1, 2]:
        assert data is vol.array or np.shares_memory(data, vol.array)
    displayed = layer._data_to_world.affine_matrix[1:3, 1:3]
    assert abs(np.linalg.det(displayed)) > 0.1
    for index in [(0, 0, 0), (3, 4, 5), (1.5, 2, 0.5)]:
        np.testing.assert_allclose(_world(layer, index), (vol.world_affine() @ np.r_[index, 1])[:3], atol=1e-9)
    back = Volume.from_layer(layer.data, layer.metadata)
    np.testing.assert_array_equal(back.array, vol.array)


def test_4d_series_becomes_a_4d_layer(shared_data):
    layers = _layers_of(shared_data / MR_4D)
    layer = layers[0]
    assert layer.ndim == 4 and layer.data.ndim == 4 and layer.data.shape[0] > 1
    record = layer.metadata[LAYER_META_KEY]
    assert tuple(record["layer_axes"]) == (0, 1, 2)  # an axial EPI
    world3 = SPL @ np.asarray(record["affine_lps"])
    for index in [(0, 0, 0, 0), (3, 2.5, 10, 20)]:
        expect = world3 @ np.r_[index[1:], 1.0]
        world = np.asarray(layer.data_to_world(np.asarray(index, float)))
        np.testing.assert_allclose(world[1:], expect[:3], atol=1e-6)
        assert world[0] == pytest.approx(index[0])


# --------------------------------------------------------------------------- in the viewer
def test_viewer_opens_two_series_of_one_study_that_overlay(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    thick = viewer.open(shared_data / CT_5MM, plugin=PLUGIN)
    thin = viewer.open(shared_data / CT_1MM, plugin=PLUGIN)
    assert len(thick) == 1 and len(thin) == 1 and len(viewer.layers) == 2
    thick, thin = thick[0], thin[0]
    for layer, rel in ((thick, CT_5MM), (thin, CT_1MM)):
        assert isinstance(layer, Image)
        record = layer.metadata[LAYER_META_KEY]
        meta = record["meta"]
        assert record["modality"] == "CT"
        assert meta["series_uid"] and meta["dicom_header"].SeriesInstanceUID == meta["series_uid"]
        assert len(meta["source_sops"]) == layer.data.shape[0]
        assert Path(meta["source_path"]).resolve() == (shared_data / rel).resolve()
        np.testing.assert_allclose(layer._data_to_world.affine_matrix,
                                   Volume(layer.data, record["affine_lps"]).world_affine(), atol=1e-9)
        _assert_geometry_matches_headers(layer, _headers(shared_data / rel))
    assert thick.metadata[LAYER_META_KEY]["meta"]["study_uid"] == thin.metadata[LAYER_META_KEY]["meta"]["study_uid"]
    assert thick.data.shape[0] < thin.data.shape[0]  # 5 mm vs 1 mm slices
    # the phantom's centre of mass is at the same patient position in both (within a voxel)
    com_thick, com_thin = _centre_of_mass_world(thick), _centre_of_mass_world(thin)
    spacing = np.abs(np.asarray(thick.scale, float))
    assert np.all(np.abs(com_thick - com_thin) <= spacing), (com_thick, com_thin, spacing)
    # and the world extents of the two stacks coincide within a thick slice
    ext_thick, ext_thin = np.asarray(thick.extent.world), np.asarray(thin.extent.world)
    assert np.all(np.abs(ext_thick - ext_thin) <= spacing[0])


def test_viewer_opens_a_folder_of_several_series_main_first(make_napari_viewer, shared_data):
    viewer = make_napari_viewer()
    layers = viewer.open(shared_data / CT_EXAM, plugin=PLUGIN)
    assert len(layers) >= 2
    uids = [layer.metadata[LAYER_META_KEY]["meta"]["series_uid"] for layer in layers]
    assert len(set(uids)) == len(uids)
    # main series first and visible: the biggest axial CT volume; the others are hidden
    assert layers[0].visible and not any(layer.visible for layer in layers[1:])
    assert layers[0].data.size == max(layer.data.size for layer in layers)
    assert layers[0].data.shape[-2:] == (512, 512)


def test_screenshot_shows_ct_in_radiological_orientation(make_napari_viewer, shared_data):
    """A bright block at the patient's left anterior must appear top right on the screen."""
    viewer = make_napari_viewer(show=True)
    # world axes (S, P, L): vertical = P (anterior at the top), horizontal = L (left on the right)
    array = np.full((3, 64, 64), -1000.0, np.float32)
    array[:, 8:20, 44:56] = 1000.0  # small j = anterior, large i = patient's left
    affine = np.diag([2.0, 1.0, 1.0, 1.0])
    affine[:3, :3] = np.array([[0, 0, 1.0], [0, 1.0, 0], [2.0, 0, 0]])  # k->S, j->P, i->L
    marker = Volume(array, affine, "CT", {"description": "orientation marker", "window": (0, 2000)})
    data, kwargs, _ = volume_to_layer_data(marker)
    viewer.add_image(data, **kwargs)
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float).mean(-1)
    ys, xs = np.nonzero(shot > 128)
    assert ys.size > 0
    assert ys.mean() < shot.shape[0] / 2 and xs.mean() > shot.shape[1] / 2, (ys.mean(), xs.mean(), shot.shape)

    # the real CT: the picture is not blank
    viewer.layers.clear()
    (layer,) = viewer.open(shared_data / CT_5MM, plugin=PLUGIN)
    viewer.dims.set_point(0, float(np.mean(layer.extent.world[:, 0])))
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)
    assert shot.ndim == 3 and shot.shape[-1] == 4
    assert shot[..., :3].std() > 20, "the screenshot is (nearly) blank"

    # an oblique sagittal MR is drawn too (its layer axes are permuted to face the screen)
    viewer.layers.clear()
    (layer,) = viewer.open(shared_data / MR_OBLIQUE, plugin=PLUGIN)
    viewer.reset_view()
    assert viewer.screenshot(canvas_only=True, flash=False)[..., :3].std() > 10
