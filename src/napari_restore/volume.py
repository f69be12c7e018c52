"""`Volume`: a float32 image in physical units with its patient geometry.

Geometry convention (see DESIGN.md):
- ``array`` axes are ``(z, y, x)`` = (slice, row, column); a 4-D series is ``(t, z, y, x)``.
- ``affine`` (4x4, float64) maps the voxel index ``(k, j, i, 1)`` to patient LPS millimetres.
- In napari, world coordinates are patient millimetres in (S, P, L) order: the LPS triple
  reversed, to match numpy's ``(z, y, x)``.
"""
from __future__ import annotations

import copy
import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import InputError

#: Key under which a layer's ``metadata`` carries the napari-restore record.
LAYER_META_KEY = "napari_restore"

# Reverses the order of LPS rows -> (S, P, L), the napari world order.
_LPS_TO_SPL = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64
)


@dataclass
class Volume:
    """A 3-D (or 4-D, time first) image with its geometry and provenance.

    Attributes:
        array: float32 array ``(z, y, x)`` or ``(t, z, y, x)``, in physical units (HU for CT).
        affine: 4x4 matrix, voxel index ``(k, j, i, 1)`` -> patient LPS mm.
        modality: DICOM modality code (``"CT"``, ``"MR"``, ...), ``"OT"`` when unknown.
        meta: free-form record. Known keys: ``source_path``, ``series_uid``, ``description``,
            ``dicom`` (per-slice source headers, for export), ``window`` ((center, width)),
            ``provenance`` (list of dicts, one per step), ``warnings`` (list of str),
            ``slice_spacing_nonuniform`` (bool), ``slice_positions`` (``(nz, 3)`` LPS mm of
            every slice's first voxel as the source placed it: see :attr:`slice_positions`).

    Geometry of irregular series: the affine holds the mean slice step; every slice's true
    position is in :attr:`slice_positions`. :attr:`is_uniform` says whether the affine alone is
    exact; :meth:`uniform_runs` and :meth:`subvolume` split a series into uniformly spaced parts;
    :meth:`resampled_uniform` interpolates it onto a uniform grid (see :mod:`.geometry`).
    """

    array: np.ndarray
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    modality: str = "OT"
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.dtype != np.float32:
            self.array = self.array.astype(np.float32)
        if self.array.ndim not in (3, 4):
            raise InputError(f"a Volume is 3-D (z, y, x) or 4-D (t, z, y, x), got shape {self.array.shape}")
        self.affine = np.asarray(self.affine, dtype=np.float64)
        if self.affine.shape != (4, 4) or not np.all(np.isfinite(self.affine)):
            raise InputError(f"affine must be a finite 4x4 matrix, got {self.affine!r}")
        if abs(np.linalg.det(self.affine[:3, :3])) < 1e-12:
            raise InputError("affine is singular (zero spacing or degenerate orientation)")
        self.modality = (self.modality or "OT").upper()

    # ------------------------------------------------------------------ geometry
    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        """``(nz, ny, nx)``."""
        return tuple(int(s) for s in self.array.shape[-3:])  # type: ignore[return-value]

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel step lengths in mm along ``(z, y, x)``: the norms of the affine's columns.

        For a gantry tilt the z step includes the shear; the distance between slice planes is
        :attr:`slice_distance`.
        """
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def slice_distance(self) -> float:
        """Distance in mm between neighbouring slice planes (along the slice normal)."""
        col_j, col_i = self.affine[:3, 1], self.affine[:3, 2]
        normal = np.cross(col_i, col_j)
        normal /= np.linalg.norm(normal)
        return float(abs(normal @ self.affine[:3, 0]))

    @property
    def slice_positions(self) -> np.ndarray:
        """``(nz, 3)`` LPS mm of voxel ``(k, 0, 0)`` of every slice.

        The source's own positions (``meta["slice_positions"]``, each DICOM slice's
        ImagePositionPatient) when recorded for exactly these slices, else the affine's.
        """
        nz = self.spatial_shape[0]
        rec = self.meta.get("slice_positions") if self.meta else None
        if rec is not None:
            pos = np.asarray(rec, dtype=np.float64)
            if pos.shape == (nz, 3) and np.all(np.isfinite(pos)):
                return pos
        return self.affine[:3, 3][None, :] + np.arange(nz)[:, None] * self.affine[:3, 0][None, :]

    @property
    def slice_offsets(self) -> np.ndarray:
        """``(nz,)`` mm: each slice's distance from slice 0 along the slice normal."""
        from .geometry import slice_normal

        return (self.slice_positions - self.slice_positions[0]) @ slice_normal(self.affine)

    @property
    def is_uniform(self) -> bool:
        """Whether the affine puts every slice where :attr:`slice_positions` says (within 1 % of a step)."""
        from .geometry import positions_match_affine

        return positions_match_affine(self.slice_positions, self.affine)

    def uniform_runs(self) -> list[tuple[int, int]]:
        """``[(start, stop), ...]``: consecutive slice ranges with one uniform step each (see :mod:`.geometry`)."""
        from .geometry import uniform_runs

        return uniform_runs(self.slice_offsets)

    def subvolume(self, start: int, stop: int) -> "Volume":
        """Slices ``start:stop`` as a Volume whose affine is exact for them (a uniform run)."""
        from .geometry import subvolume

        return subvolume(self, start, stop)

    def resampled_uniform(self, step_mm: float | None = None) -> "Volume":
        """This volume interpolated linearly along the slice normal onto a uniform grid.

        ``step_mm``: the new slice step (default: the smallest step of the series). The step is
        recorded in the provenance; per-slice source references are dropped.
        """
        from .geometry import resampled_uniform

        return resampled_uniform(self, step_mm)

    @property
    def origin(self) -> np.ndarray:
        """LPS position in mm of voxel ``(0, 0, 0)``."""
        return self.affine[:3, 3].copy()

    def copy_with(self, array: np.ndarray, step: dict[str, Any] | None = None) -> "Volume":
        """A new Volume with ``array`` and this geometry; ``step`` is appended to the provenance."""
        meta = copy.copy(self.meta)
        meta["provenance"] = list(self.meta.get("provenance", []))
        if step is not None:
            step = {"time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), **step}
            meta["provenance"].append(step)
        return Volume(array, self.affine.copy(), self.modality, meta)

    # ------------------------------------------------------------------ napari
    def world_affine(self) -> np.ndarray:
        """4x4 affine from ``(k, j, i, 1)`` to napari world ``(S, P, L, 1)`` in mm."""
        return _LPS_TO_SPL @ self.affine

    def layer_axes(self) -> tuple[int, int, int]:
        """Order of the spatial array axes in the napari layer's data.

        napari draws the last two *data* axes against the last two *world* axes (P, L), so a
        sagittal or coronal series would give a singular on-screen transform. The layer's data is
        therefore ``array`` with its spatial axes permuted so that data axis ``d`` runs mainly
        along world axis ``d`` (S, P, L); ``(0, 1, 2)`` for axial (and tilted axial) series.
        Only a permutation, never a flip or resampling: the geometry stays exact.
        """
        import itertools

        m = np.abs(self.world_affine()[:3, :3])
        m = m / np.linalg.norm(m, axis=0, keepdims=True)
        perms = list(itertools.permutations(range(3)))  # identity first: it wins ties
        scores = [sum(m[d, p[d]] for d in range(3)) for p in perms]
        return tuple(int(a) for a in perms[int(np.argmax(scores))])  # type: ignore[return-value]

    def layer_data(self) -> np.ndarray:
        """The array as the napari layer holds it: spatial axes in :meth:`layer_axes` order (a view)."""
        axes = self.layer_axes()
        if self.array.ndim == 4:
            return np.transpose(self.array, (0, *(a + 1 for a in axes)))
        return np.transpose(self.array, axes)

    def to_layer_tuple(self) -> tuple[np.ndarray, dict[str, Any], str]:
        """``(data, kwargs, "image")``: a napari layer data tuple (no napari import here)."""
        return self.layer_data(), self.to_layer_kwargs(), "image"

    def to_layer_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``napari.layers.Image`` holding :meth:`layer_data` (no napari import here).

        The layer gets ``scale`` = spacing and an ``affine`` holding the direction (and shear)
        and origin, so that ``affine @ diag(scale)`` is :meth:`world_affine` (with its columns
        in :meth:`layer_axes` order). For axial series the layer data is ``array`` itself; use
        :meth:`layer_data` or :meth:`to_layer_tuple` to be right for every orientation.
        """
        axes = list(self.layer_axes())
        world = self.world_affine()
        world[:, :3] = world[:, axes]
        scale = np.array(self.spacing)[axes]
        direction = world.copy()
        direction[:3, :3] = world[:3, :3] / scale[None, :]
        nd = self.array.ndim
        if nd == 4:  # time axis first, no geometry
            direction5 = np.eye(5)
            direction5[1:, 1:] = direction
            direction, scale = direction5, np.concatenate([[1.0], scale])
        kwargs: dict[str, Any] = {
            "scale": tuple(float(s) for s in scale),
            "affine": direction,
            "rgb": False,  # never guess RGB(A) from a last axis of length 3 or 4
            "name": self.meta.get("description") or self.modality,
            "metadata": {LAYER_META_KEY: self.layer_record()},
        }
        window = self.meta.get("window")
        if window is not None:
            c, w = window
            kwargs["contrast_limits"] = (float(c - w / 2), float(c + w / 2))
        return kwargs

    @property
    def acquisition_plane(self) -> str:
        """``axial``, ``coronal`` or ``sagittal``: the patient plane closest to the slices."""
        from .geometry import acquisition_plane

        return acquisition_plane(self.affine)

    def layer_record(self) -> dict[str, Any]:
        """The ``metadata["napari_restore"]`` record: geometry, modality, source and provenance."""
        return {
            "affine_lps": self.affine.copy(),
            "layer_axes": self.layer_axes(),
            "modality": self.modality,
            "meta": self.meta,
        }

    @classmethod
    def from_layer(cls, data: Any, metadata: dict[str, Any] | None = None,
                   scale: Any = None, translate: Any = None, affine: Any = None) -> "Volume":
        """Rebuild a Volume from napari layer data and attributes.

        When the layer carries a napari-restore record, its exact LPS affine and source
        headers are used and the data's axes are put back in the Volume's order (the record's
        ``layer_axes``, see :meth:`layer_axes`); otherwise geometry comes from the layer's
        world transform, read as (S, P, L) mm.
        """
        array = np.asarray(data, dtype=np.float32)
        record = (metadata or {}).get(LAYER_META_KEY)
        if record is not None:
            axes = [int(a) for a in record.get("layer_axes", (0, 1, 2))]
            if axes != [0, 1, 2] and array.ndim in (3, 4):  # undo the layer's axis permutation
                inverse = list(np.argsort(axes))
                order = inverse if array.ndim == 3 else [0, *(int(a) + 1 for a in inverse)]
                array = np.ascontiguousarray(np.transpose(array, order))
            return cls(array, np.asarray(record["affine_lps"]), record.get("modality", "OT"),
                       copy.copy(record.get("meta", {})))
        if array.ndim == 2:
            array = array[None]
        sp = np.eye(4)
        sp[:3, :3] = np.diag(np.asarray(scale if scale is not None else np.ones(3), float)[-3:])
        if translate is not None:
            sp[:3, 3] = np.asarray(translate, float)[-3:]
        aff = np.eye(4)
        if affine is not None:
            a = np.asarray(affine, float)
            aff[:3, :3] = a[-4:-1, -4:-1]
            aff[:3, 3] = a[-4:-1, -1]
        world = aff @ sp
        return cls(array, _LPS_TO_SPL @ world, "OT", {})
