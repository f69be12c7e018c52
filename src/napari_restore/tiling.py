"""Tiled inference that matches the whole-image result: aligned window grids and unclamped Gaussian blending.

Used by :mod:`napari_restore.step_runner` for 2-D tiles and 3-D sliding windows (MONAI
``SlidingWindowInferer`` with our grid and weights).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _split_pad(size: int, multiple: int) -> tuple[int, int]:
    """Padding (before, after) that the network itself would add (see ResidualUNet.forward)."""
    extra = (-size) % multiple
    return extra // 2, extra - extra // 2


def _aligned_windows(shape: Sequence[int], roi: Sequence[int], overlap: float, multiple: int):
    """A window grid that matches the whole-image result as closely as possible.

    A strided U-Net is shift-equivariant only for shifts by ``multiple``, so every window starts
    at a multiple of it, on the input padded exactly as the network pads a whole image. The grid
    also fits the padded size exactly (windows grow a little where needed): MONAI would
    otherwise shift the last window back, and a window edge next to the image border gets
    weight where no other window is reliable. Returns ``(pads, roi, overlap)`` with ``overlap``
    chosen so that MONAI's ``int(roi * (1 - overlap))`` is the step.
    """
    pads = [_split_pad(int(s), multiple) for s in shape]
    padded = [int(s) + a + b for s, (a, b) in zip(shape, pads)]
    roi_a, ovl = [], []
    for r, size in zip(roi, padded):
        r = min(size, max(multiple, int(r) // multiple * multiple))
        if r >= size:
            roi_a.append(size)
            ovl.append(0.0)
            continue
        step = max(multiple, int(r * (1.0 - overlap)) // multiple * multiple)
        n = -(-(size - r) // step) + 1  # windows along this axis
        step = max(multiple, (size - r) // (n - 1) // multiple * multiple)
        r = size - (n - 1) * step
        roi_a.append(r)
        ovl.append(min(0.999, max(0.0, 1.0 - (step + 0.5) / r)))
    return pads, tuple(roi_a), tuple(ovl)


def _blend_weights(roi: Sequence[int], device: torch.device) -> torch.Tensor:
    """Gaussian window weights ``(1, 1, *roi)``, sigma = roi / 8, NOT clamped.

    MONAI's own Gaussian map is clamped at 1e-3 of its peak; near the image border, where the
    other axis' factor is already small, that clamp gives a window's unreliable edge the same
    weight as another window's centre. An unclamped separable product keeps the ratios.
    """
    w = torch.ones((1, 1), dtype=torch.float32)
    for r in roi:
        t = torch.arange(r, dtype=torch.float64) - (r - 1) / 2.0
        g = torch.exp(-0.5 * (t / (0.125 * r)) ** 2)
        w = w[..., None] * (g / g.max()).float()
    return w.to(device)


def _inferer(roi, batch: int, overlap, device: torch.device, stitch: torch.device):
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=batch, overlap=overlap, mode="gaussian",
                                   padding_mode="replicate", sw_device=device, device=stitch)
    inferer.roi_weight_map = _blend_weights(roi, device)
    return inferer


def _pad_array(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Pad the trailing ``len(pads)`` axes of ``x`` (reflect where possible, like the network)."""
    flat = [p for ab in reversed(pads) for p in ab]
    if not any(flat):
        return x
    small = any(max(a, b) >= s for (a, b), s in zip(pads, x.shape[-len(pads):]))
    return F.pad(x, flat, mode="replicate" if small else "reflect")
