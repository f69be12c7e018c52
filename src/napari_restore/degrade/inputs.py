"""What every degradation checks first: the image, the pixel spacing, and the random generator."""
from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError

Seed = int | np.random.Generator | None


# ---------------------------------------------------------------------------- helpers
def _rng(seed: Seed) -> np.random.Generator:
    return np.random.default_rng(seed)


def _as_image(image: Any, name: str = "image") -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise InputError(f"{name} must be a 2-D slice (y, x) or a 3-D volume (z, y, x), got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise InputError(f"{name} must be a real numeric array, got dtype {arr.dtype}")
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{name} contains NaN or infinite values")
    return arr


def _inplane_spacing(spacing_mm: Any) -> tuple[float, float]:
    """(dy, dx) in mm from a 2- or 3-element spacing (z, y, x)."""
    sp = np.atleast_1d(np.asarray(spacing_mm, dtype=np.float64))
    if sp.size == 1:
        sp = np.repeat(sp, 2)
    if sp.size not in (2, 3) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing_mm must be 2 (dy, dx) or 3 (dz, dy, dx) positive numbers in mm, got {spacing_mm!r}")
    return float(sp[-2]), float(sp[-1])
