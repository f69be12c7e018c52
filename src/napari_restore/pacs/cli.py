"""``napari-restore pacs add|list|remove|echo|find|get|send``: the command-line face of :mod:`napari_restore.pacs`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

FIND_COLUMNS = (("PatientName", 18), ("PatientID", 12), ("StudyDate", 8), ("Modality", 4), ("SeriesNumber", 4),
                ("NumberOfSeriesRelatedInstances", 5), ("SeriesDescription", 28), ("StudyInstanceUID", 0),
                ("SeriesInstanceUID", 0))
_HEAD = {"NumberOfSeriesRelatedInstances": "N", "SeriesNumber": "#", "SeriesDescription": "Description",
         "StudyInstanceUID": "Study UID", "SeriesInstanceUID": "Series UID", "Modality": "Mod"}


def _bar(desc: str):
    from ..terminal import progress_bar

    return progress_bar(desc, unit="inst")


def cmd_add(args: argparse.Namespace) -> int:
    from . import Server, save_server

    s = Server(name=args.name, ae_title=args.ae_title, host=args.host, port=args.port, url=args.url,
               our_ae_title=args.our_ae_title, retrieve=args.retrieve, store_port=args.store_port,
               store_host=args.store_host, allowed_peers=args.allow_peer or [], tls=args.tls, tls_ca=args.tls_ca,
               timeout=args.timeout, username_env=args.username_env, password_env=args.password_env,
               keyring=args.keyring)
    path = save_server(s, replace=args.replace)
    print(f"saved {s.describe()} in {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import config_path, load_servers

    servers = load_servers()
    if not servers:
        print(f"no PACS servers configured ({config_path()}); add one with `napari-restore pacs add`")
    for s in servers.values():
        print(s.describe())
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from . import remove_server

    print(f"removed {args.name} from {remove_server(args.name)}")
    return 0


def cmd_echo(args: argparse.Namespace) -> int:
    from . import echo

    seconds = echo(args.name, via=args.via)
    print(f"{args.name}: echo OK ({seconds * 1000:.0f} ms)")
    return 0


def cmd_find(args: argparse.Namespace) -> int:
    from . import find

    rows = find(args.name, patient=args.patient, patient_id=args.patient_id, modality=args.modality, date=args.date,
                description=args.description, study=args.study, accession=args.accession, level=args.level,
                limit=args.limit, via=args.via)
    cols = [(k, w) for k, w in FIND_COLUMNS if args.level == "series" or not k.startswith(("Series", "Number", "Mod"))]
    if args.level == "study":
        cols.insert(3, ("ModalitiesInStudy", 8))
        cols.insert(4, ("StudyDescription", 28))
    print("  ".join(_HEAD.get(k, k).ljust(w) if w else _HEAD.get(k, k) for k, w in cols))
    for r in rows:
        print("  ".join((str(r.get(k) or "")[:w].ljust(w) if w else str(r.get(k) or "")) for k, w in cols))
    print(f"{len(rows)} {'series' if args.level == 'series' else 'studies'}", file=sys.stderr)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    from . import get

    progress, close = _bar(f"retrieve {args.series or args.study}")
    try:
        got = get(args.name, args.out, study=args.study, series=args.series, via=args.via, progress=progress)
    finally:
        close()
    print(f"{got.folder}: {got.expected} instances ({got.fetched} retrieved, {got.skipped} already there, "
          f"{got.seconds:.1f} s)")
    return 0


def cmd_send(args: argparse.Namespace) -> int:
    from . import send

    progress, close = _bar(f"send {Path(args.source).name}")
    try:
        result = send(args.name, args.source, via=args.via, progress=progress)
    finally:
        close()
    print(f"{args.name}: {result.summary()} ({result.seconds:.1f} s)")
    return 0


def send_derived(name: str, folder, via: str | None = None, progress: bool = True) -> int:
    """``restore``/``batch --send-to NAME``: store a written derived series (with a progress bar unless
    ``progress`` is false); the exit code."""
    from . import send

    progress, close = _bar(f"send to {name}") if progress else (None, lambda: None)
    try:
        result = send(name, folder, via=via, progress=progress)
    finally:
        close()
    print(f"sent to {name}: {result.summary()}")
    return 0


def fetch_with_bar(source: str, progress: bool = True) -> Path:
    """``restore``/``batch pacs://...``: retrieve into the cache (resumable) with a progress bar; the folder."""
    from . import fetch_source

    bar, close = _bar("retrieve") if progress else (None, lambda: None)
    try:
        got = fetch_source(source, progress=bar)
    finally:
        close()
    print(f"{source}: {got.expected} instances in {got.folder} ({got.fetched} retrieved, {got.skipped} already there)")
    return got.folder


def send_written(name: str, outputs, via: str | None = None, progress: bool = True) -> int:
    """``batch --send-to NAME``: store each written derived DICOM series (a folder of .dcm files); the
    exit code (1 when a series could not be stored whole)."""
    from ..errors import PacsError
    from .workflow import dicom_series_folders

    folders = [f for out in outputs if Path(out).is_dir() for f in dicom_series_folders(out)]
    if not folders:
        print(f"--send-to {name}: no DICOM series was written by this run; nothing sent")
        return 0
    code = 0
    for folder in folders:
        try:
            send_derived(name, folder, via=via, progress=progress)
        except PacsError as exc:  # one series refused: say so, send the others
            print(f"not sent: {folder}: {exc}", file=sys.stderr)
            code = 1
    return code


def add_pacs_parser(sub) -> None:
    """Register ``pacs`` and its sub-commands on the main parser's subparsers."""
    p = sub.add_parser("pacs", help="configure PACS servers; query, retrieve and send series (DIMSE, DICOMweb)",
                       description="Talk to a PACS: C-ECHO/C-FIND/C-GET/C-MOVE/C-STORE (pynetdicom) or QIDO-RS/"
                                   "WADO-RS/STOW-RS (dicomweb-client). Needs `pip install napari-restore[pacs]`. "
                                   "Servers live in pacs.json under the user's config folder; credentials only come "
                                   "from environment variables or the system keyring.")
    ps = p.add_subparsers(dest="pacs_command", required=True, metavar="PACS_COMMAND")
    via = {"choices": ("dimse", "web"), "default": None, "help": "protocol (default: DIMSE when configured)"}

    a = ps.add_parser("add", help="add (or --replace) a server",
                      description="Add a PACS to pacs.json: a DIMSE endpoint (--ae-title, --host, --port), a DICOMweb "
                                  "root (--url), or both. Credentials are never stored: name the environment "
                                  "variables that hold them, or use the system keyring.")
    a.add_argument("name", help="a short name for the server, used by the other pacs commands and pacs://NAME/...")
    a.add_argument("--ae-title", help="the PACS's AE title (DIMSE)")
    a.add_argument("--host", help="the PACS's host (DIMSE)")
    a.add_argument("--port", type=int, help="the PACS's DICOM port (DIMSE)")
    a.add_argument("--url", help="DICOMweb root, e.g. https://pacs.example.org/dicom-web")
    a.add_argument("--our-ae-title", default="NAPARI_RESTORE", help="our AE title (default NAPARI_RESTORE)")
    a.add_argument("--retrieve", choices=("get", "move", "wado"), default="get", help="how `pacs get` and pacs:// retrieve by default: C-GET, C-MOVE or WADO-RS")
    a.add_argument("--store-port", type=int, help="port of our C-STORE SCP for C-MOVE (the PACS must know it)")
    a.add_argument("--store-host", default="127.0.0.1", help="address our C-MOVE SCP binds to (default loopback)")
    a.add_argument("--allow-peer", action="append", help="AE title allowed to send to our SCP (repeatable; "
                   "default: the server's AE title)")
    a.add_argument("--tls", action="store_true", help="DIMSE over TLS; https for DICOMweb")
    a.add_argument("--tls-ca", help="CA bundle to verify the server's certificate")
    a.add_argument("--timeout", type=float, default=30.0, help="seconds per connection/message (default 30)")
    a.add_argument("--username-env", help="environment variable holding the DICOMweb user name")
    a.add_argument("--password-env", help="environment variable holding the DICOMweb password")
    a.add_argument("--keyring", action="store_true", help="password from the system keyring (service "
                   "napari-restore-pacs)")
    a.add_argument("--replace", action="store_true", help="update a server of that name")
    a.set_defaults(func=cmd_add)

    ps.add_parser("list", help="the configured servers (never credentials)").set_defaults(func=cmd_list)
    r = ps.add_parser("remove", help="forget a server")
    r.add_argument("name", help="the server's name, as given to `napari-restore pacs add`")
    r.set_defaults(func=cmd_remove)

    e = ps.add_parser("echo", help="C-ECHO (or a DICOMweb query) to check a server")
    e.add_argument("name", help="the server's name, as given to `napari-restore pacs add`")
    e.add_argument("--via", **via)
    e.set_defaults(func=cmd_echo)

    f = ps.add_parser("find", help="a table of studies or series matching a query")
    f.add_argument("name", help="the server's name, as given to `napari-restore pacs add`")
    f.add_argument("--patient", help="PatientName, wildcards * and ? (e.g. 'DOE*')")
    f.add_argument("--patient-id", help="PatientID (exact)")
    f.add_argument("--modality", help="CT, MR, ...")
    f.add_argument("--date", help="StudyDate YYYYMMDD or range YYYYMMDD-YYYYMMDD")
    f.add_argument("--description", help="text in the series (study) description")
    f.add_argument("--study", help="a StudyInstanceUID")
    f.add_argument("--accession", help="AccessionNumber (exact)")
    f.add_argument("--level", choices=("study", "series"), default="series", help="list studies or series")
    f.add_argument("--limit", type=int, default=200, help="at most this many rows")
    f.add_argument("--via", **via)
    f.set_defaults(func=cmd_find)

    g = ps.add_parser("get", help="retrieve a series (or a study) into a folder; resumable")
    g.add_argument("name", help="the server's name, as given to `napari-restore pacs add`")
    g.add_argument("out", help="folder for <SOPInstanceUID>.dcm files (what is there is not fetched again)")
    g.add_argument("--study", required=True, help="StudyInstanceUID")
    g.add_argument("--series", help="SeriesInstanceUID (default: every series of the study, one folder each)")
    g.add_argument("--via", choices=("get", "move", "wado"), default=None, help="C-GET, C-MOVE or WADO-RS "
                   "(default: the server's setting)")
    g.set_defaults(func=cmd_get)

    s = ps.add_parser("send", help="store the DICOM files of a folder (C-STORE or STOW-RS)")
    s.add_argument("name", help="the server's name, as given to `napari-restore pacs add`")
    s.add_argument("source", help="a folder (searched recursively) or a DICOM file")
    s.add_argument("--via", choices=("store", "stow"), default=None, help="default: C-STORE when configured")
    s.set_defaults(func=cmd_send)
