"""Pictures a person would rather look at than read: before/after panels (matplotlib, Agg).

matplotlib is optional (the ``[figures]`` extra, part of ``[all]`` and ``[napari]``): the core
install has none, and every picture goes through :func:`pyplot`, which says what to install.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import RestoreError
from .io.atomic import atomic_file
from .volume import Volume

#: What to install for pictures, named in the error of :func:`pyplot`.
EXTRA_HINT = "pip install 'napari-restore[figures]'"


class MissingExtraError(RestoreError):
    """An optional dependency of one feature is not installed; the message names the extra."""


def pyplot():
    """``matplotlib.pyplot`` on the non-interactive Agg backend.

    Raises:
        MissingExtraError: matplotlib is not installed (the core install leaves it out).
    """
    try:
        import matplotlib
    except ImportError:
        raise MissingExtraError(f"writing a picture needs matplotlib, which the core install leaves out: "
                                f"{EXTRA_HINT}") from None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def display_window(volume: Volume) -> tuple[float, float]:
    """(low, high) display limits: the series' window, a soft-tissue window for CT, else percentiles."""
    if volume.meta.get("window"):
        c, w = volume.meta["window"]
        return c - w / 2, c + w / 2
    if volume.modality == "CT":
        return -160.0, 240.0
    lo, hi = np.percentile(volume.array[::2, ::2, ::2], [0.5, 99.5])
    return float(lo), float(hi)


def before_after_png(before: Volume, after: Volume, path: str | os.PathLike, slice_index: int | None = None,
                     title: str = "", overwrite: bool = True) -> Path:
    """Write a PNG: input, restored and their difference on one axial slice (same window).

    Args:
        before, after: Volumes of the same shape (3-D; a 4-D volume shows its first time point).
        slice_index: the z slice; the middle one by default.
    """
    plt = pyplot()
    a = before.array if before.array.ndim == 3 else before.array[0]
    b = after.array if after.array.ndim == 3 else after.array[0]
    k = a.shape[0] // 2 if slice_index is None else int(slice_index)
    lo, hi = display_window(before)
    diff = b[k] - a[k]
    dlim = float(np.percentile(np.abs(diff), 99.5)) or 1.0
    dy, dx = before.spacing[1], before.spacing[2]
    aspect = dy / dx
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.8), constrained_layout=True)
    unit = "HU" if before.modality == "CT" else "a.u."
    for ax, img, name, cmap, (vmin, vmax) in (
        (axes[0], a[k], "input", "gray", (lo, hi)),
        (axes[1], b[k], "restored", "gray", (lo, hi)),
        (axes[2], diff, "restored - input", "RdBu_r", (-dlim, dlim)),
    ):
        im = ax.imshow(img, cmap=cmap, vmin=vmin, vmax=vmax, aspect=aspect, interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
        fig.colorbar(im, ax=ax, shrink=0.8, label=unit)
    fig.suptitle(title or f"{before.meta.get('description', '')}  slice {k}  window [{lo:.0f}, {hi:.0f}] {unit}")
    path = Path(path)
    with atomic_file(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
