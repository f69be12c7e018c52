"""Export a model as a MONAI bundle, and load such a bundle back safely.

Layout written by :func:`export_bundle` (MONAI bundle specification)::

    <bundle>/
      configs/metadata.json          # version, changelog, monai/pytorch/numpy versions, task,
                                     # network_data_format (inputs/outputs), ...
      configs/inference.json         # for MONAI users: network_def (+ intensity notes); never
                                     # evaluated by napari-restore
      configs/napari_restore_card.json   # our model card (architecture, intensity mapping, metrics)
      models/model.pt                # the plain state_dict
      docs/README.md                 # what it is, how to use it, training data and figures
      LICENSE                        # when the card names a licence

Reading a bundle back (:func:`load_bundle`, :func:`read_bundle_card`, :func:`is_bundle`) is the model
registry's business and lives in :mod:`napari_restore.models.bundle`; they are re-exported here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..models.bundle import CARD, INFERENCE, METADATA, WEIGHTS, is_bundle, load_bundle, read_bundle_card

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def _versions() -> dict[str, str]:
    import monai
    import numpy
    import torch

    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__}


def _metadata(card) -> dict[str, Any]:
    from .. import __version__

    dims = card.dims
    spatial = list(card.patch_size or [64, 128, 128]) if dims == 3 else [128, 128]
    if card.modality == "CT":
        fmt, value_range = "hounsfield", list(card.intensity.get("clip", [-1024, 3071]))
    else:
        fmt, value_range = "magnitude", []
    io_desc = {"type": "image", "format": fmt, "modality": card.modality, "num_channels": 1,
               "spatial_shape": ["*"] * dims, "dtype": "float32", "value_range": value_range,
               "is_patch_data": False, "channel_def": {"0": "image"}}
    k = card.context
    in_desc = io_desc if not k else {  # 2.5-D: the slice and its neighbours, mirrored at the volume's ends
        **io_desc, "num_channels": 2 * k + 1,
        "channel_def": {str(i): f"slice z{i - k:+d}" if i != k else "slice z" for i in range(2 * k + 1)}}
    return {
        "schema": SCHEMA,
        "version": card.version,
        "changelog": {card.version: f"exported by napari-restore {__version__}"},
        **_versions(),
        "required_packages_version": {"napari-restore": __version__},
        "name": card.name,
        "task": f"{card.task} {card.modality} images ({dims}-D)",
        "description": card.description or f"{card.task} model for {card.modality}",
        "authors": "napari-restore",
        "copyright": card.license or "see LICENSE",
        "data_source": card.training_data if isinstance(card.training_data, str) else "; ".join(map(str, card.training_data)),
        "data_type": "dicom/nifti",
        "intended_use": "Research use: image restoration of medical images; not for diagnosis.",
        "eval_metrics": {k: v for k, v in card.metrics.items() if isinstance(v, (int, float))},
        "network_data_format": {
            "inputs": {"image": {**in_desc, "spatial_shape": spatial,
                                 "note": "physical units; normalise with configs/napari_restore_card.json 'intensity'"}},
            "outputs": {"pred": {**io_desc, "spatial_shape": spatial, "note": "same units as the normalised input"}},
        },
    }


def _inference_config(card) -> dict[str, Any]:
    cfg = {
        "imports": ["$import napari_restore"],
        "bundle_root": ".",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "napari_restore.networks.ResidualUNet", **card.architecture["args"]},
        "network": "$@network_def.to(@device)",
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "intensity": card.intensity,
        "note": "napari-restore reads metadata.json and napari_restore_card.json only; this file is for MONAI tools.",
    }
    if card.self_ensemble > 1:  # the card's default: run the loaded network through the same self-ensemble
        cfg["self_ensemble"] = card.self_ensemble
        cfg["network_ensemble"] = f"$napari_restore.networks.SelfEnsemble(@network, {card.self_ensemble})"
    return cfg


def _readme(card) -> str:
    m = "\n".join(f"| {k} | {v} |" for k, v in card.metrics.items() if not isinstance(v, (dict, list)))
    data = card.training_data if isinstance(card.training_data, str) else "\n".join(f"- {d}" for d in card.training_data)
    ens = ("" if card.self_ensemble <= 1 else
           f"\nThe model is meant to run as a self-ensemble of {card.self_ensemble} in-plane flips/rotations: after loading the "
           "weights into `network`, use `network_ensemble` (napari-restore does this by default).")
    return f"""# {card.name} {card.version}

{card.description}

- task: {card.task}; modality: {card.modality}; {card.dims}-D
- architecture: {card.architecture['name']} {json.dumps(card.architecture['args'])}
- intensity mapping (apply before the network, invert after): `{json.dumps(card.intensity)}`

## Use
With napari-restore: `napari-restore restore IN OUT --model <this folder>` or
`napari_restore.restore(volume, task="{card.task}", model="<this folder>")`.
With MONAI: build `configs/inference.json`'s `network_def` and load `models/model.pt` (a plain state_dict).{ens}

## Validation figures
| metric | value |
|---|---|
{m}

## Training data
{data}
"""


def export_bundle(model, folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` as a MONAI bundle folder (atomically).

    Args:
        model: a model folder path, an installed model's name, a ``ModelCard`` or a
            ``LoadedModel`` (:func:`napari_restore.models.load_model`).
        folder: the bundle folder to create.
        overwrite: replace an existing folder.

    Returns:
        The bundle folder.
    """
    import torch

    from ..io.atomic import atomic_dir
    from ..models import LoadedModel, load_model

    loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
    card = loaded.card
    state = {k: v.detach().to("cpu").clone() for k, v in loaded.network.state_dict().items()}
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / "configs").mkdir()
        (tmp / "models").mkdir()
        (tmp / "docs").mkdir()
        (tmp / METADATA).write_text(json.dumps(_metadata(card), indent=2) + "\n", encoding="utf-8")
        (tmp / INFERENCE).write_text(json.dumps(_inference_config(card), indent=2) + "\n", encoding="utf-8")
        (tmp / CARD).write_text(json.dumps(card.to_dict(), indent=2) + "\n", encoding="utf-8")
        torch.save(state, tmp / WEIGHTS)
        (tmp / "docs" / "README.md").write_text(_readme(card), encoding="utf-8")
        if card.license:
            (tmp / "LICENSE").write_text(card.license + "\n", encoding="utf-8")
    return folder


__all__ = ["export_bundle", "load_bundle", "read_bundle_card", "is_bundle"]
