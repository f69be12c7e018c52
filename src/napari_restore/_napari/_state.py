"""The widget's state: evented dataclasses (psygnal), no Qt, no napari.

The Qt widgets (:mod:`._widget`) show and edit these objects; every field change emits
``state.events.<field>`` so the view follows the state and the tests can drive the state
directly. The user's choices (task, model, device, strength, advanced settings, export and
training options) are remembered between sessions in a small JSON file, see
:func:`settings_path` (``$NAPARI_RESTORE_CONFIG_DIR`` or the user config folder).
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from psygnal import Signal, SignalGroup, evented

from ..constants import TASK_LABELS, TASKS
from ..options import RestoreOptions

#: Slices thicker than this (mm), or more than ``THICK_RATIO`` times the in-plane pixel, are
#: restored slice by slice (2-D): a 3-D network would mix anatomy of distant planes.
THICK_SLICE_MM = 2.5
THICK_RATIO = 3.0
AUTO_MODEL = ""  # the "best installed model" choice
SETTINGS_FILE = "widget.json"


@evented
@dataclass
class RestoreState:
    """What the Restore panel will run, and how the running job stands.

    ``model``: ``""`` (the best installed model for task/modality/mode), an installed model's
    name, or a model folder / file path. ``device``: ``"auto"``, ``"cpu"``, ``"cuda:0"``, ...
    ``batch_size``/``tile``: 0 = automatic / whole slices. ``overlap``: tile overlap 0..0.9.
    ``ensemble``: passes averaged over in-plane flips/rotations (1, 2, 4, 8); 0 = the model card's.
    """

    layer: str | None = None
    task: str = "denoise"
    model: str = AUTO_MODEL
    mode: str = "2d"
    device: str = "auto"
    strength: float = 1.0
    batch_size: int = 0
    tile: int = 0
    overlap: float = 0.25
    ensemble: int = 0
    extra_models: list[str] = field(default_factory=list)
    running: bool = False
    done: int = 0
    total: int = 0
    status: str = "Ready"

    def to_options(self, model: Any = None) -> RestoreOptions:
        """The :class:`~napari_restore.options.RestoreOptions` these choices mean (0 = automatic);
        ``model``: the ``model=`` value for :attr:`model` (a loaded bundle object, a name, a path).

        Raises:
            InputError: a value out of range (the message names the option).
        """
        return RestoreOptions(task=self.task, model=model, mode=self.mode, device=self.device,
                              strength=float(self.strength), batch_size=self.batch_size or None,
                              tile=self.tile or None, overlap=float(self.overlap), ensemble=self.ensemble or None)


@evented
@dataclass
class CompareState:
    """Compare tools: the pair of layers, the view mode and the blend amount (0..1)."""

    view: str = "off"  # "off" | "grid" | "blend"
    blend: float = 0.5


@evented
@dataclass
class ExportState:
    """Export options: the derived series description (``""``: the writer's default) and de-identification."""

    series_description: str = ""
    deidentify: bool = False
    last_folder: str = ""
    running: bool = False


@evented
@dataclass
class TrainState:
    """Fine-tune panel: data, starting model, mode, epochs, and the live curves."""

    mode: str = "supervised"  # "supervised" (synthetic degradation) | "self-supervised" | "paired"
    task: str = "denoise"
    base_model: str = AUTO_MODEL
    epochs: int = 5
    steps_per_epoch: int = 50
    folder: str = ""
    name: str = "my-finetuned-model"
    running: bool = False
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    status: str = "Ready"


class WidgetEvents(SignalGroup):
    """What one tab tells the others (they never touch each other's controls).

    ``restored(input name, output name)``: a restoration added or refilled a layer;
    ``models_changed()``: a model was loaded or saved (lists must be re-read);
    ``model_saved(name)``: a fine-tuned model was saved under ``name``.
    """

    restored = Signal(str, str)
    models_changed = Signal()
    model_saved = Signal(str)


#: The fields written to the settings file, per state object.
PERSISTED = {
    "restore": ("task", "model", "device", "strength", "batch_size", "tile", "overlap", "ensemble", "extra_models"),
    "export": ("deidentify", "last_folder"),
    "train": ("mode", "task", "base_model", "epochs", "steps_per_epoch", "folder", "name"),
}


def settings_path() -> Path:
    """``$NAPARI_RESTORE_CONFIG_DIR/widget.json``, else ``<user config dir>/napari-restore/widget.json``."""
    folder = os.environ.get("NAPARI_RESTORE_CONFIG_DIR")
    if not folder:
        from platformdirs import user_config_dir

        folder = user_config_dir("napari-restore", appauthor=False)
    return Path(folder) / SETTINGS_FILE


def load_settings(states: dict[str, Any], path: Path | None = None) -> None:
    """Set the persisted fields of ``states`` (``{"restore": RestoreState, ...}``) from the file.

    A missing, unreadable or malformed file (or a value of the wrong type) is ignored: the
    defaults stay. Never raises.
    """
    path = path or settings_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(data, dict):
        return
    for key, fields in PERSISTED.items():
        state, saved = states.get(key), data.get(key)
        if state is None or not isinstance(saved, dict):
            continue
        for name in fields:
            if name not in saved:
                continue
            value, default = saved[name], getattr(state, name)
            if isinstance(default, bool) != isinstance(value, bool):
                continue
            if isinstance(default, float) and isinstance(value, int):
                value = float(value)
            if type(value) is not type(default):
                continue
            if name == "extra_models" and not all(isinstance(v, str) for v in value):
                continue
            setattr(state, name, value)
    restore = states.get("restore")
    if isinstance(restore, RestoreState):
        _keep_valid_options(restore)


def _keep_valid_options(state: RestoreState) -> None:
    """A remembered option out of its range (a hand-edited file, an older version) falls back to its
    default, one option at a time, so that the widget never opens with settings no run accepts."""
    from ..errors import InputError

    defaults = RestoreState()
    fields = ("task", "mode", "device", "strength", "batch_size", "tile", "overlap", "ensemble")
    for _ in range(len(fields) + 1):
        try:
            state.to_options()
            return
        except InputError as exc:  # the message starts with the option's name
            bad = [f for f in fields if str(exc).startswith(f)] or list(fields)
            for name in bad:
                setattr(state, name, getattr(defaults, name))


def save_settings(states: dict[str, Any], path: Path | None = None) -> Path | None:
    """Write the persisted fields of ``states`` to the settings file; returns it (None on failure)."""
    path = path or settings_path()
    data = {key: {name: getattr(states[key], name) for name in fields}
            for key, fields in PERSISTED.items() if key in states}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        return None
    return path


def suggest_mode(spacing_zyx: tuple[float, float, float], has_3d_model: bool) -> tuple[str, str]:
    """``("2d"|"3d", reason)`` from the voxel spacing (mm): thick slices -> slice by slice.

    3-D is chosen only for near-isotropic voxels *and* when a 3-D model exists for the task.
    """
    dz, dy, dx = (float(s) for s in spacing_zyx)
    inplane = min(dy, dx)
    thick = dz > THICK_SLICE_MM or dz > THICK_RATIO * inplane
    if thick:
        return "2d", f"{dz:.2g} mm slices ({inplane:.2g} mm pixels): slice by slice"
    if not has_3d_model:
        return "2d", f"{dz:.2g} mm slices suit 3-D, but no 3-D model is installed: slice by slice"
    return "3d", f"{dz:.2g} mm slices, {inplane:.2g} mm pixels: near-isotropic, 3-D"


def state_dict(state: Any) -> dict[str, Any]:
    """A plain dict of an evented dataclass (for logs and tests)."""
    return dataclasses.asdict(state)
