"""Export every series of ../shared/data as a derived DICOM series (plain and de-identified) and
check each export with dciodvfy against its source: errors and warnings, source vs export."""
from __future__ import annotations

import re
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

import napari_restore as nr
from napari_restore.deidentify import Deidentifier
from napari_restore.errors import RestoreError

#: top-level entries whose series are exported (each file of a folder of unrelated files on its own)
SOURCES = [
    "ct/philips-head-phantom/exam", "ct/philips-head-phantom/tilt/S3010", "ct/siemens-body-j2k",
    "ct/nifti/example_ct.nii.gz", "ct/nifti/example_ct_sm.nii.gz", "ct/nifti/cta_aorta_cropped.nii.gz",
    "ct/nifti/cta_pulmonary_cropped.nii.gz",
    "mr/uih-t1-sag", "mr/siemens-xa30-enhanced", "mr/siemens-prisma-jpeg-fragments",
    "mr/nifti/T1.nii.gz", "mr/nifti/T2.nii.gz", "mr/nifti/FLAIR.nii.gz", "mr/nifti/seg3d_MR.nii.gz",
    "fixtures/transfer-syntaxes/In", "fixtures/dicom2nifti/ge", "fixtures/dicom2nifti/philips",
    "fixtures/dicom2nifti/philips_enhanced", "fixtures/dicom2nifti/hitachi", "fixtures/dicom2nifti/hyperfine",
]
#: folders of single files of many kinds: every file is its own source
FILE_FOLDERS = ["fixtures/pydicom-data", "fixtures/pylibjpeg"]

# dciodvfy warnings an export may show although its source did not:
EXPECTED_WARNINGS = [
    # The classic MR IOD has no Modality LUT module; float MR needs RescaleSlope to be stored in
    # int16 (dcm2niix, ITK/GDCM and pydicom apply it). Written only when the slope is not 1.
    r"Non-identity Modality LUT Module .* MR IOD",
    r"Attribute is not present in standard DICOM IOD - \(0x0028,0x105[23]\) DS Rescale",
    r"Dicom dataset contains attributes not present in standard DICOM IOD",
    # No DICOM source: the body part, hence whether it is paired, is unknown: Laterality is empty.
    r"is only permitted to be empty when actually unknown.*<Laterality>",
]
# de-identified with dates removed (the basic profile's default): no study date and time to index
DEID_EXPECTED_WARNINGS = [r"needed to build DICOMDIR - Study (Date|Time)$"]


@dataclass
class Row:
    source: str
    series: str
    kind: str  # "plain" or "deid"
    src_errors: int = 0
    src_warnings: int = 0
    errors: list[str] = field(default_factory=list)
    new_warnings: list[str] = field(default_factory=list)
    files: int = 0
    note: str = ""
    folder: Path | None = None
    positions: np.ndarray | None = None  # LPS mm of every source slice, as the export must place them


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """(errors, warnings) of one file, with the file name taken out of each line."""
    res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    lines = [line.replace(str(path), "FILE") for line in (res.stdout + res.stderr).splitlines()]
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def _normalise(line: str) -> str:
    """A warning without the values that differ between source and export (element values)."""
    return re.sub(r"Value dump.*$", "", re.sub(r"<[^>]*>\s*=\s*<[^>]*>", "", line)).strip()


def _source_condition(warning: str, source: pydicom.Dataset | None) -> bool:
    """Whether a warning only restates the source's own value: a DICOMDIR key the source leaves
    empty or invalid, or a defined term the source itself uses (dciodvfy could not always check
    the source, e.g. one with an empty SOPClassUID)."""
    if source is None:
        return False
    m = re.search(r"needed to build DICOMDIR - (.+)$", warning)
    if m:
        from napari_restore.io.dicom_conform import valid_value

        elem = source.get(m.group(1).replace(" ", ""))
        return elem is None or elem == "" or not valid_value(
            pydicom.datadict.dictionary_VR(m.group(1).replace(" ", "")), str(elem))
    m = re.search(r"Unrecognized defined term <([^>]*)>", warning)
    return bool(m) and f"'{m.group(1)}'" in repr(source)


def _source_file(vol: nr.Volume) -> Path | None:
    if vol.meta.get("source_format") != "dicom":
        return None
    uid = (vol.meta.get("source_sops") or [{}])[0].get("sop_instance")
    src = Path(vol.meta["source_path"])
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file())
    for p in files:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except Exception:
            continue
        if str(ds.get("SOPInstanceUID", "")) == uid:
            return p
    return None


def _inputs(shared: Path) -> list[Path]:
    out = [shared / s for s in SOURCES]
    for folder in FILE_FOLDERS:
        out += sorted(p for p in (shared / folder).rglob("*") if p.is_file() and not p.name.startswith("."))
    return out


def check_all(shared: Path, tmp: Path) -> list[Row]:
    """One row per exported series and mode (plain, de-identified), or per refused source."""
    rows: list[Row] = []
    deid = Deidentifier(key="conformance")
    for n, path in enumerate(_inputs(shared)):
        rel = str(path.relative_to(shared))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                volumes = nr.load(path)
        except RestoreError as exc:
            rows.append(Row(rel, "-", "-", note=f"not read: {str(exc)[-80:]}"))
            continue
        for i, vol in enumerate(volumes):
            name = f"#{i} {vol.meta.get('description', '')}"[:40]
            modality = vol.modality if vol.modality in ("CT", "MR") else ("MR" if rel.startswith("mr/") else
                                                                          "CT" if rel.startswith("ct/") else None)
            if vol.array.ndim != 3 or modality is None:
                rows.append(Row(rel, name, "-", note="not exported: " + (
                    "4-D (DICOM export is 3-D only)" if vol.array.ndim != 3 else f"modality {vol.modality}")))
                continue
            src_file = _source_file(vol)
            se, sw = dciodvfy(src_file) if src_file is not None else ([], [])
            src_ds = pydicom.dcmread(src_file, stop_before_pixels=True) if src_file is not None else None
            allowed = {_normalise(w) for w in sw}
            restored = vol.copy_with(vol.array, {"task": "denoise", "model": "conformance-check"})
            for kind in ("plain", "deid"):
                out = tmp / f"{n}_{i}_{kind}"
                row = Row(rel, name, kind, len(se), len(sw))
                kwargs = {"deidentify": deid, "accept_burned_in": True} if kind == "deid" else {}
                try:
                    nr.save(restored, out, format="dicom", modality=modality, **kwargs)
                except RestoreError as exc:
                    row.note = f"refused: {str(exc)[-100:]}"
                    rows.append(row)
                    continue
                files = sorted(out.glob("*.dcm"))
                row.files, row.folder, row.positions = len(files), out, vol.slice_positions
                for f in {files[0], files[len(files) // 2], files[-1]}:
                    errors, warns = dciodvfy(f)
                    row.errors += errors
                    row.new_warnings += [w for w in warns if _normalise(w) not in allowed
                                         and not any(re.search(p, w) for p in EXPECTED_WARNINGS)
                                         and not (kind == "deid" and any(re.search(p, w) for p in DEID_EXPECTED_WARNINGS))
                                         and not _source_condition(w, src_ds)]
                row.errors = sorted(set(row.errors))
                row.new_warnings = sorted(set(row.new_warnings))
                rows.append(row)
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'source':58} {'series':28} {'mode':5} {'src E/W':>8} {'out E':>5} {'new W':>5}  note"]
    for r in rows:
        lines.append(f"{r.source[-58:]:58} {r.series[:28]:28} {r.kind:5} {r.src_errors:>3}/{r.src_warnings:<4} "
                     f"{len(r.errors):>5} {len(r.new_warnings):>5}  {r.note}")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys
    import tempfile

    rows = check_all(Path(sys.argv[1]), Path(tempfile.mkdtemp()))
    print(table(rows))
    for r in rows:
        for e in r.errors + r.new_warnings:
            print(r.source, r.kind, e)
