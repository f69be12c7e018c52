"""Deterministic sharding of series over ranks (``torchrun``) or jobs (``--shard i/n``).

Every rank walks the same tree and computes the same assignment: the series sorted by slice count
(largest first, ties by id) go one by one to the rank with the fewest slices so far (ties: the
lowest rank); the "longest processing time first" rule, within 4/3 of the best balance. No
communication is needed for the work itself; under ``torchrun`` ``torch.distributed`` (gloo) is
used only to check that all ranks see the same series, to share a de-identification key, and for
the final barrier before rank 0 merges the manifests.
"""
from __future__ import annotations

import hashlib
import heapq
import os
from dataclasses import dataclass
from datetime import timedelta

from ..errors import InputError, RestoreError
from .walk import SeriesItem


@dataclass(frozen=True)
class Shard:
    """This process's share: ``index`` of ``count``; ``distributed`` when launched by torchrun."""

    index: int = 0
    count: int = 1
    distributed: bool = False
    local_rank: int = 0

    @property
    def tag(self) -> str | None:
        """Name of this process's manifest part (``None``: a single process writes manifest.csv)."""
        if self.count == 1:
            return None
        return f"{'rank' if self.distributed else 'shard'}{self.index}-of-{self.count}"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0-based ``i``) -> ``(i, n)``.

    Raises:
        InputError: malformed, or ``i`` not in ``0..n-1``.
    """
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise InputError(f"--shard must look like i/n with 0 <= i < n (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text}: need 0 <= i < n (i is 0-based; Slurm: $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT)")
    return i, n


def assign(items: list[SeriesItem], count: int) -> list[int]:
    """The rank of every item (same order as ``items``), balanced by slice count."""
    if count <= 1:
        return [0] * len(items)
    order = sorted(range(len(items)), key=lambda k: (-max(1, items[k].slices), items[k].id))
    heap = [(0, r) for r in range(count)]
    ranks = [0] * len(items)
    for k in order:
        load, r = heapq.heappop(heap)
        ranks[k] = r
        heapq.heappush(heap, (load + max(1, items[k].slices), r))
    return ranks


def select(items: list[SeriesItem], shard: Shard) -> list[SeriesItem]:
    """The items of ``shard``, in input order."""
    ranks = assign(items, shard.count)
    return [it for it, r in zip(items, ranks) if r == shard.index]


def digest(items: list[SeriesItem]) -> str:
    """A fingerprint of the series list (ids and slice counts) to check that all ranks agree."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}:{it.slices};".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- torchrun
def from_environment(shard: tuple[int, int] | None) -> Shard:
    """``--shard`` if given, else torchrun's ``RANK``/``WORLD_SIZE``, else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if shard is not None:
        if world > 1:
            raise InputError("--shard cannot be combined with torchrun: torchrun already shards by rank")
        return Shard(shard[0], shard[1], False)
    if world > 1:
        return Shard(int(os.environ.get("RANK", "0")), world, True, int(os.environ.get("LOCAL_RANK", "0")))
    return Shard()


def init_group(shard: Shard) -> bool:
    """Join the torchrun process group (gloo: only tiny CPU messages travel). True when started here."""
    if not shard.distributed:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    # a rank may wait at the final barrier for hours while another finishes its series
    dist.init_process_group(backend="gloo", timeout=timedelta(days=7))
    return True


def agree(shard: Shard, fingerprint: str, key: str | None) -> str | None:
    """Check that every rank found the same series; return rank 0's de-identification key.

    Raises:
        RestoreError: the ranks see different trees (different mounts, files still being copied).
    """
    if not shard.distributed:
        return key
    import torch.distributed as dist

    prints: list = [None] * shard.count
    dist.all_gather_object(prints, fingerprint)
    if len(set(prints)) != 1:
        raise RestoreError(f"the ranks found different series under the input root ({len(set(prints))} different "
                           "listings): every node must see the same, complete tree")
    box = [key]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(shard: Shard) -> None:
    if shard.distributed:
        import torch.distributed as dist

        dist.barrier()


def all_ok(shard: Shard, ok: bool) -> bool:
    """True when ``ok`` holds on every rank."""
    if not shard.distributed:
        return ok
    import torch
    import torch.distributed as dist

    t = torch.tensor([0 if ok else 1], dtype=torch.int32)
    dist.all_reduce(t)
    return int(t.item()) == 0


def teardown(started: bool) -> None:
    if started:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["Shard", "parse_shard", "assign", "select", "digest", "from_environment", "init_group", "agree",
           "barrier", "all_ok", "teardown"]
