"""Read DICOM files and folders into Volumes with exact patient geometry.

What belongs to one series follows dcm2niix (``isSameSet``): SeriesInstanceUID, and within it
SeriesNumber, image size, orientation, echo and stack. Slices are ordered by their
ImagePositionPatient projected on the slice normal, never by InstanceNumber or file name; the
slice step comes from the positions (a gantry tilt becomes a shear of the affine), not from
SliceThickness. Positions that repeat make a 4-D ``(t, z, y, x)`` Volume. Pixel data is decoded by
pydicom + pylibjpeg; Rescale Slope/Intercept are applied per slice (CT in HU).

A Volume's ``meta`` carries what a derived export needs: ``dicom_header`` (the first slice's
header without pixel data), ``source_sops`` (per z slice: SOP class, instance and frame),
``series_uid``, ``study_uid``, ``frame_of_reference_uid``, ``window`` and ``warnings``.
"""
from __future__ import annotations

import logging
import os
import warnings as _warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from ..errors import InputError
from ..geometry import describe_steps, survey_gap
from ..volume import Volume
from .dicom_frames import DICOMDIR_CLASS, Frame, NotImage, frames_of, sop_class  # noqa: F401 (public here too)
from .dicom_frames import (_check_memory, _dicomdir_files, _fg, _float, _frame_shape, _is_dicomdir, _n_frames, _num,
                           _pixels)
from .dicom_safe import burned_in as _burned_in
from .plausibility import CT_PLAUSIBLE_HU, implausible_ct_slices

log = logging.getLogger(__name__)

SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_POS_TOL_MM = 1e-3       # positions closer than this along the normal are the same slice position
_SPACING_REL_TOL = 0.01  # a slice step differing from the mean by more than 1% is non-uniform


@dataclass
class Series:
    """Frames that make one volume, plus what was noticed while grouping them."""

    key: tuple
    frames: list[Frame]
    warnings: list[str] = field(default_factory=list)

    @property
    def header(self) -> Dataset:
        return self.frames[0].header

    @property
    def kind(self) -> str:
        """``image``, ``localizer``, ``derived`` or ``secondary`` (used to put the main series first)."""
        h = self.header
        positions = {f.position.tobytes() for f in self.frames if f.position is not None}
        return series_kind(h.get("ImageType") or [], sop_class(h), len(positions), len(self.frames))

    def describe(self) -> str:
        h = self.header
        rows, cols = int(h.get("Rows", 0)), int(h.get("Columns", 0))
        return (f"series {h.get('SeriesNumber', '?')} {h.get('SeriesDescription', '')!s} "
                f"({h.get('Modality', '?')}, {len(self.frames)} images of {rows}x{cols}, {self.kind})")


# ----------------------------------------------------------------------------- public
def series_kind(image_type: Iterable[Any], sop: str, n_positions: int, n_frames: int) -> str:
    """``localizer`` (ImageType LOCALIZER, or fewer than 3 frames at one position), ``secondary``
    (Secondary Capture storage), ``derived`` (ImageType DERIVED) or ``image``."""
    kinds = [str(v).upper() for v in image_type]
    if "LOCALIZER" in kinds or (n_positions <= 1 and n_frames < 3):
        return "localizer"
    if sop.startswith(SECONDARY_CAPTURE_PREFIX):
        return "secondary"
    if kinds[:1] == ["DERIVED"]:
        return "derived"
    return "image"


def read_dicom(path: str | os.PathLike) -> list[Volume]:
    """Read every image series under ``path`` (a file, a DICOMDIR or a folder, recursively).

    Returns:
        One Volume per series, the main image series first (original axial/volume series with
        the most voxels, then derived series, then localizers).

    Raises:
        InputError: nothing readable, a single bad file given directly, or a series that cannot
            form a volume (missing positions, undecodable pixels).
    """
    path = Path(path)
    series, skipped = discover_series(path)
    if not series:
        detail = f" (skipped: {'; '.join(skipped[:5])})" if skipped else ""
        raise InputError(f"no readable greyscale DICOM image found{detail}", path)
    volumes = []
    errors = []
    for s in series:
        try:
            volumes.append(build_volume(s))
        except InputError as exc:
            if path.is_file():
                raise
            errors.append(str(exc))
            log.warning("skipped %s", exc)
    if not volumes:
        raise InputError("no series could be read: " + " | ".join(errors), path)
    if errors:
        for v in volumes:
            v.meta.setdefault("warnings", []).extend(f"another series was skipped: {e}" for e in errors)
    return volumes


def discover_series(path: str | os.PathLike) -> tuple[list[Series], list[str]]:
    """Read headers only and group frames into series, main series first.

    Returns:
        ``(series, skipped)``: the series, and one line per file or series left out and why.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    skipped: list[str] = []
    single = path.is_file()
    if single and _is_dicomdir(path):
        files = _dicomdir_files(path, skipped)
        single = False
    elif single:
        files = [path]
    else:
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise InputError("the folder is empty", path)
    frames: list[Frame] = []
    bad_files: list[tuple[Path, str]] = []
    for f in files:
        try:
            frames.extend(frames_of(f))
        except NotImage as exc:
            if single:
                raise InputError(str(exc), f) from None
            if exc.report:
                skipped.append(f"{f.name}: {exc}")
        except InputError as exc:
            if single:
                raise
            skipped.append(str(exc))
            bad_files.append((f, str(exc).removeprefix(f"{f}: ")))
            log.warning("skipped %s", exc)
    groups: dict[tuple, list[Frame]] = defaultdict(list)
    for fr in frames:
        groups[series_key(fr)].append(fr)
    series = [Series(key, frs) for key, frs in groups.items()]
    rank = {"image": 0, "derived": 1, "secondary": 2, "localizer": 3}
    series.sort(key=lambda s: (rank[s.kind], -len(s.frames) * int(s.header.Rows) * int(s.header.Columns),
                               str(s.header.get("SeriesNumber", ""))))
    for s in series:
        s.warnings.extend(w for w in skipped if any(w.startswith(fr.path.name + ":") for fr in s.frames[:1]))
        folders = {fr.path.parent for fr in s.frames}  # unreadable files beside the series' own files
        s.warnings.extend(f"skipped {f.name}: {msg}" for f, msg in bad_files if f.parent in folders)
    return series, skipped


def build_volume(series: Series) -> Volume:
    """Decode the pixels of one series and compute its affine. See module docstring."""
    frames = series.frames
    first = frames[0]
    warnings = list(series.warnings)
    rows, cols = _frame_shape(first)
    geometry = first.position is not None and first.row_dir is not None
    if geometry and len(frames) > 1:
        lacking = [f for f in frames if f.position is None or f.row_dir is None]
        if lacking:
            raise InputError("has no usable ImagePositionPatient/ImageOrientationPatient while the rest of its "
                             "series has them", lacking[0].path)
    if not geometry:
        if len({f.path for f in frames}) > 1:
            raise InputError("slices have no ImagePositionPatient/ImageOrientationPatient, so they cannot be ordered "
                             "into a volume", first.path.parent)
        warnings.append("no patient position/orientation: geometry is nominal (identity orientation)")
        stacks = [[f] for f in frames]  # frames in file order, one position each
        normal = np.array([0.0, 0.0, 1.0])
        dists = np.arange(len(frames), dtype=float)
    else:
        normal = np.cross(first.row_dir, first.col_dir)
        normal /= np.linalg.norm(normal)
        stacks, dists, dup_warn = _order_by_position(frames, normal)
        warnings.extend(dup_warn)
    nt = len(stacks[0])
    nz = len(stacks)
    _check_memory(nt * nz * rows * cols * 4, first.path)

    # ---- affine
    dy, dx = first.pixel_spacing
    row_dir = first.row_dir if geometry else np.array([1.0, 0.0, 0.0])
    col_dir = first.col_dir if geometry else np.array([0.0, 1.0, 0.0])
    origin = stacks[0][0].position if geometry else np.zeros(3)
    if nz > 1 and geometry:
        step = (stacks[-1][0].position - origin) / (nz - 1)
        steps = np.diff(dists)
        mean = float(np.mean(steps))
        if np.max(np.abs(steps - mean)) > max(_SPACING_REL_TOL * abs(mean), 1e-3):
            warnings.append(f"non-uniform slice spacing: steps of {describe_steps(dists - dists[0])}; every slice "
                            "keeps its own position (NIfTI/MHA/NRRD need resample='uniform'; napari shows each "
                            "uniform run as its own layer)")
        line = stacks[-1][0].position - origin
        off = [(s[0].position - origin) - ((s[0].position - origin) @ line) / (line @ line) * line for s in stacks]
        if np.max(np.linalg.norm(off, axis=1)) > 0.01 * max(abs(mean), 1.0) + 1e-3:
            warnings.append("slice positions do not lie on a straight line; the affine uses first-to-last")
    else:
        thickness = _float(first.header.get("SpacingBetweenSlices")) or _float(first.header.get("SliceThickness")) or 1.0
        step = normal * thickness
    affine = np.eye(4)
    affine[:3, 0] = step
    affine[:3, 1] = col_dir * dy
    affine[:3, 2] = row_dir * dx
    affine[:3, 3] = origin
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError("the slice positions, orientation or spacing give no usable geometry (non-finite or "
                         "zero slice step)", first.path if len(frames) == 1 else first.path.parent)
    tilt = _tilt_degrees(step, normal)

    # ---- pixels
    array = np.empty((nt, nz, rows, cols), dtype=np.float32)
    decoded: dict[Path, np.ndarray] = {}
    bad: list[tuple[Frame, InputError]] = []
    for k, stack in enumerate(stacks):
        for t, fr in enumerate(stack):
            try:
                array[t, k] = _pixels(fr, decoded, rows, cols)
            except InputError as exc:
                bad.append((fr, exc))
            if fr.frame is None:
                decoded.pop(fr.path, None)
    if bad:  # drop the files that cannot be decoded and rebuild from the rest, if any is left
        bad_paths = {fr.path for fr, _ in bad}
        rest = [f for f in frames if f.path not in bad_paths]
        if not rest or len({f.path for f in frames}) == 1:
            raise bad[0][1]
        del array, decoded
        notes = [f"skipped {fr.path.name}: {str(exc).removeprefix(str(fr.path) + ': ')}" for fr, exc in bad]
        return build_volume(Series(series.key, rest, series.warnings + notes))
    if not np.all(np.isfinite(array)):
        bad = ~np.isfinite(array)
        warnings.append(f"{int(bad.sum())} non-finite voxels (NaN/inf from the rescale) set to 0")
        array[bad] = 0
    h = first.header
    modality = str(h.get("Modality", "OT") or "OT")
    if modality == "CT":
        warnings.extend(_implausible_ct(array, stacks))
    if nt == 1:
        array = array[0]

    slice_distance = abs(float(step @ normal))
    meta: dict[str, Any] = {
        "source_path": str(_common_parent([f.path for f in frames])),
        "source_format": "dicom",
        "series_uid": str(h.get("SeriesInstanceUID", "") or ""),
        "study_uid": str(h.get("StudyInstanceUID", "") or ""),
        "frame_of_reference_uid": str(h.get("FrameOfReferenceUID", "") or ""),
        "series_number": h.get("SeriesNumber"),
        "description": series_description(h),
        "window": _window(first),
        "dicom_header": _strip(h),
        "source_sops": [{"sop_class": sop_class(s[0].header), "sop_instance": str(s[0].header.get("SOPInstanceUID", "")),
                         "frame": None if s[0].frame is None or _n_frames(s[0].header) <= 1 else s[0].frame + 1,
                         "thickness": _slice_thickness(s[0])} for s in stacks],
        "slice_thickness": _float(h.get("SliceThickness")) or _float(_fg(first, "PixelMeasuresSequence", "SliceThickness")),
        "slice_distance": slice_distance,
        "gantry_tilt_deg": tilt,
        "slice_spacing_nonuniform": any(w.startswith("non-uniform") for w in warnings),
        "warnings": warnings,
    }
    if geometry and nz > 1:
        meta["slice_positions"] = [[float(v) for v in s[0].position] for s in stacks]
        if survey_gap(dists, meta["slice_thickness"]):
            gap = float(np.min(np.diff(dists)))
            warnings.append(f"a survey of separate slices, not a volume: {nz} slices {meta['slice_thickness']:g} mm "
                            f"thick with gaps of {gap:.4g} mm or more; 2.5-D and 3-D models restore each slice alone")
            meta["separate_slices"] = True
    if tilt and abs(tilt) > 0.01:
        warnings.append(f"gantry tilt of {tilt:.2f} deg: kept as a shear of the affine (slice planes "
                        f"{slice_distance:.4g} mm apart, {float(np.linalg.norm(step)):.4g} mm between slice origins)")
    if nt > 1:
        meta["time_points"] = nt
    burned = _burned_in(frames)
    if burned:  # the export template speaks for every slice: one YES makes the whole series YES
        meta["dicom_header"].BurnedInAnnotation = "YES"
        warnings.append(f"BurnedInAnnotation=YES on {burned}: the series is treated as having burned-in text")
    for w in warnings:
        _warnings.warn(f"{meta['source_path']}: {w}", stacklevel=2)
    return Volume(array, affine, modality, meta)


def _implausible_ct(array: np.ndarray, stacks: list[list[Frame]]) -> list[str]:
    """A warning naming the files whose decoded values cannot be CT (``array``: ``(t, z, y, x)`` HU)."""
    found = implausible_ct_slices(array)  # slice index t * nz + z
    if not found:
        return []
    nz = array.shape[1]
    names = sorted({stacks[i % nz][i // nz].path.name for i, _ in found})
    worst = max(share for _, share in found)
    lo, hi = CT_PLAUSIBLE_HU
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    return [f"pixel values implausible for CT in {len(found)} slice(s) ({shown}): up to {100 * worst:.0f} % of a "
            f"slice lies outside {lo:g}..{hi:g} HU (its padding value aside). The pixel data may be corrupt or its "
            "rescale slope/intercept wrong; look at it before trusting it or a restoration of it"]


# ----------------------------------------------------------------------------- grouping
def series_key(fr: Frame) -> tuple:
    h = fr.header
    uid = str(h.get("SeriesInstanceUID", "") or "")
    if not uid:  # some exports blank the UIDs: fall back on the folder and series number
        uid = f"folder:{fr.path.parent}"
    ori = None if fr.row_dir is None else tuple(np.round(np.concatenate([fr.row_dir, fr.col_dir]), 3))
    image_type = tuple(str(v).upper() for v in (h.get("ImageType") or []))
    multi = str(fr.path) if fr.frame is not None else ""
    return (uid, str(h.get("SeriesNumber", "")), int(h.Rows), int(h.Columns), ori, _num(h.get("EchoNumbers")),
            _num(h.get("EchoTime")), "LOCALIZER" in image_type, sop_class(h), multi, fr.stack,
            tuple(np.round(fr.pixel_spacing, 4)))


def _order_by_position(frames: list[Frame], normal: np.ndarray) -> tuple[list[list[Frame]], np.ndarray, list[str]]:
    """Sort frames along the normal; frames sharing a position become time points.

    Returns:
        ``(stacks, distances, warnings)``: one list of frames (time-ordered) per slice position,
        in increasing distance along the normal, and those distances in mm.
    """
    warnings: list[str] = []
    d = np.array([float(f.position @ normal) for f in frames])
    order = np.argsort(d, kind="stable")
    stacks: list[list[Frame]] = []
    dists: list[float] = []
    for idx in order:
        if dists and abs(d[idx] - dists[-1]) < _POS_TOL_MM:
            stacks[-1].append(frames[idx])
        else:
            stacks.append([frames[idx]])
            dists.append(float(d[idx]))
    counts = {len(s) for s in stacks}
    for s in stacks:
        s.sort(key=lambda f: tuple(_sortable(v) for v in f.temporal))
    if len(counts) > 1:
        n = min(counts)
        dropped = [f.path.name + (f"[{f.frame + 1}]" if f.frame is not None else "") for s in stacks for f in s[n:]]
        warnings.append(f"duplicate slice positions with unequal repeats ({sorted(counts)} per position): kept the "
                        f"first {n} per position in acquisition order, dropped {len(dropped)}: {', '.join(dropped[:10])}")
        stacks = [s[:n] for s in stacks]
    elif counts != {1}:
        warnings.append(f"every slice position occurs {counts.pop()} times: read as a 4-D (time, z, y, x) volume")
    return stacks, np.array(dists), warnings


# ----------------------------------------------------------------------------- small helpers
def _sortable(v: Any) -> tuple:
    """Sort key mixing numbers, strings and missing values (missing last)."""
    if v is None or v == "":
        return (2, 0.0, "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _window(fr: Frame) -> tuple[float, float] | None:
    c = _float(fr.header.get("WindowCenter")) or _float(_fg(fr, "FrameVOILUTSequence", "WindowCenter"))
    w = _float(fr.header.get("WindowWidth")) or _float(_fg(fr, "FrameVOILUTSequence", "WindowWidth"))
    if c is None or not w or w <= 0:
        return None
    return (c, w)


def _slice_thickness(fr: Frame) -> float | None:
    """SliceThickness of one frame (its file's, or its enhanced per-frame group's)."""
    return _float(fr.header.get("SliceThickness")) or _float(_fg(fr, "PixelMeasuresSequence", "SliceThickness"))


def _tilt_degrees(step: np.ndarray, normal: np.ndarray) -> float:
    n = np.linalg.norm(step)
    if n == 0:
        return 0.0
    cos = min(1.0, abs(float(step @ normal)) / n)
    return float(np.degrees(np.arccos(cos)))


def series_description(h: Dataset) -> str:
    parts = [str(h.get("SeriesDescription", "") or "").strip() or str(h.get("ProtocolName", "") or "").strip()]
    if not parts[0]:
        parts = [f"{h.get('Modality', 'DICOM')} series {h.get('SeriesNumber', '')}".strip()]
    return parts[0]


def _strip(h: Dataset) -> Dataset:
    """A copy of the header without pixel data and bulky per-frame groups (kept for export)."""
    ds = Dataset()
    per_frame = 0x52009230  # PerFrameFunctionalGroupsSequence
    ds.update({tag: h[tag] for tag in h.keys() if tag < 0x7FE00000 and not tag.is_private and tag != per_frame})
    if hasattr(h, "file_meta"):
        ds.file_meta = h.file_meta
    return ds


def _common_parent(paths: Iterable[Path]) -> Path:
    paths = list(paths)
    if len(paths) == 1:
        return paths[0]
    return Path(os.path.commonpath([str(p) for p in paths]))
