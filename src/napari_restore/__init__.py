"""napari-restore: restore CT and MR volumes with learned residual U-Nets.

Public API: :func:`load`, :func:`save`, :func:`restore`, :func:`list_models`, :class:`Volume`.
The core never imports napari or Qt; the plugin lives in ``napari_restore._napari``.

``import napari_restore`` stays light (no torch, no MONAI): :func:`restore` and
:func:`list_models` are imported on first use. Type checkers and IDEs see them through the
``TYPE_CHECKING`` imports below, and ``dir(napari_restore)`` lists them.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import Cancelled, InputError, ModelError, OutputError, RestoreError
from .io import load, save
from .volume import Volume

if TYPE_CHECKING:  # what the lazy names below are, for type checkers, IDEs and the API docs
    from .inference import restore
    from .models import list_models

__version__ = "0.2.0"

__all__ = [
    "Volume", "load", "save", "restore", "list_models",
    "RestoreError", "InputError", "OutputError", "ModelError", "Cancelled", "__version__",
]

_LAZY = {"restore": ".inference", "list_models": ".models"}


def __getattr__(name: str):
    # restore/list_models pull in torch and MONAI; import them only when asked for.
    if name in _LAZY:
        from importlib import import_module

        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
