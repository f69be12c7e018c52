"""Documentation: the MkDocs site builds strictly (a broken link, anchor or ::: reference fails), and the README
stays a short front page with the two set-up commands."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_mkdocs_build_is_strict_and_clean(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    out = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                         cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "WARNING" not in log, log[-4000:]
    api = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    for name in ("napari_restore.restore", "napari_restore.list_models", "napari_restore.Volume",
                 "napari_restore.bundle_transforms.CardNormalized"):
        assert f'id="{name}"' in api, name  # generated from the docstrings
    assert "returns a new Volume" in api


def test_readme_is_a_short_front_page():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    lines = text.splitlines()
    assert len(lines) <= 150, len(lines)
    assert "pip install napari-restore" in text and 'pip install "napari-restore[all]"' in text
    assert re.search(r"^make demo\b", text, re.M) and re.search(r"^make test\b", text, re.M)
    shipped = json.loads((REPO / "src/napari_restore/models/denoise-ct-25d/card.json").read_text())["version"]
    assert "widget.png" in text and f"| `denoise-ct-25d` {shipped} |" in text and "trusted range" in text
    # images render on a package index page too: absolute URLs only
    for target in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert target.startswith("https://"), target
    # relative links point at files of the repository (they work on GitHub)
    for target in re.findall(r"(?<!!)\[[^\]]*\]\(([^)#]+)(?:#[^)]*)?\)", text):
        if not target.startswith(("http://", "https://")):
            assert (REPO / target).exists(), target


def test_version_is_single_sourced_and_in_the_changelog():
    import napari_restore

    import tomllib

    meta = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "napari_restore.__version__"}
    assert f"## {napari_restore.__version__}" in (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
