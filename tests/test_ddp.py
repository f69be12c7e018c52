"""Two-process DistributedDataParallel (gloo, CPU) training ends with identical weights on both ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_two_process_gloo_ranks_agree(shared_data, tmp_path):
    data = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    val = shared_data / "ct" / "nifti" / "cta_aorta_cropped.nii.gz"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "ddp_worker.py"), str(data), str(val), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    for world, n_tensors, _digest, trained_world in lines:
        assert world == "2" and trained_world == "2"
        assert int(n_tensors) > 20  # parameters and batch-norm buffers are all hashed
    assert lines[0][2] == lines[1][2], "the ranks ended with different weights or buffers"
    # rank 0 alone wrote the model and the logs
    assert (tmp_path / "model" / "card.json").is_file()
    log = (tmp_path / "model.run" / "log.csv").read_text().strip().splitlines()
    assert len(log) == 1 + 1 + 2  # header, baseline, two epochs: written once, not per rank
