"""Training series: discovery, caching, patient-wise split and position-matched pairs.

- Scans are read with :func:`napari_restore.load` (DICOM folders, NIfTI, MHA/NRRD), one
  :class:`SeriesData` per image series, intensities normalised with the model card's mapping
  (:mod:`napari_restore.intensity`). Decoded volumes can be cached as normalised float32 ``.npy``
  in a cache folder, keyed by the source path and the modification times of its files.
- :func:`split_series` splits by patient (DICOM PatientID; the source file for NIfTI), so slices
  of one series never land on both sides.
- :func:`match_pairs` matches low-dose to full-dose series by geometry, then slices by their
  position along the slice normal (the projection of ImagePositionPatient).
- :func:`resliced_views` adds the other two planes of an isotropic-enough series.
- :func:`prewarm_ct_maps` computes every CT slice's noise maps (:mod:`.ct_noise`) in forked processes.
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

from ..errors import InputError
from ..intensity import Normalizer, default_spec
from ..io import NIFTI_SUFFIXES, SITK_SUFFIXES
from .ct_noise import _median_body_sd, ct_noise_variance_maps

_IMAGE_SUFFIXES = NIFTI_SUFFIXES + SITK_SUFFIXES
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
        target: optional cleaner target, ``array``'s shape and units (the scan without its own
            noise, :mod:`.targets`); supervised samples learn it instead of ``array``.
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
    target: np.ndarray | None = field(default=None, repr=False)
    _ct_maps: dict[Any, Any] = field(default_factory=dict, repr=False)
    _stats: dict[str, float] = field(default_factory=dict, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def physical(self, x: np.ndarray) -> np.ndarray:
        return x * np.float32(self.scale) + np.float32(self.offset)

    def normalised(self, x: np.ndarray) -> np.ndarray:
        return ((x - np.float32(self.offset)) / np.float32(self.scale)).astype(np.float32)

    def value_range(self) -> float:
        """The 1-99 % intensity range of ``array`` (network units; cached): the unit of blur-noise draws."""
        if "range" not in self._stats:
            from ..intensity import sample_values

            p1, p99 = np.percentile(sample_values(np.asarray(self.array)), [1, 99])
            self._stats["range"] = max(float(p99 - p1), 1e-6)
        return self._stats["range"]

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
                _ct_maps={}, _stats={}))
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


__all__ = ["SeriesData", "load_series", "split_series", "match_pairs", "resliced_views", "prewarm_ct_maps"]
