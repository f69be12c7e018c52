"""The DICOM reader against SimpleITK and dcm2niix on every series in ../shared/data.

Geometry must agree within 1e-3 mm and voxel values exactly, except where those tools are known
to be wrong; there the test says why and checks the right answer instead.
"""
from __future__ import annotations

import shutil
import subprocess
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import napari_restore as nr
from napari_restore.io.nifti import sitk_affine

from geometry import align_to, nifti_to_lps

warnings.filterwarnings("ignore", module="napari_restore.io.dicom_read")

# folder under ../shared/data -> (number of series expected, shape of the main series)
SERIES = {
    "ct/philips-head-phantom/exam/S2020": (1, (140, 512, 512)),
    "ct/philips-head-phantom/exam/S2010": (1, (28, 512, 512)),
    "ct/philips-head-phantom/tilt/S3010": (1, (58, 512, 512)),
    "ct/siemens-body-j2k": (1, (20, 512, 512)),
    "mr/uih-t1-sag": (1, (160, 512, 460)),
    "mr/siemens-xa30-enhanced/5_anat-T1w_acq-tfl": (1, (96, 128, 128)),
    "mr/siemens-prisma-jpeg-fragments": (1, (96, 128, 128)),
    "fixtures/dicom2nifti/philips/anatomical/001": (1, (4, 240, 240)),
    "fixtures/dicom2nifti/hitachi/anatomical/001": (1, (4, 64, 64)),
    "fixtures/dicom2nifti/philips_enhanced/anatomical/001": (1, (8, 256, 256)),
    "fixtures/dicom2nifti/hyperfine/anatomical/001": (1, (8, 138, 112)),
    "fixtures/dicom2nifti/failing/slicecount/001": (1, (2, 256, 256)),
}
FRAGMENTED = {"mr/siemens-prisma-jpeg-fragments"}
TILTED = {"ct/philips-head-phantom/tilt/S3010"}
ENHANCED = {"mr/siemens-xa30-enhanced/5_anat-T1w_acq-tfl", "fixtures/dicom2nifti/philips_enhanced/anatomical/001",
            "fixtures/dicom2nifti/hyperfine/anatomical/001"}


def _dicom_files(folder: Path) -> list[Path]:
    out = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True)
            except Exception:
                continue
            if "Rows" in ds:
                out.append(p)
    return out


def _load_one(path: Path) -> nr.Volume:
    vols = nr.load(path)
    assert len(vols) >= 1
    return vols[0]


@pytest.mark.parametrize("folder", sorted(SERIES))
def test_series_shape_and_count(shared_data, folder):
    n, shape = SERIES[folder]
    vols = nr.load(shared_data / folder)
    assert len(vols) == n
    assert vols[0].array.shape == shape
    assert vols[0].array.dtype == np.float32


@pytest.mark.parametrize("folder", sorted(set(SERIES) - ENHANCED))
def test_agrees_with_simpleitk(shared_data, folder):
    vol = _load_one(shared_data / folder)
    reader = sitk.ImageSeriesReader()
    files = _dicom_files(shared_data / folder)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).get("SeriesInstanceUID", ""))
    names = reader.GetGDCMSeriesFileNames(str(shared_data / folder), uid) if uid else [str(f) for f in files]
    reader.SetFileNames(names)
    img = reader.Execute()
    ref = sitk.GetArrayFromImage(img).astype(np.float32)
    ref_affine = sitk_affine(img)
    if folder in TILTED:
        # SimpleITK keeps an orthonormal direction and so cannot hold a gantry tilt: it puts the
        # slices at the wrong place (no shear). The right answer: our slice k sits exactly at the
        # k-th ImagePositionPatient along the normal, with the tilt as a shear of the affine.
        assert vol.meta["gantry_tilt_deg"] == pytest.approx(16.5, abs=0.1)
        _check_positions_match_headers(vol, files)
        assert np.allclose(vol.affine[:3, 1:], ref_affine[:3, 1:], atol=1e-3)  # in-plane axes agree
        assert not np.allclose(vol.affine[:3, 0], ref_affine[:3, 0], atol=1e-2)  # SimpleITK's slice axis is wrong
        np.testing.assert_array_equal(vol.array, ref)  # same slice order and values
        return
    # SimpleITK may index the slices the other way round (it keeps the files' order): align the grids
    np.testing.assert_array_equal(vol.array, align_to(ref, ref_affine, vol.affine, vol.array.shape))


def _check_positions_match_headers(vol: nr.Volume, files: list[Path]) -> None:
    ipps = np.array([[float(x) for x in pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient] for f in files])
    ours = np.array([vol.affine @ [k, 0, 0, 1] for k in range(vol.array.shape[0])])[:, :3]
    for p in ours:
        assert np.min(np.linalg.norm(ipps - p, axis=1)) < 1e-3


def _dcm2niix(files: list[Path], tmp: Path, decompress: bool = False) -> list[Path]:
    src = tmp / "src"
    src.mkdir()
    for i, f in enumerate(files):
        if decompress:  # dcm2niix cannot decode JPEG lossless split over fragments; dcmtk can
            subprocess.run(["dcmdjpeg", str(f), str(src / f"{i:05d}.dcm")], check=True, capture_output=True)
        else:
            shutil.copy(f, src / f"{i:05d}.dcm")
    out = tmp / "out"
    out.mkdir()
    # -p n: display values (RescaleSlope/Intercept), not Philips' private "precise" floating-point scaling
    subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-p", "n", "-f", "%s_%e", "-o", str(out), str(src)],
                   check=True, capture_output=True, timeout=120)
    return sorted(out.glob("*.nii"))


@pytest.mark.parametrize("folder", sorted(SERIES))
def test_agrees_with_dcm2niix(shared_data, folder, tmp_path):
    vol = _load_one(shared_data / folder)
    outs = _dcm2niix(_dicom_files(shared_data / folder), tmp_path, decompress=folder in FRAGMENTED)
    if folder in TILTED:
        # dcm2niix writes the tilted series twice: once as acquired with an orthogonal (wrong) affine,
        # once resampled ("_Tilt_") onto an orthogonal grid, so neither matches the scanner's voxels
        # and positions. The right answer is checked against the headers in test_agrees_with_simpleitk.
        plain = [o for o in outs if "Tilt" not in o.name]
        arr, _ = nifti_to_lps(nib.load(plain[0]))
        assert arr.shape[0] == vol.array.shape[0]
        return
    assert len(outs) == 1, [o.name for o in outs]
    arr, aff = nifti_to_lps(nib.load(outs[0]))
    atol = 1e-3
    if folder in FRAGMENTED:
        # dcm2niix's slice step here is 2.0001 mm, while the 96 ImagePositionPatient values are
        # 2.000001 mm apart (first to last / 95): ours follows the headers exactly.
        _check_positions_match_headers(vol, _dicom_files(shared_data / folder))
        atol = 1e-2
    aligned = align_to(arr, aff, vol.affine, vol.array.shape, atol=atol)
    np.testing.assert_array_equal(vol.array, aligned.astype(np.float32))


def test_mosaic_transfer_syntaxes_agree_with_dcm2niix_reference(shared_data):
    """Nine transfer syntaxes of one Siemens mosaic: one SeriesInstanceUID, nine SeriesNumbers."""
    folder = shared_data / "fixtures/transfer-syntaxes"
    vols = nr.load(folder / "In")
    assert len(vols) == 9  # shared UID, split by SeriesNumber (as dcm2niix does)
    by_number = {int(v.meta["series_number"]): v for v in vols}
    assert sorted(by_number) == list(range(1, 10))
    first = by_number[1]
    for n, v in by_number.items():
        assert v.array.shape == (35, 64, 64)
        np.testing.assert_array_equal(v.array, first.array)  # every syntax decodes to the same voxels
        np.testing.assert_allclose(v.affine, first.affine, atol=1e-6)
        ref, ref_aff = nifti_to_lps(nib.load(folder / "Ref" / f"{n}.nii"))
        aligned = align_to(ref, ref_aff, v.affine, v.array.shape)
        np.testing.assert_array_equal(v.array, aligned)


def test_exam_folder_splits_series_main_first(shared_data):
    vols = nr.load(shared_data / "ct/philips-head-phantom/exam")
    shapes = [v.array.shape for v in vols]
    assert shapes[0] == (140, 512, 512) and shapes[1] == (28, 512, 512)
    assert all(v.modality == "CT" for v in vols)
    # the localizer is kept, after the axial series; RGB secondary captures are not images to restore
    assert any(v.array.shape[-3:] == (1, 256, 512) for v in vols[2:])
    assert len({v.meta["series_uid"] for v in vols[:2]}) == 2
    for v in vols[:2]:  # 12-bit unsigned + intercept -1024: air outside the field of view is -1024 HU
        assert v.array.min() == -1024


def test_series_of_one_study_share_patient_space(shared_data):
    """The 5 mm and 1 mm series of one exam cover the same phantom: their centres coincide."""
    thick, thin = (nr.load(shared_data / f"ct/philips-head-phantom/exam/{s}")[0] for s in ("S2010", "S2020"))
    def centre(v):
        k, j, i = np.nonzero(v.array > -300)
        idx = np.stack([k.mean(), j.mean(), i.mean(), 1.0])
        return (v.affine @ idx)[:3]
    # inplane centres agree within a pixel; the thin series covers a sub-range of z
    assert np.allclose(centre(thick)[:2], centre(thin)[:2], atol=1.0)
    assert thick.meta["frame_of_reference_uid"] == thin.meta["frame_of_reference_uid"]


def test_ct_rescale_gives_hu_and_uid_fallbacks(shared_data):
    vol = _load_one(shared_data / "ct/siemens-body-j2k")  # JPEG 2000, empty SOPClassUID and UIDs
    assert vol.modality == "CT"
    assert vol.array.min() == -1024
    assert vol.meta["source_sops"][0]["sop_class"] == "1.2.840.10008.5.1.4.1.1.2"  # from the file meta
    assert vol.spacing == pytest.approx((2.0, 0.9765625, 0.9765625))  # from positions, not the 3 mm thickness
    assert vol.meta["slice_thickness"] == 3.0


def test_order_by_position_not_instance_number(shared_data):
    vol = _load_one(shared_data / "ct/siemens-body-j2k")
    z = [vol.affine @ [k, 0, 0, 1] for k in range(vol.array.shape[0])]
    normal = np.cross(vol.affine[:3, 2], vol.affine[:3, 1])
    d = [float(p[:3] @ normal) / np.linalg.norm(normal) for p in z]
    assert np.all(np.diff(d) > 0)


def test_4d_series_is_not_stacked_into_3d(shared_data):
    vol = _load_one(shared_data / "fixtures/ge-epi-4d/mr_0004")
    assert vol.array.shape == (10, 15, 64, 64)
    assert vol.meta["time_points"] == 10
    # time points differ (fMRI signal), positions are the 15 distinct slices
    assert not np.array_equal(vol.array[0], vol.array[1])
    same_position = _load_one(shared_data / "fixtures/dicom2nifti/failing/notavolume")
    assert same_position.array.shape == (4, 1, 512, 512)


def test_non_uniform_spacing_reported(shared_data):
    with pytest.warns(UserWarning, match="non-uniform slice spacing"):
        vols = nr.load(shared_data / "fixtures/dicom2nifti/failing/sliceincrement")
    assert all(v.meta["slice_spacing_nonuniform"] for v in vols)


def test_mixed_orientations_split(shared_data):
    vols = nr.load(shared_data / "fixtures/dicom2nifti/failing/sliceorientation")
    assert len(vols) == 2
    normals = [np.cross(v.affine[:3, 2], v.affine[:3, 1]) for v in vols]
    assert abs(normals[0] @ normals[1]) / (np.linalg.norm(normals[0]) * np.linalg.norm(normals[1])) < 0.9


def test_dicomdir_with_stale_references_reads_its_folder(shared_data):
    """The exam's DIRFILE points at folders of the original media (S21570/...) that were renamed."""
    vols = nr.load(shared_data / "ct/philips-head-phantom/exam/DIRFILE")
    assert vols[0].array.shape == (140, 512, 512)


@pytest.mark.parametrize("name", [
    "emri_small.dcm", "emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
    "emri_small_jpeg_ls_lossless.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "eCT_Supplemental.dcm", "MR2_J2KR.dcm",
])
def test_single_files_in_many_transfer_syntaxes(shared_data, name):
    vol = _load_one(shared_data / "fixtures/pydicom-data" / name)
    assert np.all(np.isfinite(vol.array)) and vol.array.std() > 0


def test_compressed_variants_decode_identically(shared_data):
    base = shared_data / "fixtures/pydicom-data"
    ref = _load_one(base / "emri_small.dcm").array
    for name in ("emri_small_RLE.dcm", "emri_small_big_endian.dcm", "emri_small_jpeg_2k_lossless.dcm",
                 "emri_small_jpeg_ls_lossless.dcm"):
        np.testing.assert_array_equal(_load_one(base / name).array, ref)
    mr2 = _load_one(base / "MR2_UNCR.dcm").array
    for name in ("MR2_J2KR.dcm",):
        np.testing.assert_array_equal(_load_one(base / name).array, mr2)


@pytest.mark.parametrize("rel", [
    "fixtures/pylibjpeg/JPEGExtended/JPEGExtended_1s_1f_u_16_12.dcm",
    "fixtures/pylibjpeg/JPEGLossless/JPEGLossless_1s_1f_u_16_12.dcm",
    "fixtures/pylibjpeg/JPEGLS/CT1_JLSN.dcm",
    "fixtures/pylibjpeg/JPEG2000/MAROTECH_CT_JP2Lossy.dcm",
    "fixtures/pylibjpeg/JPEGBaseline/JPEGBaseline_1s_1f_u_08_08.dcm",
])
def test_pylibjpeg_syntaxes(shared_data, rel):
    vol = _load_one(shared_data / rel)
    assert vol.array.std() > 0


@pytest.mark.parametrize("rel, message", [
    ("fixtures/pydicom-data/SC_rgb.dcm", "colour"),
    ("fixtures/pydicom-data/emri_small_jpeg_2k_lossless_too_short.dcm", "pixel data"),
    ("fixtures/pydicom-data/liver.dcm", "not an image"),  # a segmentation object, not a CT/MR image
])
def test_rejected_single_files_name_file_and_problem(shared_data, rel, message):
    with pytest.raises(nr.InputError, match=message) as info:
        nr.load(shared_data / rel)
    assert Path(rel).name in str(info.value)


def test_bad_inputs(tmp_path, shared_data):
    with pytest.raises(nr.InputError, match="no such file"):
        nr.load(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(nr.InputError, match="empty"):
        nr.load(empty)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("hello")
    with pytest.raises(nr.InputError, match="no readable greyscale DICOM"):
        nr.load(tmp_path / "notes")
    src = sorted((shared_data / "ct/philips-head-phantom/exam/S2010").glob("I*"))
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(src[0].read_bytes()[:3000])
    with pytest.raises(nr.InputError, match="trunc.dcm"):
        nr.load(trunc)


def test_one_bad_file_in_a_series_is_skipped(tmp_path, shared_data):
    series = tmp_path / "series"
    shutil.copytree(shared_data / "ct/philips-head-phantom/exam/S2010", series)
    victim = sorted(p for p in series.glob("I*"))[5]
    victim.write_bytes(victim.read_bytes()[:200_000])  # pixel data cut short
    with pytest.warns(UserWarning):
        vols = nr.load(series)
    assert vols[0].array.shape == (27, 512, 512) or vols[0].meta["warnings"]
    assert any(victim.name in w for w in vols[0].meta["warnings"])


def test_missing_positions_refused(tmp_path, shared_data):
    series = tmp_path / "series"
    series.mkdir()
    for f in sorted((shared_data / "ct/philips-head-phantom/exam/S2010").glob("I*"))[:3]:
        ds = pydicom.dcmread(f)
        del ds.ImagePositionPatient
        ds.save_as(series / f.name)
    with pytest.raises(nr.InputError, match="ImagePositionPatient"):
        nr.load(series)


def test_corrupt_ct_stream_is_reported_by_name(shared_data):
    """A broken JPEG Lossless stream decodes without a decoder error into stripes of -33792..31743 HU:
    the load names the file; genuine CT with -3024 padding (CT1_JLSN) or lossy padding spread to
    -3995 (693_J2KI) reads without that warning."""
    rel = "fixtures/pylibjpeg/JPEGLossless/JPEGLossless_1s_1f_i_16_16_bad.dcm"
    with pytest.warns(UserWarning, match="implausible for CT"):
        vol = _load_one(shared_data / rel)
    (w,) = [w for w in vol.meta["warnings"] if "implausible for CT" in w]
    assert Path(rel).name in w and "corrupt" in w
    for good in ("fixtures/pylibjpeg/JPEGLS/CT1_JLSN.dcm", "fixtures/pylibjpeg/JPEG2000/693_J2KI.dcm",
                 "fixtures/pylibjpeg/JPEG2000/MAROTECH_CT_JP2Lossy.dcm"):
        assert not any("implausible" in w for w in _load_one(shared_data / good).meta["warnings"]), good


def test_one_garbled_slice_of_a_series_is_named(tmp_path, shared_data):
    series = tmp_path / "series"
    series.mkdir()
    files = sorted((shared_data / "ct/philips-head-phantom/exam/S2010").glob("I*"))[:4]
    for f in files:
        shutil.copy(f, series / f.name)
    victim = series / files[2].name
    ds = pydicom.dcmread(victim)
    rng = np.random.default_rng(0)
    stripes = np.repeat(rng.integers(0, 4096, size=(ds.Rows, 1)), ds.Columns, axis=1).astype(np.uint16)
    ds.BitsStored, ds.HighBit, ds.RescaleSlope = 16, 15, 16  # a wrong rescale: values to 65 000 HU
    ds.PixelData = stripes.tobytes()
    ds.save_as(victim)
    with pytest.warns(UserWarning, match="implausible for CT"):
        vol = _load_one(series)
    (w,) = [w for w in vol.meta["warnings"] if "implausible for CT" in w]
    assert "in 1 slice(s)" in w and victim.name in w
    assert not any(f.name in w for f in files if f.name != victim.name)


def test_padding_and_metal_are_plausible_ct():
    from napari_restore.io.plausibility import IMPLAUSIBLE_SLICE_FRACTION, implausible_ct_slices

    img = np.full((3, 64, 64), 40.0, np.float32)
    img[:, :, :24] = -33792.0            # Philips-style padding (-32768 raw, intercept -1024): 37 % of a slice
    img[1, 30:33, 30:40] = 25_000.0       # metal on an extended CT scale: 0.7 % of the slice
    assert implausible_ct_slices(img) == []
    img[2, ::2, 24:] = np.linspace(-30_000, 30_000, 40)  # stripes over the other 63 % of half the rows
    ((k, share),) = implausible_ct_slices(img)
    assert k == 2 and IMPLAUSIBLE_SLICE_FRACTION < share < 0.33
    # (t, z, y, x): slice index t * nz + z
    assert [k for k, _ in implausible_ct_slices(np.stack([img, img[::-1]]))] == [2, 3]


# --------------------------------------------------------------------------- pixels at the header's offset
@pytest.mark.parametrize("rel", ["ct/philips-head-phantom/exam/S2020", "mr/uih-t1-sag",
                                 "fixtures/dicom2nifti/hitachi/anatomical/001"])
def test_pixels_read_at_the_header_offset_equal_the_whole_file_decode(shared_data, monkeypatch, rel):
    import napari_restore.io.dicom_frames as frames

    used = []
    real = frames._native_pixels

    def spy(fr):
        arr = real(fr)
        used.append(arr is not None)
        return arr

    monkeypatch.setattr(frames, "_native_pixels", spy)
    fast = nr.load(shared_data / rel)[0].array
    assert used and all(used)  # uncompressed files: every slice read at its offset
    monkeypatch.setattr(frames, "_native_pixels", lambda fr: None)
    np.testing.assert_array_equal(fast, nr.load(shared_data / rel)[0].array)


def test_pixel_element_only_for_uncompressed_little_endian_files(shared_data):
    from napari_restore.io.dicom_safe import dcmread, pixel_element

    native = sorted((shared_data / "ct/philips-head-phantom/exam/S2020").glob("I*"))[0]
    h = dcmread(native, stop_before_pixels=True)
    elem = pixel_element(native, h)
    assert elem is not None and elem.VR == "OW" and len(elem.value) == h.Rows * h.Columns * 2
    j2k = sorted(p for p in (shared_data / "ct/siemens-body-j2k").rglob("*") if p.is_file())[0]
    assert pixel_element(j2k, dcmread(j2k, stop_before_pixels=True)) is None


def test_a_file_cut_inside_its_pixel_data_is_still_refused(shared_data, tmp_path):
    src = sorted((shared_data / "ct/philips-head-phantom/exam/S2020").glob("I*"))[0]
    cut = tmp_path / "cut.dcm"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(nr.InputError) as info:
        nr.load(cut)
    assert str(cut) in str(info.value)
