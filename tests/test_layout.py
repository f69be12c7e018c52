"""The source stays readable in pieces: no module over 600 lines, no class over 400 (issue 20).

A module that grows past the limit is split into modules whose names say what they hold (the old
import path re-exports them), a class into smaller collaborators; there are no exemptions.
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def _sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 40, f"no sources found under {SRC}"
    return files


def test_no_source_file_over_600_lines():
    long = {}
    for path in _sources():
        with open(path, encoding="utf-8") as fh:
            n = sum(1 for _ in fh)
        if n > MAX_MODULE_LINES:
            long[str(path.relative_to(SRC))] = n
    assert not long, f"modules over {MAX_MODULE_LINES} lines (split them): {long}"


def test_no_class_over_400_lines():
    long = {}
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    long[f"{path.relative_to(SRC)}::{node.name}"] = n
    assert not long, f"classes over {MAX_CLASS_LINES} lines (give them collaborators): {long}"
