"""What the widget tests share: opening real data as layers, the widget the way a user opens it
(Plugins menu: napari hands the plugin its public-only viewer proxy), and waiting for its jobs."""
from __future__ import annotations

from pathlib import Path

from napari_restore._napari._reader import read_layers
from napari_restore._napari._widget import RestoreWidget
from napari_restore.volume import LAYER_META_KEY

CT_NIFTI = "ct/nifti/example_ct_sm.nii.gz"
TINY = "tiny-ct-denoise"
WAIT_MS = 60_000


def open_layers(viewer, shared_data: Path, rel: str, modality: str | None = None):
    """Add ``shared_data / rel`` through the plugin's reader; returns the first layer it added.
    ``modality``: set on the layer's record (for files that do not say)."""
    first = len(viewer.layers)
    for data, kwargs, _kind in read_layers(str(shared_data / rel)):
        if modality:
            kwargs["metadata"][LAYER_META_KEY]["modality"] = modality
        viewer.add_image(data, **kwargs)
    return viewer.layers[first]


def plugin_widget(viewer) -> RestoreWidget:
    """The Restore widget from the Plugins menu path."""
    _dock, w = viewer.window.add_plugin_dock_widget("napari-restore", "Restore")
    assert isinstance(w, RestoreWidget)
    return w


def wait(qtbot, cond, timeout: int = WAIT_MS) -> None:
    qtbot.waitUntil(cond, timeout=timeout)
