"""MR noise: Rician noise, complex Gaussian noise added to the image (or its k-space), magnitude taken."""
from __future__ import annotations

from typing import Literal

import numpy as np

from ..errors import InputError
from .inputs import Seed, _as_image, _rng


# ---------------------------------------------------------------------------- MR
def foreground_mean(image: np.ndarray) -> float:
    """Mean signal of the foreground: pixels above the Otsu threshold of the image."""
    from skimage.filters import threshold_otsu

    arr = np.asarray(image, dtype=np.float64)
    if np.ptp(arr) == 0:
        return float(arr.flat[0])
    fg = arr[arr > threshold_otsu(arr)]
    return float(fg.mean())


def mr_rician_noise(
    image: np.ndarray,
    sigma_fraction: float,
    *,
    reference: float | None = None,
    domain: Literal["image", "kspace"] = "image",
    seed: Seed = None,
) -> np.ndarray:
    """Rician noise: complex Gaussian noise added, magnitude taken.

    ``sigma = sigma_fraction * reference`` is the SD of each of the real and imaginary noise
    channels, in image units. The image is taken as the real part of the true complex signal.
    The magnitude of pure noise has mean ``sigma * sqrt(pi/2)`` (the Rician bias at low SNR).

    Args:
        image: magnitude MR image, ``(y, x)`` or ``(z, y, x)``, arbitrary units.
        sigma_fraction: noise SD as a fraction of ``reference`` (e.g. 0.02-0.10).
        reference: reference signal level in image units; default: the mean of the foreground
            (pixels above the Otsu threshold of the whole image or volume), i.e. the tissue signal.
        domain: ``"image"`` adds the complex noise to the image; ``"kspace"`` adds it to the
            orthonormal 2-D FFT of each slice and transforms back (identical statistics, as the
            orthonormal FFT keeps white noise white with the same SD).
        seed: seed or ``numpy.random.Generator``.

    Returns:
        float32 magnitude image of the input's shape.
    """
    arr = _as_image(image).astype(np.float64)
    if not (float(sigma_fraction) >= 0):
        raise InputError(f"sigma_fraction must be >= 0, got {sigma_fraction!r}")
    if domain not in ("image", "kspace"):
        raise InputError(f"domain must be 'image' or 'kspace', got {domain!r}")
    ref = foreground_mean(arr) if reference is None else float(reference)
    sigma = float(sigma_fraction) * ref
    rng = _rng(seed)
    noise = rng.standard_normal(arr.shape) + 1j * rng.standard_normal(arr.shape)
    noise *= sigma
    if domain == "kspace":
        k = np.fft.fft2(arr, axes=(-2, -1), norm="ortho") + noise
        out = np.abs(np.fft.ifft2(k, axes=(-2, -1), norm="ortho"))
    else:
        out = np.abs(arr + noise)
    return out.astype(np.float32)
