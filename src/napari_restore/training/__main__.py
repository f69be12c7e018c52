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
    import os

    if int(os.environ.get("RANK", "0")) == 0:
        print(result.summary(ns.keep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
