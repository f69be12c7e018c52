"""Worker processes that do not outlive their batch: a pool initializer that watches the parent.

A ``kill -9`` of the batch process gives its reader, writer and walk workers no chance to be told;
each worker polls its parent id and exits within :data:`POLL_S` seconds once the parent is gone, so
no orphan keeps hundreds of megabytes (and the multiprocessing resource tracker) alive.
"""
from __future__ import annotations

import os
import threading
import time

POLL_S = 0.5


def watch_parent(parent: int) -> None:
    """Pool ``initializer``: end this process as soon as ``parent`` is no longer its parent."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(POLL_S)

    threading.Thread(target=watch, name="batch-lifeline", daemon=True).start()


def pool_kwargs() -> dict:
    """Keyword arguments for ``ProcessPoolExecutor`` so that its workers die with this process."""
    return {"initializer": watch_parent, "initargs": (os.getpid(),)}
