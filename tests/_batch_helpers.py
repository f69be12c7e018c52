"""Small trees of symlinked ../shared/data series for the batch tests (nothing is copied)."""
from __future__ import annotations

import os
from pathlib import Path


def small_tree(shared_data: Path, root: Path) -> Path:
    """Five image series to restore, plus a localizer, a secondary capture (with colour images) and a text file.

    - ``studyA/ts/{1,2,3}.dcm``: three Siemens mosaics (35x64x64 MR) sharing one folder and one
      SeriesInstanceUID but not one SeriesNumber: three series in one folder;
    - ``studyB/S1000`` (localizer), ``studyB/S4010`` (secondary capture + RGB images): skipped;
    - ``studyC/enh/<file>``: an enhanced multi-frame MR (96x128x128);
    - ``nifti/example_ct_sm.nii.gz``: CT (30x101x122);
    - ``notes.txt``: not an image.
    """
    ts = shared_data / "fixtures" / "transfer-syntaxes" / "In"
    (root / "studyA" / "ts").mkdir(parents=True)
    for n in (1, 2, 3):
        os.symlink(ts / f"{n}.dcm", root / "studyA" / "ts" / f"{n}.dcm")
    (root / "studyB").mkdir()
    exam = shared_data / "ct" / "philips-head-phantom" / "exam"
    os.symlink(exam / "S1000", root / "studyB" / "S1000")
    os.symlink(exam / "S4010", root / "studyB" / "S4010")
    (root / "studyC").mkdir()
    os.symlink(shared_data / "mr" / "siemens-xa30-enhanced" / "5_anat-T1w_acq-tfl", root / "studyC" / "enh")
    (root / "nifti").mkdir()
    os.symlink(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz", root / "nifti" / "example_ct_sm.nii.gz")
    (root / "notes.txt").write_text("not an image\n")
    return root


SMALL_TREE_SERIES = 5


def leftovers(folder: Path) -> list[str]:
    """Temporary or half-written entries anywhere under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".partial-" in p.name or ".old-" in p.name)
