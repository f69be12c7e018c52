"""DICOM networking (DIMSE) through pynetdicom: C-ECHO, C-FIND, C-GET, C-MOVE and C-STORE as SCU,
and a C-STORE SCP only as our C-MOVE destination (bound to loopback unless configured, accepting only
the configured peers). Every failure becomes a :class:`~napari_restore.errors.PacsError`.
"""
from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import Cancelled, PacsError
from .common import FileSink, Query, SendResult, Status

logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)  # our own messages say what went wrong

_TS_UNCOMPRESSED = ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")  # Explicit, Implicit VR Little Endian
_LEVEL_KEYS = {
    "STUDY": ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyTime",
              "StudyDescription", "AccessionNumber", "ModalitiesInStudy", "NumberOfStudyRelatedInstances"),
    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
               "SeriesDate", "NumberOfSeriesRelatedInstances", "BodyPartExamined"),
    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"),
}


def _ae(server, requested: Sequence[tuple[str, Sequence[str]]] = ()):
    from pynetdicom import AE

    ae = AE(ae_title=server.our_ae_title)
    t = server.timeout
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = t
    ae.maximum_pdu_size = 0  # unlimited: fewer, larger PDUs on a LAN
    for sop_class, syntaxes in requested:
        ae.add_requested_context(sop_class, list(syntaxes))
    return ae


def _diagnose(server) -> str | None:
    """Why no association: nothing listening, host unreachable or a timeout; None if the port answers."""
    wait = min(server.timeout, 5.0)
    try:
        with socket.create_connection((server.host, server.port), timeout=wait):
            return None
    except ConnectionRefusedError:
        return f"server down: nothing is listening on {server.host}:{server.port}"
    except socket.timeout:
        return f"timed out after {wait:g} s connecting to {server.host}:{server.port}"
    except OSError as exc:
        return f"cannot reach {server.host}:{server.port} ({exc.strerror or exc})"


def lost(server, assoc, what: str) -> PacsError:
    """The error for a request that got no response."""
    if assoc.is_aborted:
        return PacsError(f"{what}: the server aborted the association (is our AE title {server.our_ae_title!r} "
                         f"allowed to do this on the server?)", server.name)
    down = _diagnose(server)
    hint = down or (f"the server may refuse this request from our AE title {server.our_ae_title!r} (is it in the "
                    f"server's list of modalities?) or be too slow (timeout setting)")
    return PacsError(f"{what}: no response within {server.timeout:g} s; {hint}", server.name)


@contextlib.contextmanager
def associate(server, requested: Sequence[tuple[str, Sequence[str]]], ext_neg=None,
              handlers: Sequence = ()) -> Iterator[Any]:
    """An established association with ``server`` (released on exit, aborted on an exception)."""
    from pynetdicom import evt

    ae = _ae(server, requested)
    seen: dict[str, Any] = {}

    def on_recv(event):  # keep the A-ASSOCIATE-RJ primitive: it says why
        prim = event.primitive
        if getattr(prim, "result", None) in (0x01, 0x02):
            seen["reject"] = prim

    kw: dict[str, Any] = {"ae_title": server.ae_title, "evt_handlers": [(evt.EVT_ACSE_RECV, on_recv), *handlers]}
    if ext_neg:
        kw["ext_neg"] = ext_neg
    if server.tls:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=server.tls_ca)
        kw["tls_args"] = (ctx, server.host)
    assoc = ae.associate(server.host, server.port, **kw)
    if not assoc.is_established:
        if assoc.is_rejected and "reject" in seen:
            rj = seen["reject"]
            hint = ""
            if rj.reason_str.startswith("Called AE"):
                hint = f" (is the server's AE title really {server.ae_title!r}?)"
            elif rj.reason_str.startswith("Calling AE"):
                hint = f" (the server does not know our AE title {server.our_ae_title!r})"
            raise PacsError(f"association refused by {server.ae_title}@{server.host}:{server.port}: "
                            f"{rj.reason_str}{hint} [{rj.result_str}, {rj.source_str}]", server.name)
        if assoc.is_rejected:
            raise PacsError(f"association refused by {server.ae_title}@{server.host}:{server.port}", server.name)
        down = _diagnose(server)
        if down:
            raise PacsError(down, server.name)
        if assoc.is_aborted:
            raise PacsError(f"{server.ae_title}@{server.host}:{server.port} aborted the association (no "
                            f"presentation context accepted, or our AE title {server.our_ae_title!r} is not allowed)",
                            server.name)
        raise PacsError(f"{server.ae_title}@{server.host}:{server.port} did not complete the association within "
                        f"{server.timeout:g} s", server.name)
    try:
        yield assoc
    except BaseException:
        assoc.abort()
        raise
    else:
        if assoc.is_established:
            assoc.release()
    finally:
        ae.shutdown()


def echo(server) -> float:
    """C-ECHO; the round trip in seconds."""
    from pynetdicom.sop_class import Verification

    t0 = time.perf_counter()
    with associate(server, [(Verification, _TS_UNCOMPRESSED)]) as assoc:
        status = assoc.send_c_echo()
    code = _code(status)
    if code is None:
        raise lost(server, assoc, "C-ECHO")
    if code != 0:
        raise PacsError(f"C-ECHO failed with status 0x{code:04X}", server.name)
    return time.perf_counter() - t0


def _code(status) -> int | None:
    return int(status.Status) if status is not None and "Status" in status else None


def c_find(server, level: str, keys: dict[str, Any], limit: int = 1000) -> list[dict[str, Any]]:
    """One study-root C-FIND at ``level`` (STUDY/SERIES/IMAGE); at most ``limit`` matches."""
    from pydicom.dataset import Dataset
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND

    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for k in _LEVEL_KEYS[level]:
        setattr(ds, k, "")
    for k, v in keys.items():
        if v is not None:
            setattr(ds, k, v)
    rows: list[dict[str, Any]] = []
    with associate(server, [(FIND, _TS_UNCOMPRESSED)]) as assoc:
        for status, ident in assoc.send_c_find(ds, FIND):
            code = _code(status)
            if code is None:
                raise lost(server, assoc, "C-FIND")
            if code in (0xFF00, 0xFF01) and ident is not None:
                rows.append({k: _value(ident.get(k)) for k in _LEVEL_KEYS[level]})
                if len(rows) >= limit:
                    assoc.abort()  # bounded: stop reading
                    break
            elif code != 0:
                raise PacsError(f"C-FIND refused with status 0x{code:04X} ({Status.text(code, 'find')})", server.name)
    return rows


def _value(v) -> Any:
    if v is None:
        return None
    from pydicom.valuerep import PersonName

    if isinstance(v, PersonName):  # iterable (by character): "H\\E\\A\\D" otherwise
        s = str(v)
        return s if s else None
    if hasattr(v, "__iter__") and not isinstance(v, (str, bytes)):
        return "\\".join(str(x) for x in v)
    s = str(v)
    return s if s else None


def _storage_contexts(classes: Sequence[str]) -> list[tuple[str, Sequence[str]]]:
    return [(c, _TS_UNCOMPRESSED) for c in sorted(set(classes))][:127]


def retrieve(server, method: str, query: Query, instances: list[dict[str, Any]], sink: FileSink,
             cancel: Callable[[], bool] | None) -> None:
    """C-GET or C-MOVE the ``instances`` (IMAGE-level C-FIND rows) not yet in ``sink``."""
    from pydicom.dataset import Dataset
    from pynetdicom import build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE

    todo = [r for r in instances if not sink.has(r["SOPInstanceUID"])]
    if not todo:
        return
    ds = Dataset()
    ds.StudyInstanceUID = query.study
    ds.SeriesInstanceUID = query.series
    if len(todo) == len(instances):
        ds.QueryRetrieveLevel = "SERIES"
    else:  # resume: only the missing instances
        ds.QueryRetrieveLevel = "IMAGE"
        ds.SOPInstanceUID = [r["SOPInstanceUID"] for r in todo]

    def on_store(event):
        return sink.store_event(event)

    classes = [r.get("SOPClassUID") or "1.2.840.10008.5.1.4.1.1.2" for r in todo]
    if method == "get":
        requested = [(GET, _TS_UNCOMPRESSED), *_storage_contexts(classes)]
        roles = [build_role(c, scp_role=True) for c, _ in requested[1:]]
        with associate(server, requested, ext_neg=roles, handlers=[(evt.EVT_C_STORE, on_store)]) as assoc:
            _drain(server, assoc.send_c_get(ds, GET), assoc, cancel, "C-GET")
    elif method == "move":
        with _store_scp(server, on_store):
            with associate(server, [(MOVE, _TS_UNCOMPRESSED)]) as assoc:
                _drain(server, assoc.send_c_move(ds, server.our_ae_title, MOVE), assoc, cancel, "C-MOVE")
    else:
        raise PacsError(f"unknown DIMSE retrieve method {method!r}", server.name)


def _drain(server, responses, assoc, cancel, what: str) -> None:
    deadline = time.monotonic() + max(600.0, 20 * server.timeout)  # bounded even if the peer keeps pending
    for status, _ident in responses:
        if cancel is not None and cancel():
            assoc.abort()
            raise Cancelled(f"{what} cancelled")
        code = _code(status)
        if code is None:
            return  # association lost or timed out: the caller counts what arrived and reports it
        if code in (0xFF00, 0xFF01):
            if time.monotonic() > deadline:
                assoc.abort()
                return
            continue
        if code in (0x0000, 0xB000, 0xFE00):  # success, warning (some sub-operations failed), cancelled
            return
        if code == 0xA801:
            raise PacsError(f"{what}: the server does not know the move destination {server.our_ae_title!r} "
                            f"(add it with our host and port {server.store_port} to its modalities)", server.name)
        raise PacsError(f"{what} failed with status 0x{code:04X} ({Status.text(code, 'retrieve')})", server.name)


@contextlib.contextmanager
def _store_scp(server, on_store) -> Iterator[None]:
    """Our C-STORE SCP for C-MOVE: bound to ``store_host`` (loopback by default), only configured peers."""
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    if not server.store_port:
        raise PacsError("C-MOVE needs store_port: the port of our C-STORE SCP that the server sends to "
                        "(`napari-restore pacs add ... --store-port N`)", server.name)
    peers = list(server.allowed_peers or [server.ae_title])
    allowed_hosts = _addresses(server.host)

    def guarded(event):
        if event.assoc.requestor.address not in allowed_hosts:
            return 0x0124  # Refused: not authorised (a configured AE title from a foreign host)
        return on_store(event)

    ae = AE(ae_title=server.our_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = server.timeout
    ae.maximum_pdu_size = 0
    ae.require_calling_aet = peers
    ae.require_called_aet = True
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    try:
        scp = ae.start_server((server.store_host, server.store_port), block=False,
                              evt_handlers=[(evt.EVT_C_STORE, guarded)])
    except OSError as exc:
        raise PacsError(f"cannot listen on {server.store_host}:{server.store_port} for C-MOVE ({exc})",
                        server.name) from exc
    try:
        yield
    finally:
        scp.shutdown()


def _addresses(host: str) -> set[str]:
    out = {host}
    with contextlib.suppress(OSError):
        out |= {ai[4][0] for ai in socket.getaddrinfo(host, None)}
    if out & {"127.0.0.1", "::1", "localhost"}:
        out |= {"127.0.0.1", "::1"}
    return out


def store(server, files: Sequence[Path], progress=None, cancel=None) -> SendResult:
    """C-STORE every file; refused instances are counted with their status, not raised here."""
    from pydicom import dcmread

    heads = []
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        heads.append((f, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.file_meta.TransferSyntaxUID)))
    pairs = sorted({(c, ts) for _, c, _, ts in heads})
    if len(pairs) > 128:
        raise PacsError(f"{len(pairs)} SOP class/transfer syntax pairs: more than one association can carry",
                        server.name)
    result = SendResult(total=len(files))
    t0 = time.perf_counter()
    with associate(server, [(c, [ts]) for c, ts in pairs]) as assoc:
        for n, (f, _c, uid, _ts) in enumerate(heads, 1):
            if cancel is not None and cancel():
                raise Cancelled(f"C-STORE cancelled after {n - 1} of {len(files)} instances")
            status = assoc.send_c_store(dcmread(f))
            code = _code(status)
            if code is None:
                err = lost(server, assoc, f"C-STORE of instance {n} of {len(files)} ({result.stored} stored)")
                raise err
            result.add(uid, code, Status.text(code, "store"))
            if progress is not None:
                progress(n, len(files))
    result.seconds = time.perf_counter() - t0
    return result
