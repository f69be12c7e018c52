"""Every series of ../shared/data exported as a derived DICOM series, plain and de-identified:
dciodvfy finds 0 errors and no warning the source did not have; dcm2niix and SimpleITK read each
export back at its source slices' positions; a real Orthanc (dcmtk storescu) stores every instance."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from _conformance import check_all, table

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def rows(shared_data, tmp_path_factory):
    rows = check_all(shared_data, tmp_path_factory.mktemp("conformance"))
    print("\n" + table(rows))
    return rows


def test_every_export_is_valid(rows):
    exported = [r for r in rows if r.folder is not None]
    assert len(exported) >= 80  # both modes of every CT/MR series (classic, enhanced, mosaic, tilt, J2K, NIfTI)
    for needle in ("mr/siemens-xa30-enhanced", "fixtures/transfer-syntaxes", "tilt/S3010", "siemens-body-j2k",
                   "ct/nifti", "mr/nifti", "philips_enhanced"):
        assert {r.kind for r in exported if needle in r.source} == {"plain", "deid"}, needle
    bad = [(r.source, r.series, r.kind, r.errors, r.new_warnings) for r in exported if r.errors or r.new_warnings]
    assert not bad, bad
    refused = [r for r in rows if r.note.startswith("refused")]
    assert not refused, [(r.source, r.note) for r in refused]


def test_deidentified_exports_are_named_and_carry_no_empty_sequence(rows):
    for r in rows:
        if r.kind != "deid" or r.folder is None:
            continue
        ds = pydicom.dcmread(sorted(r.folder.glob("*.dcm"))[0], stop_before_pixels=True)
        assert ds.SeriesDescription == "denoise conformance-check, de-identified"
        assert all(len(e.value) for e in ds if e.VR == "SQ"), r.source
        assert "SpecificCharacterSet" not in ds or str(ds.SpecificCharacterSet).strip()


def _normal(ds) -> np.ndarray:
    iop = np.asarray(ds.ImageOrientationPatient, float)
    return np.cross(iop[:3], iop[3:])


def test_exports_read_back_at_source_positions(rows, tmp_path):
    """SimpleITK puts every exported file where its source slice was; dcm2niix converts every
    export and agrees on the slice spacing."""
    import nibabel as nib
    import SimpleITK as sitk

    checked = 0
    for n, r in enumerate(r for r in rows if r.kind == "plain" and r.folder is not None):
        files = sorted(r.folder.glob("*.dcm"))
        origins = np.array([sitk.ReadImage(str(f)).GetOrigin() for f in files[:: max(1, len(files) // 8)]])
        expected = r.positions[:: max(1, len(files) // 8)]
        np.testing.assert_allclose(origins, expected, atol=0.01, err_msg=r.source)
        out = tmp_path / f"nii{n}"
        out.mkdir()
        res = subprocess.run(["dcm2niix", "-z", "n", "-b", "n", "-f", "x", "-o", str(out), str(r.folder)],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout + res.stderr
        niis = sorted(out.glob("*.nii"))
        assert niis, r.source
        if len(files) > 2:
            ds = pydicom.dcmread(files[0], stop_before_pixels=True)
            step = np.median(np.abs(np.diff(r.positions @ _normal(ds))))
            zooms = nib.load(niis[0]).header.get_zooms()
            assert min(abs(z - step) for z in zooms[:3]) < 0.01 * step + 1e-3, (r.source, zooms, step)
        checked += 1
    assert checked >= 40


def test_orthanc_stores_every_instance(rows, tmp_path):
    """dcmtk's storescu sends every instance of every export (a few associations at a time: C-STORE
    is latency-bound); Orthanc holds each series whole. An association that fails as a whole (rare
    under six at once: storescu exits with no message) is sent once more, alone."""
    import os

    from _orthanc import ORTHANC_AET, Orthanc

    orthanc = Orthanc(tmp_path / "orthanc").start()
    env = {**os.environ, "TCP_NODELAY": "1"}
    try:
        exported = [r for r in rows if r.folder is not None]
        pending = list(exported)
        running: list = []
        failed: list = []
        while pending or running:
            while pending and len(running) < 6:
                r = pending.pop()
                files = sorted(str(f) for f in r.folder.glob("*.dcm"))
                proc = subprocess.Popen(["storescu", "-aec", ORTHANC_AET, "-aet", "STORESCU", "127.0.0.1",
                                         str(orthanc.dicom_port), *files], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, env=env)
                running.append((r, proc))
            r, proc = running.pop(0)
            _, err = proc.communicate(timeout=300)
            if proc.returncode != 0:
                failed.append((r, proc.returncode, err[-500:]))
        for r, code, err in failed:  # one bounded retry per export, one association at a time
            files = sorted(str(f) for f in r.folder.glob("*.dcm"))
            again = subprocess.run(["storescu", "-aec", ORTHANC_AET, "-aet", "STORESCU", "127.0.0.1",
                                    str(orthanc.dicom_port), *files], stdout=subprocess.DEVNULL,
                                   stderr=subprocess.PIPE, text=True, env=env, timeout=300)
            assert again.returncode == 0, (r.source, code, err, again.returncode, again.stderr[-500:])
        for r in exported:
            files = sorted(r.folder.glob("*.dcm"))
            uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
            series = orthanc.series_of(uid)
            assert series is not None and len(series["Instances"]) == len(files), r.source
    finally:
        orthanc.stop()
