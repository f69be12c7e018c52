"""Hostile input: mutated real files are read or refused with our error naming the file.

A seeded campaign of ``scripts/fuzz.py`` (a few hundred inputs; the script runs the full 10,000),
plus the specific lies the issue names, each checked for a clear refusal.
"""
from __future__ import annotations

import importlib
import shutil
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_restore.errors import InputError, ModelError
from napari_restore.io import load

REPO = Path(__file__).resolve().parents[1]


def _fuzz_module():
    """``scripts/fuzz.py`` imported by name, so its worker processes can import it too."""
    scripts = str(REPO / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    return importlib.import_module("fuzz")


def test_seeded_campaign_has_no_crash_and_no_hang(shared_data, tmp_path):
    fuzz = _fuzz_module()
    log_path = tmp_path / "fuzz.jsonl"
    stats: dict = {}
    with open(log_path, "w") as log:  # 30 s: a busy shared CI machine must not pass for a hang
        counts = fuzz.run_campaign(240, seed=20240, workers=2, timeout=30.0, workdir=tmp_path / "work", log=log,
                                   stats=stats, bomb_bytes=64 * 2**20)
    summary = {k: counts[k] for k in ("read", "refused", "crash", "hang")}
    bad = [ln for ln in log_path.read_text().splitlines() if '"crash"' in ln or '"hang"' in ln]
    assert summary["crash"] == 0 and summary["hang"] == 0, (summary, bad[:5])
    assert summary["read"] > 20 and summary["refused"] > 20, summary  # the mutations bite, the seeds read
    for kind in fuzz.KINDS:
        assert counts[f"{kind}:read"] + counts[f"{kind}:refused"] > 0, kind
    assert sum(r["escapes"] for r in stats.values()) == 0, fuzz.family_table(stats)
    assert counts["build-error"] == 0, bad[:5]


def test_unmutated_seeds_read(shared_data, tmp_path):
    fuzz = _fuzz_module()
    seeds = fuzz.prepare_seeds(tmp_path, 2**20)
    for p in seeds.dicom_files + seeds.dicom_folders + [seeds.dicomdir_folder / "DICOMDIR"] + seeds.nifti + seeds.sitk:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                vols = load(p)
            except InputError as exc:  # colour or non-image seeds are refused by design
                assert str(p.name) in str(exc)
                continue
        assert fuzz._check_volumes(vols) is None, p
    assert fuzz.run_one("model", str(seeds.model))["outcome"] == "read"


def _copy(shared_data, rel, tmp_path) -> Path:
    dst = tmp_path / Path(rel).name
    shutil.copy(shared_data / rel, dst)
    dst.chmod(0o644)
    return dst


HITACHI = "fixtures/dicom2nifti/hitachi/anatomical/001/001.dcm"


@pytest.mark.parametrize("keyword,value,problem", [
    ("Rows", 1024, "bytes"), ("Columns", 7, "shape"), ("BitsAllocated", 0, "BitsAllocated"),
    ("BitsAllocated", 12, "BitsAllocated"), ("BitsAllocated", 64, "bytes"),
    ("NumberOfFrames", 0, "NumberOfFrames"), ("NumberOfFrames", 1000000, "bytes"),
    ("PixelSpacing", ["nan", "nan"], "PixelSpacing"), ("PixelSpacing", ["0", "0"], "PixelSpacing"),
    ("PixelSpacing", ["-1", "-1"], "PixelSpacing"),
    ("ImageOrientationPatient", ["0"] * 6, "ImageOrientationPatient"),
    ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"], "ImageOrientationPatient"),
    ("RescaleSlope", "0", "RescaleSlope"), ("RescaleSlope", "nan", "RescaleSlope"),
])
def test_lying_headers_are_refused_naming_file_and_problem(shared_data, tmp_path, keyword, value, problem):
    path = _copy(shared_data, HITACHI, tmp_path)
    ds = pydicom.dcmread(path)
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import DataElement

    tag = tag_for_keyword(keyword)
    raw = "\\".join(value) if isinstance(value, list) else value
    ds[tag] = DataElement(tag, dictionary_VR(keyword), raw, validation_mode=0)
    ds.save_as(path)
    with pytest.raises(InputError) as info:
        load(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_missing_sop_class_still_reads(shared_data, tmp_path):
    path = _copy(shared_data, HITACHI, tmp_path)
    ds = pydicom.dcmread(path)
    del ds.SOPClassUID
    ds.save_as(path)
    vols = load(path)
    assert np.isfinite(vols[0].array).all() and vols[0].array.shape[-2:] == (ds.Rows, ds.Columns)


def test_dicomdir_pointing_at_missing_files(shared_data, tmp_path):
    fuzz = _fuzz_module()
    seeds = fuzz.prepare_seeds(tmp_path / "w", 2**20)
    media = tmp_path / "media"
    shutil.copytree(seeds.dicomdir_folder, media)
    for p in media.rglob("*"):
        if p.is_file() and p.name != "DICOMDIR":
            p.unlink()
    with pytest.raises(InputError) as info:
        load(media / "DICOMDIR")
    assert str(media) in str(info.value)


def test_hostile_nifti_and_model_files(shared_data, tmp_path):
    import nibabel as nib

    img = nib.load(str(shared_data / "fixtures/dicom2nifti/hitachi/anatomical/001_ground_truth.nii.gz"))
    bad = tmp_path / "nan_affine.nii"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine), str(bad))
    raw = bytearray(bad.read_bytes())
    struct.pack_into("<f", raw, 280, float("nan"))  # srow_x[0]
    struct.pack_into("<h", raw, 252, 0)  # no qform: the sform is the geometry
    bad.write_bytes(bytes(raw))
    with pytest.raises(InputError, match="affine"):
        load(bad)
    fuzz = _fuzz_module()
    seeds = fuzz.prepare_seeds(tmp_path / "w", 2**20)
    from napari_restore.models import load_model

    for op in ("pickle", "truncate", "unknown-arch"):
        target = tmp_path / f"model-{op}"
        rng = fuzz.random.Random(0)
        rng.choice = lambda seq, op=op: op if op in seq else seq[0]  # force the mutation
        fuzz.mutate_model(seeds.model, target, rng)
        with pytest.raises(ModelError) as info:
            load_model(target)
        assert str(target) in str(info.value)
        assert not (target / "PWNED").exists()
