#!/usr/bin/env python
"""Build the wheel and a fresh environment that holds only the CORE install; report install sizes.

    .venv/bin/python scripts/core_env.py --env /tmp/core-env            # wheel + environment
    .venv/bin/python scripts/core_env.py --sizes                          # core vs [all] sizes only

What a user gets from ``pip install napari-restore`` (no extras) is rebuilt here without the
network: ``pip wheel --no-deps`` builds the wheel, ``python -m venv`` (no system site packages)
makes an empty environment, the wheel goes in with ``pip install --no-deps``, and every
distribution in the closure of the wheel's core ``Requires-Dist`` (extras off, markers evaluated)
is linked in from the environment running this script, file tree by file tree as its ``RECORD``
lists it. Nothing else is there: napari, Qt, magicgui, npe2, TensorBoard and matplotlib cannot be
imported, so whatever runs in that environment runs on the core dependencies alone.

Sizes are the sums of the files each distribution's ``RECORD`` lists (as installed here), over the
closure of the core requirements and over that of ``[all]``.
"""
from __future__ import annotations

import argparse
import email
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[1]
#: What the core must never bring (the GUI, TensorBoard and plotting stacks).
NOT_IN_CORE = ("napari", "npe2", "magicgui", "qtpy", "pyqt5", "pyqt6", "pyside2", "pyside6", "tensorboard",
               "matplotlib", "vispy")


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed() -> dict[str, metadata.Distribution]:
    dists: dict[str, metadata.Distribution] = {}
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name:
            dists.setdefault(canon(name), d)
    return dists


def closure(requirements: list[str], extras: tuple[str, ...] = ()) -> set[str]:
    """Canonical names of the installed distributions ``requirements`` pull in (with ``extras``)."""
    dists = _installed()
    env = default_environment()
    seen: set[str] = set()
    todo = [(Requirement(r), set(extras)) for r in requirements]
    while todo:
        req, active = todo.pop()
        if req.marker is not None and not any(req.marker.evaluate({**env, "extra": e}) for e in (active or {""})):
            continue
        name = canon(req.name)
        key = name + "[" + ",".join(sorted(req.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        dist = dists.get(name)
        if dist is None:
            raise SystemExit(f"{req.name} is required but not installed in {sys.prefix}")
        for sub in dist.requires or []:
            todo.append((Requirement(sub), set(req.extras)))
    return {k.split("[", 1)[0] for k in seen}


def wheel_requirements(wheel: Path) -> tuple[list[str], dict[str, str]]:
    """``Requires-Dist`` lines and a few metadata fields of a built wheel."""
    with zipfile.ZipFile(wheel) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.message_from_bytes(zf.read(name))
    fields = {k: msg.get(k, "") for k in ("Name", "Version", "License-Expression", "License")}
    fields["Classifiers"] = "\n".join(msg.get_all("Classifier") or [])
    return list(msg.get_all("Requires-Dist") or []), fields


def record_files(dist: metadata.Distribution) -> list[Path]:
    """Files of ``dist`` relative to its site-packages (entries outside it, like bin/ scripts, left out)."""
    out = []
    for f in dist.files or []:
        parts = Path(str(f)).parts
        if parts and parts[0] != ".." and "__pycache__" not in parts:
            out.append(Path(*parts))
    return out


def size_of(names: set[str]) -> int:
    """Bytes on disk of the files the RECORDs of ``names`` list."""
    dists, total = _installed(), 0
    for n in names:
        d = dists[n]
        for f in d.files or []:
            p = Path(str(d.locate_file(f)))
            if p.is_file():
                total += p.stat().st_size
    return total


def link_distributions(names: set[str], site: Path) -> None:
    """Make the files of distributions ``names`` appear in ``site`` by symbolic links.

    A top-level entry owned only by these distributions is linked whole; one shared with a
    distribution left out (a namespace package) becomes a real folder and its entries are
    linked one level further down, and so on.
    """
    dists = _installed()
    owners: dict[Path, set[str]] = {}
    for n, d in dists.items():
        if canon(d.metadata["Name"]) == "napari-restore":
            continue
        for f in record_files(d):
            for depth in range(1, len(f.parts) + 1):
                owners.setdefault(Path(*f.parts[:depth]), set()).add(n)
    src_site = {n: Path(str(dists[n].locate_file(""))) for n in names}

    def place(rel: Path) -> None:
        who = owners.get(rel, set())
        mine = who & names
        if not mine:
            return
        target = site / rel
        if who <= names or len(rel.parts) > 6:
            origin = src_site[sorted(mine)[0]] / rel
            if origin.exists() and not target.exists() and not target.is_symlink():
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(origin)
            return
        target.mkdir(parents=True, exist_ok=True)
        for child in sorted({p for p in owners if len(p.parts) == len(rel.parts) + 1 and p.parts[:-1] == rel.parts}):
            place(child)

    for top in sorted({p for p in owners if len(p.parts) == 1}):
        place(top)


def build_wheel(out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out_dir), str(REPO)], check=True)
    return max(out_dir.glob("napari_restore-*.whl"), key=lambda p: p.stat().st_mtime)


def make_core_env(wheel: Path, env: Path) -> dict[str, object]:
    """A fresh venv at ``env`` holding the wheel and the closure of its core requirements only."""
    reqs, fields = wheel_requirements(wheel)
    core = closure(reqs)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    py = env / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True)
    link_distributions(core, site)
    return {"python": py, "site": site, "core": core, "requires": reqs, "fields": fields}


def sizes() -> dict[str, tuple[int, int]]:
    """``{"core": (distributions, bytes), "all": (...)}`` from this environment's napari-restore metadata."""
    reqs = list(metadata.distribution("napari-restore").requires or [])
    core = closure([r for r in reqs if "extra ==" not in r])
    full = closure(["napari-restore[all]"]) - {"napari-restore"}
    return {"core": (len(core), size_of(core)), "all": (len(full), size_of(full))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--env", type=Path, default=None, help="where to create the core environment")
    ap.add_argument("--wheel-dir", type=Path, default=None, help="where to build the wheel (default: a temporary folder)")
    ap.add_argument("--sizes", action="store_true", help="only print the core and [all] install sizes")
    args = ap.parse_args()
    for k, (n, b) in sizes().items():
        print(f"{k:>4}: {n:3d} distributions, {b / 2**20:8.1f} MiB")
    if args.sizes:
        return 0
    wheel_dir = args.wheel_dir or Path(tempfile.mkdtemp(prefix="napari-restore-wheel-"))
    wheel = build_wheel(wheel_dir)
    env = args.env or Path(tempfile.mkdtemp(prefix="napari-restore-core-"))
    info = make_core_env(wheel, env)
    print(f"wheel: {wheel}\nenvironment: {env} ({len(info['core'])} distributions linked)")
    bad = sorted(set(info["core"]) & {canon(n) for n in NOT_IN_CORE})
    if bad:
        print(f"the core pulls in {bad}", file=sys.stderr)
        return 1
    print(f"try: {env}/bin/napari-restore restore IN.nii.gz OUT.nii.gz --modality CT")
    return 0


if __name__ == "__main__":
    sys.exit(main())
