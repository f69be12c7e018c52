"""Qt-free steps shared by the widget's PACS panel and ``napari-restore batch``: a query's date range,
where a retrieved series lives in the cache, retrieve-then-load, and write-then-send of a derived
series. Never imports napari or Qt.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import InputError
from . import cache_dir, get, send
from .common import GetResult, SendResult, row_value
from .config import Server, get_server

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]

#: the result table of a query: (column header, DICOM keyword)
TABLE_COLUMNS = (("Patient", "PatientName"), ("ID", "PatientID"), ("Date", "StudyDate"),
                 ("Study", "StudyDescription"), ("Mod", "Modality"), ("#", "SeriesNumber"),
                 ("Series", "SeriesDescription"), ("N", "NumberOfSeriesRelatedInstances"))


def date_range(start: str | None, end: str | None) -> str | None:
    """``YYYYMMDD`` bounds (either may be empty) as a DICOM date range, or None for no bound."""
    a, b = ((s or "").replace("-", "").replace("/", "").strip() for s in (start, end))
    for s in (a, b):
        if s and not re.fullmatch(r"\d{8}", s):
            raise InputError(f"date {s!r}: use YYYYMMDD (e.g. 20260131)")
    if not a and not b:
        return None
    if a and b and a > b:
        raise InputError(f"date range {a}-{b}: the start is after the end")
    return a if a == b else f"{a}-{b}"


def table_row(row: dict[str, Any]) -> list[str]:
    """The text of one result row, in :data:`TABLE_COLUMNS` order."""
    out = []
    for _head, key in TABLE_COLUMNS:
        text = row_value(row, key)
        if key == "PatientName":
            text = text.replace("^", " ").strip()
        out.append(text)
    return out


def series_folder(server: str | Server, study: str, series: str, cache: str | os.PathLike | None = None) -> Path:
    """Where a retrieved series lives: ``<cache>/<server>/<study>/<series>`` (as ``pacs://`` sources)."""
    name = server.name if isinstance(server, Server) else str(server)
    return Path(cache or cache_dir()) / name / study / series


def retrieve_series(server: str | Server, study: str, series: str, *, cache: str | os.PathLike | None = None,
                    via: str | None = None, progress: Progress | None = None,
                    cancel: Cancel | None = None) -> GetResult:
    """Retrieve one series into the cache (resumable). A partial retrieve raises
    :class:`~napari_restore.errors.PartialRetrieveError`: nothing is returned to be opened."""
    s = get_server(server)
    return get(s, series_folder(s, study, series, cache), study=study, series=series, via=via,
               progress=progress, cancel=cancel)


def send_volume(server: str | Server, volume: Any, *, via: str | None = None, progress: Progress | None = None,
                cancel: Cancel | None = None, **save_kwargs: Any) -> tuple[SendResult, str]:
    """Write ``volume`` as a derived DICOM series (``save(..., format="dicom", **save_kwargs)``, the
    export of "Export DICOM") into a temporary folder, store it on ``server``, remove the folder.

    Returns the :class:`SendResult` (refusals in it, not raised) and the derived SeriesInstanceUID.
    """
    import pydicom

    from .. import save

    s = get_server(server)
    tmp = Path(tempfile.mkdtemp(prefix="napari-restore-send-"))
    try:
        out = save(volume, tmp / "series", format="dicom", progress=progress, cancel=cancel, **save_kwargs)
        first = next(f for f in sorted(Path(out).iterdir()) if f.is_file())
        uid = str(pydicom.dcmread(first, stop_before_pixels=True).SeriesInstanceUID)
        result = send(s, out, via=via, progress=progress, cancel=cancel, check=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result, uid


def dicom_series_folders(root: str | os.PathLike) -> list[Path]:
    """The folders under ``root`` that hold DICOM files (``*.dcm``), each one written series."""
    root = Path(root)
    return sorted({f.parent for f in root.rglob("*.dcm") if f.is_file()})
