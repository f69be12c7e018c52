"""Hostile-input builders for ``scripts/fuzz.py`` and the tests (issue 19's mutation families).

Every builder takes a real seed file (or folder) and writes one hostile input under a target path,
streaming where the input is large (a 2 GiB deflate bomb is written in 1 MiB chunks, never held in
memory). Families:

* ``vr-length``: explicit-VR element headers with a wrong VR or a corrupt length;
* ``seq-wide`` / ``seq-deep``: an undefined-length sequence of a million empty items, or nested
  thousands deep, before PixelData;
* ``deflate-bomb``: Deflated Explicit VR Little Endian with a private OB of up to 2 GiB of zeros;
* ``dicomdir-escape``: a DICOMDIR whose ReferencedFileID climbs out of the media folder;
* ``links``: symlink loops, dangling links and FIFOs inside a series folder;
* ``geometry-folder``: NaN, parallel or zero orientation and spacing across a folder;
* ``mixed-folder``: mixed Rows, BitsAllocated, photometric and transfer syntax in one series;
* ``ts-lie``: a transfer syntax that lies about the pixel data, garbage fragments;
* ``nifti2``: NIfTI-2 headers with absurd dimensions.
"""
from __future__ import annotations

import io
import os
import random
import shutil
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

CHUNK = 1 << 20
_ZERO_CHUNK = bytes(CHUNK)


# ----------------------------------------------------------------------------- encoding helpers
def _read(path: Path):
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def _encode(ds) -> bytes:
    """The data set ``ds`` (no file meta) in Explicit VR Little Endian."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _split(ds, tag: int) -> tuple[bytes, bytes]:
    """Encoded elements of ``ds`` before and from ``tag`` (to splice raw bytes in between)."""
    from pydicom.dataset import Dataset

    lo, hi = Dataset(), Dataset()
    for elem in ds:
        (lo if elem.tag < tag else hi).add(elem)
    return _encode(lo), _encode(hi)


def _meta_bytes(ds, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and a file meta group naming ``transfer_syntax``."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.4")
    meta.MediaStorageSOPInstanceUID = ds.get("SOPInstanceUID", "1.2.3.4")
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\0" * 128 + b"DICM" + buf.getvalue()


def _write_stream(dst: Path, head: bytes, parts: Iterable[bytes], deflate: bool) -> None:
    """Write ``head`` then ``parts`` (deflated, raw deflate stream, when ``deflate``)."""
    z = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS) if deflate else None
    with open(dst, "wb") as fh:
        fh.write(head)
        for p in parts:
            fh.write(z.compress(p) if z else p)
        if z:
            fh.write(z.flush())


def _zeros(n: int) -> Iterator[bytes]:
    while n > 0:
        k = min(n, CHUNK)
        yield _ZERO_CHUNK[:k]
        n -= k


# ----------------------------------------------------------------------------- DICOM families
def deflate_bomb(src: Path, dst: Path, inflated: int = 2**31, before_image: bool = False) -> Path:
    """``src`` re-encoded deflated with a private OB of ``inflated`` zero bytes.

    The bomb sits in group 0029 (after the image attributes) or, with ``before_image``, in
    group 0009 (before them, so a reader cannot know the image size first).
    """
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    ds = _read(src)
    group = 0x0009 if before_image else 0x0029
    creator = struct.pack("<HH2sH", group, 0x0010, b"LO", 4) + b"BOMB"
    header = struct.pack("<HH2sHI", group, 0x1010, b"OB", 0, inflated)
    lo, hi = _split(ds, group << 16 | 0x0010)
    _write_stream(dst, _meta_bytes(ds, DeflatedExplicitVRLittleEndian),
                  [lo, creator, header, *_zeros(inflated), hi], deflate=True)
    return dst


def sequence_bomb(src: Path, dst: Path, items: int = 1_000_000, depth: int = 1) -> Path:
    """``src`` with an undefined-length sequence before PixelData: ``items`` empty items (wide)
    or, with ``depth`` > 1, sequences nested ``depth`` deep (each item holding the next sequence)."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _read(src)
    tag = (0x0040, 0x0275)  # Request Attributes Sequence: public, never read by the reader
    sq_head = struct.pack("<HH2sHI", *tag, b"SQ", 0, 0xFFFFFFFF)
    item_head, item_end = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF), struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
    seq_end = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    lo, hi = _split(ds, tag[0] << 16 | tag[1])

    def parts() -> Iterator[bytes]:
        yield lo
        if depth > 1:
            yield (sq_head + item_head) * depth
            yield (item_end + seq_end) * depth
        else:
            yield sq_head
            empty = item_head + item_end
            for k in range(0, items, 65536):
                yield empty * min(65536, items - k)
            yield seq_end
        yield hi

    _write_stream(dst, _meta_bytes(ds, ExplicitVRLittleEndian), parts(), deflate=False)
    return dst


def vr_length(src: Path, dst: Path, rng: random.Random) -> tuple[Path, str]:
    """Explicit-VR re-encoding of ``src`` with one element's VR or length corrupted."""
    from pydicom.uid import ExplicitVRLittleEndian

    ds = _read(src)
    body = bytearray(_encode(ds))
    offsets, pos = [], 0  # top-level element headers, walked with the lengths just written
    while pos + 8 <= len(body):
        vr = bytes(body[pos + 4:pos + 6])
        long = vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"OV", b"UC", b"UR")
        length = struct.unpack_from("<I", body, pos + 8)[0] if long else struct.unpack_from("<H", body, pos + 6)[0]
        offsets.append((pos, long))
        step = (12 if long else 8) + (0 if length == 0xFFFFFFFF else length)
        if length == 0xFFFFFFFF:
            break
        pos += step
    pos, long = rng.choice(offsets[:-1] or offsets)
    op = rng.choice(["vr", "len-huge", "len-odd", "len-short", "len-undefined"])
    if op == "vr":
        body[pos + 4:pos + 6] = rng.choice([b"SQ", b"OB", b"UN", b"XX", b"\0\0", b"US", b"FD"])
    elif long:
        value = {"len-huge": 0xFFFFFFF0, "len-odd": 3, "len-short": 0, "len-undefined": 0xFFFFFFFF}[op]
        struct.pack_into("<I", body, pos + 8, value)
    else:
        struct.pack_into("<H", body, pos + 6, {"len-huge": 0xFFFE, "len-odd": 3, "len-short": 0,
                                               "len-undefined": 0xFFFF}[op])
    _write_stream(dst, _meta_bytes(ds, ExplicitVRLittleEndian), [bytes(body)], deflate=False)
    return dst, f"{op} at element offset {pos}"


def ts_lie(src: Path, dst: Path, rng: random.Random) -> tuple[Path, str]:
    """``src`` whose file meta names another transfer syntax, or whose PixelData is garbage fragments."""
    from pydicom.encaps import encapsulate

    ds = _read(src)
    lie = rng.choice(["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.5",
                      "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2", "1.2.3.4.5.6"])
    op = rng.choice(["meta-lie", "garbage-fragments", "empty-fragments"])
    if op != "meta-lie" and "PixelData" in ds:
        n = int(ds.get("NumberOfFrames", 1) or 1)
        frames = [rng.randbytes(rng.choice([2, 16, 1000])) if op == "garbage-fragments" else b"\0\0"
                  for _ in range(max(1, min(n, 64)))]
        ds.PixelData = encapsulate([f + b"\0" * (len(f) % 2) for f in frames])
        ds["PixelData"].VR = "OB"
    _write_stream(dst, _meta_bytes(ds, lie), [_encode(ds)], deflate=False)  # Explicit VR LE under a lying meta
    return dst, f"{op} as {lie}"


def dicomdir_escape(media_seed: Path, media: Path, outside: Path, rng: random.Random) -> tuple[Path, str]:
    """A copy of a DICOMDIR media folder whose records climb out to ``outside`` (a real DICOM file)."""
    import pydicom

    shutil.copytree(media_seed, media)
    dd = media / "DICOMDIR"
    ds = pydicom.dcmread(dd)
    records = [r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    up = [".."] * (len(media.relative_to(outside.parent).parts)) + [outside.name]
    how = rng.choice(["climb", "climb-deep", "absolute", "symlink"])
    victim = rng.choice(records)
    if how == "climb":
        victim.ReferencedFileID = up
    elif how == "climb-deep":
        victim.ReferencedFileID = [".."] * 12 + list(outside.resolve().parts[1:])
    elif how == "absolute":
        victim.ReferencedFileID = [str(outside.resolve())]
    else:  # a link inside the media folder that points outside
        link = media / "LINK"
        link.symlink_to(outside.resolve())
        victim.ReferencedFileID = ["LINK"]
    ds.save_as(dd, enforce_file_format=False)
    return dd, f"DICOMDIR record -> {how}"


def links_folder(src: Path, folder: Path, rng: random.Random) -> tuple[Path, str]:
    """A copy of a series folder with a symlink loop, a dangling link or a FIFO in it."""
    shutil.copytree(src, folder)
    for p in folder.iterdir():
        p.chmod(0o644)
    how = rng.choice(["loop", "self-loop", "dangling", "fifo", "fifo-dcm"])
    if how == "loop":
        (folder / "sub").mkdir()
        (folder / "sub" / "up").symlink_to("..")
    elif how == "self-loop":
        (folder / "a.dcm").symlink_to("b.dcm")
        (folder / "b.dcm").symlink_to("a.dcm")
    elif how == "dangling":
        (folder / "gone.dcm").symlink_to("nowhere.dcm")
    else:
        os.mkfifo(folder / ("pipe.dcm" if how == "fifo-dcm" else "pipe"))
    return folder, how


def _rewrite(path: Path, change) -> None:
    """Apply ``change`` to the data set of ``path`` and write it in the transfer syntax it then names."""
    import pydicom

    ds = _read(path)
    change(ds)
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.dcmwrite(path, ds, implicit_vr=ts == "1.2.840.10008.1.2", little_endian=ts != "1.2.840.10008.1.2.2",
                         force_encoding=True, enforce_file_format=False)


def geometry_folder(src: Path, folder: Path, rng: random.Random) -> tuple[Path, str]:
    """A series folder whose orientation or spacing is NaN, parallel or zero on some or all slices."""
    shutil.copytree(src, folder)
    files = sorted(folder.iterdir())
    for p in files:
        p.chmod(0o644)
    how = rng.choice(["nan-iop", "parallel-iop", "zero-iop", "nan-ipp", "same-ipp", "zero-spacing", "nan-spacing",
                      "mixed-iop"])
    victims = files if rng.random() < 0.5 else rng.sample(files, max(1, len(files) // 2))
    values = {"nan-iop": ("ImageOrientationPatient", ["nan"] * 6),
              "parallel-iop": ("ImageOrientationPatient", ["1", "0", "0", "1", "0", "0"]),
              "zero-iop": ("ImageOrientationPatient", ["0"] * 6),
              "nan-ipp": ("ImagePositionPatient", ["nan", "0", "0"]),
              "same-ipp": ("ImagePositionPatient", ["0", "0", "0"]),
              "zero-spacing": ("PixelSpacing", ["0", "0"]), "nan-spacing": ("PixelSpacing", ["nan", "nan"]),
              "mixed-iop": ("ImageOrientationPatient", ["0", "1", "0", "0", "0", "-1"])}
    kw, value = values[how]

    def change(ds) -> None:
        from pydicom.datadict import tag_for_keyword
        from pydicom.dataelem import DataElement

        ds[tag_for_keyword(kw)] = DataElement(tag_for_keyword(kw), "DS", "\\".join(value), validation_mode=0)

    for p in victims:
        _rewrite(p, change)
    return folder, f"{how} on {len(victims)}/{len(files)}"


def mixed_folder(src: Path, folder: Path, rng: random.Random) -> tuple[Path, str]:
    """A series folder where one slice differs in Rows, BitsAllocated, photometric or transfer syntax."""
    shutil.copytree(src, folder)
    files = sorted(folder.iterdir())
    for p in files:
        p.chmod(0o644)
    victim = rng.choice(files)
    how = rng.choice(["rows", "bits", "photometric", "ts-implicit", "ts-big", "ts-deflate"])

    def change(ds) -> None:
        if how == "rows":
            ds.Rows = int(ds.Rows) // 2
        elif how == "bits":
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
        elif how == "photometric":
            ds.PhotometricInterpretation = rng.choice(["MONOCHROME1", "RGB", "PALETTE COLOR"])
        elif how == "ts-implicit":
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
        elif how == "ts-big":
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.2"
        else:
            ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"

    _rewrite(victim, change)
    return folder, f"{how} on {victim.name}"


# ----------------------------------------------------------------------------- NIfTI-2
def nifti2_absurd(src: Path, dst: Path, rng: random.Random) -> tuple[Path, str]:
    """A NIfTI-2 copy of ``src`` whose header declares absurd dimensions (the data stays small)."""
    import nibabel as nib

    img = nib.load(str(src))
    data = np.asarray(img.dataobj)
    nib.save(nib.Nifti2Image(data, img.affine), str(dst))
    raw = bytearray(dst.read_bytes())
    how = rng.choice(["huge-dim", "negative-dim", "dim0", "many-dims", "huge-offset"])
    if how == "huge-dim":  # dim is int64[8] at byte 16
        struct.pack_into("<q", raw, 16 + 8 * rng.randrange(1, 4), rng.choice([2**31, 2**40, 2**62]))
    elif how == "negative-dim":
        struct.pack_into("<q", raw, 16 + 8 * rng.randrange(1, 4), -rng.choice([1, 2**40]))
    elif how == "dim0":
        struct.pack_into("<q", raw, 16, rng.choice([0, 8, 100, -1]))
    elif how == "many-dims":
        struct.pack_into("<8q", raw, 16, 7, *([100000] * 7))
    else:  # vox_offset is int64 at byte 168
        struct.pack_into("<q", raw, 168, rng.choice([2**62, -352, 2**33]))
    dst.write_bytes(bytes(raw))
    return dst, how


# ----------------------------------------------------------------------------- dispatch (scripts/fuzz.py)
#: The new families and their share of a campaign (relative weights).
FAMILIES = {"vr-length": 5, "seq-wide": 2, "seq-deep": 2, "deflate-bomb": 2, "dicomdir-escape": 3, "links": 3,
            "geometry-folder": 4, "mixed-folder": 4, "ts-lie": 4, "nifti2": 3}


def prepare(seeds_dir: Path, dicom_file: Path, bomb_bytes: int = 2**31 - 2) -> dict[str, Path]:
    """Seeds built once per campaign: the deflate bombs (image attributes before and after the bomb)."""
    return {"bomb-after": deflate_bomb(dicom_file, seeds_dir / "bomb_after.dcm", bomb_bytes),
            "bomb-before": deflate_bomb(dicom_file, seeds_dir / "bomb_before.dcm", bomb_bytes, before_image=True)}


def make(kind: str, rng: random.Random, seeds, extra: dict[str, Path], outdir: Path) -> tuple[Path, str]:
    """One input of family ``kind`` in ``outdir``: ``(path, description)``."""
    files = [f for f in seeds.dicom_files if "emri" not in f.name and "1.dcm" != f.name]
    folder = rng.choice(seeds.dicom_folders)
    if kind == "vr-length":
        src = rng.choice(files)
        path, note = vr_length(src, outdir / "input.dcm", rng)
        return path, f"{src.name}: {note}"
    if kind == "seq-wide":
        n = rng.choice([100_000, 300_000, 1_000_000])
        return sequence_bomb(rng.choice(files), outdir / "input.dcm", items=n), f"{n} empty items"
    if kind == "seq-deep":
        d = rng.choice([500, 5000, 50_000])
        return sequence_bomb(rng.choice(files), outdir / "input.dcm", depth=d), f"nested {d} deep"
    if kind == "deflate-bomb":
        which = rng.choice(sorted(extra))
        target = outdir / "input.dcm"
        shutil.copy(extra[which], target)
        return target, f"{which}: {target.stat().st_size} bytes deflated from gigabytes of zeros"
    if kind == "dicomdir-escape":
        outside = outdir / "outside.dcm"
        shutil.copy(rng.choice(files), outside)
        return dicomdir_escape(seeds.dicomdir_folder, outdir / "media", outside, rng)
    if kind == "links":
        path, note = links_folder(folder, outdir / folder.name, rng)
        return path, f"{folder.name}: {note}"
    if kind == "geometry-folder":
        path, note = geometry_folder(folder, outdir / folder.name, rng)
        return path, f"{folder.name}: {note}"
    if kind == "mixed-folder":
        path, note = mixed_folder(folder, outdir / folder.name, rng)
        return path, f"{folder.name}: {note}"
    if kind == "ts-lie":
        src = rng.choice(files)
        path, note = ts_lie(src, outdir / "input.dcm", rng)
        return path, f"{src.name}: {note}"
    if kind == "nifti2":
        src = rng.choice(seeds.nifti)
        path, note = nifti2_absurd(src, outdir / "input.nii", rng)
        return path, f"{src.name}: {note}"
    raise ValueError(kind)


__all__ = ["FAMILIES", "prepare", "make", "deflate_bomb", "sequence_bomb", "vr_length", "ts_lie", "dicomdir_escape", "links_folder",
           "geometry_folder", "mixed_folder", "nifti2_absurd"]
