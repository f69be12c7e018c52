"""Evaluation tables and panels on real scans (few slices, small crops)."""
from __future__ import annotations

import json

import pytest

from napari_restore.errors import InputError
from napari_restore.evaluate import evaluate


def _identity_model(tmp_path):
    from napari_restore.models import save_model
    from napari_restore.networks import build_network

    net = build_network("ResidualUNet", {"spatial_dims": 2, "channels": [8, 16, 32], "strides": [2, 2]})
    card = {"name": "untrained", "version": "0.0.1", "task": "denoise", "modality": "CT", "dims": 2,
            "intensity": {"kind": "ct", "center": 0.0, "scale": 512.0, "clip": [-1024.0, 3071.0]}}
    return save_model(net, card, tmp_path / "untrained")


def test_evaluate_ct_denoise_table_and_panel(shared_data, tmp_path):
    src = shared_data / "ct" / "siemens-body-j2k"
    model = _identity_model(tmp_path)  # zero-initialised residual branch: exactly the identity
    # the fast image-domain CT noise keeps the test short (the benchmark uses projection-domain noise)
    res = evaluate([src], "ct_lowdose", {"dose": 0.25, "method": "image"}, methods=["input", "nlm", "bm3d", "model"],
                   model=model, slices=2, crop=96, seed=0)
    rows = {r["method"]: r for r in res.rows}
    assert {"input", "nlm", "model"} <= set(rows)
    assert rows["model"]["psnr"] == pytest.approx(rows["input"]["psnr"], abs=1e-3)  # identity scores as the input
    assert rows["nlm"]["psnr"] > rows["input"]["psnr"] + 0.5  # tuned NLM removes noise
    assert 0 < rows["input"]["ssim"] < rows["nlm"]["ssim"] <= 1
    md = res.to_markdown()
    assert "W400/L50" in md and "| siemens-body-j2k | nlm |" in md and "Overall" in md
    assert "grid-searched" in md  # the NLM tuning is stated
    try:
        import bm3d  # noqa: F401
        assert "bm3d" in rows
    except ImportError:
        assert "BM3D skipped" in md
    png = res.save_panel(tmp_path / "panel.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.shape[1] > 3 * img.shape[0]  # input / nlm / model / reference side by side
    out = res.save(tmp_path / "report")
    assert json.loads((out / "evaluation.json").read_text())["overall"]["nlm"]["psnr"] == res.overall["nlm"]["psnr"]


def test_evaluate_mr_deblur_with_richardson_lucy(shared_data):
    src = shared_data / "mr" / "nifti" / "T1.nii.gz"
    res = evaluate([src], "gaussian_blur", {"fwhm_vox": 2.5}, methods=["input", "rl", "nlm"], slices=2, crop=96)
    rows = {r["method"]: r for r in res.rows}
    assert "nlm" not in rows and any("nlm skipped" in n for n in res.notes)  # no noise to remove
    assert rows["rl"]["psnr"] > rows["input"]["psnr"]  # the true PSF deconvolves
    assert "MR: clean volume's 1st/99th percentiles" in res.convention


def test_evaluate_bad_arguments(shared_data):
    src = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    with pytest.raises(InputError, match="unknown evaluation method"):
        evaluate([src], methods=["magic"])
    with pytest.raises(InputError, match="needs a model"):
        evaluate([src], methods=["model"])
    with pytest.raises(InputError, match="no such file"):
        evaluate([src.parent / "missing.nii.gz"], methods=["input"])


def test_blur_noise_is_a_fraction_of_the_volume_range(shared_data):
    """--noise-sd 0.01 means 1 % of the clean volume's 1-99 % range, in image units per volume."""
    import numpy as np

    from napari_restore import load
    from napari_restore.intensity import sample_values

    src = shared_data / "mr" / "nifti" / "T1.nii.gz"
    res = evaluate([src], "gaussian_blur", {"fwhm_vox": 2.0, "noise_range_fraction": 0.01}, methods=["input", "nlm"],
                   slices=2, crop=96)
    p1, p99 = np.percentile(sample_values(load(src)[0].array), [1, 99])
    expected = 0.01 * (p99 - p1)
    assert expected > 1.0  # a real amount of noise, not 0.01 image units
    note = next(n for n in res.notes if "added noise SD" in n)
    assert float(note.rsplit(" ", 1)[1]) == pytest.approx(expected, rel=1e-3)
    assert "nlm" in {r["method"] for r in res.rows}  # there is noise, so NLM runs


def test_whole_volume_gives_the_model_every_degraded_slice(shared_data, tmp_path):
    """A 3-D model needs the neighbouring slices: it sees the whole degraded volume, scored on the chosen slices."""
    from napari_restore.models import save_model
    from napari_restore.networks import DEFAULT_3D, build_network

    net = build_network("ResidualUNet", DEFAULT_3D)  # zero-initialised: the identity
    card = {"name": "untrained-3d", "version": "0.0.1", "task": "denoise", "modality": "CT", "dims": 3,
            "intensity": {"kind": "ct", "center": 0.0, "scale": 512.0, "clip": [-1024.0, 3071.0]}}
    model = save_model(net, card, tmp_path / "untrained-3d")
    src = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    res = evaluate([src], "ct_lowdose", {"dose": 0.25, "method": "image"}, methods=["input", "model"], model=model,
                   slices=3, crop=64)
    rows = {r["method"]: r for r in res.rows}
    assert any("3-D model: every slice is degraded" in n for n in res.notes)
    assert rows["model"]["psnr"] == pytest.approx(rows["input"]["psnr"], abs=1e-3)
    assert rows["model"]["slices"] == rows["input"]["slices"] == 3


def test_ensemble_reaches_the_model_and_the_notes(shared_data):
    src = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    kw = dict(degradation="ct_lowdose", params={"dose": 0.25, "method": "image"}, methods=["model"],
              model="denoise-ct", slices=2, crop=64)
    one, two = evaluate([src], **kw), evaluate([src], ensemble=2, **kw)
    assert any("self-ensemble of 2" in n for n in two.notes) and not any("self-ensemble" in n for n in one.notes)
    assert two.rows[0]["psnr"] != pytest.approx(one.rows[0]["psnr"], abs=1e-3)
