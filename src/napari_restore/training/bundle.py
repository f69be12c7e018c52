"""Export a model as a MONAI bundle, and load such a bundle back safely.

Layout written by :func:`export_bundle` (MONAI bundle specification)::

    <bundle>/
      configs/metadata.json          # version, changelog, monai/pytorch/numpy versions, task,
                                     # network_data_format (inputs/outputs), ...
      configs/inference.json         # for MONAI's runner (python -m monai.bundle run): weights loaded,
                                     # pre-/postprocessing, inferer, run; never evaluated by napari-restore
      configs/napari_restore_card.json   # our model card (architecture, intensity mapping, metrics)
      models/model.pt                # the plain state_dict
      docs/README.md                 # what it is, how to use it, training data and figures
      docs/data_licenses.md          # the training data and the full licence text of each public source
      LICENSE                        # the model's licence (BSD-3-Clause text for napari-restore's models)

Reading a bundle back (:func:`load_bundle`, :func:`read_bundle_card`, :func:`is_bundle`) is the model
registry's business and lives in :mod:`napari_restore.models.bundle`; they are re-exported here.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .data_licenses import TEMPLATES
from ..models.bundle import CARD, INFERENCE, METADATA, WEIGHTS, is_bundle, load_bundle, read_bundle_card

SCHEMA = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"


def _versions() -> dict[str, str]:
    import monai
    import numpy
    import torch

    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__}


#: The project's licence (the repository's LICENSE, checked by tests/test_bundle.py): a bundle's LICENSE
#: when its card's licence is BSD-3-Clause, as for every model napari-restore ships.
BSD_3_CLAUSE = TEMPLATES["BSD-3-Clause"].format(copyright="Copyright (c) 2026, napari-restore developers")



def _intensity_text(spec: dict[str, Any]) -> str:
    """The card's intensity mapping in words and a formula."""
    if spec.get("kind") == "ct":
        lo, hi = spec["clip"]
        return (f"y = (clip(HU, {lo:g}, {hi:g}) - {spec['center']:g}) / {spec['scale']:g}: a fixed mapping of Hounsfield "
                f"units; voxels outside [{lo:g}, {hi:g}] HU keep their input value after the inverse")
    if spec.get("kind") == "percentile":
        return (f"y = (x - p{spec['lower']:g}) / (p{spec['upper']:g} - p{spec['lower']:g}), the percentiles of the whole "
                f"volume (a regular subsample), so that p{spec['lower']:g} -> 0 and p{spec['upper']:g} -> 1; no clipping")
    return "none: the network takes the image's own values"


def _network_range(spec: dict[str, Any]) -> list[float]:
    """The range of the network's input (normalised units) where the mapping bounds it."""
    if spec.get("kind") == "ct":
        return [(spec["clip"][0] - spec["center"]) / spec["scale"], (spec["clip"][1] - spec["center"]) / spec["scale"]]
    return []


def _metadata(card) -> dict[str, Any]:
    from .. import __version__
    from ..intensity import validate_spec

    dims = card.dims
    spec = validate_spec(card.intensity)
    multiple = 2 ** len(card.architecture.get("args", {}).get("strides", (2, 2, 2)))
    spatial = [f"{multiple}*n"] * dims  # any size works (the network pads); multiples of its stride need no padding
    io_desc = {"type": "image", "format": "magnitude", "modality": card.modality, "num_channels": 1,
               "spatial_shape": spatial, "dtype": "float32", "value_range": _network_range(spec),
               "is_patch_data": dims == 3, "channel_def": {"0": "image"}}
    k = card.context
    in_desc = io_desc if not k else {  # 2.5-D: the slice and its neighbours, mirrored at the volume's ends
        **io_desc, "num_channels": 2 * k + 1,
        "channel_def": {str(i): f"slice z{i - k:+d}" if i != k else "slice z" for i in range(2 * k + 1)}}
    units = "HU" if spec["kind"] == "ct" else "the image's units"
    how = (f"normalised {units} ({_intensity_text(spec)}); configs/inference.json applies it "
           "(napari_restore.bundle_transforms.CardNormalized) and inverts it (CardDenormalized)")
    plane = (f"2-D slices (J, I) of the volume along its last axis K" + (f", with {k} neighbouring slice(s) on each side "
             "as channels" if k else "") if dims == 2 else "3-D patches (K, J, I)")
    return {
        "schema": SCHEMA,
        "version": card.version,
        "changelog": {card.version: f"exported by napari-restore {__version__}"},
        **_versions(),
        "required_packages_version": {"napari-restore": __version__},
        "name": card.name,
        "task": f"{card.task} {card.modality} images ({dims}-D)",
        "description": (card.description or f"{card.task} model for {card.modality}") +
                       f" The network takes {plane}; configs/inference.json restores whole NIfTI volumes.",
        "authors": "napari-restore developers",
        "copyright": "Copyright (c) 2026, napari-restore developers",
        "license": card.license or "see LICENSE",
        "data_source": card.training_data if isinstance(card.training_data, str) else "; ".join(map(str, card.training_data)),
        "data_type": "dicom/nifti",
        "intended_use": "Research use: image restoration of medical images; not for diagnosis.",
        "eval_metrics": {k: v for k, v in card.metrics.items() if isinstance(v, (int, float))},
        "intensity_mapping": {**spec, "description": _intensity_text(spec)},
        "network_data_format": {
            "inputs": {"image": {**in_desc, "note": f"network units: {how}"}},
            "outputs": {"pred": {**io_desc, "note": "network units (as the input); the inverse mapping gives " + units}},
        },
    }


def _inference_config(card) -> dict[str, Any]:
    """``configs/inference.json``: load, normalise, infer, invert, save, for ``python -m monai.bundle run``."""
    dims, k = card.dims, card.context
    if dims == 2:
        inferer = {"_target_": "napari_restore.bundle_transforms.SliceStackInferer", "context": k, "batch_size": 8}
    else:
        roi = list(card.patch_size or [64, 128, 128])
        inferer = {"_target_": "napari_restore.bundle_transforms.ReversedAxesSlidingWindowInferer", "roi_size": roi,
                   "sw_batch_size": 1, "overlap": 0.25, "mode": "gaussian", "padding_mode": "replicate"}
    cfg: dict[str, Any] = {
        # "import a.b" binds "a.b" in MONAI's parser, not "a": the package first, then its modules
        "imports": ["$import numpy", "$import torch", "$import napari_restore", "$import napari_restore.bundle_transforms",
                    "$import napari_restore.networks"],
        "bundle_root": f"$napari_restore.bundle_transforms.find_bundle_root({card.name!r}, {card.version!r})",
        "dataset_dir": "$@bundle_root + '/sample'",
        "output_dir": "$@bundle_root + '/eval'",
        "output_postfix": card.task,
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "intensity": card.intensity,
        "ckpt_path": "$@bundle_root + '/models/model.pt'",
        "network_def": {"_target_": "napari_restore.networks.ResidualUNet", **card.architecture["args"]},
        "network": "$napari_restore.bundle_transforms.load_network(@network_def, @ckpt_path, @device)",
        "predictor": "@network",
        "datalist": "$napari_restore.bundle_transforms.list_images(@dataset_dir)",
        "preprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "LoadImaged", "keys": "image", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "EnsureTyped", "keys": "image", "dtype": "$torch.float32"},
            {"_target_": "napari_restore.bundle_transforms.CardNormalized", "keys": "image", "intensity": "@intensity"},
        ]},
        "dataset": {"_target_": "Dataset", "data": "$[{'image': f} for f in @datalist]", "transform": "@preprocessing"},
        "inferer": inferer,
        "postprocessing": {"_target_": "Compose", "transforms": [
            {"_target_": "napari_restore.bundle_transforms.CardDenormalized", "keys": "pred", "source_key": "image"},
            {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_postfix": "@output_postfix",
             "output_ext": ".nii.gz", "output_dtype": "$numpy.float32", "resample": False, "separate_folder": False,
             "print_log": True},
        ]},
        "run": ["$napari_restore.bundle_transforms.run_inference(@dataset, @predictor, @inferer, @postprocessing, @device)"],
        "note": "napari-restore itself reads only metadata.json and napari_restore_card.json; this file is for MONAI's "
                "runner: python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN --output_dir OUT",
    }
    if card.self_ensemble > 1:  # the card's default: run the loaded network through the same self-ensemble
        cfg["self_ensemble"] = card.self_ensemble
        cfg["network_ensemble"] = f"$napari_restore.networks.SelfEnsemble(@network, {card.self_ensemble}).eval()"
        cfg["predictor"] = "@network_ensemble"
    return cfg


def _data_licenses(card) -> str:
    """``docs/data_licenses.md``: the card's training data and the full licence text of each public source."""
    lines = card.training_data if isinstance(card.training_data, list) else [str(card.training_data)]
    parts = ["# Training data and its licences", "",
             f"`{card.name}` {card.version} was trained on the data below (as its model card says). The licence of "
             "each public source follows in full; keep these attributions wherever the weights go.", ""]
    parts += [f"- {line}" for line in lines if line] + [""]
    from .data_licenses import licence_text, sources_named

    texts = sources_named([str(line) for line in lines])
    for src in texts:
        parts += [f"## {src.name} ({src.spdx})", "", src.url, "", "```text", licence_text(src), "```", ""]
    if not texts:
        parts += ["No public source this package knows of is named: the licences of your own training data apply.", ""]
    return "\n".join(parts)


def _license_text(card) -> str:
    """The bundle's ``LICENSE``: the full BSD-3-Clause text for napari-restore's models, else the card's statement."""
    lic = (card.license or "").strip()
    if lic.startswith("BSD-3-Clause"):
        note = f"\nModel card licence statement: {lic}\nTraining data licences: docs/data_licenses.md\n"
        return BSD_3_CLAUSE + note
    return (f"{lic or 'No licence was stated for this model.'}\n\nTraining data licences: docs/data_licenses.md\n")


def _readme(card) -> str:
    from ..intensity import validate_spec

    m = "\n".join(f"| {k} | {v} |" for k, v in card.metrics.items() if not isinstance(v, (dict, list)))
    data = card.training_data if isinstance(card.training_data, str) else "\n".join(f"- {d}" for d in card.training_data)
    ens = ("" if card.self_ensemble <= 1 else
           f"\nThe model runs as a self-ensemble of {card.self_ensemble} in-plane flips/rotations (`network_ensemble`, "
           "the config's `predictor`), as napari-restore does by default; set `--predictor @network` for one pass.")
    return f"""# {card.name} {card.version}

{card.description}

- task: {card.task}; modality: {card.modality}; {card.dims}-D
- architecture: {card.architecture['name']} {json.dumps(card.architecture['args'])}
- intensity mapping (applied before the network, inverted after): {_intensity_text(validate_spec(card.intensity))}

## Use
With MONAI alone (plus napari-restore's transforms, `pip install napari-restore`): restore every NIfTI/MHA/NRRD
file of a folder,

```bash
python -m monai.bundle run --config_file configs/inference.json --dataset_dir IN_FOLDER --output_dir OUT_FOLDER
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.json
```

The pipeline: LoadImaged, EnsureChannelFirstd, CardNormalized (the card's intensity mapping), a slice-wise
(2-D/2.5-D) or sliding-window (3-D) inferer, CardDenormalized (the exact inverse) and SaveImaged
(`<name>_{card.task}.nii.gz`, the input's geometry).{ens}

With napari-restore: `napari-restore restore IN OUT --model <this folder>` or
`napari_restore.restore(volume, task="{card.task}", model="<this folder>")` (reads only metadata.json and the card).

## Validation figures
| metric | value |
|---|---|
{m}

## Training data
{data}

Licences: [data_licenses.md](data_licenses.md); the model's own: ../LICENSE.
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
        (tmp / "docs" / "data_licenses.md").write_text(_data_licenses(card), encoding="utf-8")
        (tmp / "LICENSE").write_text(_license_text(card), encoding="utf-8")
    return folder


__all__ = ["export_bundle", "load_bundle", "read_bundle_card", "is_bundle"]
