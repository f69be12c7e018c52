"""Blur: spacing-aware point spread functions (Gaussian, linear motion) and their convolution, plus noise."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy.signal import fftconvolve

from ..errors import InputError
from .inputs import Seed, _as_image, _inplane_spacing, _rng


# ---------------------------------------------------------------------------- blur
def _fwhm_to_sigma(fwhm: float) -> float:
    return fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def gaussian_psf(
    fwhm_mm: float | Sequence[float],
    spacing_mm: Sequence[float],
    size: int | Sequence[int] | None = None,
) -> np.ndarray:
    """Gaussian point spread function sampled on the pixel grid, normalised to sum 1.

    Args:
        fwhm_mm: full width at half maximum in mm, one value (isotropic) or one per axis in the
            order of ``spacing_mm``. A 0 along an axis means no blur along it.
        spacing_mm: pixel spacing in mm, ``(dy, dx)`` for a 2-D in-plane PSF or ``(dz, dy, dx)`` for 3-D.
        size: kernel size in pixels per axis (odd); default covers +-4 sigma.

    Returns:
        float64 kernel, 2-D or 3-D like ``spacing_mm``, centred, sum 1.
    """
    sp = np.asarray(spacing_mm, dtype=np.float64).ravel()
    if sp.size not in (2, 3) or np.any(~np.isfinite(sp)) or np.any(sp <= 0):
        raise InputError(f"spacing_mm must be 2 or 3 positive numbers in mm, got {spacing_mm!r}")
    fw = np.broadcast_to(np.asarray(fwhm_mm, dtype=np.float64).ravel(), sp.shape) if np.size(fwhm_mm) in (1, sp.size) else None
    if fw is None or np.any(~np.isfinite(fw)) or np.any(fw < 0):
        raise InputError(f"fwhm_mm must be >= 0, one value or one per axis of {sp.size}, got {fwhm_mm!r}")
    sig_px = np.array([_fwhm_to_sigma(f) / s for f, s in zip(fw, sp)])
    if size is None:
        sizes = [2 * int(math.ceil(4.0 * s)) + 1 for s in sig_px]
    else:
        sizes = list(np.broadcast_to(np.asarray(size, dtype=int).ravel(), sp.shape))
        if any(n < 1 or n % 2 == 0 for n in sizes):
            raise InputError(f"size must be odd and positive per axis, got {size!r}")
    kernel = np.ones([1] * sp.size)
    for ax, (n, s) in enumerate(zip(sizes, sig_px)):
        x = np.arange(n) - n // 2
        g = np.exp(-0.5 * (x / s) ** 2) if s > 0 else (x == 0).astype(np.float64)
        g /= g.sum()
        shape = [1] * sp.size
        shape[ax] = n
        kernel = kernel * g.reshape(shape)
    return kernel / kernel.sum()


def motion_psf(
    length_mm: float,
    angle_deg: float,
    spacing_mm: Sequence[float],
    size: int | None = None,
) -> np.ndarray:
    """Linear motion PSF: a uniform line segment, anti-aliased, normalised to sum 1.

    Args:
        length_mm: length of the motion path in mm (the blur extent).
        angle_deg: direction of the motion in degrees, measured from the image x axis (columns)
            towards the y axis (rows, i.e. downwards on screen): 0 = horizontal, 90 = vertical.
        spacing_mm: pixel spacing ``(dy, dx)`` (or ``(dz, dy, dx)``, z ignored) in mm; the segment is
            laid out in mm, so its pixel footprint follows anisotropic pixels.
        size: kernel side in pixels (odd); default just fits the segment.

    Returns:
        2-D float64 kernel ``(y, x)``, centred, sum 1. Its spread along the direction of motion
        has the second moment of a uniform segment, ``length**2 / 12`` (+ 1/6 pixel^2 from the
        bilinear anti-aliasing).
    """
    dy, dx = _inplane_spacing(spacing_mm)
    if not (float(length_mm) >= 0) or not math.isfinite(float(angle_deg)):
        raise InputError(f"length_mm must be >= 0 and angle_deg finite, got {length_mm!r}, {angle_deg!r}")
    a = math.radians(angle_deg)
    ly = length_mm * math.sin(a) / dy  # extent in pixels
    lx = length_mm * math.cos(a) / dx
    if size is None:
        half = int(math.ceil(max(abs(ly), abs(lx)) / 2.0)) + 1
        size = 2 * half + 1
    if size < 1 or size % 2 == 0:
        raise InputError(f"size must be odd and positive, got {size!r}")
    kernel = np.zeros((size, size))
    c = size // 2
    n_pts = max(2, int(math.ceil(8 * max(abs(ly), abs(lx), 1.0))))
    t = (np.arange(n_pts) + 0.5) / n_pts - 0.5  # uniform samples along the segment
    py, px = c + t * ly, c + t * lx
    y0, x0 = np.floor(py).astype(int), np.floor(px).astype(int)
    fy, fx = py - y0, px - x0
    for oy, wy in ((0, 1 - fy), (1, fy)):
        for ox, wx in ((0, 1 - fx), (1, fx)):
            yi, xi = y0 + oy, x0 + ox
            ok = (yi >= 0) & (yi < size) & (xi >= 0) & (xi < size)
            np.add.at(kernel, (yi[ok], xi[ok]), (wy * wx)[ok])
    return kernel / kernel.sum()


_PAD_MODES = {"reflect": "symmetric", "mirror": "reflect", "nearest": "edge", "wrap": "wrap", "constant": "constant"}


def blur(image: np.ndarray, psf: np.ndarray, mode: str = "reflect") -> np.ndarray:
    """Convolve an image with a PSF (FFT convolution, borders extended by ``mode``).

    Args:
        image: ``(y, x)`` or ``(z, y, x)``.
        psf: 2-D kernel (applied to every slice of a volume) or 3-D kernel (volume only).
        mode: border handling, as in ``scipy.ndimage``: ``reflect`` (half-sample symmetric),
            ``mirror``, ``nearest``, ``wrap`` or ``constant`` (zeros).

    Returns:
        float32 array of the image's shape.
    """
    arr = _as_image(image).astype(np.float64)
    k = np.asarray(psf, dtype=np.float64)
    if mode not in _PAD_MODES:
        raise InputError(f"mode must be one of {sorted(_PAD_MODES)}, got {mode!r}")
    if k.ndim not in (2, 3) or k.ndim > arr.ndim or any(s % 2 == 0 for s in k.shape):
        raise InputError(f"psf must be a 2-D or 3-D kernel with odd sizes, no more dimensions than the image; got {k.shape}")
    if k.ndim < arr.ndim:
        k = k[None]
    pads = [(s // 2, s // 2) for s in k.shape]
    padded = np.pad(arr, pads, mode=_PAD_MODES[mode])
    axes = (-3, -2, -1) if (k.ndim == 3 and k.shape[0] > 1) else (-2, -1)
    out = fftconvolve(padded, k, mode="valid", axes=axes)
    return out.astype(np.float32)


def blur_and_noise(
    image: np.ndarray,
    psf: np.ndarray,
    noise_sd: float = 0.0,
    *,
    mode: str = "reflect",
    seed: Seed = None,
) -> np.ndarray:
    """Blur with ``psf`` (see :func:`blur`), then add white Gaussian noise of SD ``noise_sd``.

    Args:
        noise_sd: SD of the added noise in image units (HU for CT); 0 for none.
    """
    if not (float(noise_sd) >= 0):
        raise InputError(f"noise_sd must be >= 0, got {noise_sd!r}")
    out = blur(image, psf, mode=mode)
    if noise_sd > 0:
        out = out + (float(noise_sd) * _rng(seed).standard_normal(out.shape)).astype(np.float32)
    return out.astype(np.float32)
