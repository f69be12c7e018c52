"""MONAI components that a bundle exported by napari-restore instantiates from ``configs/inference.json``.

A bundle (:func:`napari_restore.training.bundle.export_bundle`) restores NIfTI files with MONAI's own
runner::

    python -m monai.bundle run --config_file BUNDLE/configs/inference.json \\
        --dataset_dir IN_FOLDER --output_dir OUT_FOLDER

and needs only MONAI and this package for it (no napari). The pipeline is::

    LoadImaged -> EnsureChannelFirstd -> CardNormalized            (physical units -> network units)
    SliceStackInferer (2-D / 2.5-D) or ReversedAxesSlidingWindowInferer (3-D)
    CardDenormalized -> SaveImaged                                 (network units -> physical units)

and gives what :func:`napari_restore.restore` gives for the same file, model and self-ensemble
(``tests/test_bundle.py`` states the tolerance).

Axes: MONAI holds an image as ``(C, I, J, K)``; napari-restore's networks were trained on slices
``(J, I)`` along ``K`` (a :class:`~napari_restore.volume.Volume` is ``(K, J, I)``), so the inferers
here transpose in-plane and run along ``K``, exactly as :func:`~napari_restore.restore` does.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.inferers import Inferer, SlidingWindowInferer
from monai.transforms import MapTransform
from monai.utils import convert_data_type, convert_to_dst_type

from .intensity import Normalizer, validate_spec
from .networks import mirror_indices

#: Suffixes of the extra keys :class:`CardNormalized` writes next to ``key``.
PHYSICAL, PARAMS = "physical", "intensity"


class CardNormalized(MapTransform):
    """Map ``keys`` from physical units to a model's network units (its card's ``intensity``).

    ``y = (clip(x, lo, hi) - offset) / scale`` per channel, with ``offset``/``scale`` fixed for CT
    (``{"kind": "ct", ...}``: HU) or fitted on the whole channel for percentiles (MR), as
    :class:`napari_restore.intensity.Normalizer` does. The input is kept under ``<key>_physical``
    and the fitted parameters under ``<key>_intensity`` for :class:`CardDenormalized`.

    Args:
        keys: image keys, channel-first ``(C, I, J[, K])``.
        intensity: the model card's ``intensity`` dict (see :mod:`napari_restore.intensity`).
    """

    def __init__(self, keys: KeysCollection, intensity: Mapping[str, Any], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.intensity = validate_spec(dict(intensity))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            arr = convert_data_type(img, np.ndarray, dtype=np.float32)[0]
            # fitted on each channel as restore() fits a Volume (k, j, i): the same voxels either way
            norms = [Normalizer.fit(self.intensity, arr[c]) for c in range(arr.shape[0])]
            out = np.stack([n.forward(arr[c]) for c, n in enumerate(norms)])
            d[f"{key}_{PHYSICAL}"] = img
            d[f"{key}_{PARAMS}"] = [{"offset": n.offset, "scale": n.scale, "lo": n.lo, "hi": n.hi} for n in norms]
            d[key] = convert_to_dst_type(out, img, dtype=torch.float32 if torch.is_tensor(img) else np.float32)[0]
        return d


class CardDenormalized(MapTransform):
    """Map ``keys`` (network output) back to physical units: the exact inverse of :class:`CardNormalized`.

    ``x = y * scale + offset``; voxels whose input lay outside the clip range (CT padding, metal)
    get their input value back. The result carries the input image's meta (affine, file name), so
    ``SaveImaged`` writes it with the input's geometry.

    Args:
        keys: output keys (e.g. ``"pred"``), shaped like the input image.
        source_key: the key :class:`CardNormalized` normalised (its ``_physical``/``_intensity`` are read).
    """

    def __init__(self, keys: KeysCollection, source_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.source_key = source_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        original = d[f"{self.source_key}_{PHYSICAL}"]
        params = d[f"{self.source_key}_{PARAMS}"]
        src = convert_data_type(original, np.ndarray, dtype=np.float32)[0]
        for key in self.key_iterator(d):
            y = convert_data_type(d[key], np.ndarray, dtype=np.float32)[0].reshape(src.shape)
            out = np.empty_like(src)
            for c, p in enumerate(params):
                out[c] = y[c] * np.float32(p["scale"]) + np.float32(p["offset"])
                outside = (src[c] < p["lo"]) | (src[c] > p["hi"])
                np.copyto(out[c], src[c], where=outside)
            d[key] = convert_to_dst_type(out, original, dtype=torch.float32 if torch.is_tensor(original) else np.float32)[0]
        return d


class SliceStackInferer(Inferer):
    """Run a 2-D network slice by slice along the last spatial axis of ``(B, C, I, J, K)``.

    Each slice goes to the network as ``(J, I)`` (a napari-restore Volume's row/column order),
    with ``context`` neighbouring slices on each side as extra input channels for 2.5-D networks
    (mirrored at the volume's ends, as in training and :func:`napari_restore.restore`). A 2-D
    image ``(B, C, I, J)`` is one slice. Output: ``(B, 1, I, J[, K])`` per input channel stacked.

    Args:
        context: neighbouring slices on each side (the card's ``context``; 0 for 2-D networks).
        batch_size: slices per forward pass.
    """

    def __init__(self, context: int = 0, batch_size: int = 8) -> None:
        super().__init__()
        self.context, self.batch_size = int(context), max(1, int(batch_size))

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else torch.as_tensor(inputs)
        flat = x.ndim == 4
        if flat:
            x = x[..., None]
        if x.ndim != 5:
            raise ValueError(f"SliceStackInferer needs (B, C, I, J[, K]) input, got {tuple(x.shape)}")
        out = torch.empty_like(x, dtype=torch.float32)
        k, nz = self.context, x.shape[-1]
        with torch.no_grad():
            for b in range(x.shape[0]):
                for c in range(x.shape[1]):
                    vol = x[b, c].permute(2, 1, 0).float()  # (I, J, K) -> (K, J, I)
                    res = torch.empty_like(vol)
                    for z in range(0, nz, self.batch_size):
                        n = min(self.batch_size, nz - z)
                        if k:
                            idx = torch.from_numpy(mirror_indices(z - k, n + 2 * k, nz)).to(vol.device)
                            xn = vol[idx].unfold(0, 2 * k + 1, 1).permute(0, 3, 1, 2).contiguous()
                        else:
                            xn = vol[z:z + n, None]
                        res[z:z + n] = network(xn, *args, **kwargs)[:, 0].float()
                    out[b, c] = res.permute(2, 1, 0)
        out = out[..., 0] if flat else out
        return convert_to_dst_type(out, inputs)[0] if torch.is_tensor(inputs) else out


class ReversedAxesSlidingWindowInferer(SlidingWindowInferer):
    """MONAI's ``SlidingWindowInferer`` over ``(B, C, K, J, I)``: a 3-D napari-restore network's axes.

    ``roi_size`` is given as ``(z, y, x)`` (the card's ``patch_size``), i.e. ``(K, J, I)``. The
    input ``(B, C, I, J, K)`` is permuted before and the output back after.
    """

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        x = inputs.as_tensor() if hasattr(inputs, "as_tensor") else torch.as_tensor(inputs)
        with torch.no_grad():
            y = super().__call__(x.permute(0, 1, 4, 3, 2).contiguous(), network, *args, **kwargs)
        y = y.permute(0, 1, 4, 3, 2)
        return convert_to_dst_type(y, inputs)[0] if torch.is_tensor(inputs) else y


def load_network(network: torch.nn.Module, path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """``network`` with the weights of ``path`` (a plain state_dict, read with ``weights_only=True``), in eval mode."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    network.load_state_dict(state, strict=True)
    return network.to(device).eval()


def find_bundle_root(name: str | None = None, version: str | None = None) -> str:
    """The folder of the bundle being run: the working folder or an entry of ``sys.path`` that holds
    ``configs/metadata.json`` (of ``name``/``version`` when given); ``"."`` when none does.

    MONAI's runner puts the bundle's folder on ``sys.path`` before it runs the config, so
    ``python -m monai.bundle run --config_file BUNDLE/configs/inference.json`` finds the weights
    from any working folder; ``--bundle_root`` still overrides it.
    """
    for entry in [os.getcwd(), *sys.path]:
        folder = Path(entry or ".")
        meta = folder / "configs" / "metadata.json"
        if not meta.is_file() or not (folder / "configs" / "napari_restore_card.json").is_file():
            continue
        try:
            info = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (name is None or info.get("name") == name) and (version is None or str(info.get("version")) == version):
            return str(folder)
    return "."


def list_images(folder: str | os.PathLike) -> list[str]:
    """The NIfTI, MHA and NRRD files directly in ``folder`` (or ``folder`` itself when it is a file), sorted."""
    p = Path(folder)
    if p.is_file():
        return [str(p)]
    suffixes = (".nii", ".nii.gz", ".mha", ".nrrd")
    return sorted(str(f) for f in p.iterdir() if f.is_file() and f.name.lower().endswith(suffixes))


def run_inference(dataset: Iterable[Mapping[Hashable, Any]], network: Callable[..., torch.Tensor], inferer: Inferer,
                  postprocessing: Callable[[dict], Any], device: str | torch.device = "cpu",
                  image_key: str = "image", pred_key: str = "pred") -> int:
    """The bundle's ``run``: each item of ``dataset`` through ``inferer(network)`` and ``postprocessing``.

    One volume at a time (no collation, so each keeps its own size and meta). Returns how many were done.
    """
    done = 0
    for item in dataset:
        x = item[image_key][None].to(device)
        pred = inferer(x, network)[0].cpu()
        postprocessing({**item, pred_key: pred})
        done += 1
    return done


__all__ = ["CardNormalized", "CardDenormalized", "SliceStackInferer", "ReversedAxesSlidingWindowInferer",
           "load_network", "find_bundle_root", "list_images", "run_inference"]
