"""Image layers <-> Volumes for the widget: geometry kept, input never modified.

Works on napari layer objects (duck-typed: ``data``, ``metadata``, ``scale``, ``translate``,
``rotate``, ``shear``, ``affine``, ``contrast_limits``, ``colormap``, ``name``) but imports no
napari, so the helpers are easy to test.
"""
from __future__ import annotations

import copy
import datetime as _dt
from typing import Any

import numpy as np

from ..errors import InputError
from ..volume import LAYER_META_KEY, Volume


def record_of(layer: Any) -> dict[str, Any] | None:
    """The layer's ``metadata["napari_restore"]`` record, or None."""
    rec = (getattr(layer, "metadata", None) or {}).get(LAYER_META_KEY)
    return rec if isinstance(rec, dict) else None


def layer_modality(layer: Any) -> str:
    """``"CT"``, ``"MR"``, ... from the record, else ``"OT"``."""
    rec = record_of(layer)
    return str(rec.get("modality", "OT")).upper() if rec else "OT"


def check_image_layer(layer: Any) -> None:
    """Raise :class:`InputError` for layers the engine cannot restore (RGB, multiscale, 1-D, 5-D+)."""
    name = getattr(layer, "name", "layer")
    if getattr(layer, "rgb", False):
        raise InputError(f"layer {name!r} is RGB; only greyscale CT/MR images can be restored")
    if getattr(layer, "multiscale", False):
        raise InputError(f"layer {name!r} is multiscale; open the full-resolution image instead")
    if layer.ndim not in (2, 3, 4):
        raise InputError(f"layer {name!r} has {layer.ndim} dimensions; 2-D, 3-D and 3-D+time images can be restored")


def layer_volume(layer: Any, modality: str | None = None) -> Volume:
    """The :class:`Volume` behind an image layer (a 2-D layer becomes one slice).

    The layer's data is read, never written (``np.asarray`` of float32 data is a view; the
    engine only reads it). ``modality`` overrides the record's (for layers of unknown origin).
    """
    check_image_layer(layer)
    data = np.asarray(layer.data)
    if data.ndim == 2:
        data = data[None]
    rec = record_of(layer)
    meta = layer.metadata if rec is not None else None
    vol = Volume.from_layer(data, meta, np.ones(data.ndim), None, data_to_world(layer, data.ndim))
    if rec is None:
        vol.meta.setdefault("description", layer.name)
    if modality and modality != "auto":
        vol.modality = modality.upper()
    return vol


def _physical(layer: Any) -> np.ndarray:
    """``(ndim+1)^2`` data->physical matrix: translate o rotate o shear o scale (napari's order)."""
    from napari.utils.transforms import Affine

    return np.asarray(Affine(scale=layer.scale, translate=layer.translate, rotate=layer.rotate,
                             shear=layer.shear, ndim=layer.ndim).affine_matrix, dtype=np.float64)


def data_to_world(layer: Any, ndim: int | None = None) -> np.ndarray:
    """The layer's full data->world matrix (``affine`` after scale, shear, rotate, translate).

    Padded with leading identity axes to ``ndim`` (a 2-D layer read as one slice).
    """
    n = layer.ndim
    m = np.asarray(layer.affine.affine_matrix, dtype=np.float64) @ _physical(layer)
    ndim = ndim or n
    if ndim > n:
        full = np.eye(ndim + 1)
        full[-(n + 1):, -(n + 1):] = m
        m = full
    return m


def data_linear(layer: Any) -> np.ndarray:
    """The layer's data->physical linear part (rotate, shear, scale; without ``affine``)."""
    return _physical(layer)[:-1, :-1]


def output_name(layer_name: str, tasks: str, modality: str) -> str:
    """``"CT 1mm [denoise-ct]"``: the input's name and the task (and modality when known)."""
    tag = tasks if modality in ("OT", "", None) else f"{tasks}-{modality.lower()}"
    return f"{layer_name} [{tag}]"


def output_layer_data(layer: Any, result: Volume) -> np.ndarray:
    """The restored array laid out exactly like the input layer's data."""
    if record_of(layer) is not None:
        out = result.layer_data()
    else:
        out = result.array
    return np.ascontiguousarray(out).reshape(np.shape(layer.data))


def output_layer_kwargs(layer: Any, result: Volume, name: str) -> dict[str, Any]:
    """napari ``Image`` keyword arguments for the restored layer.

    The input's scale/translate/rotate/shear/affine, contrast limits and colour map, and a
    ``metadata["napari_restore"]`` record: the result's geometry and meta (with its provenance),
    plus ``source`` (the input layer's name, file and series) and ``provenance`` (the last step:
    model, version, strength, mode, device, time).
    """
    record = result.layer_record()
    src_rec = record_of(layer) or {}
    src_meta = src_rec.get("meta", {}) if src_rec else {}
    record["source"] = {"layer": layer.name, "path": src_meta.get("source_path"),
                        "series_uid": src_meta.get("series_uid"), "description": src_meta.get("description")}
    prov = list(result.meta.get("provenance", []))
    record["provenance"] = copy.deepcopy(prov[-1]) if prov else {}
    if src_rec.get("layer_axes") is not None:
        record["layer_axes"] = src_rec["layer_axes"]
    return {
        "name": name,
        "scale": np.asarray(layer.scale).copy(),
        "translate": np.asarray(layer.translate).copy(),
        "rotate": np.asarray(layer.rotate).copy(),
        "shear": np.asarray(layer.shear).copy(),
        "affine": np.asarray(layer.affine.affine_matrix).copy(),
        "contrast_limits": tuple(float(c) for c in layer.contrast_limits),
        "colormap": layer.colormap.name,
        "metadata": {LAYER_META_KEY: record},
        "rgb": False,
    }


# --------------------------------------------------------------------------- one slice
def plane_subvolume(volume: Volume, layer_axes: tuple[int, ...], layer_axis: int, index: int,
                    time_index: int = 0, slab: int = 0) -> tuple[Volume, int]:
    """A Volume holding the displayed plane (and ``slab`` planes either side) of a layer.

    Args:
        volume: the layer's Volume (its own axis order).
        layer_axes: the record's ``layer_axes`` (layer spatial axis d = volume axis layer_axes[d]).
        layer_axis: the spatial layer axis (0..2) that is *not* displayed (the slicing axis).
        index: the current index along it.
        time_index: the time point of a 4-D volume.
        slab: extra planes either side (for 3-D models).

    Returns:
        ``(sub, centre)``: a 3-D Volume whose axis 0 is the slicing axis and whose in-plane axes
        are in the layer's display order, and the position of the current plane in it.
    """
    arr = volume.array if volume.array.ndim == 3 else volume.array[time_index]
    v = int(layer_axes[layer_axis])
    others = [int(layer_axes[d]) for d in range(3) if d != layer_axis]
    perm = [v, *others]
    moved = np.transpose(arr, perm)
    lo, hi = max(0, index - slab), min(moved.shape[0], index + slab + 1)
    aff = volume.affine[:, [*perm, 3]].copy()
    aff[:3, 3] += lo * aff[:3, 0]
    meta = {k: val for k, val in volume.meta.items() if k not in ("source_sops", "dicom_header")}
    return Volume(np.ascontiguousarray(moved[lo:hi]), aff, volume.modality, meta), index - lo


def preview_plane_note(volume: Volume, volume_axis: int, index: int) -> str:
    """Which plane a preview restores, and whether Restore volume works along it.

    ``volume_axis``: the Volume axis the viewer slices along (0 = the acquisition slices).
    """
    planes = {"axial": 0, "coronal": 1, "sagittal": 2}
    acq = volume.acquisition_plane
    if volume_axis == 0:
        return f"{acq} slice {index + 1} (the acquisition plane, as Restore volume)"
    others = [p for p in planes if p != acq]
    # the in-plane axes of the volume: axis 1 (rows) and 2 (columns), whichever patient plane they cut
    col = volume.affine[:3, volume_axis]
    lps = int(np.argmax(np.abs(col)))  # 0 L, 1 P, 2 S: the slicing direction of this view
    shown = {0: "sagittal", 1: "coronal", 2: "axial"}[lps]
    shown = shown if shown in others else others[0]
    return (f"{shown} plane {index + 1}, across the {acq} acquisition slices: Restore volume works on the "
            f"{acq} slices, so its result here can differ from this preview")


def preview_layer_kwargs(layer: Any, name: str, lead_index: dict[int, int], linear: np.ndarray,
                         meta: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for a one-plane preview layer placed where the plane is in the world.

    ``lead_index``: {layer data axis: index} of the non-displayed axes (their size becomes 1);
    ``linear``: the layer's data->physical linear matrix (rotate @ shear @ scale), used to shift
    ``translate`` by the plane's offset.
    """
    shift = np.zeros(layer.ndim)
    for axis, idx in lead_index.items():
        shift += linear[:, axis] * idx
    return {
        "name": name,
        "scale": np.asarray(layer.scale).copy(),
        "translate": np.asarray(layer.translate) + shift,
        "rotate": np.asarray(layer.rotate).copy(),
        "shear": np.asarray(layer.shear).copy(),
        "affine": np.asarray(layer.affine.affine_matrix).copy(),
        "contrast_limits": tuple(float(c) for c in layer.contrast_limits),
        "colormap": layer.colormap.name,
        "metadata": {LAYER_META_KEY + "_preview": meta},
        "rgb": False,
    }


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
