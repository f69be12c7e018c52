#!/usr/bin/env python
"""Fuzz the readers with mutated real files: every input must be read or refused, never crash or hang.

Seeds are small real files from ``../shared/data`` (single DICOM files in many transfer syntaxes,
small DICOM folders, a DICOMDIR, NIfTI, MHA/NRRD made from a NIfTI, and a model folder made
here). Each input is one seeded mutation of one seed: byte-level (truncation, bit flips, zeroed
blocks, garbage appended) or structural (contradictory or dropped DICOM tags, hostile NIfTI/MHA/NRRD
header fields, a pickle payload as weights, a truncated state dict, a card naming an unknown
architecture, a DICOMDIR pointing at missing files, a card.json nesting bomb), or one of the
families of :mod:`fuzz_families` (VR and length corruption, wide and deep sequence bombs, 2 GiB
deflate bombs, DICOMDIR traversal, symlink loops and FIFOs, broken geometry across a folder, mixed
folders, transfer-syntax lies, NIfTI-2 with absurd dimensions).

Every input runs in its own child process (forked from a warm worker) under a memory cap
(``RLIMIT_AS``) and a time limit (``SIGALRM``), so an allocation a header tricked us into shows up
as a crash instead of swapping the machine. The child measures its own wall time and peak memory
(``VmHWM`` after a reset, less the memory it started with). Outcomes:

* ``read``: ``load``/``load_model`` returned, every Volume float32 3-/4-D, finite voxels, finite
  non-singular affine, and read from inside the input (else a path escape is counted);
* ``refused``: our error type (:class:`InputError`/:class:`ModelError`) whose message names the
  file or folder;
* ``crash``: any other exception, a process killed by a signal, non-finite voxels handed on, or a
  refusal that does not name the input;
* ``hang``: more than ``--timeout`` seconds (10 s) for one input.

The run ends with a Markdown table by family: inputs, outcomes, the slowest input, the largest
peak memory, and the inputs whose peak exceeded twice the image they produced plus
``PEAK_ALLOWANCE_MIB`` (the interpreter's and the parser's own working memory).

Usage::

    python scripts/fuzz.py --n 10000 --seed 0 --workers 2 --log fuzz.jsonl [--max-minutes 30]

Exit status 0 when there are no crashes, no hangs and no path escapes.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pickle
import random
import shutil
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("NAPARI_RESTORE_SHARED_DATA", REPO.parent / "shared" / "data"))
MEMORY_CAP = 6 * 2**30  # bytes of address space per worker

# single DICOM files (small, many transfer syntaxes and layouts)
DICOM_FILES = [
    "fixtures/pydicom-data/liver_deflate.dcm",
    "fixtures/pydicom-data/liver_j2k.dcm",
    "fixtures/pydicom-data/liver_rle.dcm",
    "fixtures/pydicom-data/JLSL_16_15_1_1F.dcm",
    "fixtures/pydicom-data/OBXXXX1A_rle_2frame.dcm",
    "fixtures/pylibjpeg/RLELossless/MR_small_RLE.dcm",
    "fixtures/pylibjpeg/JPEGLSLossless/MR_small_jpeg_ls_lossless.dcm",
    "fixtures/pylibjpeg/JPEGExtended/JPEGExtended_1s_1f_u_16_12.dcm",
    "fixtures/pylibjpeg/JPEG2000/693_J2KI.dcm",
    "fixtures/dicom2nifti/hitachi/anatomical/001/001.dcm",
    "fixtures/dicom2nifti/hitachi/anatomical/001_implicit/001.dcm",
    "fixtures/ge-epi-4d/mr_0004/axial_epi_fmri_interleaved_i_to_s-00001.dcm",
    "ct/philips-head-phantom/exam/S1000/I10",
    "fixtures/transfer-syntaxes/In/1.dcm",
    "fixtures/pydicom-data/emri_small.dcm",
]
# small DICOM folders (a few slices each)
DICOM_FOLDERS = [
    "fixtures/dicom2nifti/hitachi/anatomical/001",
    "fixtures/dicom2nifti/ge/anatomical/001",
    "fixtures/dicom2nifti/failing/sliceincrement/001",
]
NIFTI_FILES = [
    "fixtures/dicom2nifti/hitachi/anatomical/001_ground_truth.nii.gz",
    "ct/nifti/example_ct_sm.nii.gz",
]

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_families as families  # noqa: E402

KINDS = ("dicom-file", "dicom-folder", "dicomdir", "nifti", "sitk", "model", *families.FAMILIES)
WEIGHTS = {"dicom-file": 45, "dicom-folder": 15, "dicomdir": 5, "nifti": 15, "sitk": 10, "model": 10,
           **families.FAMILIES}


# ============================================================================ seeds
@dataclass
class Seeds:
    """Everything the mutators start from, prepared once in ``workdir``."""

    dicom_files: list[Path]
    dicom_folders: list[Path]
    dicomdir_folder: Path
    nifti: list[Path]
    sitk: list[Path]
    model: Path
    extra: dict = None  # seeds of the new families built once (the 2 GiB deflate bombs)


def prepare_seeds(workdir: Path, bomb_bytes: int = 2**31 - 2) -> Seeds:
    """Check the shared files exist and build the derived seeds (DICOMDIR, .nii, MHA/NRRD, model)."""
    missing = [p for p in DICOM_FILES + DICOM_FOLDERS + NIFTI_FILES if not (SHARED / p).exists()]
    if missing:
        raise SystemExit(f"fuzz seeds missing under {SHARED}: {missing}")
    workdir.mkdir(parents=True, exist_ok=True)
    seeds_dir = workdir / "seeds"
    if seeds_dir.exists():
        shutil.rmtree(seeds_dir)
    seeds_dir.mkdir()

    # a DICOMDIR over a copy of a small series
    import pydicom
    from pydicom.fileset import FileSet

    dd = seeds_dir / "dicomdir"
    fs = FileSet()
    for f in sorted((SHARED / DICOM_FOLDERS[0]).iterdir()):
        fs.add(pydicom.dcmread(f))
    fs.write(dd)

    # uncompressed NIfTI and MHA/NRRD of the small NIfTI
    import nibabel as nib
    import SimpleITK as sitk

    src = SHARED / NIFTI_FILES[0]
    img = nib.load(str(src))
    nii = seeds_dir / "small.nii"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), img.affine, img.header), str(nii))
    simg = sitk.ReadImage(str(src))
    mha, nrrd = seeds_dir / "small.mha", seeds_dir / "small.nrrd"
    sitk.WriteImage(simg, str(mha), useCompression=False)
    sitk.WriteImage(simg, str(nrrd), useCompression=False)

    # a tiny model folder (card.json + model.pt)
    model = seeds_dir / "model"
    from napari_restore.models import save_model
    from napari_restore.networks import build_network

    net = build_network("ResidualUNet", {"spatial_dims": 2, "channels": [4, 8], "strides": [2],
                                         "num_res_units": 0})
    save_model(net, {"format_version": 1, "name": "fuzz-seed", "version": "0.0.1", "task": "denoise",
                     "modality": "CT", "intensity": {"kind": "ct", "center": 0.0, "scale": 512.0,
                                                      "clip": [-1024, 3071]}}, model)
    extra = families.prepare(seeds_dir, SHARED / DICOM_FILES[9], bomb_bytes)
    return Seeds([SHARED / p for p in DICOM_FILES], [SHARED / p for p in DICOM_FOLDERS], dd,
                 [SHARED / p for p in NIFTI_FILES] + [nii], [mha, nrrd], model, extra)


# ============================================================================ byte mutations
def mutate_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """One byte-level mutation: truncate, flip bits, zero a block, append garbage, or splice."""
    n = len(data)
    op = rng.choice(["truncate", "bitflip", "zero", "append", "header-bitflip", "duplicate"])
    if op == "truncate":
        cut = rng.choice([rng.randrange(0, max(1, min(n, 1024))), rng.randrange(0, max(1, n))])
        return data[:cut], f"truncate@{cut}"
    if op in ("bitflip", "header-bitflip"):
        b = bytearray(data)
        span = min(n, 4096) if op == "header-bitflip" else n
        k = rng.choice([1, 2, 8, 64])
        for _ in range(k):
            i = rng.randrange(max(1, span))
            if i < n:
                b[i] ^= 1 << rng.randrange(8)
        return bytes(b), f"{op}x{k}"
    if op == "zero":
        start = rng.randrange(max(1, n))
        size = rng.choice([4, 64, 1024, 65536])
        b = bytearray(data)
        b[start:start + size] = bytes(len(b[start:start + size]))
        return bytes(b), f"zero@{start}+{size}"
    if op == "append":
        size = rng.choice([1, 13, 1000, 100000])
        return data + rng.randbytes(size), f"append{size}"
    start = rng.randrange(max(1, n))
    size = rng.choice([16, 256, 4096])
    dest = rng.randrange(max(1, n))
    return data[:dest] + data[start:start + size] + data[dest:], f"duplicate@{start}+{size}->{dest}"


# ============================================================================ DICOM tag mutations
_TAG_MUTATIONS = [
    ("Rows", [0, 1, 7, 65535, "x2"]), ("Columns", [0, 1, 3, 65535, "x2"]),
    ("BitsAllocated", [0, 1, 12, 64, 7]), ("BitsStored", [0, 1, 33, 64]), ("HighBit", [0, 63, 99]),
    ("PixelRepresentation", [0, 1, 5]), ("SamplesPerPixel", [0, 3, 4]),
    ("PixelSpacing", [["nan", "nan"], [0, 0], [-1, -1], ["inf", "1"], [1], ["a", "b"]]),
    ("ImageOrientationPatient", [[0, 0, 0, 0, 0, 0], [1, 0, 0, 1, 0, 0], ["nan"] * 6, [1, 0, 0], [1e308, 0, 0, 0, 1e308, 0]]),
    ("ImagePositionPatient", [["nan", 0, 0], [1e308, 1e308, 1e308], [0, 0], ["inf", "-inf", 0]]),
    ("NumberOfFrames", [0, -1, 1000000, 2**31 - 1, 2, "x"]),
    ("RescaleSlope", [0, "nan", "inf", -1, 1e308, ""]), ("RescaleIntercept", ["nan", "inf", 1e308, ""]),
    ("SliceThickness", [0, "nan", -5]), ("SpacingBetweenSlices", [0, "nan", -5]),
    ("WindowWidth", [0, -1, "nan"]), ("WindowCenter", ["nan", 1e308]),
    ("PhotometricInterpretation", ["RGB", "PALETTE COLOR", "YBR_FULL", "", "BOGUS"]),
    ("InstanceNumber", [None, "x"]), ("SeriesInstanceUID", ["", None, "1.2.3"]),
    ("SOPClassUID", [None, "", "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.1.3.10"]),
    ("Modality", [None, "", "SR"]), ("ImageType", [["ORIGINAL", "PRIMARY", "MOSAIC"], ["LOCALIZER"]]),
    ("NumberOfImagesInMosaic", [0, 1000000]),
    ("GridFrameOffsetVector", [[0], ["nan", "nan"], [0, 1e308]]),
]


def mutate_dicom_dataset(path: Path, rng: random.Random) -> tuple[bytes, str]:
    """Rewrite one file with contradictory, degenerate or missing attributes."""
    import io
    import warnings

    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path, force=True)
        notes = []
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            choice = rng.random()
            if choice < 0.75:
                kw, values = rng.choice(_TAG_MUTATIONS)
                value = rng.choice(values)
                if value is None:
                    if kw in ds:
                        del ds[kw]
                    notes.append(f"del {kw}")
                    continue
                if value == "x2" and kw in ds:
                    value = int(ds[kw].value) * 2 if str(ds[kw].value).isdigit() else 2
                try:
                    _set(ds, kw, value)
                    notes.append(f"{kw}={value!r}"[:60])
                except Exception as exc:
                    notes.append(f"{kw} unset ({type(exc).__name__})")
            elif choice < 0.9:  # drop a random top-level element
                elems = [e.tag for e in ds if e.tag != 0x7FE00010]
                if elems:
                    tag = rng.choice(elems)
                    del ds[tag]
                    notes.append(f"del {tag}")
            else:  # drop or cut the pixel data
                if "PixelData" in ds and rng.random() < 0.5:
                    del ds.PixelData
                    notes.append("del PixelData")
                elif "PixelData" in ds and not _compressed(ds):
                    pd = ds.PixelData
                    ds.PixelData = pd[: rng.randrange(max(2, len(pd))) // 2 * 2]
                    notes.append("short PixelData")
        buf = io.BytesIO()
        try:
            ds.save_as(buf, enforce_file_format=False)
        except Exception as exc:  # a value pydicom cannot write: fall back on the original bytes, bit-flipped
            data, note = mutate_bytes(path.read_bytes(), rng)
            return data, f"unwritable ({type(exc).__name__}); {note}"
    return buf.getvalue(), "; ".join(notes)


def _compressed(ds) -> bool:
    try:
        return bool(ds.file_meta.TransferSyntaxUID.is_compressed)
    except Exception:
        return True


def _set(ds, keyword: str, value) -> None:
    from pydicom.datadict import dictionary_VR

    vr = dictionary_VR(keyword)
    if vr in ("DS", "FD", "FL") or (vr == "IS" and isinstance(value, list)):
        value = [str(v) for v in value] if isinstance(value, list) else str(value)
        # write raw strings (even invalid ones) without validation
        from pydicom.dataelem import DataElement
        from pydicom.datadict import tag_for_keyword

        raw = "\\".join(value) if isinstance(value, list) else value
        ds[tag_for_keyword(keyword)] = DataElement(tag_for_keyword(keyword), "DS" if vr == "DS" else vr, raw,
                                                   validation_mode=0)
        return
    if vr == "IS":
        from pydicom.dataelem import DataElement
        from pydicom.datadict import tag_for_keyword

        ds[tag_for_keyword(keyword)] = DataElement(tag_for_keyword(keyword), "IS", str(value), validation_mode=0)
        return
    setattr(ds, keyword, value)


# ============================================================================ NIfTI / MHA / NRRD header mutations
def mutate_nifti(path: Path, rng: random.Random) -> tuple[bytes, str, str]:
    """Hostile NIfTI-1 header fields in an uncompressed copy (dims, pixdim, sform, datatype, offset)."""
    import gzip

    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    b = bytearray(raw)
    op = rng.choice(["dim", "dim0", "pixdim", "srow", "quatern", "datatype", "vox_offset", "scl", "bytes", "codes"])
    if op == "dim":
        i = rng.randrange(1, 5)
        v = rng.choice([0, -1, 1, 32767, 2000])
        struct.pack_into("<h", b, 40 + 2 * i, v)
        note = f"dim[{i}]={v}"
    elif op == "dim0":
        v = rng.choice([0, 5, 7, 8, -3])
        struct.pack_into("<h", b, 40, v)
        note = f"dim[0]={v}"
    elif op == "pixdim":
        i = rng.randrange(1, 4)
        v = rng.choice([0.0, float("nan"), -1.0, float("inf")])
        struct.pack_into("<f", b, 76 + 4 * i, v)
        struct.pack_into("<h", b, 252, 0)
        struct.pack_into("<h", b, 254, 0)  # no qform/sform: pixdim is the geometry
        note = f"pixdim[{i}]={v} (no sform/qform)"
    elif op == "srow":
        i = rng.randrange(12)
        v = rng.choice([float("nan"), float("inf"), 0.0, 1e38])
        struct.pack_into("<f", b, 280 + 4 * i, v)
        struct.pack_into("<h", b, 254, 1)
        note = f"srow[{i}]={v}"
    elif op == "quatern":
        i = rng.randrange(6)
        v = rng.choice([float("nan"), 1e38, 2.0])
        struct.pack_into("<f", b, 256 + 4 * i, v)
        struct.pack_into("<h", b, 252, 1)
        struct.pack_into("<h", b, 254, 0)
        note = f"quatern[{i}]={v}"
    elif op == "datatype":
        v = rng.choice([0, 1, 32, 128, 255, 1792, 2304, 9999])
        struct.pack_into("<h", b, 70, v)
        note = f"datatype={v}"
    elif op == "vox_offset":
        v = rng.choice([0.0, 1e9, -352.0, float("nan"), 349.0])
        struct.pack_into("<f", b, 108, v)
        note = f"vox_offset={v}"
    elif op == "scl":
        v = rng.choice([float("nan"), float("inf"), 1e38])
        struct.pack_into("<f", b, 112 + 4 * rng.randrange(2), v)
        note = f"scl={v}"
    elif op == "codes":
        struct.pack_into("<h", b, 252, rng.choice([0, 7, -1]))
        struct.pack_into("<h", b, 254, rng.choice([0, 7, -1]))
        note = "qform/sform codes"
    else:
        data, note = mutate_bytes(bytes(b), rng)
        b = bytearray(data)
    suffix = rng.choice([".nii", ".nii.gz"])
    data = gzip.compress(bytes(b), compresslevel=1) if suffix == ".nii.gz" else bytes(b)
    return data, note, suffix


def mutate_sitk(path: Path, rng: random.Random) -> tuple[bytes, str, str]:
    """Hostile MHA/NRRD text headers (sizes, spacing, direction, element type) or byte damage."""
    raw = path.read_bytes()
    suffix = path.suffix
    if suffix == ".mha":
        end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    else:
        end = raw.index(b"\n\n") + 2
    header, body = raw[:end].decode("latin-1"), raw[end:]
    lines = header.splitlines(keepends=True)
    field_map = {".mha": {"DimSize": ["1 1 1", "100000 100000 100000", "0 10 10", "-1 5 5", "nan", "2000 2000 2000"],
                          "ElementSpacing": ["0 0 0", "nan nan nan", "-1 1 1", "inf 1 1"],
                          "TransformMatrix": ["0 0 0 0 0 0 0 0 0", "nan 0 0 0 1 0 0 0 1", "1 0 0 1 0 0 0 0 1"],
                          "Offset": ["nan nan nan", "1e400 0 0"],
                          "ElementType": ["MET_BOGUS", "MET_DOUBLE", "MET_UCHAR"],
                          "NDims": ["0", "7", "2"], "ElementNumberOfChannels": ["0", "3", "1000000"]},
                 ".nrrd": {"sizes": ["1 1 1", "100000 100000 100000", "0 10 10", "-1 5 5", "2000 2000 2000"],
                           "space directions": ["(0,0,0) (0,0,0) (0,0,0)", "(nan,0,0) (0,1,0) (0,0,1)",
                                                "(1,0,0) (1,0,0) (0,0,1)"],
                           "space origin": ["(nan,nan,nan)"], "type": ["bogus", "double", "uchar"],
                           "dimension": ["0", "7", "2"], "encoding": ["gzip", "bogus", "hex"]}}[suffix]
    if rng.random() < 0.75:
        key = rng.choice(list(field_map))
        value = rng.choice(field_map[key])
        sep = " = " if suffix == ".mha" else ": "
        for i, line in enumerate(lines):
            if line.split("=" if suffix == ".mha" else ":")[0].strip() == key:
                lines[i] = f"{key}{sep}{value}\n"
                break
        else:
            lines.insert(1, f"{key}{sep}{value}\n")
        return "".join(lines).encode("latin-1") + body, f"{key}={value}", suffix
    data, note = mutate_bytes(raw, rng)
    return data, note, suffix


# ============================================================================ model mutations
class _Payload:
    """A pickle that would run code (create a marker file) if unpickled unsafely."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def mutate_model(model: Path, target: Path, rng: random.Random) -> str:
    """Copy the seed model into ``target`` and damage it (weights or card)."""
    import torch

    shutil.copytree(model, target)
    weights, card = target / "model.pt", target / "card.json"
    op = rng.choice(["pickle", "pickle-in-zip", "truncate", "bytes", "unknown-arch", "card-json", "card-field",
                     "card-nest",
                     "nan-weights", "missing-key", "extra-key", "wrong-shape", "not-a-dict", "missing-weights"])
    if op == "pickle":
        weights.write_bytes(pickle.dumps({"w": _Payload(str(target / "PWNED"))}))
    elif op == "pickle-in-zip":
        torch.save({"w": _Payload(str(target / "PWNED"))}, weights)
    elif op == "truncate":
        data = weights.read_bytes()
        weights.write_bytes(data[: rng.randrange(len(data))])
    elif op == "bytes":
        data, note = mutate_bytes(weights.read_bytes(), rng)
        weights.write_bytes(data)
        op += " " + note
    elif op == "unknown-arch":
        c = json.loads(card.read_text())
        c["architecture"]["name"] = rng.choice(["EvilNet", "os.system", "__import__", "", "torch.nn.Module"])
        card.write_text(json.dumps(c))
    elif op == "card-nest":  # a JSON nesting bomb beside valid weights
        n = rng.choice([1000, 200_000])
        card.write_text("[" * n + "]" * n)
        op += f" {n}"
    elif op == "card-json":
        data, note = mutate_bytes(card.read_bytes(), rng)
        card.write_bytes(data)
        op += " " + note
    elif op == "card-field":
        c = json.loads(card.read_text())
        key = rng.choice(["dims", "task", "modality", "intensity", "architecture", "name", "version", "format_version"])
        c[key] = rng.choice([None, -1, "x" * 1000, [], {}, 1e308, "../../etc"])
        card.write_text(json.dumps(c))
        op += f" {key}"
    else:
        state = torch.load(weights, weights_only=True)
        key = rng.choice(sorted(state))
        if op == "nan-weights":
            if state[key].is_floating_point():
                state[key] = state[key].clone().fill_(float("nan"))
        elif op == "missing-key":
            del state[key]
        elif op == "extra-key":
            state["extra.weight"] = torch.zeros(3)
        elif op == "wrong-shape":
            state[key] = torch.zeros(7, 7)
        elif op == "not-a-dict":
            state = [state[key]]
        if op == "missing-weights":
            weights.unlink()
        else:
            torch.save(state, weights)
    return op


# ============================================================================ make one input
def make_input(index: int, seed: int, seeds: Seeds, outdir: Path) -> tuple[str, Path, str]:
    """Build input ``index`` in ``outdir``: returns ``(kind, path, description)``."""
    rng = random.Random(f"{seed}:{index}")
    kind = rng.choices(KINDS, weights=[WEIGHTS[k] for k in KINDS])[0]
    outdir.mkdir(parents=True, exist_ok=True)
    if kind in families.FAMILIES:
        path, desc = families.make(kind, rng, seeds, seeds.extra, outdir)
        return kind, path, desc
    if kind == "dicom-file":
        src = rng.choice(seeds.dicom_files)
        if rng.random() < 0.5:
            data, note = mutate_dicom_dataset(src, rng)
        else:
            data, note = mutate_bytes(src.read_bytes(), rng)
        target = outdir / (src.name if src.suffix else src.name + ".dcm")
        target.write_bytes(data)
        return kind, target, f"{src.relative_to(SHARED)}: {note}"
    if kind == "dicom-folder":
        src = rng.choice(seeds.dicom_folders)
        target = outdir / src.name
        shutil.copytree(src, target)
        for p in target.iterdir():
            p.chmod(0o644)
        files = sorted(target.iterdir())
        notes = []
        for victim in rng.sample(files, rng.choice([1, 1, 2])):
            r = rng.random()
            if r < 0.45:
                data, note = mutate_dicom_dataset(victim, rng)
            elif r < 0.9:
                data, note = mutate_bytes(victim.read_bytes(), rng)
            else:
                victim.unlink()
                notes.append(f"{victim.name}: deleted")
                continue
            victim.write_bytes(data)
            notes.append(f"{victim.name}: {note}")
        return kind, target, f"{src.relative_to(SHARED)}: {'; '.join(notes)}"
    if kind == "dicomdir":
        target = outdir / "media"
        shutil.copytree(seeds.dicomdir_folder, target)
        r = rng.random()
        files = sorted(p for p in target.rglob("*") if p.is_file() and p.name != "DICOMDIR")
        if r < 0.4:  # referenced files missing
            for victim in rng.sample(files, rng.randrange(1, len(files) + 1)):
                victim.unlink()
            note = "referenced files deleted"
        elif r < 0.8:
            data, note = mutate_bytes((target / "DICOMDIR").read_bytes(), rng)
            (target / "DICOMDIR").write_bytes(data)
            note = "DICOMDIR " + note
        else:
            victim = rng.choice(files)
            data, note = mutate_bytes(victim.read_bytes(), rng)
            victim.write_bytes(data)
            note = f"{victim.name} {note}"
        return kind, target / "DICOMDIR", f"dicomdir: {note}"
    if kind == "nifti":
        src = rng.choice(seeds.nifti)
        data, note, suffix = mutate_nifti(src, rng)
        target = outdir / ("input" + suffix)
        target.write_bytes(data)
        return kind, target, f"{src.name}: {note}"
    if kind == "sitk":
        src = rng.choice(seeds.sitk)
        data, note, suffix = mutate_sitk(src, rng)
        target = outdir / ("input" + suffix)
        target.write_bytes(data)
        return kind, target, f"{src.name}: {note}"
    target = outdir / "model"
    note = mutate_model(seeds.model, target, rng)
    return kind, target, f"model: {note}"


# ============================================================================ worker
def _check_volumes(volumes) -> str | None:
    """None when the volumes are sound, else what is wrong."""
    if not isinstance(volumes, list) or not volumes:
        return "load returned no volumes"
    for v in volumes:
        a = v.array
        if a.dtype != np.float32 or a.ndim not in (3, 4) or 0 in a.shape:
            return f"bad array {a.dtype} {a.shape}"
        if not np.isfinite(a).all():
            return "non-finite voxels handed on"
        aff = np.asarray(v.affine)
        if aff.shape != (4, 4) or not np.isfinite(aff).all() or abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            return "non-finite or singular affine"
    return None


def run_one(kind: str, path: str) -> dict:
    """Load one input in this process and classify the outcome."""
    import warnings

    from napari_restore.errors import InputError, ModelError

    p = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if kind == "model":
                from napari_restore.models import load_model

                load_model(p)
                if (p / "PWNED").exists():
                    return {"outcome": "crash", "detail": "pickle payload executed"}
                return {"outcome": "read"}
            from napari_restore.io import load

            volumes = load(p)
        problem = _check_volumes(volumes)
        if problem:
            return {"outcome": "crash", "detail": problem}
        root = (p.parent if p.is_file() else p).resolve()
        escaped = [v.meta.get("source_path") for v in volumes
                   if not Path(str(v.meta.get("source_path", root))).resolve().is_relative_to(root)]
        return {"outcome": "read", "detail": f"{len(volumes)} volume(s) {volumes[0].array.shape}",
                "declared": int(sum(v.array.nbytes for v in volumes)), "escapes": len(escaped),
                **({"escaped": [str(e) for e in escaped]} if escaped else {})}
    except (InputError, ModelError) as exc:
        if (p / "PWNED").exists():
            return {"outcome": "crash", "detail": "pickle payload executed"}
        named = exc.path is not None and (str(p) in exc.path or exc.path in str(p) or Path(exc.path).parent == p.parent)
        if not named:
            return {"outcome": "crash", "detail": f"refusal does not name the input: {exc}"[:500]}
        return {"outcome": "refused", "detail": str(exc).replace(str(p.parent), "<in>")[:300]}
    except BaseException as exc:  # noqa: BLE001  (that is what we are looking for)
        tb = traceback.format_exc().strip().splitlines()
        return {"outcome": "crash", "detail": f"{type(exc).__name__}: {exc}"[:300], "traceback": tb[-8:]}


def _worker(conn) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
    import napari_restore.io  # noqa: F401  warm the imports, so no input pays for them
    import napari_restore.io.dicom_read  # noqa: F401
    import napari_restore.io.nifti  # noqa: F401
    import napari_restore.models  # noqa: F401
    import napari_restore.networks  # noqa: F401
    import nibabel  # noqa: F401
    import SimpleITK  # noqa: F401
    import pydicom.fileset  # noqa: F401

    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # no thread pool: forks stay safe
    import torch  # noqa: F401

    from napari_restore.networks import build_network  # warm MONAI too: a cold import costs seconds per input

    build_network("ResidualUNet", {"spatial_dims": 2, "channels": [4, 8], "strides": [2], "num_res_units": 0})

    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        conn.send(run_isolated(*msg))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def run_isolated(kind: str, path: str, timeout: float) -> dict:
    """``run_one`` in a forked child under a memory cap and a time limit (SIGALRM), with its peak
    memory (VmHWM after a reset, minus the RSS it started with) and its own wall time."""
    import resource
    import signal

    rfd, wfd = os.pipe()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:  # the child: one input, then exit
        os.close(rfd)
        try:
            signal.alarm(max(1, int(timeout + 0.999)))
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP, MEMORY_CAP))
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # reset the peak RSS
            import torch

            torch.set_num_threads(1)  # two workers on a small machine: no thread oversubscription
            base = _status_kib("VmRSS")
            t1 = time.time()
            result = run_one(kind, path)
            result["seconds"] = round(time.time() - t1, 3)
            result["peak_mib"] = round(max(0, _status_kib("VmHWM") - base) / 1024, 1)
            os.write(wfd, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    while True:
        b = os.read(rfd, 65536)
        if not b:
            break
        chunks.append(b)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    elapsed = round(time.time() - t0, 3)
    if chunks:
        return json.loads(b"".join(chunks))
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM:
        return {"outcome": "hang", "detail": f"no answer after {timeout:.0f} s", "seconds": elapsed}
    return {"outcome": "crash", "detail": f"input process died (status {status})", "seconds": elapsed}


class Worker:
    """One persistent worker process; replaced when it hangs or dies."""

    def __init__(self, ctx):
        self.ctx = ctx
        self.start()

    def start(self) -> None:
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child,), daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("fuzz worker did not start")

    def restart(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join()
        self.start()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=5)
        if self.proc.is_alive():
            self.proc.kill()


def run_campaign(n: int, seed: int = 0, workers: int = 2, timeout: float = 10.0, workdir: Path | None = None,
                 log=None, start: int = 0, verbose: bool = False, stats: dict | None = None,
                 max_seconds: float | None = None, bomb_bytes: int = 2**31 - 2) -> Counter:
    """Run ``n`` mutated inputs (indices ``start..start+n-1``); returns the outcome counts.

    Every record (index, kind, description, outcome, detail, seconds) is written to ``log`` (a
    file object) as one JSON line when given.
    """
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="nr-fuzz-")) if own else Path(workdir)
    seeds = prepare_seeds(workdir, bomb_bytes)
    ctx = mp.get_context("forkserver") if sys.platform.startswith("linux") else mp.get_context("spawn")
    pool = [Worker(ctx) for _ in range(workers)]
    counts: Counter = Counter()
    busy: dict[int, tuple] = {}  # worker slot -> (index, kind, desc, t0, folder)
    todo = iter(range(start, start + n))
    t_start = time.time()
    try:
        while True:
            for slot, w in enumerate(pool):
                if slot in busy:
                    continue
                index = next(todo, None)
                if max_seconds is not None and time.time() - t_start > max_seconds:
                    index = None  # out of time: finish what runs, start nothing new
                if index is None:
                    break
                folder = workdir / f"in{slot}"
                if folder.exists():
                    shutil.rmtree(folder)
                try:
                    kind, path, desc = make_input(index, seed, seeds, folder)
                except Exception as exc:  # noqa: BLE001 - a builder bug must not end a long campaign
                    counts["build-error"] += 1
                    if log is not None:
                        log.write(json.dumps({"index": index, "outcome": "build-error",
                                              "detail": f"{type(exc).__name__}: {exc}"[:300]}) + "\n")
                    continue
                w.conn.send((kind, str(path), timeout))
                busy[slot] = (index, kind, desc, time.time(), folder)
            if not busy:
                break
            ready = mp.connection.wait([pool[s].conn for s in busy] + [pool[s].proc.sentinel for s in busy],
                                       timeout=0.5)
            now = time.time()
            for slot in list(busy):
                index, kind, desc, t0, folder = busy[slot]
                w = pool[slot]
                result = None
                if w.conn in ready or w.conn.poll():
                    try:
                        result = w.conn.recv()
                    except (EOFError, OSError):
                        result = None
                if result is None and not w.proc.is_alive():
                    result = {"outcome": "crash", "detail": f"worker died (exit code {w.proc.exitcode})"}
                    w.restart()
                elif result is None and now - t0 > 3 * timeout + 10:  # the input's own alarm failed
                    result = {"outcome": "hang", "detail": f"no answer after {timeout:.0f} s"}
                    w.restart()
                if result is None:
                    continue
                del busy[slot]
                result.setdefault("seconds", round(now - t0, 3))
                if result["outcome"] in ("read", "refused") and result["seconds"] > timeout:
                    result["outcome"] = "hang"  # answered, but later than the limit
                result.update(index=index, kind=kind, input=desc)
                if stats is not None:
                    _account(stats, result)
                counts[result["outcome"]] += 1
                counts[f"{kind}:{result['outcome']}"] += 1
                if log is not None:
                    log.write(json.dumps(result) + "\n")
                    log.flush()
                if verbose and result["outcome"] in ("crash", "hang"):
                    print(json.dumps(result), flush=True)
                done = sum(counts[o] for o in ("read", "refused", "crash", "hang"))
                if verbose and done % 500 == 0:
                    print(f"{done}/{n} {dict(_summary(counts))} {time.time() - t_start:.0f} s", flush=True)
    finally:
        for w in pool:
            w.stop()
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return counts


#: Peak memory an input may use beyond twice its image: the interpreter's and the parser's own.
PEAK_ALLOWANCE_MIB = 64


def _account(stats: dict, r: dict) -> None:
    """Fold one result into the per-family table (inputs, outcomes, time, memory, escapes)."""
    row = stats.setdefault(r["kind"], Counter())
    row["inputs"] += 1
    row[r["outcome"]] += 1
    row["max_s"] = max(row["max_s"], float(r.get("seconds", 0)))
    peak = float(r.get("peak_mib", 0))
    row["max_peak_mib"] = max(row["max_peak_mib"], peak)
    row["escapes"] += int(r.get("escapes", 0))
    declared = r.get("declared")
    if declared:
        ratio = peak * 2**20 / declared
        row["max_peak_per_image"] = max(row["max_peak_per_image"], ratio)
        row["over_2x"] += int(peak > 2 * declared / 2**20 + PEAK_ALLOWANCE_MIB)


def family_table(stats: dict) -> str:
    """The by-family table as Markdown."""
    head = ("| family | inputs | read | refused | crash | over 10 s | max s | max peak MiB | "
            f"max peak / image (read) | over 2x image + {PEAK_ALLOWANCE_MIB} MiB | path escapes |")
    lines = [head, "|" + "---|" * 11]
    total = Counter()
    for kind in KINDS:
        r = stats.get(kind)
        if not r:
            continue
        for k in ("inputs", "read", "refused", "crash", "hang", "over_2x", "escapes"):
            total[k] += r[k]
        for k in ("max_s", "max_peak_mib", "max_peak_per_image"):
            total[k] = max(total[k], r[k])
        lines.append(_row(kind, r))
    lines.append(_row("**all**", total))
    return "\n".join(lines)


def _row(name: str, r: Counter) -> str:
    return (f"| {name} | {r['inputs']} | {r['read']} | {r['refused']} | {r['crash']} | {r['hang']} | "
            f"{r['max_s']:.1f} | {r['max_peak_mib']:.0f} | {r['max_peak_per_image']:.1f} | {r['over_2x']} | "
            f"{r['escapes']} |")


def _summary(counts: Counter) -> Counter:
    return Counter({k: counts[k] for k in ("read", "refused", "crash", "hang")})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=10000, help="number of mutated inputs (default 10000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--start", type=int, default=0, help="first input index (to resume or reproduce one)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds before an input counts as a hang")
    ap.add_argument("--log", default=None, help="JSON-lines log of every input")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--max-minutes", type=float, default=None, help="start no new input after this many minutes")
    args = ap.parse_args(argv)
    t0 = time.time()
    log = open(args.log, "w") if args.log else None
    try:
        stats: dict = {}
        counts = run_campaign(args.n, args.seed, args.workers, args.timeout, args.workdir, log, args.start, True,
                              stats, None if args.max_minutes is None else 60 * args.max_minutes)
    finally:
        if log:
            log.close()
    ran = sum(r["inputs"] for r in stats.values())
    print(f"\n{ran} of {args.n} mutated inputs run, seed {args.seed}, {time.time() - t0:.0f} s")
    print("outcome   " + "  ".join(f"{o}={counts[o]}" for o in ("read", "refused", "crash", "hang")))
    for kind in KINDS:
        print(f"{kind:13s}" + "  ".join(f"{o}={counts[f'{kind}:{o}']}" for o in ("read", "refused", "crash", "hang")))
    print()
    print(family_table(stats))
    escapes = sum(r["escapes"] for r in stats.values())
    return 0 if counts["crash"] == 0 and counts["hang"] == 0 and escapes == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
