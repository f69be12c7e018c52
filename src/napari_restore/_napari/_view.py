"""How the viewer shows patient space: a series in its own plane, superior or anterior up.

World coordinates stay patient millimetres in (S, P, L) order (see DESIGN.md), so series of one
study overlay; only the view changes:

* :func:`show_acquisition_plane` puts the series' slicing axis on the slider, so a sagittal
  series shows its sagittal slices (``dims.order`` (L, S, P)) and a coronal one its coronal
  slices ((P, S, L)); an axial series keeps (S, P, L).
* :func:`keep_patient_upright` turns the 2-D camera so that S points up whenever S is the
  vertical screen axis (sagittal and coronal views, reformatted ones too) and P points down
  (anterior up) when P is; the horizontal axis keeps napari's left-to-right, which puts the
  patient's left on the right of an axial or coronal view (radiological convention).
* :func:`install` does both for a viewer, once: every napari-restore layer added later opens in
  its acquisition plane when it is the first image in the viewer.
"""
from __future__ import annotations

import weakref
from typing import Any

import numpy as np

from ..geometry import acquisition_plane
from ._layers import record_of

#: world axes of the last three viewer dimensions: (S, P, L)
_S, _P, _L = -3, -2, -1
#: the displayed (vertical, horizontal) world axes and the slider axis of each plane
PLANE_ORDER = {"axial": (_S, _P, _L), "coronal": (_P, _S, _L), "sagittal": (_L, _S, _P)}
_installed: "weakref.WeakSet[Any]" = weakref.WeakSet()


def layer_plane(layer: Any) -> str | None:
    """The acquisition plane of a napari-restore layer (``None`` for other layers)."""
    rec = record_of(layer)
    if not rec or "affine_lps" not in rec:
        return None
    return acquisition_plane(np.asarray(rec["affine_lps"], float))


def plane_order(ndim: int, plane: str) -> tuple[int, ...]:
    """``dims.order`` for ``ndim`` viewer dimensions that shows ``plane`` (leading axes first)."""
    lead = list(range(ndim - 3))
    return tuple(lead + [ndim + a for a in PLANE_ORDER[plane]])


def displayed_plane(viewer: Any) -> str | None:
    """``axial``, ``coronal`` or ``sagittal``: the patient plane on screen in 2-D (else ``None``)."""
    dims = viewer.dims
    if dims.ndisplay != 2 or dims.ndim < 3:
        return None
    slider = dims.order[-3] - dims.ndim
    return {_S: "axial", _P: "coronal", _L: "sagittal"}.get(slider)


def keep_patient_upright(viewer: Any) -> None:
    """Camera: S up when S is vertical on screen, P down (anterior up) when P is (2-D only)."""
    dims = viewer.dims
    if dims.ndisplay != 2 or dims.ndim < 3:
        return
    vertical = dims.order[-2] - dims.ndim
    want = ("up" if vertical == _S else "down", "right")
    if tuple(str(v) for v in viewer.camera.orientation2d) != want:
        viewer.camera.orientation2d = want


def show_acquisition_plane(viewer: Any, layer: Any) -> None:
    """Show ``layer``'s acquisition plane (its slices) with the patient upright."""
    plane = layer_plane(layer)
    if plane is None or viewer.dims.ndim < 3 or getattr(layer, "ndim", 0) < 3:
        return  # a 2-D layer (a single plane) has no slicing axis to choose
    order = plane_order(viewer.dims.ndim, plane)
    if not _aligned(layer, order[-3] - viewer.dims.ndim):
        keep_patient_upright(viewer)  # napari cannot slice a strongly oblique series across: leave the view
        return
    if tuple(viewer.dims.order) != order:
        viewer.dims.order = order
        keep_patient_upright(viewer)
        slider = order[-3]
        ext = np.asarray(layer.extent.world, float)  # (2, ndim): the middle slice of the new slider
        k = slider - (viewer.dims.ndim - ext.shape[1])
        if 0 <= k < ext.shape[1]:
            viewer.dims.set_point(slider, float(ext[:, k].mean()))
        viewer.reset_view()
    keep_patient_upright(viewer)


def _aligned(layer: Any, world_axis: int, min_cos: float = 0.9) -> bool:
    """Whether the layer's data axis along ``world_axis`` (-3, -2, -1: S, P, L) runs within ~25
    degrees of it: napari slices such an axis cleanly, a strongly oblique one it draws blank."""
    a = np.asarray(layer.affine.affine_matrix, float)
    if a.shape[0] < 4:
        return False
    a = a[-4:-1, -4:-1]
    col = a[:, world_axis] / np.linalg.norm(a[:, world_axis])
    return bool(abs(col[world_axis]) >= min_cos)


def install(viewer: Any) -> None:
    """Keep ``viewer`` upright on every change of view, and open new series in their own plane."""
    if viewer is None or viewer in _installed:
        return
    _installed.add(viewer)

    def on_view(event: Any = None) -> None:
        keep_patient_upright(viewer)

    def on_inserted(event: Any) -> None:
        layer = event.value
        plane = layer_plane(layer)
        planes = {layer_plane(lay) for lay in viewer.layers} - {None}
        if plane is not None and planes == {plane}:  # the first series (or more of the same plane)
            show_acquisition_plane(viewer, layer)
        else:
            keep_patient_upright(viewer)

    viewer.dims.events.order.connect(on_view)
    viewer.dims.events.ndisplay.connect(on_view)
    viewer.dims.events.ndim.connect(on_view)
    viewer.layers.events.inserted.connect(on_inserted)
    keep_patient_upright(viewer)
