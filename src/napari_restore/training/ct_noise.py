"""The CT noise model used to make training pairs: where low-dose noise is, and what it looks like.

:func:`ct_noise_variance_maps` gives a slice's local low-dose noise variance (photon part; the
model of :mod:`napari_restore.degrade`, evaluated on a coarse grid), :func:`ct_shaped_noise`
unit-variance noise with the noise power spectrum of filtered back-projection (one reconstruction
kernel, or a blend of two). :class:`~napari_restore.training.series.SeriesData` caches the maps per
slice; :class:`~napari_restore.training.patches.Degradation` draws the noise.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

#: The reconstruction kernel noise is measured against (and drawn with when no others are named).
_CT_FILTER = "cosine"


def _median_body_sd(vp: np.ndarray, hu: np.ndarray) -> float:
    """Median of ``sqrt(vp)`` over the body (HU > -500) of one slice, 1.0 when there is no body."""
    body = hu > -500
    sd = np.sqrt(vp[body]) if body.any() else np.sqrt(vp.ravel())
    m = float(np.median(sd)) if sd.size else 0.0
    return m if m > 0 else 1.0


def ct_noise_variance_maps(hu: np.ndarray, dx: float) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of the local low-dose CT noise variance of a slice (HU^2, slice shape).

    The added noise variance at dose fraction ``d`` is ``(1/d - 1) * vp + (1/d^2 - 1) * ve``
    (photon and electronic parts; the model of :mod:`napari_restore.degrade`; here ``ve`` is folded
    into ``vp``, an error below 1 % of the variance in soft tissue). Computed with
    degrade's image-domain method on a grid of >= 2 mm pixels (the map is smooth; FBP noise
    variance scales as ``1/dx^3``) and interpolated back.
    """
    from ..degrade import (DEFAULT_ELECTRONIC_NOISE, DEFAULT_PHOTONS, DEFAULT_TCM, MU_WATER_PER_MM,
                           local_noise_sd_map)

    f = max(1, int(math.floor(2.0 / dx)))
    small = hu.astype(np.float64)
    if f > 1:
        from skimage.transform import downscale_local_mean

        small = downscale_local_mean(small, (f, f))
    dxs = dx * f

    # one evaluation at dose 0.5: variance = vp + 3 ve; the electronic share ve is below 1 % of the
    # variance in soft tissue (measured on the Siemens body CT), so it is folded into vp
    sd = local_noise_sd_map(small, dxs, 0.5, DEFAULT_PHOTONS, DEFAULT_ELECTRONIC_NOISE, _CT_FILTER,
                            MU_WATER_PER_MM, DEFAULT_TCM)
    vp = sd.astype(np.float64) ** 2 * f**3
    if f > 1:
        zoom = (hu.shape[0] / vp.shape[0], hu.shape[1] / vp.shape[1])
        vp = ndi.zoom(vp, zoom, order=1, mode="nearest", grid_mode=True)[: hu.shape[0], : hu.shape[1]]
        vp = np.pad(vp, [(0, hu.shape[0] - vp.shape[0]), (0, hu.shape[1] - vp.shape[1])], mode="edge")
    ve = np.zeros_like(vp)
    return vp.astype(np.float32), ve.astype(np.float32)


def ct_shaped_noise(shape: tuple[int, int], rng: np.random.Generator,
                    filters: Sequence[str] = (_CT_FILTER,)) -> tuple[np.ndarray, float]:
    """Unit-variance stationary noise with the NPS of FBP noise (degrade's image method).

    With several ``filters``, two are drawn and their noise fields blended with a random weight
    ``w`` (``sqrt(w) n1 + sqrt(1 - w) n2``: NPS ``w NPS1 + (1 - w) NPS2``, an apodisation between
    the two kernels). Returns the noise and the ratio of the blend's pixel variance to the
    default filter's at the same dose (sharper kernels carry more noise).
    """
    from ..degrade import _unit_fbp_noise, shaped_unit_noise

    if len(filters) == 1:
        f = filters[0]
        k = _unit_fbp_noise(f)[2] / _unit_fbp_noise(_CT_FILTER)[2]
        return shaped_unit_noise(shape, f, rng).astype(np.float32), float(k)
    f1, f2 = (str(v) for v in rng.choice(list(filters), 2))
    w = float(rng.uniform())
    n = math.sqrt(w) * shaped_unit_noise(shape, f1, rng) + math.sqrt(1.0 - w) * shaped_unit_noise(shape, f2, rng)
    k = (w * _unit_fbp_noise(f1)[2] + (1.0 - w) * _unit_fbp_noise(f2)[2]) / _unit_fbp_noise(_CT_FILTER)[2]
    return n.astype(np.float32), float(k)


__all__ = ["ct_noise_variance_maps", "ct_shaped_noise"]
