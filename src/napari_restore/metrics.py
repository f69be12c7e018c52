"""Image-quality metrics: PSNR/SSIM (windowed for CT), ROI statistics, noise and sharpness.

Conventions:

* CT PSNR/SSIM are computed on the image windowed to ``[0, 1]`` (:func:`window`, abdomen
  W400/L50 by default) with ``data_range = 1``: :func:`ct_psnr`, :func:`ct_ssim`.
* SSIM is scikit-image's ``structural_similarity`` with the settings of Wang et al. 2004
  (Gaussian window sigma 1.5, K1 0.01, K2 0.03, population covariance). A 3-D input is scored
  as the mean of its 2-D slice SSIMs (slices are often much thicker than pixels).
* A noise power spectrum (NPS) is in ``unit^2 * mm^2`` (HU^2 mm^2 for CT); integrated over the
  2-D frequency plane (cycles/mm) it gives the noise variance.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError


def _pair(ref: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(ref, dtype=np.float64)
    b = np.asarray(test, dtype=np.float64)
    if a.shape != b.shape:
        raise InputError(f"reference and test images differ in shape: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise InputError("empty images")
    return a, b


def _check_range(data_range: float) -> float:
    r = float(data_range)
    if not (r > 0 and math.isfinite(r)):
        raise InputError(f"data_range must be a positive number (max - min of the image scale), got {data_range!r}")
    return r


def psnr(ref: np.ndarray, test: np.ndarray, data_range: float) -> float:
    """Peak signal-to-noise ratio in dB: ``10 log10(data_range^2 / MSE)``; ``inf`` if identical.

    Args:
        ref, test: images of one shape, same units.
        data_range: the span of the image scale (e.g. 1 for windowed CT, 255 for 8-bit).
    """
    a, b = _pair(ref, test)
    r = _check_range(data_range)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(r * r / mse)


def ssim(ref: np.ndarray, test: np.ndarray, data_range: float) -> float:
    """Structural similarity (scikit-image, Wang et al. 2004 settings); 3-D = mean of slice SSIMs.

    Args:
        ref, test: 2-D ``(y, x)`` or 3-D ``(z, y, x)`` images of one shape, at least 7x7 in-plane.
        data_range: the span of the image scale.
    """
    from skimage.metrics import structural_similarity

    a, b = _pair(ref, test)
    r = _check_range(data_range)
    if a.ndim not in (2, 3) or min(a.shape[-2:]) < 7:
        raise InputError(f"SSIM needs 2-D or 3-D images at least 7x7 in-plane, got shape {a.shape}")
    kw = dict(data_range=r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
    if a.ndim == 2:
        return float(structural_similarity(a, b, **kw))
    return float(np.mean([structural_similarity(x, y, **kw) for x, y in zip(a, b)]))


def window(hu: np.ndarray, width: float = 400.0, level: float = 50.0) -> np.ndarray:
    """Map HU through a display window to ``[0, 1]``: ``level - width/2 -> 0``, ``level + width/2 -> 1``.

    The default W400/L50 is the abdomen soft-tissue window (-150 HU -> 0, 250 HU -> 1).
    """
    if not (float(width) > 0):
        raise InputError(f"window width must be > 0 HU, got {width!r}")
    lo = float(level) - float(width) / 2.0
    return np.clip((np.asarray(hu, dtype=np.float64) - lo) / float(width), 0.0, 1.0)


def ct_psnr(ref_hu: np.ndarray, test_hu: np.ndarray, width: float = 400.0, level: float = 50.0) -> float:
    """PSNR (dB) of two CT images (HU) on the windowed ``[0, 1]`` scale."""
    return psnr(window(ref_hu, width, level), window(test_hu, width, level), 1.0)


def ct_ssim(ref_hu: np.ndarray, test_hu: np.ndarray, width: float = 400.0, level: float = 50.0) -> float:
    """SSIM of two CT images (HU) on the windowed ``[0, 1]`` scale."""
    return ssim(window(ref_hu, width, level), window(test_hu, width, level), 1.0)


def roi_stats(array: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """Mean and sample SD (ddof=1) of ``array`` inside the boolean ``mask`` (same shape)."""
    a = np.asarray(array, dtype=np.float64)
    m = np.asarray(mask, dtype=bool)
    if m.shape != a.shape:
        raise InputError(f"mask shape {m.shape} differs from the image shape {a.shape}")
    vals = a[m]
    if vals.size < 2:
        raise InputError(f"the ROI mask holds {vals.size} pixel(s); at least 2 are needed for an SD")
    return float(vals.mean()), float(vals.std(ddof=1))


def noise_sd_estimate(image: np.ndarray, mask: np.ndarray | None = None, *, method: str = "local",
                      size: int = 5) -> float:
    """Estimate the noise SD of one image (2-D, or 3-D handled slice-wise and pooled), image units.

    Methods:
        ``"local"`` (default): the mode of the histogram of local SDs in ``size x size`` windows
            that lie entirely inside ``mask`` (the "global noise level" of Christianson et al.
            2015, Radiology 275:582, who use a soft-tissue mask, 0-100 HU, for CT). Works for
            spatially correlated noise such as CT noise after FBP. Without a mask, all windows
            whose SD is not exactly 0 (padding, zero background) are used.
        ``"highpass"``: the response to Immerkaer's 3x3 Laplacian-difference kernel (Immerkaer
            1996), scaled by its median absolute value (robust to edges). Only valid for white
            noise: it underestimates correlated CT noise several-fold.

    Args:
        image: ``(y, x)`` or ``(z, y, x)``.
        mask: boolean, image's shape, region of roughly uniform tissue (optional).
        size: local window side in pixels (odd, >= 3) for ``"local"``.
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim not in (2, 3) or min(a.shape[-2:]) < 3:
        raise InputError(f"noise_sd_estimate needs a 2-D or 3-D image at least 3x3 in-plane, got {a.shape}")
    slices = a[None] if a.ndim == 2 else a
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        if m.shape != a.shape:
            raise InputError(f"mask shape {m.shape} differs from the image shape {a.shape}")
        masks = m[None] if a.ndim == 2 else m
    else:
        masks = None
    if method == "highpass":
        k = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float64)
        vals = []
        for z, sl in enumerate(slices):
            r = ndi.convolve(sl, k, mode="reflect")[1:-1, 1:-1]
            if masks is not None:
                r = r[ndi.binary_erosion(masks[z], np.ones((3, 3)))[1:-1, 1:-1]]
            vals.append(r.ravel())
        v = np.concatenate(vals)
        if v.size == 0:
            raise InputError("noise_sd_estimate: the mask leaves no pixel to measure")
        # the kernel has sum of squares 36: its response to white noise has SD 6 sigma; the median
        # absolute deviation (/0.6745 for a Gaussian) keeps edges from inflating the estimate
        return float(np.median(np.abs(v)) / 0.6745 / 6.0)
    if method != "local":
        raise InputError(f"method must be 'local' or 'highpass', got {method!r}")
    if size < 3 or size % 2 == 0:
        raise InputError(f"size must be odd and >= 3, got {size!r}")
    n = size * size
    sds = []
    for z, sl in enumerate(slices):
        mean = ndi.uniform_filter(sl, size, mode="reflect")
        mean2 = ndi.uniform_filter(sl * sl, size, mode="reflect")
        sd = np.sqrt(np.maximum(mean2 - mean * mean, 0.0) * n / (n - 1))
        if masks is not None:
            inside = ndi.binary_erosion(masks[z], np.ones((size, size)), border_value=0)
        else:
            inside = np.zeros(sl.shape, dtype=bool)
            h = size // 2
            inside[h:sl.shape[0] - h, h:sl.shape[1] - h] = True
            inside &= sd > 1e-12 * max(1.0, float(np.abs(sl).max()))
        sds.append(sd[inside])
    v = np.concatenate(sds)
    if v.size < 10:
        raise InputError(f"noise_sd_estimate: only {v.size} windows of {size}x{size} fit inside the mask")
    hi = float(np.percentile(v, 95))
    if hi <= 0:
        return 0.0
    hist, edges = np.histogram(v, bins=200, range=(0.0, hi))
    hist = ndi.gaussian_filter1d(hist.astype(np.float64), 2.0)
    i = int(np.argmax(hist))
    return float(0.5 * (edges[i] + edges[i + 1]))


def flat_tissue(ref_slice: np.ndarray, modality: str = "CT", smooth: float = 4.0,
                erode: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(mask, local mean) of flat tissue in one slice: where the image is its local mean plus noise.

    CT (HU): local mean (Gaussian, ``smooth`` px) -20 to 200 HU (muscle, liver, spleen, kidney,
    brain, phantom inserts) and its gradient below 1.5 HU/px. Other modalities: the foreground
    (local mean above its Otsu threshold) where the local gradient lies in the lowest 30 % of the
    foreground's. The mask is eroded by ``erode`` pixels.
    """
    local = ndi.gaussian_filter(np.asarray(ref_slice, dtype=np.float64), smooth)
    grad = np.hypot(*np.gradient(local))
    if modality == "CT":
        mask = (local > -20) & (local < 200) & (grad < 1.5)
    else:
        from skimage.filters import threshold_otsu

        fg = local > threshold_otsu(local) if np.ptp(local) > 0 else np.zeros(local.shape, bool)
        mask = fg & (grad < np.percentile(grad[fg], 30)) if fg.any() else fg
    return ndi.binary_erosion(mask, iterations=erode), local


def uniform_inserts(slice_hu: np.ndarray, lo: float = -20.0, hi: float = 300.0, max_sd: float = 5.0
                    ) -> list[tuple[np.ndarray, tuple[float, float], float]]:
    """Uniform inserts of a CT phantom slice (HU): ``(inner mask, centre (y, x) px, radius px)``.

    Connected regions between ``lo`` and ``hi`` HU of 600-20000 pixels whose interior (eroded by
    4 pixels) has an SD below ``max_sd`` HU; the radius is that of a disk of the region's area.
    """
    m = ndi.binary_opening((slice_hu > lo) & (slice_hu < hi), iterations=3)
    lab, n = ndi.label(m)
    out = []
    for i in range(1, n + 1):
        r = lab == i
        area = int(r.sum())
        inner = ndi.binary_erosion(r, iterations=4)
        if 600 < area < 20000 and inner.any() and slice_hu[inner].std() < max_sd:
            cy, cx = ndi.center_of_mass(r)
            out.append((inner, (cy, cx), float(np.sqrt(area / np.pi))))
    return out


def edge_rise_distance(profile: np.ndarray, spacing: float, *, plateau: float = 0.1) -> float:
    """10-90% rise distance (mm) of an edge profile.

    The low and high levels are the means of the first and last ``plateau`` fraction of the samples
    (the profile may rise or fall); the 10% and 90% crossings are located by linear interpolation,
    searching outwards from the 50% crossing, so noise far from the edge is ignored.

    Args:
        profile: 1-D samples across the edge.
        spacing: sample distance in mm.
    """
    p = np.asarray(profile, dtype=np.float64).ravel()
    if p.size < 5 or not np.all(np.isfinite(p)):
        raise InputError(f"edge profile must hold at least 5 finite samples, got {p.size}")
    if not (float(spacing) > 0):
        raise InputError(f"spacing must be > 0 mm, got {spacing!r}")
    k = max(1, int(round(plateau * p.size)))
    lo, hi = p[:k].mean(), p[-k:].mean()
    if hi == lo:
        raise InputError("edge profile has no edge: both ends have the same level")
    u = (p - lo) / (hi - lo)  # rising from 0 to 1

    def crossing(level: float, start: int, step: int) -> float:
        i = start
        while 0 <= i + step < u.size and 0 <= i < u.size:
            j = i + step
            if (u[i] - level) * (u[j] - level) <= 0 and u[i] != u[j]:
                return i + (level - u[i]) / (u[j] - u[i]) * step
            i = j
        raise InputError(f"edge profile never crosses {level:.0%} of the edge height")

    i50 = int(np.argmin(np.abs(u - 0.5)))
    x10 = crossing(0.1, i50, -1) if u[i50] >= 0.1 else crossing(0.1, i50, 1)
    x90 = crossing(0.9, i50, 1) if u[i50] <= 0.9 else crossing(0.9, i50, -1)
    return float(abs(x90 - x10) * float(spacing))


#: Gaussian derivative scales (pixels) of :func:`edge_width_fwhm`.
EDGE_SCALES = (0.7, 1.6)


def edge_width_fwhm(image: np.ndarray, noise_sd: float, *, min_points: int = 100,
                    strength: float = 10.0) -> float | None:
    """Blind estimate of an image's edge spread: the FWHM (in-plane pixels) of a Gaussian blur.

    A blurred step edge of height ``h`` and spread ``s`` has a gradient peak of ``h / sqrt(2 pi
    (s^2 + t^2))`` through a Gaussian derivative of scale ``t``. The ratio ``r`` of the peaks at the two
    scales :data:`EDGE_SCALES` (``t1 < t2``) does not depend on ``h``: ``s^2 = (t2^2 - r^2 t1^2) /
    (r^2 - 1)``. It is taken at the ridge of the coarse gradient (local maxima) wherever both gradients
    are at least ``strength`` times their noise SD (white noise of SD ``noise_sd`` through the
    derivative filter), and the median over all those points is reported as ``2.355 s``.

    The spread is the whole edge's: the scan's own kernel (a smooth kernel reads wider) plus any
    blur added later; a very sharp kernel (edge overshoot) reads 0. Thin structures read a little
    sharper than isolated steps.

    Args:
        image: ``(y, x)`` or ``(z, y, x)`` (slices pooled), physical units.
        noise_sd: the image's noise SD in the same units (e.g. :func:`noise_sd_estimate`).
        min_points: fewer qualifying edge points than this gives ``None`` (too few strong edges).
        strength: how many noise SDs an edge's gradient must exceed.
    """
    a = np.asarray(image, dtype=np.float64)
    if a.ndim not in (2, 3) or min(a.shape[-2:]) < 8:
        raise InputError(f"edge_width_fwhm needs a 2-D or 3-D image at least 8x8 in-plane, got {a.shape}")
    t1, t2 = EDGE_SCALES
    noise = max(float(noise_sd), 1e-6 * float(np.ptp(a)) or 1e-12)
    n1, n2 = (noise / (math.sqrt(8 * math.pi) * t * t) for t in (t1, t2))
    ratios = []
    for img in (a[None] if a.ndim == 2 else a):
        g1 = ndi.gaussian_gradient_magnitude(img, t1)
        g2 = ndi.gaussian_gradient_magnitude(img, t2)
        ridge = (g2 == ndi.maximum_filter(g2, 3)) & (g1 > strength * n1) & (g2 > strength * n2)
        ratios.append(g1[ridge] / g2[ridge])
    r = np.concatenate(ratios)
    if r.size < min_points:
        return None
    r = np.clip(r, 1.0 + 1e-4, None)
    spread2 = float(np.median((t2 * t2 - r * r * t1 * t1) / (r * r - 1.0)))
    return 2.3548 * math.sqrt(max(spread2, 0.0))


def noise_power_spectrum(noise: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """2-D noise power spectrum of noise-only ROIs (``unit^2 mm^2``), DC at index ``[0, 0]``.

    ``NPS(f) = dy*dx / (Ny*Nx) * < |FFT(roi - mean(roi))|^2 >`` averaged over the ROIs; its sum
    times ``df_y * df_x`` (``1/(Ny dy) * 1/(Nx dx)``) is the noise variance. Frequencies are
    ``numpy.fft.fftfreq(N, d)`` in cycles/mm.

    Args:
        noise: one ROI ``(y, x)`` or a stack ``(n, y, x)`` of equally sized ROIs of pure noise.
        spacing_mm: ``(dy, dx)`` in mm.
    """
    a = np.asarray(noise, dtype=np.float64)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3 or min(a.shape[-2:]) < 4:
        raise InputError(f"NPS needs ROIs (y, x) or a stack (n, y, x), at least 4x4, got {np.shape(noise)}")
    dy, dx = (float(s) for s in np.asarray(spacing_mm, dtype=np.float64).ravel()[-2:])
    a = a - a.mean(axis=(-2, -1), keepdims=True)
    ny, nx = a.shape[-2:]
    spec = np.abs(np.fft.fft2(a)) ** 2
    return spec.mean(axis=0) * dy * dx / (ny * nx)


def radial_average(nps2d: np.ndarray, spacing_mm: Sequence[float], n_bins: int | None = None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Radial average of a 2-D NPS laid out as :func:`noise_power_spectrum` returns it.

    Returns:
        (f, nps): bin centres in cycles/mm and the mean NPS in each annulus (bins of the coarser
        frequency step; empty bins are dropped).
    """
    ny, nx = nps2d.shape
    dy, dx = (float(s) for s in np.asarray(spacing_mm, dtype=np.float64).ravel()[-2:])
    fr = np.hypot(np.fft.fftfreq(ny, dy)[:, None], np.fft.fftfreq(nx, dx)[None, :])
    step = max(1.0 / (ny * dy), 1.0 / (nx * dx))
    if n_bins is None:
        n_bins = int(np.ceil(fr.max() / step)) + 1
    idx = np.minimum(np.round(fr / step).astype(int), n_bins - 1)
    sums = np.bincount(idx.ravel(), weights=nps2d.ravel(), minlength=n_bins)
    counts = np.bincount(idx.ravel(), minlength=n_bins)
    keep = counts > 0
    return (np.arange(n_bins) * step)[keep], sums[keep] / counts[keep]
