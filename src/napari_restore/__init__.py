"""napari-restore: restore CT and MR volumes with learned residual U-Nets.

Public API: :func:`load`, :func:`save`, :func:`restore`, :func:`list_models`, :class:`Volume`.
The core never imports napari or Qt; the plugin lives in ``napari_restore._napari``.
"""
from __future__ import annotations

from .errors import Cancelled, InputError, ModelError, OutputError, RestoreError
from .io import load, save
from .volume import Volume

__version__ = "0.1.0"

__all__ = [
    "Volume", "load", "save", "restore", "list_models",
    "RestoreError", "InputError", "OutputError", "ModelError", "Cancelled", "__version__",
]


def __getattr__(name: str):
    # restore/list_models pull in torch and MONAI; import them only when asked for.
    if name == "restore":
        from .inference import restore

        return restore
    if name == "list_models":
        from .models import list_models

        return list_models
    raise AttributeError(name)
