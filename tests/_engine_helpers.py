"""Tiny models that the engine tests build or train themselves (no shipped weights)."""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from napari_restore.intensity import CT_DEFAULT
from napari_restore.networks import build_network

TINY_ARGS = {"spatial_dims": 2, "channels": [8, 16], "strides": [2], "num_res_units": 0,
             "norm": "batch", "act": "PRELU", "dropout": 0.0, "kernel_size": 3, "up_kernel_size": 3}
NOISE_HU = 60.0


def tiny_card(name: str = "tiny-ct-denoise", task: str = "denoise", modality: str = "CT", dims: int = 2,
              args: dict | None = None, **extra) -> dict:
    args = dict(args or TINY_ARGS)
    args["spatial_dims"] = dims
    return {"name": name, "version": "0.0.1", "task": task, "modality": modality, "dims": dims,
            "architecture": {"name": "ResidualUNet", "args": args}, "intensity": dict(CT_DEFAULT),
            "training_data": "test fixture: 50 steps on ct/nifti/example_ct_sm.nii.gz slices 0-19",
            "metrics": {}, "description": "built by the test suite; not a trained model", **extra}


def ct_slices(shared_data: Path) -> np.ndarray:
    """The real CT ``example_ct_sm`` (30, 101, 122) in HU, through napari_restore.load."""
    import napari_restore

    return napari_restore.load(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")[0].array


@functools.lru_cache(maxsize=None)
def _trained_state(data_path: str, steps: int = 50) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny batches: one thread is fastest, and immune to a busy machine
    try:
        return _train(data_path, steps)
    finally:
        torch.set_num_threads(threads)


def _train(data_path: str, steps: int) -> dict:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    vol = ct_slices(Path(data_path))
    train = torch.from_numpy(np.clip(vol[:20], -1024, 3071) / 512.0).float()
    net = build_network("ResidualUNet", TINY_ARGS)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    net.train()
    for _ in range(steps):
        idx = rng.integers(0, train.shape[0], 8)
        y0, x0 = rng.integers(0, train.shape[1] - 64), rng.integers(0, train.shape[2] - 64)
        clean = train[idx, None, y0:y0 + 64, x0:x0 + 64]
        noisy = clean + torch.randn_like(clean) * (NOISE_HU / 512.0)
        loss = torch.nn.functional.mse_loss(net(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def trained_tiny_network(shared_data: Path):
    """A tiny 2-D residual U-Net trained for 50 steps to remove 60 HU Gaussian noise (cached)."""
    net = build_network("ResidualUNet", TINY_ARGS)
    net.load_state_dict(_trained_state(str(shared_data)))
    return net.eval()


def save_tiny(folder: Path, network=None, **card_kw) -> Path:
    from napari_restore.models import save_model

    if network is None:
        network = build_network("ResidualUNet", TINY_ARGS)
    card = tiny_card(**card_kw)
    return save_model(network, card, folder)


def one_torch_thread():
    """Generator for a module-scoped fixture: the tiny test networks run fastest on one thread,
    and a busy 2-core machine makes two threads up to 30x slower (measured here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
