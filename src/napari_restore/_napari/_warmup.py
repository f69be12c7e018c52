"""The Restore tab's Advanced section (batch size, tiles, passes) and the model warm-up that
makes the first Preview fast: the chosen model runs once on a small crop of the input in the
background when the widget opens or the model, layer, mode or device changes (imports, the first
read of the weights and the first forward pass are paid there; no model is kept in memory).
"""
from __future__ import annotations

from typing import Any

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QDoubleSpinBox, QFormLayout, QSpinBox, QVBoxLayout, QWidget

from ..volume import Volume
from ._common import Section
from ._state import RestoreState
from ._worker import Job, start_job


class AdvancedOptions(QWidget):
    """Batch size, tile size, tile overlap and passes, bound to a :class:`RestoreState`."""

    def __init__(self, state: RestoreState) -> None:
        super().__init__()
        self.state = state
        adv = QWidget()
        af = QFormLayout(adv)
        af.setLabelAlignment(Qt.AlignRight)
        self.batch_spin = QSpinBox(minimum=0, maximum=256, specialValueText="Auto")
        self.batch_spin.setToolTip("Slices (2D) or windows (3D) per forward pass. Auto adapts to free memory.")
        self.batch_spin.valueChanged.connect(lambda v: setattr(state, "batch_size", int(v)))
        self.tile_spin = QSpinBox(minimum=0, maximum=1024, singleStep=32, specialValueText="Whole slice")
        self.tile_spin.setToolTip("Tile side in pixels for big images or small GPUs (blended with Gaussian weights).")
        self.tile_spin.valueChanged.connect(lambda v: setattr(state, "tile", int(v)))
        self.overlap_spin = QDoubleSpinBox(minimum=0.0, maximum=0.9, singleStep=0.05, decimals=2)
        self.overlap_spin.setToolTip("Fraction of a tile (or 3-D window) shared with its neighbour.")
        self.overlap_spin.valueChanged.connect(lambda v: setattr(state, "overlap", float(v)))
        self.ensemble_combo = QComboBox()
        for text, n in (("Model's default", 0), ("1 (fastest)", 1), ("2", 2), ("4", 4), ("8 (cleanest)", 8)):
            self.ensemble_combo.addItem(text, n)
        self.ensemble_combo.setToolTip("Run the network on flipped and rotated copies of each slice and average "
                                       "them: a cleaner result for that many times the time.")
        self.ensemble_combo.currentIndexChanged.connect(
            lambda _i: setattr(state, "ensemble", int(self.ensemble_combo.currentData())))
        af.addRow("Batch size", self.batch_spin)
        af.addRow("Tile size", self.tile_spin)
        af.addRow("Tile overlap", self.overlap_spin)
        af.addRow("Passes", self.ensemble_combo)
        self.section = Section("Advanced", adv)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.section)

    def sync_from_state(self) -> None:
        s = self.state
        self.batch_spin.setValue(s.batch_size)
        self.tile_spin.setValue(s.tile)
        self.overlap_spin.setValue(s.overlap)
        self.ensemble_combo.setCurrentIndex(max(0, self.ensemble_combo.findData(s.ensemble)))


def warm_up_crop(volume: Volume, mode: str, side: int = 64) -> Volume | None:
    """A few central slices (with the neighbours a 2.5-D or 3-D model reads), ``side`` pixels square."""
    if volume.array.ndim != 3:
        return None
    arr = volume.array
    z, cy, cx = arr.shape[0] // 2, arr.shape[1] // 2, arr.shape[2] // 2
    lo, hi = max(0, z - (8 if mode == "3d" else 1)), min(arr.shape[0], z + 2)
    h = side // 2
    return volume.copy_with(np.ascontiguousarray(arr[lo:hi, max(0, cy - h):cy + h, max(0, cx - h):cx + h]))


class ModelWarmer:
    """Runs :func:`napari_restore.restore` once per (layer, model, task, mode, device) on a small
    crop in a worker, one at a time; a request made while one runs waits (only the latest).
    ``job`` is the running warm-up (None when idle)."""

    def __init__(self) -> None:
        self.job: Job | None = None
        self.warmed: set[tuple] = set()
        self._pending: tuple | None = None

    def warm(self, layer_name: str, volume: Volume, kwargs: dict[str, Any]) -> Job | None:
        key = (layer_name, repr(kwargs["model"]), kwargs["task"], kwargs["mode"], str(kwargs["device"]),
               volume.modality)
        if key in self.warmed:
            return self.job
        if self.job is not None:
            self._pending = (layer_name, volume, kwargs)
            return self.job
        small = warm_up_crop(volume, kwargs["mode"])
        if small is None:
            return None
        self.warmed.add(key)
        kw = {**kwargs, "tile": None, "batch_size": None, "strength": 1.0}

        def work(progress, cancel):
            from .. import restore

            restore(small, **kw)

        def ended():
            self.job = None
            pending, self._pending = self._pending, None
            if pending is not None:
                self.warm(*pending)

        self.job = start_job("warm-up", work, on_result=lambda _v: None, on_error=lambda _e: None, on_end=ended)
        return self.job
