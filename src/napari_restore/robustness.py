"""The condition matrix of issue 18: restoration measured over the conditions real scans come in.

Building blocks of ``benchmarks/robustness.py`` (which loops over the conditions, writes the
report, the heatmap and the JSON); kept here so that the tests run the same code on a tiny subset.

* :func:`denoise_cell` -- one CT low-dose or MR Rician condition on a few slices of one series:
  degrade, restore with input / oracle NLM / BM3D (true sigma) / models, score each slice.
* :func:`deblur_cell` -- one Gaussian blur + white noise condition, against Richardson-Lucy with the
  true PSF (best of 10/20/50 iterations, reflect padding) and the deblurring models.
* :func:`real_scan_measures` -- a real scan with no added noise: flat-tissue noise SD before/after
  and the correlation of ``|input - output|`` with the gradient magnitude.
* :func:`low_contrast` -- disks of a few HU inserted into uniform regions before the noise.

Conventions: CT is scored on HU windowed W400/L50 to [0, 1]; MR on the clean volume's 1st/99th
percentiles mapped to 0/1 (see :mod:`napari_restore.evaluate`). Crops are taken after the noise
is simulated on whole slices; PSNR of a cell pools the squared error of its slices. The core never
imports napari.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError
from .evaluate import _NLM_FACTORS, _crop_box, _nlm, _rl, _score, _scorer
from .metrics import flat_tissue, noise_sd_estimate
from .volume import Volume

CT_FILTERS = ("ramp", "shepp-logan", "cosine", "hann")
CT_DOSES = (0.10, 0.25, 0.50)
CT_PIXELS = (None, 0.5, 0.8)  # None = native
MR_SIGMAS = (0.02, 0.05, 0.10)
BLUR_FWHM = (1.0, 2.0, 3.0)
BLUR_NOISE = (0.0025, 0.01, 0.02)
RL_ITERATIONS = (10, 20, 50)
#: bumped when a cell gains results (the benchmark's cache then recomputes): 2 = models' ``ref_psnr``/``guard``; 3 = the guard measures the edge spread
CELL_FORMAT = 3
CT_N_VIEWS_MAX = 320  # views of the projection simulation (texture only, not the level; keeps it affordable)

#: Real series of ../shared/data (relative paths) for the matrix: (path, label). A series a model
#: trained on is measured but its cell does not count for that model (see :func:`seen_by`).
CT_SERIES = (
    ("ct/siemens-body-j2k", "Siemens mCT body, 0.98 mm, Br38f"),
    ("fixtures/pylibjpeg/JPEGLS/CT1_JLSN.dcm", "GE chest, 0.66 mm, STANDARD"),
    ("fixtures/pydicom-data/693_UNCR.dcm", "head, 0.48 mm, STANDARD"),
    ("fixtures/pylibjpeg/JPEG2000/ELSCINT1_JP2vsJ2K.dcm", "Toshiba head/neck, 0.35 mm, FC80"),
    ("fixtures/pydicom-data/explicit_VR-UN.dcm", "abdomen, 0.86 mm"),
    ("ct/philips-head-phantom/exam/S2010", "Philips head phantom, 0.45 mm"),
    ("ct/nifti/example_ct.nii.gz", "abdomen, resampled 3 mm"),
)
MR_SERIES = (
    ("mr/nifti/seg3d_MR.nii.gz", "T1 head (8-bit)"),
    ("mr/siemens-prisma-jpeg-fragments", "Prisma T1 bottle phantom, 2 mm"),
    ("fixtures/pydicom-data/MR-SIEMENS-DICOM-WithOverlays.dcm", "Siemens abdomen, 0.72 mm"),
    ("fixtures/pydicom-data/MR2_UNCR.dcm", "Philips shoulder, 0.2 mm"),
    ("mr/uih-t1-sag", "UIH T1 head, 0.5 mm"),
    ("mr/nifti/T1.nii.gz", "T1 brain (8-bit)"),
)
#: Real series left out, with the reason (printed in the report).
EXCLUDED = (
    ("fixtures/pydicom-data/bad_sequence.dcm", "CT, 0.29 mm, field of view cuts through the body: "
     "a projection simulation of a truncated object is wrong"),
    ("fixtures/pylibjpeg/JPEG2000/MAROTECH_CT_JP2Lossy.dcm", "CT coronal reformat, lossy JPEG 2000"),
    ("fixtures/dicom2nifti/* CT and MR", "pixel data replaced (blank CT, random-noise MR)"),
    ("fixtures/pydicom-data/eCT_Supplemental.dcm", "enhanced CT of a parametric map, not HU anatomy"),
    ("fixtures/pylibjpeg/JPEGLossless/JPEGLossless_1s_1f_i_16_16_bad.dcm", "CT whose JPEG Lossless stream is "
     "deliberately wrong: it decodes to stripes of -33792 to 31743"),
    ("64x64 MR fixtures (emri, transfer-syntaxes, hitachi, GE EPI)", "too small for 128-pixel crops"),
)
#: Every real full-dose series for the no-added-noise measures.
REAL_SERIES = CT_SERIES + (
    ("ct/philips-head-phantom/exam/S2020", "Philips head phantom, 1 mm iDose"),
    ("ct/philips-head-phantom/tilt/S3010", "Philips head phantom, tilted"),
    ("ct/nifti/cta_aorta_cropped.nii.gz", "CT angiography crop, 1.5 mm"),
) + MR_SERIES + (
    ("mr/siemens-xa30-enhanced", "Siemens XA30 head, 2 mm"),
    ("mr/nifti/T2.nii.gz", "T2 brain (8-bit)"),
    ("mr/nifti/FLAIR.nii.gz", "FLAIR brain (8-bit)"),
)


def seen_by(card: Any, rel_path: str) -> bool:
    """Whether the model of ``card`` trained on the series ``rel_path`` (relative to the data folder),
    by its card's training_data lines: ``"ct/... (from ...)"`` as shipped, or the path a training
    run wrote (``"<data folder>/ct/..."``)."""
    rel = rel_path.strip("/")
    firsts = (str(t).split(" ")[0].rstrip("/").replace("\\", "/") for t in (card.training_data or []))
    return any(f == rel or f.endswith("/" + rel) for f in firsts)


def cell_seed(*key: Any) -> int:
    """A seed that depends only on the condition (stable across runs and method lists)."""
    return zlib.crc32("|".join(map(str, key)).encode())


@dataclass
class Series:
    """One real series: its main volume, modality (``CT``/``MR``), label and relative path."""

    path: str
    label: str
    volume: Volume
    modality: str

    @property
    def name(self) -> str:
        p = Path(self.path)
        return p.name.replace(".nii.gz", "").replace(".dcm", "")


def load_series(data_root: str | Path, rel_path: str, label: str = "") -> Series:
    """Load the main series at ``data_root/rel_path`` (a 4-D volume gives its first time point)."""
    from .io import load

    vol = load(Path(data_root) / rel_path)[0]
    if vol.array.ndim == 4:
        vol = Volume(vol.array[0], vol.affine, vol.modality, vol.meta)
    modality = "CT" if vol.modality == "CT" else "MR"
    return Series(rel_path, label or rel_path, vol, modality)


def pick_block(nz: int, n: int, context: int) -> tuple[list[int], list[int]]:
    """``(scored, block)``: ``n`` consecutive slices around the middle and those plus ``context`` each side."""
    n = max(1, min(n, nz))
    z0 = max(0, min(nz - n, nz // 2 - n // 2))
    scored = list(range(z0, z0 + n))
    block = list(range(max(0, z0 - context), min(nz, z0 + n + context)))
    return scored, block


def body_box(img: np.ndarray, threshold: float, margin: int = 8) -> tuple[slice, slice]:
    """Bounding box of the pixels above ``threshold`` (the body; HU for CT), with a margin."""
    m = ndi.binary_opening(img > threshold, iterations=2)
    if not m.any():
        return slice(None), slice(None)
    ys, xs = np.nonzero(m)
    return (slice(max(0, ys.min() - margin), min(img.shape[0], ys.max() + margin + 1)),
            slice(max(0, xs.min() - margin), min(img.shape[1], xs.max() + margin + 1)))


def resample_block(block: np.ndarray, pixel_mm: float, target_mm: float | None, body_hu: float = -500.0
                   ) -> tuple[np.ndarray, float]:
    """Resample CT slices in-plane to ``target_mm`` pixels (``None`` = native), cropped to the body first.

    Cubic interpolation, anti-aliased when shrinking. Returns the new block and its pixel size.
    """
    if target_mm is None or abs(target_mm - pixel_mm) < 1e-6:
        return block, pixel_mm
    from skimage.transform import resize

    box = body_box(block.max(axis=0), body_hu)
    sub = block[:, box[0], box[1]]
    f = pixel_mm / target_mm
    shape = (max(8, int(round(sub.shape[1] * f))), max(8, int(round(sub.shape[2] * f))))
    out = np.stack([resize(s.astype(np.float64), shape, order=3, anti_aliasing=f < 1, preserve_range=True, mode="edge")
                    for s in sub]).astype(np.float32)
    return out, pixel_mm * sub.shape[1] / shape[0]


def reference_noise_sd(ref: np.ndarray, modality: str) -> float:
    """The reference's own noise SD in flat tissue (:func:`metrics.noise_sd_estimate`, local method)."""
    mask, _ = flat_tissue(ref, modality)
    if mask.sum() < 200:
        mask = ref > (-500 if modality == "CT" else np.percentile(ref, 50))
    try:
        return noise_sd_estimate(ref, mask)
    except InputError:  # too small a region: no estimate
        return float("nan")


#: the keys of a cell's dict (:meth:`Cell.to_dict`) that hold results, not the condition
CELL_RESULT_KEYS = ("slices", "sigma", "ref_sd", "reference_limited", "seen_by", "notes", "scores")


@dataclass
class Cell:
    """One condition on one series: per-method scores (pooled and per slice) and the flags."""

    key: dict[str, Any]
    slices: list[int]
    sigma: float  # the true added noise SD (image units)
    ref_sd: float = float("nan")  # the reference's own noise SD in flat tissue
    scores: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seen: list[str] = field(default_factory=list)  # models that trained on this series

    @property
    def reference_limited(self) -> bool:
        return bool(self.ref_sd == self.ref_sd and self.sigma < self.ref_sd)

    def gain(self, method: str) -> float:
        return self.scores[method]["psnr"] - self.scores["input"]["psnr"]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Cell":
        """The inverse of :meth:`to_dict` (a cell read back from the benchmark's JSON)."""
        known = ("slices", "sigma", "ref_sd", "reference_limited", "seen_by", "notes", "scores")
        return cls({k: v for k, v in d.items() if k not in known}, list(d["slices"]), float(d["sigma"]),
                   float(d["ref_sd"]), dict(d["scores"]), list(d.get("notes", [])), list(d.get("seen_by", [])))

    def to_dict(self) -> dict[str, Any]:
        return {**self.key, "slices": self.slices, "sigma": round(self.sigma, 4), "ref_sd": round(self.ref_sd, 4),
                "reference_limited": self.reference_limited, "seen_by": self.seen, "notes": self.notes,
                "scores": self.scores}


def _block_volume(block: np.ndarray, affine: np.ndarray, modality: str, source: Volume | None = None) -> Volume:
    """A block of slices as the Volume a user would hand to ``restore()`` (the source's slice thickness kept)."""
    meta: dict[str, Any] = {"description": "robustness"}
    if source is not None and source.meta.get("slice_thickness"):
        meta["slice_thickness"] = source.meta["slice_thickness"]
    return Volume(block.astype(np.float32), affine, modality, meta)


def _model_out(loaded: Any, block: np.ndarray, affine: np.ndarray, modality: str, keep: Sequence[int],
               source: Volume | None = None) -> np.ndarray:
    """Run a model over a block of slices (neighbours included); return the ``keep`` slices."""
    import warnings

    from .inference import restore

    vol = _block_volume(block, affine, modality, source)
    with warnings.catch_warnings():  # the guard's warnings are recorded per cell (see guard_flags)
        warnings.simplefilter("ignore", RuntimeWarning)
        out = restore(vol, task=loaded.card.task, model=loaded, mode="2d" if loaded.card.dims == 2 else "3d",
                      device="cpu").array
    return out[list(keep)]


def guard_flags(loaded: Any, block: np.ndarray, affine: np.ndarray, modality: str,
                source: Volume | None = None) -> dict[str, list[float]]:
    """What ``restore()``'s do-no-harm guard says about this input for this model:
    ``{measure: [value, low, high]}`` for every measure outside the card's ``trusted_range`` (empty: inside)."""
    from .guard import measure, outside_range

    vol = _block_volume(block, affine, modality, source)
    return {k: [round(v, 3), lo, hi] for k, (v, lo, hi) in outside_range(loaded.card, measure(vol)).items()}


def _affine(vol: Volume, pixel_mm: float) -> np.ndarray:
    a = vol.affine.copy()
    for ax in (1, 2):
        a[:3, ax] *= pixel_mm / np.linalg.norm(a[:3, ax])
    return a


def _score_methods(cell: Cell, to_unit, clean: np.ndarray, outs: dict[str, np.ndarray]) -> None:
    for m, out in outs.items():
        ps, ss = _score(to_unit, clean, out)
        per = [_score(to_unit, c, o) for c, o in zip(clean, out)]
        cell.scores[m] = {"psnr": round(ps, 3), "ssim": round(ss, 4),
                          "slice_psnr": [round(p, 3) for p, _ in per], "slice_ssim": [round(s, 4) for _, s in per]}


def _oracle_nlm(noisy: np.ndarray, clean: np.ndarray, sigma: float, to_unit) -> tuple[np.ndarray, float]:
    """NLM with the best ``h`` among factors of the true sigma, chosen against the clean slices."""
    best = None
    for f in _NLM_FACTORS:
        out = np.stack([_nlm(s, sigma, f * sigma) for s in noisy])
        ps = _score(to_unit, clean, out)[0]
        if best is None or ps > best[0]:
            best = (ps, out, f)
    return best[1], best[2]


def _bm3d(noisy: np.ndarray, sigma: float) -> np.ndarray:
    import bm3d

    return np.stack([np.asarray(bm3d.bm3d(s.astype(np.float64), sigma_psd=sigma), np.float32) for s in noisy])


def denoise_cell(series: Series, condition: dict[str, Any], models: Sequence[Any] = (), *,
                 methods: Sequence[str] = ("input", "nlm", "bm3d"), slices: int = 2, crop: int = 256) -> Cell:
    """Degrade, restore and score one denoising condition on one series.

    Args:
        series: from :func:`load_series`.
        condition: CT ``{"filter": "ramp", "dose": 0.25, "pixel_mm": None | 0.5 | 0.8}``;
            MR ``{"sigma_fraction": 0.05}``.
        models: ``LoadedModel`` objects (a model that reads neighbouring slices gets the block).
        methods: baselines among ``input``, ``nlm`` (oracle h), ``bm3d`` (true sigma).
        slices: consecutive slices scored; crop: centre crop side (after the simulation).
    """
    from .degrade import foreground_mean, ct_lowdose_added_noise, mr_rician_noise

    vol, modality = series.volume, series.modality
    context = max([m.card.context for m in models] + [0])
    scored, block_z = pick_block(vol.array.shape[0], slices, context)
    keep = [block_z.index(z) for z in scored]
    block = vol.array[block_z].astype(np.float32)
    seed = cell_seed(series.path, *sorted(condition.items()))
    key = {"series": series.name, "modality": modality, **condition}
    if modality == "CT":
        pixel = vol.spacing[2]
        block, pixel = resample_block(block, pixel, condition.get("pixel_mm"))
        key["pixel_mm_actual"] = round(pixel, 3)
        nv = min(max(block.shape[1:]), CT_N_VIEWS_MAX)
        added = ct_lowdose_added_noise(block, (pixel, pixel), condition["dose"], method="projection",
                                       filter_name=condition["filter"], n_views=nv, seed=seed)
        noisy = block + added
        # the scored region: centred on the body
        bb = body_box(block[keep[0]], -500.0, margin=0)
        centre = ((bb[0].start or 0) + (bb[0].stop or block.shape[1])) // 2, \
                 ((bb[1].start or 0) + (bb[1].stop or block.shape[2])) // 2
    else:
        pixel = vol.spacing[2]
        ref_level = foreground_mean(vol.array)
        noisy = mr_rician_noise(block, condition["sigma_fraction"], reference=ref_level, seed=seed)
        added = None
        centre = (block.shape[1] // 2, block.shape[2] // 2)
    cy, cx = min(crop, block.shape[1]), min(crop, block.shape[2])
    y0 = int(np.clip(centre[0] - cy // 2, 0, block.shape[1] - cy))
    x0 = int(np.clip(centre[1] - cx // 2, 0, block.shape[2] - cx))
    box = (slice(y0, y0 + cy), slice(x0, x0 + cx))
    clean, deg = block[keep][:, box[0], box[1]], noisy[keep][:, box[0], box[1]]
    if modality == "CT":
        fm = np.stack([flat_tissue(c, "CT")[0] for c in clean])
        region = fm if fm.sum() >= 200 else clean > -500
        sigma = float(added[keep][:, box[0], box[1]][region].std())
    else:
        sigma = float(condition["sigma_fraction"]) * ref_level
    cell = Cell(key, scored, sigma, float(np.nanmedian([reference_noise_sd(c, modality) for c in clean])))
    cell.seen = [m.card.name for m in models if seen_by(m.card, series.path)]
    to_unit, _ = _scorer(modality, vol.array if modality == "MR" else clean, (400.0, 50.0))
    outs: dict[str, np.ndarray] = {}
    if "input" in methods:
        outs["input"] = deg
    if "nlm" in methods:
        outs["nlm"], f = _oracle_nlm(deg, clean, sigma, to_unit)
        cell.notes.append(f"nlm h = {f:g} sigma")
    if "bm3d" in methods:
        outs["bm3d"] = _bm3d(deg, sigma)
    affine = _affine(vol, pixel)
    extra: dict[str, dict[str, Any]] = {}
    for m in models:
        out = _model_out(m, noisy, affine, modality, keep, vol)
        outs[m.card.name] = out[:, box[0], box[1]]
        # the model on the noise-free reference: its PSNR there is the ceiling of its PSNR against that
        # reference (what it removes of the reference's own noise counts as error). In a reference-limited
        # cell a model near its ceiling loses to the input because the reference is noisy, not because of
        # what it does with the added noise.
        ref_out = _model_out(m, block, affine, modality, keep, vol)[:, box[0], box[1]]
        rp, rs = _score(to_unit, clean, ref_out)
        extra[m.card.name] = {"ref_psnr": round(rp, 3), "ref_ssim": round(rs, 4),
                              "guard": guard_flags(m, noisy, affine, modality, vol)}
    _score_methods(cell, to_unit, clean, outs)
    for name, e in extra.items():
        cell.scores[name].update(e)
    return cell


def deblur_cell(series: Series, condition: dict[str, Any], models: Sequence[Any] = (), *,
                slices: int = 2, crop: int = 256, methods: Sequence[str] = ("input", "rl")) -> Cell:
    """Gaussian blur ``fwhm_vox`` (in-plane voxels) then white noise ``noise`` x the 1-99 % range; score.

    Richardson-Lucy gets the true PSF, reflect padding, and the best of :data:`RL_ITERATIONS`.
    """
    from .degrade import degrade, gaussian_psf
    from .intensity import sample_values

    vol, modality = series.volume, series.modality
    context = max([m.card.context for m in models] + [0])
    scored, block_z = pick_block(vol.array.shape[0], slices, context)
    keep = [block_z.index(z) for z in scored]
    block = vol.array[block_z].astype(np.float32)
    dy, dx = vol.spacing[1:]
    p1, p99 = np.percentile(sample_values(vol.array), [1, 99])
    sd = float(condition["noise"]) * float(p99 - p1)
    seed = cell_seed(series.path, *sorted(condition.items()))
    deg_block = degrade(block, "gaussian_blur", seed=seed, spacing_mm=vol.spacing,
                        fwhm_mm=float(condition["fwhm_vox"]) * dy, noise_sd=sd)
    box = _crop_box(block.shape[1:], crop)
    clean, deg = block[keep][:, box[0], box[1]], deg_block[keep][:, box[0], box[1]]
    cell = Cell({"series": series.name, "modality": modality, **condition}, scored, sd)
    cell.seen = [m.card.name for m in models if seen_by(m.card, series.path)]
    to_unit, _ = _scorer(modality, vol.array, (400.0, 50.0))
    outs: dict[str, np.ndarray] = {}
    if "input" in methods:
        outs["input"] = deg
    if "rl" in methods:
        psf = gaussian_psf(float(condition["fwhm_vox"]) * dy, (dy, dx))
        offset = 1024.0 if modality == "CT" else 0.0
        best = None
        for it in RL_ITERATIONS:
            out = np.stack([_rl(s, psf, offset, num_iter=it) for s in deg])
            ps = _score(to_unit, clean, out)[0]
            if best is None or ps > best[0]:
                best = (ps, out, it)
        outs["rl"] = best[1]
        cell.notes.append(f"rl {best[2]} iterations")
    guard = {}
    for m in models:
        out = _model_out(m, deg_block, vol.affine, modality, keep, vol)
        outs[m.card.name] = out[:, box[0], box[1]]
        guard[m.card.name] = guard_flags(m, deg_block, vol.affine, modality, vol)
    _score_methods(cell, to_unit, clean, outs)
    for name, g in guard.items():
        cell.scores[name]["guard"] = g
    return cell


# ---------------------------------------------------------------------------- real scans, no added noise
def gradient_magnitude(img: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian gradient magnitude (image units per pixel)."""
    return ndi.gaussian_gradient_magnitude(np.asarray(img, np.float64), sigma)


def real_scan_measures(inp: np.ndarray, out: np.ndarray, modality: str) -> dict[str, float]:
    """Flat-tissue noise SD of input and output and corr(|input - output|, |grad input|) in the body.

    ``inp``, ``out``: ``(z, y, x)`` slices (already cropped). The flat mask comes from the input
    (:func:`metrics.flat_tissue`); the correlation is taken over the body (CT > -500 HU) or the MR
    foreground (above the Otsu threshold).
    """
    from skimage.filters import threshold_otsu

    sd_in, sd_out, rs = [], [], []
    for a, b in zip(inp, out):
        mask, _ = flat_tissue(a, modality)
        if mask.sum() >= 200:
            try:
                si, so = noise_sd_estimate(a, mask), noise_sd_estimate(b, mask)
                sd_in.append(si)
                sd_out.append(so)
            except InputError:  # the flat region is too thin for 5x5 windows
                pass
        body = a > (-500 if modality == "CT" else threshold_otsu(a))
        res, g = np.abs(a.astype(np.float64) - b)[body], gradient_magnitude(a)[body]
        if res.std() > 0 and g.std() > 0:
            rs.append(float(np.corrcoef(res, g)[0, 1]))
    nan = float("nan")
    si, so = (float(np.mean(sd_in)), float(np.mean(sd_out))) if sd_in else (nan, nan)
    return {"sd_in": si, "sd_out": so, "sd_drop": 1 - so / si if si == si and si > 0 else nan,
            "residual_gradient_corr": float(np.mean(rs)) if rs else nan}


# ---------------------------------------------------------------------------- low contrast
LC_CONTRASTS_HU = (3.0, 7.0, 14.0)
LC_DIAMETERS_MM = (3.0, 5.0, 10.0)


def place_disks(region: np.ndarray, diameters_px: Sequence[float], gap_px: float) -> list[tuple[float, float] | None]:
    """Centres for disks inside ``region`` (largest first, each with a ring of ``gap_px`` around it, no overlap)."""
    free = region.copy()
    out: list[tuple[float, float] | None] = [None] * len(diameters_px)
    yy, xx = np.indices(region.shape)
    for i in np.argsort(diameters_px)[::-1]:
        r = diameters_px[i] / 2 + gap_px
        dist = ndi.distance_transform_edt(free)
        if dist.max() < r:
            continue
        cy, cx = np.unravel_index(int(np.argmax(dist)), dist.shape)
        out[i] = (float(cy), float(cx))
        free &= (yy - cy) ** 2 + (xx - cx) ** 2 > (r + gap_px) ** 2
    return out


def disk_image(shape: tuple[int, int], centre: tuple[float, float], diameter_px: float, supersample: int = 4) -> np.ndarray:
    """A disk of value 1 (area-weighted at the edge) on zeros."""
    yy, xx = np.indices(shape, dtype=np.float64)
    acc = np.zeros(shape)
    offs = (np.arange(supersample) + 0.5) / supersample - 0.5
    for oy in offs:
        for ox in offs:
            acc += ((yy + oy - centre[0]) ** 2 + (xx + ox - centre[1]) ** 2) <= (diameter_px / 2) ** 2
    return acc / supersample**2


def contrast_and_cnr(present: np.ndarray, absent: np.ndarray, disk: np.ndarray, contrast: float,
                     ring_px: float) -> tuple[float, float]:
    """(contrast kept, CNR) of one disk (``disk``: its 0..1 footprint, area-weighted at the edge).

    Kept: the paired mean of ``present - absent`` inside the disk (footprint > 0.5) over the
    inserted signal there; CNR: the kept contrast over the SD of ``absent`` in the disk and a ring
    of ``ring_px`` around it."""
    inside = disk > 0.5
    if not inside.any():
        return float("nan"), float("nan")
    around = ndi.distance_transform_edt(~inside) <= ring_px
    signal = contrast * float(disk[inside].mean())
    kept = float((present - absent)[inside].mean()) / signal
    sd = float(absent[around].std())
    return kept, kept * signal / sd if sd > 0 else float("inf")


__all__ = ["CT_FILTERS", "CT_DOSES", "CT_PIXELS", "MR_SIGMAS", "BLUR_FWHM", "BLUR_NOISE", "RL_ITERATIONS",
           "CT_SERIES", "MR_SERIES", "REAL_SERIES", "EXCLUDED", "Series", "Cell", "load_series", "seen_by",
           "denoise_cell", "deblur_cell", "real_scan_measures", "place_disks", "disk_image", "contrast_and_cnr",
           "gradient_magnitude", "pick_block", "resample_block", "reference_noise_sd", "cell_seed", "guard_flags"]
