"""The fine-tune tab's training preparation (Qt-free, unit-tested): layers become NIfTI files in
a temporary folder (with their geometry), a single scan is split along z for validation, and the
panel's choices become a :class:`~napari_restore.training.TrainConfig`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..volume import Volume

TRAIN_MODES = {"supervised": "Synthetic degradation (clean scans)",
               "self-supervised": "Self-supervised (noisy scans only)",
               "paired": "Paired layers (full dose + low dose)"}


@dataclass
class TrainRequest:
    """What the fine-tune panel asks for.

    ``layers``: ``(layer name, Volume)`` pairs to train on (empty when ``folder`` is given);
    ``from_folder``: train on ``folder`` instead of layers; ``low``: the low-dose ``(name, Volume)`` of paired mode; ``base_model``: an installed
    model's name or a model folder, ``""`` for a new network.
    """

    mode: str = "supervised"
    task: str = "denoise"
    epochs: int = 5
    steps_per_epoch: int = 50
    name: str = "my-finetuned-model"
    base_model: str = ""
    folder: str = ""
    from_folder: bool = False
    layers: list[tuple[str, Volume]] = field(default_factory=list)
    low: tuple[str, Volume] | None = None


def _split_z(vol: Volume, fraction: float = 0.2) -> tuple[Volume, Volume]:
    """``(first slices, last fraction of slices)`` with their true positions."""
    nz = vol.array.shape[0]
    cut = nz - max(1, round(fraction * nz))
    parts = []
    for a, b in ((0, cut), (cut, nz)):
        aff = vol.affine.copy()
        aff[:3, 3] += a * aff[:3, 0]
        parts.append(Volume(vol.array[a:b], aff, vol.modality, dict(vol.meta)))
    return parts[0], parts[1]


def prepare_training(req: TrainRequest, tmp: Path, dry_run: bool = False, **overrides: Any) -> Any:
    """Write the request's data under ``tmp`` and return the ``TrainConfig``.

    One scan (not paired) of at least 5 slices: its last fifth validates (a separate file).
    The card names the layers (or the folder) as its training data, never the temporary files.
    ``overrides`` are ``TrainConfig`` fields (tests use them to make a run tiny). ``dry_run``: check
    the request and the settings and build the config without writing any file (the GUI thread does
    this; the worker then writes the data).

    Raises:
        InputError: no data, a missing folder, a paired run without a separate low-dose layer,
            or an unknown override.
    """
    from .. import save
    from ..training import TrainConfig

    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    data: list[str] = []
    val: list[str] = []
    low: list[str] = []
    sizes: list[int] = []
    if req.from_folder:
        if not req.folder or not Path(req.folder).exists():
            raise InputError("choose an existing folder of scans", req.folder)
        data, described = [req.folder], [req.folder]
    else:
        if not req.layers:
            raise InputError("tick at least one image layer to train on")
        described = [f"napari layer {name!r}" for name, _ in req.layers]
        for n, (name, vol) in enumerate(req.layers):
            sizes.append(min(vol.array.shape[-2:]))
            vol = Volume(vol.array, vol.affine, vol.modality, {**vol.meta, "description": name})
            if len(req.layers) == 1 and req.mode != "paired" and vol.array.ndim == 3 and vol.array.shape[0] >= 5:
                train_part, val_part = _split_z(vol)
                for part, lst in ((train_part, data), (val_part, val)):
                    p = tmp / f"{'data' if lst is data else 'val'}{n:02d}.nii.gz"
                    if not dry_run:
                        save(part, p)
                    lst.append(str(p))
                continue
            p = tmp / f"data{n:02d}.nii.gz"
            if not dry_run:
                save(vol, p)
            data.append(str(p))
    if req.mode == "paired":
        if req.low is None or any(req.low[0] == name for name, _ in req.layers):
            raise InputError("paired mode: choose a low-dose layer that is not ticked as training data")
        p = tmp / "low00.nii.gz"
        if not dry_run:
            save(req.low[1], p)
        low = [str(p)]
        described.append(f"napari layer {req.low[0]!r} (low dose)")
    name = req.name.strip() or "my-finetuned-model"
    cfg: dict[str, Any] = {
        "data": data, "output": str(tmp / name), "mode": req.mode, "task": req.task, "low_data": low,
        "epochs": req.epochs, "steps_per_epoch": req.steps_per_epoch, "name": name,
        "init_model": req.base_model or None, "tensorboard": False, "progress_bar": False,
        "batch_size": 8, "patience": 0, "data_description": described,
        "description": f"fine-tuned in napari ({TRAIN_MODES[req.mode]})",
    }
    if sizes:
        side = max(32, min(128, min(sizes) // 16 * 16))
        cfg["patch_size"] = (side, side)
        cfg["val_crop"] = min(256, min(sizes))
        if val:
            cfg["val_data"] = val
    cfg.update(overrides)
    try:
        return TrainConfig(**cfg)
    except TypeError as exc:  # an unknown override
        raise InputError(f"training settings: {exc}") from None
