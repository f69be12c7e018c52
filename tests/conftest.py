"""Shared fixtures. Tests that need ../shared/data FAIL (never skip) when it is missing."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("NAPARI_RESTORE_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real CT/MR used by the tests (``../shared/data`` beside the repo)."""
    if not (SHARED_DATA / "README.md").is_file():
        pytest.fail(f"the shared test data is missing: expected it at {SHARED_DATA}")
    return SHARED_DATA
