"""npe2 writers: an image layer -> NIfTI / MHA / NRRD file, or -> a derived DICOM series.

Both rebuild the :class:`~napari_restore.volume.Volume` with :meth:`Volume.from_layer` (the
exact LPS affine and source headers of ``metadata["napari_restore"]`` when the layer has them,
else the layer's scale/translate/affine read as (S, P, L) mm) and call
:func:`napari_restore.save`. Errors are raised as :class:`~napari_restore.errors.OutputError`
naming the target, which napari shows as a notification.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OutputError
from ..io import save
from ..volume import LAYER_META_KEY, Volume

#: Files a previous DICOM export left in its folder (the only content a new export may replace).
_EXPORT_FILE = re.compile(r"IM\d{5}\.dcm")


def layer_to_volume(data: Any, attributes: dict[str, Any], target: str | os.PathLike) -> Volume:
    """The Volume behind an image layer's data and attributes (``Layer.as_layer_data_tuple``).

    Raises:
        OutputError: RGB or multiscale layers, or data that is not 2-D to 4-D.
    """
    name = attributes.get("name", "layer")
    if attributes.get("rgb"):
        raise OutputError(f"layer {name!r} is RGB; only greyscale volumes can be saved", target)
    if attributes.get("multiscale"):
        raise OutputError(f"layer {name!r} is multiscale; only single-resolution volumes can be saved", target)
    ndim = np.ndim(data)
    if ndim not in (2, 3, 4):
        raise OutputError(f"layer {name!r} has {ndim} dimensions; only 2-D to 4-D images can be saved", target)
    return Volume.from_layer(data, attributes.get("metadata"), attributes.get("scale"),
                             attributes.get("translate"), attributes.get("affine"))


def write_volume(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: ``.nii``/``.nii.gz`` (NIfTI) or ``.mha``/``.nrrd``.

    The file keeps the layer's exact patient geometry; an existing file is replaced (napari's
    save dialog asks first). Returns ``[path]``.
    """
    volume = layer_to_volume(data, attributes, path)
    return [str(save(volume, path, overwrite=True))]


def dicom_target(path: str | os.PathLike) -> Path:
    """The folder a DICOM export of ``path`` goes to: ``path`` without a ``.dcm`` suffix."""
    path = Path(path)
    if path.name.lower().endswith(".dcm"):
        stem = path.name[: -len(".dcm")]
        path = path.with_name(stem) if stem else path.parent
    return path


def write_dicom(path: str, data: Any, attributes: dict[str, Any]) -> list[str]:
    """npe2 single-layer writer: a derived DICOM series (one file per slice) in a folder.

    The folder is ``path`` without its ``.dcm`` suffix (napari appends the writer's extension).
    Only layers read from DICOM (or the sample phantom) can be exported: their
    ``metadata["napari_restore"]`` record holds the source header whose Patient/Study modules
    and Frame of Reference the new series keeps. An existing folder is replaced only when it is
    empty or holds nothing but a previous export's ``IM#####.dcm`` files. Returns ``[folder]``.

    Raises:
        OutputError: no DICOM source, not 3-D, an occupied folder, or a failed write.
    """
    folder = dicom_target(path)
    name = attributes.get("name", "layer")
    record = (attributes.get("metadata") or {}).get(LAYER_META_KEY) or {}
    if (record.get("meta") or {}).get("dicom_header") is None:
        raise OutputError(f"layer {name!r} has no DICOM source header (it was not read from DICOM), so it "
                          "cannot be exported as a derived DICOM series; save it as .nii.gz instead", folder)
    volume = layer_to_volume(data, attributes, folder)
    if volume.array.ndim != 3:
        raise OutputError(f"layer {name!r} has shape {volume.array.shape}; a DICOM series is 3-D (z, y, x)", folder)
    overwrite = False
    if folder.exists():
        if not folder.is_dir():
            raise OutputError("exists and is not a folder; choose a new folder name for the DICOM series", folder)
        others = [p.name for p in folder.iterdir() if not _EXPORT_FILE.fullmatch(p.name)]
        if others:
            raise OutputError(f"the folder exists and holds other files ({', '.join(sorted(others)[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); choose a new folder name", folder)
        overwrite = True
    return [str(save(volume, folder, format="dicom", overwrite=overwrite))]
