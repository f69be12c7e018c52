"""Physically plausible degradations of CT and MR images, for training and benchmarks.

Everything here works on plain numpy arrays: a 2-D slice ``(y, x)`` or a 3-D volume
``(z, y, x)`` (treated slice by slice), in physical units (HU for CT). Every random draw comes
from ``numpy.random.default_rng(seed)``, so a result is reproducible from its seed.

* :func:`ct_lowdose_noise` -- low-dose CT noise simulated in the projection domain (line
  integrals, photon counts with Poisson and electronic noise, filtered back-projection) or by a
  fast image-domain approximation with the same noise power spectrum and local level.
* :func:`mr_rician_noise` -- Rician noise: complex Gaussian noise added to the image (or its
  k-space), magnitude taken.
* :func:`gaussian_psf`, :func:`motion_psf`, :func:`blur`, :func:`blur_and_noise` -- spacing-aware
  point spread functions and convolution.
* :func:`degrade` -- one entry point for all of them.

The code lives in :mod:`.ct` (low-dose CT and its physical model), :mod:`.mr` (Rician noise),
:mod:`.psf` (point spread functions and blur) and :mod:`.inputs` (the checks they share); every
public name is importable from ``napari_restore.degrade``.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from ..errors import InputError
from .ct import (DEFAULT_ELECTRONIC_NOISE, DEFAULT_PHOTONS, DEFAULT_TCM, MU_WATER_PER_MM, _FILTERS, _unit_fbp_noise,
                 ct_lowdose_added_noise, ct_lowdose_noise, hu_to_mu, local_noise_sd_map, mu_to_hu, shaped_unit_noise)
from .inputs import Seed, _as_image, _inplane_spacing
from .mr import foreground_mean, mr_rician_noise
from .psf import blur, blur_and_noise, gaussian_psf, motion_psf


# ---------------------------------------------------------------------------- entry point
_KINDS = ("ct_lowdose", "mr_rician", "gaussian_blur", "motion_blur")


def degrade(image: Any, kind: str, *, seed: Seed = None, spacing_mm: Sequence[float] | None = None,
            **params: Any) -> Any:
    """Apply one degradation to a 2-D slice ``(y, x)`` or, slice-wise, to a 3-D volume ``(z, y, x)``.

    Args:
        image: numpy array in physical units, or a :class:`~napari_restore.volume.Volume` (3-D),
            whose spacing is then used and which is returned as a new Volume with a provenance step.
        kind: ``"ct_lowdose"`` (params of :func:`ct_lowdose_noise`: ``dose``, ``photons``,
            ``electronic_noise``, ``method``, ...), ``"mr_rician"`` (``sigma_fraction``,
            ``reference``, ``domain``; the reference is taken over the whole input so that all slices
            share one noise level), ``"gaussian_blur"`` (``fwhm_mm``, ``noise_sd``, ``mode``; in-plane
            unless ``three_d=True``), ``"motion_blur"`` (``length_mm``, ``angle_deg``, ``noise_sd``,
            ``mode``).
        seed: seed or ``numpy.random.Generator``; the same seed gives the same result.
        spacing_mm: pixel spacing in mm, ``(dy, dx)`` or ``(dz, dy, dx)``; needed by every kind but
            ``mr_rician``.

    Returns:
        float32 array of the input's shape (or a Volume when a Volume was given).
    """
    from ..volume import Volume

    volume = image if isinstance(image, Volume) else None
    if volume is not None:
        if volume.array.ndim != 3:
            raise InputError(f"degrade works on 3-D volumes, got shape {volume.array.shape}")
        arr = volume.array
        if spacing_mm is None:
            spacing_mm = volume.spacing
    else:
        arr = _as_image(image)
    if kind not in _KINDS:
        raise InputError(f"unknown degradation kind {kind!r}; expected one of {_KINDS}")
    if kind != "mr_rician" and spacing_mm is None:
        raise InputError(f"degradation {kind!r} needs spacing_mm (pixel spacing in mm)")

    recorded = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in params.items()}
    params = dict(params)
    if kind == "ct_lowdose":
        if "dose" not in params:
            raise InputError("degradation 'ct_lowdose' needs dose (fraction of the full dose, e.g. 0.25)")
        out = ct_lowdose_noise(arr, spacing_mm, seed=seed, **params)
    elif kind == "mr_rician":
        if "sigma_fraction" not in params:
            raise InputError("degradation 'mr_rician' needs sigma_fraction (noise SD / tissue signal)")
        out = mr_rician_noise(arr, seed=seed, **params)
    else:
        noise_sd = params.pop("noise_sd", 0.0)
        mode = params.pop("mode", "reflect")
        if kind == "gaussian_blur":
            if "fwhm_mm" not in params:
                raise InputError("degradation 'gaussian_blur' needs fwhm_mm (PSF width in mm)")
            three_d = bool(params.pop("three_d", False))
            sp = np.asarray(spacing_mm, dtype=np.float64).ravel()
            if three_d:
                if arr.ndim != 3 or sp.size != 3:
                    raise InputError("a 3-D Gaussian PSF needs a 3-D volume and spacing_mm (dz, dy, dx)")
                psf = gaussian_psf(params.pop("fwhm_mm"), sp, **params)
            else:
                fw = np.asarray(params.pop("fwhm_mm"), dtype=np.float64).ravel()
                psf = gaussian_psf(fw[-2:] if fw.size > 1 else fw, _inplane_spacing(sp), **params)
        else:
            if "length_mm" not in params or "angle_deg" not in params:
                raise InputError("degradation 'motion_blur' needs length_mm and angle_deg")
            psf = motion_psf(params.pop("length_mm"), params.pop("angle_deg"), spacing_mm, **params)
        out = blur_and_noise(arr, psf, noise_sd, mode=mode, seed=seed)

    if volume is not None:
        step = {"operation": "degrade", "kind": kind, "seed": seed if isinstance(seed, int) else None,
                "params": recorded}
        return volume.copy_with(out, step)
    return out


__all__ = ["degrade", "ct_lowdose_noise", "ct_lowdose_added_noise", "local_noise_sd_map", "shaped_unit_noise", "hu_to_mu",
           "mu_to_hu", "mr_rician_noise", "foreground_mean", "gaussian_psf", "motion_psf", "blur", "blur_and_noise",
           "Seed", "MU_WATER_PER_MM", "DEFAULT_PHOTONS", "DEFAULT_ELECTRONIC_NOISE", "DEFAULT_TCM", "_FILTERS",
           "_unit_fbp_noise"]
