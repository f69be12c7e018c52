"""Crash-safe outputs: SIGKILL at random moments, a full disk and a read-only target.

The writer runs in a forked child (everything already imported) that the test kills with SIGKILL
after a seeded random delay spread over the measured length of one write. After each kill the
target must be absent or complete and valid, and a rerun must succeed.
"""
from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from napari_restore.errors import OutputError
from napari_restore.io import load, save
from napari_restore.models import load_model, save_model

from _engine_helpers import TINY_ARGS, tiny_card

SERIES = "fixtures/dicom2nifti/hitachi/anatomical/001"


def _volume(shared_data):
    """A real MR series, stacked 3 times along z so one export takes long enough to be cut."""
    v = load(shared_data / SERIES)[0]
    big = v.with_array(np.concatenate([v.array] * 3)) if hasattr(v, "with_array") else None
    if big is None:
        from napari_restore.volume import Volume

        meta = {k: val for k, val in v.meta.items() if k != "source_sops"}
        big = Volume(np.concatenate([v.array] * 3), v.affine, v.modality, meta)
    return big


def _fork_and_kill(write, delay: float) -> str:
    """Run ``write()`` in a forked child, SIGKILL it after ``delay`` s; 'killed' or 'finished'."""
    pid = os.fork()
    if pid == 0:  # child
        try:
            write()
            os._exit(0)
        except BaseException:
            os._exit(3)
    time.sleep(delay)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _, status = os.waitpid(pid, 0)
    return "killed" if os.WIFSIGNALED(status) else f"exit {os.WEXITSTATUS(status)}"


def _measure(write) -> float:
    t = time.perf_counter()
    write()
    return time.perf_counter() - t


def test_sigkill_during_series_export_and_checkpoint_save(shared_data, tmp_path):
    import torch

    from napari_restore.networks import build_network

    rng = random.Random(8)
    vol = _volume(shared_data)
    nz = vol.array.shape[0]
    net = build_network("ResidualUNet", {**TINY_ARGS, "channels": [16, 32, 64], "strides": [2, 2]})
    card = tiny_card(args={**TINY_ARGS, "channels": [16, 32, 64], "strides": [2, 2]})
    # the second of two timings: the first pays one-time imports, and a kill drawn from that longer span
    # would often come after the (forked, already warm) writer has finished
    t_series = min(_measure(lambda k=k: save(vol, tmp_path / f"timing_series{k}", format="dicom")) for k in range(2))
    t_model = min(_measure(lambda k=k: save_model(net, card, tmp_path / f"timing_model{k}")) for k in range(2))
    outcomes = []
    for i in range(22):
        kind = "series" if i % 2 == 0 else "model"
        target = tmp_path / f"{kind}{i}"
        if kind == "series":
            write = lambda target=target: save(vol, target, format="dicom")  # noqa: E731
            span = t_series
        else:
            write = lambda target=target: save_model(net, card, target)  # noqa: E731
            span = t_model
        outcome = _fork_and_kill(write, rng.uniform(0.0, span))
        outcomes.append((kind, outcome, target.exists()))
        # the target is absent, or complete and valid
        if target.exists():
            if kind == "series":
                files = sorted(target.iterdir())
                assert len(files) == nz, f"kill {i}: a half-made series ({len(files)} of {nz} files)"
                back = load(target)[0]
                np.testing.assert_allclose(back.array, vol.array, atol=0.5)
            else:
                assert sorted(p.name for p in target.iterdir()) == ["card.json", "model.pt"]
                load_model(target)
        # leftovers, if any, are hidden temporary siblings, never the target name
        assert all(p.name.startswith(".") for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}"))
        # a rerun succeeds
        if kind == "series":
            save(vol, target, format="dicom", overwrite=True)
            assert len(load(target)[0].array) == nz
        else:
            save_model(net, card, target, overwrite=True)
            loaded = load_model(target)
            assert all(torch.equal(a, b) for a, b in zip(loaded.network.state_dict().values(),
                                                          net.state_dict().values()))
        # the rerun also removed what the killed writer left (its process is gone)
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")]
    killed = [o for o in outcomes if o[1] == "killed"]
    assert len(killed) >= 20, outcomes
    # the kills landed at different moments: some before anything appeared, some (maybe) after
    assert any(not exists for _, _, exists in killed)


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, readonly: bool = False):
    """Mount a small tmpfs at ``path`` (root only); yields False where mounting is not possible."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    try:
        yield r.returncode == 0
    finally:
        if r.returncode == 0:
            subprocess.run(["umount", str(path)], capture_output=True)


def test_full_disk_gives_clear_error_and_leaves_nothing(shared_data, tmp_path, monkeypatch):
    vol = _volume(shared_data)
    disk = tmp_path / "disk"
    with _tmpfs(disk, "64k") as mounted:
        if not mounted:  # no mount here: fail the third slice write with ENOSPC instead
            from napari_restore.io.dicom_encode import SharedElementWriter

            real, calls = SharedElementWriter.write, []

            def failing(*a, **k):
                calls.append(1)
                if len(calls) > 2:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(*a, **k)

            monkeypatch.setattr(SharedElementWriter, "write", failing)
        with pytest.raises(OutputError) as info:
            save(vol, disk / "series", format="dicom")
        assert "No space left" in str(info.value) and "series" in str(info.value)
        assert list(disk.iterdir()) == []
        with pytest.raises(OutputError):
            save(vol, disk / "vol.nii", overwrite=True)
        assert list(disk.iterdir()) == []


def test_read_only_target_gives_clear_error_and_leaves_nothing(shared_data, tmp_path, monkeypatch):
    vol = _volume(shared_data)
    ro = tmp_path / "ro"
    with _tmpfs(ro, "1m", readonly=True) as mounted:
        if not mounted:  # root ignores chmod: fail the first write with EROFS instead
            import tempfile

            def refuse(*a, **k):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS))

            monkeypatch.setattr(tempfile, "mkdtemp", refuse)
            monkeypatch.setattr(tempfile, "mkstemp", refuse)
            monkeypatch.setattr(os, "access", lambda *a, **k: True)
        for target, kw in ((ro / "series", {"format": "dicom"}), (ro / "v.nii.gz", {})):
            with pytest.raises(OutputError) as info:
                save(vol, target, **kw)
            assert str(ro) in str(info.value)
            assert "writable" in str(info.value) or "Read-only" in str(info.value)
        assert list(ro.iterdir()) == []


def test_leftovers_of_a_live_writer_are_kept(tmp_path):
    """Only siblings of dead processes are cleared: a concurrent writer's temporary folder stays."""
    from napari_restore.io.atomic import _owner_tag, atomic_file, clear_dead_siblings

    proc = subprocess.Popen(["sleep", "30"])
    try:
        host = _owner_tag().split("~")[0]
        live = tmp_path / f".out.nii.gz.partial-{host}~{proc.pid}~abc"
        live.mkdir()
        foreign = tmp_path / ".out.nii.gz.partial-otherhost~1~abc"
        foreign.mkdir()
        legacy = tmp_path / ".out.nii.gz.partial-xyz"
        legacy.mkdir()
        assert clear_dead_siblings(tmp_path / "out.nii.gz") == []
        with atomic_file(tmp_path / "out.nii.gz") as tmp:
            tmp.write_bytes(b"x")
        assert live.exists() and foreign.exists() and legacy.exists()
    finally:
        proc.kill()
        proc.wait()
    assert clear_dead_siblings(tmp_path / "out.nii.gz") == [live]


def test_parent_folder_made_by_a_concurrent_writer_is_used(tmp_path, monkeypatch):
    """Two batch ranks writing into the same new study folder: the one that loses the race to
    create it still writes (a two-rank torchrun batch failed with 'File exists' before)."""
    from napari_restore.io.atomic import atomic_file

    parent = tmp_path / "ddp" / "studyA"
    real_mkdir = Path.mkdir

    raced = []

    def other_rank_first(self, *args, **kwargs):
        if self == parent and not raced:
            raced.append(self)
            os.makedirs(self)  # the other rank wins the race
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", other_rank_first)
    with atomic_file(parent / "ts.nii.gz") as tmp:
        tmp.write_bytes(b"x")
    assert raced and (parent / "ts.nii.gz").read_bytes() == b"x"

    monkeypatch.setattr(Path, "mkdir", real_mkdir)
    (tmp_path / "blocked").write_bytes(b"a file where a folder should be")
    with pytest.raises(OutputError) as info:
        with atomic_file(tmp_path / "blocked" / "out.nii.gz") as tmp:
            tmp.write_bytes(b"x")
    assert "parent folder" in str(info.value) and "blocked" in str(info.value)
