"""MONAI bundle export and safe re-load."""
from __future__ import annotations

import json
import shutil

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
    net = parser.get_parsed_content("network")
    net.load_state_dict(torch.load(parser.get_parsed_content("ckpt_path"), weights_only=True))
    ens = parser.get_parsed_content("network_ensemble").eval()
    x = torch.randn(1, 1, 32, 48, generator=torch.Generator().manual_seed(0))
    ours = SelfEnsemble(load_model(folder).network, 2).eval()
    with torch.no_grad():
        np.testing.assert_allclose(ens(x).numpy(), ours(x).numpy(), atol=1e-6)
        assert not torch.allclose(ens(x), net.eval()(x), atol=1e-4)  # two passes, not one
    # a one-pass card adds nothing
    plain = export_bundle(_model(tmp_path / "one"), tmp_path / "plain")
    assert "network_ensemble" not in json.loads((plain / "configs" / "inference.json").read_text())
