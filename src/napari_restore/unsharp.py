"""Classical edge enhancement: noise-aware unsharp masking (:class:`UnsharpEnhance`).

What task ``"enhance"`` runs when no trained enhancement model is installed
(:func:`napari_restore.restore`); a local operation, so tiled and whole results agree.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------- classical enhance
def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


class UnsharpEnhance(nn.Module):
    """Noise-aware unsharp masking: ``y = x + amount * g(d) * d``.

    ``d = G(sigma_small) * x - G(sigma_large) * x`` is a band-pass detail layer (it leaves out the
    finest scale, where pixel noise lives) and ``g(d) = d^2 / (d^2 + (k * noise_d)^2)`` cores
    it: detail at the noise level of ``d`` is hardly boosted, real edges are. Separable Gaussian
    filters with reflect padding; a local operation, so tiled and whole results agree.

    Args:
        spatial_dims: 2 (``(B, 1, H, W)``) or 3 (``(B, 1, D, H, W)``).
        sigmas_small, sigmas_large: Gaussian sigmas per spatial axis, in voxels.
        noise_d: noise SD of ``d`` (same units as ``x``); see :meth:`estimate_noise`.
        amount: gain of the detail layer; ``k``: coring threshold in noise SDs.
    """

    def __init__(self, spatial_dims: int, sigmas_small: Sequence[float], sigmas_large: Sequence[float],
                 noise_d: float = 0.0, amount: float = 1.5, k: float = 3.0):
        super().__init__()
        self.spatial_dims, self.amount, self.k = spatial_dims, float(amount), float(k)
        self.noise_d = float(noise_d)
        self.small = [_gaussian_kernel(s) for s in sigmas_small]
        self.large = [_gaussian_kernel(s) for s in sigmas_large]

    def _blur(self, x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
        for axis, k in enumerate(kernels):
            r = (k.numel() - 1) // 2
            if r == 0 or x.shape[2 + axis] == 1:
                continue
            shape = [1, 1] + [1] * self.spatial_dims
            shape[2 + axis] = k.numel()
            pad = [0, 0] * self.spatial_dims
            pad[2 * (self.spatial_dims - 1 - axis)] = pad[2 * (self.spatial_dims - 1 - axis) + 1] = r
            mode = "reflect" if x.shape[2 + axis] > r else "replicate"
            xp = F.pad(x, pad, mode=mode)
            conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
            x = conv(xp, k.to(x.device, x.dtype).reshape(shape))
        return x

    def detail(self, x: torch.Tensor) -> torch.Tensor:
        """The band-pass detail layer ``d`` (same shape as ``x``)."""
        return self._blur(x, self.small) - self._blur(x, self.large)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        d = self.detail(x32)
        t2 = (self.k * self.noise_d) ** 2
        gain = d * d / (d * d + t2) if t2 > 0 else torch.ones_like(d)
        return x32 + self.amount * gain * d

    @torch.no_grad()
    def estimate_noise(self, x: torch.Tensor) -> float:
        """Robust SD of ``d`` over a sample ``x``: ``1.4826 * median |d|`` (edges are sparse)."""
        d = self.detail(x.float()).abs().flatten()
        d = d[d > 0]
        return float(1.4826 * d.median()) if d.numel() else 0.0
