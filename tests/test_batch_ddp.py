"""``torchrun --nproc_per_node 2 ... napari-restore batch``: 2 CPU ranks (gloo) equal one process."""
from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import napari_restore as nr
from napari_restore.batch import run_batch

from _batch_helpers import SMALL_TREE_SERIES, leftovers, small_tree
from _engine_helpers import one_torch_thread, save_tiny

REPO = Path(__file__).resolve().parents[1]
_one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)


def _rows(out: Path) -> list[dict]:
    with open(out / "manifest.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_two_rank_torchrun_equals_single_process(shared_data, tmp_path):
    import torch

    torch.manual_seed(0)
    model = save_tiny(tmp_path / "model", name="tiny-any", modality="any")
    tree = small_tree(shared_data, tmp_path / "tree")

    single = tmp_path / "single"
    result = run_batch(tree, single, model=model, device="cpu", progress=False, out=io.StringIO(), walk_workers=0)
    assert result.exit_code == 0

    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "napari_restore.cli", "batch", str(tree), str(ddp), "--model", str(model), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[rank0-of-2]" in proc.stdout and "[rank1-of-2]" in proc.stdout

    rows, ref = _rows(ddp), {r["id"]: r for r in _rows(single)}
    # every series done exactly once, by one of the two ranks, and the per-rank manifests merged by rank 0
    assert len(rows) == SMALL_TREE_SERIES and {r["id"] for r in rows} == set(ref)
    assert all(r["status"] == "done" for r in rows)
    assert {r["worker"] for r in rows} == {"rank0-of-2", "rank1-of-2"}
    assert not (ddp / "manifest.parts").exists() and leftovers(ddp) == []
    # the outputs are those of the single-process run: same paths, same voxels, same geometry
    for r in rows:
        assert r["output"] == ref[r["id"]]["output"]
        a, b = nr.load(ddp / r["output"])[0], nr.load(single / r["output"])[0]
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_array_equal(a.affine, b.affine)
