"""Training samples: degradations and the patch datasets drawn from :class:`~.series.SeriesData`.

- :class:`Degradation` degrades a clean patch (CT low dose with FBP-shaped noise, MR Rician noise,
  Gaussian blur), its parameters drawn per sample.
- :class:`PatchDataset` draws 2-D slice patches ``(1, H, W)`` or 3-D patches ``(1, D, H, W)``
  with those degradations, flips, 90-degree rotations and intensity jitter (:func:`augment`).
  Every sample is a pure function of ``(seed, epoch, index)``, so a resumed or multi-process run
  draws exactly the same data.
- :func:`validation_set` is the fixed set of validation pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi

from ..errors import InputError
from ..networks import mirror_indices
from .ct_noise import _CT_FILTER, ct_shaped_noise
from .series import SeriesData


# ---------------------------------------------------------------------------- sampling helpers
def _resize(arr: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Linear resampling of the last two axes of ``arr`` to ``shape`` (a no-op at the same size)."""
    shape = tuple(int(v) for v in shape)
    if tuple(arr.shape[-2:]) == shape:
        return arr
    f = (1.0,) * (arr.ndim - 2) + (shape[0] / arr.shape[-2], shape[1] / arr.shape[-1])
    out = ndi.zoom(arr, f, order=1, mode="nearest", grid_mode=True)
    return np.asarray(out[..., : shape[0], : shape[1]], dtype=np.float32)


def _crop(arr: np.ndarray, starts: Sequence[int], sizes: Sequence[int]) -> np.ndarray:
    """A (reflect-extended) crop of ``arr`` of ``sizes`` starting at ``starts`` (any may be out of range)."""
    idx = np.ix_(*[mirror_indices(s, n, dim) for s, n, dim in zip(starts, sizes, arr.shape)])
    return np.asarray(arr[idx], dtype=np.float32)


@dataclass
class Degradation:
    """What a supervised sample is degraded with (``kind``: ``ct_lowdose``, ``mr_rician``, ``gaussian_blur``)."""

    kind: str
    dose_range: tuple[float, float] = (0.1, 0.5)
    rician_range: tuple[float, float] = (0.02, 0.10)
    fwhm_range: tuple[float, float] = (1.0, 3.0)
    blur_noise: float = 0.0
    ct_method: str = "image"
    noise_hu_range: tuple[float, float] | None = None  # CT: median body noise SD (HU) instead of a dose
    ct_filters: tuple[str, ...] = (_CT_FILTER,)  # CT: FBP filters drawn (two blended) per sample
    ct_pixel_range: tuple[float, float] | None = None  # CT: in-plane pixel size (mm) resampled to
    log_draw: bool = False  # draw the dose / noise level log-uniformly (as many mild as strong)
    clean_fraction: float = 0.0  # share of samples left undegraded (do no harm on clean input)
    blur_noise_range: tuple[float, float] | None = None  # deblur: noise SD / the series' 1-99 % range
    blur_anisotropy: float = 1.0  # deblur: largest ratio of the two in-plane FWHMs
    blur_tail: float = 0.0  # deblur: largest weight of a second Gaussian twice as wide (non-Gaussian PSF)
    zoom_range: tuple[float, float] | None = None  # deblur: output pixels per source pixel, drawn per sample

    def _level(self, lo: float, hi: float, rng: np.random.Generator) -> float:
        if self.log_draw and lo > 0:
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return float(rng.uniform(lo, hi))

    def zoom_factor(self, rec: "SeriesData", rng: np.random.Generator) -> float:
        """Output pixels per source pixel for one sample (1 = native; within 0.4-2.5).

        CT denoising: to an in-plane pixel size drawn from ``ct_pixel_range`` (mm); deblurring: a
        factor drawn from ``zoom_range`` (below 1: coarser pixels, so sharper detail per pixel than
        the source scans have, as a sharp kernel's scan has)."""
        if self.kind == "gaussian_blur" and self.zoom_range is not None:
            return float(np.clip(rng.uniform(*self.zoom_range), 0.4, 2.5))
        if self.kind != "ct_lowdose" or self.ct_pixel_range is None:
            return 1.0
        target = float(rng.uniform(*self.ct_pixel_range))
        return float(np.clip(rec.spacing[2] / target, 0.4, 2.5))

    def uses_ct_maps(self) -> bool:
        """Whether :meth:`apply` reads the per-slice CT noise maps (:meth:`SeriesData.ct_maps`)."""
        return self.kind == "ct_lowdose" and (self.noise_hu_range is not None or self.ct_method != "projection")

    def margin(self) -> int:
        if self.kind == "gaussian_blur":
            widest = self.fwhm_range[1] * math.sqrt(self.blur_anisotropy) * (2.0 if self.blur_tail > 0 else 1.0)
            return int(math.ceil(4.0 * widest / 2.3548)) + 1
        return 0

    def blur(self, rec: SeriesData, clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[str, float]]:
        """In-plane blur of ``clean`` (``(y, x)`` or ``(c, y, x)``) with a drawn PSF, then white noise.

        The PSF: a Gaussian of FWHM drawn from ``fwhm_range`` (voxels), its two axes stretched by
        up to ``blur_anisotropy`` in ratio, plus up to ``blur_tail`` of a Gaussian twice as wide.
        The noise SD: ``blur_noise`` (network units), or drawn from ``blur_noise_range`` as a
        fraction of the series' 1-99 % range (:meth:`SeriesData.value_range`).
        """
        fwhm = float(rng.uniform(*self.fwhm_range))
        ratio = math.exp(rng.uniform(-1.0, 1.0) * math.log(self.blur_anisotropy)) if self.blur_anisotropy > 1 else 1.0
        sy, sx = fwhm * math.sqrt(ratio) / 2.3548, fwhm / math.sqrt(ratio) / 2.3548
        lead = (0.0,) * (clean.ndim - 2)
        out = ndi.gaussian_filter(clean, lead + (sy, sx), mode="reflect", truncate=4.0).astype(np.float32)
        tail = float(rng.uniform(0.0, self.blur_tail)) if self.blur_tail > 0 else 0.0
        if tail > 0:
            wide = ndi.gaussian_filter(clean, lead + (2 * sy, 2 * sx), mode="reflect", truncate=4.0)
            out = ((1.0 - tail) * out + tail * wide).astype(np.float32)
        params = {"fwhm": fwhm, "anisotropy": ratio, "tail": tail}
        if self.blur_noise_range is not None:
            frac = self._level(*self.blur_noise_range, rng)
            sd = frac * rec.value_range()
            params["noise_fraction"] = frac
        else:
            sd = self.blur_noise
        if sd > 0:
            out += (sd * rng.standard_normal(out.shape)).astype(np.float32)
        return out, params

    def apply(self, rec: SeriesData, clean: np.ndarray, z0: int, starts: Sequence[int],
              rng: np.random.Generator, zs: Sequence[int] | None = None,
              src_shape: Sequence[int] | None = None) -> tuple[np.ndarray, dict[str, float]]:
        """Degrade a normalised crop ``clean`` (``(y, x)`` or ``(z, y, x)``) of ``rec``; returns (input, params).

        ``clean``'s planes are slices ``z0, z0 + 1, ...`` of ``rec`` or, given, ``zs``; every plane
        gets its own noise at one drawn level. ``src_shape``: the in-plane size of the source crop
        when ``clean`` was resampled from it (CT pixel-size draws); the noise maps follow it.
        """
        if self.clean_fraction > 0 and rng.uniform() < self.clean_fraction:
            return clean.copy(), {"clean": 1.0}
        if self.kind == "ct_lowdose":
            if self.noise_hu_range is not None:
                level = self._level(*self.noise_hu_range, rng)
                params = {"noise_hu": level}
            else:
                dose = self._level(*self.dose_range, rng)
                params = {"dose": dose}
            shape2 = clean.shape[-2:]
            src2 = tuple(int(v) for v in (src_shape or shape2))
            zoom = shape2[0] / src2[0]
            out = np.empty_like(clean)
            planes = clean if clean.ndim == 3 else clean[None]
            outs = out if out.ndim == 3 else out[None]
            for k, plane in enumerate(planes):
                z = int(zs[k]) if zs is not None else int(mirror_indices(z0 + k, 1, rec.array.shape[0])[0])
                hu = rec.physical(plane)
                if self.noise_hu_range is None and self.ct_method == "projection":
                    # FBP of the whole slice (~1-4 s), then the crop
                    from ..degrade import ct_lowdose_added_noise

                    full = rec.physical(np.asarray(rec.array[z], dtype=np.float32))
                    noise = _crop(ct_lowdose_added_noise(full, rec.spacing, dose, seed=rng), starts, src2)
                    noise = _resize(noise, shape2)
                else:
                    vp, ve = rec.ct_maps(z)
                    vpc = _resize(_crop(vp, starts, src2), shape2)
                    unit, kappa = ct_shaped_noise(plane.shape, rng, self.ct_filters)
                    if self.noise_hu_range is not None:  # the model's spatial variation, scaled to the drawn level
                        sd = np.sqrt(vpc) * np.float32(level / rec.ct_median_sd(z))
                    else:  # FBP noise variance ~ kernel variance / pixel size^3 at one dose
                        vec = _resize(_crop(ve, starts, src2), shape2)
                        sd = np.sqrt(((1.0 / dose - 1.0) * vpc + (1.0 / dose**2 - 1.0) * vec) * kappa * zoom**3)
                    noise = unit * sd
                outs[k] = rec.normalised(hu + noise)
            return out, params
        if self.kind == "mr_rician":
            frac = float(rng.uniform(*self.rician_range))
            sigma = frac * rec.reference
            phys = rec.physical(clean).astype(np.float64)
            noisy = np.abs(phys + sigma * (rng.standard_normal(phys.shape) + 1j * rng.standard_normal(phys.shape)))
            return rec.normalised(noisy.astype(np.float32)), {"sigma_fraction": frac}
        if self.kind == "gaussian_blur":
            return self.blur(rec, clean, rng)
        raise InputError(f"unknown degradation {self.kind!r}")


#: Faint disks inserted into CT training patches (:func:`faint_disks`): diameters (mm), contrasts
#: (|HU|, log-uniform, either sign) and how many per patch.
DISK_DIAMETER_MM = (2.0, 12.0)
DISK_CONTRAST_HU = (2.0, 30.0)
DISK_COUNT = (1, 4)


def faint_disks(shape: Sequence[int], pixel_mm: float, scale: float, rng: np.random.Generator) -> np.ndarray:
    """``(y, x)`` float32: a few faint disks (lesions' stand-ins), in network units (HU / ``scale``).

    Each disk: a diameter from :data:`DISK_DIAMETER_MM` (``pixel_mm`` mm per pixel), a contrast
    from :data:`DISK_CONTRAST_HU` (log-uniform, either sign), a one-pixel linear edge (the
    share of each pixel the disk covers, about), anywhere in the patch. Added to the clean patch
    before the noise and to its target, on every slice a 2.5-D sample reads (a lesion spans the
    neighbouring slices), they teach the network that faint round structure seen on each slice
    is signal, which noise (new on each slice) is not.
    """
    ny, nx = int(shape[0]), int(shape[1])
    yy, xx = np.mgrid[0:ny, 0:nx].astype(np.float32)
    out = np.zeros((ny, nx), dtype=np.float32)
    lo, hi = (math.log(v) for v in DISK_CONTRAST_HU)
    for _ in range(int(rng.integers(DISK_COUNT[0], DISK_COUNT[1] + 1))):
        r = 0.5 * float(rng.uniform(*DISK_DIAMETER_MM)) / float(pixel_mm)
        c = math.exp(rng.uniform(lo, hi)) * (1.0 if rng.random() < 0.5 else -1.0)
        cy, cx = float(rng.uniform(0, ny)), float(rng.uniform(0, nx))
        d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        out += np.float32(c / scale) * np.clip(r + 0.5 - d, 0.0, 1.0)
    return out


def augment(arrays: list[np.ndarray], rng: np.random.Generator, jitter: float,
            geometric: Sequence[np.ndarray] = ()) -> list[np.ndarray]:
    """Same random flips, in-plane 90-degree rotation and intensity jitter for every array;
    the arrays of ``geometric`` (loss weights) get the flips and rotation only, and follow in the result."""
    nd = arrays[0].ndim
    k = int(rng.integers(4))
    flips = [ax for ax in range(nd) if rng.random() < 0.5]
    a = float(rng.uniform(1.0 - jitter, 1.0 + jitter)) if jitter > 0 else 1.0
    b = float(rng.uniform(-jitter, jitter)) * 0.5 if jitter > 0 else 0.0
    out = []
    for i, x in enumerate([*arrays, *geometric]):
        x = np.rot90(x, k, axes=(nd - 2, nd - 1))
        if flips:
            x = np.flip(x, axis=flips)
        # arithmetic or a copy: a new array (np.ascontiguousarray keeps a flipped length-1 axis' negative stride)
        x = x * np.float32(a) + np.float32(b) if i < len(arrays) else x.copy()
        out.append(np.ascontiguousarray(x, dtype=np.float32))
    return out


class PatchDataset(torch.utils.data.Dataset):
    """Random patches for one epoch: ``{"input": (C, *patch), "target": (1, *patch)}`` float32.

    Args:
        series: training series (for ``paired``: the low-dose side, aligned with ``targets``).
        patch_size: ``(H, W)`` (2-D slices) or ``(D, H, W)`` (3-D).
        length: samples per epoch.
        degradation: synthetic degradation (supervised) or ``None`` (paired: input is the
            low-dose crop; self-supervised: input and target are the same noisy crop).
        targets: paired mode only: the matched full-dose series.
        augment, jitter: flips / 90-degree rotations / intensity jitter.
        seed: with :meth:`set_epoch`, fixes every sample.
        context: 2-D only: neighbouring slices on each side as extra input channels
            (``C = 2 * context + 1``, mirrored at the series' ends; each slice its own noise).
        single_slice_fraction: with ``context``, the share of samples whose neighbours are the
            slice itself with the same noise, as a single-slice series is given to a 2.5-D model.
        disk_fraction: CT, 2-D patches: the share of samples given :func:`faint_disks` (in the
            clean patch before the noise, and in the target).
        disk_weight: with ``disk_fraction``, the loss weight of the disks' pixels (the others
            weigh 1); other than 1, every item also holds ``"weight"`` ``(1, *patch)``.
        smooth_fraction, smooth_sigma: 2-D patches: the share of samples whose clean planes
            are smoothed in-plane by a Gaussian of SD drawn from ``smooth_sigma`` (pixels) before
            the noise (and any disks: they stay sharp), the target with them.

    Series are drawn in proportion to their number of slices.
    """

    def __init__(self, series: list[SeriesData], patch_size: Sequence[int], length: int,
                 degradation: Degradation | None = None, targets: list[SeriesData] | None = None,
                 augment: bool = True, jitter: float = 0.0, seed: int = 0, context: int = 0,
                 single_slice_fraction: float = 0.0, disk_fraction: float = 0.0, disk_weight: float = 1.0,
                 smooth_fraction: float = 0.0, smooth_sigma: tuple[float, float] = (0.5, 2.0)):
        self.series, self.targets = series, targets
        self.smooth_fraction, self.smooth_sigma = float(smooth_fraction), tuple(float(v) for v in smooth_sigma)
        self.disk_fraction = float(disk_fraction)
        self.disk_weight = float(disk_weight)
        self.context = int(context)
        self.single_slice_fraction = float(single_slice_fraction)
        self.patch = tuple(int(p) for p in patch_size)
        self.length, self.degradation = int(length), degradation
        self.do_augment, self.jitter, self.seed = augment, float(jitter), int(seed)
        # shared memory: persistent DataLoader workers see set_epoch() (and keep their CT noise maps)
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()
        w = np.array([s.array.shape[0] for s in series], dtype=np.float64)
        self.weights = w / w.sum()

    @property
    def epoch(self) -> int:
        return int(self._epoch[0])

    def set_epoch(self, epoch: int) -> None:
        self._epoch[0] = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.epoch, int(index)])
        r = int(rng.choice(len(self.series), p=self.weights))
        rec = self.series[r]
        nz, ny, nx = rec.array.shape
        deg = self.degradation
        m = deg.margin() if deg is not None else 0
        planes = None
        src_shape = None
        disks = None
        smoothed = False
        if len(self.patch) == 2:
            z0 = int(rng.integers(nz))
            ph, pw = self.patch
            zoom = deg.zoom_factor(rec, rng) if deg is not None and self.targets is None else 1.0
            sizes = (ph + 2 * m, pw + 2 * m)
            src = tuple(max(8, int(round(v / zoom))) for v in sizes) if zoom != 1.0 else sizes
            span = src if zoom != 1.0 else (ph, pw)
            y0, x0 = int(rng.integers(max(ny - span[0], 0) + 1)), int(rng.integers(max(nx - span[1], 0) + 1))
            starts = (y0, x0) if zoom != 1.0 else (y0 - m, x0 - m)
            if self.context and self.single_slice_fraction > 0 and rng.uniform() < self.single_slice_fraction:
                planes, which = np.array([z0]), np.zeros(2 * self.context + 1, dtype=np.intp)
            else:
                planes, which = np.unique(mirror_indices(z0 - self.context, 2 * self.context + 1, nz), return_inverse=True)
            clean = np.stack([_resize(_crop(rec.array[z], starts, src), sizes) for z in planes])
            src_shape = src if zoom != 1.0 else None
            smoothed = self.smooth_fraction > 0 and rng.uniform() < self.smooth_fraction
            if smoothed:
                sd = float(rng.uniform(*self.smooth_sigma))
                clean = ndi.gaussian_filter(clean, (0.0, sd, sd), mode="reflect").astype(np.float32)
            if self.disk_fraction > 0 and rng.uniform() < self.disk_fraction:
                disks = faint_disks(sizes, rec.spacing[2] / zoom, float(rec.scale), rng)
                clean = clean + disks
            inner = (slice(None), slice(m, m + ph), slice(m, m + pw))
        else:
            pd_, ph, pw = self.patch
            z0 = int(rng.integers(max(nz - pd_, 0) + 1))
            y0, x0 = int(rng.integers(max(ny - ph, 0) + 1)), int(rng.integers(max(nx - pw, 0) + 1))
            starts, sizes = (y0 - m, x0 - m), (ph + 2 * m, pw + 2 * m)
            clean = _crop(rec.array, (z0, *starts), (pd_, *sizes))
            inner = (slice(None), slice(m, m + ph), slice(m, m + pw))
        if self.targets is not None:  # paired
            tgt = self.targets[r]
            if planes is not None:
                target = _crop(tgt.array[z0], starts, sizes)[None]
            else:
                target = _crop(tgt.array, (z0, *starts), (self.patch[0], *sizes))
            inp = clean
        elif deg is not None:
            inp, _ = deg.apply(rec, clean, z0, starts, rng, zs=planes, src_shape=src_shape)
            target = clean
            if rec.target is not None:  # the scan without its own noise
                target = (np.stack([_resize(_crop(rec.target[z], starts, src), sizes) for z in planes])
                          if planes is not None else _crop(rec.target, (z0, *starts), (pd_, *sizes)))
                if planes is not None and smoothed:
                    target = ndi.gaussian_filter(target, (0.0, sd, sd), mode="reflect").astype(np.float32)
                if disks is not None:
                    target = target + disks
        else:  # self-supervised
            inp = target = clean
        if planes is not None:  # (C, y, x) input, centre-slice target
            inp = inp[which]
            target = target[[int(np.searchsorted(planes, z0))]] if target.shape[0] == len(planes) else target
        inp, target = inp[inner], target[inner]
        weight = self._loss_weight(disks, target.shape, inner) if self.disk_fraction > 0 and self.disk_weight != 1.0 else None
        if self.do_augment:
            inp, target, *rest = augment([inp, target], rng, self.jitter, [] if weight is None else [weight])
            weight = rest[0] if rest else None
        if planes is None:
            inp, target = inp[None], target[None]
        item = {"input": torch.from_numpy(np.ascontiguousarray(inp)),
                "target": torch.from_numpy(np.ascontiguousarray(target))}
        if weight is not None:
            item["weight"] = torch.from_numpy(np.ascontiguousarray(weight))
        return item

    def _loss_weight(self, disks: np.ndarray | None, shape: tuple[int, ...], inner: tuple[slice, ...]) -> np.ndarray:
        """``shape`` float32: ``disk_weight`` where a disk covers the pixel, 1 elsewhere."""
        weight = np.ones(shape, dtype=np.float32)
        if disks is not None:
            weight[:, disks[inner[1:]] != 0] = np.float32(self.disk_weight)
        return weight


def validation_set(series: list[SeriesData], patch_size: Sequence[int], n_per_series: int, crop: int,
                   degradation: Degradation | None, targets: list[SeriesData] | None = None,
                   seed: int = 0, context: int = 0) -> list[dict[str, Any]]:
    """Fixed validation items ``{"input", "target", "series"}``, the same every epoch.

    2-D: up to ``n_per_series`` slices evenly spaced over the middle 80 %, centre-cropped to ``crop`` (0 = whole);
    input ``(2 * context + 1, y, x)`` (the slice and its neighbours), target ``(1, y, x)``.
    3-D: patches of ``patch_size`` at evenly spaced depths, input and target ``(1, z, y, x)``.
    Degradations use fixed seeds.
    """
    items = []
    for r, rec in enumerate(series):
        nz, ny, nx = rec.array.shape
        three_d = len(patch_size) == 3
        depth = int(patch_size[0]) if three_d else 1
        n = max(1, min(n_per_series, nz if not three_d else max(1, nz // max(depth, 1))))
        top = max(nz - depth, 0)  # evenly spaced over the middle 80 % (the ends are often empty)
        zs = (np.array([top / 2]) if n == 1 else np.linspace(0.1 * top, 0.9 * top, n))
        zs = np.unique(zs.round().astype(int))
        cy = min(ny, crop) if crop else ny
        cx = min(nx, crop) if crop else nx
        if three_d:
            cy, cx = min(ny, int(patch_size[1])), min(nx, int(patch_size[2]))
        y0, x0 = (ny - cy) // 2, (nx - cx) // 2
        m = degradation.margin() if degradation is not None and targets is None else 0
        for k, z in enumerate(zs):
            z = int(z)
            rng = np.random.default_rng([seed, 7919, r, k])
            if three_d:
                planes, which, centre = None, slice(None), slice(None)
                big = _crop(rec.array, (z, y0 - m, x0 - m), (depth, cy + 2 * m, cx + 2 * m))
            else:
                planes, which = np.unique(mirror_indices(z - context, 2 * context + 1, nz), return_inverse=True)
                centre = [int(np.searchsorted(planes, z))]
                big = np.stack([_crop(rec.array[p], (y0 - m, x0 - m), (cy + 2 * m, cx + 2 * m)) for p in planes])
            clean = big[..., m:m + cy, m:m + cx]
            if targets is not None:
                tgt = targets[r]
                target = _crop(tgt.array, (z, y0, x0), (depth, cy, cx)) if three_d else _crop(tgt.array[z], (y0, x0), (cy, cx))[None]
                inp = clean[which]
            elif degradation is not None:
                inp, _ = degradation.apply(rec, big, z, (y0 - m, x0 - m), rng, zs=planes)
                inp, target = inp[..., m:m + cy, m:m + cx][which], clean[centre]
                if rec.target is not None:  # the scan without its own noise
                    target = (_crop(rec.target, (z, y0, x0), (depth, cy, cx)) if three_d
                              else _crop(rec.target[z], (y0, x0), (cy, cx))[None])
            else:
                inp, target = clean[which], clean[centre]
            if three_d:
                inp, target = inp[None], target[None]
            items.append({"input": np.ascontiguousarray(inp, dtype=np.float32),
                          "target": np.ascontiguousarray(target, dtype=np.float32), "series": rec})
    return items


__all__ = ["PatchDataset", "Degradation", "validation_set", "augment", "faint_disks"]
