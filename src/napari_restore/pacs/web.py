"""DICOMweb through dicomweb-client: QIDO-RS (find), WADO-RS (retrieve), STOW-RS (send).
HTTP failures become :class:`~napari_restore.errors.PacsError` with the status and what it means;
credentials (HTTP basic auth) never appear in a message."""
from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import Cancelled, PacsError
from .common import FileSink, Query, SendResult, wildcard_match as _match

_TAGS = {  # keyword -> tag as QIDO-RS JSON names it
    "PatientName": "00100010", "PatientID": "00100020", "PatientBirthDate": "00100030",
    "StudyInstanceUID": "0020000D", "StudyDate": "00080020", "StudyTime": "00080030",
    "StudyDescription": "00081030", "AccessionNumber": "00080050", "ModalitiesInStudy": "00080061",
    "NumberOfStudyRelatedInstances": "00201208", "SeriesInstanceUID": "0020000E", "Modality": "00080060",
    "SeriesNumber": "00200011", "SeriesDescription": "0008103E", "SeriesDate": "00080021",
    "NumberOfSeriesRelatedInstances": "00201209", "BodyPartExamined": "00180015",
    "SOPInstanceUID": "00080018", "SOPClassUID": "00080016", "InstanceNumber": "00200013",
}
_HTTP_MEANING = {400: "bad request", 401: "authentication required or failed (check the credentials' environment "
                 "variables or keyring entry)", 403: "forbidden: these credentials may not do this",
                 404: "not found", 409: "conflict", 413: "payload too large", 415: "unsupported media type"}


def client(server):
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    cred = server.credentials()
    if cred is not None:
        session.auth = cred
    if server.tls_ca:
        session.verify = server.tls_ca
    url = server.url.rstrip("/")
    if server.tls and url.startswith("http://"):
        url = "https://" + url[len("http://"):]
    c = DICOMwebClient(url=url, session=session, timeout=server.timeout)
    c.set_http_retry_params(max_attempts=3, wait_exponential_multiplier=250)  # 429/503/504: bounded, ~1 s in all
    return c


@contextlib.contextmanager
def errors(server, what: str) -> Iterator[None]:
    """Map requests' exceptions to one PacsError message."""
    import requests

    try:
        yield
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        meaning = _HTTP_MEANING.get(code) or ("server error" if code >= 500 else "error")
        raise PacsError(f"{what}: HTTP {code} {meaning}", server.name) from None
    except requests.Timeout:
        raise PacsError(f"{what}: no answer from {_origin(server)} within {server.timeout:g} s", server.name) from None
    except requests.ConnectionError:
        raise PacsError(f"{what}: server down or unreachable ({_origin(server)} refused or dropped the connection)",
                        server.name) from None
    except Exception as exc:  # dicomweb-client retries 429/503/504 (package `retrying`), then raises RetryError
        if type(exc).__name__ != "RetryError":
            raise
        value = getattr(getattr(exc, "last_attempt", None), "value", None)
        code = getattr(value, "status_code", 0)
        if isinstance(value, tuple) or not code:
            raise PacsError(f"{what}: failed after retries", server.name) from None
        meaning = _HTTP_MEANING.get(code) or ("server error" if code >= 500 else "error")
        raise PacsError(f"{what}: HTTP {code} {meaning} (after {exc.last_attempt.attempt_number} attempts)",
                        server.name) from None


def _origin(server) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(server.url)
    return f"{u.scheme}://{u.hostname}:{u.port or (443 if u.scheme == 'https' else 80)}"  # never user:password@


def _row(item: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        v = (item.get(_TAGS[k]) or {}).get("Value")
        if not v:
            out[k] = None
        elif isinstance(v[0], dict):  # PersonName
            out[k] = v[0].get("Alphabetic")
        else:
            out[k] = "\\".join(str(x) for x in v)
    return out


def qido(server, level: str, keys: dict[str, Any], limit: int = 1000) -> list[dict[str, Any]]:
    from .dimse import _LEVEL_KEYS

    c = client(server)
    filters = {k: v for k, v in keys.items() if v not in (None, "")}
    study = filters.pop("StudyInstanceUID", None) if level != "STUDY" else None
    series = filters.pop("SeriesInstanceUID", None) if level == "IMAGE" else None
    fields = [k for k in _LEVEL_KEYS[level]]
    # Values that need percent-encoding (wildcards, spaces) are matched here: some servers (Orthanc 1.10's
    # DICOMweb plugin) do not decode them in QIDO-RS query strings; the server then gets fewer filters.
    local = {k: str(v) for k, v in filters.items() if not re.fullmatch(r"[A-Za-z0-9._-]*", str(v))}
    filters = {k: v for k, v in filters.items() if k not in local}
    if local:
        limit_server = None
    else:
        limit_server = limit
    with errors(server, f"QIDO-RS {level.lower()} search"):
        if level == "STUDY":
            items = c.search_for_studies(search_filters=filters, fields=fields, limit=limit_server)
        elif level == "SERIES":
            items = c.search_for_series(study_instance_uid=study, search_filters=filters, fields=fields, limit=limit_server)
        else:
            items = c.search_for_instances(study_instance_uid=study, series_instance_uid=series,
                                           search_filters=filters, fields=fields, limit=limit_server)
    rows = [_row(i, _LEVEL_KEYS[level]) for i in items]
    if local:
        rows = [r for r in rows if all(_match(r.get(k), pat) for k, pat in local.items())]
    rows = rows[:limit]
    for r in rows:  # some servers leave the parent UID out of child-level answers
        if level != "STUDY" and study and not r.get("StudyInstanceUID"):
            r["StudyInstanceUID"] = study
        if level == "IMAGE" and series and not r.get("SeriesInstanceUID"):
            r["SeriesInstanceUID"] = series
    return rows


def wado(server, query: Query, instances: list[dict[str, Any]], sink: FileSink,
         cancel: Callable[[], bool] | None) -> None:
    """WADO-RS instance by instance, skipping what is on disk (resumable, cancellable between instances)."""
    import requests

    c = client(server)
    for r in instances:
        uid = r["SOPInstanceUID"]
        if sink.has(uid):
            continue
        if cancel is not None and cancel():
            raise Cancelled("WADO-RS retrieve cancelled")
        try:
            with errors(server, "WADO-RS retrieve"):
                ds = c.retrieve_instance(query.study, r.get("SeriesInstanceUID") or query.series, uid,
                                         media_types=(("application/dicom", "*"),))
        except PacsError as exc:
            if isinstance(exc.__context__, (requests.ConnectionError, requests.Timeout)) or " 5" in str(exc):
                return  # the caller reports a partial retrieve with the counts
            raise
        sink.write_dataset(ds)


def stow(server, files: Sequence[Path], progress=None, cancel=None, chunk: int = 16) -> SendResult:
    """STOW-RS in chunks; instances in the response's FailedSOPSequence are counted as refused."""
    from pydicom import dcmread

    c = client(server)
    result = SendResult(total=len(files))
    t0 = time.perf_counter()
    for start in range(0, len(files), chunk):
        if cancel is not None and cancel():
            raise Cancelled(f"STOW-RS cancelled after {start} of {len(files)} instances")
        datasets = [dcmread(f) for f in files[start:start + chunk]]
        with errors(server, f"STOW-RS (instances {start + 1}-{start + len(datasets)} of {len(files)})"):
            resp = c.store_instances(datasets)
        failed = {}
        for item in (resp.get("FailedSOPSequence") or []) if resp is not None else []:
            reason = int(item.get("FailureReason", 0xC000))
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = reason
        for ds in datasets:
            uid = str(ds.SOPInstanceUID)
            code = failed.get(uid, 0)
            result.add(uid, code, "refused by the server (STOW-RS FailureReason)" if code else "")
        if progress is not None:
            progress(min(start + chunk, len(files)), len(files))
    result.seconds = time.perf_counter() - t0
    return result
