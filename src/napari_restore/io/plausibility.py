"""Plausibility of decoded pixel values: what a corrupt compressed stream or a wrong rescale gives.

A CT slice in Hounsfield units lies within about -1024 (air) .. +3071 (dense bone, the 12-bit
scale); scanners pad outside the field of view with one fixed value (-2000, -3024, -32768 - 1024),
and an extended CT scale puts small metal regions far above +3071. A slice whose values spread far
outside that range over a large part of its area is not a CT image: a broken JPEG Lossless stream,
for instance, decodes to stripes from -33792 to +31743 HU without any error from the decoder.
"""
from __future__ import annotations

import numpy as np

CT_PLAUSIBLE_HU = (-4096.0, 4096.0)
"""Values outside this range (HU) count as implausible for CT, the slice's padding value aside."""
IMPLAUSIBLE_SLICE_FRACTION = 0.05
"""A CT slice with more than this share of its voxels implausible is reported (metal on an extended
scale covers well under this share of a slice)."""


def implausible_ct_slices(array: np.ndarray) -> list[tuple[int, float]]:
    """Slices of a CT array whose values are implausible for CT.

    Args:
        array: ``(..., y, x)`` in HU; the leading axes are flattened into one slice index (``(z, y, x)``:
            the slice number; ``(t, z, y, x)``: ``t * nz + z``).

    Returns:
        ``[(slice index, share of its voxels outside CT_PLAUSIBLE_HU), ...]`` for every slice above
        :data:`IMPLAUSIBLE_SLICE_FRACTION`. The most common out-of-range value of a slice is taken to be
        its padding and not counted.
    """
    lo, hi = CT_PLAUSIBLE_HU
    flat = np.asarray(array).reshape(-1, array.shape[-2] * array.shape[-1])
    outside = (flat < lo) | (flat > hi)
    found = []
    for k in np.flatnonzero(outside.mean(axis=1) > IMPLAUSIBLE_SLICE_FRACTION):
        values, counts = np.unique(flat[k][outside[k]], return_counts=True)
        share = float((counts.sum() - counts.max()) / flat.shape[1])
        if share > IMPLAUSIBLE_SLICE_FRACTION:
            found.append((int(k), share))
    return found
