"""Read a MONAI bundle written by :func:`napari_restore.training.export_bundle`, safely.

:func:`load_bundle` reads only ``configs/metadata.json`` and ``configs/napari_restore_card.json``,
builds a whitelisted architecture (:data:`napari_restore.networks.ARCHITECTURES`) and loads
``models/model.pt`` with ``weights_only=True``; no expression of the bundle's configs is ever
evaluated. :func:`napari_restore.models.load_model` calls it for a folder that holds
``configs/metadata.json``. (Writing bundles is training's: :mod:`napari_restore.training.bundle`.)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ModelError
from .card import ModelCard

METADATA = Path("configs") / "metadata.json"
CARD = Path("configs") / "napari_restore_card.json"
INFERENCE = Path("configs") / "inference.json"
WEIGHTS = Path("models") / "model.pt"
_REQUIRED_META = ("version", "monai_version", "pytorch_version", "numpy_version", "network_data_format")


def is_bundle(path: str | os.PathLike) -> bool:
    """True for a folder holding ``configs/metadata.json``."""
    p = Path(path)
    return p.is_dir() and (p / METADATA).is_file()


def read_bundle_card(folder: str | os.PathLike):
    """The :class:`~napari_restore.models.ModelCard` of a bundle (``path`` = its weights)."""
    folder = Path(folder)
    meta_path = folder / METADATA
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelError("not a MONAI bundle: configs/metadata.json is missing", folder) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"configs/metadata.json is not readable JSON ({exc})", folder) from None
    missing = [k for k in _REQUIRED_META if k not in meta] if isinstance(meta, dict) else list(_REQUIRED_META)
    if missing:
        raise ModelError(f"configs/metadata.json lacks the MONAI bundle key(s) {missing}", folder)
    if not (folder / CARD).is_file():
        raise ModelError("this MONAI bundle has no configs/napari_restore_card.json, so napari-restore cannot tell "
                         "its architecture and intensity mapping (only bundles exported by napari-restore load)", folder)
    card = ModelCard.read(folder / CARD)
    if str(meta.get("version")) != card.version:
        raise ModelError(f"metadata.json version {meta.get('version')!r} differs from the card's {card.version!r}", folder)
    card.path, card.source = folder / WEIGHTS, "bundle"
    return card


def load_bundle(folder: str | os.PathLike, device: str = "cpu"):
    """Load a bundle written by :func:`napari_restore.training.export_bundle` as a ``LoadedModel`` (safe: no config evaluation).

    Raises:
        ModelError: missing/invalid metadata or card, unknown architecture, unsafe or mismatching weights.
    """
    from . import LoadedModel, build_from_card, load_weights  # the registry's loaders (this package)

    card = read_bundle_card(folder)
    net = build_from_card(card, load_weights(card.path))
    net.eval().to(device)
    return LoadedModel(card, net)


__all__ = ["load_bundle", "read_bundle_card", "is_bundle", "METADATA", "CARD", "INFERENCE", "WEIGHTS"]
