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
import math
import os
import warnings as _warnings
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from ..geometry import describe_steps, survey_gap
from ..volume import Volume
from .dicom_safe import burned_in as _burned_in
from .dicom_safe import dcmread as _dcmread
from .dicom_safe import inside as _inside

log = logging.getLogger(__name__)

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: SOP classes that never hold a greyscale image volume (reports, structures, presentation states...).
_NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.11", "1.2.840.10008.5.1.4.1.1.481.3",
                       "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.104")
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_POS_TOL_MM = 1e-3       # positions closer than this along the normal are the same slice position
_SPACING_REL_TOL = 0.01  # a slice step differing from the mean by more than 1% is non-uniform


@dataclass
class Frame:
    """One 2-D image of a series: a single-frame file or one frame of a multi-frame file."""

    path: Path
    header: Dataset
    frame: int | None                 # 0-based frame in a multi-frame file, None for a single frame
    position: np.ndarray | None       # ImagePositionPatient, LPS mm
    row_dir: np.ndarray | None        # direction of increasing column index i
    col_dir: np.ndarray | None        # direction of increasing row index j
    pixel_spacing: tuple[float, float]  # (between rows, between columns) mm
    slope: float
    intercept: float
    temporal: tuple = ()              # ordering key among frames sharing a position
    stack: tuple = ()                 # extra grouping key (stack, echo) for multi-frame files
    shape: tuple[int, int] | None = None  # (rows, columns) when not the file's (a mosaic tile)


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
    if nt == 1:
        array = array[0]

    h = first.header
    modality = str(h.get("Modality", "OT") or "OT")
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


# ----------------------------------------------------------------------------- files
class NotImage(Exception):
    """A file that is not a greyscale DICOM image; ``report`` says whether to list it as skipped."""

    def __init__(self, message: str, report: bool = True):
        super().__init__(message)
        self.report = report


def _is_dicomdir(path: Path) -> bool:
    try:
        meta = pydicom.filereader.read_file_meta_info(path)  # the file meta only: cheap on any file
        return str(meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_CLASS
    except Exception:
        return False


def _dicomdir_files(path: Path, skipped: list[str]) -> list[Path]:
    """Files a DICOMDIR references (missing ones are reported in ``skipped``)."""
    try:
        ds = _parsed(_dcmread(path))
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"unreadable DICOMDIR ({type(exc).__name__}: {exc})", path) from None
    files = []
    media = path.parent.resolve()
    for n, rec in enumerate(ds.get("DirectoryRecordSequence", []), 1):
        ref = rec.get("ReferencedFileID")
        if not ref:
            continue
        parts = [ref] if isinstance(ref, str) else list(ref)
        f = path.parent.joinpath(*parts)
        if not _inside(f, media):
            raise InputError(f"DICOMDIR record {n} ({rec.get('DirectoryRecordType', '?')}) references "
                             f"{'/'.join(map(str, parts))!r}, which lies outside the media folder; refused", path)
        if not f.is_file():  # file systems that changed case
            alt = path.parent.joinpath(*[p.lower() for p in parts])
            f = alt if alt.is_file() else f
        if f.is_file():
            files.append(f)
        else:
            skipped.append(f"{f.name}: listed in the DICOMDIR but not found")
    if not files:  # a copied or renamed media folder: read what is beside the DICOMDIR instead
        skipped.append(f"{path.name}: the DICOMDIR references no existing file; read its folder instead")
        files = sorted(p for p in path.parent.rglob("*") if p.is_file() and not p.name.startswith("."))
    return files


def _claims_image(h: Dataset, sop: str) -> bool:
    """True when the file meta names an image storage class: a file that says it is an image
    (not a DICOMDIR, report or other non-image object) and then is not one is damaged."""
    media = str(getattr(h, "file_meta", Dataset()).get("MediaStorageSOPClassUID", "") or "") or sop
    return (media.startswith("1.2.840.10008.5.1.4.1.1.") and media != DICOMDIR_CLASS
            and not any(media.startswith(p) for p in _NON_IMAGE_PREFIXES))


def _read_header(path: Path) -> Dataset:
    try:
        return _parsed(_dcmread(path, stop_before_pixels=True))
    except InputError:
        raise
    except InvalidDicomError:
        if path.suffix.lower() not in (".dcm", ".dicom", ".ima"):
            raise NotImage("not a DICOM file", report=False) from None
        try:  # a .dcm without the 128-byte preamble
            ds = _dcmread(path, stop_before_pixels=True, force=True)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"not a valid DICOM file ({exc})", path) from None
        if "Rows" not in ds:
            raise InputError("not a valid DICOM file (no preamble and no image attributes)", path) from None
        try:
            return _parsed(ds)
        except Exception as exc:
            raise InputError(f"corrupt DICOM header ({type(exc).__name__}: {exc})", path) from None
    except Exception as exc:  # truncated headers, bad VRs, ...
        raise InputError(f"corrupt DICOM header ({type(exc).__name__}: {exc})", path) from None


def _parsed(ds: Dataset) -> Dataset:
    """``ds`` with every public element (nested ones too) decoded now, so a corrupt value fails here,
    not later. Private elements are never used (and never exported), so they stay undecoded: they are
    often the bulk of a header (Siemens CSA, Philips private sequences)."""
    _decode_public(ds)
    if hasattr(ds, "file_meta"):
        _decode_public(ds.file_meta)
    return ds


def _decode_public(ds: Dataset) -> None:
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        elem = ds[tag]  # converts the raw element: raises on a corrupt value
        if elem.VR == "SQ":
            for item in elem.value:
                _decode_public(item)


def sop_class(h: Dataset) -> str:
    sop = str(h.get("SOPClassUID", "") or "")
    if not sop and hasattr(h, "file_meta"):
        sop = str(h.file_meta.get("MediaStorageSOPClassUID", "") or "")
    return sop


def frames_of(path: Path) -> list[Frame]:
    h = _read_header(path)
    sop = sop_class(h)
    if sop == DICOMDIR_CLASS or "DirectoryRecordSequence" in h:
        if _claims_image(h, sop):
            raise InputError(f"says it holds an image (SOP class {sop}) but reads as a DICOMDIR: the header is "
                             "damaged", path)
        raise NotImage("a DICOMDIR", report=False)
    if any(sop.startswith(p) for p in _NON_IMAGE_PREFIXES):
        raise NotImage(f"not an image (SOP class {sop})")
    if "Rows" not in h or "Columns" not in h:
        if _claims_image(h, sop):
            raise InputError(f"says it holds an image (SOP class {sop}) but its header has no Rows/Columns: "
                             "the header is damaged", path)
        raise NotImage("no image (no Rows/Columns)")
    if _int_attr(h, "SamplesPerPixel", 1, path) != 1:
        raise NotImage(f"a colour image ({h.get('PhotometricInterpretation', '?')}, "
                        f"{h.get('SamplesPerPixel')} samples per pixel); only greyscale CT/MR is restored")
    rows, cols = _int_attr(h, "Rows", 0, path), _int_attr(h, "Columns", 0, path)
    if rows <= 0 or cols <= 0:
        raise InputError(f"invalid image size Rows={rows} Columns={cols}", path)
    bits = _int_attr(h, "BitsAllocated", 0, path)
    if bits not in (1, 8, 16, 32, 64):
        raise InputError(f"invalid BitsAllocated={bits}", path)
    n_frames = _int_attr(h, "NumberOfFrames", 1, path)
    if n_frames < 1:
        raise InputError(f"invalid NumberOfFrames={n_frames}", path)
    _check_pixel_size(path, h, rows, cols, bits, n_frames)
    image_type = [str(v).upper() for v in (h.get("ImageType") or [])]
    if "MOSAIC" in image_type:
        return _mosaic_frames(path, h)
    if "PerFrameFunctionalGroupsSequence" in h:
        return _enhanced_frames(path, h, n_frames)
    pos = _vec(h.get("ImagePositionPatient"), 3)
    iop = _vec(h.get("ImageOrientationPatient"), 6)
    row_dir = col_dir = None
    if iop is not None:
        row_dir, col_dir = _orthonormal(iop, path)
    spacing = _pixel_spacing(h, path)
    slope, intercept = _rescale(h.get("RescaleSlope"), h.get("RescaleIntercept"), path)
    temporal = (_num(h.get("TemporalPositionIdentifier")), _num(h.get("TriggerTime")),
                str(h.get("AcquisitionTime", "") or ""), _num(h.get("InstanceNumber")))
    if n_frames == 1:
        return [Frame(path, h, None, pos, row_dir, col_dir, spacing, slope, intercept, temporal)]
    # legacy multi-frame: frames are parallel planes along the normal (GridFrameOffsetVector) or, with no
    # geometry, a plain stack
    offsets = h.get("GridFrameOffsetVector")
    if offsets is not None and not isinstance(offsets, (list, tuple, pydicom.multival.MultiValue)):
        offsets = [offsets]
    if offsets is not None and (_vec(offsets, len(offsets)) is None):
        offsets = None  # non-numeric or non-finite offsets: treat the frames as a plain stack
    if pos is not None and row_dir is not None and offsets is not None and len(offsets) == n_frames:
        normal = np.cross(row_dir, col_dir)
        return [Frame(path, h, i, pos + float(o) * normal, row_dir, col_dir, spacing, slope, intercept, (i,))
                for i, o in enumerate(offsets)]
    return [Frame(path, h, i, None, None, None, spacing, slope, intercept, (i,)) for i in range(n_frames)]


def _mosaic_frames(path: Path, h: Dataset) -> list[Frame]:
    """Slices of a Siemens mosaic; nibabel reads the tiling and slice direction from the CSA header."""
    from nibabel.nicom import dicomwrappers

    try:
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            w = dicomwrappers.wrapper_from_data(h)
            n = int(w.n_mosaic)
            tile = (int(w.image_shape[0]), int(w.image_shape[1]))
            a = np.asarray(w.affine, dtype=np.float64)  # (row, column, slice) -> LPS mm
    except Exception as exc:
        raise InputError(f"a Siemens mosaic whose CSA header cannot be read ({type(exc).__name__}: {exc})", path) from None
    if n < 1:
        raise InputError(f"a Siemens mosaic with NumberOfImagesInMosaic={n}", path)
    dy, dx = float(np.linalg.norm(a[:3, 0])), float(np.linalg.norm(a[:3, 1]))
    col_dir, row_dir = a[:3, 0] / dy, a[:3, 1] / dx
    return [Frame(path, h, s, a[:3, 3] + s * a[:3, 2], row_dir, col_dir, (dy, dx), 1.0, 0.0, (s,), ("mosaic",), tile)
            for s in range(n)]


def _enhanced_frames(path: Path, h: Dataset, n_frames: int) -> list[Frame]:
    """Frames of an enhanced multi-frame image: geometry from the functional groups."""
    per_frame = h.PerFrameFunctionalGroupsSequence
    if len(per_frame) != n_frames:
        raise InputError(f"NumberOfFrames={n_frames} but {len(per_frame)} per-frame functional groups", path)
    shared = h.get("SharedFunctionalGroupsSequence", [Dataset()])[0] if h.get("SharedFunctionalGroupsSequence") else Dataset()
    frames = []
    for i, pf in enumerate(per_frame):
        def group(name: str) -> Dataset | None:
            for src in (pf, shared):
                seq = src.get(name)
                if seq:
                    return seq[0]
            return None

        plane_pos, plane_ori = group("PlanePositionSequence"), group("PlaneOrientationSequence")
        measures, value = group("PixelMeasuresSequence"), group("PixelValueTransformationSequence")
        content, echo = group("FrameContentSequence"), group("MREchoSequence")
        pos = _vec(plane_pos.get("ImagePositionPatient") if plane_pos else None, 3)
        iop = _vec(plane_ori.get("ImageOrientationPatient") if plane_ori else None, 6)
        row_dir = col_dir = None
        if iop is not None:
            row_dir, col_dir = _orthonormal(iop, path)
        spacing = _pixel_spacing(measures if measures is not None else h, path)
        slope, intercept = _rescale(value.get("RescaleSlope") if value else h.get("RescaleSlope"),
                                    value.get("RescaleIntercept") if value else h.get("RescaleIntercept"), path)
        temporal = (_num(content.get("TemporalPositionIndex")) if content else None, i)
        stack = (str(content.get("StackID", "")) if content else "",
                 _num(echo.get("EffectiveEchoTime")) if echo else None)
        frames.append(Frame(path, h, i, pos, row_dir, col_dir, spacing, slope, intercept, temporal, stack))
    return frames


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


# ----------------------------------------------------------------------------- pixels
def _pixels(fr: Frame, cache: dict[Path, np.ndarray], rows: int, cols: int) -> np.ndarray:
    arr = cache.get(fr.path)
    if arr is None and fr.stack == ("mosaic",):
        from nibabel.nicom import dicomwrappers

        try:
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                data = dicomwrappers.wrapper_from_data(_dcmread(fr.path)).get_data()  # rescaled
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # decoders written in Rust raise PanicException (a BaseException)
            raise InputError(f"mosaic pixel data cannot be decoded ({type(exc).__name__}: {exc})", fr.path) from None
        arr = cache[fr.path] = np.moveaxis(np.asarray(data), 2, 0)
    if arr is None:
        try:
            with _warnings.catch_warnings():
                _warnings.simplefilter("ignore")
                ds = _dcmread(fr.path, force=True)
                if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
                    raise InputError("has no pixel data", fr.path)
                arr = ds.pixel_array
        except InputError:
            raise
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # decoders written in Rust raise PanicException (a BaseException)
            raise InputError(f"pixel data cannot be decoded ({type(exc).__name__}: {exc})", fr.path) from None
        cache[fr.path] = arr
    if fr.frame is not None:
        n = int(fr.header.get("NumberOfFrames", 1) or 1) if fr.stack != ("mosaic",) else arr.shape[0]
        if arr.ndim != 3 or arr.shape[0] != n:
            raise InputError(f"decoded pixel data has shape {arr.shape}, expected {n} frames", fr.path)
        arr = arr[fr.frame]
    if arr.shape != (rows, cols):
        raise InputError(f"decoded pixel data has shape {arr.shape}, expected {rows}x{cols}", fr.path)
    out = arr.astype(np.float32)
    if fr.slope != 1.0:
        out *= np.float32(fr.slope)
    if fr.intercept != 0.0:
        out += np.float32(fr.intercept)
    return out


def _frame_shape(fr: Frame) -> tuple[int, int]:
    """(rows, columns) of one frame; a mosaic tile is smaller than the stored image."""
    return fr.shape or (int(fr.header.Rows), int(fr.header.Columns))


def _int_attr(h: Dataset, keyword: str, default: int, path: Path) -> int:
    """An integer attribute (``default`` when absent or empty); a malformed one is an InputError."""
    value = h.get(keyword, default)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise InputError(f"invalid {keyword} {value!r}", path) from None


def _check_pixel_size(path: Path, h: Dataset, rows: int, cols: int, bits: int, n_frames: int) -> None:
    """Refuse headers whose image size cannot match the file before anything is allocated.

    Native (uncompressed) pixel data must fit in the file; compressed data needs at least one
    8-byte fragment item per frame. The decoded float32 volume must also fit in free memory.
    """
    size = path.stat().st_size
    ts = getattr(getattr(h, "file_meta", None), "TransferSyntaxUID", None)
    try:
        compressed = bool(ts) and (bool(ts.is_compressed) or bool(ts.is_deflated))  # deflate: any size
    except (AttributeError, ValueError):  # an unknown transfer syntax: no size can be promised
        compressed = True
    expected = rows * cols * n_frames * max(bits, 8) // 8 if bits != 1 else (rows * cols * n_frames + 7) // 8
    if not compressed and expected > size:
        raise InputError(f"the header describes {n_frames} frame(s) of {rows}x{cols} at {bits} bits "
                         f"({expected} bytes) but the file holds only {size} bytes", path)
    if compressed and n_frames * 8 > size:
        raise InputError(f"NumberOfFrames={n_frames} cannot fit in a {size}-byte file", path)
    _check_memory(rows * cols * n_frames * 4, path)


def _check_memory(nbytes: int, path: Path) -> None:
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return
    if nbytes > 0.8 * available:
        raise InputError(f"the volume needs {nbytes / 2**30:.1f} GiB as float32 but only {available / 2**30:.1f} GiB "
                         f"of memory is free", path)


# ----------------------------------------------------------------------------- small helpers
def _float(v: Any) -> float | None:
    try:
        if v is None or v == "":
            return None
        f = float(v[0] if isinstance(v, (list, tuple, pydicom.multival.MultiValue)) else v)
        return f if math.isfinite(f) else None
    except (TypeError, ValueError):
        return None


def _num(v: Any) -> float | None:
    return _float(v)


def _sortable(v: Any) -> tuple:
    """Sort key mixing numbers, strings and missing values (missing last)."""
    if v is None or v == "":
        return (2, 0.0, "")
    if isinstance(v, (int, float)):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _vec(v: Any, n: int) -> np.ndarray | None:
    if v is None:
        return None
    try:
        a = np.array([float(x) for x in v], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.shape != (n,) or not np.all(np.isfinite(a)):
        return None
    return a


def _orthonormal(iop: np.ndarray, path: Path) -> tuple[np.ndarray, np.ndarray]:
    r, c = iop[:3], iop[3:]
    nr, nc = np.linalg.norm(r), np.linalg.norm(c)
    if not (np.isfinite(nr) and np.isfinite(nc)) or nr < 1e-6 or nc < 1e-6 or abs(r @ c) / (nr * nc) > 1e-2:
        raise InputError(f"degenerate ImageOrientationPatient {iop.tolist()}", path)
    return r / nr, c / nc


def _pixel_spacing(h: Dataset, path: Path) -> tuple[float, float]:
    ps = h.get("PixelSpacing") or h.get("ImagerPixelSpacing")
    if ps is None:
        return (1.0, 1.0)
    v = _vec(ps, 2)
    if v is None or np.any(v <= 0):
        raise InputError(f"invalid PixelSpacing {ps!r}", path)
    return float(v[0]), float(v[1])


def _rescale(slope: Any, intercept: Any, path: Path) -> tuple[float, float]:
    s = 1.0 if slope in (None, "") else _float(slope)
    i = 0.0 if intercept in (None, "") else _float(intercept)
    if s is None or i is None or s == 0:
        raise InputError(f"invalid RescaleSlope/RescaleIntercept ({slope!r}, {intercept!r})", path)
    return s, i


def _fg(fr: Frame, group: str, name: str) -> Any:
    h = fr.header
    for src in ((h.PerFrameFunctionalGroupsSequence[fr.frame],) if fr.frame is not None and "PerFrameFunctionalGroupsSequence" in h else ()) + (
            (h.SharedFunctionalGroupsSequence[0],) if h.get("SharedFunctionalGroupsSequence") else ()):
        seq = src.get(group)
        if seq and name in seq[0]:
            return seq[0].get(name)
    return None


def _window(fr: Frame) -> tuple[float, float] | None:
    c = _float(fr.header.get("WindowCenter")) or _float(_fg(fr, "FrameVOILUTSequence", "WindowCenter"))
    w = _float(fr.header.get("WindowWidth")) or _float(_fg(fr, "FrameVOILUTSequence", "WindowWidth"))
    if c is None or not w or w <= 0:
        return None
    return (c, w)


def _n_frames(h: Dataset) -> int:
    """NumberOfFrames of a file (1 when absent or unreadable; a mosaic's tiles are not frames)."""
    try:
        return int(h.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1


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
