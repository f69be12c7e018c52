"""PACS servers, configured once in ``pacs.json`` under the user's config folder.

The file lives in ``$NAPARI_RESTORE_CONFIG_DIR`` when that is set, else in the platform's user config
folder (``platformdirs.user_config_dir("napari-restore")``; ``$XDG_CONFIG_HOME/napari-restore`` on
Linux). It never holds a secret: a server names the environment variables that hold its user name
and password (``username_env``/``password_env``), or asks for the system keyring (``keyring: true``,
service ``napari-restore-pacs``, user name = the server's name). :class:`Server`'s ``repr`` and
:meth:`Server.describe` never show credentials.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import InputError, PacsError

CONFIG_NAME = "pacs.json"
KEYRING_SERVICE = "napari-restore-pacs"
RETRIEVE_METHODS = ("get", "move", "wado")
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: 16 chars, no backslash or control chars


@dataclass
class Server:
    """One PACS: a DIMSE peer (``ae_title``/``host``/``port``) and/or a DICOMweb ``url``.

    Attributes:
        name: our name for it (``pacs://NAME/...``).
        ae_title, host, port: the PACS's DIMSE application entity.
        url: DICOMweb root (QIDO-RS/WADO-RS/STOW-RS), e.g. ``http://127.0.0.1:8042/dicom-web``.
        our_ae_title: the AE title we call with (and the C-MOVE destination the PACS knows us by).
        retrieve: ``"get"`` (C-GET, the default), ``"move"`` (C-MOVE to our C-STORE SCP) or ``"wado"``.
        store_port: the port of our C-MOVE destination SCP (the PACS must know it); ``store_host``
            is the address it binds to, loopback unless configured otherwise.
        allowed_peers: AE titles that may send to our SCP (default: just this server's ``ae_title``).
        tls: DIMSE over TLS (``tls_ca``: a CA bundle to verify the server); DICOMweb: use https.
        timeout: seconds for connecting, association and each DIMSE/HTTP message.
    """

    name: str
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    url: str | None = None
    our_ae_title: str = "NAPARI_RESTORE"
    retrieve: str = "get"
    store_port: int | None = None
    store_host: str = "127.0.0.1"
    allowed_peers: list[str] = field(default_factory=list)
    tls: bool = False
    tls_ca: str | None = None
    timeout: float = 30.0
    username_env: str | None = None
    password_env: str | None = None
    keyring: bool = False

    def __post_init__(self) -> None:
        if not self.name or not re.match(r"^[A-Za-z0-9_.-]+$", self.name):
            raise InputError(f"server name {self.name!r}: use letters, digits, '.', '_' or '-'")
        if self.port is not None:
            self.port = int(self.port)
        if self.store_port is not None:
            self.store_port = int(self.store_port)
        self.timeout = float(self.timeout)
        if self.retrieve not in RETRIEVE_METHODS:
            raise InputError(f"server {self.name!r}: retrieve must be one of {', '.join(RETRIEVE_METHODS)}")
        for label, ae in (("ae_title", self.ae_title), ("our_ae_title", self.our_ae_title)):
            if ae is not None and not _AE_RE.match(ae):
                raise InputError(f"server {self.name!r}: {label} {ae!r} is not a DICOM AE title (1-16 characters)")
        if not self.has_dimse and not self.url:
            raise InputError(f"server {self.name!r}: give an AE title, host and port (DIMSE) or a DICOMweb URL")
        if (self.ae_title or self.host or self.port) and not self.has_dimse:
            raise InputError(f"server {self.name!r}: DIMSE needs all of ae_title, host and port")
        if self.url and not re.match(r"^https?://", self.url):
            raise InputError(f"server {self.name!r}: the DICOMweb URL must start with http:// or https://")

    @property
    def has_dimse(self) -> bool:
        return bool(self.ae_title and self.host and self.port)

    def credentials(self) -> tuple[str, str] | None:
        """``(user, password)`` from the named environment variables or the keyring; ``None`` if none."""
        user = os.environ.get(self.username_env) if self.username_env else None
        password = os.environ.get(self.password_env) if self.password_env else None
        if self.keyring and password is None:
            try:
                import keyring  # optional
            except ImportError as exc:
                raise PacsError("keyring: true needs the 'keyring' package (pip install keyring)", self.name) from exc
            cred = keyring.get_credential(KEYRING_SERVICE, user or self.name)
            if cred is not None:
                user, password = cred.username or user, cred.password
        if (self.username_env or self.password_env) and (user is None or password is None):
            missing = [v for v, val in ((self.username_env, user), (self.password_env, password)) if v and val is None]
            raise PacsError(f"credentials: environment variable(s) {', '.join(missing)} not set", self.name)
        if password is None:
            return None
        return (user or "", password)

    def describe(self) -> str:
        """One line for ``pacs list``: endpoints and options, never credentials."""
        parts = []
        if self.has_dimse:
            parts.append(f"{self.ae_title}@{self.host}:{self.port} (we are {self.our_ae_title}, retrieve {self.retrieve}"
                         + (f", C-MOVE destination {self.store_host}:{self.store_port}" if self.store_port else "") + ")")
        if self.url:
            parts.append(self.url)
        if self.tls:
            parts.append("TLS")
        auth = [v for v in (self.username_env, self.password_env) if v]
        if auth:
            parts.append("credentials from $" + ", $".join(auth))
        elif self.keyring:
            parts.append("credentials from the keyring")
        return f"{self.name}: " + "; ".join(parts)

    def __repr__(self) -> str:  # the dataclass repr is fine: no secret is ever stored on the object
        return f"Server({self.describe()})"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, [], False) or k == "name"}


def config_dir() -> Path:
    """The folder of ``pacs.json``."""
    env = os.environ.get("NAPARI_RESTORE_CONFIG_DIR")
    if env:
        return Path(env)
    try:
        from platformdirs import user_config_dir

        return Path(user_config_dir("napari-restore", appauthor=False))
    except ImportError:
        base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(base) / "napari-restore"


def config_path() -> Path:
    return config_dir() / CONFIG_NAME


def load_servers(path: str | os.PathLike | None = None) -> dict[str, Server]:
    """The configured servers by name (empty when no config file exists)."""
    p = Path(path) if path else config_path()
    if not p.is_file():
        return {}
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the PACS configuration: {exc}", p) from exc
    known = {f.name for f in fields(Server)}
    out: dict[str, Server] = {}
    for name, item in (raw.get("servers") or {}).items():
        unknown = set(item) - known
        if unknown:
            raise InputError(f"server {name!r}: unknown setting(s) {', '.join(sorted(unknown))}", p)
        out[name] = Server(**{**item, "name": name})
    return out


def get_server(name_or_server: str | Server, path: str | os.PathLike | None = None) -> Server:
    if isinstance(name_or_server, Server):
        return name_or_server
    servers = load_servers(path)
    if name_or_server not in servers:
        have = ", ".join(sorted(servers)) or "none; add one with `napari-restore pacs add`"
        raise InputError(f"no PACS server named {name_or_server!r} is configured (configured: {have})")
    return servers[name_or_server]


def save_server(server: Server, path: str | os.PathLike | None = None, replace: bool = False) -> Path:
    """Add (or with ``replace``, update) ``server`` in the config file, written atomically."""
    p = Path(path) if path else config_path()
    servers = load_servers(p)
    if server.name in servers and not replace:
        raise InputError(f"a server named {server.name!r} exists already (pass --replace to update it)", p)
    servers[server.name] = server
    return _write(p, servers)


def remove_server(name: str, path: str | os.PathLike | None = None) -> Path:
    p = Path(path) if path else config_path()
    servers = load_servers(p)
    if name not in servers:
        raise InputError(f"no PACS server named {name!r} is configured", p)
    del servers[name]
    return _write(p, servers)


def _write(p: Path, servers: dict[str, Server]) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    data = {"servers": {n: {k: v for k, v in s.to_dict().items() if k != "name"} for n, s in sorted(servers.items())}}
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, p)
    return p
