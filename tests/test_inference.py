"""restore(): 2-D/3-D inference, tiling, HU safety, progress/cancel, OOM fallback, memory, tasks."""
from __future__ import annotations

import json
import shutil
import tracemalloc

import numpy as np
import pytest
import torch

import napari_restore
from _engine_helpers import one_torch_thread, NOISE_HU, TINY_ARGS, save_tiny, tiny_card, trained_tiny_network
from napari_restore import Volume
from napari_restore.errors import Cancelled, InputError, ModelError, RestoreError
from napari_restore.inference import restore
from napari_restore.models import save_model
from napari_restore.networks import ResidualUNet, build_network


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    yield from one_torch_thread()


@pytest.fixture(autouse=True)
def empty_user_models(tmp_path, monkeypatch):
    """No models unless a test installs one (the developer's own and bundled ones stay out)."""
    folder = tmp_path / "user-models"
    folder.mkdir()
    monkeypatch.setenv("NAPARI_RESTORE_MODELS", str(folder))
    monkeypatch.setattr("napari_restore.models.BUNDLED_DIR", tmp_path / "no-bundled-models")
    return folder


@pytest.fixture(scope="module")
def ct(shared_data) -> Volume:
    return napari_restore.load(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")[0]


@pytest.fixture(scope="module")
def noisy(ct) -> Volume:
    rng = np.random.default_rng(1)
    return ct.copy_with(ct.array + rng.normal(0, NOISE_HU, ct.array.shape).astype(np.float32))


@pytest.fixture(scope="module")
def trained(shared_data, tmp_path_factory):
    return save_model(trained_tiny_network(shared_data), tiny_card(), tmp_path_factory.mktemp("m") / "tiny")


@pytest.fixture(scope="module")
def identity_2d(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("m") / "id2", name="identity-2d")


@pytest.fixture(scope="module")
def identity_3d(tmp_path_factory):
    args = {**TINY_ARGS, "spatial_dims": 3}
    return save_model(build_network("ResidualUNet", args), tiny_card(name="identity-3d", dims=3, args=args),
                      tmp_path_factory.mktemp("m") / "id3")


def _rmse(a, b):
    return float(np.sqrt(np.mean((a - b) ** 2)))


def test_trained_tiny_model_lowers_the_error_on_unseen_real_ct(ct, noisy, trained):
    out = restore(noisy, model=trained, device="cpu")
    unseen = slice(20, 30)  # the model trained on slices 0-19
    assert _rmse(out.array[unseen], ct.array[unseen]) < 0.9 * _rmse(noisy.array[unseen], ct.array[unseen])
    body = ct.array[unseen] > -500
    assert abs(out.array[unseen][body].mean() - ct.array[unseen][body].mean()) < 5.0  # HU level kept
    step = out.meta["provenance"][-1]
    for key in ("task", "model", "model_version", "strength", "mode", "device", "seconds"):
        assert key in step
    assert (step["task"], step["model"], step["mode"], step["device"]) == ("denoise", "tiny-ct-denoise", "2d", "cpu")
    np.testing.assert_array_equal(out.affine, ct.affine)
    assert out.modality == "CT" and out.array.dtype == np.float32


@pytest.mark.parametrize("mode", ["2d", "3d"])
def test_zero_residual_model_returns_input_and_restores_padding(ct, identity_2d, identity_3d, mode):
    arr = ct.array.copy()
    arr[:, :3, :] = -2048.0
    arr[:, -3:, :] = -3024.0
    arr[10, 50, 60] = 5000.0
    vol = ct.copy_with(arr)
    out = restore(vol, model=identity_2d if mode == "2d" else identity_3d, mode=mode, device="cpu")
    outside = (arr < -1024) | (arr > 3071)
    assert np.array_equal(out.array[outside], arr[outside])
    np.testing.assert_allclose(out.array, arr, rtol=0, atol=1e-3)
    assert np.array_equal(vol.array, arr)  # the input is never modified


def test_2d_mode_runs_slice_by_slice_along_axis_0(noisy, trained):
    out = restore(noisy, model=trained, device="cpu", batch_size=7)
    for k in (0, 13, 29):
        single = restore(noisy.copy_with(noisy.array[k:k + 1]), model=trained, device="cpu")
        np.testing.assert_allclose(out.array[k], single.array[0], atol=1e-3)


def test_odd_sizes(ct, noisy, trained):
    crop = (slice(1, 30), slice(2, 99), slice(0, 121))  # 29 x 97 x 121
    vol = noisy.copy_with(noisy.array[crop])
    out = restore(vol, model=trained, device="cpu")
    assert out.array.shape == (29, 97, 121)
    assert _rmse(out.array, ct.array[crop]) < _rmse(vol.array, ct.array[crop])


def test_tiled_2d_agrees_with_whole_slices(noisy, trained):
    whole = restore(noisy, model=trained, device="cpu")
    tiled = restore(noisy, model=trained, device="cpu", tile=48, overlap=0.25)
    diff = np.abs(tiled.array - whole.array)
    correction = np.abs(whole.array - noisy.array)
    assert correction.mean() > 10.0  # the model does change the image
    assert diff.max() < 1.0  # HU
    assert tiled.meta["provenance"][-1]["tile"] == [48, 48]


def test_context_model_sees_each_slice_with_its_mirrored_neighbours(noisy, tmp_path):
    """A 2.5-D model gets slices z-1, z, z+1 as channels (z-1 of the first slice is the first slice
    itself); results do not depend on the batch size, tiles agree with whole slices."""
    from napari_restore.intensity import Normalizer
    from napari_restore.models import load_model

    args = {**TINY_ARGS, "context": 1}
    torch.manual_seed(0)
    net = build_network("ResidualUNet", args)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = save_model(net, tiny_card(name="random-25d", args=args), tmp_path / "m25")
    vol = noisy.copy_with(noisy.array[:9])
    out = restore(vol, model=folder, device="cpu", batch_size=4)
    assert out.array.shape == vol.array.shape
    np.testing.assert_array_equal(restore(vol, model=folder, device="cpu", batch_size=9).array, out.array)
    loaded = load_model(folder)
    norm = Normalizer.fit(loaded.card.intensity, vol.array)
    x = torch.from_numpy(norm.forward(vol.array))
    inside = (vol.array >= norm.lo) & (vol.array <= norm.hi)  # clipped voxels keep their value
    for z, nb in ((0, [0, 0, 1]), (4, [3, 4, 5]), (8, [7, 8, 8])):
        with torch.no_grad():
            y = loaded.network.eval()(x[nb][None])[0, 0]
        expect = norm.inverse_linear(y).numpy()
        np.testing.assert_allclose(out.array[z][inside[z]], expect[inside[z]], atol=0.05)
    # the neighbours matter: the same slice with other neighbours comes out differently
    swapped = restore(vol.copy_with(vol.array[[2, 1, 0]]), model=folder, device="cpu")
    assert np.abs(swapped.array[1] - out.array[1]).max() > 1.0
    tiled = restore(vol, model=folder, device="cpu", tile=48, overlap=0.25)
    correction = np.abs(out.array - vol.array)
    assert np.abs(tiled.array - out.array).max() < 0.03 * correction.max()


def test_tiled_3d_agrees_with_one_window(noisy, tmp_path):
    args = {**TINY_ARGS, "spatial_dims": 3}
    torch.manual_seed(0)  # the initial weights: not left to the order the tests run in
    net = build_network("ResidualUNet", args)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    folder = save_model(net, tiny_card(name="random-3d", dims=3, args=args), tmp_path / "m3")
    whole = restore(noisy, model=folder, mode="3d", device="cpu")
    seen = []
    tiled = restore(noisy, model=folder, mode="3d", device="cpu", tile=(16, 48, 48),
                    progress=lambda d, t: seen.append((d, t)))
    correction = np.abs(whole.array - noisy.array)
    diff = np.abs(tiled.array - whole.array)
    assert correction.max() > 100
    # relative to the correction (a random network moves voxels by hundreds of HU; the seams of
    # 16 x 48 x 48 windows differ at the per-cent level)
    assert diff.max() < 0.03 * correction.max() and np.percentile(diff, 99) < 0.01 * correction.max()
    assert seen[-1][0] == seen[-1][1] > 1 and all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))


def test_progress_and_cancel(noisy, trained):
    calls = []
    restore(noisy, model=trained, device="cpu", batch_size=4, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(d, 30) for d in (4, 8, 12, 16, 20, 24, 28, 30)]
    before = noisy.array.copy()
    asked = []

    def cancel():
        asked.append(1)
        return len(asked) > 3

    with pytest.raises(Cancelled):
        restore(noisy, model=trained, device="cpu", batch_size=4, cancel=cancel)
    assert len(asked) == 4
    assert np.array_equal(noisy.array, before)


def _flaky_forward(monkeypatch, fail_times: int, error, only_off_cpu: bool = False):
    real = ResidualUNet.forward
    state = {"fails": 0, "batches": []}

    def forward(self, x):
        if only_off_cpu and x.device.type != "cpu":
            raise error
        if not only_off_cpu and state["fails"] < fail_times:
            state["fails"] += 1
            raise error
        state["batches"].append(x.shape[0])
        return real(self, x)

    monkeypatch.setattr(ResidualUNet, "forward", forward)
    return state


@pytest.mark.parametrize("error", [RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                                   torch.cuda.OutOfMemoryError("CUDA out of memory")])
def test_out_of_memory_retries_with_smaller_batches(noisy, trained, monkeypatch, error):
    reference = restore(noisy, model=trained, device="cpu", batch_size=8).array
    state = _flaky_forward(monkeypatch, 2, error)
    out = restore(noisy, model=trained, device="cpu", batch_size=8)
    assert state["fails"] == 2 and state["batches"][0] == 2
    assert out.meta["provenance"][-1]["batch_size"] == 2
    np.testing.assert_allclose(out.array, reference, atol=1e-3)


def test_out_of_memory_on_the_accelerator_falls_back_to_the_cpu(noisy, trained, monkeypatch):
    reference = restore(noisy, model=trained, device="cpu").array
    # "meta" stands in for a GPU here: every forward pass off the CPU runs out of memory
    _flaky_forward(monkeypatch, 0, torch.cuda.OutOfMemoryError("CUDA out of memory"), only_off_cpu=True)
    with pytest.warns(RuntimeWarning, match="finished on the CPU"):
        out = restore(noisy, model=trained, device="meta", batch_size=4)
    step = out.meta["provenance"][-1]
    assert step["device"] == "cpu" and "out of memory" in step["fallback"]
    np.testing.assert_allclose(out.array, reference, atol=1e-3)


def test_out_of_memory_on_the_cpu_with_one_slice_is_a_clear_error(noisy, trained, monkeypatch):
    _flaky_forward(monkeypatch, 10**6, RuntimeError("out of memory"))
    with pytest.raises(RestoreError, match="out of memory on the CPU"):
        restore(noisy, model=trained, device="cpu", batch_size=2)


def test_cpu_batches_run_in_threads_of_their_own_with_the_same_result(noisy, trained, monkeypatch):
    import threading
    import warnings

    import napari_restore.step_runner as runner

    real = ResidualUNet.forward
    names: set[str] = set()

    def forward(self, x):
        names.add(threading.current_thread().name)
        return real(self, x)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two torch threads: two workers of one thread each
    try:
        with monkeypatch.context() as m:
            m.setattr(runner, "cpu_workers", lambda device, batches: 1)
            serial = restore(noisy, model=trained, device="cpu", batch_size=3).array
        monkeypatch.setattr(ResidualUNet, "forward", forward)
        calls = []
        filters = list(warnings.filters)
        out = restore(noisy, model=trained, device="cpu", batch_size=3, progress=lambda d, t: calls.append((d, t)))
        assert torch.get_num_threads() == 2  # the workers' one-thread setting stays theirs
        assert warnings.filters == filters  # no warning filter left behind by the threads
    finally:
        torch.set_num_threads(threads)
    assert len({n for n in names if n.startswith("napari-restore")}) == 2, names
    np.testing.assert_allclose(out.array, serial, atol=1e-4)
    assert calls == [(d, 30) for d in range(3, 31, 3)]  # in order, though batches finish in any order


def test_strength_blends_input_and_full_restoration(noisy, trained):
    full = restore(noisy, model=trained, device="cpu").array
    none = restore(noisy, model=trained, device="cpu", strength=0.0).array
    half = restore(noisy, model=trained, device="cpu", strength=0.5)
    assert np.array_equal(none, noisy.array)
    np.testing.assert_allclose(half.array, 0.5 * (full + noisy.array), atol=1e-3)
    assert half.meta["provenance"][-1]["strength"] == 0.5
    with pytest.raises(InputError, match="strength"):
        restore(noisy, model=trained, strength=1.5)


def test_self_ensemble_averages_the_flipped_and_rotated_runs(ct, noisy, trained, tmp_path):
    plain = restore(noisy, model=trained, device="cpu")
    e8 = restore(noisy, model=trained, device="cpu", ensemble=8)
    by_hand = []  # the network on each flipped / rotated volume, mapped back
    for k in range(4):
        for flip in (False, True):
            a = np.rot90(noisy.array, k, axes=(1, 2))
            a = np.flip(a, 2) if flip else a
            o = restore(Volume(np.ascontiguousarray(a), noisy.affine, "CT", {}), model=trained, device="cpu").array
            by_hand.append(np.rot90(np.flip(o, 2) if flip else o, -k, axes=(1, 2)))
    np.testing.assert_allclose(e8.array, np.mean(by_hand, axis=0), atol=1e-2)
    assert e8.meta["provenance"][-1]["self_ensemble"] == 8 and "self_ensemble" not in plain.meta["provenance"][-1]
    assert _rmse(e8.array, ct.array) < _rmse(plain.array, ct.array)
    # a card may make it the model's default; an explicit ensemble overrides the card
    folder = tmp_path / "tiny-e2"
    shutil.copytree(trained, folder)
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "self_ensemble": 2}))
    e2 = restore(noisy, model=folder, device="cpu")
    assert e2.meta["provenance"][-1]["self_ensemble"] == 2
    np.testing.assert_array_equal(e2.array, restore(noisy, model=trained, device="cpu", ensemble=2).array)
    np.testing.assert_array_equal(restore(noisy, model=folder, device="cpu", ensemble=1).array, plain.array)
    with pytest.raises(InputError, match="ensemble"):
        restore(noisy, model=trained, ensemble=3)


def test_4d_volume_is_restored_per_time_point(ct, noisy, trained):
    vol4 = Volume(np.stack([noisy.array, ct.array]), ct.affine, "CT")
    out = restore(vol4, model=trained, device="cpu")
    assert out.array.shape == vol4.array.shape
    for t, frame in enumerate((noisy, ct)):
        np.testing.assert_allclose(out.array[t], restore(frame, model=trained, device="cpu").array, atol=1e-3)


def test_2d_memory_stays_under_twice_the_volume(identity_2d):
    rng = np.random.default_rng(0)
    arr = rng.normal(40, 30, (64, 512, 512)).astype(np.float32)
    vol = Volume(arr, np.eye(4), "CT")
    tracemalloc.start()
    try:
        out = restore(vol, model=identity_2d, device="cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # input (already there) + new allocations < 2x the volume + a margin for one batch
    assert arr.nbytes + peak < 2 * arr.nbytes + 16 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    np.testing.assert_allclose(out.array, arr, atol=1e-3)


def test_enhance_sharpens_edges_without_amplifying_noise(ct):
    noise = np.random.default_rng(2).normal(0, 20, ct.array.shape).astype(np.float32)
    clean = restore(ct, task="enhance", device="cpu")
    noisy = restore(ct.copy_with(ct.array + noise), task="enhance", device="cpu")
    body = (ct.array > -900) & (ct.array < 3000)
    assert np.std((noisy.array - clean.array)[body]) < 1.12 * np.std(noise[body])

    def grad(a):
        gy, gx = np.gradient(a, axis=(1, 2))
        return np.hypot(gy, gx)

    g0 = grad(ct.array)
    edges = g0 > np.percentile(g0, 95)
    assert grad(clean.array)[edges].mean() > 1.15 * g0[edges].mean()
    step = clean.meta["provenance"][-1]
    assert step["model"] == "classical-unsharp" and step["learned"] is False


def test_restore_pipeline_skips_steps_without_a_model(ct, noisy, trained):
    with pytest.warns(RuntimeWarning, match="skipped"):
        only_enhance = restore(noisy, task="restore", device="cpu")
    step = only_enhance.meta["provenance"][-1]
    assert step["skipped"] == ["denoise", "deblur"] and [s["task"] for s in step["steps"]] == ["enhance"]
    assert any("denoise" in w for w in only_enhance.meta["warnings"])
    with pytest.warns(RuntimeWarning, match="deblur"):
        both = restore(noisy, task="restore", model={"denoise": trained}, device="cpu")
    step = both.meta["provenance"][-1]
    assert [s["task"] for s in step["steps"]] == ["denoise", "enhance"] and step["skipped"] == ["deblur"]
    assert _rmse(both.array, ct.array) < _rmse(only_enhance.array, ct.array)
    with pytest.warns(RuntimeWarning, match="deblur"):
        half = restore(noisy, task="restore", model={"denoise": trained}, device="cpu", strength=0.5)
    np.testing.assert_allclose(half.array, 0.5 * (both.array + noisy.array), atol=1e-3)


@pytest.mark.parametrize("task", ["denoise", "deblur"])
def test_no_trained_model_installed_is_a_clear_model_error(noisy, task):
    with pytest.raises(ModelError, match=f"no trained '{task}' model for CT") as err:
        restore(noisy, task=task)
    assert "NAPARI_RESTORE_MODELS" in str(err.value) and "model=" in str(err.value)


def test_installed_model_is_picked_when_model_is_none(noisy, trained, empty_user_models):
    shutil.copytree(trained, empty_user_models / "tiny")
    out = restore(noisy, device="cpu")
    assert out.meta["provenance"][-1]["model"] == "tiny-ct-denoise"
    with pytest.raises(ModelError, match="no trained 'denoise' model"):
        restore(noisy, device="cpu", mode="3d")  # only a 2-D model is installed


def test_model_must_fit_task_modality_and_mode(noisy, trained, identity_3d, shared_data):
    mr = napari_restore.load(shared_data / "mr" / "nifti" / "T1.nii.gz")[0]
    mr.modality = "MR"
    with pytest.raises(ModelError, match="is for CT, the volume is MR"):
        restore(mr, model=trained)
    with pytest.raises(ModelError, match="not 'deblur'"):
        restore(noisy, task="deblur", model=trained)
    with pytest.raises(ModelError, match="mode='3d'"):
        restore(noisy, model=identity_3d, mode="2d")
    with pytest.raises(InputError, match="tile"):
        restore(noisy, model=trained, tile=(8, 8, 8))
    with pytest.raises(InputError, match="mode"):
        restore(noisy, model=trained, mode="4d")
