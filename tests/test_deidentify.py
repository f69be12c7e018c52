"""De-identified DICOM export (PS3.15 Annex E basic profile) of real series with identifying values.

The source is a real 4-slice MR series (``fixtures/dicom2nifti/hitachi``) copied into a temporary
folder twice, as two series of one study, with identifying values written into its headers
(name, ID, birth date, accession number, institution, referring physician, other IDs, a private
tag, an overlay), because the public test files are already anonymised.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_restore.deidentify import Deidentifier, annex_e_actions
from napari_restore.errors import OutputError
from napari_restore.io import load, save

IDENTIFYING = {
    "PatientName": "Doe^Jane^Quincy", "PatientID": "PID-98765-XYZ", "PatientBirthDate": "19610417",
    "AccessionNumber": "ACC5550123", "InstitutionName": "Saint Elsewhere Hospital",
    "ReferringPhysicianName": "House^Gregory", "OtherPatientIDs": "OTHER-ID-4242",
    "PatientAddress": "221B Baker Street", "StudyDate": "20190311", "StudyID": "STUDY-7788",
    "InstitutionAddress": "1 Hospital Road, Springfield", "PatientComments": "allergic to peanuts",
}


def _make_study(shared_data: Path, root: Path, burned_in: str | None = None) -> tuple[Path, dict[str, str]]:
    """Two series of one study (same Study and Frame of Reference UIDs) with identifying values."""
    src = shared_data / "fixtures/dicom2nifti/hitachi/anatomical/001"
    study_uid, for_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    uids = {"study": study_uid, "for": for_uid}
    for s in (1, 2):
        series_uid = pydicom.uid.generate_uid()
        uids[f"series{s}"] = series_uid
        for f in sorted(src.iterdir()):
            ds = pydicom.dcmread(f)
            for kw, value in IDENTIFYING.items():
                setattr(ds, kw, value)
            ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.SeriesInstanceUID = study_uid, for_uid, series_uid
            ds.SeriesNumber = s
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            uids[f"sop{s}-{f.name}"] = ds.SOPInstanceUID
            ds.private_block(0x0029, "ACME 1.0", create=True).add_new(0x01, "LO", "PRIVATE-SECRET-123")
            ds.add_new(0x60000010, "US", 4)  # an overlay group
            if burned_in:
                ds.BurnedInAnnotation = burned_in
            out = root / f"series{s}" / f.name
            out.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(out, enforce_file_format=True)
    return root, uids


def _blob(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(folder.iterdir()))


@pytest.fixture()
def study(shared_data, tmp_path):
    return _make_study(shared_data, tmp_path / "in")


def test_annex_e_table_is_the_standards(shared_data):
    actions = annex_e_actions()
    assert len(actions) > 500  # Table E.1-1 has several hundred rows
    assert actions[(0x0010, 0x0010)] == "Z"          # Patient's Name
    assert actions[(0x0020, 0x000D)] == "U"          # Study Instance UID
    assert actions[(0x0008, 0x0080)].startswith("X")  # Institution Name


def test_no_identifying_value_survives_and_dciodvfy_passes(study, tmp_path):
    root, uids = study
    vols = load(root / "series1")
    assert len(vols) == 1
    src = vols[0]
    out = save(src, tmp_path / "out", format="dicom", deidentify=True)
    blob = _blob(out)
    leaked = [kw for kw, v in IDENTIFYING.items() if v.encode() in blob]
    leaked += [name for name, uid in uids.items() if uid.encode() in blob]
    assert b"PRIVATE-SECRET" not in blob and b"ACME 1.0" not in blob
    assert not leaked, f"identifying values in the export: {leaked}"
    for f in sorted(out.iterdir()):
        ds = pydicom.dcmread(f)
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
        assert not any(e.tag.is_private for e in ds) and not any(e.tag.group == 0x6000 for e in ds)
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        r = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
        assert not errors, errors
    back = load(out)[0]  # geometry and pixel values kept
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-4)
    np.testing.assert_allclose(back.array, src.array, atol=0.5 + 1e-6 * np.abs(src.array).max())


def test_two_series_of_one_study_keep_one_study_and_frame_of_reference(study, tmp_path):
    root, uids = study
    v1, v2 = load(root / "series1")[0], load(root / "series2")[0]
    d = Deidentifier(dates="shift")
    a = save(v1, tmp_path / "a", format="dicom", deidentify=d)
    b = save(v2, tmp_path / "b", format="dicom", deidentify=d)
    da = pydicom.dcmread(next(a.iterdir()))
    db = pydicom.dcmread(next(b.iterdir()))
    assert da.StudyInstanceUID == db.StudyInstanceUID != uids["study"]
    assert da.FrameOfReferenceUID == db.FrameOfReferenceUID != uids["for"]
    assert da.SeriesInstanceUID != db.SeriesInstanceUID
    assert da.PatientID == db.PatientID != IDENTIFYING["PatientID"]
    # shifted dates: same shift for both, not the source date, codes say so
    assert da.StudyDate == db.StudyDate and da.StudyDate not in ("", IDENTIFYING["StudyDate"])
    assert {c.CodeValue for c in da.DeidentificationMethodCodeSequence} == {"113100", "113107"}
    # the same key in another session gives the same mapping; another key does not
    key = b"the same secret key"
    c = save(v1, tmp_path / "c", format="dicom", deidentify=Deidentifier(key))
    e = save(v1, tmp_path / "e", format="dicom", deidentify=Deidentifier(key))
    f = save(v1, tmp_path / "f", format="dicom", deidentify=True)
    dc, de, df = (pydicom.dcmread(next(p.iterdir())) for p in (c, e, f))
    assert dc.StudyInstanceUID == de.StudyInstanceUID != df.StudyInstanceUID
    # every slice references its (remapped) source image consistently with the mapping
    refs = {pydicom.dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID for p in c.iterdir()}
    expected = {Deidentifier(key).uid(uids[k]) for k in uids if k.startswith("sop1-")}
    assert refs == expected


def test_burned_in_annotation_is_refused_unless_accepted(shared_data, tmp_path):
    root, _ = _make_study(shared_data, tmp_path / "in", burned_in="YES")
    v = load(root / "series1")[0]
    with pytest.raises(OutputError, match="BurnedInAnnotation"):
        save(v, tmp_path / "out", format="dicom", deidentify=True)
    assert not (tmp_path / "out").exists()
    out = save(v, tmp_path / "out", format="dicom", deidentify=True, accept_burned_in=True)
    assert pydicom.dcmread(next(out.iterdir())).BurnedInAnnotation == "YES"


def test_cli_deidentify_flag(study, shared_data, tmp_path, capsys):
    from napari_restore.cli import EXIT_ERROR, EXIT_OK, main

    from _engine_helpers import save_tiny

    root, uids = study
    model = save_tiny(tmp_path / "model", modality="MR")
    out = tmp_path / "cli_out"
    assert main(["restore", str(root / "series1"), str(out), "--model", str(model), "--deidentify"]) == EXIT_OK
    blob = _blob(out)
    assert not [kw for kw, v in IDENTIFYING.items() if v.encode() in blob]
    assert uids["study"].encode() not in blob
    burned, _ = _make_study(shared_data, tmp_path / "burned", burned_in="YES")
    capsys.readouterr()
    assert main(["restore", str(burned / "series1"), str(tmp_path / "x"), "--model", str(model),
                 "--deidentify"]) == EXIT_ERROR
    assert "BurnedInAnnotation" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
