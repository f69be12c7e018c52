"""Losses: supervised (L1/MSE/per-sample PSNR + MONAI SSIM) and self-supervised (Neighbor2Neighbor, Noise2Void).

All work on batches ``(B, 1, H, W)`` (2-D) or ``(B, 1, D, H, W)`` (3-D) in network units; 2.5-D
inputs are ``(B, C, H, W)``, the centre slice and its neighbours (the output stays one channel).
Self-supervised losses with neighbours assume their noise is independent of the centre slice's
(true for separately reconstructed slices; not for overlapping thick slices).

Correlated noise (CT after filtered back-projection): neighbouring noise values are correlated,
so a network that sees the neighbours can predict part of the noise and learns to keep it.
Remedies offered here:

- ``pd_factor`` (N2N): pixel-shuffle downsampling (Zhou et al. 2020, "When AWGN-based denoiser
  meets real noises"; Lee et al. 2022, AP-BSN) before the Neighbor2Neighbor sub-sampler: the
  image is split into ``s*s`` sub-images of every ``s``-th pixel, whose noise is much less
  correlated, and N2N runs on those.
- ``blind_spot`` (N2V): a structured ``b x b`` blind spot (in the spirit of structN2V, Broaddus et
  al. 2020): every pixel of the box around a masked pixel is replaced, so the network cannot read
  the correlated noise next to it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PSNRLoss(nn.Module):
    """The batch mean of each sample's ``10 log10(MSE + eps)`` (dB; lower is better).

    Every sample weighs the same in decibels, as every cell of the condition matrix does: a mildly
    degraded sample, whose input is already close to its target, counts as much as a badly
    degraded one (with L1 or MSE its small error is drowned by the large ones, and the network
    learns to sharpen a sharp image). The "PSNR loss" of BasicSR's HINet/NAFNet deblurring
    recipes. ``eps`` (network units squared) caps what an exact sample can still earn.
    """

    def __init__(self, eps: float = 1e-6):
        super().__init__()
        self.eps = float(eps)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mse = ((pred - target) ** 2).flatten(1).mean(dim=1)
        return (10.0 * torch.log10(mse + self.eps)).mean()


class SupervisedLoss(nn.Module):
    """``L1``, ``MSE`` or ``psnr`` (:class:`PSNRLoss`) plus ``ssim_weight * (1 - SSIM)`` (MONAI
    :class:`~monai.losses.SSIMLoss`).

    SSIM is computed on both images scaled by the target batch's range, so ``data_range = 1``.
    """

    def __init__(self, kind: str = "l1", ssim_weight: float = 0.0, spatial_dims: int = 2):
        super().__init__()
        self.base = {"l1": nn.L1Loss, "mse": nn.MSELoss, "psnr": PSNRLoss}[kind]()
        self.ssim_weight = float(ssim_weight)
        self.ssim = None
        if self.ssim_weight > 0:
            from monai.losses import SSIMLoss

            self.ssim = SSIMLoss(spatial_dims=spatial_dims, data_range=1.0, win_size=7)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight`` (broadcastable to ``pred``; L1 and MSE only): per-pixel weights, the base
        loss their weighted mean."""
        if weight is None:
            loss = self.base(pred, target)
        elif isinstance(self.base, (nn.L1Loss, nn.MSELoss)):
            err = (pred - target).abs() if isinstance(self.base, nn.L1Loss) else (pred - target) ** 2
            weight = weight.expand_as(err)
            loss = (weight * err).sum() / weight.sum().clamp_min(1e-12)
        else:
            raise ValueError(f"per-pixel weights need the l1 or mse loss, not {type(self.base).__name__}")
        if self.ssim is not None:
            lo = target.amin(dim=tuple(range(1, target.ndim)), keepdim=True)
            rng = (target.amax(dim=tuple(range(1, target.ndim)), keepdim=True) - lo).clamp_min(1e-6)
            loss = loss + self.ssim_weight * self.ssim((pred - lo) / rng, (target - lo) / rng)
        return loss


# ---------------------------------------------------------------------------- Neighbor2Neighbor
def pixel_unshuffle_batch(x: torch.Tensor, s: int) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B*s*s, C, H/s, W/s)``: the ``s*s`` sub-images of every ``s``-th pixel."""
    if s == 1:
        return x
    b, c, h, w = x.shape
    y = F.pixel_unshuffle(x, s).reshape(b, c, s * s, h // s, w // s)  # channel = c * s*s + dy * s + dx
    return y.transpose(1, 2).reshape(b * s * s, c, h // s, w // s)


def neighbor_subsample(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Neighbor2Neighbor sampler (Huang et al. 2021): two half-size images from neighbouring pixels.

    In each 2x2 cell one pixel goes to ``g1`` and one of its two edge neighbours to ``g2``.
    Returns ``(idx1, idx2, cells)`` so that :func:`gather_cells` applies the same choice to
    another image; ``x`` is ``(B, 1, H, W)`` with even ``H``, ``W``.
    """
    b, _, h, w = x.shape
    choice = torch.randint(0, 4, (b, 1, h // 2, w // 2), generator=generator)
    neighbour = torch.randint(0, 2, (b, 1, h // 2, w // 2), generator=generator)
    # cell layout: 0 1 / 2 3; edge neighbours: 0:(1,2) 1:(0,3) 2:(0,3) 3:(1,2)
    table = torch.tensor([[1, 2], [0, 3], [0, 3], [1, 2]])
    idx2 = table[choice, neighbour]
    return choice, idx2, torch.empty(0)


def gather_cells(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Pick pixel ``idx`` ``(B, 1, H/2, W/2)`` (0..3) of every 2x2 cell of each channel of ``x``
    ``(B, C, H, W)`` -> ``(B, C, H/2, W/2)``."""
    b, c, h, w = x.shape
    cells = F.pixel_unshuffle(x, 2).reshape(b, c, 4, h // 2, w // 2)  # cell index = dy*2 + dx
    pick = idx.to(x.device)[:, None].expand(b, c, 1, h // 2, w // 2)
    return torch.gather(cells, 2, pick)[:, :, 0]


class Neighbor2NeighborLoss(nn.Module):
    """Neighbor2Neighbor: ``|f(g1) - g2|^2 + gamma |f(g1) - g2 - (g1(f(y)) - g2(f(y)))|^2``.

    Args:
        gamma: weight of the regulariser (``f(y)`` is computed without gradient).
        pd_factor: pixel-shuffle downsampling factor applied first (correlated-noise remedy).
    Only 2-D; ``y`` ``(B, C, H, W)`` (``C > 1``: the centre slice and its neighbours, whose noise
    is independent: every channel is sub-sampled alike, ``g2`` comes from the centre), ``H`` and
    ``W`` multiples of ``2 * pd_factor``.
    """

    def __init__(self, gamma: float = 1.0, pd_factor: int = 1):
        super().__init__()
        self.gamma, self.pd = float(gamma), int(pd_factor)

    def forward(self, net: nn.Module, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if y.ndim != 4:
            raise ValueError("Neighbor2Neighbor is implemented for 2-D patches only")
        y = pixel_unshuffle_batch(y, self.pd)
        h, w = y.shape[-2:]
        y = y[..., : h - h % 2, : w - w % 2]
        idx1, idx2, _ = neighbor_subsample(y, generator)
        c = y.shape[1] // 2
        g1, g2 = gather_cells(y, idx1), gather_cells(y[:, c:c + 1], idx2)
        out = net(g1)
        loss = F.mse_loss(out, g2)
        if self.gamma > 0:
            with torch.no_grad():
                fy = net(y)
            reg = out - g2 - (gather_cells(fy, idx1) - gather_cells(fy, idx2))
            loss = loss + self.gamma * reg.pow(2).mean()
        return loss


# ---------------------------------------------------------------------------- Noise2Void
def _offsets(blind_spot: int, radius: int) -> torch.Tensor:
    """Offsets ``(dy, dx)`` within ``radius`` that lie outside the ``blind_spot`` box."""
    h = blind_spot // 2
    r = torch.arange(-radius, radius + 1)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    keep = (dy.abs() > h) | (dx.abs() > h)
    return torch.stack([dy[keep], dx[keep]], dim=1)


def n2v_mask(y: torch.Tensor, blind_spot: int, spacing: int, generator: torch.Generator
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise2Void input: masked copy of ``y`` ``(B, C, H, W)`` and the boolean map ``(B, 1, H, W)`` of
    masked centres; only the centre channel ``C // 2`` is masked (neighbouring slices' noise is independent).

    One centre per ``spacing x spacing`` cell (stratified, random position, kept
    ``blind_spot // 2 + 2`` pixels away from the border). Every pixel of the
    ``blind_spot x blind_spot`` box around a centre is replaced by a pixel drawn from a window of
    radius ``blind_spot // 2 + 2`` outside the box (``blind_spot=1``: classic N2V).
    """
    b, ch, h, w = y.shape
    mid = ch // 2
    gy, gx = h // spacing, w // spacing
    oy = torch.randint(0, spacing, (b, gy, gx), generator=generator)
    ox = torch.randint(0, spacing, (b, gy, gx), generator=generator)
    r = blind_spot // 2 + 2  # the whole sampling window stays inside the image: no clamping, no leak
    cy = ((torch.arange(gy) * spacing)[None, :, None] + oy).clamp(r, h - 1 - r)
    cx = ((torch.arange(gx) * spacing)[None, None, :] + ox).clamp(r, w - 1 - r)
    bi = torch.arange(b)[:, None, None].expand_as(cy)
    centres = torch.zeros((b, 1, h, w), dtype=torch.bool)
    centres[bi.reshape(-1), 0, cy.reshape(-1), cx.reshape(-1)] = True
    half = blind_spot // 2
    offs = _offsets(blind_spot, half + 2)
    masked = y.clone()
    by, bx = torch.meshgrid(torch.arange(-half, half + 1), torch.arange(-half, half + 1), indexing="ij")
    n = cy.numel()
    cyf, cxf, bif = cy.reshape(-1), cx.reshape(-1), bi.reshape(-1)
    for ddy, ddx in zip(by.reshape(-1).tolist(), bx.reshape(-1).tolist()):
        ty, tx = cyf + ddy, cxf + ddx
        pick = offs[torch.randint(0, len(offs), (n,), generator=generator)]
        sy, sx = cyf + pick[:, 0], cxf + pick[:, 1]
        masked[bif, mid, ty, tx] = y[bif, mid, sy, sx]
    return masked, centres


class Noise2VoidLoss(nn.Module):
    """Noise2Void (Krull et al. 2019): MSE at masked pixels between ``f(masked y)`` and ``y``.

    Args:
        blind_spot: box side (odd); > 1 is the structured blind spot for correlated noise.
        spacing: one masked pixel per ``spacing x spacing`` cell.
    """

    def __init__(self, blind_spot: int = 1, spacing: int = 8):
        super().__init__()
        self.blind_spot, self.spacing = int(blind_spot), int(spacing)

    def forward(self, net: nn.Module, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if y.ndim != 4:
            raise ValueError("Noise2Void is implemented for 2-D patches only")
        masked, centres = n2v_mask(y.cpu(), self.blind_spot, self.spacing, generator)
        out = net(masked.to(y.device))
        c = centres.to(y.device)
        mid = y.shape[1] // 2
        return F.mse_loss(out[c], y[:, mid:mid + 1][c])


__all__ = ["SupervisedLoss", "Neighbor2NeighborLoss", "Noise2VoidLoss", "n2v_mask", "neighbor_subsample",
           "gather_cells", "pixel_unshuffle_batch"]
