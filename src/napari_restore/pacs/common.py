"""Shared pieces of the DIMSE and DICOMweb paths: the query, the on-disk sink of a retrieve (atomic,
resumable) and the result of a send."""
from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Query:
    """What to retrieve: a series of a study (``series=None``: every series of the study)."""

    study: str
    series: str | None = None


class Status:
    """Human-readable DIMSE status codes (pynetdicom's tables)."""

    @staticmethod
    def text(code: int, service: str) -> str:
        from pynetdicom import status as st

        table = {"store": st.STORAGE_SERVICE_CLASS_STATUS, "find": st.QR_FIND_SERVICE_CLASS_STATUS,
                 "retrieve": st.QR_GET_SERVICE_CLASS_STATUS}.get(service, st.GENERAL_STATUS)
        hit = table.get(code) or st.GENERAL_STATUS.get(code)
        return f"{hit[0]}: {hit[1]}" if hit else "unknown status"


@dataclass
class SendResult:
    """What a send did: ``stored`` instances, ``refused`` as ``(SOPInstanceUID, status, text)``."""

    total: int = 0
    stored: int = 0
    warnings: int = 0
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, uid: str, code: int, text: str) -> None:
        if code == 0:
            self.stored += 1
        elif code in (0xB000, 0xB006, 0xB007):  # stored with a warning (coercion, elements discarded)
            self.stored += 1
            self.warnings += 1
        else:
            self.refused.append((uid, f"0x{code:04X}", text))

    def summary(self) -> str:
        s = f"{self.stored} of {self.total} instances stored"
        if self.warnings:
            s += f" ({self.warnings} with a warning)"
        if self.refused:
            uid, code, text = self.refused[0]
            s += f", {len(self.refused)} refused (first: {uid} status {code}, {text})"
        return s


@dataclass
class GetResult:
    """What a retrieve did: the ``folder``, instances ``expected``, ``fetched`` now and ``skipped``
    (already on disk), and the files of the series."""

    folder: Path
    expected: int = 0
    fetched: int = 0
    skipped: int = 0
    seconds: float = 0.0
    files: list[Path] = field(default_factory=list)


class FileSink:
    """Instances land in ``folder/<SOPInstanceUID>.dcm``, each written to a temporary name and renamed,
    so what is on disk is always whole: a rerun fetches only what is missing."""

    def __init__(self, folder: Path, expected: set[str], progress: Callable[[int, int], None] | None = None,
                 done: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.expected = expected
        self.progress = progress
        self.done = done
        self.fetched = 0
        self.unexpected: list[str] = []
        self._lock = threading.Lock()

    def path(self, uid: str) -> Path:
        return self.folder / f"{_safe(uid)}.dcm"

    def has(self, uid: str) -> bool:
        return self.path(uid).is_file()

    def write_bytes(self, uid: str, data: bytes) -> None:
        final = self.path(uid)
        tmp = final.with_name(f".{final.name}.{threading.get_ident()}.part")
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
        with self._lock:
            self.fetched += 1
            self.done += 1
            done = self.done
        if self.progress is not None:
            self.progress(min(done, len(self.expected)), len(self.expected))

    def store_event(self, event) -> int:
        """A pynetdicom EVT_C_STORE handler body: 0x0000 stored, 0xA700 out of resources."""
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid not in self.expected:  # a peer pushing what we did not ask for
            self.unexpected.append(uid)
            return 0x0124
        try:
            self.write_bytes(uid, event.encoded_dataset(include_meta=True))
        except OSError:
            return 0xA700
        return 0x0000

    def write_dataset(self, ds) -> None:
        import io

        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        self.write_bytes(str(ds.SOPInstanceUID), buf.getvalue())


def _safe(uid: str) -> str:
    return "".join(ch for ch in uid if ch.isdigit() or ch == ".") or "x"


def row_value(row: dict[str, Any], key: str) -> str:
    v = row.get(key)
    return "" if v is None else str(v)


def wildcard_match(value, pattern: str) -> bool:
    """DICOM wildcard matching (``*``, ``?``), case-insensitive, ``^`` and spaces as in PN/LO values."""
    import fnmatch

    if value is None:
        return False
    return fnmatch.fnmatchcase(str(value).strip().upper(), pattern.strip().upper())
