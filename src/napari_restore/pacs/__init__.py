"""Query/retrieve from and send to a PACS, over DICOM networking (DIMSE, pynetdicom) or DICOMweb
(dicomweb-client). Needs the optional extra: ``pip install napari-restore[pacs]``.

>>> from napari_restore import pacs
>>> pacs.echo("orthanc")                                     # seconds
>>> rows = pacs.find("orthanc", patient="DOE*", modality="CT", date="20260101-20261231")
>>> got = pacs.get("orthanc", "incoming/", study=rows[0]["StudyInstanceUID"], series=rows[0]["SeriesInstanceUID"])
>>> pacs.send("orthanc", "restored_dicom/")                   # SendResult: stored / refused

Servers are configured in a small JSON file (:mod:`.config`). Retrieves are resumable: instances
already in the folder are not fetched again; one that delivers only part of a series raises
:class:`~napari_restore.errors.PartialRetrieveError` and the partial series is not returned as
complete. ``progress(done, total)`` and ``cancel() -> bool`` work as elsewhere in the project.
This package never imports napari or Qt.
"""
from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import InputError, PacsError, PartialRetrieveError
from .common import GetResult, Query, SendResult, wildcard_match
from .config import Server, config_path, get_server, load_servers, remove_server, save_server

__all__ = ["Server", "GetResult", "SendResult", "echo", "find", "get", "send", "parse_source", "fetch_source",
           "load_servers", "save_server", "remove_server", "get_server", "config_path", "is_pacs_source"]

Progress = Callable[[int, int], None]
Cancel = Callable[[], bool]


def _require() -> None:
    try:
        import pynetdicom  # noqa: F401
        import dicomweb_client  # noqa: F401
    except ImportError as exc:
        raise PacsError(f"PACS support needs the optional extra: pip install 'napari-restore[pacs]' ({exc.name} is "
                        f"missing)") from None


def _via(server: Server, via: str | None, kind: str) -> str:
    """The protocol of an operation: ``dimse`` or ``web`` (``kind`` find/get/send)."""
    if via in ("dimse", "web"):
        chosen = via
    elif via in ("get", "move", "store"):
        chosen = "dimse"
    elif via in ("wado", "qido", "stow"):
        chosen = "web"
    elif via is None:
        chosen = "web" if (kind == "get" and server.retrieve == "wado") or not server.has_dimse else "dimse"
    else:
        raise InputError(f"unknown protocol {via!r}: dimse, web, get, move, wado, store or stow")
    if chosen == "dimse" and not server.has_dimse:
        raise PacsError("no DIMSE endpoint (AE title, host, port) is configured", server.name)
    if chosen == "web" and not server.url:
        raise PacsError("no DICOMweb URL is configured", server.name)
    return chosen


def echo(server: str | Server, via: str | None = None) -> float:
    """C-ECHO (or, for DICOMweb, a one-result QIDO-RS study search); the round trip in seconds."""
    _require()
    s = get_server(server)
    if _via(s, via, "echo") == "dimse":
        from .dimse import echo as dimse_echo

        return dimse_echo(s)
    from .web import qido

    t0 = time.perf_counter()
    qido(s, "STUDY", {}, limit=1)
    return time.perf_counter() - t0


def _date(date: str | None) -> str | None:
    if date is None:
        return None
    d = date.replace("/", "").replace(" ", "")
    if not re.match(r"^(\d{8})?-?(\d{8})?$", d) or d in ("", "-"):
        raise InputError(f"date {date!r}: use YYYYMMDD, YYYYMMDD-YYYYMMDD, -YYYYMMDD or YYYYMMDD-")
    return d


def find(server: str | Server, *, patient: str | None = None, patient_id: str | None = None,
         modality: str | None = None, date: str | None = None, description: str | None = None,
         study: str | None = None, accession: str | None = None, level: str = "series", limit: int = 200,
         via: str | None = None) -> list[dict[str, Any]]:
    """Studies (``level="study"``) or series (default) matching the query, newest study first.

    ``patient``/``description`` accept DICOM wildcards (``*``, ``?``); ``description`` matches the
    series description (the study description at study level) anywhere in the text, in any case,
    by either protocol (matched here: C-FIND matching of LO values is case-sensitive); ``date`` is a
    StudyDate or range ``YYYYMMDD-YYYYMMDD``. Each row is a dict of DICOM keywords (study keys on
    series rows too). At most ``limit`` studies are queried (``10 * limit`` with a study-level
    ``description``) and ``limit`` rows returned.
    """
    _require()
    s = get_server(server)
    proto = _via(s, via, "find")
    if proto == "dimse":
        from .dimse import c_find as query
    else:
        from .web import qido as query
    desc = None if not description else (description if any(c in description for c in "*?") else f"*{description}*")
    keys = {"PatientName": patient, "PatientID": patient_id, "StudyDate": _date(date),
            "StudyInstanceUID": study, "AccessionNumber": accession}
    if level == "study":
        keys.update(ModalitiesInStudy=modality)
    studies = query(s, "STUDY", keys, limit=limit if not (desc and level == "study") else 10 * limit)
    if desc and level == "study":
        studies = [r for r in studies if wildcard_match(r.get("StudyDescription"), desc)]
    if modality and level == "study":  # not every server matches ModalitiesInStudy
        studies = [r for r in studies if not r.get("ModalitiesInStudy")
                   or modality.upper() in str(r["ModalitiesInStudy"]).upper().split("\\")]
    studies.sort(key=lambda r: (r.get("StudyDate") or "", r.get("StudyTime") or ""), reverse=True)
    if level == "study":
        return studies[:limit]
    if level != "series":
        raise InputError(f"level {level!r}: study or series")
    rows: list[dict[str, Any]] = []
    for st in studies:
        for se in query(s, "SERIES", {"StudyInstanceUID": st["StudyInstanceUID"], "Modality": modality},
                        limit=limit if not desc else 10 * limit):
            if modality and se.get("Modality") and se["Modality"].upper() != modality.upper():
                continue
            if desc and not wildcard_match(se.get("SeriesDescription"), desc):
                continue
            rows.append({**st, **{k: v for k, v in se.items() if v is not None}})
            if len(rows) >= limit:
                return rows
    return rows


def _instances(s: Server, proto: str, q: Query) -> list[dict[str, Any]]:
    if proto == "dimse":
        from .dimse import c_find as query
    else:
        from .web import qido as query
    rows = query(s, "IMAGE", {"StudyInstanceUID": q.study, "SeriesInstanceUID": q.series}, limit=100000)
    rows = [r for r in rows if r.get("SOPInstanceUID")]
    for r in rows:
        r.setdefault("SeriesInstanceUID", q.series)
    return rows


def get(server: str | Server, folder: str | os.PathLike, *, study: str, series: str | None = None,
        via: str | None = None, progress: Progress | None = None, cancel: Cancel | None = None) -> GetResult:
    """Retrieve a series (or, with ``series=None``, every series of the study) into ``folder``.

    ``via``: ``"get"`` (C-GET), ``"move"`` (C-MOVE to our loopback C-STORE SCP), ``"wado"``
    (WADO-RS); default: the server's ``retrieve`` setting. Files are ``<SOPInstanceUID>.dcm``
    (a whole study: one sub-folder per series). Instances already there are skipped.

    Raises:
        PartialRetrieveError: fewer instances arrived than the server listed; what arrived stays for
            a resumed retrieve. PacsError: server down, association refused, timeout, HTTP error.
        Cancelled: ``cancel()`` returned True.
    """
    _require()
    s = get_server(server)
    method = via if via in ("get", "move", "wado") else s.retrieve
    if via in ("dimse",):
        method = s.retrieve if s.retrieve != "wado" else "get"
    elif via == "web":
        method = "wado"
    if method != "wado" and not s.has_dimse:
        method = "wado"
    proto = _via(s, "web" if method == "wado" else "dimse", "get")
    folder = Path(folder)
    if series is None:
        rows = find(s, study=study, level="series", via=proto, limit=10000)
        if not rows:
            raise PacsError(f"study {study} not found", s.name)
        total = GetResult(folder=folder)
        for r in rows:
            sub = get(s, folder / r["SeriesInstanceUID"], study=study, series=r["SeriesInstanceUID"], via=method,
                      progress=progress, cancel=cancel)
            total.expected += sub.expected
            total.fetched += sub.fetched
            total.skipped += sub.skipped
            total.seconds += sub.seconds
            total.files += sub.files
        return total
    from .common import FileSink

    t0 = time.perf_counter()
    q = Query(study=study, series=series)
    instances = _instances(s, proto, q)
    if not instances:
        raise PacsError(f"series {series} of study {study} not found (no instances)", s.name)
    expected = {r["SOPInstanceUID"] for r in instances}
    sink = FileSink(folder, expected, progress)
    sink.done = sum(1 for u in expected if sink.has(u))
    skipped = sink.done
    if progress is not None:
        progress(sink.done, len(expected))
    if skipped < len(expected):
        if method == "wado":
            from .web import wado

            wado(s, q, instances, sink, cancel)
        else:
            from .dimse import retrieve

            retrieve(s, method, q, instances, sink, cancel)
    files = [sink.path(u) for u in sorted(expected)]
    have = sum(1 for f in files if f.is_file())
    if have < len(expected):
        raise PartialRetrieveError(
            f"partial retrieve of series {series}: {have} of {len(expected)} instances arrived ({sink.fetched} now, "
            f"{skipped} before); not opened as complete. Rerun the same retrieve to fetch the rest.", s.name,
            received=have, expected=len(expected), folder=folder)
    return GetResult(folder=folder, expected=len(expected), fetched=sink.fetched, skipped=skipped,
                     seconds=time.perf_counter() - t0, files=files)


def _dicom_files(source: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        p = Path(source)
        if p.is_file():
            return [p]
        if not p.is_dir():
            raise InputError("no such file or folder", p)
        cands = sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    else:
        cands = [Path(f) for f in source]
    out = []
    for f in cands:
        with open(f, "rb") as fh:
            head = fh.read(132)
        if head[128:132] == b"DICM":
            out.append(f)
    if not out:
        raise InputError("no DICOM files (Part 10, with the DICM preamble) to send", source if isinstance(
            source, (str, os.PathLike)) else None)
    return out


def send(server: str | Server, source: str | os.PathLike | Sequence[str | os.PathLike], *, via: str | None = None,
         progress: Progress | None = None, cancel: Cancel | None = None, check: bool = True) -> SendResult:
    """Store the DICOM files of ``source`` (a folder, searched recursively, or a list of files).

    ``via``: ``"store"`` (C-STORE) or ``"stow"`` (STOW-RS); default C-STORE when the server has a
    DIMSE endpoint. With ``check`` (default) a refused instance raises :class:`PacsError` naming
    the refusal status; ``check=False`` returns the :class:`SendResult` with the refusals in it.
    """
    _require()
    s = get_server(server)
    files = _dicom_files(source)
    if _via(s, via, "send") == "dimse":
        from .dimse import store

        result = store(s, files, progress, cancel)
    else:
        from .web import stow

        result = stow(s, files, progress, cancel)
    if check and result.refused:
        err = PacsError(f"send: {result.summary()}", s.name)
        err.result = result  # type: ignore[attr-defined]
        raise err
    return result


_SOURCE_RE = re.compile(r"^pacs://([A-Za-z0-9_.-]+)/([0-9.]+)(?:/([0-9.]+))?/?$")


def is_pacs_source(text: str | os.PathLike) -> bool:
    return str(text).startswith("pacs://")


def parse_source(text: str) -> tuple[str, str, str | None]:
    """``pacs://NAME/STUDY_UID[/SERIES_UID]`` -> ``(name, study, series)``."""
    m = _SOURCE_RE.match(str(text))
    if not m:
        raise InputError(f"{text!r}: a PACS source is pacs://NAME/STUDY_UID or pacs://NAME/STUDY_UID/SERIES_UID")
    return m.group(1), m.group(2), m.group(3)


def cache_dir() -> Path:
    env = os.environ.get("NAPARI_RESTORE_PACS_CACHE")
    if env:
        return Path(env)
    try:
        from platformdirs import user_cache_dir

        return Path(user_cache_dir("napari-restore", appauthor=False)) / "pacs"
    except ImportError:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napari-restore" / "pacs"


def fetch_source(text: str, cache: str | os.PathLike | None = None, via: str | None = None,
                 progress: Progress | None = None, cancel: Cancel | None = None) -> GetResult:
    """Retrieve ``pacs://NAME/STUDY[/SERIES]`` into the cache (resumable) and return where it is."""
    name, study, series = parse_source(text)
    folder = Path(cache or cache_dir()) / name / study
    if series:
        folder = folder / series
    return get(name, folder, study=study, series=series, via=via, progress=progress, cancel=cancel)
