"""Batch restoration of a whole tree of studies: ``napari-restore batch INPUT_ROOT OUTPUT_ROOT``.

:func:`run_batch` (:mod:`.run`) walks ``INPUT_ROOT`` (:mod:`.walk`), restores every image series
through a reader pool and a writer pool around the model (:mod:`.pipeline`), records one manifest
row per series (:mod:`.manifest`) and takes its share under torchrun or ``--shard`` (:mod:`.shard`).
"""
from __future__ import annotations

from .run import FORMATS, BatchResult, run_batch
from .shard import parse_shard
from .walk import SeriesItem, WalkResult, plan_outputs, walk_tree

__all__ = ["run_batch", "BatchResult", "walk_tree", "plan_outputs", "SeriesItem", "WalkResult", "parse_shard",
           "FORMATS"]
