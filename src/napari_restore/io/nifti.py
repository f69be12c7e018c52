"""NIfTI (nibabel) and MHA/MHD/NRRD (SimpleITK) reading and writing with the exact affine.

NIfTI stores RAS+ world coordinates over index ``(i, j, k)``; a Volume holds LPS over
``(k, j, i)``. The conversion is exact: flip the first two world axes, reverse the index order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import InputError, OutputError
from ..volume import Volume
from .atomic import atomic_file

_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# (k, j, i, 1) -> (i, j, k, 1)
_REVERSE_INDEX = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=np.float64)


def _guess_modality(array: np.ndarray) -> str:
    """CT when the values look like HU (air near -1000), otherwise unknown."""
    finite = array[np.isfinite(array)]
    if finite.size and np.percentile(finite, 1) < -500 and finite.min() >= -3100:
        return "CT"
    return "OT"


def read_nifti(path: str | os.PathLike, modality: str | None = None) -> Volume:
    """Read ``.nii``/``.nii.gz``; geometry from the sform, else the qform, else pixdim."""
    import nibabel as nib

    path = Path(path)
    try:
        img = nib.load(str(path))
        sform, scode = img.get_sform(coded=True)
        qform, qcode = img.get_qform(coded=True)
        ras = sform if scode else qform if qcode else img.header.get_base_affine()
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many kinds of errors on a corrupt file
        raise InputError(f"not a readable NIfTI file ({type(exc).__name__}: {exc})", path) from None
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim == 5 and data.shape[3] == 1:
        data = data[:, :, :, 0]
    if data.ndim not in (3, 4) or 0 in data.shape:
        raise InputError(f"expected a non-empty 3-D or 4-D image, got shape {data.shape}", path)
    if np.iscomplexobj(data) or data.dtype.names is not None:
        raise InputError(f"unsupported voxel type {data.dtype}", path)
    array = np.ascontiguousarray(data.astype(np.float32).T)  # (i,j,k[,t]) -> ([t,]k,j,i)
    if not np.all(np.isfinite(ras)) or abs(np.linalg.det(ras[:3, :3])) < 1e-9:
        raise InputError("the header's affine is singular or not finite (zero pixdim?)", path)
    nonfinite = ~np.isfinite(array)
    warnings = []
    if nonfinite.any():
        warnings.append(f"{int(nonfinite.sum())} non-finite voxels set to 0")
        array[nonfinite] = 0
    affine = _RAS_TO_LPS @ ras @ _REVERSE_INDEX
    name = path.name.removesuffix(".gz").removesuffix(".nii")
    meta = {"source_path": str(path), "description": name, "source_format": "nifti",
            "source_dtype": str(data.dtype), "warnings": warnings}
    return Volume(array, affine, modality or _guess_modality(array), meta)


def write_nifti(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a float32 NIfTI with sform = qform = the Volume's affine (in RAS)."""
    import nibabel as nib

    path = Path(path)
    ras = _RAS_TO_LPS @ volume.affine @ _REVERSE_INDEX
    img = nib.Nifti1Image(np.ascontiguousarray(volume.array.T), ras)
    img.set_sform(ras, code=1)
    img.set_qform(ras, code=1)  # nibabel keeps the closest rigid qform when ras has shear
    img.header.set_xyzt_units("mm", "sec")
    with atomic_file(path, overwrite) as tmp:
        nib.save(img, str(tmp))
    return path


def read_sitk(path: str | os.PathLike, modality: str | None = None) -> Volume:
    """Read ``.mha``/``.mhd``/``.nrrd`` with SimpleITK (LPS physical space)."""
    import SimpleITK as sitk

    path = Path(path)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as exc:
        raise InputError(f"not readable by SimpleITK ({str(exc).strip().splitlines()[-1]})", path) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{img.GetNumberOfComponentsPerPixel()} components per voxel; only scalar images", path)
    if img.GetDimension() == 2:
        img = sitk.JoinSeries([img])
    if img.GetDimension() != 3:
        raise InputError(f"expected a 3-D image, got {img.GetDimension()}-D", path)
    if 0 in img.GetSize():
        raise InputError(f"empty image of size {img.GetSize()}", path)
    array = sitk.GetArrayFromImage(img).astype(np.float32)
    affine = sitk_affine(img)
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError("the header's geometry is singular or not finite", path)
    meta = {"source_path": str(path), "description": path.stem, "source_format": "sitk"}
    return Volume(array, affine, modality or _guess_modality(array), meta)


def sitk_affine(img) -> np.ndarray:
    """4x4 LPS affine over ``(k, j, i)`` of a 3-D SimpleITK image."""
    d = np.array(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    m = d @ np.diag(img.GetSpacing())
    affine = np.eye(4)
    affine[:3, :3] = m[:, ::-1]
    affine[:3, 3] = img.GetOrigin()
    return affine


def write_sitk(volume: Volume, path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``.mha``/``.nrrd`` (float32). Shear cannot be stored there and is refused."""
    import SimpleITK as sitk

    path = Path(path)
    if volume.array.ndim != 3:
        raise OutputError("only 3-D volumes can be written as MHA/NRRD; use NIfTI for 4-D", path)
    m = volume.affine[:3, :3][:, ::-1]  # columns for (i, j, k)
    spacing = np.linalg.norm(m, axis=0)
    direction = m / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-6):
        raise OutputError("the volume's geometry is sheared (gantry tilt); MHA/NRRD cannot hold it, use NIfTI or DICOM", path)
    img = sitk.GetImageFromArray(volume.array)
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.flatten().tolist())
    img.SetOrigin(volume.affine[:3, 3].tolist())
    with atomic_file(path, overwrite) as tmp:
        sitk.WriteImage(img, str(tmp), useCompression=True)
    return path
