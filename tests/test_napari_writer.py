"""The npe2 writers: layer -> NIfTI / DICOM series -> napari_restore.load, geometry and values kept."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from napari.layers import Image, Layer

import napari_restore as nr
from napari_restore.errors import OutputError
from napari_restore.volume import LAYER_META_KEY

from napari_restore._napari._reader import napari_get_reader
from napari_restore._napari._writer import dicom_target, write_dicom, write_volume

PLUGIN = "napari-restore"
CT_5MM = "ct/philips-head-phantom/exam/S2010"
CT_TILT = "ct/philips-head-phantom/tilt/S3010"
MR_OBLIQUE = "fixtures/dicom2nifti/hitachi/anatomical/001"
MR_4D = "fixtures/ge-epi-4d/mr_0004"
CT_NIFTI = "ct/nifti/example_ct_sm.nii.gz"


def _layer(path: Path) -> Layer:
    """The main layer the reader makes of ``path``."""
    return Layer.create(*napari_get_reader(str(path))(str(path))[0])


def _source_volume(layer: Layer) -> nr.Volume:
    return nr.Volume.from_layer(layer.data, layer.metadata)


# --------------------------------------------------------------------------- NIfTI
def test_nifti_round_trip_of_dicom_layers_keeps_array_and_affine(shared_data, tmp_path):
    for rel in (CT_TILT, MR_OBLIQUE, MR_4D):  # sheared, oblique sagittal (permuted layer axes), 4-D
        layer = _layer(shared_data / rel)
        source = _source_volume(layer)
        data, attributes, _ = layer.as_layer_data_tuple()
        target = tmp_path / (Path(rel).name + ".nii.gz")
        assert write_volume(str(target), data, attributes) == [str(target)]
        (back,) = nr.load(target)
        assert back.array.shape == source.array.shape, rel
        np.testing.assert_array_equal(back.array, source.array)
        np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)


def test_nifti_round_trip_of_a_plain_napari_layer_keeps_its_world_transform(tmp_path):
    """A layer napari-restore did not make: its scale/translate/affine are read as (S, P, L) mm."""
    rng = np.random.default_rng(1)
    rot = np.eye(4)
    c, s = np.cos(0.3), np.sin(0.3)
    rot[1:3, 1:3] = [[c, -s], [s, c]]
    layer = Image(rng.normal(size=(5, 6, 7)).astype(np.float32), scale=(2.0, 0.7, 0.5),
                  translate=(10.0, -20.0, 30.0), affine=rot)
    data, attributes, _ = layer.as_layer_data_tuple()
    target = tmp_path / "plain.nii"
    write_volume(str(target), data, attributes)
    (back,) = nr.load(target)
    np.testing.assert_allclose(back.array, layer.data, atol=1e-6)
    np.testing.assert_allclose(back.world_affine(), layer._data_to_world.affine_matrix, atol=1e-5)


def test_writers_refuse_rgb_layers(tmp_path):
    layer = Image(np.zeros((8, 8, 3), np.uint8), rgb=True)
    data, attributes, _ = layer.as_layer_data_tuple()
    with pytest.raises(OutputError, match="RGB"):
        write_volume(str(tmp_path / "rgb.nii.gz"), data, attributes)
    assert not (tmp_path / "rgb.nii.gz").exists()


# --------------------------------------------------------------------------- DICOM
def test_dicom_target_strips_the_writer_extension(tmp_path):
    assert dicom_target(tmp_path / "ct_denoised.dcm") == tmp_path / "ct_denoised"
    assert dicom_target(tmp_path / "ct_denoised") == tmp_path / "ct_denoised"
    assert dicom_target(str(tmp_path) + "/.dcm") == tmp_path  # napari appends ".dcm" to "folder/"


def test_dicom_writer_refuses_layers_without_dicom_source_or_not_3d(shared_data, tmp_path):
    layer = _layer(shared_data / CT_NIFTI)
    data, attributes, _ = layer.as_layer_data_tuple()
    with pytest.raises(OutputError, match="no DICOM source"):
        write_dicom(str(tmp_path / "out.dcm"), data, attributes)
    assert not (tmp_path / "out").exists()
    # a 4-D DICOM layer has a source but is no single series: refused, nothing written
    data, attributes, _ = _layer(shared_data / MR_4D).as_layer_data_tuple()
    with pytest.raises(OutputError, match="3-D"):
        write_dicom(str(tmp_path / "epi.dcm"), data, attributes)
    assert not (tmp_path / "epi").exists()


def test_dicom_writer_replaces_only_its_own_previous_export(shared_data, tmp_path):
    layer = _layer(shared_data / CT_TILT)
    data, attributes, _ = layer.as_layer_data_tuple()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="holds other files"):
        write_dicom(str(occupied), data, attributes)
    assert (occupied / "notes.txt").read_text() == "keep me" and len(list(occupied.iterdir())) == 1
    target = tmp_path / "export"
    first = write_dicom(str(target) + ".dcm", data, attributes)
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in target.iterdir()}
    second = write_dicom(str(target) + ".dcm", data, attributes)  # a re-export replaces it
    assert first == second == [str(target)]
    uids2 = {pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in target.iterdir()}
    assert len(uids) == len(uids2) == 1 and uids != uids2
    assert len(list(target.iterdir())) == data.shape[0]


def test_viewer_exports_a_dicom_layer_as_dicom_and_nifti(make_napari_viewer, shared_data, tmp_path):
    viewer = make_napari_viewer()
    (layer,) = viewer.open(shared_data / CT_5MM, plugin=PLUGIN)
    source = _source_volume(layer)
    record_meta = layer.metadata[LAYER_META_KEY]["meta"]

    # DICOM: by the writer's name (a folder without suffix) and by the ".dcm" extension
    written = viewer.layers.save(str(tmp_path / "s2010_copy"), plugin=f"{PLUGIN}.write_dicom")
    assert written == [str(tmp_path / "s2010_copy")]
    written = viewer.layers.save(str(tmp_path / "s2010_again.dcm"))
    assert written == [str(tmp_path / "s2010_again")]
    for folder in (tmp_path / "s2010_copy", tmp_path / "s2010_again"):
        (back,) = nr.load(folder)
        assert back.array.shape == source.array.shape
        np.testing.assert_allclose(back.affine, source.affine, atol=1e-3)
        slope = float(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).RescaleSlope)
        assert np.abs(back.array - source.array).max() <= slope / 2 + 1e-4
        assert back.meta["study_uid"] == record_meta["study_uid"]
        assert back.meta["frame_of_reference_uid"] == record_meta["frame_of_reference_uid"]
        assert back.meta["series_uid"] != record_meta["series_uid"]

    # NIfTI through napari's own save
    written = viewer.layers.save(str(tmp_path / "s2010.nii.gz"), plugin=PLUGIN)
    assert written == [str(tmp_path / "s2010.nii.gz")]
    (back,) = nr.load(tmp_path / "s2010.nii.gz")
    np.testing.assert_array_equal(back.array, source.array)
    np.testing.assert_allclose(back.affine, source.affine, atol=1e-5)

    # the exported series opens again as a layer at the same place in the world
    (again,) = viewer.open(tmp_path / "s2010_copy", plugin=PLUGIN)
    np.testing.assert_allclose(again._data_to_world.affine_matrix, layer._data_to_world.affine_matrix, atol=1e-3)
