"""Slice geometry of series whose slices are not evenly spaced.

A :class:`~napari_restore.volume.Volume`'s affine holds one slice step; a DICOM series may have
several (two acquisitions in one series: 4 mm then 7 mm), or be a survey of single slices far
apart. The reader records every slice's own ImagePositionPatient in ``meta["slice_positions"]``;
this module reasons about them:

* :func:`uniform_runs` splits the slice offsets along the normal into runs of one step each;
* :func:`subvolume` gives one run as a Volume whose affine is exact for its slices;
* :func:`resampled_uniform` interpolates a series linearly along the normal onto a uniform grid
  (the smallest step), as dcm2niix's equalised copy does;
* :func:`survey_gap` tells whether the slices are separate (gaps much wider than the slices);
* :func:`describe_steps` says it in words for warnings and errors.

All distances in mm, positions in patient LPS.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import InputError

if TYPE_CHECKING:
    from .volume import Volume

#: A step differing from its run's step by more than this fraction starts a new run.
STEP_REL_TOL = 0.01
#: Absolute floor of that tolerance (mm): header rounding.
STEP_ABS_TOL_MM = 1e-3
#: Per-slice lists in ``meta`` that follow the slices when a volume is split or resampled.
PER_SLICE_META = ("source_sops", "slice_positions")


def slice_normal(affine: np.ndarray) -> np.ndarray:
    """Unit normal of the slice planes (row direction x column direction), LPS."""
    n = np.cross(np.asarray(affine, float)[:3, 2], np.asarray(affine, float)[:3, 1])
    return n / np.linalg.norm(n)


def acquisition_plane(affine: np.ndarray) -> str:
    """``axial`` (normal mainly S-I), ``coronal`` (A-P) or ``sagittal`` (L-R)."""
    n = np.abs(slice_normal(affine))
    return ("sagittal", "coronal", "axial")[int(np.argmax(n))]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= max(STEP_REL_TOL * max(abs(a), abs(b)), STEP_ABS_TOL_MM)


def positions_match_affine(positions: np.ndarray, affine: np.ndarray) -> bool:
    """Whether ``origin + k * step`` reproduces every position within 1 % of a step."""
    positions = np.asarray(positions, float)
    if len(positions) < 2:
        return True
    step = np.asarray(affine, float)[:3, 0]
    pred = affine[:3, 3][None, :] + np.arange(len(positions))[:, None] * step[None, :]
    tol = max(STEP_REL_TOL * float(np.linalg.norm(step)), STEP_ABS_TOL_MM)
    return bool(np.max(np.linalg.norm(pred - positions, axis=1)) <= tol)


def uniform_runs(offsets: np.ndarray) -> list[tuple[int, int]]:
    """Split slice offsets (mm along the normal, increasing) into runs of one step.

    Returns ``[(start, stop), ...]`` covering ``range(len(offsets))`` in order; within a run
    every step equals the run's first step within 1 %. A run of one slice is possible where
    the step changes twice in a row.
    """
    offsets = np.asarray(offsets, float)
    n = len(offsets)
    if n <= 2:
        return [(0, n)] if n else []
    steps = np.diff(offsets)
    runs: list[tuple[int, int]] = []
    start = 0
    while start < n:
        if start == n - 1:
            runs.append((start, n))
            break
        ref = steps[start]
        stop = start + 1
        while stop < n - 1 and _close(steps[stop], ref):
            stop += 1
        runs.append((start, stop + 1))
        start = stop + 1
    return runs


def survey_gap(offsets: np.ndarray, thickness: float | None) -> bool:
    """Whether the slices are separate samples rather than a volume: every gap between
    neighbouring slices is over twice the slice thickness and over 10 mm."""
    offsets = np.asarray(offsets, float)
    if len(offsets) < 2 or not thickness or thickness <= 0:
        return False
    steps = np.abs(np.diff(offsets))
    return bool(np.min(steps) > max(2.0 * float(thickness), 10.0))


def describe_steps(offsets: np.ndarray) -> str:
    """``"4 mm (slices 1-14), 7 mm (slices 14-28)"``: each run's step and its slices (1-based)."""
    offsets = np.asarray(offsets, float)
    parts = []
    for a, b in uniform_runs(offsets):
        if b - a < 2:
            parts.append(f"a single slice (slice {a + 1})")
            continue
        step = (offsets[b - 1] - offsets[a]) / (b - a - 1)
        parts.append(f"{step:.4g} mm (slices {a + 1}-{b})")
    return ", ".join(parts)


def _sliced_meta(meta: dict[str, Any], index: np.ndarray | slice, nz: int) -> dict[str, Any]:
    out = copy.copy(meta)
    for key in PER_SLICE_META:
        val = meta.get(key)
        if val is not None and len(val) == nz:
            out[key] = [val[i] for i in np.arange(nz)[index]]
        else:
            out.pop(key, None)
    return out


def subvolume(volume: "Volume", start: int, stop: int) -> "Volume":
    """Slices ``start:stop`` of ``volume`` with an affine exact for them.

    The affine's origin is slice ``start``'s own position and its step the mean step of the
    range (exact for a uniform run); per-slice meta (source references, positions) follows the
    slices; ``meta["subvolume"]`` records ``(start, stop, nz)``.
    """
    nz = volume.spatial_shape[0]
    if not 0 <= start < stop <= nz:
        raise InputError(f"slices {start}:{stop} are outside the volume's {nz} slices")
    pos = volume.slice_positions
    affine = volume.affine.copy()
    affine[:3, 3] = pos[start]
    if stop - start > 1:
        affine[:3, 0] = (pos[stop - 1] - pos[start]) / (stop - start - 1)
    meta = _sliced_meta(volume.meta, slice(start, stop), nz)
    meta["subvolume"] = (int(start), int(stop), int(nz))
    meta["slice_spacing_nonuniform"] = False
    array = volume.array[..., start:stop, :, :]
    return type(volume)(np.ascontiguousarray(array), affine, volume.modality, meta)


def resampled_uniform(volume: "Volume", step_mm: float | None = None) -> "Volume":
    """Linear interpolation along the slice normal onto a uniform grid.

    The new slices start at slice 0 and go in ``step_mm`` steps (default: the smallest step of
    the series) up to the last slice; every new slice is interpolated between the two source
    slices around it (a gantry tilt's shear is kept: positions move along the line from the
    first to the last slice). The provenance records the step and the source's steps.
    """
    offsets = volume.slice_offsets
    nz = len(offsets)
    if nz < 2:
        return volume.copy_with(volume.array)
    steps = np.diff(offsets)
    if np.any(steps <= 0):
        raise InputError("slice offsets along the normal are not increasing; cannot resample")
    step = float(step_mm) if step_mm else float(np.min(steps))
    if not step > 0:
        raise InputError(f"resample step must be > 0 mm, got {step_mm!r}")
    total = float(offsets[-1])
    n_new = int(np.floor(total / step + 1e-6)) + 1
    t = np.arange(n_new) * step
    hi = np.clip(np.searchsorted(offsets, t, side="right"), 1, nz - 1)
    lo = hi - 1
    w = ((t - offsets[lo]) / (offsets[hi] - offsets[lo])).astype(np.float32)
    a = volume.array
    axis = a.ndim - 3
    take = (lambda idx: np.take(a, idx, axis=axis))
    shape = [1] * a.ndim
    shape[axis] = n_new
    w = w.reshape(shape)
    new = take(lo) * (1 - w) + take(hi) * w
    pos = volume.slice_positions
    affine = volume.affine.copy()
    affine[:3, 3] = pos[0]
    affine[:3, 0] = (pos[-1] - pos[0]) / total * step
    step_record = {"step": "resample_uniform", "method": "linear along the slice normal",
                   "step_mm": round(step, 6), "source_steps": describe_steps(offsets),
                   "source_slices": nz, "slices": n_new}
    out = volume.copy_with(new.astype(np.float32), step_record)
    out.affine = affine
    for key in PER_SLICE_META:
        out.meta.pop(key, None)
    out.meta["slice_spacing_nonuniform"] = False
    return out


def largest_step(volume: "Volume") -> float:
    """The widest distance between neighbouring slices (mm): what a 2.5-D model would read across.

    0 for a single slice and for a survey of separate slices: each is restored alone, so a 2.5-D
    model reads the slice itself as its neighbours (as it was trained to, ``single_slice_fraction``)."""
    if volume.meta.get("separate_slices") or volume.spatial_shape[0] == 1:
        return 0.0
    if volume.spatial_shape[0] > 1 and not volume.is_uniform:
        return float(np.max(np.abs(np.diff(volume.slice_offsets))))
    return volume.slice_distance


def restore_runs(volume: "Volume", reads_neighbours: bool) -> tuple[list[tuple[int, int]], str | None]:
    """Slice ranges a restoration must treat alone, and a note saying so (``None`` when whole).

    A model that reads neighbouring slices (2.5-D context or 3-D) never reads across a change of
    step (each uniform run alone) or between separate slices (each slice alone), so a 7 mm gap is
    never taken for a 4 mm one.
    """
    nz = volume.spatial_shape[0]
    if not reads_neighbours or nz < 2:
        return [(0, nz)], None
    if volume.meta.get("separate_slices"):
        return [(k, k + 1) for k in range(nz)], "the slices are separate (a survey), so each was restored alone"
    if volume.is_uniform:
        return [(0, nz)], None
    runs = volume.uniform_runs()
    return runs, (f"unevenly spaced slices ({describe_steps(volume.slice_offsets)}) were restored as "
                  f"{len(runs)} uniform runs, each alone")
