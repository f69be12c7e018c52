"""Build an unevenly spaced CT series from real slices: 1 mm phantom slices taken 4 mm apart, then
7 mm apart (two acquisitions in one series), plus one duplicated position."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom

PHANTOM_1MM = "ct/philips-head-phantom/exam/S2020"
#: offsets (mm from the first slice) of the chosen source slices: 14 at 4 mm, then 12 at 7 mm
OFFSETS_MM = [4 * k for k in range(14)] + [52 + 7 * k for k in range(1, 13)]


def slices_by_position(folder: Path) -> list[tuple[float, Path]]:
    """(position along the normal in mm, file) of every image file of ``folder``, in order."""
    out = []
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        if "ImagePositionPatient" not in ds:
            continue
        iop = np.asarray(ds.ImageOrientationPatient, float)
        normal = np.cross(iop[:3], iop[3:])
        out.append((float(np.asarray(ds.ImagePositionPatient, float) @ normal), f))
    return sorted(out)


def make_irregular_series(shared_data: Path, out: Path, duplicate: bool = True) -> tuple[Path, list[float]]:
    """Copy the chosen slices (unchanged) to ``out``; with ``duplicate`` also a copy of slice 5
    with a new SOPInstanceUID at the same position. Returns the folder and the source positions
    (mm along the normal, in order)."""
    out.mkdir(parents=True, exist_ok=True)
    slices = slices_by_position(shared_data / PHANTOM_1MM)
    d0 = slices[0][0]
    chosen = []
    for off in OFFSETS_MM:
        d, f = min(slices, key=lambda s: abs(s[0] - d0 - off))
        assert abs(d - d0 - off) < 0.05, f"no slice at {off} mm"
        shutil.copy(f, out / f.name)
        chosen.append(d)
    if duplicate:
        f = slices_by_position(out)[5][1]
        ds = pydicom.dcmread(f)
        ds.SOPInstanceUID = pydicom.uid.generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = 9999
        ds.save_as(out / "DUPLICATE.dcm")
    return out, chosen
