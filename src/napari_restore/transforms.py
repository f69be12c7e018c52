"""MONAI transforms over :func:`napari_restore.inference.restore`.

Array transforms :class:`Denoise`, :class:`Deblur`, :class:`EnhanceEdges`, :class:`Restore` take a
channel-first image ``(C, I, J, K)`` (or ``(C, H, W)``) as a numpy array, a torch tensor or a
MONAI ``MetaTensor``, restore every channel on its own, and return the same type, shape and
dtype float32; a ``MetaTensor`` keeps its meta and affine. Dictionary forms :class:`Denoised`,
:class:`Deblurd`, :class:`EnhanceEdgesd`, :class:`Restored` apply them to ``keys``.

Options: every transform takes the fields of :class:`~napari_restore.options.RestoreOptions`
but ``task`` (the class says it) as keyword arguments, or ``options=`` a RestoreOptions (the
keyword arguments override it), plus ``modality`` for images whose meta does not say.

Geometry: MONAI holds ``(i, j, k)`` with a RAS affine (``meta["space"] == "RAS"``, the default
of ``LoadImage``) or an LPS one; a Volume holds ``(k, j, i)`` with an LPS affine. 2-D mode
therefore runs slice by slice along MONAI's last spatial axis ``k`` (the Volume's axis 0, the
acquisition axis of an axial NIfTI). :func:`volume_from_image` does the conversion.

Example::

    from monai.transforms import Compose, LoadImaged
    from napari_restore.transforms import Denoised
    pipeline = Compose([LoadImaged("image", image_only=False, ensure_channel_first=True),
                        Denoised("image", model="path/to/model", modality="CT")])
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_data_type, convert_to_dst_type

from .errors import InputError
from .options import RestoreOptions, with_option_parameters
from .volume import Volume

_FLIP_XY = np.diag([-1.0, -1.0, 1.0, 1.0])
_REVERSE_INDEX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def _lps_affine(img: Any) -> np.ndarray:
    """4x4 LPS affine over ``(k, j, i)`` from a MetaTensor's affine over ``(i, j, k)``."""
    if not isinstance(img, MetaTensor):
        return np.eye(4)
    aff = np.asarray(img.affine.detach().cpu().numpy() if torch.is_tensor(img.affine) else img.affine,
                     dtype=np.float64)
    if aff.shape == (3, 3):  # 2-D image: (i, j) -> (x, y); embed with a unit k axis
        full = np.eye(4)
        full[:2, :2], full[:2, 3] = aff[:2, :2], aff[:2, 2]
        aff = full
    if aff.shape != (4, 4):
        return np.eye(4)
    space = str(img.meta.get("space", "RAS")).upper()
    lps = aff if space == "LPS" else _FLIP_XY @ aff
    return lps @ _REVERSE_INDEX


def volume_from_image(img: NdarrayOrTensor, channel: int = 0, modality: str | None = None) -> Volume:
    """A Volume ``(k, j, i)`` in LPS from one channel of a channel-first MONAI image.

    ``modality``: ``"CT"``/``"MR"``; ``None`` reads ``meta["modality"]`` and otherwise guesses
    as :func:`napari_restore.load` does for NIfTI (CT when the values look like HU).
    """
    arr = convert_data_type(img, np.ndarray, dtype=np.float32)[0]
    if arr.ndim not in (3, 4):
        raise InputError(f"expected a channel-first image (C, I, J[, K]), got shape {tuple(arr.shape)}")
    data = arr[channel].T  # (i, j, k) -> (k, j, i), a view
    if data.ndim == 2:
        data = data[None]
    if modality is None and isinstance(img, MetaTensor):
        modality = img.meta.get("modality")
    if modality is None:
        from .io.nifti import _guess_modality

        modality = _guess_modality(data)
    return Volume(data, _lps_affine(img), str(modality))


class _RestoreTransform(Transform):
    """Base: restore each channel with :func:`napari_restore.inference.restore` (see module doc)."""

    backend = [TransformBackends.TORCH, TransformBackends.NUMPY]
    task = "denoise"

    @with_option_parameters(exclude=("task",))
    def __init__(self, options: RestoreOptions | Mapping[str, Any] | None = None, *, modality: str | None = None,
                 **restore_options: Any) -> None:
        """``options`` and ``**restore_options``: see :class:`~napari_restore.options.RestoreOptions`
        (``task`` is the class's); ``modality``: ``"CT"``/``"MR"`` when the image's meta does not say."""
        if "task" in restore_options:
            raise TypeError(f"{type(self).__name__} sets the task itself ({self.task!r}); use another transform")
        self.options = RestoreOptions.build(options, **restore_options, task=self.task)
        self.modality = modality

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        """``img``: ``(C, I, J, K)`` or ``(C, H, W)``, physical units; returns the same type/shape."""
        from .inference import restore

        arr = convert_data_type(img, np.ndarray, dtype=np.float32)[0]
        out = np.empty(arr.shape, dtype=np.float32)
        for c in range(arr.shape[0]):
            vol = volume_from_image(img, c, self.modality)
            res = restore(vol, options=self.options)
            r = res.array[0] if arr.ndim == 3 else res.array
            out[c] = r.T
        return convert_to_dst_type(out, img, dtype=torch.float32 if torch.is_tensor(img) else np.float32)[0]


class Denoise(_RestoreTransform):
    """Denoise a channel-first image with a trained model (``model=None``: the best installed)."""

    task = "denoise"


class Deblur(_RestoreTransform):
    """Deblur a channel-first image with a trained model."""

    task = "deblur"


class EnhanceEdges(_RestoreTransform):
    """Enhance edges without amplifying noise (a trained model, else noise-aware unsharp masking)."""

    task = "enhance"


class Restore(_RestoreTransform):
    """The pipeline denoise -> deblur -> enhance; steps without a model are skipped.

    ``model`` may be a dict ``{"denoise": ..., "deblur": ..., "enhance": ...}``.
    """

    task = "restore"


class _RestoreTransformd(MapTransform):
    """Dictionary form: apply the array transform to every key in ``keys``."""

    backend = _RestoreTransform.backend
    array_cls: type[_RestoreTransform] = Denoise

    @with_option_parameters(exclude=("task",))
    def __init__(self, keys: KeysCollection, options: RestoreOptions | Mapping[str, Any] | None = None, *,
                 modality: str | None = None, allow_missing_keys: bool = False, **restore_options: Any) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = self.array_cls(options, modality=modality, **restore_options)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class Denoised(_RestoreTransformd):
    """Dictionary form of :class:`Denoise`."""

    array_cls = Denoise


class Deblurd(_RestoreTransformd):
    """Dictionary form of :class:`Deblur`."""

    array_cls = Deblur


class EnhanceEdgesd(_RestoreTransformd):
    """Dictionary form of :class:`EnhanceEdges`."""

    array_cls = EnhanceEdges


class Restored(_RestoreTransformd):
    """Dictionary form of :class:`Restore`."""

    array_cls = Restore


DenoiseD = DenoiseDict = Denoised
DeblurD = DeblurDict = Deblurd
EnhanceEdgesD = EnhanceEdgesDict = EnhanceEdgesd
RestoreD = RestoreDict = Restored

__all__ = ["Denoise", "Deblur", "EnhanceEdges", "Restore", "Denoised", "Deblurd", "EnhanceEdgesd",
           "Restored", "DenoiseD", "DenoiseDict", "DeblurD", "DeblurDict", "EnhanceEdgesD",
           "EnhanceEdgesDict", "RestoreD", "RestoreDict", "volume_from_image"]
