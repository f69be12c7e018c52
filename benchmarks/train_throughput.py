"""Training throughput (patches/s): default 2-D ResidualUNet, 128x128 patches, batch 16.

Measures (a) the optimiser step alone on random tensors and (b) the whole pipeline: CT patches
from ../shared/data with per-sample low-dose noise (fast image-domain method), augmentation and
the step. Prints the machine and both figures.

Usage: python benchmarks/train_throughput.py [--steps 10] [--workers 0] [--device cpu]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--patch", type=int, default=128)
    args = ap.parse_args()
    import torch

    from napari_restore.evaluate import machine_description
    from napari_restore.networks import build_network
    from napari_restore.training.data import Degradation, PatchDataset, load_series
    from napari_restore.training.losses import SupervisedLoss

    dev = torch.device(args.device)
    print(machine_description(), "| device", dev)
    net = build_network().to(dev).train()  # DEFAULT_2D
    opt = torch.optim.AdamW(net.parameters(), 1e-3)
    loss_fn = SupervisedLoss("l1")
    b, p = args.batch, args.patch

    def step(x, y):
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    x = torch.randn(b, 1, p, p, device=dev)
    y = x + 0.05 * torch.randn_like(x)
    for _ in range(2):
        step(x, y)
    t = time.perf_counter()
    for _ in range(args.steps):
        step(x, y)
    dt = time.perf_counter() - t
    print(f"(a) optimiser step only: {args.steps * b / dt:.1f} patches/s ({dt / args.steps:.3f} s/step)")

    series = load_series([DATA / "ct" / "siemens-body-j2k"])
    ds = PatchDataset(series, (p, p), b * (args.steps + 2), Degradation("ct_lowdose"), jitter=0.05)
    for z in range(series[0].array.shape[0]):  # noise maps are computed once per slice; not timed
        series[0].ct_maps(z)
    loader = torch.utils.data.DataLoader(ds, batch_size=b, num_workers=args.workers)
    it = iter(loader)
    for _ in range(2):
        batch = next(it)
        step(batch["input"].to(dev), batch["target"].to(dev))
    t = time.perf_counter()
    for _ in range(args.steps):
        batch = next(it)
        step(batch["input"].to(dev), batch["target"].to(dev))
    dt = time.perf_counter() - t
    print(f"(b) with data (CT low-dose noise per sample, augmentation): {args.steps * b / dt:.1f} patches/s")


if __name__ == "__main__":
    main()
