"""``python -m napari_restore.training DATA... -o OUT [options]`` (also under ``torchrun``)."""
from __future__ import annotations

import argparse
import sys

from ..errors import RestoreError
from .config import add_train_arguments, config_from_args


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m napari_restore.training",
                                     description="Train a napari-restore denoising/deblurring network.")
    add_train_arguments(parser)
    ns = parser.parse_args(argv)
    from . import train

    try:
        result = train(config_from_args(ns))
    except RestoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; resume with --resume <run folder>", file=sys.stderr)
        return 130
    best = result.best
    msg = f"saved {result.model_dir} after {result.epochs} epochs ({result.steps} steps, {result.seconds:.0f} s)"
    if best.get("val_psnr") is not None:
        msg += f"; best validation PSNR {best['val_psnr']:.2f} dB (input {result.baseline.get('val_psnr', float('nan')):.2f} dB)"
        if ns.keep == "last" and result.history:
            msg += f"; kept the last epoch ({result.history[-1].get('val_psnr', float('nan')):.2f} dB)"
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(msg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
