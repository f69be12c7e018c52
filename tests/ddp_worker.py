"""Worker for tests/test_ddp.py: one rank of a 2-process gloo run (launched by torch.distributed.run).

Usage: ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/ddp_worker.py DATA VAL OUT``.
Each rank trains, then writes ``OUT/rank<r>.txt``: the world size and a SHA-256 of every state-dict
tensor (parameters AND buffers) of its final network.
"""
from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path


def main() -> None:
    data, val, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    import torch

    torch.set_num_threads(1)
    from napari_restore.training import TrainConfig, train

    cfg = TrainConfig(data=[data], val_data=[val], output=str(out / "model"), dims=2,
                      architecture={"channels": [8, 16, 32], "strides": [2, 2]}, patch_size=(32, 32), batch_size=4,
                      epochs=2, steps_per_epoch=3, val_slices=2, val_crop=64, patience=0, progress_bar=False,
                      tensorboard=False, seed=3, lr=3e-3)
    result = train(cfg)
    h = hashlib.sha256()
    state = result.network.state_dict()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.txt").write_text(f"{os.environ.get('WORLD_SIZE')} {len(state)} {h.hexdigest()} "
                                         f"{result.world_size}\n")


if __name__ == "__main__":
    main()
