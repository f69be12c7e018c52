"""Inputs are never modified: the input tree hashes the same before and after every command.

The input is a writable copy of a real series (so a modification would not be stopped by the
read-only shared folder), hashed with names, sizes, modes and contents of every file.
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import pytest

from napari_restore.cli import EXIT_OK, main

from _engine_helpers import save_tiny

SERIES = "fixtures/dicom2nifti/hitachi/anatomical/001"
NIFTI = "fixtures/dicom2nifti/hitachi/anatomical/001_ground_truth.nii.gz"


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        h.update(f"{p.relative_to(root)}|{st.st_mode:o}|{st.st_size}|{int(st.st_mtime_ns)}".encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture()
def inputs(shared_data, tmp_path) -> Path:
    root = tmp_path / "inputs"
    shutil.copytree(shared_data / SERIES, root / "series")
    shutil.copy2(shared_data / NIFTI, root / "volume.nii.gz")
    return root


def test_cli_commands_leave_inputs_untouched(inputs, tmp_path, capsys):
    model = save_tiny(tmp_path / "model", modality="MR")
    out = tmp_path / "out"
    commands = [
        ["info", str(inputs / "series")],
        ["info", str(inputs / "volume.nii.gz")],
        ["restore", str(inputs / "series"), str(out / "a.nii.gz"), "--model", str(model)],
        ["restore", str(inputs / "series"), str(out / "dicom"), "--model", str(model)],
        ["restore", str(inputs / "series"), str(out / "deid"), "--model", str(model), "--deidentify"],
        ["restore", str(inputs / "volume.nii.gz"), str(out / "b.nrrd"), "--model", str(model)],
        ["restore", str(inputs / "series"), str(inputs / "series"), "--model", str(model), "--overwrite"],
    ]
    for i, cmd in enumerate(commands):
        before = tree_hash(inputs)
        code = main(cmd)
        after = tree_hash(inputs)
        assert before == after, f"command {cmd} modified its input"
        if i < len(commands) - 1:
            assert code == EXIT_OK, (cmd, capsys.readouterr().err)
    # writing over the input itself is refused (or at least never half-done): the input is intact
    assert code != EXIT_OK


def test_napari_reader_writer_round_trip_leaves_inputs_untouched(inputs, tmp_path):
    from napari_restore._napari._reader import napari_get_reader
    from napari_restore._napari._writer import write_dicom, write_volume

    for src in (inputs / "series", inputs / "volume.nii.gz"):
        before = tree_hash(inputs)
        reader = napari_get_reader(str(src))
        assert reader is not None
        layers = reader(str(src))
        data, attrs, kind = layers[0]
        assert kind == "image"
        write_volume(str(tmp_path / f"{src.stem}.nii.gz"), data, attrs)
        if src.is_dir():
            write_dicom(str(tmp_path / "export.dcm"), data, attrs)
        assert tree_hash(inputs) == before, f"the napari round trip modified {src}"
