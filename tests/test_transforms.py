"""MONAI transforms: array and dictionary forms in a real LoadImaged pipeline, geometry kept."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, LoadImaged

import napari_restore
from _engine_helpers import one_torch_thread, save_tiny, tiny_card, trained_tiny_network
from napari_restore.errors import ModelError
from napari_restore.models import save_model
from napari_restore.transforms import (Deblur, Denoise, Denoised, EnhanceEdges, EnhanceEdgesd, Restore, Restored,
                                       volume_from_image)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(autouse=True)
def empty_user_models(tmp_path, monkeypatch):
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(tmp_path / "none"))
    monkeypatch.setattr("napari_restore.models.BUNDLED_DIR", tmp_path / "no-bundled-models")


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    return save_model(trained_tiny_network(shared_data), tiny_card(), tmp_path_factory.mktemp("m") / "tiny")


def _load(path):
    return LoadImaged(keys="image", image_only=False, ensure_channel_first=True)({"image": str(path)})


@pytest.mark.parametrize("name", ["ct/nifti/example_ct_sm.nii.gz", "ct/nifti/cta_aorta_cropped.nii.gz"])
def test_volume_from_metatensor_matches_our_nifti_reader(shared_data, name):
    img = _load(shared_data / name)["image"]
    vol = volume_from_image(img)
    ref = napari_restore.load(shared_data / name)[0]
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-5)
    assert np.array_equal(vol.array, ref.array) and vol.modality == ref.modality == "CT"


def test_full_monai_pipeline_on_real_ct(shared_data, trained):
    path = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    raw = _load(path)["image"]
    pipeline = Compose([LoadImaged(keys="image", image_only=False, ensure_channel_first=True),
                        Denoised(keys="image", model=trained, modality="CT", device="cpu")])
    data = pipeline({"image": str(path)})
    out = data["image"]
    assert isinstance(out, MetaTensor) and out.shape == raw.shape == (1, 122, 101, 30)
    assert out.dtype == torch.float32
    assert torch.equal(out.affine, raw.affine)
    assert out.meta["filename_or_obj"] == raw.meta["filename_or_obj"]
    assert "image_meta_dict" in data
    # the same numbers as the public API on the same file: slices run along k (the Volume's z)
    ref = napari_restore.restore(napari_restore.load(path)[0], model=trained, device="cpu")
    np.testing.assert_allclose(out[0].numpy().T, ref.array, atol=1e-3)
    assert not torch.allclose(out, raw)


def test_array_transforms_keep_the_input_type(shared_data, trained):
    vol = napari_restore.load(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")[0]
    chw = np.ascontiguousarray(vol.array.T)[None]  # (1, I, J, K)
    np_out = Denoise(model=trained, modality="CT", device="cpu")(chw)
    t_out = Denoise(model=trained, modality="CT", device="cpu")(torch.from_numpy(chw))
    assert isinstance(np_out, np.ndarray) and isinstance(t_out, torch.Tensor)
    np.testing.assert_allclose(np_out, t_out.numpy(), atol=1e-4)
    two = np.concatenate([chw, chw[:, ::-1]], axis=0)  # two channels, restored independently
    out2 = Denoise(model=trained, modality="CT", device="cpu")(two)
    np.testing.assert_allclose(out2[0], np_out[0], atol=1e-4)
    e2 = Denoise(model=trained, modality="CT", device="cpu", ensemble=2)(chw)  # the same as restore(ensemble=2)
    by_api = napari_restore.restore(vol, model=trained, device="cpu", ensemble=2).array
    np.testing.assert_allclose(e2[0], by_api.T, atol=1e-4)
    assert not np.allclose(e2, np_out, atol=1e-2)
    enh = EnhanceEdges(modality="CT", device="cpu")(chw)
    assert enh.shape == chw.shape and not np.allclose(enh, chw)
    with pytest.raises(ModelError, match="no trained 'deblur' model"):
        Deblur(modality="CT")(chw)
    with pytest.warns(RuntimeWarning, match="skipped"):
        rest = Restore(model={"denoise": trained}, modality="CT", device="cpu")(chw)
    assert rest.shape == chw.shape


def test_dictionary_transforms_compose_over_several_keys(shared_data, tmp_path):
    path = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    identity = save_tiny(tmp_path / "id")
    pipeline = Compose([
        LoadImaged(keys=["image", "label"], image_only=True, ensure_channel_first=True),
        Denoised(keys=["image", "label"], model=identity, modality="CT", device="cpu"),
        EnhanceEdgesd(keys=["image", "missing"], modality="CT", device="cpu", strength=0.0, allow_missing_keys=True),
    ])
    data = pipeline({"image": str(path), "label": str(path)})
    raw = _load(path)["image"]
    for key in ("image", "label"):
        assert isinstance(data[key], MetaTensor)
        np.testing.assert_allclose(data[key].numpy(), raw.numpy(), atol=1e-3)
    with pytest.warns(RuntimeWarning, match="skipped"):
        out = Restored(keys="image", modality="CT", device="cpu")({"image": raw})
    assert out["image"].shape == raw.shape
