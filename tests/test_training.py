"""Training on real slices from ../shared/data: learning, exact resume, modes, bad inputs."""
from __future__ import annotations

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch

from napari_restore.errors import Cancelled, InputError, ModelError, OutputError
from napari_restore.training import TrainConfig, train
from napari_restore.training.data import load_series, match_pairs, split_series
from napari_restore.training.losses import gather_cells, n2v_mask, neighbor_subsample

TINY = {"channels": [8, 16, 32], "strides": [2, 2]}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _cfg(tmp_path, data, **kw):
    base = dict(data=[str(d) for d in data], output=str(tmp_path / "model"), architecture=TINY, patch_size=(32, 32),
                batch_size=4, epochs=2, steps_per_epoch=4, val_slices=2, val_crop=64, patience=0,
                progress_bar=False, tensorboard=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def test_training_reduces_validation_loss(shared_data, tmp_path, cache):
    ct = shared_data / "ct"
    cfg = _cfg(tmp_path, [ct / "siemens-body-j2k"], val_data=[str(ct / "philips-head-phantom" / "exam" / "S2010")],
               architecture={"channels": [16, 32, 64], "strides": [2, 2]}, patch_size=(48, 48), batch_size=8,
               epochs=3, steps_per_epoch=8, lr=3e-3, dose_range=(0.1, 0.5), val_crop=64, cache_dir=str(cache),
               tensorboard=True)
    result = train(cfg)
    h = result.history
    assert [r["epoch"] for r in h] == [1, 2, 3] and h[-1]["step"] == 24
    assert result.best["val_loss"] < h[0]["val_loss"]  # validation loss went down during training
    assert h[-1]["train_loss"] < h[0]["train_loss"]
    assert all(np.isfinite([r["val_psnr"], r["val_ssim"]]).all() for r in h)
    # the model folder: best weights and a card with the data, the command and the figures
    card = json.loads((result.model_dir / "card.json").read_text())
    assert card["modality"] == "CT" and card["task"] == "denoise" and card["dims"] == 2
    assert any("siemens-body-j2k" in s for s in card["training_data"])
    assert card["metrics"]["val_loss"] == pytest.approx(result.best["val_loss"], rel=1e-4)
    assert "val_psnr_input" in card["metrics"] and "W400/L50" in card["metrics"]["metric_convention"]
    assert card["training"]["command"] and card["training"]["validation_data"]
    rows = list(csv.DictReader(open(result.run_dir / "log.csv")))
    assert len(rows) == 4 and rows[0]["epoch"] == "0"  # baseline + 3 epochs
    assert any((result.run_dir / "tensorboard").iterdir())
    assert (result.run_dir / "best.pt").is_file() and (result.run_dir / "last.pt").is_file()
    # decoded volumes were cached as normalised float32 .npy
    assert list(cache.glob("*.npy"))
    # the model loads and runs through the public API
    from napari_restore import load, restore

    vol = load(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")[0]
    out = restore(vol, model=str(result.model_dir), device="cpu")
    assert out.array.shape == vol.array.shape and np.isfinite(out.array).all()


def test_resume_continues_from_the_saved_step(shared_data, tmp_path):
    nif = shared_data / "ct" / "nifti"
    kw = dict(val_data=[str(nif / "cta_aorta_cropped.nii.gz")], epochs=3, steps_per_epoch=3, schedule="cosine")
    straight = train(_cfg(tmp_path / "a", [nif / "example_ct_sm.nii.gz"], **kw))

    calls = []

    def cancel_after_first_epoch():
        calls.append(1)
        return len(calls) > 3  # 3 steps = one epoch, then cancel

    with pytest.raises(Cancelled):
        train(_cfg(tmp_path / "b", [nif / "example_ct_sm.nii.gz"], **kw), cancel=cancel_after_first_epoch)
    run_b = tmp_path / "b" / "model.run"
    ckpt = torch.load(run_b / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == 3
    assert not (tmp_path / "b" / "model").exists()  # cancelled: no model written
    resumed = train(_cfg(tmp_path / "b", [nif / "example_ct_sm.nii.gz"], resume=str(run_b), **kw))
    assert [r["step"] for r in resumed.history] == [3, 6, 9]
    assert resumed.steps == straight.steps == 9
    a, b = straight.network.state_dict(), resumed.network.state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["val_loss"] for r in resumed.history] == pytest.approx([r["val_loss"] for r in straight.history], rel=1e-4)


def test_paired_mode_matches_by_position(shared_data, tmp_path):
    from napari_restore import load, save
    from napari_restore.degrade import degrade
    from napari_restore.volume import Volume

    nif = shared_data / "ct" / "nifti"
    full_dir, low_dir = tmp_path / "full", tmp_path / "low"
    full_dir.mkdir()
    low_dir.mkdir()
    for name in ("example_ct_sm.nii.gz", "cta_aorta_cropped.nii.gz"):
        v = load(nif / name)[0]
        v = Volume(v.array[:12], v.affine, "CT", {})
        save(v, full_dir / name)
        low = degrade(v, "ct_lowdose", dose=0.2, method="image", seed=0)
        # the low-dose series lacks its first two slices: slices must be matched by position
        shift = low.affine.copy()
        shift[:3, 3] = low.affine[:3, :3] @ np.array([2.0, 0, 0]) + low.affine[:3, 3]
        save(Volume(low.array[2:], shift, "CT", {}), low_dir / name)
    full = load_series([full_dir])
    lows = load_series([low_dir])
    pairs = match_pairs(lows, full)
    assert len(pairs) == 2
    for lo, fu in pairs:
        assert lo.array.shape == fu.array.shape and lo.array.shape[0] == 10
        # matched slices are the same anatomy: low-dose minus full-dose is noise only (small mean)
        assert abs(float(np.mean(lo.array - fu.array))) * 512 < 5.0
    result = train(_cfg(tmp_path, [full_dir], mode="paired", low_data=[str(low_dir)], epochs=1))
    assert np.isfinite(result.history[-1]["val_loss"]) and np.isfinite(result.baseline["val_psnr"])

    # a low-dose series offset by half a slice matches nothing: clear error before training
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    v = load(full_dir / "example_ct_sm.nii.gz")[0]
    off = v.affine.copy()
    off[:3, 3] += v.affine[:3, 0] * 0.5
    save(Volume(v.array, off, "CT", {}), bad_dir / "x.nii.gz")
    progress = []
    with pytest.raises(InputError, match="matches no full-dose series"):
        train(_cfg(tmp_path / "c", [full_dir], mode="paired", low_data=[str(bad_dir)]),
              progress=lambda *a: progress.append(a))
    assert progress == []


def test_self_supervised_modes_run(shared_data, tmp_path):
    nif = shared_data / "ct" / "nifti"
    common = dict(val_data=[str(nif / "cta_aorta_cropped.nii.gz")], mode="self-supervised", epochs=1,
                  steps_per_epoch=3, patch_size=(64, 64))
    n2n = train(_cfg(tmp_path / "n2n", [nif / "example_ct_sm.nii.gz"], pd_factor=2, **common))
    n2v = train(_cfg(tmp_path / "n2v", [nif / "example_ct_sm.nii.gz"], self_supervised="n2v", blind_spot=3,
                     n2v_spacing=6, **common))
    for r in (n2n, n2v):
        assert np.isfinite(r.history[-1]["train_loss"]) and np.isfinite(r.history[-1]["val_loss"])
        card = json.loads((r.model_dir / "card.json").read_text())
        assert card["training"]["mode"] == "self-supervised"


def test_self_supervised_samplers():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(2 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    i1, i2, _ = neighbor_subsample(y, g)
    g1, g2 = gather_cells(y, i1), gather_cells(y, i2)
    d = (g1 - g2).abs()  # indices differ by 1 (horizontal) or 8 (vertical) neighbours, never diagonal
    assert set(d.unique().tolist()) <= {1.0, 8.0}
    y = torch.randn(2, 1, 32, 32)
    masked, centres = n2v_mask(y, blind_spot=3, spacing=8, generator=g)
    assert int(centres.sum()) == 2 * 4 * 4
    near = torch.nn.functional.max_pool2d(centres.float(), 3, 1, 1).bool()  # the 3x3 boxes
    assert bool((masked[near] != y[near]).all())  # the whole blind-spot box is replaced
    assert torch.equal(masked[~near], y[~near])  # everything else untouched


def test_samplers_with_neighbour_slices():
    """2.5-D inputs (B, C, H, W): N2N sub-samples every slice at the same cells; N2V masks the centre only."""
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 3, 16, 16)
    i1, _, _ = neighbor_subsample(y[:, :1], g)
    picked = gather_cells(y, i1)
    assert picked.shape == (2, 3, 8, 8)
    for c in range(3):
        torch.testing.assert_close(picked[:, c:c + 1], gather_cells(y[:, c:c + 1], i1), rtol=0, atol=0)
    masked, centres = n2v_mask(y, blind_spot=1, spacing=4, generator=g)
    assert torch.equal(masked[:, [0, 2]], y[:, [0, 2]])  # the neighbours are left alone
    assert bool((masked[:, 1:2][centres] != y[:, 1:2][centres]).all())


def test_context_samples_stack_mirrored_neighbours(shared_data, cache):
    from napari_restore.networks import mirror_indices
    from napari_restore.training.data import Degradation, PatchDataset, validation_set

    series = load_series([shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], cache_dir=cache)
    arr = series[0].array
    plain = PatchDataset(series, (32, 32), 12, None, augment=False, seed=3, context=1)
    for i in range(12):  # self-supervised samples: the raw crops, so they can be located
        item = plain[i]
        x, t = item["input"].numpy(), item["target"].numpy()
        assert x.shape == (3, 32, 32) and t.shape == (1, 32, 32)
        hits = [(z, y0, x0) for z in range(arr.shape[0]) for y0 in range(arr.shape[1] - 31)
                for x0 in range(arr.shape[2] - 31) if np.array_equal(arr[z, y0:y0 + 32, x0:x0 + 32], t[0])]
        z, y0, x0 = hits[0]
        for c, zz in enumerate(mirror_indices(z - 1, 3, arr.shape[0])):
            np.testing.assert_array_equal(x[c], arr[zz, y0:y0 + 32, x0:x0 + 32])
    noisy = PatchDataset(series, (32, 32), 4, Degradation("ct_lowdose", noise_hu_range=(30.0, 30.0)), augment=False,
                         seed=3, context=1)
    for i in range(4):  # same seed, no augmentation: the same crops as ``plain``, plus noise
        noise = noisy[i]["input"].numpy() - plain[i]["input"].numpy()
        np.testing.assert_array_equal(noisy[i]["target"].numpy(), plain[i]["target"].numpy())
        assert (noise.std(axis=(1, 2)) > 0.02).all()  # ~30 HU / 512 HU per unit in every slice
        # every slice has its own noise (an end slice's mirrored self aside)
        if len({tuple(c.ravel()[:8]) for c in plain[i]["input"].numpy()}) == 3:
            r = np.corrcoef(noise.reshape(3, -1))
            assert np.abs(r[np.triu_indices(3, 1)]).max() < 0.2
    items = validation_set(series, (32, 32), 3, 48, Degradation("ct_lowdose"), context=2)
    assert all(it["input"].shape == (5, 48, 48) and it["target"].shape == (1, 48, 48) for it in items)


def test_single_slice_samples_repeat_the_slice_and_its_noise(shared_data, cache, tmp_path):
    """A share of 2.5-D samples reach the network as a single-slice series does: the slice, noise and all, thrice."""
    from napari_restore.training.data import Degradation, PatchDataset

    series = load_series([shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], cache_dir=cache)
    deg = Degradation("ct_lowdose", noise_hu_range=(30.0, 30.0))
    ds = PatchDataset(series, (32, 32), 40, deg, augment=False, seed=5, context=1, single_slice_fraction=0.5)
    lone = 0
    for i in range(40):
        x, t = ds[i]["input"].numpy(), ds[i]["target"].numpy()
        same = np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
        lone += same
        if same:  # the noisy centre repeated; the target is its clean self
            assert 0.02 < float((x[1] - t[0]).std()) < 0.2
    assert 8 <= lone <= 32  # about half of 40
    plain = PatchDataset(series, (32, 32), 10, deg, augment=False, seed=5, context=1)
    assert not any(np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
                   for x in (plain[i]["input"].numpy() for i in range(10)))  # off by default
    with pytest.raises(InputError, match="single_slice_fraction"):
        _cfg(tmp_path / "f", [shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], single_slice_fraction=1.0).validate()
    with pytest.raises(InputError, match="single_slice_fraction needs a 2.5-D"):
        train(_cfg(tmp_path / "c0", [shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"],
                   single_slice_fraction=0.3, cache_dir=str(cache)))


def test_faint_disks_go_into_every_slice_of_the_sample_and_its_target(shared_data, cache, tmp_path):
    """Disk samples: the same disks in the clean slices (so under the noise) and in the target."""
    from napari_restore.training.data import Degradation, PatchDataset
    from napari_restore.training.patches import DISK_CONTRAST_HU, faint_disks

    series = load_series([shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], cache_dir=cache)
    rec = series[0]
    disks = faint_disks((64, 64), 0.5, float(rec.scale), np.random.default_rng(0))
    hu = np.abs(disks) * float(rec.scale)
    assert 0.005 < float((hu > 0).mean()) < 0.5 and hu.max() <= DISK_CONTRAST_HU[1] * 4 + 1e-3
    plain = PatchDataset(series, (32, 32), 24, None, augment=False, seed=4, context=1)
    with_disks = PatchDataset(series, (32, 32), 24, None, augment=False, seed=4, context=1, disk_fraction=0.5)
    changed = 0
    for i in range(24):
        a, b = plain[i], with_disks[i]
        dx = b["input"].numpy() - a["input"].numpy()
        dt = b["target"].numpy() - a["target"].numpy()
        if np.abs(dt).max() > 0:
            changed += 1  # the same disks on the neighbours and the centre, and in the target
            np.testing.assert_allclose(dx, np.repeat(dt, 3, axis=0), atol=1e-6)
        else:
            assert np.abs(dx).max() == 0
    assert 4 <= changed <= 20  # about half of 24
    noisy = PatchDataset(series, (32, 32), 6, Degradation("ct_lowdose", noise_hu_range=(30.0, 30.0)),
                         augment=False, seed=4, context=1, disk_fraction=1.0)
    for i in range(6):  # under the noise: the noisy input is the disks' target plus noise
        x, t = noisy[i]["input"].numpy(), noisy[i]["target"].numpy()
        assert 0.02 < float((x[1] - t[0]).std()) < 0.2
    with pytest.raises(InputError, match="disk_fraction"):
        _cfg(tmp_path / "f", [shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], disk_fraction=1.5).validate()


def test_smoothed_samples_smooth_the_source_and_its_target_alike(shared_data, cache, tmp_path):
    """smooth_fraction: about that share of samples has its clean planes smoothed (the same patch, less
    detail), the input's centre slice still equal to the target; disks added after stay sharp."""
    from scipy import ndimage as ndi

    from napari_restore.training.data import PatchDataset

    series = load_series([shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], cache_dir=cache)
    kw = dict(augment=False, seed=4, context=1)
    plain = PatchDataset(series, (48, 48), 24, None, **kw)
    smooth = PatchDataset(series, (48, 48), 24, None, smooth_fraction=0.5, smooth_sigma=(1.0, 2.0), **kw)
    detail = lambda x: float(np.abs(ndi.laplace(x.astype(np.float64))).mean())
    changed = 0
    for i in range(24):
        a, b = plain[i]["target"].numpy()[0], smooth[i]["target"].numpy()[0]
        np.testing.assert_array_equal(smooth[i]["input"].numpy()[1], b)
        if np.array_equal(a, b):
            continue
        changed += 1
        assert abs(float(a.mean()) - float(b.mean())) < 0.05 * (float(np.abs(a).mean()) + 1e-3)  # the same patch
        assert detail(b) < 0.6 * detail(a)
    assert 4 <= changed <= 20  # about half of 24
    both = PatchDataset(series, (48, 48), 24, None, smooth_fraction=1.0, disk_fraction=1.0, **kw)
    edges = [detail(both[i]["target"].numpy()[0]) / max(detail(smooth[i]["target"].numpy()[0]), 1e-9)
             for i in range(24) if not np.array_equal(plain[i]["target"].numpy(), smooth[i]["target"].numpy())]
    assert np.median(edges) > 1.05  # the disks' one-pixel edges are not smoothed away
    with pytest.raises(InputError, match="smooth_fraction"):
        _cfg(tmp_path / "f", [shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], smooth_fraction=1.5).validate()
    with pytest.raises(InputError, match="smooth_sigma"):
        _cfg(tmp_path / "f", [shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], smooth_sigma=(0.0, 1.0)).validate()
    with pytest.raises(InputError, match="smooth_fraction is for supervised 2-D"):
        _cfg(tmp_path / "f", [shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], smooth_fraction=0.3, patch_size=(32, 32, 32),
             dims=3).validate()


def test_disk_weight_marks_the_disks_pixels_and_weighs_them_in_the_loss(shared_data, cache, tmp_path):
    """disk_weight: a weight map that is W on the disks (after the same flips/rotation as the target), 1 elsewhere."""
    from napari_restore.training.data import PatchDataset
    from napari_restore.training.losses import SupervisedLoss

    series = load_series([shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], cache_dir=cache)
    kw = dict(seed=4, context=1)
    plain = PatchDataset(series, (32, 32), 24, None, augment=False, **kw)
    assert "weight" not in PatchDataset(series, (32, 32), 4, None, disk_fraction=0.5, **kw)[0]  # weight 1: no map
    flat = PatchDataset(series, (32, 32), 24, None, augment=False, disk_fraction=0.5, disk_weight=20.0, **kw)
    turned = PatchDataset(series, (32, 32), 24, None, augment=True, disk_fraction=0.5, disk_weight=20.0, **kw)
    seen = 0
    for i in range(24):
        f, t = flat[i], turned[i]
        w = f["weight"].numpy()
        assert w.shape == f["target"].shape and set(np.unique(w)) <= {1.0, 20.0}
        on_disk = np.abs(f["target"].numpy() - plain[i]["target"].numpy()) > 0  # where the disks changed the target
        np.testing.assert_array_equal(w == 20.0, on_disk)
        seen += bool(on_disk.any())
        # the augmented item: the weight map turned and flipped as its target was
        ops = [(k, fl) for k in range(4) for fl in ((), (1,), (2,), (1, 2))]
        match = [(k, fl) for k, fl in ops
                 if np.allclose(np.flip(np.rot90(f["target"].numpy(), k, axes=(1, 2)), fl), t["target"].numpy())]
        assert match
        assert any(np.array_equal(np.flip(np.rot90(w, k, axes=(1, 2)), fl), t["weight"].numpy()) for k, fl in match)
    assert 4 <= seen <= 20
    loss = SupervisedLoss("l1")
    pred, target = torch.zeros(1, 1, 2, 2), torch.tensor([[[[1.0, 1.0], [1.0, 5.0]]]])
    weight = torch.tensor([[[[1.0, 1.0], [1.0, 3.0]]]])
    assert float(loss(pred, target)) == pytest.approx(2.0)
    assert float(loss(pred, target, weight)) == pytest.approx((3 + 15) / 6)  # the weighted mean
    assert float(SupervisedLoss("mse")(pred, target, weight)) == pytest.approx((3 + 75) / 6)
    src = [shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"]
    with pytest.raises(InputError, match="disk_weight 20.0 needs disk_fraction"):
        _cfg(tmp_path / "w", src, disk_weight=20.0).validate()
    with pytest.raises(InputError, match="disk_weight needs the l1 or mse"):
        _cfg(tmp_path / "w", src, disk_weight=20.0, disk_fraction=0.5, loss="psnr").validate()


def test_cleaner_targets_take_out_the_scans_own_noise(shared_data, cache, tmp_path):
    """target_nlm: the network learns the scan without its own noise; the input keeps it, plus the added noise."""
    from napari_restore.training.data import Degradation, PatchDataset, validation_set
    from napari_restore.training.targets import denoised_targets, slice_noise_sd

    full = load_series([shared_data / "ct" / "siemens-body-j2k"], cache_dir=cache)[0]
    rec = dataclasses.replace(full, array=np.ascontiguousarray(full.array[9:12]))  # 3 middle slices
    cleaned = denoised_targets([rec], 0.8, tmp_path / "c")[0]
    assert cleaned.target.shape == rec.array.shape and cleaned.array is rec.array  # the input stays as it was
    sd_raw, sd_clean = (slice_noise_sd(rec, a[1]) * rec.scale for a in (rec.array, cleaned.target))
    assert sd_raw > 8 and sd_clean < 0.4 * sd_raw  # ~11 HU of the scanner's own noise -> ~2 HU
    body = np.abs(rec.physical(rec.array[1])) < 200
    assert float(np.abs(rec.physical(cleaned.target[1]) - rec.physical(rec.array[1]))[body].mean()) < 15
    cached = denoised_targets([rec], 0.8, tmp_path / "c")[0]  # read back from the cache
    assert len(list((tmp_path / "c").glob("target-nlm-*.npy"))) == 1
    np.testing.assert_array_equal(cached.target, cleaned.target)

    deg = Degradation("ct_lowdose", noise_hu_range=(30.0, 30.0))
    for item in (PatchDataset([cleaned], (48, 48), 6, deg, augment=False, seed=2, context=1)[i] for i in range(6)):
        t = item["target"].numpy()[0]
        hits = [(z, y, x) for z, y, x in np.argwhere(np.asarray(cleaned.target) == t[0, 0])
                if np.array_equal(cleaned.target[z, y:y + 48, x:x + 48], t)]
        assert hits  # every target is a crop of the cleaned scan
    val = validation_set([cleaned], (48, 48), 1, 64, deg, context=1)[0]
    np.testing.assert_array_equal(val["target"][0], cleaned.target[1, 224:288, 224:288])
    with pytest.raises(InputError, match="target_nlm"):
        _cfg(tmp_path / "bad", [shared_data / "ct" / "siemens-body-j2k"], target_nlm=-1.0).validate()
    with pytest.raises(InputError, match="target_nlm .* supervised training, not self-supervised"):
        _cfg(tmp_path / "bad", [shared_data / "ct" / "siemens-body-j2k"], target_nlm=0.8,
             mode="self-supervised").validate()
    ct = shared_data / "ct" / "nifti"
    res = train(_cfg(tmp_path / "run", [ct / "example_ct_sm.nii.gz"], val_data=[str(ct / "cta_aorta_cropped.nii.gz")],
                     target_nlm=0.8, epochs=1, steps_per_epoch=2, cache_dir=str(cache), ct_noise_hu=(10.0, 40.0)))
    card = json.loads((tmp_path / "run" / "model" / "card.json").read_text())
    assert res.steps == 2 and "without their own noise" in card["metrics"]["metric_convention"]
    assert card["training"]["config"]["target_nlm"] == 0.8


def test_reslice_adds_the_other_planes_of_isotropic_series(shared_data, tmp_path, cache):
    import dataclasses

    from napari_restore.training.data import resliced_views

    mr = shared_data / "mr" / "nifti"
    t1 = load_series([mr / "T1.nii.gz"], "MR", cache_dir=cache)[0]
    thick = dataclasses.replace(t1, key="thick", affine=t1.affine @ np.diag([3.0, 1.0, 1.0, 1.0]))
    views = resliced_views([t1, thick])
    assert [v.key for v in views] == [f"{t1.key}#resliced-y", f"{t1.key}#resliced-x"]  # thick slices: none
    by_y, by_x = views
    arr = t1.array
    assert by_y.array.shape == (arr.shape[1], arr.shape[0], arr.shape[2]) and by_y.array.flags.c_contiguous
    np.testing.assert_array_equal(by_y.array[70], arr[:, 70, :])
    np.testing.assert_array_equal(by_x.array[50], arr[:, :, 50])
    k, j, i = 11, 70, 50  # one voxel, the same point in space in every view
    point = t1.affine @ [k, j, i, 1]
    np.testing.assert_allclose(by_y.affine @ [j, k, i, 1], point)
    np.testing.assert_allclose(by_x.affine @ [i, k, j, 1], point)
    assert by_y.array[j, k, i] == by_x.array[i, k, j] == arr[k, j, i]
    sp = t1.spacing
    assert {v.group for v in views} == {t1.group} and by_y.spacing == (sp[1], sp[0], sp[2])

    res = train(_cfg(tmp_path / "mr", [mr / "T1.nii.gz"], val_data=[str(mr / "T2.nii.gz")], task="deblur",
                     modality="MR", reslice=True, epochs=1, steps_per_epoch=2, cache_dir=str(cache)))
    assert res.steps == 2
    with pytest.raises(InputError, match="near-isotropic"):  # seg3d_MR: 1.0 x 0.9 x 0.9 mm
        train(_cfg(tmp_path / "aniso", [mr / "seg3d_MR.nii.gz"], val_data=[str(mr / "T2.nii.gz")], task="deblur",
                   modality="MR", reslice=True, cache_dir=str(cache)))
    with pytest.raises(InputError, match="axial"):
        ct = shared_data / "ct" / "nifti"
        train(_cfg(tmp_path / "ct", [ct / "example_ct_sm.nii.gz"], val_data=[str(ct / "cta_aorta_cropped.nii.gz")],
                   reslice=True, cache_dir=str(cache)))
    with pytest.raises(InputError, match="reslice"):
        _cfg(tmp_path / "3d", [mr / "T1.nii.gz"], dims=3, patch_size=(16, 32, 32), reslice=True).validate()
    assert not (tmp_path / "aniso").exists() and not (tmp_path / "ct").exists()


def test_fine_tuning_grows_a_single_slice_model_into_a_context_model(shared_data, tmp_path, capsys):
    from napari_restore.training.__main__ import main

    nif = shared_data / "ct" / "nifti"
    common = [str(nif / "example_ct_sm.nii.gz"), "--val-data", str(nif / "cta_aorta_cropped.nii.gz"),
              "--patch-size", "32,32", "--batch-size", "2", "--epochs", "1", "--val-slices", "2", "--val-crop", "64",
              "--no-tensorboard", "--no-progress", "--channels", "8,16,32"]
    assert main([*common[:1], "-o", str(tmp_path / "one"), *common[1:], "--steps-per-epoch", "6", "--lr", "3e-3"]) == 0
    base = train(_cfg(tmp_path / "probe", [nif / "example_ct_sm.nii.gz"], val_data=[str(nif / "cta_aorta_cropped.nii.gz")],
                      init_model=str(tmp_path / "one"), architecture=None, context=1, epochs=1, steps_per_epoch=1,
                      lr=1e-12, val_crop=64))
    one = json.loads((tmp_path / "one" / "card.json").read_text())
    grown = json.loads((base.model_dir / "card.json").read_text())
    assert grown["architecture"]["args"] == {**one["architecture"]["args"], "context": 1}
    # a learning rate of ~0: the grown model's weights are the single-slice model's, the centre
    # slice's kernels in place and the neighbours' at zero (batch-norm statistics did move a step)
    from napari_restore.models import load_model

    w_one, w_grown = load_model(tmp_path / "one").network.state_dict(), load_model(base.model_dir).network.state_dict()
    widened = [k for k in w_one if w_one[k].shape != w_grown[k].shape]
    assert len(widened) == 1 and w_grown[widened[0]].shape[1] == 3
    torch.testing.assert_close(w_grown[widened[0]][:, 1:2], w_one[widened[0]], rtol=0, atol=1e-9)
    assert w_grown[widened[0]][:, [0, 2]].abs().max() < 1e-9
    for k in w_one:
        if k != widened[0] and "running" not in k and "num_batches" not in k:
            torch.testing.assert_close(w_grown[k], w_one[k], rtol=0, atol=1e-9)
    # self-supervised fine-tuning of a context model runs (N2N on all slices, N2V masks the centre),
    # and the tuned model keeps the slice-spacing limit of the model it started from
    card_path = base.model_dir / "card.json"
    card_path.write_text(json.dumps({**json.loads(card_path.read_text()), "max_slice_spacing_mm": 3.0}))
    for ss in ("n2n", "n2v"):
        rc = main([*common[:1], "-o", str(tmp_path / ss), *common[1:-2], "--init-model", str(base.model_dir),
                   "--mode", "self-supervised", "--self-supervised", ss, "--steps-per-epoch", "2"])
        assert rc == 0, capsys.readouterr().err
        tuned = json.loads((tmp_path / ss / "card.json").read_text())
        assert tuned["architecture"]["args"]["context"] == 1 and tuned["max_slice_spacing_mm"] == 3.0
    with pytest.raises(ModelError, match="differs"):
        train(_cfg(tmp_path / "bad", [nif / "example_ct_sm.nii.gz"], val_data=[str(nif / "cta_aorta_cropped.nii.gz")],
                   init_model=str(base.model_dir), architecture=None, context=2))
    # --noise-input grows the 2.5-D model a fourth input channel (its measured noise level), at zero
    rc = main([*common[:1], "-o", str(tmp_path / "level"), *common[1:-2], "--init-model", str(base.model_dir),
               "--noise-input", "--steps-per-epoch", "1", "--lr", "1e-12"])
    assert rc == 0, capsys.readouterr().err
    level = json.loads((tmp_path / "level" / "card.json").read_text())
    assert level["architecture"]["args"] == {**grown["architecture"]["args"], "noise_input": True}
    w_level = load_model(tmp_path / "level").network.state_dict()
    first = w_level[widened[0]]
    assert first.shape[1] == 4 and first[:, 3].abs().max() < 1e-9
    torch.testing.assert_close(first[:, :3], w_grown[widened[0]], rtol=0, atol=1e-9)
    with pytest.raises(InputError, match="noise_input"):
        _cfg(tmp_path / "3d", [nif / "example_ct_sm.nii.gz"], dims=3, patch_size=(16, 32, 32), noise_input=True).validate()


def test_bad_inputs_fail_before_training(shared_data, tmp_path, cache):
    nif = shared_data / "ct" / "nifti"
    progress = []
    prog = lambda *a: progress.append(a)  # noqa: E731
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty"):
        train(_cfg(tmp_path, [empty]), progress=prog)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="junk"):
        train(_cfg(tmp_path, [junk]), progress=prog)
    with pytest.raises(InputError, match="no such file"):
        train(_cfg(tmp_path, [tmp_path / "missing"]), progress=prog)
    with pytest.raises(InputError, match="too few to split"):
        train(_cfg(tmp_path, [nif / "example_ct_sm.nii.gz"]), progress=prog)
    with pytest.raises(InputError, match="patch_size"):
        train(_cfg(tmp_path, [nif / "example_ct_sm.nii.gz"], patch_size=(8, 8)), progress=prog)
    # a checkpoint of another architecture
    first = train(_cfg(tmp_path / "one", [nif / "example_ct_sm.nii.gz"], val_data=[str(nif / "cta_aorta_cropped.nii.gz")],
                       epochs=1, steps_per_epoch=1))
    progress.clear()
    with pytest.raises(ModelError, match="architecture"):
        train(_cfg(tmp_path / "two", [nif / "example_ct_sm.nii.gz"], val_data=[str(nif / "cta_aorta_cropped.nii.gz")],
                   architecture={"channels": [8, 16], "strides": [2]}, resume=str(first.run_dir)), progress=prog)
    with pytest.raises(ModelError, match="not a napari-restore"):
        torch.save({"w": torch.zeros(1)}, tmp_path / "other.pt")
        train(_cfg(tmp_path / "three", [nif / "example_ct_sm.nii.gz"], resume=str(tmp_path / "other.pt")), progress=prog)
    with pytest.raises(OutputError, match="exists"):
        train(_cfg(tmp_path / "one", [nif / "example_ct_sm.nii.gz"], val_data=[str(nif / "cta_aorta_cropped.nii.gz")]),
              progress=prog)
    assert progress == []
    assert not (tmp_path / "two" / "model.run").exists() and not (tmp_path / "three" / "model.run").exists()


def test_split_never_shares_a_series(shared_data, cache):
    nif = shared_data / "ct" / "nifti"
    series = load_series([nif / "example_ct_sm.nii.gz", nif / "cta_aorta_cropped.nii.gz",
                          nif / "cta_pulmonary_cropped.nii.gz"], cache_dir=cache)
    assert len(series) == 3
    tr, va = split_series(series, 0.3, seed=0)
    assert tr and va and not ({s.group for s in tr} & {s.group for s in va})
    assert split_series(series, 0.3, seed=0)[1][0].key == va[0].key  # deterministic


def test_module_entry_point(shared_data, tmp_path, capsys):
    from napari_restore.training.__main__ import main

    nif = shared_data / "ct" / "nifti"
    out = tmp_path / "cli-model"
    rc = main([str(nif / "example_ct_sm.nii.gz"), "-o", str(out), "--val-data", str(nif / "cta_aorta_cropped.nii.gz"),
               "--channels", "8,16,32", "--res-units", "1", "--patch-size", "32,32", "--batch-size", "2", "--epochs", "1",
               "--steps-per-epoch", "2", "--val-slices", "1", "--val-crop", "64", "--no-tensorboard"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"saved {out}" in captured.out and "validation PSNR" in captured.out
    assert "train" in captured.err  # the tqdm progress bar
    card = json.loads((out / "card.json").read_text())
    assert card["architecture"]["args"]["channels"] == [8, 16, 32] and card["architecture"]["args"]["num_res_units"] == 1
    assert "--channels" in card["training"]["command"] or card["training"]["command"]
    # fine-tune from the model just written (architecture and intensity come from its card)
    rc = main([str(nif / "example_ct_sm.nii.gz"), "-o", str(tmp_path / "tuned"), "--val-data",
               str(nif / "cta_aorta_cropped.nii.gz"), "--init-model", str(out), "--patch-size", "32,32",
               "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "1", "--val-slices", "1", "--val-crop", "64",
               "--no-tensorboard", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    tuned = json.loads((tmp_path / "tuned" / "card.json").read_text())
    assert tuned["architecture"] == card["architecture"] and tuned["intensity"] == card["intensity"]
    rc = main([str(tmp_path / "nowhere"), "-o", str(tmp_path / "x")])
    assert rc == 2 and "no such file or folder" in capsys.readouterr().err


def test_samples_depend_on_seed_epoch_index_only(shared_data, cache):
    """Workers (persistent across epochs) draw exactly what the main process would: resume/DDP rely on it."""
    from napari_restore.training.data import Degradation, PatchDataset

    series = load_series([shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"], cache_dir=cache)
    ds = PatchDataset(series, (32, 32), 4, Degradation("ct_lowdose"), augment=True, jitter=0.05, seed=5)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, persistent_workers=True)
    seen = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        batch = next(iter(loader))
        direct = torch.stack([ds[i]["input"] for i in range(4)])
        torch.testing.assert_close(batch["input"], direct, rtol=0, atol=0)
        seen.append(batch["input"])
        assert not torch.equal(batch["input"], batch["target"])  # degraded input, clean target
    assert not torch.equal(seen[0], seen[1])  # a new epoch draws new samples


def test_ct_noise_level_range_sets_the_added_noise(shared_data, cache):
    """--ct-noise-hu draws the added noise's median SD in the body (HU) instead of a dose: the
    5 mm phantom's simulated 25 % dose noise is only a few HU, but this reaches the asked level."""
    from napari_restore.training.data import Degradation, PatchDataset

    spec = {"kind": "ct", "center": 0.0, "scale": 128.0, "clip": [-1024.0, 3071.0]}
    series = load_series([shared_data / "ct/philips-head-phantom/exam/S2010"], "CT", spec, cache_dir=cache)
    sds = {}
    for level in (10.0, 40.0):
        ds = PatchDataset(series, (128, 128), 12, Degradation("ct_lowdose", noise_hu_range=(level, level)),
                          augment=False, seed=1)
        sds[level] = []
        for i in range(len(ds)):
            item = ds[i]
            target = item["target"].numpy()[0] * 128.0
            noise = (item["input"] - item["target"]).numpy()[0] * 128.0
            body = target > -500
            if body.sum() > 2000:
                sds[level].append(float(noise[body].std()))
    for level, values in sds.items():
        assert values and 0.6 * level < np.median(values) < 1.6 * level, (level, values)


def test_prewarmed_ct_maps_equal_the_lazily_computed_ones(shared_data, cache):
    """prewarm_ct_maps (2 forked processes) fills the same maps a worker would compute itself."""
    from napari_restore.training.data import prewarm_ct_maps

    spec = {"kind": "ct", "center": 0.0, "scale": 128.0, "clip": [-1024.0, 3071.0]}
    warm = load_series([shared_data / "ct/nifti/example_ct_sm.nii.gz"], "CT", spec, cache_dir=cache)
    lazy = load_series([shared_data / "ct/nifti/example_ct_sm.nii.gz"], "CT", spec, cache_dir=cache)
    prewarm_ct_maps(warm, 2)
    nz = warm[0].array.shape[0]
    assert all(z in warm[0]._ct_maps and ("median", z) in warm[0]._ct_maps for z in range(nz))
    for z in (0, nz // 2, nz - 1):
        np.testing.assert_array_equal(warm[0]._ct_maps[z][0], lazy[0].ct_maps(z)[0])
        assert warm[0]._ct_maps[("median", z)] == lazy[0].ct_median_sd(z)


def test_max_minutes_stops_after_the_epoch_past_the_limit(shared_data, tmp_path, cache):
    cfg = _cfg(tmp_path, [shared_data / "ct/nifti/example_ct_sm.nii.gz"], epochs=50, max_minutes=1e-4,
               val_data=[str(shared_data / "ct/nifti/cta_pulmonary_cropped.nii.gz")], cache_dir=str(cache),
               dose_range=(0.25, 0.25))
    result = train(cfg)
    assert [r["epoch"] for r in result.history] == [1]
    card = json.loads((result.model_dir / "card.json").read_text())
    assert card["training"]["stopped_early"] is True and card["training"]["config"]["max_minutes"] == 1e-4
    # the cosine spans the time budget: already past it, the first epoch ran at the floor (1 % of lr)
    assert result.history[0]["lr"] == pytest.approx(cfg.lr * 0.01)


def test_time_budget_cosine_follows_epochs_when_time_is_ample(shared_data, tmp_path, cache):
    cfg = _cfg(tmp_path, [shared_data / "ct/nifti/example_ct_sm.nii.gz"], epochs=2, max_minutes=600.0, lr=1e-3,
               val_data=[str(shared_data / "ct/nifti/cta_pulmonary_cropped.nii.gz")], cache_dir=str(cache))
    lrs = [r["lr"] for r in train(cfg).history]
    assert lrs == pytest.approx([1e-3, 1e-3 * (0.01 + 0.99 * 0.5)], rel=1e-3)  # cosine at epoch 0/2 and 1/2


def test_weight_interpolation_script_mixes_two_models(tmp_path):
    """scripts/interpolate_weights.py (how denoise-ct-25d 0.3.0 was made): (1 - w) x start + w x tuned."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("interp", Path(__file__).resolve().parents[1] / "scripts" / "interpolate_weights.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, value in (("start", 1.0), ("tuned", 3.0)):
        d = tmp_path / name
        d.mkdir()
        torch.save({"w": torch.full((2, 2), value), "n": torch.tensor(7 if name == "tuned" else 5)}, d / "model.pt")
        (d / "card.json").write_text(json.dumps({"name": name, "version": "1.0.0", "training": {}}))
    mod.interpolate(tmp_path / "start", tmp_path / "tuned", 0.25, tmp_path / "out")
    mixed = torch.load(tmp_path / "out" / "model.pt", weights_only=True)
    assert torch.equal(mixed["w"], torch.full((2, 2), 1.5)) and int(mixed["n"]) == 7
    card = json.loads((tmp_path / "out" / "card.json").read_text())
    assert card["name"] == "tuned" and card["training"]["weight_interpolation"]["from"] == "start 1.0.0"
    # task arithmetic (how 0.3.1 was made): tuned + w x (a - b), integer buffers tuned's
    mod.add_task_vector(tmp_path / "tuned", 0.5, tmp_path / "out", tmp_path / "start", tmp_path / "added")
    added = torch.load(tmp_path / "added" / "model.pt", weights_only=True)
    assert torch.equal(added["w"], torch.full((2, 2), 3.25)) and int(added["n"]) == 7  # 3 + 0.5 x (1.5 - 1)
    arithmetic = json.loads((tmp_path / "added" / "card.json").read_text())["training"]["weight_arithmetic"]
    assert arithmetic["plus"] == 0.5 and arithmetic["times_difference_of"] == ["tuned 1.0.0", "start 1.0.0"]
    # a step that drives a BatchNorm variance below zero would NaN every output: refused, nothing written
    torch.save({"w": torch.ones(2), "bn.running_var": torch.full((2,), 0.5)}, tmp_path / "tuned" / "model.pt")
    torch.save({"w": torch.ones(2), "bn.running_var": torch.full((2,), 0.1)}, tmp_path / "out" / "model.pt")
    torch.save({"w": torch.ones(2), "bn.running_var": torch.full((2,), 1.0)}, tmp_path / "start" / "model.pt")
    with pytest.raises(SystemExit, match="running_var"):
        mod.add_task_vector(tmp_path / "tuned", 1.0, tmp_path / "out", tmp_path / "start", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_deblur_samples_draw_their_noise_from_the_series_range_and_their_psf_per_sample(shared_data, cache):
    """--blur-noise-range: the noise SD is a fraction of the series' 1-99 % range (the matrix's
    convention); --blur-anisotropy stretches the PSF's axes apart; --blur-tail widens its skirt."""
    from scipy import ndimage as ndi

    from napari_restore.training.data import Degradation, PatchDataset

    spec = {"kind": "ct", "center": 0.0, "scale": 128.0, "clip": [-1024.0, 3071.0]}
    series = load_series([shared_data / "ct/philips-head-phantom/exam/S2010"], "CT", spec, cache_dir=cache)
    rec = series[0]
    hu = rec.physical(np.asarray(rec.array))
    p1, p99 = np.percentile(hu[:, ::4, ::4], [1, 99])
    assert rec.value_range() * 128.0 == pytest.approx(p99 - p1, rel=0.05)

    fwhm = 2.0
    deg = Degradation("gaussian_blur", fwhm_range=(fwhm, fwhm), blur_noise_range=(0.02, 0.02))
    ds = PatchDataset(series, (64, 64), 6, deg, augment=False, seed=3)
    for i in range(len(ds)):
        item = ds[i]
        blurred = ndi.gaussian_filter(item["target"].numpy()[0], fwhm / 2.3548, mode="reflect", truncate=4.0)
        noise_hu = (item["input"].numpy()[0] - blurred)[8:-8, 8:-8] * 128.0
        assert noise_hu.std() == pytest.approx(0.02 * (p99 - p1), rel=0.15)

    point = np.zeros((41, 41), np.float32)
    point[20, 20] = 1.0
    rng = np.random.default_rng(0)
    widths = []
    for _ in range(20):
        out, params = Degradation("gaussian_blur", fwhm_range=(3.0, 3.0), blur_anisotropy=2.0).blur(rec, point, rng)
        yy, xx = np.mgrid[-20:21, -20:21]
        var_y, var_x = float((out * yy**2).sum() / out.sum()), float((out * xx**2).sum() / out.sum())
        assert 0.5 - 1e-6 <= params["anisotropy"] <= 2.0 + 1e-6
        assert np.sqrt(var_y / var_x) == pytest.approx(params["anisotropy"], rel=0.05)
        widths.append(params["anisotropy"])
    assert min(widths) < 0.8 and max(widths) > 1.25  # both axes get the longer side
    round_psf, _ = Degradation("gaussian_blur", fwhm_range=(3.0, 3.0)).blur(rec, point, np.random.default_rng(1))
    tailed, params = Degradation("gaussian_blur", fwhm_range=(3.0, 3.0), blur_tail=0.5).blur(rec, point, np.random.default_rng(1))
    assert params["tail"] > 0 and tailed[20, 8:15].sum() > 2 * round_psf[20, 8:15].sum() and tailed.sum() == pytest.approx(1.0, abs=1e-3)

    # --zoom-range: patches resampled to coarser pixels carry sharper detail per pixel
    sharpness = {}
    for zoom in (1.0, 0.5):
        deg = Degradation("gaussian_blur", fwhm_range=(1.0, 1.0), zoom_range=(zoom, zoom))
        assert deg.zoom_factor(rec, rng) == zoom
        ds = PatchDataset(series, (64, 64), 8, deg, augment=False, seed=4)
        sharpness[zoom] = np.mean([np.abs(np.diff(ds[i]["target"].numpy()[0], axis=-1)).mean() for i in range(len(ds))])
    assert sharpness[0.5] > 1.5 * sharpness[1.0], sharpness


def test_psnr_loss_weighs_every_sample_in_decibels():
    """--loss psnr: the batch mean of each sample's 10 log10 MSE, so halving the error of a nearly
    exact sample pays as much as halving that of a badly degraded one (L1 and MSE: far less)."""
    from napari_restore.training.losses import PSNRLoss, SupervisedLoss

    target = torch.zeros(2, 1, 16, 16)
    pred = torch.stack([torch.full((1, 16, 16), 0.01), torch.full((1, 16, 16), 1.0)])
    loss = SupervisedLoss("psnr")
    expected = float(np.mean([10 * np.log10(1e-4 + 1e-6), 10 * np.log10(1.0 + 1e-6)]))
    assert float(loss(pred, target)) == pytest.approx(expected, abs=1e-4)
    better_mild, better_strong = pred.clone(), pred.clone()
    better_mild[0] /= 2
    better_strong[1] /= 2
    gains = {name: (float(fn(pred, target) - fn(better_mild, target)), float(fn(pred, target) - fn(better_strong, target)))
             for name, fn in (("psnr", PSNRLoss()), ("l1", SupervisedLoss("l1")), ("mse", SupervisedLoss("mse")))}
    assert gains["psnr"][0] == pytest.approx(gains["psnr"][1], rel=0.05)  # 6 dB / 2 each (eps takes a little)
    assert gains["l1"][0] < 0.02 * gains["l1"][1] and gains["mse"][0] < 1e-3 * gains["mse"][1]
    with pytest.raises(InputError, match="loss"):
        TrainConfig(data=["x"], output="y", loss="ssim").validate()


def test_distilling_the_self_ensemble_moves_the_target_towards_the_init_models_average(shared_data, tmp_path):
    """--distill-ensemble N: each training target moves --distill-weight of the way to the init
    model averaged over N flips/rotations (its eval-mode self-ensemble); validation still scores
    against the true targets, and a distilled fine-tune writes a working model."""
    from napari_restore.models import load_model
    from napari_restore.networks import SelfEnsemble
    from napari_restore.training.distributed import setup, teardown
    from napari_restore.training.loop import _Run

    nif = shared_data / "ct" / "nifti"
    data, val = [nif / "example_ct_sm.nii.gz"], [str(nif / "cta_aorta_cropped.nii.gz")]
    one = train(_cfg(tmp_path / "one", data, val_data=val, epochs=1, steps_per_epoch=6, lr=3e-3)).model_dir
    with pytest.raises(InputError, match="init model"):
        _cfg(tmp_path / "x", data, val_data=val, distill_ensemble=4).validate()
    with pytest.raises(InputError, match="distill_ensemble must be"):
        _cfg(tmp_path / "x", data, val_data=val, init_model=str(one), distill_ensemble=3).validate()
    teacher = SelfEnsemble(load_model(one).network.eval(), 2)
    x = torch.from_numpy(np.random.default_rng(0).normal(0, 1, (3, 1, 32, 32)).astype(np.float32))
    y = torch.zeros(3, 1, 32, 32)
    for weight in (1.0, 0.5):
        cfg = _cfg(tmp_path / f"d{weight}", data, val_data=val, init_model=str(one), architecture=None,
                   distill_ensemble=2, distill_weight=weight).validate()
        info = setup("cpu")
        try:
            run = _Run(cfg, info, None, None)
            run.prepare()
            with torch.no_grad():
                torch.testing.assert_close(run.teacher(x, y), weight * teacher(x), rtol=1e-4, atol=1e-5)
        finally:
            teardown(info)
    tuned = train(_cfg(tmp_path / "tuned", data, val_data=val, init_model=str(one), architecture=None,
                       distill_ensemble=2, epochs=1, steps_per_epoch=2, lr=1e-4))
    card = json.loads((tuned.model_dir / "card.json").read_text())
    assert card["training"]["config"]["distill_ensemble"] == 2 and np.isfinite(card["metrics"]["val_psnr"])


def test_keep_last_saves_the_end_of_the_schedule_not_the_best_validation_epoch(shared_data, tmp_path, cache,
                                                                                monkeypatch):
    """A validation set that does not stand for the target conditions should not pick the weights:
    ``keep="last"`` saves the last epoch's weights and card figures, ``"best"`` (the default) the best epoch's."""
    from napari_restore.models import load_weights
    from napari_restore.training import loop
    from napari_restore.training.loop import read_checkpoint

    kw = dict(epochs=4, val_data=[str(shared_data / "ct/nifti/cta_pulmonary_cropped.nii.gz")],
              cache_dir=str(cache), dose_range=(0.25, 0.25))
    validate = loop._Run.validate

    def best_at_epoch_2(self):  # the real validation, then a loss that is lowest after epoch 2
        val = validate(self)
        if self.epoch > 0:
            val["val_loss"] = {1: 3.0, 2: 1.0, 3: 2.0, 4: 4.0}[self.epoch]
        return val

    monkeypatch.setattr(loop._Run, "validate", best_at_epoch_2)
    runs = {}
    for keep in ("best", "last"):
        result = train(_cfg(tmp_path / keep, [shared_data / "ct/nifti/example_ct_sm.nii.gz"], keep=keep, **kw))
        saved = load_weights(result.model_dir / "model.pt")
        card = json.loads((result.model_dir / "card.json").read_text())
        runs[keep] = (result, saved, card)
    (best_run, best_saved, best_card), (last_run, last_saved, last_card) = runs["best"], runs["last"]
    assert [r["val_loss"] for r in best_run.history] == [r["val_loss"] for r in last_run.history]  # same seed
    assert best_run.best["epoch"] == 2 and last_run.history[-1]["epoch"] == 4
    last_ck = read_checkpoint(last_run.run_dir / "last.pt")["model"]
    best_ck = read_checkpoint(best_run.run_dir / "best.pt")["model"]
    assert all(torch.equal(last_saved[k], last_ck[k]) for k in last_ck)
    assert all(torch.equal(best_saved[k], best_ck[k]) for k in best_ck)
    assert not all(torch.equal(last_saved[k], best_saved[k]) for k in last_ck)
    assert last_card["metrics"]["val_loss"] == pytest.approx(last_run.history[-1]["val_loss"], rel=1e-4)
    assert last_card["metrics"]["kept"] == "last epoch" and "kept" not in best_card["metrics"]
    assert best_card["metrics"]["val_loss"] == pytest.approx(best_run.best["val_loss"], rel=1e-4)
    with pytest.raises(InputError, match="keep must be one of"):
        train(_cfg(tmp_path / "bad", [shared_data / "ct/nifti/example_ct_sm.nii.gz"], keep="first", **kw))
