"""ROI statistics for the Compare panel: shapes (rectangle, ellipse, polygon) -> 2-D masks -> stats.

Shapes are drawn in a shapes layer that shares the image layer's transform, so their vertices are
continuous data indices of the image (pixel centres at integers). A shape lies on one plane: the
last two data axes, at the index of its first vertex along the other axes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from skimage.draw import polygon as _fill_polygon

from ..errors import InputError
from ..metrics import noise_sd_estimate, roi_stats


@dataclass
class RoiRow:
    """One shape's statistics. ``index``: the leading data indices of the shape's plane."""

    shape: int
    kind: str
    index: tuple[int, ...]
    pixels: int
    mean_in: float
    sd_in: float
    mean_out: float | None = None
    sd_out: float | None = None

    @property
    def noise_reduction(self) -> float | None:
        """``100 * (1 - SD_restored / SD_input)`` in percent (None without a restored layer)."""
        if self.sd_out is None or self.sd_in <= 0:
            return None
        return 100.0 * (1.0 - self.sd_out / self.sd_in)


def shape_mask(vertices: np.ndarray, kind: str, plane_shape: tuple[int, int]) -> np.ndarray:
    """Boolean ``plane_shape`` mask of a shape from its vertices' last two coordinates.

    ``kind``: napari's shape type; an ellipse is given by the 4 corners of its (maybe rotated)
    bounding box and is filled as a 128-gon; rectangles and polygons are filled as polygons.
    """
    v = np.asarray(vertices, dtype=np.float64)[:, -2:]
    if kind == "ellipse":
        centre = v.mean(axis=0)
        a, b = (v[1] - v[0]) / 2.0, (v[2] - v[1]) / 2.0
        t = np.linspace(0, 2 * np.pi, 128, endpoint=False)
        v = centre + np.cos(t)[:, None] * a + np.sin(t)[:, None] * b
    elif kind not in ("rectangle", "polygon"):
        raise InputError(f"ROI statistics need a rectangle, ellipse or polygon, not a {kind}")
    mask = np.zeros(plane_shape, dtype=bool)
    rr, cc = _fill_polygon(v[:, 0], v[:, 1], shape=plane_shape)
    mask[rr, cc] = True
    return mask


def shape_plane(vertices: np.ndarray, data_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Leading data indices (all but the last two axes) of the plane a shape lies on (clipped)."""
    lead = np.asarray(vertices, dtype=np.float64)[0, :-2]
    return tuple(int(np.clip(round(float(c)), 0, n - 1)) for c, n in zip(lead, data_shape[:-2]))


def roi_table(shapes_data: list[np.ndarray], shape_types: list[str], image: np.ndarray,
              restored: np.ndarray | None = None) -> list[RoiRow]:
    """Mean and SD inside every shape, in ``image`` and (same shape) ``restored``.

    Args:
        shapes_data: vertex arrays ``(n, ndim)`` in data indices of ``image``.
        shape_types: napari shape types, one per shape (lines and paths are skipped).
        image, restored: arrays ``(..., y, x)``; the shape's plane is cut out of each.
    """
    rows: list[RoiRow] = []
    if restored is not None and np.shape(restored) != np.shape(image):
        raise InputError(f"the restored layer's shape {np.shape(restored)} differs from the input's {np.shape(image)}")
    for n, (verts, kind) in enumerate(zip(shapes_data, shape_types)):
        if kind not in ("rectangle", "ellipse", "polygon"):
            continue
        verts = np.asarray(verts)
        if verts.shape[1] < 2:
            continue
        if verts.shape[1] > image.ndim:  # a shape from a layer with more dims: use the trailing ones
            verts = verts[:, -image.ndim:]
        lead = shape_plane(verts, image.shape) if image.ndim > 2 else ()
        plane_in = np.asarray(image[lead], dtype=np.float32)
        mask = shape_mask(verts, kind, plane_in.shape)
        if mask.sum() < 2:
            continue
        m_in, s_in = roi_stats(plane_in, mask)
        row = RoiRow(n, kind, lead, int(mask.sum()), m_in, s_in)
        if restored is not None:
            row.mean_out, row.sd_out = roi_stats(np.asarray(restored[lead], dtype=np.float32), mask)
        rows.append(row)
    return rows


def slice_noise(plane: np.ndarray, modality: str, reference: np.ndarray | None = None) -> float:
    """Estimated noise SD of one 2-D slice (image units).

    For CT the local-SD mode is taken in soft tissue (0..100 HU of ``reference``, default
    ``plane``: the same pixels for input and restored), as Christianson et al. (2015); when
    too little soft tissue is in view, or for other modalities, over all non-flat windows.
    """
    plane = np.asarray(plane, dtype=np.float64)
    if modality == "CT":
        ref = np.asarray(plane if reference is None else reference, dtype=np.float64)
        mask = (ref >= 0.0) & (ref <= 100.0)
        try:
            return noise_sd_estimate(plane, mask)
        except InputError:
            pass
    return noise_sd_estimate(plane)
