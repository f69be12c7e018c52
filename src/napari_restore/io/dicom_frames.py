"""One DICOM file as frames: safe header reading, DICOMDIR listing, multi-frame and mosaic files, pixels.

:func:`frames_of` turns a file into :class:`Frame` objects (one per 2-D image: a single-frame file,
each frame of an enhanced multi-frame file, each tile of a Siemens mosaic) with their geometry and
rescale; :func:`_pixels` decodes one frame's pixels (pydicom + pylibjpeg) in physical units, after
size and memory checks. Grouping frames into series and building a Volume is
:mod:`napari_restore.io.dicom_read`'s.
"""
from __future__ import annotations

import logging
import math
import os
import warnings as _warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from ..errors import InputError
from .dicom_safe import dcmread as _dcmread
from .dicom_safe import pixel_element as _pixel_element
from .dicom_safe import inside as _inside

log = logging.getLogger(__name__)


DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
#: SOP classes that never hold a greyscale image volume (reports, structures, presentation states...).
_NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.11", "1.2.840.10008.5.1.4.1.1.481.3",
                       "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.104")


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
    if arr is None:  # (a mosaic is decoded above)
        arr = _native_pixels(fr)  # None: decode below from the whole file, which says what is wrong
        if arr is not None:
            cache[fr.path] = arr
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


def _native_pixels(fr: Frame) -> np.ndarray | None:
    """The pixels of an uncompressed little-endian file, decoded from its header's image pixel
    module and the Pixel Data element read where the header parse stopped
    (:func:`~napari_restore.io.dicom_safe.pixel_element`), without parsing the file again; None
    when that cannot be done or fails."""
    try:
        elem = _pixel_element(fr.path, fr.header)
        if elem is None:
            return None
        ds = fr.header.group_dataset(0x0028)
        ds.file_meta = fr.header.file_meta
        ds.add(elem)
        with _warnings.catch_warnings():
            _warnings.simplefilter("ignore")
            return ds.pixel_array
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException:  # noqa: BLE001 - the whole-file path raises the InputError
        return None


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


def _n_frames(h: Dataset) -> int:
    """NumberOfFrames of a file (1 when absent or unreadable; a mosaic's tiles are not frames)."""
    try:
        return int(h.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return 1
