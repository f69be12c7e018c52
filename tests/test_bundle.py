"""MONAI bundle export and safe re-load; the bundle run by MONAI's own runner gives what restore() gives."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_restore import load, restore
from napari_restore.errors import ModelError
from napari_restore.models import load_model, save_model
from napari_restore.networks import build_network
from napari_restore.training.bundle import export_bundle, is_bundle, load_bundle


def _model(tmp_path, **card_extra):
    torch.manual_seed(1)
    net = build_network("ResidualUNet", {"spatial_dims": 2, "channels": [8, 16, 32], "strides": [2, 2]})
    with torch.no_grad():  # non-trivial weights: perturb everything, incl. the zero-initialised last layer
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    card = {"name": "bundle-test", "version": "0.2.0", "task": "denoise", "modality": "CT", "dims": 2,
            "intensity": {"kind": "ct", "center": 0.0, "scale": 512.0, "clip": [-1024.0, 3071.0]},
            "training_data": ["ct/nifti/example_ct_sm.nii.gz (TotalSegmentator, Apache-2.0)"],
            "metrics": {"val_psnr": 40.0}, "license": "Apache-2.0", **card_extra}
    return save_model(net, card, tmp_path / "model")


def test_bundle_roundtrip_gives_the_same_output(shared_data, tmp_path):
    folder = _model(tmp_path)
    bundle = export_bundle(folder, tmp_path / "bundle")
    assert is_bundle(bundle)
    for rel in ("configs/metadata.json", "configs/inference.json", "configs/napari_restore_card.json",
                "models/model.pt", "docs/README.md", "LICENSE"):
        assert (bundle / rel).is_file(), rel
    # MONAI's own parser reads the metadata (read only, nothing evaluated)
    from monai.bundle import ConfigParser

    meta = ConfigParser.load_config_file(bundle / "configs" / "metadata.json")
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "network_data_format", "changelog"):
        assert key in meta, key
    assert meta["version"] == "0.2.0"
    assert meta["network_data_format"]["inputs"]["image"]["num_channels"] == 1
    assert meta["network_data_format"]["outputs"]["pred"]["modality"] == "CT"

    vol = load(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")[0]
    from napari_restore.volume import Volume

    sub = Volume(vol.array[10:13], vol.affine, "CT", {})
    a = restore(sub, model=str(folder), device="cpu").array
    b = restore(sub, model=str(bundle), device="cpu").array  # models.load_model recognises the bundle
    assert not np.allclose(a, sub.array)  # the model does something
    np.testing.assert_array_equal(a, b)
    loaded = load_model(bundle)
    assert loaded.card.name == "bundle-test" and loaded.card.source == "bundle"
    ref = load_model(folder).network.state_dict()
    for k, v in loaded.network.state_dict().items():
        assert torch.equal(v, ref[k]), k


def test_bundle_refuses_unsafe_or_foreign_bundles(tmp_path):
    bundle = export_bundle(_model(tmp_path), tmp_path / "bundle")
    # weights holding pickled code
    evil = tmp_path / "evil"
    shutil.copytree(bundle, evil)

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"w": Payload()}, evil / "models" / "model.pt")
    with pytest.raises(ModelError, match="refused"):
        load_bundle(evil)
    # a MONAI bundle from elsewhere (no napari-restore card)
    foreign = tmp_path / "foreign"
    shutil.copytree(bundle, foreign)
    (foreign / "configs" / "napari_restore_card.json").unlink()
    with pytest.raises(ModelError, match="napari_restore_card"):
        load_model(foreign)
    # metadata without the required bundle keys
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "configs" / "metadata.json").write_text(json.dumps({"version": "0.2.0"}))
    with pytest.raises(ModelError, match="monai_version"):
        load_bundle(broken)
    # an architecture outside the whitelist
    odd = tmp_path / "odd"
    shutil.copytree(bundle, odd)
    card = json.loads((odd / "configs" / "napari_restore_card.json").read_text())
    card["architecture"]["name"] = "os.system"
    (odd / "configs" / "napari_restore_card.json").write_text(json.dumps(card))
    with pytest.raises(ModelError, match="architecture"):
        load_bundle(odd)


def test_bundle_of_a_self_ensemble_model_gives_monai_users_the_same_ensemble(tmp_path):
    from monai.bundle import ConfigParser

    from napari_restore.networks import SelfEnsemble

    folder = _model(tmp_path, self_ensemble=2)
    bundle = export_bundle(folder, tmp_path / "bundle")
    assert "network_ensemble" in (bundle / "docs" / "README.md").read_text()
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    assert parser["self_ensemble"] == 2
    net = parser.get_parsed_content("network")  # the weights are loaded by the config itself
    ref = load_model(folder).network.state_dict()
    assert all(torch.equal(v.cpu(), ref[k]) for k, v in net.state_dict().items())
    assert parser["predictor"] == "@network_ensemble"
    ens = parser.get_parsed_content("network_ensemble").eval()
    x = torch.randn(1, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    ours = SelfEnsemble(load_model(folder).network, 2).eval()
    with torch.no_grad():
        np.testing.assert_allclose(ens(x).numpy(), ours(x).numpy(), atol=1e-6)
        assert not torch.allclose(ens(x), net.eval()(x), atol=1e-4)  # two passes, not one
    # a one-pass card adds nothing
    plain = export_bundle(_model(tmp_path / "one"), tmp_path / "plain")
    assert "network_ensemble" not in json.loads((plain / "configs" / "inference.json").read_text())
    assert json.loads((plain / "configs" / "inference.json").read_text())["predictor"] == "@network"


REPO = Path(__file__).resolve().parents[1]
#: restore() and the bundle run the same network on the same slices; they differ only by float rounding
#: (restore folds batch norm into the convolutions and uses channels-last weights). Measured: 0.0006 HU
#: at most on CT (denoise-ct-25d), 6e-5 on 8-bit MR (deblur-mr-25d, 8-fold self-ensemble).
CT_TOLERANCE_HU = 0.05
MR_TOLERANCE = 1e-3  # relative to the image's maximum


def _monai_bundle(*args, cwd) -> subprocess.CompletedProcess:
    """``python -m monai.bundle ...`` as a user runs it (from another working folder)."""
    out = subprocess.run([sys.executable, "-m", "monai.bundle", *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_shipped_bundle_runs_through_monais_runner_like_restore(shared_data, tmp_path):
    from monai.bundle import ConfigParser

    bundle = export_bundle("denoise-ct-25d", tmp_path / "bundle")  # 2.5-D: neighbouring slices as channels
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in ("preprocessing", "inferer", "postprocessing", "run", "network", "ckpt_path"):
        assert key in cfg, key
    names = [t["_target_"] for t in cfg["preprocessing"]["transforms"] + cfg["postprocessing"]["transforms"]]
    assert names[:2] == ["LoadImaged", "EnsureChannelFirstd"] and "SaveImaged" in names
    assert "napari_restore.bundle_transforms.CardNormalized" in names
    assert cfg["inferer"]["context"] == 1
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and image["value_range"] == [-8.0, 3071.0 / 128.0]  # network units, not HU
    assert "clip(HU, -1024, 3071)" in image["note"]
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 1
    # the licence in full, and the training data's licences
    assert (bundle / "LICENSE").read_text().startswith((REPO / "LICENSE").read_text())
    data_licenses = (bundle / "docs" / "data_licenses.md").read_text()
    assert "Apache License" in data_licenses and "BSD 2-Clause License" in data_licenses  # TotalSegmentator, dcm_qa_ct
    # MONAI's parser gives the trained network
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"], parser["device"] = str(bundle), "$torch.device('cpu')"
    net = parser.get_parsed_content("network")
    ref = load_model("denoise-ct-25d").network.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in net.state_dict().items())

    src = tmp_path / "in"
    src.mkdir()
    ct = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    shutil.copy(ct, src / ct.name)
    work = tmp_path / "elsewhere"  # not the bundle's folder: the config finds its weights itself
    work.mkdir()
    _monai_bundle("run", "--config_file", bundle / "configs" / "inference.json", "--dataset_dir", src,
                  "--output_dir", tmp_path / "out", "--device", "$torch.device('cpu')", cwd=work)
    (written,) = (tmp_path / "out").glob("*.nii.gz")
    assert written.name == "example_ct_sm_denoise.nii.gz"
    vol = load(ct)[0]
    ours = restore(vol, model="denoise-ct-25d", device="cpu")
    theirs = load(written)[0]
    np.testing.assert_allclose(theirs.affine, vol.affine, atol=1e-5)
    assert theirs.array.shape == vol.array.shape
    assert np.abs(ours.array - vol.array).mean() > 2.0  # the model changes the image ...
    np.testing.assert_allclose(theirs.array, ours.array, atol=CT_TOLERANCE_HU, rtol=0)  # ... and both agree
    # MONAI's check of the network against metadata.json, for the bare definition and the loaded network
    _monai_bundle("verify_net_in_out", "network_def", "--meta_file", bundle / "configs" / "metadata.json",
                  "--config_file", bundle / "configs" / "inference.json", "--device", "cpu", cwd=work)
    _monai_bundle("verify_net_in_out", "network", "--meta_file", "configs/metadata.json",
                  "--config_file", "configs/inference.json", "--device", "cpu", cwd=bundle)


def test_mr_bundle_with_percentiles_and_self_ensemble_matches_restore(shared_data, tmp_path):
    """Percentile normalisation (fitted on the volume) and a 2-fold self-ensemble, in-process through monai.bundle.run."""
    import nibabel as nib
    from monai.bundle import run

    torch.manual_seed(2)
    net = build_network("ResidualUNet", {"spatial_dims": 2, "channels": [8, 16], "strides": [2], "context": 1})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    card = {"name": "bundle-mr", "version": "0.1.0", "task": "deblur", "modality": "MR", "dims": 2,
            "intensity": {"kind": "percentile", "lower": 1.0, "upper": 99.0}, "self_ensemble": 2,
            "training_data": ["mr/nifti/T1.nii.gz (from neurolabusc/VolumeRenderingData @ d15be4d (MIT, Chris Rorden))"],
            "license": "BSD-3-Clause (weights)"}
    folder = save_model(net, card, tmp_path / "model")
    bundle = export_bundle(folder, tmp_path / "bundle")
    assert "MIT License" in (bundle / "docs" / "data_licenses.md").read_text()
    img = nib.load(str(shared_data / "mr" / "nifti" / "T1.nii.gz"))
    src = tmp_path / "in"
    src.mkdir()
    crop = np.asarray(img.dataobj)[30:90, 40:120, 60:72]
    nib.save(nib.Nifti1Image(crop, img.affine), str(src / "t1crop.nii.gz"))
    run(config_file=str(bundle / "configs" / "inference.json"), dataset_dir=str(src), output_dir=str(tmp_path / "out"),
        device="$torch.device('cpu')", logging_file=False)
    vol = load(src / "t1crop.nii.gz")[0]
    vol.modality = "MR"
    ours = restore(vol, task="deblur", model=str(folder), device="cpu").array
    theirs = load(tmp_path / "out" / "t1crop_deblur.nii.gz")[0].array
    assert np.abs(ours - vol.array).mean() > 0.1
    np.testing.assert_allclose(theirs, ours, atol=MR_TOLERANCE * float(vol.array.max()), rtol=0)


def test_3d_bundle_uses_a_sliding_window_over_the_volume_axes(shared_data, tmp_path):
    """A 3-D model: MONAI's sliding window over (K, J, I); one window the size of the volume = restore()."""
    import nibabel as nib
    from monai.bundle import run

    torch.manual_seed(3)
    net = build_network("ResidualUNet", {"spatial_dims": 3, "channels": [4, 8], "strides": [2]})
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    card = {"name": "bundle-3d", "version": "0.1.0", "task": "denoise", "modality": "CT", "dims": 3,
            "patch_size": [8, 32, 40], "intensity": {"kind": "ct", "center": 0.0, "scale": 128.0, "clip": [-1024.0, 3071.0]},
            "training_data": "synthetic", "license": "BSD-3-Clause (weights)"}
    folder = save_model(net, card, tmp_path / "model")
    bundle = export_bundle(folder, tmp_path / "bundle")
    cfg = json.loads((bundle / "configs" / "inference.json").read_text())
    assert cfg["inferer"]["_target_"].endswith("ReversedAxesSlidingWindowInferer") and cfg["inferer"]["roi_size"] == [8, 32, 40]
    img = nib.load(str(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"))
    src = tmp_path / "in"
    src.mkdir()
    crop = np.asarray(img.dataobj)[40:80, 30:62, 10:18]  # (I, J, K) = (40, 32, 8): the Volume is (8, 32, 40)
    nib.save(nib.Nifti1Image(crop, img.affine), str(src / "ct3d.nii"))
    run(config_file=str(bundle / "configs" / "inference.json"), dataset_dir=str(src), output_dir=str(tmp_path / "out"),
        device="$torch.device('cpu')", logging_file=False)
    vol = load(src / "ct3d.nii")[0]
    vol.modality = "CT"
    ours = restore(vol, model=str(folder), mode="3d", device="cpu").array
    theirs = load(tmp_path / "out" / "ct3d_denoise.nii.gz")[0].array
    assert np.abs(ours - vol.array).mean() > 1.0
    np.testing.assert_allclose(theirs, ours, atol=CT_TOLERANCE_HU, rtol=0)
