"""Write a :class:`Volume` as a derived classic DICOM series (CT or MR Image Storage).

One file per slice, Explicit VR Little Endian, with preamble and file meta. The series is new
(fresh SeriesInstanceUID and SOPInstanceUIDs from :func:`pydicom.uid.generate_uid`, which is
random-based); the Patient and Study modules come from the source header
(``meta["dicom_header"]``), the Frame of Reference is kept (same patient space), and every slice
points back at its source image (SourceImageSequence, Common Instance Reference). Nothing else is
copied blindly: the dataset is built from scratch, so private tags, icons, overlays and the
per-frame functional groups of an enhanced source never reach the output.

Geometry comes from the Volume (index ``(k, j, i)`` -> LPS mm): ImagePositionPatient of slice
``k`` is :attr:`Volume.slice_positions` ``[k]``, the source slice's own position (for an evenly
spaced volume ``origin + k * affine[:3, 0]``; a gantry tilt keeps its shear in the positions);
SliceThickness is the source slice's own, SpacingBetweenSlices (MR) the distance to the
neighbouring slice; ImageOrientationPatient is (normalised ``affine[:3, 2]``, normalised
``affine[:3, 1]``) and PixelSpacing is ``(|affine[:3, 1]|, |affine[:3, 2]|)`` (row, column).

Pixels are signed 16-bit with one RescaleSlope/RescaleIntercept per series, chosen so the float
range fits without clipping and the round-trip error is at most half a slope step.

Only CT and MR are written (the classic CT/MR IODs carry the full patient geometry; Secondary
Capture would lose it); any other modality is refused with :class:`OutputError`.
"""
from __future__ import annotations

import copy
import datetime as _dt
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..deidentify import Deidentifier, as_deidentifier, check_burned_in
from ..errors import Cancelled, OutputError
from ..volume import Volume
from .dicom_conform import conform, drop_empty_sequences, safe_deidentified_description, valid_uid
from .atomic import atomic_dir
from .dicom_encode import SharedElementWriter

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
_STORAGE = {"CT": CT_IMAGE_STORAGE, "MR": MR_IMAGE_STORAGE}

# PS3.16 CID 7203 "Image Derivation" codes, by restoration task (an unknown task gets no code).
_DERIVATION_CODES: dict[str, tuple[str, str]] = {
    "denoise": ("113087", "Smoothing"),
    "smooth": ("113087", "Smoothing"),
    "deblur": ("113086", "Edge enhancement"),
    "sharpen": ("113086", "Edge enhancement"),
    "enhance-edges": ("113086", "Edge enhancement"),
    "enhance_edges": ("113086", "Edge enhancement"),
    "edges": ("113086", "Edge enhancement"),
    "resample": ("113085", "Spatial resampling"),
}
# PS3.16 CID 7202 "Source Image Purposes of Reference".
_PURPOSE_SOURCE = ("121322", "Source image for image processing operation")

# Patient, Patient Study, General Study (and Clinical Trial) attributes copied from the source.
_PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence",
    "PatientComments", "PatientIdentityRemoved", "DeidentificationMethod",
    "DeidentificationMethodCodeSequence", "EthnicGroup", "PatientSpeciesDescription",
    "PatientBreedDescription", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientAge", "PatientSize", "PatientWeight", "AdmittingDiagnosesDescription",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "ProcedureCodeSequence",
    "ReferencedStudySequence",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID", "ClinicalTrialTimePointID",
)
# Series-level and acquisition attributes that still describe the derived images truthfully.
_COMMON_KEYWORDS = (
    "BodyPartExamined", "ProtocolName", "PatientPosition", "PositionReferenceIndicator",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime",
)
_CT_KEYWORDS = (
    "ScanOptions", "KVP", "DataCollectionDiameter", "ReconstructionDiameter",
    "DistanceSourceToDetector", "DistanceSourceToPatient", "GantryDetectorTilt", "TableHeight",
    "RotationDirection", "ExposureTime", "XRayTubeCurrent", "Exposure", "FilterType",
    "GeneratorPower", "FocalSpots", "ConvolutionKernel", "RevolutionTime",
    "SingleCollimationWidth", "TotalCollimationWidth", "TableSpeed", "TableFeedPerRotation",
    "SpiralPitchFactor",
)
_MR_KEYWORDS = (
    "ScanOptions", "MRAcquisitionType", "SequenceName", "AngioFlag", "RepetitionTime",
    "EchoTime", "EchoTrainLength", "InversionTime", "NumberOfAverages", "ImagingFrequency",
    "ImagedNucleus", "MagneticFieldStrength", "NumberOfPhaseEncodingSteps", "PercentSampling",
    "PercentPhaseFieldOfView", "PixelBandwidth", "ReceiveCoilName", "TransmitCoilName",
    "AcquisitionMatrix", "InPlanePhaseEncodingDirection", "FlipAngle", "SAR",
)
_INT16 = (-32768, 32767)
# BodyPartExamined values (PS3.16 Annex L) that are not paired, so Laterality is not needed.
_UNPAIRED_BODY_PARTS = {
    "HEAD", "BRAIN", "SKULL", "NECK", "HEADNECK", "CSPINE", "TSPINE", "LSPINE", "SSPINE", "SPINE",
    "CHEST", "THORAX", "HEART", "ABDOMEN", "PELVIS", "ABDOMENPELVIS", "CHESTABDOMEN",
    "CHESTABDPELVIS", "WHOLEBODY", "LIVER", "PANCREAS", "SPLEEN", "STOMACH", "BLADDER",
    "PROSTATE", "UTERUS", "AORTA", "PITUITARY", "SPINALCORD", "SACRUM", "COCCYX", "MEDIASTINUM",
}


def write_dicom_series(volume: Volume, folder: str | os.PathLike, *, overwrite: bool = False,
                       series_description: str | None = None, modality: str | None = None,
                       derivation: str | None = None,
                       progress: Callable[[int, int], Any] | None = None,
                       cancel: Callable[[], bool] | None = None,
                       deidentify: "bool | Deidentifier" = False, accept_burned_in: bool = False,
                       window: tuple[float, float] | None = None, keep_description: bool = False) -> Path:
    """Write ``volume`` (3-D, ``(z, y, x)``) as a new derived DICOM series into ``folder``.

    Args:
        volume: the image; ``meta["dicom_header"]`` (a pydicom Dataset), ``meta["source_sops"]``
            (one ``{"sop_class", "sop_instance", "frame"}`` per z slice), ``meta["series_uid"]``,
            ``meta["frame_of_reference_uid"]``, ``meta["window"]`` and ``meta["provenance"]``
            are used when present. Without a DICOM source a new patient/study is made up
            (``Anonymous^`` placeholders, generated UIDs). The volume is never modified.
        folder: the output folder (one ``IM#####.dcm`` per slice), written atomically.
        overwrite: replace an existing ``folder``; otherwise an existing one is an error.
        series_description: the SeriesDescription to use verbatim; default: the source's
            description plus a suffix naming the steps in ``meta["provenance"]``
            (e.g. ``"STD BRAIN 5MM [denoise-ct]"``).
        modality: ``"CT"`` or ``"MR"``; default the volume's modality.
        derivation: DerivationDescription text; default built from the provenance.
        progress: called as ``progress(done, total)`` after each slice.
        cancel: polled before each slice; returning True raises :class:`Cancelled`, leaving
            nothing behind.
        deidentify: apply the PS3.15 Annex E basic profile (see :mod:`napari_restore.deidentify`):
            ``True`` for a fresh random mapping, or one :class:`~napari_restore.deidentify.Deidentifier`
            shared by several exports so series of one study keep one Study/FrameOfReference UID.
        accept_burned_in: export de-identified even though the source says
            ``BurnedInAnnotation = YES`` (refused otherwise).
        window: ``(center, width)`` in output units; default: the source's window (so the
            derived series opens with the source's contrast), else the 1-99.5 percentiles.
        keep_description: with ``deidentify``: keep the source's SeriesDescription (PS3.15 Clean
            Descriptors Option: the user vouches that it identifies no one); by default a
            de-identified series is named by its steps and models plus "de-identified".

    Returns:
        ``Path(folder)``.

    Raises:
        OutputError: 4-D volume, a modality other than CT/MR, NaN/inf voxels, a non-orthogonal
            in-plane geometry, an existing target without ``overwrite``, a failed write, or a
            de-identified export of a source with burned-in annotation (without ``accept_burned_in``).
        Cancelled: ``cancel()`` returned True.
    """
    import pydicom

    folder = Path(folder)
    if volume.array.ndim != 3:
        raise OutputError(f"only 3-D volumes can be written as a DICOM series, got shape "
                          f"{volume.array.shape}; write 4-D data as NIfTI", folder)
    mod = (modality or volume.modality or "").upper()
    if mod not in _STORAGE:
        raise OutputError(f"cannot write modality {mod!r} as DICOM: only CT and MR Image Storage are "
                          "supported; pass modality='CT' or modality='MR'", folder)
    bad = int(np.size(volume.array) - np.count_nonzero(np.isfinite(volume.array)))
    if bad:
        raise OutputError(f"the volume holds {bad} non-finite voxels (NaN/inf); DICOM integers cannot store them", folder)
    meta = volume.meta or {}
    header = meta.get("dicom_header")
    deid = as_deidentifier(deidentify)
    if deid is not None:
        check_burned_in(header, accept_burned_in, folder)
    geometry = _geometry(volume, folder)
    slope, intercept = choose_rescale(volume.array, mod)

    now = _dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    series_uid = pydicom.uid.generate_uid()
    base = _series_template(volume, header, mod, geometry, slope, intercept, date, time, series_uid,
                            series_description, derivation, window)
    deid_description = None  # the basic profile removes SeriesDescription: name the series again
    if deid is not None:
        deid_description = (str(base.get("SeriesDescription", "")) if keep_description
                            else series_description or safe_deidentified_description(meta))
    study_id_dummy = deid.pseudonym("StudyID:" + str(base.get("StudyInstanceUID", ""))) if deid is not None else None
    sops = meta.get("source_sops") or []
    source_series = meta.get("series_uid") or (getattr(header, "SeriesInstanceUID", None) if header is not None else None)
    if len(sops) != volume.array.shape[0]:
        sops = []  # geometry no longer slice-to-slice with the source: no per-slice reference
    if source_series and not valid_uid(source_series):
        source_series = None  # an invalid UID references nothing

    nz = volume.array.shape[0]
    writer = SharedElementWriter(base, "NAPARI_RESTORE")
    with atomic_dir(folder, overwrite) as tmp:
        for k in range(nz):
            if cancel is not None and cancel():
                raise Cancelled(f"{folder}: DICOM export cancelled; nothing was written")
            # de-identification edits values in place, so it needs a deep copy; otherwise the slices share
            # the template's unchanged elements (encoded once) and only per-slice ones are new elements
            ds = copy.deepcopy(base) if deid is not None else pydicom.Dataset(base)
            ds.SOPInstanceUID = pydicom.uid.generate_uid()
            ds.InstanceNumber = k + 1
            pos = geometry["positions"][k]
            ds.ImagePositionPatient = [_ds(v) for v in pos]
            ds.SliceLocation = _ds(float(pos @ geometry["normal"]))
            if sops and sops[k].get("thickness"):
                _set_own(ds, "SliceThickness", _ds(float(sops[k]["thickness"])))
            if mod == "MR" and nz > 1 and not geometry["uniform"]:
                _set_own(ds, "SpacingBetweenSlices", _ds(geometry["local_steps"][k]))
            if sops and valid_uid(sops[k].get("sop_instance")):  # a blanked or invalid UID cannot be referenced
                _add_source_reference(ds, sops[k], source_series, header, mod)
            ds.PixelData = _stored_pixels(volume.array[k], slope, intercept)
            if deid is not None:
                deid.apply(ds)
                drop_empty_sequences(ds)
                if deid_description is not None:
                    ds.SeriesDescription = deid_description
                if not str(ds.get("StudyID", "") or ""):
                    ds.StudyID = study_id_dummy  # Z allows a dummy; DICOMDIRs need a Study ID
            writer.write(tmp / f"IM{k + 1:05d}.dcm", ds)
            if progress is not None:
                progress(k + 1, nz)
    return folder


def _stored_pixels(plane: np.ndarray, slope: float, intercept: float) -> bytes:
    """``plane`` (physical units) as little-endian int16 bytes: ``rint((v - intercept) / slope)``."""
    if (slope, intercept) == (1.0, 0.0) and plane.dtype in (np.float32, np.float64):
        stored = np.rint(plane)  # exact in float32 for the int16 range: no float64 copy needed
    else:
        stored = np.rint((plane.astype(np.float64) - intercept) / slope)
    return np.clip(stored, *_INT16).astype("<i2").tobytes()


def _set_own(ds, keyword: str, value: Any) -> None:
    """Set ``keyword`` in a slice's dataset as its own element: assigning over an element it shares
    with the series template would change the template's (pydicom edits an existing element in place)."""
    if keyword in ds:
        del ds[keyword]
    setattr(ds, keyword, value)


# --------------------------------------------------------------------------- intensities
def choose_rescale(array: np.ndarray, modality: str) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept (exactly as written to the DS strings) for int16 storage.

    CT: slope 1, intercept 0 whenever the rounded HU fit into int16 (the usual HU integers);
    otherwise, and for MR, integer data that fit int16 keep slope 1, other data get intercept 0
    (MR, so readers that ignore rescaling still see proportional values) or the mid-range (CT)
    and the smallest slope that maps the range into int16 without clipping.
    The round-trip error ``|stored * slope + intercept - value|`` is at most ``slope / 2``.
    """
    finite = array[np.isfinite(array)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    fits = np.rint(lo) >= _INT16[0] and np.rint(hi) <= _INT16[1]
    if fits and (modality == "CT" or np.all(finite == np.rint(finite))):
        return 1.0, 0.0
    if modality == "CT":
        intercept = float(_ds((lo + hi) / 2))
    else:
        intercept = 0.0
    half_range = max(hi - intercept, intercept - lo, 1e-30)
    slope = float(_ds(half_range / 32766.0, up=True))
    while max(hi - intercept, intercept - lo) / slope > 32767 - 0.5:
        slope = float(_ds(slope * (1 + 1e-6), up=True))
    return slope, intercept


def _window(volume: Volume, modality: str, explicit: tuple[float, float] | None = None) -> tuple[float, float]:
    """(center, width) in output units: ``explicit``, else the source's window, else the 1-99.5 percentiles."""
    window = explicit if explicit is not None else (volume.meta or {}).get("window")
    if window is not None:
        return float(window[0]), max(float(window[1]), 1.0)
    a = volume.array
    sample = a[:: max(1, a.shape[0] // 16)].ravel()
    sample = sample[np.isfinite(sample)]
    if not sample.size:
        return 0.0, 1.0
    lo, hi = np.percentile(sample, [1.0, 99.5])
    return float((lo + hi) / 2), max(float(hi - lo), 1.0)  # PS3.3 C.11.2.1.2: width >= 1


# --------------------------------------------------------------------------- geometry
def _geometry(volume: Volume, folder: Path) -> dict[str, Any]:
    aff = volume.affine
    col_i, col_j, step = aff[:3, 2], aff[:3, 1], aff[:3, 0]
    di, dj = float(np.linalg.norm(col_i)), float(np.linalg.norm(col_j))
    row_cos, col_cos = col_i / di, col_j / dj
    if abs(row_cos @ col_cos) > 1e-4:
        raise OutputError("the in-plane axes of the volume are not orthogonal; DICOM ImageOrientationPatient "
                          "cannot hold that (only the slice axis may be sheared, as in a gantry tilt)", folder)
    normal = np.cross(row_cos, col_cos)
    positions = volume.slice_positions
    offsets = (positions - positions[0]) @ normal
    steps = np.abs(np.diff(offsets))
    local = np.concatenate([steps, steps[-1:]]) if steps.size else np.array([abs(normal @ step)])
    return {"row_cos": row_cos, "col_cos": col_cos, "pixel_spacing": (dj, di), "step": step,
            "origin": aff[:3, 3].copy(), "normal": normal, "positions": positions,
            "uniform": volume.is_uniform, "local_steps": local,
            "slice_distance": float(abs(normal @ step)) if volume.is_uniform else float(np.min(local))}


# --------------------------------------------------------------------------- header
def _series_template(volume: Volume, header, modality: str, geo: dict[str, Any], slope: float,
                     intercept: float, date: str, time: str, series_uid: str,
                     series_description: str | None, derivation: str | None,
                     window: tuple[float, float] | None = None):
    """The dataset shared by all slices (no SOPInstanceUID, position or pixels yet)."""
    import pydicom
    from pydicom.dataset import Dataset

    from .. import __version__

    meta = volume.meta or {}
    ds = Dataset()
    if header is not None:
        for kw in ("SpecificCharacterSet",) + _PATIENT_STUDY_KEYWORDS + _COMMON_KEYWORDS + (
                _CT_KEYWORDS if modality == "CT" else _MR_KEYWORDS):
            _copy(header, ds, kw)
    else:
        ds.PatientName = "Anonymous^"
        ds.PatientID = "ANON-" + uuid.uuid4().hex[:8].upper()
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.StudyInstanceUID = pydicom.uid.generate_uid()
        ds.StudyDate, ds.StudyTime = date, time
        ds.ReferringPhysicianName = ""
        ds.StudyID = "NR" + uuid.uuid4().hex[:6].upper()  # a placeholder, needed for DICOMDIRs
        ds.AccessionNumber = ""
        ds.StudyDescription = "napari-restore export"
    if meta.get("study_uid") and header is not None:
        ds.StudyInstanceUID = meta["study_uid"]
    for kw in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber"):  # Type 2: present, maybe empty
        if kw not in ds:
            setattr(ds, kw, "")
    if not str(ds.get("StudyInstanceUID", "") or ""):  # an anonymised source may have blanked it
        ds.StudyInstanceUID = pydicom.uid.generate_uid()

    # SOP Common, General Series, Frame of Reference, General Equipment
    ds.SOPClassUID = _STORAGE[modality]
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = _series_number(header)
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = _series_description(meta, header, series_description)
    if "PatientPosition" not in ds:
        ds.PatientPosition = ""
    if header is not None and "Laterality" in header:
        _copy(header, ds, "Laterality")
    elif str(ds.get("BodyPartExamined", "") or "").upper() not in _UNPAIRED_BODY_PARTS:
        ds.Laterality = ""  # Type 2C: required unless the body part is unpaired; empty = unknown
    ds.FrameOfReferenceUID = (meta.get("frame_of_reference_uid")
                              or (getattr(header, "FrameOfReferenceUID", None) if header is not None else None)
                              or pydicom.uid.generate_uid())
    if "PositionReferenceIndicator" not in ds:
        ds.PositionReferenceIndicator = ""
    ds.Manufacturer = "napari-restore"
    ds.ManufacturerModelName = "napari-restore"
    ds.SoftwareVersions = __version__

    # General Image / General Reference
    ds.ContentDate, ds.ContentTime = date, time
    ds.ImageType = _image_type(header, modality)
    ds.DerivationDescription = (derivation or _derivation_text(meta, header is not None))[:1024]
    codes = _derivation_codes(meta)
    if codes:
        ds.DerivationCodeSequence = [_code(v, m) for v, m in codes]
    # derived pixels keep whatever text the source had burned in
    burned = str(getattr(header, "BurnedInAnnotation", "") or "").upper() if header is not None else ""
    ds.BurnedInAnnotation = "YES" if burned == "YES" else "NO"
    _lossy_flags(header, ds)
    if "AcquisitionNumber" not in ds:
        ds.AcquisitionNumber = ""

    # Image Plane
    ds.PixelSpacing = [_ds(v) for v in geo["pixel_spacing"]]
    ds.ImageOrientationPatient = [_ds(v) for v in np.concatenate([geo["row_cos"], geo["col_cos"]])]
    thickness = meta.get("slice_thickness") or (getattr(header, "SliceThickness", None) if header is not None else None)
    ds.SliceThickness = _ds(float(thickness) if thickness not in (None, "") else geo["slice_distance"])
    if modality == "MR":
        ds.SpacingBetweenSlices = _ds(geo["slice_distance"])

    # Image Pixel, CT/MR Image, VOI LUT
    nz, ny, nx = volume.array.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = ny, nx
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if modality == "CT" or (slope, intercept) != (1.0, 0.0):  # the MR IOD has no Modality LUT: omit an identity
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
    if modality == "CT":
        ds.RescaleType = "HU"
        if "KVP" not in ds:
            ds.KVP = ""
    else:
        _mr_sequence(header, ds)
    center, width = _window(volume, modality, window)
    ds.WindowCenter, ds.WindowWidth = _ds(center), _ds(width)

    text = "".join(str(ds.get(kw, "")) for kw in ("SeriesDescription", "DerivationDescription", "StudyDescription"))
    conform(ds, str(ds.get("BodyPartExamined", "") or "").upper() in _UNPAIRED_BODY_PARTS)
    if "SpecificCharacterSet" not in ds and not text.isascii():
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _copy(src, dst, keyword: str) -> None:
    if keyword in src:
        elem = src[keyword]
        dst[elem.tag] = copy.deepcopy(elem)


def _series_number(header) -> int:
    try:
        n = int(header.SeriesNumber) if header is not None else 0
    except (AttributeError, TypeError, ValueError):
        n = 0
    return n + 1000 if 0 < n + 1000 < 2**31 else 1000


def _steps(meta: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in meta.get("provenance") or [] if isinstance(s, dict)]


def _step_name(step: dict[str, Any]) -> str:
    return str(step.get("model") or step.get("task") or step.get("name") or step.get("step") or "processed")


def _series_description(meta: dict[str, Any], header, explicit: str | None) -> str:
    if explicit is not None:
        return explicit[:64]
    source = str(meta.get("description") or (getattr(header, "SeriesDescription", "") if header is not None else ""))
    names = list(dict.fromkeys(_step_name(s) for s in _steps(meta)))
    suffix = f" [{', '.join(names)}]" if names else " [napari-restore]"
    return (source[: max(0, 64 - len(suffix))] + suffix).strip()[:64]


def _derivation_text(meta: dict[str, Any], has_source: bool) -> str:
    parts = []
    for s in _steps(meta):
        bits = [str(s.get("task") or s.get("name") or "processing")]
        for key in ("model", "model_version", "mode", "software"):
            if s.get(key):
                bits.append(f"{key}={s[key]}")
        parts.append(" ".join(bits))
    what = "; ".join(parts) if parts else "converted"
    src = "" if has_source else f" from {Path(str(meta['source_path'])).name}" if meta.get("source_path") else ""
    return f"napari-restore: {what}{src}; stored as int16 with rescale slope/intercept"


def _derivation_codes(meta: dict[str, Any]) -> list[tuple[str, str]]:
    codes = []
    for s in _steps(meta):
        task = str(s.get("task") or "").lower()
        if task in _DERIVATION_CODES and _DERIVATION_CODES[task] not in codes:
            codes.append(_DERIVATION_CODES[task])
    return codes


def _code(value: str, meaning: str):
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
    return item


def _image_type(header, modality: str) -> list[str]:
    src = _as_list(getattr(header, "ImageType", None) if header is not None else None)
    third = src[2] if len(src) > 2 else ""
    if modality == "CT":  # CT Image Module C.8.2.1.1.1: value 3 is AXIAL or LOCALIZER
        return ["DERIVED", "SECONDARY", third if third in ("AXIAL", "LOCALIZER") else "AXIAL"]
    # MR Image Module C.8.3.1.1.1: value 3 is required; keep a defined term, else OTHER
    return ["DERIVED", "SECONDARY", third if third in _MR_IMAGE_TYPE_3 else "OTHER"]


_MR_IMAGE_TYPE_3 = {"MPR", "PROJECTION IMAGE", "T1 MAP", "T2 MAP", "DIFFUSION MAP", "DENSITY MAP",
                    "PHASE MAP", "VELOCITY MAP", "IMAGE ADDITION", "PHASE SUBTRACT",
                    "MODULUS SUBTRACT", "OTHER"}


def _as_list(value) -> list[str]:
    """A DICOM multi-valued string as a list (a single value arrives as a plain str)."""
    if value in (None, ""):
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _lossy_flags(header, ds) -> None:
    """PS3.3 C.7.6.1.1.5: once lossy, always '01' (with ratio/method history); '00' only if the source said so."""
    if header is None:
        return
    flag = str(getattr(header, "LossyImageCompression", "") or "")
    ts = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    lossy_ts = str(ts) in _LOSSY_TRANSFER_SYNTAXES if ts else False
    if flag == "01" or lossy_ts:
        ds.LossyImageCompression = "01"
        for kw in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            _copy(header, ds, kw)
    elif flag == "00":
        ds.LossyImageCompression = "00"


# Transfer syntaxes that are always lossy (baseline/extended JPEG, MPEG-2/4, HEVC). Those that
# may be either (JPEG 2000, JPEG-LS near-lossless, HTJ2K) count as lossy only when the source says 01.
_LOSSY_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.100",
    "1.2.840.10008.1.2.4.101", "1.2.840.10008.1.2.4.102", "1.2.840.10008.1.2.4.103",
    "1.2.840.10008.1.2.4.104", "1.2.840.10008.1.2.4.105", "1.2.840.10008.1.2.4.106",
    "1.2.840.10008.1.2.4.107", "1.2.840.10008.1.2.4.108",
}


def _find(header, keyword: str):
    """``keyword`` at the top level of ``header`` or inside its shared functional groups (enhanced MR)."""
    if header is None:
        return None
    if keyword in header:
        return header[keyword]
    for group in getattr(header, "SharedFunctionalGroupsSequence", []) or []:
        for elem in group:
            if elem.VR == "SQ":
                for item in elem.value:
                    if keyword in item:
                        return item[keyword]
    return None


def _mr_sequence(header, ds) -> None:
    """MR Image Module: ScanningSequence/SequenceVariant (Type 1), timing (Type 2/2C)."""
    scanning = _as_list(getattr(header, "ScanningSequence", None) if header is not None else None)
    if not scanning and header is not None:  # enhanced MR source: map its pulse-sequence attributes
        pulse = str(getattr(header, "EchoPulseSequence", "") or "")
        scanning = {"SPIN": ["SE"], "GRADIENT": ["GR"], "BOTH": ["SE", "GR"]}.get(pulse, [])
        if str(getattr(header, "InversionRecovery", "")) == "YES":
            scanning.append("IR")
        if str(getattr(header, "EchoPlanarPulseSequence", "")) == "YES":
            scanning.append("EP")
    ds.ScanningSequence = scanning or ["RM"]  # RM = research mode: acquisition unknown
    variant = getattr(header, "SequenceVariant", None) if header is not None else None
    ds.SequenceVariant = variant if variant else "NONE"
    for kw, alt in (("RepetitionTime", None), ("EchoTime", "EffectiveEchoTime"),
                    ("EchoTrainLength", None), ("InversionTime", None), ("FlipAngle", None)):
        if kw not in ds:
            elem = _find(header, kw) or (_find(header, alt) if alt else None)
            if elem is not None and elem.value not in (None, ""):
                setattr(ds, kw, elem.value)
    if "IR" not in ds.ScanningSequence and "InversionTime" in ds:
        del ds.InversionTime  # PS3.3 C.8.3.1: InversionTime only with an inversion-recovery sequence
    for kw in ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength"):
        if kw not in ds:
            setattr(ds, kw, "")
    if "RepetitionTime" not in ds:
        ds.RepetitionTime = ""


def _add_source_reference(ds, sop: dict[str, Any], source_series: str | None, header, modality: str) -> None:
    """SourceImageSequence (per slice) and the Common Instance Reference to the source series."""
    from pydicom.dataset import Dataset

    sop_class = str(sop.get("sop_class") or "")
    if not sop_class:  # some scanners leave SOPClassUID empty: fall back to the file meta, then the modality
        fm = getattr(header, "file_meta", None) if header is not None else None
        sop_class = str(getattr(fm, "MediaStorageSOPClassUID", "") or "") or _STORAGE[modality]
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = str(sop["sop_instance"])
    if sop.get("frame") is not None:
        item.ReferencedFrameNumber = int(sop["frame"])
    item.PurposeOfReferenceCodeSequence = [_code(*_PURPOSE_SOURCE)]
    ds.SourceImageSequence = [item]
    if source_series:
        inst = Dataset()
        inst.ReferencedSOPClassUID = sop_class
        inst.ReferencedSOPInstanceUID = str(sop["sop_instance"])
        series = Dataset()
        series.SeriesInstanceUID = str(source_series)
        series.ReferencedInstanceSequence = [inst]
        ds.ReferencedSeriesSequence = [series]


# --------------------------------------------------------------------------- DS helpers
def _ds(value: float, up: bool = False) -> str:
    """A DS string of at most 16 characters for ``value``; with ``up``, never below ``value``."""
    from pydicom.valuerep import format_number_as_ds

    v = float(value)
    if abs(v) < 1e-10:
        return "0"
    text = format_number_as_ds(v)
    while up and float(text) < v:
        text = format_number_as_ds(float(text) * (1 + 1e-9))
    return text


__all__ = ["write_dicom_series", "choose_rescale"]
