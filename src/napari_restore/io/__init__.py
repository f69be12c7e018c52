"""Load and save dispatch: DICOM (file, folder, DICOMDIR, enhanced multi-frame), NIfTI, MHA/NRRD."""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError, OutputError
from ..volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
SITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in NIFTI_SUFFIXES[::-1] + SITK_SUFFIXES:
        if name.endswith(s):
            return s
    return path.suffix.lower()


def load(path: str | os.PathLike) -> list[Volume]:
    """Read a file or folder into Volumes, one per image series, the main series first.

    Accepts a DICOM file, a folder of DICOM files (recursive, DICOMDIR or not), an enhanced
    multi-frame DICOM, ``.nii``/``.nii.gz``, ``.mha``/``.mhd``/``.nrrd``.

    Raises:
        InputError: the path does not exist, holds nothing readable, or is corrupt.
    """
    path = Path(path)
    if not path.exists():
        raise InputError("no such file or folder", path)
    suffix = _suffix(path)
    if path.is_file() and suffix in NIFTI_SUFFIXES:
        from .nifti import read_nifti

        return [read_nifti(path)]
    if path.is_file() and suffix in SITK_SUFFIXES:
        from .nifti import read_sitk

        return [read_sitk(path)]
    from .dicom_read import read_dicom

    return read_dicom(path)


def save(volume: Volume, path: str | os.PathLike, format: str | None = None,
         overwrite: bool = False, resample: str | None = None, **kwargs) -> Path:
    """Write ``volume`` to ``path``; the format follows the suffix or ``format``.

    ``.nii``/``.nii.gz``/``.mha``/``.nrrd`` by suffix; a path without a suffix, an existing
    folder, or ``format="dicom"`` writes a DICOM series (one file per slice) into that folder.
    Extra keyword arguments go to the DICOM writer (``series_description``, ``modality``, ...).
    The write is atomic; an existing target is replaced only with ``overwrite=True``.

    Unevenly spaced slices (:attr:`Volume.is_uniform` false): a DICOM series keeps every
    slice's own position; NIfTI/MHA/NRRD hold one step only, so writing them is refused unless
    ``resample="uniform"`` (linear along the slice normal at the smallest step, recorded in the
    provenance: :meth:`Volume.resampled_uniform`).

    Returns:
        The path written.
    """
    path = Path(path)
    _refuse_overwriting_source(volume, path)
    suffix = _suffix(path)
    fmt = (format or "").lower() or (
        "nifti" if suffix in NIFTI_SUFFIXES else "sitk" if suffix in SITK_SUFFIXES
        else "dicom" if suffix in ("", ".dcm") or path.is_dir() else ""
    )
    if resample not in (None, "uniform"):
        raise OutputError(f"resample must be None or 'uniform', got {resample!r}", path)
    if fmt in ("nifti", "sitk") and not volume.is_uniform:
        if resample != "uniform":
            from ..geometry import describe_steps

            raise OutputError(f"the slices are unevenly spaced (steps of {describe_steps(volume.slice_offsets)}); "
                              f"{'NIfTI' if fmt == 'nifti' else 'MHA/NRRD'} holds one step only, so the slices "
                              "would move. Write a DICOM series (exact positions) or resample onto a uniform grid "
                              "(save(..., resample='uniform') / --resample-uniform)", path)
        volume = volume.resampled_uniform()
    elif fmt == "dicom" and resample == "uniform" and not volume.is_uniform:
        volume = volume.resampled_uniform()
    if fmt == "nifti":
        from .nifti import write_nifti

        return write_nifti(volume, path, overwrite=overwrite)
    if fmt == "sitk":
        from .nifti import write_sitk

        return write_sitk(volume, path, overwrite=overwrite)
    if fmt == "dicom":
        from .dicom_write import write_dicom_series

        return write_dicom_series(volume, path, overwrite=overwrite, **kwargs)
    raise OutputError(f"unknown output format {format or suffix!r}; use .nii, .nii.gz, .mha, .nrrd or a folder for DICOM", path)


def _refuse_overwriting_source(volume: Volume, path: Path) -> None:
    """Inputs are never modified: no output onto, inside or around the volume's source."""
    source = (volume.meta or {}).get("source_path")
    if not source:
        return
    try:
        src, out = Path(source).resolve(), path.resolve()
    except (OSError, RuntimeError):
        return
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"the output would replace or sit inside the input {src}; inputs are never modified, "
                          "choose another output path", path)


__all__ = ["load", "save"]
