"""Bounded DICOM parsing: pydicom under limits that a hostile file cannot push past.

Two attacks are stopped here, before they cost minutes or gigabytes:

* a header of millions of elements or sequence items (pydicom parses every undefined-length
  sequence, wanted or not): every parse reads through :class:`_Budget`, which refuses a file after
  :data:`MAX_READS` reads (the largest real enhanced header here, 96 frames, needs about 20,000);
* a deflate bomb (Deflated Explicit VR Little Endian that inflates to gigabytes): the data set is
  inflated in chunks with ``zlib.decompressobj`` and refused beyond a bound derived from the
  image size its header declares and the free memory (:func:`inflate_limit`).

Everything else is pydicom's own reader (``read_preamble``, the file meta reader, ``read_dataset``).

Two small checks live here too: :func:`burned_in` (a BurnedInAnnotation=YES on any slice or frame
of a series) and :func:`inside` (a DICOMDIR reference that resolves outside its media folder).
"""
from __future__ import annotations

import io
import os
import time
import zlib
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset, FileDataset
from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
from pydicom.tag import Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from ..errors import InputError

#: Reads (element headers, values, items) one parse may make before the file is refused.
MAX_READS = 100_000
#: CPU seconds one header parse may take (checked every 1024 reads) before the file is refused.
MAX_PARSE_S = 5.0
#: Inflated bytes allowed beyond the pixel data a deflated header declares (the rest of the header).
HEADER_ALLOWANCE = 64 * 2**20
_PREFIX = 4 * 2**20  # inflated bytes read first to learn the image size
_CHUNK = 2**20
_IMAGE_TAGS = [Tag(k) for k in ("Rows", "Columns", "BitsAllocated", "SamplesPerPixel", "NumberOfFrames")]


class TooComplex(Exception):
    """Raised by :class:`_Budget` when a parse needs more than :data:`MAX_READS` reads or
    :data:`MAX_PARSE_S` seconds."""


class _Budget:
    """A file object that counts ``read`` calls and stops the parse beyond ``limit`` or ``seconds``."""

    def __init__(self, fh: Any, limit: int = MAX_READS, seconds: float = MAX_PARSE_S):
        self._fh, self._left = fh, limit
        self._deadline = time.process_time() + seconds  # CPU time: a busy machine does not count

    def read(self, *args: Any) -> bytes:
        self._left -= 1
        if self._left < 0 or (self._left & 1023 == 0 and time.process_time() > self._deadline):
            raise TooComplex()
        return self._fh.read(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


def dcmread(path: str | os.PathLike, *, stop_before_pixels: bool = False, force: bool = False,
            specific_tags: list | None = None, defer_size: int | str | None = None) -> Dataset:
    """``pydicom.dcmread`` of a file path, bounded in reads and in inflated size.

    Raises:
        InputError: too many elements/items, or a deflated data set larger than its bound.
        Other pydicom errors propagate as from ``pydicom.dcmread``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            if _is_deflated(fh, force):
                return _read_deflated(path, fh, stop_before_pixels, force, specific_tags, defer_size)
            fh.seek(0)
            ds = pydicom.dcmread(_Budget(fh), defer_size=defer_size, stop_before_pixels=stop_before_pixels,
                                 force=force, specific_tags=specific_tags)
            if stop_before_pixels and specific_tags is None:  # pydicom stopped at the pixel data's element
                ds.pixel_data_offset = fh.tell()
            return ds
    except TooComplex:
        raise InputError(f"the header holds more than {MAX_READS} elements or sequence items, or takes more than "
                         f"{MAX_PARSE_S:.0f} s of CPU to parse (a sequence bomb?); refused", path) from None


def pixel_element(path: str | os.PathLike, header: Dataset) -> Any | None:
    """The (7FE0,0010) Pixel Data element of an uncompressed little-endian file, read at the offset
    where :func:`dcmread` (``stop_before_pixels``) stopped: ``pydicom.DataElement`` or None (no
    offset, another transfer syntax, another element there, a length it cannot have, a short
    read) for the whole-file path to decide."""
    from pydicom.dataelem import DataElement

    offset = getattr(header, "pixel_data_offset", None)
    ts = str(getattr(header, "file_meta", Dataset()).get("TransferSyntaxUID", "") or "")
    if offset is None or ts not in (ImplicitVRLittleEndian, ExplicitVRLittleEndian):
        return None
    with open(path, "rb") as fh:
        fh.seek(offset)
        explicit = ts == ExplicitVRLittleEndian
        head = fh.read(12 if explicit else 8)
        if len(head) < 8 or head[:4] != b"\xe0\x7f\x10\x00":
            return None
        if explicit:
            vr = head[4:6].decode("latin-1")
            if vr not in ("OB", "OW") or len(head) < 12:
                return None
            length = int.from_bytes(head[8:12], "little")
        else:
            vr = "OW" if int(header.get("BitsAllocated", 16) or 16) > 8 else "OB"
            length = int.from_bytes(head[4:8], "little")
        if length == 0xFFFFFFFF:
            return None
        value = fh.read(length)
    return DataElement(0x7FE00010, vr, value) if len(value) == length else None


def _is_deflated(fh: Any, force: bool) -> bool:
    try:
        read_preamble(fh, force)
        meta = _read_file_meta_info(fh)
    except Exception:  # noqa: BLE001 - not our call: pydicom.dcmread says what is wrong
        return False
    return meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def inflate_limit(rows: int, cols: int, bits: int, samples: int, frames: int) -> int:
    """Inflated bytes allowed: twice the declared pixel data plus :data:`HEADER_ALLOWANCE`,
    never more than half the free memory."""
    pixels = rows * cols * max(1, samples) * frames * max(bits, 8) // 8
    limit = HEADER_ALLOWANCE + 2 * pixels
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        limit = min(limit, max(free // 2, HEADER_ALLOWANCE))
    except (ValueError, OSError, AttributeError):
        pass
    return limit


def _read_deflated(path: Path, fh: Any, stop_before_pixels: bool, force: bool, specific_tags: list | None,
                   defer_size: Any) -> FileDataset:
    """Inflate the data set after the file meta in chunks, within :func:`inflate_limit`."""
    fh.seek(0)
    preamble = read_preamble(fh, force)
    meta = _read_file_meta_info(fh)
    z = zlib.decompressobj(-zlib.MAX_WBITS)
    out = io.BytesIO()
    try:
        _inflate(fh, z, out, _PREFIX)
        image = _image_size(out.getvalue())
        limit = inflate_limit(*image) if image else HEADER_ALLOWANCE
        if out.tell() >= _PREFIX:
            _inflate(fh, z, out, limit)
    except zlib.error as exc:
        raise InputError(f"corrupt deflated data set ({exc})", path) from None
    if not z.eof and out.tell() >= limit:
        what = (f"its header declares {image[0]}x{image[1]}x{image[4]} at {image[2]} bits" if image
                else "no image size before it")
        raise InputError(f"the deflated data set inflates to more than {limit / 2**20:.0f} MiB, far more than "
                         f"{what} (a deflate bomb?); refused", path)
    body = io.BytesIO(out.getbuffer())
    del out
    stop = (lambda tag, vr, length: tag >= 0x7FE00010) if stop_before_pixels else None
    tags = [Tag(t) for t in specific_tags] if specific_tags else None
    ds = read_dataset(_Budget(body), False, True, stop_when=stop, specific_tags=tags)
    result = FileDataset(str(path), ds, preamble, meta, False, True)
    result.set_original_encoding(False, True, ds._character_set)
    return result


def _inflate(fh: Any, z: Any, out: io.BytesIO, limit: int) -> None:
    """Append inflated bytes to ``out`` until the stream ends or ``out`` holds ``limit`` bytes."""
    pending = z.unconsumed_tail
    while out.tell() < limit and not z.eof:
        if not pending:
            pending = fh.read(_CHUNK)
            if not pending:
                return
        out.write(z.decompress(pending, min(_CHUNK, limit - out.tell())))
        pending = z.unconsumed_tail


def _image_size(prefix: bytes) -> tuple[int, int, int, int, int] | None:
    """``(rows, cols, bits, samples, frames)`` from the first inflated bytes, or None."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = read_dataset(_Budget(io.BytesIO(prefix)), False, True, specific_tags=_IMAGE_TAGS,
                              stop_when=lambda tag, vr, length: tag > 0x00280100)
            rows, cols, bits = int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated)
            samples, frames = int(ds.get("SamplesPerPixel", 1) or 1), int(ds.get("NumberOfFrames", 1) or 1)
    except Exception:  # noqa: BLE001 - unknown image size: only the header allowance is granted
        return None
    if min(rows, cols, bits, samples, frames) < 1:
        return None
    return rows, cols, bits, samples, frames


def burned_in(frames: list) -> str:
    """The first file of ``frames`` (reader ``Frame``s) whose header or functional groups say
    BurnedInAnnotation=YES, or "": a flag on any slice or frame holds for the whole series."""
    seen: set[int] = set()
    for fr in frames:
        h = fr.header
        if id(h) in seen:
            continue
        seen.add(id(h))
        if _says_yes(h):
            return fr.path.name
        for key in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
            for group in h.get(key) or []:  # a frame's groups: the item and the macros inside it
                if _says_yes(group) or any(_says_yes(sub) for elem in group if elem.VR == "SQ" for sub in elem.value):
                    return f"{fr.path.name} ({key})"
    return ""


def _says_yes(ds: Dataset) -> bool:
    return str(ds.get("BurnedInAnnotation", "") or "").strip().upper() == "YES"


def inside(f: Path, folder: Path) -> bool:
    """Whether ``f`` (after symlinks and ``..``) lies inside the resolved ``folder``."""
    try:
        return f.resolve().is_relative_to(folder)
    except (OSError, RuntimeError, ValueError):  # a symlink loop or an impossible name
        return False


__all__ = ["dcmread", "pixel_element", "burned_in", "inside", "inflate_limit", "MAX_READS", "HEADER_ALLOWANCE", "TooComplex"]
