"""Cleaner training targets: the scans' own noise taken out of what the network learns to return.

A full-dose scan carries its own noise. Trained on ``scan + added noise -> scan``, a denoiser
learns to keep whatever noise the scan had: the best guess of the noisy target keeps a share of
all noise that looks like the scan's own, and the lower the added noise the larger that share.
On a smooth (nearly noise-free) scan it then removes little of the noise it is given, and on a
real scan at its native noise almost nothing. :func:`denoised_targets` gives each training series
a target array from which its own noise is removed by non-local means (scikit-image; per slice,
``h`` a multiple of the slice's measured noise SD), so the network learns ``scan + added noise
-> scan without its own noise``: it removes the native noise as well.

Measured (issue 18, docs/models.md): it also learns what non-local means takes away with the noise,
the contrast of small faint objects (a 3 mm, 3-14 HU disk kept 6 % of its contrast at 25 % dose
against 38 % for the model it started from). Interpolating the fine-tune's weights with the
starting model's (``scripts/interpolate_weights.py``, a quarter of the fine-tune) kept more of
the low contrast (still less than the starting model) and half of the native-noise removal.
"""
from __future__ import annotations

import dataclasses
import hashlib
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import InputError
from .series import SeriesData

#: bump when the cleaning changes (cache key)
_VERSION = 1


def slice_noise_sd(rec: SeriesData, plane: np.ndarray) -> float | None:
    """The noise SD of one normalised plane in network units, measured as the guard does
    (:func:`napari_restore.guard.tissue_noise`); ``None`` when there is too little tissue."""
    from ..guard import tissue_noise

    sd, _ = tissue_noise(rec.physical(np.asarray(plane, dtype=np.float32)), rec.modality)
    return None if sd is None else sd / float(rec.scale)


def _clean_array(rec: SeriesData, h_factor: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    arr = np.asarray(rec.array, dtype=np.float32)
    out = np.array(arr, copy=True)
    sds = [slice_noise_sd(rec, arr[z]) for z in range(arr.shape[0])]
    known = [s for s in sds if s]
    fallback = float(np.median(known)) if known else None
    for z in range(arr.shape[0]):
        sd = sds[z] or fallback
        if not sd:
            continue
        out[z] = denoise_nl_means(arr[z], patch_size=5, patch_distance=6, h=h_factor * sd, sigma=sd,
                                  fast_mode=True, preserve_range=True)
    return out


def denoised_targets(series: Sequence[SeriesData], h_factor: float, cache_dir: str | Path | None = None,
                     ) -> list[SeriesData]:
    """``series`` with ``target`` set: each slice with its own noise removed (NLM, ``h = h_factor x SD``).

    ``h_factor``: NLM strength as a multiple of each slice's measured noise SD (0.6-1.0 is gentle
    to moderate). Cached as ``.npy`` in ``cache_dir`` (keyed by series, factor and version).
    """
    if not h_factor > 0:
        raise InputError(f"target denoising needs h_factor > 0, got {h_factor!r}")
    out = []
    for rec in series:
        path = None
        if cache_dir is not None:
            sample = np.ascontiguousarray(rec.array[:: max(1, rec.array.shape[0] // 4)]).tobytes()[: 1 << 22]
            digest = hashlib.sha1(f"{rec.key}|{rec.array.shape}|{rec.offset}|{rec.scale}|{h_factor}|{_VERSION}|"
                                  .encode() + sample).hexdigest()[:16]
            path = Path(cache_dir) / f"target-nlm-{digest}.npy"
        target = None
        if path is not None and path.is_file():
            try:
                target = np.load(path, mmap_mode="r")
                if target.shape != rec.array.shape:
                    target = None
            except (OSError, ValueError) as exc:
                warnings.warn(f"ignoring a broken cache entry {path}: {exc}", RuntimeWarning, stacklevel=2)
        if target is None:
            target = _clean_array(rec, float(h_factor))
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".tmp.npy")
                np.save(tmp, target)
                tmp.replace(path)
        out.append(dataclasses.replace(rec, target=target, _ct_maps=rec._ct_maps))
    return out


__all__ = ["denoised_targets", "slice_noise_sd"]
