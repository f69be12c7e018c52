"""Walk a tree of studies and pick the image series to restore.

A tree holds DICOM folders (any depth, DICOMDIR or not), NIfTI files and MHA/NRRD files. DICOM
files are grouped into series exactly as :func:`napari_restore.load` groups them (the reader's own
header parser and series key: SeriesInstanceUID, SeriesNumber, size, orientation, echo, stack), so a
series spread over several folders is still one series. Each folder's headers are read in a worker
process (headers only, no pixels) and only paths and a few numbers are kept, so the index of a large
archive stays small.

Selected: ``image`` and ``derived`` greyscale series (see ``Series.kind``) and every NIfTI/MHA/NRRD
file. Skipped and counted: localizers, secondary captures, reports (SR, encapsulated PDF), other
non-image objects (presentation states, RT structures, ...), colour images, non-DICOM files.
Unreadable DICOM files become :class:`SeriesItem` entries with ``error`` set, so the run records
them as failed (the file and the reason) instead of losing them.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .lifeline import pool_kwargs
from ..io import NIFTI_SUFFIXES, SITK_SUFFIXES

#: Kinds of series that are restored; the others are skipped and counted.
SELECTED_KINDS = ("image", "derived")
_REPORT_SOP_PREFIXES = ("1.2.840.10008.5.1.4.1.1.88", "1.2.840.10008.5.1.4.1.1.104")
_SKIP_LABELS = {
    "localizer": "localizer series", "secondary": "secondary-capture series", "report": "report objects (SR, PDF)",
    "non-image": "other non-image objects", "colour": "colour images", "non-dicom": "non-DICOM files",
    "dicomdir": "DICOMDIR index files",
}
#: Suffixes never opened as DICOM (they are read by other readers or are not images).
_NOT_DICOM = (".txt", ".md", ".csv", ".json", ".xml", ".html", ".pdf", ".png", ".jpg", ".jpeg", ".zip", ".gz",
              ".raw", ".py", ".log", ".bval", ".bvec", ".tsv")


@dataclass
class SeriesItem:
    """One unit of work: a DICOM series, a NIfTI/MHA/NRRD file, or an unreadable file.

    Attributes:
        id: stable identifier (hash of the series key relative to the root); the manifest's key.
        input: the series' folder (common parent of its files) or the file, relative to the root.
        files: the absolute paths of its files (DICOM) or ``[file]``.
        kind: ``image``/``derived`` (DICOM), ``file`` (NIfTI/MHA/NRRD) or ``error``.
        slices: number of 2-D images (``frames`` for DICOM, ``z * t`` for a file): the sharding weight.
        shape: ``(slices, rows, columns)`` as far as the headers tell.
        error: why the item cannot be read (``kind == "error"``).
    """

    id: str
    input: str
    files: list[str]
    kind: str
    key: Any = None
    series_uid: str = ""
    series_number: str = ""
    description: str = ""
    modality: str = ""
    slices: int = 0
    shape: tuple[int, ...] = ()
    error: str = ""
    label: str = ""

    @property
    def voxels(self) -> int:
        n = 1
        for s in self.shape:
            n *= int(s)
        return n


@dataclass
class WalkResult:
    """The selected items (sorted by input path, then series number) and what was skipped."""

    root: Path
    items: list[SeriesItem]
    skipped: Counter = field(default_factory=Counter)
    skipped_examples: dict[str, list[str]] = field(default_factory=dict)

    def skipped_lines(self) -> list[str]:
        """One human line per skipped category, e.g. ``2 localizer series (e.g. exam/S1000)``."""
        lines = []
        for cat, n in sorted(self.skipped.items()):
            ex = self.skipped_examples.get(cat, [])
            lines.append(f"{n} {_SKIP_LABELS.get(cat, cat)}" + (f" (e.g. {', '.join(ex[:2])})" if ex else ""))
        return lines


# ----------------------------------------------------------------------------- per-folder scan (worker)
def _classify_not_image(message: str) -> str:
    if "colour image" in message:
        return "colour"
    sop = re.search(r"SOP class ([0-9.]+)", message)
    if sop and sop.group(1).startswith(_REPORT_SOP_PREFIXES):
        return "report"
    return "non-image"


def _scan_folder(folder: str, files: list[str]) -> dict[str, Any]:
    """Read the headers of ``files`` (one folder) and group their frames into series.

    Returns a small picklable dict: ``groups`` (key -> summary), ``skipped`` (category -> paths),
    ``errors`` ([(path, message)]).
    """
    from ..io import dicom_read as dr

    groups: dict[tuple, dict[str, Any]] = {}
    skipped: dict[str, list[str]] = defaultdict(list)
    errors: list[tuple[str, str]] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for f in files:
            path = Path(f)
            try:
                frames = dr.frames_of(path)
            except dr.NotImage as exc:
                msg = str(exc)
                cat = "dicomdir" if msg == "a DICOMDIR" else "non-dicom" if not exc.report else _classify_not_image(msg)
                skipped[cat].append(f)
                continue
            except InputError as exc:
                errors.append((f, str(exc)))
                continue
            except Exception as exc:  # noqa: BLE001 - a header the reader did not foresee
                errors.append((f, f"{f}: unreadable DICOM header ({type(exc).__name__}: {exc})"))
                continue
            for fr in frames:
                key = dr.series_key(fr)
                g = groups.get(key)
                if g is None:
                    h = fr.header
                    g = groups[key] = {
                        "files": [], "frames": 0, "positions": set(), "rows": int(h.Rows), "columns": int(h.Columns),
                        "image_type": [str(v).upper() for v in (h.get("ImageType") or [])],
                        "sop": dr.sop_class(h), "uid": str(h.get("SeriesInstanceUID", "") or ""),
                        "number": str(h.get("SeriesNumber", "") or ""), "modality": str(h.get("Modality", "") or ""),
                        "description": dr.series_description(h),
                    }
                    if fr.shape:
                        g["rows"], g["columns"] = fr.shape
                if not g["files"] or g["files"][-1] != f:
                    g["files"].append(f)
                g["frames"] += 1
                if fr.position is not None:
                    g["positions"].add(tuple(round(float(v), 3) for v in fr.position))
    return {"folder": folder, "groups": groups, "skipped": dict(skipped), "errors": errors}


def _kind(g: dict[str, Any]) -> str:
    """``Series.kind`` of the reader, from the merged summary (the same rule)."""
    from ..io.dicom_read import series_kind

    return series_kind(g["image_type"], g["sop"], len(g["positions"]), g["frames"])


# ----------------------------------------------------------------------------- tree walk
def _suffix(name: str) -> str:
    low = name.lower()
    for s in NIFTI_SUFFIXES[::-1] + SITK_SUFFIXES:
        if low.endswith(s):
            return s
    return os.path.splitext(low)[1]


def _listing(root: Path, exclude: Path | None) -> tuple[dict[str, list[str]], list[str], Counter, dict]:
    """Folders with their candidate DICOM files, the image files, and the non-image files skipped."""
    dicom: dict[str, list[str]] = {}
    images: list[str] = []
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    excl = str(exclude.resolve()) if exclude is not None else None
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen or (excl is not None and (real == excl or real.startswith(excl + os.sep))):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        cands = []
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            if not os.path.isfile(path):  # a FIFO, socket, device or dangling link: never opened
                skipped["non-dicom"] += 1
                continue
            suf = _suffix(name)
            if suf in NIFTI_SUFFIXES or suf in (".mha", ".mhd", ".nrrd", ".nhdr"):
                images.append(path)
            elif suf in _NOT_DICOM:
                skipped["non-dicom"] += 1
                if len(examples["non-dicom"]) < 3:
                    examples["non-dicom"].append(os.path.relpath(path, root))
            else:
                cands.append(path)
        if cands:
            dicom[dirpath] = cands
    return dicom, images, skipped, examples


def _stable_id(*parts: Any) -> str:
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def _image_item(root: Path, path: str) -> SeriesItem:
    rel = os.path.relpath(path, root)
    item = SeriesItem(id=_stable_id("file", rel), input=rel, files=[path], kind="file",
                      description=os.path.basename(path))
    try:
        if _suffix(path) in NIFTI_SUFFIXES:
            import nibabel as nib

            shape = tuple(int(s) for s in nib.load(path).shape)
            spatial = (shape + (1, 1, 1))[:3]
            t = int(shape[3]) if len(shape) > 3 else 1
            item.shape = (spatial[2] * t, spatial[1], spatial[0])
        else:
            import SimpleITK as sitk

            reader = sitk.ImageFileReader()
            reader.SetFileName(path)
            reader.ReadImageInformation()
            size = list(reader.GetSize()) + [1, 1]
            item.shape = (int(size[2]), int(size[1]), int(size[0]))
        item.slices = int(item.shape[0])
    except Exception as exc:  # noqa: BLE001 - the reader says the real reason when the item is read
        item.kind, item.error = "error", f"{path}: unreadable header ({type(exc).__name__}: {exc})"
    return item


def walk_tree(root: str | os.PathLike, *, workers: int | None = None, exclude: str | os.PathLike | None = None,
              progress=None) -> WalkResult:
    """Find every series to restore under ``root`` (headers only; no pixel is decoded).

    Args:
        root: the input tree.
        workers: processes reading headers (default: up to 4, one per CPU, when there are more than
            400 files); 0 or 1 reads in this process.
        exclude: a folder inside ``root`` to leave out (the output tree, when it lies inside the input).
        progress: ``progress(done, total)`` over folders.

    Returns:
        A :class:`WalkResult`: items sorted by (input path, series number, id), skipped counts.

    Raises:
        InputError: ``root`` is not a folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError("the input root must be a folder (a tree of studies)", root)
    dicom, images, skipped, examples = _listing(root, Path(exclude) if exclude else None)
    folders = list(dicom.items())
    if workers is None:  # worker processes pay off only when there are many headers to parse
        workers = min(4, os.cpu_count() or 1) if sum(len(fs) for _, fs in folders) > 400 else 0
    scans: list[dict[str, Any]] = []
    if workers > 1 and len(folders) > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn"), **pool_kwargs()) as pool:
            for i, scan in enumerate(pool.map(_scan_folder, [f for f, _ in folders], [fs for _, fs in folders])):
                scans.append(scan)
                if progress:
                    progress(i + 1, len(folders))
    else:
        for i, (f, fs) in enumerate(folders):
            scans.append(_scan_folder(f, fs))
            if progress:
                progress(i + 1, len(folders))

    merged: dict[tuple, dict[str, Any]] = {}
    items: list[SeriesItem] = []
    for scan in scans:
        for cat, paths in scan["skipped"].items():
            skipped[cat] += len(paths)
            examples[cat].extend(os.path.relpath(p, root) for p in paths[: 3 - len(examples[cat][:3])])
        for path, message in scan["errors"]:
            rel = os.path.relpath(path, root)
            items.append(SeriesItem(id=_stable_id("error", rel), input=rel, files=[path], kind="error", error=message))
        for key, g in scan["groups"].items():
            m = merged.get(key)
            if m is None:
                merged[key] = g
            else:
                m["files"].extend(g["files"])
                m["frames"] += g["frames"]
                m["positions"] |= g["positions"]
    root_s = str(root)
    for key, g in merged.items():
        kind = _kind(g)
        files = sorted(set(g["files"]))
        folder = os.path.commonpath(files) if len(files) > 1 else os.path.dirname(files[0])
        rel = os.path.relpath(folder, root)
        if kind not in SELECTED_KINDS:
            skipped[kind] += 1
            if len(examples[kind]) < 3:
                examples[kind].append(f"{rel} (series {g['number']})")
            continue
        items.append(SeriesItem(
            id=_stable_id("dicom", repr(key).replace(root_s, "<root>")), input=rel, files=files, kind=kind, key=key,
            series_uid=g["uid"], series_number=g["number"], description=g["description"], modality=g["modality"],
            slices=int(g["frames"]), shape=(int(g["frames"]), g["rows"], g["columns"])))
    for path in images:
        items.append(_image_item(root, path))
    items.sort(key=lambda it: (it.input, _num_key(it.series_number), it.id))
    return WalkResult(root, items, skipped, dict(examples))


def _num_key(v: str) -> tuple:
    try:
        return (0, float(v), "")
    except ValueError:
        return (1, 0.0, v)


# ----------------------------------------------------------------------------- output paths
def _safe(text: str, limit: int = 48) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("._")
    return s[:limit] or "series"


def plan_outputs(items: list[SeriesItem], output_root: str | os.PathLike, fmt: str) -> dict[str, Path]:
    """Output path of every item, mirroring the input tree (deterministic; never one inside another).

    A DICOM series that is alone in its folder is written to ``OUT/<its folder>`` (a DICOM folder,
    or ``OUT/<its folder>.nii.gz``); folders holding several series (or holding other series'
    folders below them) get one ``S<number>_<description>`` entry per series inside. A NIfTI/MHA
    input keeps its relative path (``.nii.gz`` for NIfTI output, a folder without the suffix for
    DICOM output).

    Args:
        fmt: ``"auto"`` (like the input), ``"dicom"`` or ``"nifti"``.
    """
    out = Path(output_root)
    by_folder: dict[str, list[SeriesItem]] = defaultdict(list)
    for it in items:
        if it.kind in SELECTED_KINDS:
            by_folder[it.input].append(it)
    folders = set(by_folder)
    plans: dict[str, Path] = {}
    used: set[str] = set()
    for it in items:
        dicom_in = it.kind in SELECTED_KINDS
        as_dicom = fmt == "dicom" or (fmt == "auto" and dicom_in)
        if dicom_in:
            nested = any(f != it.input and (it.input == "." or f.startswith(it.input.rstrip("/") + "/"))
                         for f in folders)
            if len(by_folder[it.input]) == 1 and not nested and it.input != ".":
                base = it.input
            else:
                base = os.path.join(it.input, _safe(f"S{it.series_number}_{it.description}"))
        else:
            name = it.input
            for s in NIFTI_SUFFIXES[::-1] + SITK_SUFFIXES:
                if name.lower().endswith(s):
                    name = name[: -len(s)]
                    break
            base = name
        rel = base if as_dicom else base + ".nii.gz"
        if rel in used:  # two series with the same number and description in one folder
            stem, ext = (rel, "") if as_dicom else (base, ".nii.gz")
            rel = f"{stem}_{it.id[:8]}{ext}"
        used.add(rel)
        plans[it.id] = out / rel
    return plans


__all__ = ["SeriesItem", "WalkResult", "walk_tree", "plan_outputs", "SELECTED_KINDS"]
