"""Evaluation of restoration methods on clean volumes with a simulated degradation.

Given clean volumes, a degradation (:func:`napari_restore.degrade.degrade`) and methods, report
PSNR and SSIM per volume and overall, plus the time per slice, as a Markdown table and a PNG panel
(input / each method / reference, one window).

Methods:

- ``"input"``: the degraded image itself (the baseline every method must beat).
- ``"model"``: a trained model (name, folder or bundle) run with :func:`napari_restore.restore`
  slice by slice (``mode="2d"``) or as a volume (3-D models).
- ``"nlm"``: scikit-image non-local means (``patch_size=5, patch_distance=6``, fast mode, the true
  noise SD as ``sigma``) with ``h`` grid-searched per volume on ONE tuning slice (not one of the
  scored slices) against its clean reference.
- ``"bm3d"``: BM3D (the optional ``bm3d`` package, ``pip install napari-restore[benchmark]``)
  given the TRUE noise SD; skipped with a note when not installed.
- ``"rl"``: Richardson-Lucy deconvolution (scikit-image, 20 iterations) with the true PSF and
  reflect padding done here; blur degradations only.

Conventions (also written into every result): CT PSNR/SSIM are computed on HU windowed to
``[0, 1]`` (abdomen W400/L50 by default) with data range 1; MR on intensities mapped by the clean
volume's 1st/99th percentiles to 0/1, data range 1. PSNR pools the squared error of all scored
slices of a volume; SSIM is the mean of the slice SSIMs; "overall" is the mean over volumes.
CT noise is simulated in the projection domain on whole slices (crops are taken afterwards).
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from .errors import InputError, OutputError
from .constants import ENSEMBLE_SIZES
from .volume import Volume

METHODS = ("input", "model", "nlm", "bm3d", "rl")
_DEFAULT_PARAMS: dict[str, dict[str, Any]] = {
    "ct_lowdose": {"dose": 0.25},
    "mr_rician": {"sigma_fraction": 0.05},
    "gaussian_blur": {"fwhm_vox": 2.0},
    "motion_blur": {"length_vox": 5.0, "angle_deg": 30.0},
}
_NLM_FACTORS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.2, 1.5)


@dataclass
class EvalResult:
    """Scores of every method on every volume.

    Attributes:
        rows: one dict per (volume, method): ``volume``, ``method``, ``psnr`` (dB), ``ssim``,
            ``sec_per_slice``, ``slices``.
        overall: per method: mean ``psnr``, ``ssim`` over volumes, mean ``sec_per_slice``.
        degradation, params: what was simulated; ``convention``: how metrics were computed.
        notes: tuning choices, skipped methods, noise SDs.
        panel: images of one slice for :meth:`save_panel` (``"reference"``, ``"input"``, methods),
            display range ``panel_range``.
    """

    degradation: str
    params: dict[str, Any]
    convention: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    overall: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    machine: str = ""
    panel: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    panel_range: tuple[float, float] = (0.0, 1.0)
    panel_title: str = ""

    def to_markdown(self) -> str:
        """The report: settings, conventions, per-volume and overall tables."""
        lines = [f"## Evaluation: {self.degradation} {json.dumps(self.params)}", "",
                 f"- metrics: {self.convention}", f"- machine: {self.machine}"]
        lines += [f"- {n}" for n in self.notes]
        lines += ["", "| volume | method | PSNR (dB) | SSIM | s/slice | slices |", "|---|---|---|---|---|---|"]
        for r in self.rows:
            lines.append(f"| {r['volume']} | {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | "
                         f"{r['sec_per_slice']:.3f} | {r['slices']} |")
        lines += ["", "**Overall** (mean over volumes)", "", "| method | PSNR (dB) | SSIM | s/slice |",
                  "|---|---|---|---|"]
        for m, o in self.overall.items():
            lines.append(f"| {m} | {o['psnr']:.2f} | {o['ssim']:.4f} | {o['sec_per_slice']:.3f} |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"degradation": self.degradation, "params": self.params, "convention": self.convention,
                "rows": self.rows, "overall": self.overall, "notes": self.notes, "machine": self.machine}

    def save_panel(self, path: str | os.PathLike) -> Path:
        """PNG: reference, input and every method on one slice, one display window (matplotlib Agg)."""
        from .figures import pyplot

        plt = pyplot()
        path = Path(path)
        if not self.panel:
            raise OutputError("no panel images (nothing was evaluated)", path)
        names = ["input", *[k for k in self.panel if k not in ("input", "reference")], "reference"]
        lo, hi = self.panel_range
        fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.6), squeeze=False)
        for ax, name in zip(axes[0], names):
            ax.imshow(self.panel[name], cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
            score = next((r for r in self.rows if r["method"] == name and r["volume"] == self.panel_title), None)
            sub = f"\n{score['psnr']:.2f} dB / {score['ssim']:.3f}" if score else ""
            ax.set_title(name + sub, fontsize=9)
            ax.axis("off")
        fig.suptitle(f"{self.panel_title}: {self.degradation} {json.dumps(self.params)}", fontsize=9)
        fig.tight_layout(rect=(0, 0, 1, 0.92))
        from .io.atomic import atomic_file

        with atomic_file(path, overwrite=True) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
        plt.close(fig)
        return path

    def save(self, folder: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write ``evaluation.md``, ``evaluation.json`` and ``panel.png`` into ``folder`` (atomically)."""
        from .io.atomic import atomic_dir

        folder = Path(folder)
        with atomic_dir(folder, overwrite=overwrite) as tmp:
            (tmp / "evaluation.md").write_text(self.to_markdown(), encoding="utf-8")
            (tmp / "evaluation.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
            self.save_panel(tmp / "panel.png")
        return folder


def machine_description() -> str:
    import torch

    return (f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__} ({torch.get_num_threads()} threads)")


# ---------------------------------------------------------------------------- helpers
def _volumes(sources: Sequence[Any]) -> list[tuple[str, Volume]]:
    from .io import load

    out = []
    for s in sources:
        if isinstance(s, Volume):
            out.append((str(s.meta.get("description") or s.meta.get("source_path") or f"volume{len(out)}"), s))
            continue
        vols = load(s)
        v = vols[0]
        if v.array.ndim == 4:
            v = Volume(v.array[0], v.affine, v.modality, v.meta)
        out.append((Path(s).name, v))
    if not out:
        raise InputError("evaluate: no volumes given")
    return out


def _scorer(modality: str, clean: np.ndarray, window: tuple[float, float]):
    """``(to_unit, data_range)``: the mapping of images onto the scale the metrics use."""
    if modality == "CT":
        from .metrics import window as win

        w, l = window
        return (lambda a: win(a, w, l)), 1.0
    from .intensity import MR_DEFAULT, Normalizer

    norm = Normalizer.fit(MR_DEFAULT, clean)
    return (lambda a: np.asarray(norm.forward(np.asarray(a, np.float32)), np.float64)), 1.0


def _score(to_unit, ref: np.ndarray, test: np.ndarray) -> tuple[float, float]:
    from .metrics import psnr, ssim

    a, b = to_unit(ref), to_unit(test)
    return psnr(a, b, 1.0), ssim(a, b, 1.0)


def _crop_box(shape: tuple[int, int], crop: int | None) -> tuple[slice, slice]:
    if not crop:
        return slice(None), slice(None)
    cy, cx = min(crop, shape[0]), min(crop, shape[1])
    y0, x0 = (shape[0] - cy) // 2, (shape[1] - cx) // 2
    return slice(y0, y0 + cy), slice(x0, x0 + cx)


def _degrade_params(kind: str, params: dict[str, Any], spacing: tuple[float, float, float]) -> dict[str, Any]:
    p = {**_DEFAULT_PARAMS.get(kind, {}), **params}
    dy = spacing[1]
    if kind == "gaussian_blur" and "fwhm_vox" in p:
        p["fwhm_mm"] = float(p.pop("fwhm_vox")) * dy
    if kind == "motion_blur" and "length_vox" in p:
        p["length_mm"] = float(p.pop("length_vox")) * dy
    return p


def _psf(kind: str, p: dict[str, Any], spacing) -> np.ndarray:
    from .degrade import gaussian_psf, motion_psf

    if kind == "gaussian_blur":
        fw = np.asarray(p["fwhm_mm"], float).ravel()
        return gaussian_psf(fw[-2:] if fw.size > 1 else fw, spacing[1:])
    return motion_psf(p["length_mm"], p["angle_deg"], spacing[1:])


def _nlm(img: np.ndarray, sigma: float, h: float) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(img.astype(np.float64), h=h, sigma=sigma, patch_size=5, patch_distance=6,
                            fast_mode=True).astype(np.float32)


def _rl(img: np.ndarray, psf: np.ndarray, offset: float, num_iter: int = 20) -> np.ndarray:
    from skimage.restoration import richardson_lucy

    py, px = psf.shape[0], psf.shape[1]
    pad = ((py, py), (px, px))
    x = np.maximum(np.pad(img.astype(np.float64) + offset, pad, mode="reflect"), 0.0)
    out = richardson_lucy(x, psf, num_iter=num_iter, clip=False)
    return (out[py:-py, px:-px] - offset).astype(np.float32)


# ---------------------------------------------------------------------------- main
def evaluate(sources: Sequence[str | os.PathLike | Volume], degradation: str = "ct_lowdose",
             params: dict[str, Any] | None = None, methods: Sequence[str] = ("input", "nlm", "bm3d", "model"),
             model: Any = None, slices: int = 4, crop: int | None = None, seed: int = 0,
             ct_window: tuple[float, float] = (400.0, 50.0), device: str = "cpu",
             progress: Callable[[int, int], Any] | None = None, whole_volume: bool = False,
             ensemble: int | None = None) -> EvalResult:
    """Degrade clean volumes, restore them with each method, score against the clean reference.

    Args:
        sources: clean volumes: paths (the main series of each is used) or :class:`Volume` objects.
        degradation: ``"ct_lowdose"``, ``"mr_rician"``, ``"gaussian_blur"`` or ``"motion_blur"``.
        params: degradation parameters (see :func:`napari_restore.degrade.degrade`); defaults:
            dose 0.25, sigma_fraction 0.05, ``fwhm_vox`` 2 (FWHM in in-plane voxels), motion
            ``length_vox`` 5 at 30 deg. CT noise is projection-domain (FBP) unless
            ``method="image"`` is given. For the blurs, ``noise_range_fraction`` (default 0)
            adds white noise after the blur with SD = that fraction of the clean volume's
            1st-99th percentile range (``0.01`` = "1 % noise"); ``noise_sd`` gives it in image
            units instead.
        methods: subset of :data:`METHODS`; ``"model"`` needs ``model``.
        model: model name, folder, bundle or ``LoadedModel`` for ``"model"``.
        slices: slices scored per volume (evenly spaced over the middle 80 %).
        crop: centre crop side in pixels applied AFTER the degradation (``None`` = whole slices).
        seed: degradation seed (volume ``i`` uses ``seed + i``).
        ct_window: ``(width, level)`` of the CT metric window.
        device: torch device for the model.
        progress: ``progress(done, total)`` after every method of every volume.
        whole_volume: degrade every slice (not only the scored ones) and give the model the whole
            degraded volume; forced for 3-D models, which need the neighbouring slices. The noise
            realisation differs from a run without it: compare 2-D and 3-D models with it on.
        ensemble: the model's geometric self-ensemble (see :func:`napari_restore.restore`);
            ``None`` = its card's.

    Raises:
        InputError: unknown degradation/method, missing model, unreadable volume.
    """
    from .degrade import degrade

    methods = list(dict.fromkeys(methods))
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise InputError(f"unknown evaluation method(s) {bad}; choose from {METHODS}")
    if degradation not in _DEFAULT_PARAMS:
        raise InputError(f"unknown degradation {degradation!r}; choose from {tuple(_DEFAULT_PARAMS)}")
    if "model" in methods and model is None:
        raise InputError("method 'model' needs a model (name, folder or bundle)")
    blur_kind = degradation in ("gaussian_blur", "motion_blur")
    notes: list[str] = []
    if "rl" in methods and not blur_kind:
        methods.remove("rl")
        notes.append("Richardson-Lucy skipped: it deconvolves blur, the degradation adds noise only")
    if "bm3d" in methods:
        try:
            import bm3d  # noqa: F401
        except ImportError:
            methods.remove("bm3d")
            notes.append("BM3D skipped: the optional 'bm3d' package is not installed (pip install bm3d)")
    loaded = None
    if "model" in methods:
        from .models import LoadedModel, load_model

        loaded = model if isinstance(model, LoadedModel) else load_model(model, device="cpu")
        n_ens = loaded.card.self_ensemble if ensemble is None else int(ensemble)
        notes.append(f"model: {loaded.card.name} {loaded.card.version} ({loaded.card.task}, {loaded.card.modality}, "
                     f"{loaded.card.dims}-D)" + (f", self-ensemble of {n_ens} flips/rotations" if n_ens > 1 else ""))
        context = loaded.card.context
        if (loaded.card.dims == 3 or context) and not whole_volume:
            whole_volume = True
            notes.append(f"{'3-D model' if loaded.card.dims == 3 else f'2-D model with {context} neighbouring slices per side'}: "
                         "every slice is degraded and the model sees the whole degraded volume")
    vols = _volumes(sources)
    params = dict(params or {})
    result = EvalResult(degradation, params, "", machine=machine_description())
    total, done = len(vols) * len(methods), 0
    modalities = set()
    for vi, (vname, vol) in enumerate(vols):
        modality = vol.modality if vol.modality in ("CT", "MR") else "MR"
        modalities.add(modality)
        nz = vol.array.shape[0]
        lo_z, hi_z = int(round(0.1 * (nz - 1))), int(round(0.9 * (nz - 1)))
        zs = np.unique(np.linspace(lo_z, hi_z, min(slices, nz)).round().astype(int))
        free = [z for z in range(nz) if z not in set(zs)]
        if not free:
            free = [int(zs[0])]
            notes.append(f"{vname}: only {nz} slices, so the NLM tuning slice is also scored (ask for fewer slices)")
        z_tune = free[len(free) // 2]
        p = _degrade_params(degradation, params, vol.spacing)
        frac = float(p.pop("noise_range_fraction", 0.0) or 0.0)
        if blur_kind and frac > 0:
            from .intensity import sample_values

            p1, p99 = np.percentile(sample_values(vol.array), [1, 99])
            p["noise_sd"] = frac * float(p99 - p1)
            notes.append(f"{vname}: noise SD {frac:g} x the 1-99 % range ({p1:g} .. {p99:g}) = {p['noise_sd']:.3g}")
        idx = np.concatenate([zs, [z_tune]])
        whole_deg = None
        if whole_volume:
            whole_deg = degrade(vol.array.astype(np.float32), degradation, seed=seed + vi, spacing_mm=vol.spacing, **p)
            full_clean, full_deg = vol.array[idx].astype(np.float32), whole_deg[idx]
        else:
            full_clean = vol.array[idx].astype(np.float32)
            full_deg = degrade(full_clean, degradation, seed=seed + vi, spacing_mm=vol.spacing, **p)
        box = _crop_box(full_clean.shape[1:], crop)
        clean, deg = full_clean[:, box[0], box[1]], full_deg[:, box[0], box[1]]
        c_eval, d_eval = clean[:-1], deg[:-1]
        c_tune, d_tune = clean[-1], deg[-1]
        to_unit, _ = _scorer(modality, vol.array, ct_window)
        if blur_kind:  # the noise added after the blur is known exactly
            sigma = float(p.get("noise_sd", 0.0))
            notes.append(f"{vname}: slices {zs.tolist()} scored, slice {z_tune} for tuning; added noise SD {sigma:g}")
        else:
            diff = (deg - clean)
            inside = clean > -500 if modality == "CT" else np.ones(clean.shape, bool)
            sigma = float(diff[inside].std()) if inside.any() else float(diff.std())
            notes.append(f"{vname}: slices {zs.tolist()} scored, slice {z_tune} for tuning; true noise SD "
                         f"{sigma:.2f} {'HU (inside the body, > -500 HU)' if modality == 'CT' else '(image units)'}")
        outputs: dict[str, tuple[np.ndarray, float]] = {}
        for m in methods:
            if m in ("nlm", "bm3d") and sigma <= 0:
                notes.append(f"{vname}: {m} skipped: the degradation adds no noise")
                continue
            t0, n_run = time.perf_counter(), len(d_eval)
            if m == "input":
                out = d_eval
            elif m == "model":
                from .inference import restore

                mode = "2d" if loaded.card.dims == 2 else "3d"
                if whole_deg is not None:  # the whole degraded volume in, the scored slices out
                    sub = Volume(whole_deg, vol.affine, modality, {"description": vname})
                    out = restore(sub, task=loaded.card.task, model=loaded, mode=mode, device=device,
                                  ensemble=ensemble).array
                    out, n_run = out[zs][:, box[0], box[1]], len(whole_deg)
                else:
                    sub = Volume(d_eval, vol.affine, modality, {"description": vname})
                    out = restore(sub, task=loaded.card.task, model=loaded, mode=mode, device=device,
                                  ensemble=ensemble).array
            elif m == "nlm":
                grid = [f * max(sigma, 1e-6) for f in _NLM_FACTORS]
                scores = [(_score(to_unit, c_tune, _nlm(d_tune, sigma, h))[0], h) for h in grid]
                best_h = max(scores)[1]
                notes.append(f"{vname}: NLM h grid-searched on slice {z_tune} against its clean reference over "
                             f"{[round(h, 3) for h in grid]}: h = {best_h:.3f} (sigma = {sigma:.3f})")
                t0 = time.perf_counter()  # tuning time is not counted
                out = np.stack([_nlm(s, sigma, best_h) for s in d_eval])
            elif m == "bm3d":
                import bm3d

                out = np.stack([np.asarray(bm3d.bm3d(s.astype(np.float64), sigma_psd=sigma), np.float32) for s in d_eval])
            elif m == "rl":
                psf = _psf(degradation, p, vol.spacing)
                offset = 1024.0 if modality == "CT" else 0.0
                out = np.stack([_rl(s, psf, offset) for s in d_eval])
            else:  # pragma: no cover
                raise InputError(m)
            sec = (time.perf_counter() - t0) / n_run
            ps, ss = _score(to_unit, c_eval, out)
            result.rows.append({"volume": vname, "method": m, "psnr": round(ps, 3), "ssim": round(ss, 5),
                                "sec_per_slice": round(sec, 4), "slices": int(len(d_eval))})
            outputs[m] = (out, sec)
            done += 1
            if progress is not None:
                progress(done, total)
        if vi == 0:
            k = len(c_eval) // 2
            result.panel = {"input": d_eval[k], **{m: o[k] for m, (o, _) in outputs.items() if m != "input"},
                            "reference": c_eval[k]}
            if modality == "CT":
                w, l = ct_window
                result.panel_range = (l - w / 2, l + w / 2)
            else:
                result.panel_range = tuple(float(v) for v in np.percentile(c_eval, [1, 99]))
            result.panel_title = vname
    for m in methods:
        rs = [r for r in result.rows if r["method"] == m]
        if not rs:
            continue
        result.overall[m] = {k: round(float(np.mean([r[k] for r in rs])), 5) for k in ("psnr", "ssim", "sec_per_slice")}
    conv = []
    if "CT" in modalities:
        conv.append(f"CT: HU windowed W{ct_window[0]:g}/L{ct_window[1]:g} to [0, 1], data range 1")
    if "MR" in modalities:
        conv.append("MR: clean volume's 1st/99th percentiles mapped to 0/1, data range 1")
    result.convention = "; ".join(conv) + ("; PSNR pools the squared error of a volume's scored slices, SSIM "
                                           "(Wang et al. 2004, Gaussian sigma 1.5) is their mean")
    result.notes = notes + result.notes
    return result


__all__ = ["evaluate", "EvalResult", "METHODS", "machine_description"]


# ----------------------------------------------------------------------------- command line
DEGRADATIONS = ("ct_lowdose", "mr_rician", "gaussian_blur", "motion_blur")


def add_evaluate_arguments(ap) -> None:
    """The options of ``napari-restore evaluate`` (and ``benchmarks/evaluate_denoise.py``)."""
    ap.add_argument("data", nargs="+", help="clean scans: files or folders (DICOM, NIfTI, MHA/NRRD)")
    ap.add_argument("--degradation", default="ct_lowdose", choices=DEGRADATIONS,
                    help="simulated degradation (default ct_lowdose: projection-domain low-dose CT noise)")
    ap.add_argument("--dose", type=float, default=0.25, help="ct_lowdose: dose fraction of the source (0.25 = 25%%)")
    ap.add_argument("--ct-noise-method", default="projection", choices=("projection", "image"),
                    help="ct_lowdose: FBP of Poisson sinogram noise (projection) or its fast image-domain twin")
    ap.add_argument("--sigma-fraction", type=float, default=0.05, help="mr_rician: noise SD / tissue signal")
    ap.add_argument("--fwhm-vox", type=float, default=2.0, help="gaussian_blur: PSF FWHM in voxels")
    ap.add_argument("--noise-sd", type=float, default=0.0, help="blur: white noise after the blur, SD as a fraction "
                    "of the clean volume's 1st-99th percentile range (0.01 = 1 %%)")
    ap.add_argument("--methods", default="input,nlm,bm3d,model,rl",
                    help="comma-separated: input, model, nlm (tuned h), bm3d (if installed; true sigma), rl "
                         "(Richardson-Lucy, true PSF, blur only)")
    ap.add_argument("--model", default=None, help="model name, folder or MONAI bundle for the 'model' method (default: the best installed one)")
    ap.add_argument("--slices", type=int, default=4, help="slices per volume")
    ap.add_argument("--crop", type=int, default=256, help="in-plane centre crop (0 = whole slices)")
    ap.add_argument("--seed", type=int, default=0, help="random seed of the degradations")
    ap.add_argument("--device", default="cpu", help="compute device of the model: auto, cpu, cuda, cuda:N, mps")
    ap.add_argument("--ensemble", type=int, choices=ENSEMBLE_SIZES, default=None,
                    help="the model's self-ensemble of in-plane flips/rotations (default: its card's)")
    ap.add_argument("--whole-volume", action="store_true",
                    help="degrade every slice and restore the whole volume (always on for 3-D models)")
    ap.add_argument("--out", default="outputs/evaluate", help="folder for evaluation.md, evaluation.json, panel.png")


def run_from_args(args) -> EvalResult:
    """Run :func:`evaluate` from :func:`add_evaluate_arguments`' namespace; prints and saves the results."""
    params = {"ct_lowdose": {"dose": args.dose, "method": args.ct_noise_method},
              "mr_rician": {"sigma_fraction": args.sigma_fraction},
              "gaussian_blur": {"fwhm_vox": args.fwhm_vox, "noise_range_fraction": args.noise_sd},
              "motion_blur": {"noise_range_fraction": args.noise_sd}}[args.degradation]
    methods = [m for m in args.methods.split(",") if m and not (m == "model" and args.model is None)]
    print(f"machine: {machine_description()}")
    print(f"inputs: {args.data}; {args.degradation} {params}; {args.slices} slices/volume, crop {args.crop}")
    res = evaluate(args.data, args.degradation, params, methods=methods, model=args.model, slices=args.slices,
                   crop=args.crop or None, seed=args.seed, device=args.device, whole_volume=args.whole_volume,
                   ensemble=args.ensemble)
    print(res.to_markdown())
    out = res.save(args.out, overwrite=True)
    print(f"wrote {out}/evaluation.md, evaluation.json, panel.png")
    return res
