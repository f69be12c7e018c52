"""Training data: discovery, caching, patient-wise split, position-matched pairs, patch datasets.

- Scans are read with :func:`napari_restore.load` (DICOM folders, NIfTI, MHA/NRRD), one
  :class:`SeriesData` per image series, intensities normalised with the model card's mapping
  (:mod:`napari_restore.intensity`). Decoded volumes can be cached as normalised float32 ``.npy``
  in a cache folder, keyed by the source path and the modification times of its files.
- :func:`split_series` splits by patient (DICOM PatientID; the source file for NIfTI), so slices
  of one series never land on both sides.
- :func:`match_pairs` matches low-dose to full-dose series by geometry, then slices by their
  position along the slice normal (the projection of ImagePositionPatient).
- :class:`PatchDataset` draws 2-D slice patches ``(1, H, W)`` or 3-D patches ``(1, D, H, W)``
  with synthetic degradations drawn per sample (CT dose, MR Rician sigma, Gaussian blur FWHM),
  flips, 90-degree rotations and intensity jitter. Every sample is a pure function of
  ``(seed, epoch, index)``, so a resumed or multi-process run draws exactly the same data.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage as ndi

from ..errors import InputError
from ..intensity import Normalizer, default_spec
from ..io import NIFTI_SUFFIXES, SITK_SUFFIXES
from ..networks import mirror_indices

_IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
_CT_FILTER = "cosine"
_MIN_INPLANE = 32


# ---------------------------------------------------------------------------- series
@dataclass
class SeriesData:
    """One image series ready for training.

    Attributes:
        key: unique id (series UID or source path + index).
        group: the split unit (patient id, else the source path): never on both sides.
        source: the file or folder it came from.
        modality: ``"CT"`` or ``"MR"``.
        array: normalised float32 ``(z, y, x)`` (network units); physical = ``array * scale + offset``.
        affine: 4x4 voxel ``(k, j, i, 1)`` -> LPS mm.
        offset, scale: the fitted intensity mapping.
        reference: MR tissue signal (foreground mean, physical units) for the Rician sigma.
    """

    key: str
    group: str
    source: str
    modality: str
    array: np.ndarray
    affine: np.ndarray
    offset: float
    scale: float
    reference: float = 1.0
    description: str = ""
    _ct_maps: dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def physical(self, x: np.ndarray) -> np.ndarray:
        return x * np.float32(self.scale) + np.float32(self.offset)

    def normalised(self, x: np.ndarray) -> np.ndarray:
        return ((x - np.float32(self.offset)) / np.float32(self.scale)).astype(np.float32)

    def ct_median_sd(self, z: int) -> float:
        """Median over the body of the photon-noise SD coefficient of slice ``z`` (cached)."""
        key = ("median", z)
        if key not in self._ct_maps:
            hu = self.physical(np.asarray(self.array[z], dtype=np.float32))
            self._ct_maps[key] = _median_body_sd(self.ct_maps(z)[0], hu)  # type: ignore[assignment]
        return self._ct_maps[key]  # type: ignore[return-value]

    def ct_maps(self, z: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-pixel noise variance coefficients ``(vp, ve)`` (HU^2) of slice ``z`` (cached)."""
        if z not in self._ct_maps:
            hu = self.physical(np.asarray(self.array[z], dtype=np.float32))
            self._ct_maps[z] = ct_noise_variance_maps(hu, self.spacing[2])
        return self._ct_maps[z]


_PREWARM: list[SeriesData] = []  # read by forked pool processes in prewarm_ct_maps


def _slice_ct_maps(job: tuple[int, int]) -> tuple[int, int, np.ndarray, np.ndarray, float]:
    r, z = job
    rec = _PREWARM[r]
    vp, ve = rec.ct_maps(z)
    return r, z, vp, ve, rec.ct_median_sd(z)


def prewarm_ct_maps(series: Sequence[SeriesData], processes: int) -> None:
    """Compute the CT noise maps of every slice of ``series`` in ``processes`` forked processes.

    Training then forks its DataLoader workers from a process that already holds the maps,
    instead of every worker computing all of them (~0.3 s per 512x512 slice each).
    """
    global _PREWARM
    import multiprocessing as mp

    cts = [s for s in series if s.modality == "CT"]
    jobs = [(r, z) for r, s in enumerate(cts) for z in range(s.array.shape[0]) if z not in s._ct_maps]
    if not jobs:
        return
    if processes < 2 or "fork" not in mp.get_all_start_methods():
        for r, z in jobs:
            cts[r].ct_median_sd(z)
        return
    _PREWARM = cts
    try:
        with mp.get_context("fork").Pool(processes) as pool:
            for r, z, vp, ve, med in pool.imap_unordered(_slice_ct_maps, jobs, chunksize=4):
                cts[r]._ct_maps[z] = (vp, ve)
                cts[r]._ct_maps[("median", z)] = med
    finally:
        _PREWARM = []


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


# ---------------------------------------------------------------------------- discovery + cache
def _expand(path: str | os.PathLike) -> list[Path]:
    """A file -> itself; a folder -> its image files (NIfTI/MHA/NRRD) plus itself if it holds others (DICOM)."""
    p = Path(path)
    if not p.exists():
        raise InputError("training data: no such file or folder", p)
    if p.is_file():
        return [p]
    files = [f for f in sorted(p.rglob("*")) if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    if not files:
        raise InputError("training data: the folder is empty", p)
    images = [f for f in files if any(f.name.lower().endswith(s) for s in _IMAGE_SUFFIXES)]
    others = [f for f in files if f not in images]
    return images + ([p] if others else [])


def _source_stamp(p: Path) -> str:
    if p.is_file():
        st = p.stat()
        return f"{st.st_mtime_ns}:{st.st_size}"
    latest, count, size = 0, 0, 0
    for root, _dirs, names in os.walk(p):
        for n in names:
            try:
                st = os.stat(os.path.join(root, n))
            except OSError:
                continue
            latest, count, size = max(latest, st.st_mtime_ns), count + 1, size + st.st_size
    return f"{latest}:{count}:{size}"


def _patient_of(vol) -> str | None:
    hdr = vol.meta.get("dicom_header")
    pid = getattr(hdr, "PatientID", None) if hdr is not None else None
    return f"patient:{pid}" if pid else None


def _load_source(src: Path, modality: str, spec: dict[str, Any] | None, cache_dir: Path | None) -> list[SeriesData]:
    """All usable series of one source (file or DICOM folder), through the cache when given."""
    from .. import load

    key = None
    if cache_dir is not None:
        h = hashlib.sha1(json.dumps([str(src.resolve()), _source_stamp(src), modality, spec],
                                    sort_keys=True, default=str).encode()).hexdigest()[:20]
        key = cache_dir / h
        index = key.with_suffix(".json")
        if index.is_file():
            try:
                entries = json.loads(index.read_text())
                return [SeriesData(e["key"], e["group"], e["source"], e["modality"],
                                   np.load(cache_dir / e["npy"], mmap_mode="r"), np.asarray(e["affine"]),
                                   e["offset"], e["scale"], e["reference"], e.get("description", ""))
                        for e in entries]
            except (OSError, ValueError, KeyError) as exc:
                warnings.warn(f"ignoring a broken cache entry {index}: {exc}", RuntimeWarning, stacklevel=2)
    try:
        volumes = load(src)
    except InputError as exc:
        raise InputError(f"training data cannot be read: {exc}") from None
    out: list[SeriesData] = []
    for i, vol in enumerate(volumes):
        vmod = vol.modality if vol.modality in ("CT", "MR") else (modality if modality != "auto" else vol.modality)
        if modality != "auto" and vmod != modality:
            continue
        if vmod not in ("CT", "MR"):
            warnings.warn(f"{src}: skipping series {i} of modality {vol.modality!r} (pass modality='CT' or 'MR')",
                          RuntimeWarning, stacklevel=2)
            continue
        arr = vol.array
        if arr.ndim == 4:
            warnings.warn(f"{src}: 4-D series {i}: training on its first time point", RuntimeWarning, stacklevel=2)
            arr = arr[0]
        if min(arr.shape[1:]) < _MIN_INPLANE:
            warnings.warn(f"{src}: skipping series {i}: in-plane size {arr.shape[1:]} < {_MIN_INPLANE}", RuntimeWarning,
                          stacklevel=2)
            continue
        norm = Normalizer.fit(spec or default_spec(vmod), arr)
        narr = np.ascontiguousarray(norm.forward(arr), dtype=np.float32)
        ref = 1.0
        if vmod == "MR":
            from ..degrade import foreground_mean
            from ..intensity import sample_values

            ref = foreground_mean(sample_values(arr, 1_000_000))
        uid = vol.meta.get("series_uid") or f"{src}#{i}"
        group = _patient_of(vol) or str(src)
        offset = float(norm.offset) if np.isfinite(norm.offset) else 0.0
        out.append(SeriesData(str(uid), group, str(src), vmod, narr, np.asarray(vol.affine, float), offset,
                              float(norm.scale), float(ref), str(vol.meta.get("description") or "")))
    if key is not None and out:
        from ..io.atomic import atomic_file

        cache_dir.mkdir(parents=True, exist_ok=True)
        entries = []
        for j, s in enumerate(out):
            npy = f"{key.name}-{j}.npy"
            with atomic_file(cache_dir / npy, overwrite=True) as tmp:
                np.save(tmp, s.array)
            entries.append({"key": s.key, "group": s.group, "source": s.source, "modality": s.modality, "npy": npy,
                            "affine": s.affine.tolist(), "offset": s.offset, "scale": s.scale,
                            "reference": s.reference, "description": s.description})
        with atomic_file(key.with_suffix(".json"), overwrite=True) as tmp:
            tmp.write_text(json.dumps(entries))
    return out


def load_series(paths: Sequence[str | os.PathLike], modality: str = "auto", spec: dict[str, Any] | None = None,
                cache_dir: str | os.PathLike | None = None) -> list[SeriesData]:
    """Read every series under ``paths`` (files or folders) for training.

    Args:
        paths: files or folders (DICOM folders are read recursively; NIfTI/MHA/NRRD files found in
            folders are read one by one).
        modality: ``"CT"``, ``"MR"`` or ``"auto"`` (the modality most series have).
        spec: the intensity mapping (card ``intensity``); ``None`` = the modality default.
        cache_dir: cache folder for normalised ``.npy`` volumes, or ``None`` (memory only).

    Raises:
        InputError: a path is missing, empty or unreadable, or no usable series was found.
    """
    cache = Path(cache_dir) if cache_dir else None
    series: list[SeriesData] = []
    for p in paths:
        for src in _expand(p):
            series += _load_source(src, modality, spec, cache)
    if not series:
        hint = "" if modality != "auto" else " (series of unknown modality, e.g. NIfTI without it, need modality='CT' or 'MR', --modality)"
        raise InputError(f"training data: no usable {'CT or MR' if modality == 'auto' else modality} series found in "
                         f"{', '.join(map(str, paths))}{hint}")
    if modality == "auto":
        counts = {m: sum(s.modality == m for s in series) for m in ("CT", "MR")}
        chosen = max(counts, key=counts.get)
        dropped = [s.source for s in series if s.modality != chosen]
        if dropped:
            warnings.warn(f"training on {chosen} only; skipping {len(dropped)} series of the other modality",
                          RuntimeWarning, stacklevel=2)
        series = [s for s in series if s.modality == chosen]
    keys = set()
    for s in series:  # the same series reached twice (e.g. a folder and its file) counts once
        if s.key in keys:
            s.key = f"{s.key}@{s.source}"
        keys.add(s.key)
    return series


def split_series(series: list[SeriesData], val_fraction: float, seed: int) -> tuple[list[SeriesData], list[SeriesData]]:
    """Split by patient/series group: at least one group on each side, none on both.

    Raises:
        InputError: fewer than two groups (then pass separate validation data).
    """
    groups = sorted({s.group for s in series})
    if len(groups) < 2:
        raise InputError(
            f"training data: found {len(series)} series from {len(groups)} patient/source, too few to split into "
            "training and validation without putting slices of one series on both sides; add scans or pass "
            f"val_data (--val-data). Sources: {sorted({s.source for s in series})}")
    rng = np.random.default_rng(seed)
    order = list(rng.permutation(len(groups)))
    n_val = min(len(groups) - 1, max(1, int(round(val_fraction * len(groups)))))
    val_groups = {groups[i] for i in order[:n_val]}
    return [s for s in series if s.group not in val_groups], [s for s in series if s.group in val_groups]


# ---------------------------------------------------------------------------- pairs
def resliced_views(series: Sequence[SeriesData], max_anisotropy: float = 1.1) -> list[SeriesData]:
    """The two other-axis views of every series whose voxels are near-isotropic.

    A volume ``(z, y, x)`` with ``max(spacing) / min(spacing) <= max_anisotropy`` gives ``(y, z, x)``
    and ``(x, z, y)`` copies (contiguous, affine columns permuted to match, same split group), so
    2-D training also sees its coronal and sagittal planes: more distinct slices from few scans.
    Series with anisotropic voxels (thick slices) give none: their other planes look different.
    """
    out = []
    for s in series:
        sp = s.spacing
        if max(sp) > max_anisotropy * min(sp):
            continue
        for axis, order in (("y", (1, 0, 2)), ("x", (2, 0, 1))):
            out.append(dataclasses.replace(
                s, key=f"{s.key}#resliced-{axis}", array=np.ascontiguousarray(s.array.transpose(order)),
                affine=s.affine[:, [*order, 3]], description=f"{s.description} (resliced along {axis})".strip(),
                _ct_maps={}))
    return out


def _positions(s: SeriesData) -> tuple[np.ndarray, np.ndarray]:
    a = s.affine
    normal = np.cross(a[:3, 2], a[:3, 1])
    normal /= np.linalg.norm(normal)
    k = np.arange(s.array.shape[0])
    pos = (a[:3, :3] @ np.stack([k, np.zeros_like(k), np.zeros_like(k)]) + a[:3, 3:4]).T
    return normal, pos @ normal


def match_pairs(low: list[SeriesData], full: list[SeriesData]) -> list[tuple[SeriesData, SeriesData]]:
    """Match low-dose to full-dose series, then slices by position along the slice normal.

    A pair needs the same in-plane grid (shape, orientation within 1 degree, in-plane offset within
    half a pixel) and slices at the same positions (within a quarter of the slice distance).
    Returns ``(low, full)`` pairs whose arrays hold only the matched slices, in the same order.

    Raises:
        InputError: a low-dose series matches no full-dose series (the message says why).
    """
    pairs = []
    for lo in low:
        n_lo, s_lo = _positions(lo)
        reasons = []
        best = None
        for fu in full:
            n_fu, s_fu = _positions(fu)
            if lo.array.shape[1:] != fu.array.shape[1:]:
                reasons.append(f"{fu.source}: in-plane size {fu.array.shape[1:]} vs {lo.array.shape[1:]}")
                continue
            if abs(float(n_lo @ n_fu)) < math.cos(math.radians(1.0)):
                reasons.append(f"{fu.source}: different slice orientation")
                continue
            d = lo.affine[:3, 3] - fu.affine[:3, 3]
            d_in = d - (d @ n_fu) * n_fu
            px = min(lo.spacing[1:])
            if np.linalg.norm(d_in) > 0.5 * px:
                reasons.append(f"{fu.source}: in-plane offset {np.linalg.norm(d_in):.2f} mm")
                continue
            step = np.min(np.abs(np.diff(s_fu))) if len(s_fu) > 1 else lo.spacing[0]
            j = np.argmin(np.abs(s_fu[None, :] - s_lo[:, None]), axis=1)
            ok = np.abs(s_fu[j] - s_lo) <= 0.25 * max(step, 1e-3)
            if not ok.any():
                reasons.append(f"{fu.source}: no slice at the same position (nearest "
                               f"{np.min(np.abs(s_fu[None, :] - s_lo[:, None])):.2f} mm away)")
                continue
            if best is None or ok.sum() > best[2].sum():
                best = (fu, j, ok)
        if best is None:
            raise InputError("paired data: this low-dose series matches no full-dose series ("
                             + ("; ".join(reasons) if reasons else "no full-dose series") + ")", lo.source)
        fu, j, ok = best
        keep_lo = np.nonzero(ok)[0]
        lo_m = SeriesData(lo.key, fu.group, lo.source, lo.modality, np.ascontiguousarray(lo.array[keep_lo]),
                          lo.affine, lo.offset, lo.scale, lo.reference, lo.description)
        fu_m = SeriesData(fu.key, fu.group, fu.source, fu.modality, np.ascontiguousarray(fu.array[j[keep_lo]]),
                          fu.affine, fu.offset, fu.scale, fu.reference, fu.description)
        if lo.modality != fu.modality or abs(lo.scale - fu.scale) > 1e-6 * abs(fu.scale) and lo.modality == "CT":
            raise InputError(f"paired data: modality/intensity differ from the matched {fu.source}", lo.source)
        pairs.append((lo_m, fu_m))
    return pairs


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

    def _level(self, lo: float, hi: float, rng: np.random.Generator) -> float:
        if self.log_draw and lo > 0:
            return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        return float(rng.uniform(lo, hi))

    def zoom_factor(self, rec: "SeriesData", rng: np.random.Generator) -> float:
        """Output pixels per source pixel for one sample (1 = native; within 0.4-2.5)."""
        if self.kind != "ct_lowdose" or self.ct_pixel_range is None:
            return 1.0
        target = float(rng.uniform(*self.ct_pixel_range))
        return float(np.clip(rec.spacing[2] / target, 0.4, 2.5))

    def uses_ct_maps(self) -> bool:
        """Whether :meth:`apply` reads the per-slice CT noise maps (:meth:`SeriesData.ct_maps`)."""
        return self.kind == "ct_lowdose" and (self.noise_hu_range is not None or self.ct_method != "projection")

    def margin(self) -> int:
        if self.kind == "gaussian_blur":
            return int(math.ceil(4.0 * self.fwhm_range[1] / 2.3548)) + 1
        return 0

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
            fwhm = float(rng.uniform(*self.fwhm_range))
            sig = fwhm / 2.3548
            sigmas = (0.0,) * (clean.ndim - 2) + (sig, sig)
            out = ndi.gaussian_filter(clean, sigmas, mode="reflect", truncate=4.0).astype(np.float32)
            if self.blur_noise > 0:
                out += (self.blur_noise * rng.standard_normal(out.shape)).astype(np.float32)
            return out, {"fwhm": fwhm}
        raise InputError(f"unknown degradation {self.kind!r}")


def augment(arrays: list[np.ndarray], rng: np.random.Generator, jitter: float) -> list[np.ndarray]:
    """Same random flips, in-plane 90-degree rotation and intensity jitter for every array."""
    nd = arrays[0].ndim
    k = int(rng.integers(4))
    flips = [ax for ax in range(nd) if rng.random() < 0.5]
    a = float(rng.uniform(1.0 - jitter, 1.0 + jitter)) if jitter > 0 else 1.0
    b = float(rng.uniform(-jitter, jitter)) * 0.5 if jitter > 0 else 0.0
    out = []
    for x in arrays:
        x = np.rot90(x, k, axes=(nd - 2, nd - 1))
        if flips:
            x = np.flip(x, axis=flips)
        out.append(np.ascontiguousarray(x * np.float32(a) + np.float32(b), dtype=np.float32))
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

    Series are drawn in proportion to their number of slices.
    """

    def __init__(self, series: list[SeriesData], patch_size: Sequence[int], length: int,
                 degradation: Degradation | None = None, targets: list[SeriesData] | None = None,
                 augment: bool = True, jitter: float = 0.0, seed: int = 0, context: int = 0):
        self.series, self.targets = series, targets
        self.context = int(context)
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
        if len(self.patch) == 2:
            z0 = int(rng.integers(nz))
            ph, pw = self.patch
            zoom = deg.zoom_factor(rec, rng) if deg is not None and self.targets is None else 1.0
            sizes = (ph + 2 * m, pw + 2 * m)
            src = tuple(max(8, int(round(v / zoom))) for v in sizes) if zoom != 1.0 else sizes
            span = src if zoom != 1.0 else (ph, pw)
            y0, x0 = int(rng.integers(max(ny - span[0], 0) + 1)), int(rng.integers(max(nx - span[1], 0) + 1))
            starts = (y0, x0) if zoom != 1.0 else (y0 - m, x0 - m)
            planes, which = np.unique(mirror_indices(z0 - self.context, 2 * self.context + 1, nz), return_inverse=True)
            clean = np.stack([_resize(_crop(rec.array[z], starts, src), sizes) for z in planes])
            src_shape = src if zoom != 1.0 else None
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
        else:  # self-supervised
            inp = target = clean
        if planes is not None:  # (C, y, x) input, centre-slice target
            inp = inp[which]
            target = target[[int(np.searchsorted(planes, z0))]] if target.shape[0] == len(planes) else target
        inp, target = inp[inner], target[inner]
        if self.do_augment:
            inp, target = augment([inp, target], rng, self.jitter)
        if planes is None:
            inp, target = inp[None], target[None]
        return {"input": torch.from_numpy(np.ascontiguousarray(inp)),
                "target": torch.from_numpy(np.ascontiguousarray(target))}


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
            else:
                inp, target = clean[which], clean[centre]
            if three_d:
                inp, target = inp[None], target[None]
            items.append({"input": np.ascontiguousarray(inp, dtype=np.float32),
                          "target": np.ascontiguousarray(target, dtype=np.float32), "series": rec})
    return items


__all__ = ["SeriesData", "load_series", "split_series", "match_pairs", "PatchDataset", "Degradation", "prewarm_ct_maps",
           "validation_set", "augment", "ct_noise_variance_maps", "ct_shaped_noise"]
