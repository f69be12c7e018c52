"""CUDA vs CPU: ``restore()`` with the shipped models on real series, max/mean difference and time.

Usage (on a machine with a GPU): ``python benchmarks/cuda_agreement.py [--data DIR]`` (DIR holds
the ``ct/`` and ``mr/`` folders of the shared data; default ``../shared/data``). Prints one line per
model and writes nothing. Without CUDA it says so and exits 0.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

import napari_restore as nr

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CASES = [("denoise-ct", "ct/siemens-body-j2k"), ("deblur-ct", "ct/siemens-body-j2k"),
         ("denoise-mr", "mr/siemens-xa30-enhanced/5_anat-T1w_acq-tfl")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=DATA, help="folder holding ct/ and mr/ (default ../shared/data)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to compare")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
    for model, rel in CASES:
        vol = nr.load(args.data / rel)[0]
        cpu = nr.restore(vol, model=model, device="cpu").array.astype(np.float64)
        nr.restore(vol, model=model, device="cuda")  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        gpu = nr.restore(vol, model=model, device="cuda").array.astype(np.float64)
        dt = time.perf_counter() - t0
        d = np.abs(cpu - gpu)
        print(f"{model} on {rel} {vol.array.shape}: max |cuda - cpu| {d.max():.3g}, mean {d.mean():.3g} "
              f"(image range {np.ptp(vol.array):.0f}); cuda {vol.array.shape[0] / dt:.0f} slices/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
