"""Derived DICOM series export: validity (dciodvfy), geometry and values as read back by dcm2niix,
SimpleITK and our own reader, UIDs, references, atomicity. Real series from ../shared/data."""
from __future__ import annotations

import copy
import hashlib
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

import napari_restore as nr
from napari_restore.errors import Cancelled, OutputError
from napari_restore.io.dicom_write import choose_rescale, write_dicom_series
from napari_restore.io.nifti import sitk_affine

from geometry import align_to, index_map, nifti_to_lps

CT_EXAM = "ct/philips-head-phantom/exam/S2010"
CT_TILT = "ct/philips-head-phantom/tilt/S3010"
MR_SERIES = "mr/siemens-prisma-jpeg-fragments"
MR_ENHANCED = "fixtures/pydicom-data/emri_small.dcm"
CT_BLANK_UIDS = "ct/siemens-body-j2k"
NIFTI_CT = "ct/nifti/example_ct_sm.nii.gz"
LOSSY_CT = "fixtures/pylibjpeg/JPEGLS/CT1_JLSN.dcm"  # JPEG-LS near-lossless, LossyImageCompression 01

from _conformance import EXPECTED_WARNINGS  # noqa: E402  (dciodvfy warnings an export may add; reasons there)


# --------------------------------------------------------------------------- helpers
def _sha256_tree(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def _dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) that dciodvfy reports for one file."""
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = (res.stdout + res.stderr).splitlines()
    return [l for l in lines if l.startswith("Error")], [l for l in lines if l.startswith("Warning")]


def _source_file(source: Path, sop: dict) -> Path:
    if source.is_file():
        return source
    for p in sorted(source.rglob("*")):
        if p.is_file():
            try:
                ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except Exception:
                continue
            if str(ds.get("SOPInstanceUID", "")) == sop["sop_instance"]:
                return p
    raise AssertionError(f"no source file with SOPInstanceUID {sop['sop_instance']} in {source}")


def _assert_valid(folder: Path, source_file: Path | None) -> None:
    """dciodvfy: no error in any file; warnings only those of the source or expected ones."""
    allowed = set(_dciodvfy(source_file)[1]) if source_file is not None else set()
    files = sorted(folder.glob("*.dcm"))
    assert files
    for f in files:
        errors, warnings = _dciodvfy(f)
        assert not errors, f"{f.name}: {errors}"
        extra = [w for w in warnings if w not in allowed and not any(re.search(p, w) for p in EXPECTED_WARNINGS)]
        assert not extra, f"{f.name}: new warnings {extra}"


def _tolerance(slope: float, expected: np.ndarray) -> float:
    """Half a slope step plus float32 rounding of the largest value."""
    return slope / 2 + 4 * float(np.spacing(np.float32(np.abs(expected).max())))


def _dcm2niix(folder: Path, out: Path) -> dict[str, Path]:
    out.mkdir()
    res = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "out", "-o", str(out), str(folder)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return {p.name: p for p in out.glob("*.nii")}


def _dcm2niix_aligned(nii: Path, affine: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """dcm2niix's array in our index order, after checking its grid is ours to 1e-3 mm."""
    data, their_affine = nifti_to_lps(nib.load(nii))
    m = index_map(their_affine, affine)  # raises unless a signed permutation + integer offset
    np.testing.assert_allclose(their_affine @ m, affine, atol=1e-3)
    return align_to(data, their_affine, affine, shape)


def _sitk_read(folder: Path, n_files: int | None = None):
    reader = sitk.ImageSeriesReader()
    names = reader.GetGDCMSeriesFileNames(str(folder))
    assert len(names) == (n_files or len(list(folder.glob("*.dcm"))))
    reader.SetFileNames(names)
    img = reader.Execute()
    return sitk.GetArrayFromImage(img).astype(np.float64), sitk_affine(img)


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


class Export:
    """One source loaded, 'restored' and written; hashes of the source before and after."""

    def __init__(self, shared_data: Path, rel: str, tmp: Path, change, step: dict | None, **kwargs):
        self.source = shared_data / rel
        self.hash_before = _sha256_tree(self.source)
        self.src = nr.load(self.source)[0]
        self.volume = self.src.copy_with(change(self.src.array), step)
        self.expected = self.volume.array.astype(np.float64)
        self.meta_before = copy.deepcopy({k: v for k, v in self.volume.meta.items() if k != "dicom_header"})
        header = self.volume.meta.get("dicom_header")
        self.header_before = header.to_json_dict() if header is not None else None
        self.array_before = self.volume.array.copy()
        self.calls: list[tuple[int, int]] = []
        self.folder = nr.save(self.volume, tmp / "export", format="dicom",
                              progress=lambda d, t: self.calls.append((d, t)), **kwargs)
        self.hash_after = _sha256_tree(self.source)
        self.headers = _headers(self.folder)
        self.slope = float(self.headers[0].get("RescaleSlope", 1.0))
        self.tmp = tmp


@pytest.fixture(scope="module")
def ct(shared_data, tmp_path_factory):
    return Export(shared_data, CT_EXAM, tmp_path_factory.mktemp("ct"), lambda a: a + 0.3,
                  {"task": "denoise", "model": "denoise-ct"})


@pytest.fixture(scope="module")
def tilt(shared_data, tmp_path_factory):
    return Export(shared_data, CT_TILT, tmp_path_factory.mktemp("tilt"), lambda a: a - 0.2,
                  {"task": "deblur", "model": "deblur-ct"})


@pytest.fixture(scope="module")
def mr(shared_data, tmp_path_factory):
    return Export(shared_data, MR_SERIES, tmp_path_factory.mktemp("mr"), lambda a: a * 1.37 + 0.1,
                  {"task": "denoise", "model": "denoise-mr"})


@pytest.fixture(scope="module")
def nifti(shared_data, tmp_path_factory):
    return Export(shared_data, NIFTI_CT, tmp_path_factory.mktemp("nifti"), lambda a: a, None)


# --------------------------------------------------------------------------- the CT exam
def test_ct_valid_and_derived(ct):
    _assert_valid(ct.folder, _source_file(ct.source, ct.src.meta["source_sops"][0]))
    src = ct.src.meta
    h0 = ct.headers[0]
    assert len(ct.headers) == ct.volume.array.shape[0] == 28
    assert ct.calls == [(k + 1, 28) for k in range(28)]
    assert h0.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert h0.preamble is not None
    for h in ct.headers:
        assert h.SOPClassUID == pydicom.uid.CTImageStorage
        assert list(h.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert h.SeriesInstanceUID == h0.SeriesInstanceUID != src["series_uid"]
        assert h.StudyInstanceUID == src["study_uid"]
        assert h.FrameOfReferenceUID == src["frame_of_reference_uid"]
        assert h.PatientName == src["dicom_header"].PatientName and h.PatientID == src["dicom_header"].PatientID
        assert not any(e.tag.is_private for e in h)
        assert "IconImageSequence" not in h and not any(e.tag.group & 0xFF00 == 0x6000 for e in h)
        assert (h.BitsAllocated, h.BitsStored, h.HighBit, h.PixelRepresentation) == (16, 16, 15, 1)
        assert (float(h.RescaleSlope), float(h.RescaleIntercept), h.RescaleType) == (1.0, 0.0, "HU")
        assert h.SeriesDescription == f"{src['description']} [denoise-ct]"
        assert [(c.CodeValue, c.CodingSchemeDesignator) for c in h.DerivationCodeSequence] == [("113087", "DCM")]
        assert "denoise" in h.DerivationDescription
        (w_c, w_w) = src["window"]
        assert (float(h.WindowCenter), float(h.WindowWidth)) == (w_c, w_w)
    assert len({h.SOPInstanceUID for h in ct.headers}) == 28
    assert not {h.SOPInstanceUID for h in ct.headers} & {s["sop_instance"] for s in src["source_sops"]}


def test_ct_references_each_source_slice(ct):
    sops = ct.src.meta["source_sops"]
    # our file k holds z slice k; each references the source image of that z slice
    for k, h in enumerate(ct.headers):
        assert int(h.InstanceNumber) == k + 1
        (ref,) = h.SourceImageSequence
        assert ref.ReferencedSOPClassUID == sops[k]["sop_class"]
        assert ref.ReferencedSOPInstanceUID == sops[k]["sop_instance"]
        assert "ReferencedFrameNumber" not in ref
        assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
        (series,) = h.ReferencedSeriesSequence
        assert series.SeriesInstanceUID == ct.src.meta["series_uid"]
        assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == sops[k]["sop_instance"]
    # and the referenced source slice sits where ours does
    for k in (0, 27):
        src = pydicom.dcmread(_source_file(ct.source, sops[k]), stop_before_pixels=True)
        np.testing.assert_allclose(np.array(ct.headers[k].ImagePositionPatient, float),
                                   np.array(src.ImagePositionPatient, float), atol=1e-3)


def _written_datasets(monkeypatch) -> list[tuple[str, pydicom.Dataset]]:
    """Record (file name, a deep copy of the dataset) for every file the series writer writes."""
    from napari_restore.io import dicom_encode

    seen: list[tuple[str, pydicom.Dataset]] = []
    real = dicom_encode.SharedElementWriter.write

    def write(self, path, ds):
        real(self, path, ds)
        seen.append((Path(path).name, copy.deepcopy(ds)))

    monkeypatch.setattr(dicom_encode.SharedElementWriter, "write", write)
    return seen


def _pydicom_bytes(ds: pydicom.Dataset) -> bytes:
    """What ``pydicom.dcmwrite`` writes for ``ds`` with the file meta the series writer declares."""
    import io

    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationVersionName = "NAPARI_RESTORE"
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("rel", [CT_EXAM, MR_SERIES])
def test_each_file_is_what_pydicom_writes_for_its_dataset(shared_data, tmp_path, monkeypatch, rel):
    # the writer encodes the series template once; each file must still be byte for byte pydicom's
    vol = nr.load(shared_data / rel)[0]
    sops = copy.deepcopy(vol.meta["source_sops"])
    sops[3]["thickness"] = 7.5  # one slice with its own thickness: the others keep the series'
    vol = vol.copy_with(vol.array * 1.01 + 0.3, {"task": "denoise", "model": "denoise-ct"})
    vol.meta["source_sops"] = sops
    seen = _written_datasets(monkeypatch)
    folder = nr.save(vol, tmp_path / "out", format="dicom")
    files = sorted(folder.glob("*.dcm"))
    assert len(seen) == len(files) == vol.array.shape[0]
    for name, ds in seen:
        assert (folder / name).read_bytes() == _pydicom_bytes(ds), name
    thick = [float(pydicom.dcmread(f, stop_before_pixels=True).SliceThickness) for f in files]
    assert thick[3] == 7.5 and 7.5 not in thick[:3] + thick[4:]
    assert len(set(thick[:3] + thick[4:])) == 1


@pytest.mark.parametrize("kwargs", [{"deidentify": True}, {"series_description": "Contrôle ß [denoise]"}])
def test_deidentified_and_non_ascii_files_are_what_pydicom_writes(shared_data, tmp_path, monkeypatch, kwargs):
    vol = nr.load(shared_data / CT_EXAM)[0]
    seen = _written_datasets(monkeypatch)
    folder = nr.save(vol, tmp_path / "out", format="dicom", **kwargs)
    assert seen and all((folder / name).read_bytes() == _pydicom_bytes(ds) for name, ds in seen)
    if "series_description" in kwargs:
        assert pydicom.dcmread(sorted(folder.glob("*.dcm"))[0]).SeriesDescription == kwargs["series_description"]


def test_ct_inputs_untouched(ct):
    assert ct.hash_after == ct.hash_before
    np.testing.assert_array_equal(ct.volume.array, ct.array_before)
    assert {k: v for k, v in ct.volume.meta.items() if k != "dicom_header"}.keys() == ct.meta_before.keys()
    assert ct.volume.meta["provenance"] == ct.meta_before["provenance"]
    assert ct.volume.meta["dicom_header"].to_json_dict() == ct.header_before


def test_ct_read_back_by_dcm2niix(ct):
    (nii,) = _dcm2niix(ct.folder, ct.tmp / "dcm2niix").values()
    aligned = _dcm2niix_aligned(nii, ct.volume.affine, ct.volume.array.shape)
    assert aligned.shape == ct.volume.array.shape
    np.testing.assert_allclose(aligned, ct.expected, atol=_tolerance(ct.slope, ct.expected), rtol=0)


def test_ct_read_back_by_simpleitk(ct):
    data, affine = _sitk_read(ct.folder)
    np.testing.assert_allclose(affine, ct.volume.affine, atol=1e-3)
    np.testing.assert_allclose(data, ct.expected, atol=_tolerance(ct.slope, ct.expected), rtol=0)


def test_ct_read_back_by_our_reader(ct):
    (back,) = nr.load(ct.folder)
    assert back.modality == "CT"
    np.testing.assert_allclose(back.affine, ct.volume.affine, atol=1e-4)
    np.testing.assert_allclose(back.array, ct.expected, atol=_tolerance(ct.slope, ct.expected), rtol=0)
    assert back.meta["frame_of_reference_uid"] == ct.src.meta["frame_of_reference_uid"]


# --------------------------------------------------------------------------- gantry tilt
def test_tilt_keeps_shear(tilt):
    _assert_valid(tilt.folder, _source_file(tilt.source, tilt.src.meta["source_sops"][0]))
    aff = tilt.volume.affine
    normal = np.cross(aff[:3, 2], aff[:3, 1])
    assert np.degrees(np.arccos(abs(normal @ aff[:3, 0]) / np.linalg.norm(normal) / np.linalg.norm(aff[:3, 0]))) > 10
    src0 = pydicom.dcmread(_source_file(tilt.source, tilt.src.meta["source_sops"][0]), stop_before_pixels=True)
    for k, h in enumerate(tilt.headers):
        np.testing.assert_allclose(np.array(h.ImagePositionPatient, float), aff[:3, 3] + k * aff[:3, 0], atol=1e-4)
        np.testing.assert_allclose(np.array(h.ImageOrientationPatient, float),
                                   np.array(src0.ImageOrientationPatient, float), atol=1e-6)
        assert float(h.SliceThickness) == float(src0.SliceThickness)
        assert h.DerivationCodeSequence[0].CodeValue == "113086"
    (back,) = nr.load(tilt.folder)
    np.testing.assert_allclose(back.affine, aff, atol=1e-4)
    np.testing.assert_allclose(back.array, tilt.expected, atol=_tolerance(tilt.slope, tilt.expected), rtol=0)
    assert tilt.hash_after == tilt.hash_before


def test_tilt_external_readers_see_it_as_the_source(tilt):
    """dcm2niix and ITK cannot hold a shear; they must treat our export exactly like the scanner's."""
    ours = _dcm2niix(tilt.folder, tilt.tmp / "ours")
    theirs = _dcm2niix(tilt.source, tilt.tmp / "theirs")
    assert sorted(ours) == sorted(theirs) and any("Tilt" in n for n in ours)  # dcm2niix saw the tilt
    for name in ours:
        d_o, a_o = nifti_to_lps(nib.load(ours[name]))
        d_s, a_s = nifti_to_lps(nib.load(theirs[name]))
        np.testing.assert_allclose(a_o, a_s, atol=1e-3)
        if "Tilt" not in name:  # the tilt-corrected one is resampled (and rounded) by dcm2niix
            np.testing.assert_allclose(d_o, d_s - 0.2, atol=_tolerance(tilt.slope, tilt.expected))
    data_o, aff_o = _sitk_read(tilt.folder)
    data_s, aff_s = _sitk_read(tilt.source, len(tilt.headers))
    np.testing.assert_allclose(aff_o, aff_s, atol=1e-3)
    np.testing.assert_allclose(data_o, data_s - 0.2, atol=_tolerance(tilt.slope, tilt.expected))


# --------------------------------------------------------------------------- MR
def test_mr_valid_rescaled_and_read_back(mr):
    _assert_valid(mr.folder, _source_file(mr.source, mr.src.meta["source_sops"][0]))
    h0 = mr.headers[0]
    assert h0.SOPClassUID == pydicom.uid.MRImageStorage and h0.Modality == "MR"
    assert h0.ScanningSequence == mr.src.meta["dicom_header"].ScanningSequence
    # the slope uses the int16 range well: the largest value is stored near 32767
    assert 0 < mr.slope < 1 and float(h0.RescaleIntercept) == 0.0
    assert mr.src.meta["dicom_header"].LossyImageCompression == h0.LossyImageCompression == "00"
    assert 16000 < mr.expected.max() / mr.slope <= 32767
    # the window is carried over from the source: the derived series opens with the source's contrast
    wc, ww = mr.src.meta["window"]
    assert float(h0.WindowCenter) == pytest.approx(wc) and float(h0.WindowWidth) == pytest.approx(ww)
    tol = _tolerance(mr.slope, mr.expected)
    (nii,) = _dcm2niix(mr.folder, mr.tmp / "dcm2niix").values()
    aligned = _dcm2niix_aligned(nii, mr.volume.affine, mr.expected.shape)
    np.testing.assert_allclose(aligned, mr.expected, atol=tol, rtol=0)
    data, affine = _sitk_read(mr.folder)
    np.testing.assert_allclose(affine, mr.volume.affine, atol=1e-3)
    np.testing.assert_allclose(data, mr.expected, atol=tol, rtol=0)
    (back,) = nr.load(mr.folder)
    np.testing.assert_allclose(back.affine, mr.volume.affine, atol=1e-4)
    np.testing.assert_allclose(back.array, mr.expected, atol=tol, rtol=0)
    assert mr.hash_after == mr.hash_before


def test_window_is_the_source_s_unless_set(shared_data, tmp_path):
    src = nr.load(shared_data / MR_SERIES)[0]
    restored = src.copy_with(src.array, {"task": "denoise"})
    h = pydicom.dcmread(sorted(write_dicom_series(restored, tmp_path / "a").glob("*.dcm"))[0])
    assert (float(h.WindowCenter), float(h.WindowWidth)) == pytest.approx(src.meta["window"])
    h = pydicom.dcmread(sorted(write_dicom_series(restored, tmp_path / "b", window=(400.0, 900.0)).glob("*.dcm"))[0])
    assert (float(h.WindowCenter), float(h.WindowWidth)) == (400.0, 900.0)
    no_window = src.copy_with(src.array)
    no_window.meta = {k: v for k, v in src.meta.items() if k != "window"}
    h = pydicom.dcmread(sorted(write_dicom_series(no_window, tmp_path / "c").glob("*.dcm"))[0])
    lo, hi = np.percentile(src.array, [1, 99.5])  # no source window: the 1-99.5 percentiles
    assert abs(float(h.WindowCenter) - (lo + hi) / 2) < 0.03 * (hi - lo)


def test_enhanced_mr_source_references_frames(shared_data, tmp_path):
    src = nr.load(shared_data / MR_ENHANCED)[0]
    out = write_dicom_series(src.copy_with(src.array * 0.5, {"task": "denoise"}), tmp_path / "out")
    _assert_valid(out, shared_data / MR_ENHANCED)
    for k, h in enumerate(_headers(out)):
        sop = src.meta["source_sops"][k]
        ref = h.SourceImageSequence[0]
        assert ref.ReferencedSOPClassUID == pydicom.uid.EnhancedMRImageStorage == sop["sop_class"]
        assert int(ref.ReferencedFrameNumber) == sop["frame"]
        assert h.SOPClassUID == pydicom.uid.MRImageStorage
        assert "PerFrameFunctionalGroupsSequence" not in h and "SharedFunctionalGroupsSequence" not in h
        assert "NumberOfFrames" not in h


def test_source_with_blank_uids(shared_data, tmp_path):
    """An anonymised source with empty Study/SOP Instance UIDs still gives a valid series."""
    src = nr.load(shared_data / CT_BLANK_UIDS)[0]
    out = write_dicom_series(src, tmp_path / "out")
    errors = [e for f in sorted(out.glob("*.dcm"))[:3] for e in _dciodvfy(f)[0]]
    assert not errors
    h = pydicom.dcmread(sorted(out.glob("*.dcm"))[0])
    assert pydicom.uid.UID(h.StudyInstanceUID).is_valid


def test_lossy_source_stays_marked_lossy(shared_data, tmp_path):
    """PS3.3 C.7.6.1.1.5: once lossy compressed, a derived image keeps LossyImageCompression 01."""
    source = shared_data / LOSSY_CT
    src = nr.load(source)[0]
    assert src.meta["dicom_header"].LossyImageCompression == "01"
    out = write_dicom_series(src, tmp_path / "out", series_description="lossy source, re-exported",
                             derivation="unchanged pixels")
    _assert_valid(out, source)
    h = _headers(out)[0]
    assert h.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert h.LossyImageCompression == "01"
    assert h.LossyImageCompressionRatio == src.meta["dicom_header"].LossyImageCompressionRatio
    assert (h.SeriesDescription, h.DerivationDescription) == ("lossy source, re-exported", "unchanged pixels")
    assert "DerivationCodeSequence" not in h  # no provenance step: no claim of what was done


# --------------------------------------------------------------------------- no DICOM source
def test_nifti_exports_as_new_series(nifti, shared_data):
    _assert_valid(nifti.folder, None)
    h0 = nifti.headers[0]
    assert str(h0.PatientName) == "Anonymous^"
    assert h0.Modality == "CT" and h0.SOPClassUID == pydicom.uid.CTImageStorage
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID"):
        assert pydicom.uid.UID(h0[kw].value).is_valid
        assert len({h[kw].value for h in nifti.headers}) == 1
    assert "SourceImageSequence" not in h0 and "ReferencedSeriesSequence" not in h0
    assert "example_ct_sm" in h0.SeriesDescription
    tol = _tolerance(nifti.slope, nifti.expected)
    (nii,) = _dcm2niix(nifti.folder, nifti.tmp / "dcm2niix").values()
    aligned = _dcm2niix_aligned(nii, nifti.volume.affine, nifti.expected.shape)
    np.testing.assert_allclose(aligned, nifti.expected, atol=tol, rtol=0)
    data, affine = _sitk_read(nifti.folder)
    np.testing.assert_allclose(affine, nifti.volume.affine, atol=1e-3)
    np.testing.assert_allclose(data, nifti.expected, atol=tol, rtol=0)
    (back,) = nr.load(nifti.folder)
    np.testing.assert_allclose(back.affine, nifti.volume.affine, atol=1e-4)
    np.testing.assert_allclose(back.array, nifti.expected, atol=tol, rtol=0)
    assert nifti.hash_after == nifti.hash_before


def test_modality_must_be_ct_or_mr(nifti, tmp_path):
    other = nifti.src.copy_with(nifti.src.array[:3])
    other.modality = "OT"
    with pytest.raises(OutputError, match="modality="):
        write_dicom_series(other, tmp_path / "ot")
    assert not (tmp_path / "ot").exists()
    out = write_dicom_series(other, tmp_path / "mr", modality="MR")
    _assert_valid(out, None)
    assert pydicom.dcmread(next(out.glob("*.dcm"))).SOPClassUID == pydicom.uid.MRImageStorage
    four_d = nr.Volume(np.zeros((2, 3, 4, 5), np.float32), modality="CT")
    with pytest.raises(OutputError, match="4-D"):
        write_dicom_series(four_d, tmp_path / "4d")
    sheared = nr.Volume(np.zeros((2, 3, 4), np.float32), np.array(
        [[1.0, 0, 0, 0], [0, 1, 0.5, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), modality="CT")
    with pytest.raises(OutputError, match="in-plane axes .* not orthogonal"):
        write_dicom_series(sheared, tmp_path / "sheared")
    nan = nifti.src.copy_with(np.where(nifti.src.array[:2] > 0, np.nan, nifti.src.array[:2]))
    with pytest.raises(OutputError, match="non-finite"):
        write_dicom_series(nan, tmp_path / "nan")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mr"]


# --------------------------------------------------------------------------- UIDs, atomicity
def test_quick_exports_have_distinct_uids(nifti, tmp_path):
    small = nifti.src.copy_with(nifti.src.array[:4])
    a = write_dicom_series(small, tmp_path / "a")
    b = write_dicom_series(small, tmp_path / "b")
    ha, hb = _headers(a), _headers(b)
    uids = lambda hs: {h.SeriesInstanceUID for h in hs} | {h.SOPInstanceUID for h in hs}  # noqa: E731
    assert len(uids(ha)) == len(uids(hb)) == 5
    assert not uids(ha) & uids(hb)
    assert ha[0].StudyInstanceUID != hb[0].StudyInstanceUID  # no DICOM source: a new study each time


def test_overwrite_refused_then_allowed(nifti, tmp_path):
    small = nifti.src.copy_with(nifti.src.array[:2])
    target = write_dicom_series(small, tmp_path / "out")
    first = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(OutputError, match="overwrite"):
        nr.save(small, target, format="dicom")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == first
    write_dicom_series(small, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted(first)
    assert {p.name: p.read_bytes() for p in target.iterdir()} != first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_write_failure_leaves_nothing(nifti, tmp_path, monkeypatch):
    from napari_restore.io.dicom_encode import SharedElementWriter

    real = SharedElementWriter.write
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(SharedElementWriter, "write", failing)
    with pytest.raises(OutputError, match="No space left"):
        write_dicom_series(nifti.src, tmp_path / "out")
    assert len(calls) == 3
    assert list(tmp_path.iterdir()) == []


def test_cancel_leaves_nothing(nifti, tmp_path):
    seen = []
    with pytest.raises(Cancelled):
        write_dicom_series(nifti.src, tmp_path / "out", progress=lambda d, t: seen.append(d),
                           cancel=lambda: len(seen) >= 5)
    assert seen == [1, 2, 3, 4, 5]
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- rescale choice
@pytest.mark.parametrize("modality, lo, hi", [("CT", -1024.0, 3071.0), ("CT", -60000.0, 90000.0),
                                               ("MR", 0.0, 1.0), ("MR", 0.0, 5.0e6), ("MR", -3.2, 3.2)])
def test_rescale_fits_without_clipping(modality, lo, hi):
    rng = np.random.default_rng(0)
    a = rng.uniform(lo, hi, 20000).astype(np.float32)
    a[:2] = lo, hi
    slope, intercept = choose_rescale(a, modality)
    assert float(pydicom.valuerep.DSfloat(str(slope), auto_format=True)) == slope
    stored = np.rint((a.astype(np.float64) - intercept) / slope)
    assert stored.min() >= -32768 and stored.max() <= 32767  # nothing clipped
    assert np.abs(stored * slope + intercept - a).max() <= slope / 2 * (1 + 1e-9)
    if modality == "CT" and hi < 32767:
        assert (slope, intercept) == (1.0, 0.0)  # HU stay HU
    else:
        assert max(stored.max(), -stored.min()) > 16000  # the int16 range is used well


def test_integer_mr_keeps_slope_one():
    a = np.arange(0, 4000, dtype=np.float32)
    assert choose_rescale(a, "MR") == (1.0, 0.0)


def test_oblique_anisotropic_geometry_round_trips(nifti, tmp_path):
    """Non-square pixels and an oblique orientation: PixelSpacing order and IOP columns matter."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1.0]]) @ np.array([[1, 0, 0], [0, c, -s], [0, s, c]])
    affine = np.eye(4)
    affine[:3, :3] = rot[:, ::-1] @ np.diag([2.5, 0.7, 0.9])  # (k, j, i) steps of 2.5, 0.7, 0.9 mm
    affine[:3, 3] = [-12.5, 40.25, 7.0]
    vol = nr.Volume(nifti.src.array[:5], affine, "CT", {})
    out = write_dicom_series(vol, tmp_path / "out")
    h = _headers(out)[0]
    assert [float(v) for v in h.PixelSpacing] == [0.7, 0.9]
    (back,) = nr.load(out)
    np.testing.assert_allclose(back.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(back.array, vol.array)
    data, sitk_aff = _sitk_read(out)
    np.testing.assert_allclose(sitk_aff, affine, atol=1e-3)
    np.testing.assert_array_equal(data, vol.array)
