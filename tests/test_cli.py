"""The command line on real ../shared/data series: DICOM and NIfTI outputs, errors, exit codes."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import napari_restore as nr
from napari_restore.cli import EXIT_ERROR, EXIT_OK, main

from _engine_helpers import save_tiny, trained_tiny_network


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def tiny_model(shared_data, tmp_path_factory) -> Path:
    return save_tiny(tmp_path_factory.mktemp("models") / "tiny", trained_tiny_network(shared_data))


def test_restore_dicom_series_to_dicom_and_nifti(shared_data, tiny_model, tmp_path, capsys):
    src = shared_data / "ct/philips-head-phantom/exam/S2010"
    before = _tree_hash(src)
    out_dcm = tmp_path / "restored_dicom"
    assert main(["restore", str(src), str(out_dcm), "--model", str(tiny_model), "--strength", "0.8"]) == EXIT_OK
    assert "wrote" in capsys.readouterr().out
    out_nii = tmp_path / "restored.nii.gz"
    assert main(["restore", str(src), str(out_nii), "--model", str(tiny_model), "--strength", "0.8"]) == EXIT_OK
    assert _tree_hash(src) == before  # the input is never touched

    source = nr.load(src)[0]
    from_dicom = nr.load(out_dcm)[0]
    from_nifti = nr.load(out_nii)[0]
    for v in (from_dicom, from_nifti):
        assert v.array.shape == source.array.shape
        np.testing.assert_allclose(v.affine, source.affine, atol=1e-3)
    np.testing.assert_allclose(from_dicom.array, from_nifti.array, atol=0.51)  # int16 export, slope 1
    assert not np.allclose(from_nifti.array, source.array, atol=1.0)  # something was restored
    assert abs(float(np.mean(from_nifti.array - source.array))) < 5.0  # HU level kept
    assert "tiny-ct-denoise" in str(from_dicom.meta["dicom_header"].SeriesDescription) or \
        "denoise" in str(from_dicom.meta["dicom_header"].SeriesDescription)


def test_existing_output_is_refused_without_overwrite(shared_data, tiny_model, tmp_path, capsys):
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    src = shared_data / "ct/nifti/example_ct_sm.nii.gz"
    assert main(["restore", str(src), str(out), "--model", str(tiny_model)]) == EXIT_ERROR
    assert "exists" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["restore", str(src), str(out), "--model", str(tiny_model), "--overwrite"]) == EXIT_OK
    assert nib.load(out).shape == (122, 101, 30)
    e2 = tmp_path / "e2.nii.gz"  # --ensemble: the network averaged over a flip, as restore(ensemble=2)
    assert main(["restore", str(src), str(e2), "--model", str(tiny_model), "--ensemble", "2"]) == EXIT_OK
    expected = nr.restore(nr.load(src)[0], model=tiny_model, ensemble=2).array
    np.testing.assert_allclose(nr.load(e2)[0].array, expected, atol=0.01)
    assert not np.allclose(nr.load(e2)[0].array, nr.load(out)[0].array, atol=0.01)


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["restore", str(tmp_path / "nothing"), str(tmp_path / "o.nii")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    src_dir = tmp_path / "d"
    src_dir.mkdir()
    assert main(["info", str(src_dir)]) == EXIT_ERROR
    assert "empty" in capsys.readouterr().err


def test_missing_model_is_explained(shared_data, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(tmp_path / "no-models"))
    src = shared_data / "ct/nifti/example_ct_sm.nii.gz"
    code = main(["restore", str(src), str(tmp_path / "o.nii.gz"), "--model", str(tmp_path / "missing-model")])
    assert code == EXIT_ERROR
    assert "missing-model" in capsys.readouterr().err
    assert not (tmp_path / "o.nii.gz").exists()


def test_series_selection_and_info(shared_data, tiny_model, tmp_path, capsys):
    exam = shared_data / "ct/philips-head-phantom/exam"
    assert main(["info", str(exam)]) == EXIT_OK
    listing = capsys.readouterr().out
    assert "#0:" in listing and "(140, 512, 512)" in listing and "(28, 512, 512)" in listing
    assert main(["info"]) == EXIT_OK  # the installed models, with what sets them apart
    models = capsys.readouterr().out
    assert "deblur-mr-25d 0.3.0  task=deblur modality=MR 2D context=1 slices<=2mm self-ensemble=8  [bundled]" in models
    assert "denoise-ct 0.3.0  task=denoise modality=CT 2D  [bundled]" in models
    out = tmp_path / "thick.nii.gz"
    assert main(["restore", str(exam), str(out), "--series", "201", "--model", str(tiny_model)]) == EXIT_OK
    assert nr.load(out)[0].array.shape == (28, 512, 512)
    assert main(["restore", str(exam), str(tmp_path / "x.nii.gz"), "--series", "999"]) == EXIT_ERROR
    assert "no series '999'" in capsys.readouterr().err


def test_help_explains_every_option():
    out = subprocess.run([sys.executable, "-m", "napari_restore.cli", "restore", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in ("--task", "--model", "--mode", "--device", "--strength", "--series", "--overwrite"):
        assert opt in out


def test_demo_writes_outputs(tmp_path):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == EXIT_OK
    files = {p.name for p in (tmp_path / "demo").iterdir()}
    assert "before_after.png" in files and "sample_input.nii.gz" in files
    assert any(name.endswith("_dicom") for name in files)
    dicom = next(p for p in (tmp_path / "demo").iterdir() if p.name.endswith("_dicom"))
    assert nr.load(dicom)[0].array.shape == (24, 192, 192)


def test_modality_option_picks_the_model_for_a_nifti_that_does_not_say(shared_data, tmp_path, monkeypatch, capsys):
    """mr/nifti/T1.nii.gz carries no modality: --modality MR makes the installed MR model apply."""
    models = tmp_path / "models"
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(models))
    monkeypatch.setattr("napari_restore.models.BUNDLED_DIR", tmp_path / "no-bundled-models")
    save_tiny(models / "tiny-mr", name="tiny-mr", modality="MR",
              intensity={"kind": "percentile", "lower": 1.0, "upper": 99.0})
    src = shared_data / "mr/nifti/T1.nii.gz"
    assert main(["restore", str(src), str(tmp_path / "no.nii.gz")]) == EXIT_ERROR
    assert "--modality CT|MR" in capsys.readouterr().err  # the modality is unknown: say how to set it
    out = tmp_path / "t1_dicom"
    assert main(["restore", str(src), str(out), "--modality", "MR"]) == EXIT_OK
    back = nr.load(out)[0]
    assert back.modality == "MR" and back.array.shape == nr.load(src)[0].array.shape
