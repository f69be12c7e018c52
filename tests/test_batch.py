"""``napari-restore batch`` on small trees of real ../shared/data series (symlinked, never copied).

Tree walk and series selection, mirrored outputs equal to ``restore()``, the manifest, resume after
a SIGKILL, a bad series recorded while the run goes on, and ``--shard`` covering every series once.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import napari_restore as nr
from napari_restore.batch import run_batch
from napari_restore.batch.manifest import COLUMNS, read_rows
from napari_restore.batch.shard import Shard, assign, parse_shard, select
from napari_restore.batch.walk import plan_outputs, walk_tree
from napari_restore.cli import main
from napari_restore.errors import InputError
from napari_restore.io.dicom_read import discover_series

from _batch_helpers import SMALL_TREE_SERIES, leftovers, small_tree
from _engine_helpers import one_torch_thread, save_tiny, trained_tiny_network

REPO = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """A tiny untrained 2-D network (any modality): the batch logic, not the quality, is tested here."""
    import torch

    torch.manual_seed(0)
    return save_tiny(tmp_path_factory.mktemp("model") / "tiny-any", name="tiny-any", modality="any")


@pytest.fixture()
def tree(shared_data, tmp_path) -> Path:
    return small_tree(shared_data, tmp_path / "tree")


def _batch(tree: Path, out: Path, model: Path, **kw):
    buf = io.StringIO()
    kw.setdefault("readers", 2)
    kw.setdefault("writers", 2)
    kw.setdefault("pool", "thread")  # quicker to start; the process pools are run by the first test and the CLI
    result = run_batch(tree, out, model=model, device="cpu", progress=False, out=buf, walk_workers=0, **kw)
    return result, buf.getvalue()


def _manifest(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- walk
def test_walk_selects_image_series_like_the_reader(shared_data, tmp_path):
    exam = shared_data / "ct" / "philips-head-phantom" / "exam"
    root = tmp_path / "archive"
    (root / "patient1").mkdir(parents=True)
    os.symlink(exam, root / "patient1" / "exam")
    os.symlink(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz", root / "ct.nii.gz")
    (root / "README.txt").write_text("exported from PACS\n")

    walked = walk_tree(root, workers=0)
    dicom = [it for it in walked.items if it.kind != "file"]
    # the reader's own verdict on the same folder: image series in, localizer and secondary capture out
    series, skipped = discover_series(exam)
    expected = {str(s.header.SeriesInstanceUID): len(s.frames) for s in series if s.kind in ("image", "derived")}
    assert {it.series_uid: it.slices for it in dicom} == expected
    assert sorted(it.input for it in dicom) == ["patient1/exam/S2010", "patient1/exam/S2020"]
    assert {it.shape for it in dicom} == {(28, 512, 512), (140, 512, 512)}
    kinds = {s.kind for s in series}
    assert {"localizer", "secondary"} <= kinds
    assert walked.skipped["localizer"] == sum(s.kind == "localizer" for s in series) == 1
    assert walked.skipped["secondary"] == 1
    assert walked.skipped["colour"] == sum("colour" in s for s in skipped) == 3
    assert walked.skipped["non-dicom"] == 1
    text = " ".join(walked.skipped_lines())
    assert "1 localizer series" in text and "3 colour images" in text
    nifti = [it for it in walked.items if it.kind == "file"]
    assert [(it.input, it.shape) for it in nifti] == [("ct.nii.gz", (30, 101, 122))]

    plans = plan_outputs(walked.items, tmp_path / "out", "auto")
    rel = sorted(str(p.relative_to(tmp_path / "out")) for p in plans.values())
    assert rel == ["ct.nii.gz", "patient1/exam/S2010", "patient1/exam/S2020"]  # the input tree, mirrored
    assert walk_tree(root, workers=2).items == walked.items  # worker processes find the same series


def test_several_series_in_one_folder_get_one_output_each(tree):
    walked = walk_tree(tree, workers=0)
    assert len(walked.items) == SMALL_TREE_SERIES
    ts = [it for it in walked.items if it.input == "studyA/ts"]
    assert sorted(it.series_number for it in ts) == ["1", "2", "3"]
    assert len({it.series_uid for it in ts}) == 1  # one UID, three SeriesNumbers: three series
    plans = plan_outputs(walked.items, Path("/o"), "auto")
    outs = sorted(str(plans[it.id]) for it in ts)
    assert len(set(outs)) == 3 and all(o.startswith("/o/studyA/ts/S") for o in outs)
    nifti = plan_outputs(walked.items, Path("/o"), "nifti")
    assert all(str(p).endswith(".nii.gz") for p in nifti.values())


# ----------------------------------------------------------------------------- run, manifest, resume
def test_batch_restores_the_tree_like_restore_and_resumes(tree, tmp_path, model):
    out = tmp_path / "out"
    result, text = _batch(tree, out, model, pool="process")
    assert result.exit_code == 0, text
    assert result.peak_series_in_memory <= 2 + 1 + 1 + 2 * 2  # readers + prefetch + model + writers
    assert len(result.done_now) == SMALL_TREE_SERIES
    assert "skipped 1 localizer series" in text and "skipped 1 secondary-capture series" in text
    assert text.count("] done ") == SMALL_TREE_SERIES  # one line per finished series
    assert "batch summary" in text

    rows = _manifest(out)
    assert tuple(rows[0]) == COLUMNS
    assert len(rows) == SMALL_TREE_SERIES and {r["status"] for r in rows} == {"done"}
    assert {r["model"] for r in rows} == {"tiny-any"} and {r["model_version"] for r in rows} == {"0.0.1"}
    by_input = {r["input"]: r for r in rows}
    assert by_input["studyC/enh"]["shape"] == "96x128x128"
    assert by_input["studyC/enh"]["modality"] == "MR" and by_input["nifti/example_ct_sm.nii.gz"]["modality"] == "CT"
    assert all(float(r["seconds"]) > 0 for r in rows)
    assert leftovers(out) == []

    # each output is what restore() gives for that series, with the same geometry
    enh = out / by_input["studyC/enh"]["output"]
    assert enh.is_dir() and len(list(enh.iterdir())) == 96
    src = nr.load(tree / "studyC" / "enh")[0]
    expected = nr.restore(src, model=str(model), device="cpu")
    got = nr.load(enh)[0]
    np.testing.assert_allclose(got.affine, src.affine, atol=1e-3)
    np.testing.assert_allclose(got.array, expected.array, atol=_rescale_slope(enh) / 2 + 1e-3)  # int16 rounding
    nii = nr.load(out / "nifti" / "example_ct_sm.nii.gz")[0]
    ref = nr.restore(nr.load(tree / "nifti" / "example_ct_sm.nii.gz")[0], model=str(model), device="cpu")
    np.testing.assert_array_equal(nii.array, ref.array)

    # rerun: nothing to do, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "manifest.csv"}
    again, text2 = _batch(tree, out, model)
    assert again.exit_code == 0 and again.outcomes == []
    assert sum(a == "done" for *_, a in again.planned) == SMALL_TREE_SERIES
    assert stamps == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.name != "manifest.csv"}
    assert _manifest(out) == rows

    # an output deleted behind the manifest's back is not trusted: it is made again
    shutil.rmtree(enh)
    third, _ = _batch(tree, out, model)
    assert [o.item.input for o in third.done_now] == ["studyC/enh"] and len(list(enh.iterdir())) == 96
    assert len(_manifest(out)) == SMALL_TREE_SERIES

    # --dry-run lists and writes nothing
    dry = tmp_path / "dry"
    code = main(["batch", str(tree), str(dry), "--model", str(model), "--dry-run", "--no-progress"])
    assert code == 0 and not dry.exists()


def _rescale_slope(folder: Path) -> float:
    import pydicom

    ds = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    return float(ds.get("RescaleSlope", 1.0) or 1.0)


def test_bad_series_is_recorded_and_the_run_goes_on(shared_data, tree, tmp_path, model, capsys):
    # a corrupt series: the JPEG 2000 code streams of a real CT series lose their header
    bad = tree / "studyD" / "corrupt"
    bad.mkdir(parents=True)
    for f in sorted((shared_data / "ct" / "siemens-body-j2k").iterdir())[:3]:
        data = bytearray(f.read_bytes())
        soc = data.find(b"\xff\x4f\xff\x51")  # start of code stream + image size marker
        assert soc > 0
        data[soc:soc + 64] = bytes(64)
        (bad / f.name).write_bytes(bytes(data))
    # an unreadable file: a DICOM header that promises more pixels than the file holds
    trunc = tree / "studyE"
    trunc.mkdir()
    src = shared_data / "fixtures" / "dicom2nifti" / "failing" / "slicecount"
    first = sorted(p for p in src.rglob("*") if p.is_file())[0]
    (trunc / "IM1.dcm").write_bytes(first.read_bytes()[:-5000])

    out = tmp_path / "out"
    code = main(["batch", str(tree), str(out), "--model", str(model), "--no-progress", "--max-voxels", "1000000"])
    printed = capsys.readouterr().out
    assert code == 1, printed  # not everything succeeded
    listed = _manifest(out)
    assert len(listed) == SMALL_TREE_SERIES + 2 and len({r["id"] for r in listed}) == len(listed)
    rows = {r["input"]: r for r in listed}  # (the three series of studyA/ts share an input folder)
    assert rows["studyD/corrupt"]["status"] == "failed"
    assert "corrupt" in rows["studyD/corrupt"]["error"] and "decoded" in rows["studyD/corrupt"]["error"]
    assert rows["studyE/IM1.dcm"]["status"] == "failed" and "IM1.dcm" in rows["studyE/IM1.dcm"]["error"]
    big = rows["studyC/enh"]  # 96x128x128 = 1.57 M voxels > --max-voxels
    assert big["status"] == "failed" and "too large" in big["error"]
    done = [r for r in listed if r["status"] == "done"]
    assert len(done) == SMALL_TREE_SERIES - 1  # everything else went on
    assert "FAILED studyD/corrupt" in printed
    assert leftovers(out) == [] and not (out / "studyD").exists()

    # without --retry-failed the failures stay failed and nothing is redone
    code = main(["batch", str(tree), str(out), "--model", str(model), "--no-progress"])
    assert code == 1 and "3 failed earlier" in capsys.readouterr().out
    # with it they are tried again: the too-large one (no limit now) succeeds, the corrupt ones fail again
    code = main(["batch", str(tree), str(out), "--model", str(model), "--no-progress", "--retry-failed"])
    printed = capsys.readouterr().out
    assert code == 1
    listed2 = _manifest(out)
    assert len(listed2) == len(listed)
    rows2 = {r["input"]: r for r in listed2}
    assert rows2["studyC/enh"]["status"] == "done" and rows2["studyD/corrupt"]["status"] == "failed"
    assert rows2["studyD/corrupt"]["finished"] > rows["studyD/corrupt"]["finished"]
    by_id = {r["id"]: r for r in listed2}
    assert all(by_id[r["id"]]["finished"] == r["finished"] for r in done)  # done ones were not redone


# ----------------------------------------------------------------------------- kill and resume
def test_kill_at_any_moment_then_rerun_finishes_with_no_duplicate(tree, tmp_path, model):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    cmd = [sys.executable, "-m", "napari_restore.cli", "batch", str(tree), str(out), "--model", str(model),
           "--no-progress", "--readers", "1", "--writers", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # its reader/writer processes die with it, as under a scheduler
    killed_while_writing = False
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            rows = read_rows(out / "manifest.csv") if (out / "manifest.csv").exists() else []
            if rows and leftovers(out):  # one series recorded, another one half-written right now
                os.killpg(proc.pid, signal.SIGKILL)
                killed_while_writing = True
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(0.2)  # let the killed reader/writer processes vanish
    assert killed_while_writing, "the run ended before it could be killed in the middle of a write"
    before = {r["id"]: r for r in read_rows(out / "manifest.csv")}
    assert 1 <= len(before) < SMALL_TREE_SERIES
    assert leftovers(out)  # the kill left a half-written output behind ...

    result, _ = _batch(tree, out, model)
    assert result.exit_code == 0
    assert leftovers(out) == []  # ... which the rerun removed, never used
    rows = _manifest(out)
    assert len(rows) == SMALL_TREE_SERIES and len({r["id"] for r in rows}) == SMALL_TREE_SERIES
    assert all(r["status"] == "done" for r in rows)
    for r in rows:  # the series finished before the kill were not redone
        if r["id"] in before:
            assert r["finished"] == before[r["id"]]["finished"]
    assert len(result.done_now) == SMALL_TREE_SERIES - len(before)
    for r in rows:  # every output is complete
        path = out / r["output"]
        if path.is_dir():
            assert len(list(path.iterdir())) == int(r["slices"])
        else:
            assert nr.load(path)[0].array.shape == tuple(int(s) for s in r["shape"].split("x"))


# ----------------------------------------------------------------------------- sharding
def test_shards_cover_every_series_exactly_once(tree, tmp_path, model):
    items = walk_tree(tree, workers=0).items
    for n in (1, 2, 3, 7):
        ranks = assign(items, n)
        assert sorted(ranks) == sorted(r for r in ranks if 0 <= r < n)
        assert sum(len(select(items, Shard(i, n))) for i in range(n)) == len(items)
    loads = [sum(it.slices for it in select(items, Shard(i, 2))) for i in range(2)]
    assert max(loads) - min(loads) <= max(it.slices for it in items)  # balanced by slices
    assert assign(items, 2) == assign(list(items), 2)  # deterministic

    out = tmp_path / "out"
    codes = [main(["batch", str(tree), str(out), "--model", str(model), "--no-progress", "--shard", f"{i}/2"])
             for i in range(2)]
    assert codes == [0, 0]
    rows = _manifest(out)
    assert len(rows) == SMALL_TREE_SERIES and len({r["id"] for r in rows}) == SMALL_TREE_SERIES
    assert {r["worker"] for r in rows} == {"shard0-of-2", "shard1-of-2"}
    assert not (out / "manifest.parts").exists()  # merged into manifest.csv
    # a shard run again has nothing left to do
    again, _ = _batch(tree, out, model, shard="1/2")
    assert again.outcomes == [] and again.exit_code == 0

    with pytest.raises(InputError):
        parse_shard("2/2")
    with pytest.raises(InputError):
        parse_shard("one of two")


# ----------------------------------------------------------------------------- options
def test_ensemble_reaches_every_series_and_bad_options_fail_before_the_walk(shared_data, tmp_path, model):
    trained = save_tiny(tmp_path / "tiny-trained", trained_tiny_network(shared_data), name="tiny-trained", modality="any")
    tree = tmp_path / "tree"
    (tree / "ct").mkdir(parents=True)
    (tree / "ct" / "example_ct_sm.nii.gz").symlink_to(shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz")
    out = tmp_path / "out"
    code = main(["batch", str(tree), str(out), "--model", str(trained), "--ensemble", "2", "--no-progress",
                 "--pool", "thread"])
    assert code == 0
    src = nr.load(tree / "ct" / "example_ct_sm.nii.gz")[0]
    two = nr.restore(src, model=str(trained), device="cpu", ensemble=2)
    one = nr.restore(src, model=str(trained), device="cpu", ensemble=1)
    np.testing.assert_array_equal(nr.load(out / "ct" / "example_ct_sm.nii.gz")[0].array, two.array)
    assert np.abs(two.array - one.array).max() > 1.0  # the option changed the result (HU)

    for bad in ({"ensemble": 3}, {"strength": 1.5}, {"overlap": 1.0}, {"batch_size": 0}, {"task": "sharpen"}):
        with pytest.raises(InputError, match=next(iter(bad))):
            run_batch(tree, tmp_path / "bad", model=model, device="cpu", progress=False, out=io.StringIO(), **bad)
        assert not (tmp_path / "bad").exists()
