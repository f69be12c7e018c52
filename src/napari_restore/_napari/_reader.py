"""npe2 reader: DICOM files and folders, NIfTI, MHA/MHD, NRRD -> napari image layers.

:func:`napari_get_reader` makes only cheap checks (a few bytes of a file, a bounded walk of a
folder) and returns ``None`` for what it cannot read, so napari may try another plugin. The
returned reader calls :func:`napari_restore.load`; a file that passes the cheap checks but turns
out corrupt raises our :class:`~napari_restore.errors.InputError`, which napari shows as a
notification naming the file and the problem.

Each series becomes one image layer (see :func:`volume_to_layer_data`): world coordinates are
patient millimetres in (S, P, L) order, so series of one study overlay where the patient is.
"""
from __future__ import annotations

import gzip
import os
import warnings
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any, Union

from ..errors import InputError
from ..io import load
from ..volume import Volume

LayerData = tuple[Any, dict[str, Any], str]
PathLike = Union[str, os.PathLike]
ReaderFunction = Callable[[Union[PathLike, list[PathLike]]], list[LayerData]]

_NIFTI = (".nii", ".nii.gz")
_META = (".mha", ".mhd")
_NRRD = (".nrrd", ".nhdr")
_DICOM = (".dcm", ".dicom", ".ima")
#: How many files of a folder are sniffed before giving up on finding DICOM in it.
MAX_SNIFFED_FILES = 2000


def napari_get_reader(path: PathLike | list[PathLike]) -> ReaderFunction | None:
    """Return :func:`read_layers` when every path looks readable, else ``None``.

    Args:
        path: a file or folder, or a list of them (napari's "open several files").
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not paths:
        return None
    try:
        if all(_looks_readable(Path(p)) for p in paths):
            return read_layers
    except OSError:  # unreadable file or folder: not ours to claim
        return None
    return None


def read_layers(path: PathLike | list[PathLike]) -> list[LayerData]:
    """Read a file, folder or list of them into image layer data tuples.

    Every series is one ``(array, kwargs, "image")`` tuple, the main series of each path first;
    only the first series of each path is visible, the others are added hidden.

    Raises:
        InputError: a path cannot be read (corrupt file, no image series, ...).
    """
    paths = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    layers: list[LayerData] = []
    notes: list[str] = []
    for p in paths:
        with warnings.catch_warnings():  # shown once each below, not also as Python warnings
            warnings.simplefilter("ignore", UserWarning)
            volumes = load(p)
        if not volumes:
            raise InputError("no image series found", p)
        for n, v in enumerate(volumes):
            notes.extend(f"{v.meta.get('source_path', p)}: {w}" for w in v.meta.get("warnings", []))
            layers.extend(volume_to_layer_data(part, visible=(n == 0)) for part in display_parts(v))
    _notify(notes)
    _install_view()
    return layers


def display_parts(volume: Volume) -> list[Volume]:
    """What napari shows of a series: the volume itself, or, for unevenly spaced slices, one
    sub-volume per uniformly spaced run (exact source slices, no interpolation), named by its
    slice range and step. Each part exports back to exactly its source slices."""
    if volume.spatial_shape[0] < 3 or volume.is_uniform:
        return [volume]
    parts = []
    name = volume.meta.get("description") or volume.modality
    for a, b in volume.uniform_runs():
        part = volume.subvolume(a, b)
        step = f", {part.slice_distance:.3g} mm" if b - a > 1 else ""
        part.meta["description"] = f"{name} [slices {a + 1}-{b}{step}]"
        parts.append(part)
    return parts


def _notify(notes: list[str]) -> None:
    """Each geometry/reader note once as a napari warning notification."""
    if not notes:
        return
    try:
        from napari.utils.notifications import show_warning
    except ImportError:  # pragma: no cover - napari is what calls this reader
        return
    for note in dict.fromkeys(notes):
        show_warning(note)


def _install_view() -> None:
    """Open the series in their acquisition plane, patient upright (see :mod:`._view`)."""
    try:
        import napari

        viewer = napari.current_viewer()
    except Exception:  # no viewer (a script calling the reader): nothing to set up
        return
    if viewer is not None:
        from ._view import install

        install(viewer)


def volume_to_layer_data(volume: Volume, visible: bool = True) -> LayerData:
    """One image layer data tuple for ``volume``.

    :meth:`Volume.to_layer_tuple`: the data with its axes in :meth:`Volume.layer_axes` order
    (a view; axial series unchanged, sagittal/coronal ones permuted so napari can draw them),
    scale = spacing, affine = direction and origin in (S, P, L) mm, contrast limits from the
    window, ``metadata["napari_restore"]``; plus a grey colour map.
    """
    data, kwargs, kind = volume.to_layer_tuple()
    kwargs.setdefault("colormap", "gray")
    kwargs["visible"] = bool(visible)
    return (data, kwargs, kind)


# --------------------------------------------------------------------------- cheap checks
def _looks_readable(path: Path) -> bool:
    """A cheap guess whether :func:`napari_restore.load` can read ``path``."""
    if path.is_dir():
        return _folder_has_dicom(path)
    if not path.is_file():
        return False
    name = path.name.lower()
    if name.endswith(_NIFTI):
        return _is_nifti(path)
    if name.endswith(_META):
        return b"ndims" in _head(path, 4096).lower()  # MetaImage text header
    if name.endswith(_NRRD):
        return _head(path, 4).startswith(b"NRRD")
    if name.endswith(_DICOM):
        return _is_dicom_file(path, raw=True)  # a .dcm file may lack the preamble (a bare dataset)
    if name == "dicomdir" or not Path(name).suffix or name[-1].isdigit():
        return _is_dicom_file(path)  # DICOM files often have no suffix (IM0001, 1.2.840.....123): DICM needed
    return False


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(n)


def _is_dicom_file(path: Path, raw: bool = False) -> bool:
    """Part-10 preamble (``DICM`` at byte 128); with ``raw`` (a DICOM suffix says what the file is)
    also a bare little-endian dataset whose first element is in group 0x0002/0x0008 followed by an
    explicit VR or a short implicit length. Without a suffix only the magic counts: a file named
    ``0.0`` of raw int16 samples is not claimed."""
    head = _head(path, 132)
    if len(head) == 132 and head[128:132] == b"DICM":
        return True
    if not raw or len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = head[4:6]
    return (vr.isalpha() and vr.isupper()) or struct.unpack("<I", head[4:8])[0] < 0x10000


def _is_nifti(path: Path) -> bool:
    """``sizeof_hdr`` is 348 (NIfTI-1) or 540 (NIfTI-2), in either byte order."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                head = fh.read(4)
        else:
            head = _head(path, 4)
    except (OSError, EOFError, gzip.BadGzipFile):
        return False
    if len(head) < 4:
        return False
    return any(struct.unpack(order + "i", head)[0] in (348, 540) for order in "<>")


def _folder_has_dicom(folder: Path) -> bool:
    """True when a DICOMDIR or a DICOM file lies in ``folder`` (searched recursively, bounded)."""
    sniffed = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            if name.upper() == "DICOMDIR":
                return True
            try:
                if _is_dicom_file(Path(root) / name, raw=name.lower().endswith(_DICOM)):
                    return True
            except OSError:
                pass
            sniffed += 1
            if sniffed >= MAX_SNIFFED_FILES:
                return False
    return False
