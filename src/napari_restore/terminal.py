"""Progress bars on stderr for the command-line faces (``napari-restore`` and ``napari-restore pacs``)."""
from __future__ import annotations

import sys
from collections.abc import Callable


def progress_bar(desc: str, unit: str = "batch") -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A ``progress(done, total)`` callable drawing a tqdm bar on stderr, and a function that closes it."""
    from tqdm import tqdm

    bar: dict[str, tqdm] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        b = bar["bar"]
        b.total = total
        b.update(done - b.n)

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return progress, close


__all__ = ["progress_bar"]
