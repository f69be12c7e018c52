"""A real Orthanc for the PACS tests: loopback HTTP, random free ports, DICOMweb plugin, throw-away storage.

Orthanc's DICOM port binds to every interface (Orthanc 1.10 has no bind-address option), which is why the
ports are random and the process lives only as long as the test that started it.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PLUGIN_CANDIDATES = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",  # Debian orthanc-dicomweb
                     "/usr/lib/orthanc/libOrthancDicomWeb.so")
ORTHANC_AET = "ORTHANC"
OUR_AET = "NAPARI_RESTORE"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_orthanc() -> tuple[str | None, str | None]:
    exe = shutil.which("Orthanc")
    plugin = os.environ.get("ORTHANC_DICOMWEB_PLUGIN") or next((p for p in PLUGIN_CANDIDATES if Path(p).is_file()), None)
    return exe, plugin


@dataclass
class Orthanc:
    root: Path
    user: str = "napari"
    password: str = field(default_factory=lambda: os.urandom(6).hex())
    http_port: int = field(default_factory=free_port)
    dicom_port: int = field(default_factory=free_port)
    store_port: int = field(default_factory=free_port)  # our C-MOVE SCP, known to Orthanc as OUR_AET
    extra: dict = field(default_factory=dict)  # more Orthanc settings (e.g. "LuaScripts")
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 30.0) -> "Orthanc":
        exe, plugin = find_orthanc()
        if exe is None or plugin is None:
            raise RuntimeError("Orthanc or its DICOMweb plugin is missing: run scripts/setup.sh "
                               "(Debian packages orthanc, orthanc-dicomweb)")
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = {
            "Name": "napari-restore-test", "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"), "HttpPort": self.http_port, "DicomPort": self.dicom_port,
            "DicomAet": ORTHANC_AET, "DicomCheckCalledAet": True, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True, "RegisteredUsers": {self.user: self.password},
            "DicomModalities": {"napari": [OUR_AET, "127.0.0.1", self.store_port]},
            "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomCheckModalityHost": True,
            "DicomScuTimeout": 10, "DicomScpTimeout": 30, "ConcurrentJobs": 1, "SaveJobs": False,
            "Plugins": [plugin], "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": "127.0.0.1"},
            "StorageCompression": False, "LimitFindResults": 0, "LimitFindInstances": 0,
        }
        cfg.update(self.extra)
        cfg_path = self.root / "orthanc.json"
        cfg_path.write_text(json.dumps(cfg, indent=1))
        log = open(self.root / "orthanc.log", "wb")
        self.proc = subprocess.Popen([exe, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        for _ in range(int(timeout / 0.2) + 1):  # bounded in count and time
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start ({self.proc.returncode}); see {self.root / 'orthanc.log'}")
            try:
                if self.rest("GET", "/system").status_code == 200 and self._dicom_open():
                    return self
            except OSError:
                pass
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not come up within {timeout:g} s")

    def _dicom_open(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=1):
                return True
        except OSError:
            return False

    def rest(self, method: str, path: str, **kw):
        import requests

        return requests.request(method, self.url + path, auth=(self.user, self.password), timeout=30, **kw)

    def kill(self) -> None:
        """Stop at once (SIGKILL): the 'server died mid-retrieve' case."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()

    def upload(self, files) -> int:
        """Store files through the REST API (fast, independent of the code under test)."""
        n = 0
        for f in files:
            r = self.rest("POST", "/instances", data=Path(f).read_bytes())
            r.raise_for_status()
            n += 1
        return n

    def series_of(self, series_uid: str) -> dict | None:
        r = self.rest("POST", "/tools/lookup", data=series_uid)
        r.raise_for_status()
        ids = [x["ID"] for x in r.json() if x["Type"] == "Series"]
        return self.rest("GET", f"/series/{ids[0]}").json() if ids else None


def configure_server(o: Orthanc, name: str, tmp_path: Path, monkeypatch):
    """Save a napari-restore server ``name`` for Orthanc ``o`` (config and PACS cache under ``tmp_path``,
    credentials from environment variables); returns the :class:`napari_restore.pacs.Server`."""
    from napari_restore import pacs

    monkeypatch.setenv("NAPARI_RESTORE_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("NAPARI_RESTORE_PACS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("TEST_PACS_USER", o.user)
    monkeypatch.setenv("TEST_PACS_PASSWORD", o.password)
    s = pacs.Server(name=name, ae_title=ORTHANC_AET, host="127.0.0.1", port=o.dicom_port, url=f"{o.url}/dicom-web",
                    our_ae_title=OUR_AET, store_port=o.store_port, username_env="TEST_PACS_USER",
                    password_env="TEST_PACS_PASSWORD", timeout=10)
    pacs.save_server(s)
    return s
