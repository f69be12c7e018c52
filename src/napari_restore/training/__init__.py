"""Training of restoration networks: supervised (synthetic degradations), paired, self-supervised.

Public API::

    from napari_restore.training import TrainConfig, train, export_bundle, load_bundle
    result = train(TrainConfig(data=["scans/"], output="models/my-ct-denoiser", epochs=20))

``python -m napari_restore.training DATA... -o OUT [options]`` runs the same, also under
``torchrun --nproc_per_node=N`` (DistributedDataParallel).
"""
from __future__ import annotations

from .config import TrainConfig, TrainResult, add_train_arguments, config_from_args


def train(config: TrainConfig, progress=None, cancel=None) -> TrainResult:
    """Train a model; see :func:`napari_restore.training.loop.train`."""
    from .loop import train as _train

    return _train(config, progress=progress, cancel=cancel)


def export_bundle(model, folder, overwrite: bool = False):
    """Export a model as a MONAI bundle; see :func:`napari_restore.training.bundle.export_bundle`."""
    from .bundle import export_bundle as _export

    return _export(model, folder, overwrite=overwrite)


def load_bundle(folder, device: str = "cpu"):
    """Load a MONAI bundle written by :func:`export_bundle`; see :mod:`.bundle`."""
    from .bundle import load_bundle as _load

    return _load(folder, device=device)


__all__ = ["TrainConfig", "TrainResult", "train", "add_train_arguments", "config_from_args", "export_bundle",
           "load_bundle"]
