"""Hostile input, round two (issue 19): one test per defect, on real files derived from ../shared/data.

Each test fails on the code before the fix: a DICOMDIR that escapes its media folder, a model card
nesting bomb, a deflate bomb, a sequence of a million items, BurnedInAnnotation on one slice only,
a batch output inside its input, a full disk, a damaged series skipped in silence, and batch
workers that outlive their killed parent.
"""
from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from napari_restore.cli import EXIT_ERROR, EXIT_OK, main
from napari_restore.errors import InputError, ModelError, OutputError
from napari_restore.io import load

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import fuzz_families as families  # noqa: E402

HITACHI = "fixtures/dicom2nifti/hitachi/anatomical/001"
GE = "fixtures/dicom2nifti/ge/anatomical/001"
CT_SERIES = "ct/philips-head-phantom/exam/S2010"


def _copy_files(src: Path, dst: Path, n: int | None = None) -> list[Path]:
    """Copy the first ``n`` DICOM files of ``src`` into ``dst`` (writable copies)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for f in sorted(p for p in src.iterdir() if p.is_file() and p.name != "DIRFILE")[:n]:
        shutil.copy(f, dst / f.name)
        (dst / f.name).chmod(0o644)
        out.append(dst / f.name)
    return out


def _quiet_load(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load(path)


# ----------------------------------------------------------------------------- 1. DICOMDIR path escape
@pytest.mark.parametrize("how", ["climb", "absolute", "symlink"])
def test_dicomdir_reference_outside_the_media_folder_is_refused(shared_data, tmp_path, how):
    from pydicom.fileset import FileSet

    seed = tmp_path / "seed"
    fs = FileSet()
    for f in sorted((shared_data / HITACHI).iterdir()):
        fs.add(pydicom.dcmread(f))
    fs.write(seed)
    outside = tmp_path / "outside.dcm"  # another patient's file, beside the media folder
    shutil.copy(sorted((shared_data / GE).iterdir())[0], outside)
    rng = random.Random(0)
    rng.choice = lambda seq, how=how: how if how in seq else seq[0]
    dicomdir, _ = families.dicomdir_escape(seed, tmp_path / "media", outside, rng)
    with pytest.raises(InputError) as info:
        _quiet_load(dicomdir)
    assert str(dicomdir) in str(info.value) and "outside the media folder" in str(info.value)
    assert "record" in str(info.value)


def test_dicomdir_inside_its_folder_still_reads(shared_data, tmp_path):
    from pydicom.fileset import FileSet

    fs = FileSet()
    for f in sorted((shared_data / HITACHI).iterdir()):
        fs.add(pydicom.dcmread(f))
    fs.write(tmp_path / "media")
    assert _quiet_load(tmp_path / "media" / "DICOMDIR")[0].array.shape == (4, 64, 64)


# ----------------------------------------------------------------------------- 2. model card nesting bomb
def test_model_card_nesting_bomb_is_a_model_error(shared_data, tmp_path, capsys):
    import napari_restore as nr

    model = tmp_path / "model"
    shutil.copytree(REPO / "src" / "napari_restore" / "models" / "denoise-mr", model)
    (model / "card.json").write_text("[" * 200_000 + "]" * 200_000)
    vol = _quiet_load(shared_data / HITACHI)[0]
    with pytest.raises(ModelError) as info:
        nr.restore(vol, model=str(model))
    assert str(model / "card.json") in str(info.value) and "nests deeper" in str(info.value)
    out = tmp_path / "out.nii.gz"
    assert main(["restore", str(shared_data / HITACHI), str(out), "--model", str(model)]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "Traceback" not in err and "RecursionError" not in err and "card.json" in err
    assert not out.exists()


def test_model_card_too_large_is_refused(tmp_path):
    from napari_restore.models.card import ModelCard

    card = tmp_path / "card.json"
    card.write_text('{"name": "x", "pad": "' + "a" * (2 * 2**20) + '"}')
    with pytest.raises(ModelError, match="larger than"):
        ModelCard.read(card)


# ----------------------------------------------------------------------------- 3. deflate bomb
@pytest.mark.parametrize("before_image", [False, True])
def test_deflate_bomb_is_refused_without_inflating_it(shared_data, tmp_path, before_image):
    bomb = families.deflate_bomb(shared_data / HITACHI / "001.dcm", tmp_path / "bomb.dcm", 512 * 2**20,
                                 before_image=before_image)
    assert bomb.stat().st_size < 2 * 2**20  # 512 MiB of zeros deflate to about 0.5 MiB
    t0 = time.process_time()  # CPU seconds: what the reader spends, whatever else the machine runs
    with pytest.raises(InputError) as info:
        _quiet_load(bomb)
    assert time.process_time() - t0 < 10
    assert str(bomb) in str(info.value) and "deflate" in str(info.value)


def test_deflated_image_within_its_bound_reads_exactly(shared_data, tmp_path):
    src = shared_data / HITACHI / "001.dcm"
    small = families.deflate_bomb(src, tmp_path / "deflated.dcm", 4096)  # a small private element
    assert pydicom.dcmread(small).file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(_quiet_load(small)[0].array, _quiet_load(src)[0].array)


# ----------------------------------------------------------------------------- 4. huge sequences
@pytest.mark.parametrize("items,depth", [(400_000, 1), (0, 20_000)])
def test_sequence_bombs_are_refused_within_ten_seconds(shared_data, tmp_path, items, depth):
    bomb = families.sequence_bomb(shared_data / HITACHI / "001.dcm", tmp_path / "seq.dcm", items=items, depth=depth)
    t0 = time.process_time()  # CPU seconds: what the reader spends, whatever else the machine runs
    with pytest.raises(InputError) as info:
        _quiet_load(bomb)
    assert time.process_time() - t0 < 10
    assert str(bomb) in str(info.value)


# ----------------------------------------------------------------------------- 5. BurnedInAnnotation on one slice
def test_burned_in_annotation_on_one_slice_refuses_the_deidentified_export(shared_data, tmp_path, capsys):
    src = tmp_path / "in"
    files = _copy_files(shared_data / CT_SERIES, src, 8)
    ds = pydicom.dcmread(files[4])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(files[4])
    for f in files[:4] + files[5:]:
        assert str(pydicom.dcmread(f, stop_before_pixels=True).get("BurnedInAnnotation", "")) != "YES"
    out = tmp_path / "out_dcm"
    assert main(["restore", str(src), str(out), "--deidentify"]) == EXIT_ERROR
    assert "BurnedInAnnotation" in capsys.readouterr().err
    assert not out.exists()
    assert main(["restore", str(src), str(out), "--deidentify", "--accept-burned-in"]) == EXIT_OK
    written = sorted(out.iterdir())
    assert len(written) == 8
    assert {str(pydicom.dcmread(f, stop_before_pixels=True).BurnedInAnnotation) for f in written} == {"YES"}


def test_burned_in_annotation_in_functional_groups_is_seen(shared_data, tmp_path):
    from napari_restore.deidentify import check_burned_in

    src = tmp_path / "enh.dcm"
    enhanced = next((shared_data / "mr" / "siemens-xa30-enhanced" / "5_anat-T1w_acq-tfl").iterdir())
    ds = pydicom.dcmread(enhanced)
    ds.PerFrameFunctionalGroupsSequence[3].BurnedInAnnotation = "YES"
    ds.save_as(src)
    vol = _quiet_load(src)[0]
    with pytest.raises(OutputError, match="BurnedInAnnotation"):
        check_burned_in(vol.meta["dicom_header"], False, tmp_path / "out")


# ----------------------------------------------------------------------------- 6. batch output inside its input
def test_batch_output_inside_its_input_is_refused_before_writing(shared_data, tmp_path, capsys):
    src = tmp_path / "IN"
    _copy_files(shared_data / HITACHI, src / "s1")
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    assert main(["batch", str(src), str(src / "out")]) == EXIT_ERROR
    assert "inside" in capsys.readouterr().err
    assert not (src / "out").exists()
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before


# ----------------------------------------------------------------------------- 7. full disk
def _limit_file_size() -> None:  # runs in the child: writes beyond 256 KiB fail with EFBIG, like a full disk
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256 * 1024, 256 * 1024))


@pytest.mark.parametrize("command", ["restore", "batch"])
def test_full_disk_gives_one_clean_message(shared_data, tmp_path, command):
    src = tmp_path / "in"
    _copy_files(shared_data / CT_SERIES, src / "s1", 3)  # 512x512 slices: each output file is over 256 KiB
    out = tmp_path / "out_dcm"
    args = [str(src / "s1"), str(out)] if command == "restore" else [str(src), str(out), "--pool", "thread"]
    proc = subprocess.run([sys.executable, "-m", "napari_restore.cli", command, *args], capture_output=True, text=True,
                          preexec_fn=_limit_file_size, timeout=300, cwd=tmp_path)
    assert proc.returncode == EXIT_ERROR, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert "File too large" in proc.stderr + proc.stdout
    if command == "restore":
        lines = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()]
        assert len(lines) == 1 and "nothing was left behind" in lines[0], proc.stderr
        assert not out.exists()
    leftovers = [p for p in tmp_path.rglob("*") if ".partial-" in p.name]
    assert not leftovers


# ----------------------------------------------------------------------------- 8. silent skip in batch
def test_damaged_image_series_is_a_batch_failure_not_a_skip(shared_data, tmp_path):
    from napari_restore.batch import run_batch

    src = tmp_path / "IN"
    for f in _copy_files(shared_data / CT_SERIES, src / "s1", 4):
        raw = bytearray(f.read_bytes())
        raw[2000:2400] = b"\xff" * 400
        f.write_bytes(bytes(raw))
    result = run_batch(src, tmp_path / "OUT", pool="thread", progress=False, out=open(os.devnull, "w"))
    assert result.exit_code == 1
    assert result.skipped.get("non-image", 0) == 0 and result.skipped.get("dicomdir", 0) == 0
    rows = (tmp_path / "OUT" / "manifest.csv").read_text().splitlines()[1:]
    assert len(rows) == 4 and all("failed" in r and "damaged" in r for r in rows), rows


# ----------------------------------------------------------------------------- 9. orphaned workers
def _children(pid: int) -> set[int]:
    kids = set()
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    kids.add(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_batch_workers_exit_when_the_batch_process_is_killed(shared_data, tmp_path):
    src = tmp_path / "IN"
    for k in range(6):  # six copies of a 28-slice CT series: a run of tens of seconds
        _copy_files(shared_data / CT_SERIES, src / f"s{k}")
        for f in (src / f"s{k}").iterdir():
            ds = pydicom.dcmread(f)
            ds.SeriesInstanceUID = f"{ds.SeriesInstanceUID}.{k}"
            ds.save_as(f)
    proc = subprocess.Popen([sys.executable, "-m", "napari_restore.cli", "batch", str(src), str(tmp_path / "OUT"),
                             "--readers", "2", "--writers", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            workers = _children(proc.pid)
            if len(workers) >= 4 and (tmp_path / "OUT").exists():  # resource tracker + readers + writers
                break
            time.sleep(0.2)
        assert proc.poll() is None and len(workers) >= 4, "the batch ended before its workers could be seen"
        time.sleep(1.0)
        workers = _children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p) for p in workers):
            time.sleep(0.2)
        left = [p for p in workers if _alive(p)]
        assert not left, f"{len(left)} of {len(workers)} worker processes outlived the killed batch"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:  # only the processes this test started
            if _alive(p):
                os.kill(p, signal.SIGKILL)
