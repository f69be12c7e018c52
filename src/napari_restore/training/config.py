"""Training configuration (:class:`TrainConfig`) and result (:class:`TrainResult`).

The same dataclass backs the Python API (:func:`napari_restore.training.train`), the
``python -m napari_restore.training`` entry point and the ``napari-restore train`` sub-command
(:func:`add_train_arguments` / :func:`config_from_args` build it from ``argparse``).
"""
from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import ENSEMBLE_SIZES, IMAGE_MODALITIES, TRAIN_TASKS
from ..errors import InputError

MODES = ("supervised", "paired", "self-supervised")
SELF_SUPERVISED = ("n2n", "n2v")
SCHEDULES = ("cosine", "plateau", "none")
LOSSES = ("l1", "mse", "psnr")
KEEP_CHOICES = ("best", "last")


@dataclass
class TrainConfig:
    """Everything a training run needs; every field has a command-line twin (``--field-name``).

    Data:
        data: folders/files (DICOM series, NIfTI, MHA/NRRD) of training scans: clean-ish scans
            (``supervised``), the full-dose side (``paired``) or noisy scans (``self-supervised``).
        low_data: ``paired`` only: folders/files of the low-dose side, matched to ``data`` by
            position (series by geometry, slices by distance along the slice normal).
        val_data: validation scans; ``None`` = split ``data`` by patient/series (never slices of
            one series on both sides) with ``val_fraction``.
        cache_dir: folder for decoded, normalised float32 ``.npy`` volumes keyed by source path
            and modification time; ``None`` keeps them in memory only.
    Model:
        output: the model folder written at the end (``card.json`` + ``model.pt``).
        run_dir: checkpoints, ``log.csv``, TensorBoard; default ``<output>.run`` beside ``output``.
        task, modality (``auto`` = from the data), dims (2: slices, 3: patches), architecture
        (``ResidualUNet`` arguments; ``None`` = the default for ``dims``), context (2-D: neighbouring
        slices on each side as extra input channels, "2.5-D"; ``None`` = the architecture's or the
        init model's; a single-slice init model is widened, starting as the same function), noise_input
        (2-D: the network measures the noise level of the slice it is given and reads it as one more
        input channel, FFDNet-style; an init model without it is widened, starting as the same
        function), intensity (card spec;
        ``None`` = the modality default), init_model (fine-tune from an installed model name or a
        model folder / bundle path), resume (a checkpoint file or a run folder: continues from its
        last saved step).
    Degradations (``supervised``; ranges drawn uniformly per sample):
        dose_range (CT dose fraction), rician_range (MR noise SD / tissue signal), fwhm_range
        (blur FWHM in voxels), blur_noise (white noise SD added after blur, fraction of the
        normalised unit), blur_noise_range (instead: the SD drawn per sample from ``(low, high)`` x
        the series' 1-99 % intensity range, the matrix's convention), blur_anisotropy (largest
        ratio of the PSF's two in-plane FWHMs), blur_tail (largest weight of a second Gaussian
        twice as wide: a slightly non-Gaussian PSF), zoom_range (deblur: resample each patch by a
        factor drawn from ``(low, high)``, output pixels per source pixel; below 1 the detail per
        pixel is sharper than the source scans', as in a sharp kernel's scan), ct_noise_method
        (``image``: the fast image-domain method of :mod:`napari_restore.degrade`, the default;
        ``projection`` is ~100x slower per sample),
        ct_noise_hu (``(low, high)`` HU: instead of a dose, draw the added noise's median SD in the
        body from this range, keeping the low-dose model's texture and spatial variation; for
        training scans whose simulated dose noise is unrealistically low: small heads, phantoms,
        crops of a body, thick resampled slices). ct_filters (FBP filters of the image-domain
        noise; with several, two are drawn per sample and blended, an apodisation between them),
        ct_pixel_range (``(low, high)`` mm: resample each CT patch to an in-plane pixel size drawn
        from this range before the noise is added; ``None`` = native), log_draw (draw the dose or
        noise level log-uniformly, as many mild samples as strong ones), clean_fraction (share of
        samples given undegraded: the network learns to leave a clean image alone),
        single_slice_fraction (2.5-D: share of samples whose neighbours are the slice itself with
        the same noise, as a single-slice series reaches the model), disk_fraction (CT, 2-D:
        share of samples given a few faint disks, 2-12 mm and 2-30 HU, in the clean patch and its
        target: lesions' stand-ins the network learns to keep; :func:`.patches.faint_disks`), disk_weight (the
        loss weight of the disks' pixels, the others weighing 1; L1 or MSE loss), smooth_fraction (2-D:
        share of samples whose clean patch, and so its target, is smoothed by a Gaussian of SD drawn from
        smooth_sigma pixels before the noise: anatomy as smooth as a thick-slice head CT's brain, where
        noise blotches wider than a few pixels are noise, not texture), target_nlm (cleaner targets:
        each training slice's own noise removed by non-local means with ``h`` this multiple of
        its measured noise SD, so the network learns to remove a scan's native noise too; 0 =
        the scans as they are; :mod:`.targets`), distill_ensemble (supervised fine-tune: the
        target moves towards the init model averaged over this many in-plane flips/rotations, 2, 4
        or 8, so that one pass learns what the self-ensemble does; 0 = off), distill_weight (how
        far: 1 = the ensemble's output alone, 0.5 = half way between it and the training target).
    Self-supervised:
        self_supervised: ``n2n`` (Neighbor2Neighbor, default) or ``n2v`` (Noise2Void);
        n2n_gamma: weight of the N2N regulariser; pd_factor: pixel-shuffle downsampling factor
        applied before the N2N sub-sampler (remedy for spatially correlated noise; 1 = off;
        ``None`` = 2 for CT, whose FBP noise is correlated, 1 for MR);
        blind_spot: N2V blind-spot box side in pixels (1 = classic N2V; 3 or 5 = structured
        blind spot for correlated CT noise); n2v_spacing: grid spacing of N2V masked pixels
        (default ``max(6, 4.5 * blind_spot)``: at most ~5 % of the input is replaced, so that the
        training input stays close to what the network sees at inference).
    Optimisation:
        patch_size, batch_size, epochs, steps_per_epoch, lr, weight_decay, schedule, loss,
        ssim_weight (weight of MONAI ``SSIMLoss`` added to L1/MSE), patience (early stopping on
        validation loss, 0 = off), max_minutes (stop after the first epoch that ends past this
        wall time, with a cosine schedule spanning that time; 0 = no limit), keep (which weights
        the model folder gets: ``"best"``, the epoch of the lowest validation loss, or ``"last"``,
        the end of the schedule, for a validation set that does not stand for the conditions the
        model is for), val_slices (validation
        slices/patches per volume, at most), val_crop (in-plane crop side of validation slices, 0 = whole slices), augment, jitter
        (relative intensity jitter, applied to input and target alike), reslice (2-D: also draw
        training slices across the other two axes of series whose voxels are near-isotropic,
        see :func:`~napari_restore.training.data.resliced_views`; not for CT denoising, whose
        noise is simulated in the axial plane, nor paired data), seed, device, num_workers.
    Output card: name (default: the output folder's name), version, description, license,
        data_description (what the card names as training data instead of the file paths, e.g.
        napari layer names for data written to a temporary folder), overwrite; tensorboard, progress_bar; command (recorded in the card; default sys.argv).
    """

    data: list[str]
    output: str
    mode: str = "supervised"
    task: str = "denoise"
    modality: str = "auto"
    low_data: list[str] = field(default_factory=list)
    val_data: list[str] = field(default_factory=list)
    val_fraction: float = 0.2
    cache_dir: str | None = None
    run_dir: str | None = None
    dims: int = 2
    architecture: dict[str, Any] | None = None
    context: int | None = None
    noise_input: bool = False
    intensity: dict[str, Any] | None = None
    init_model: str | None = None
    resume: str | None = None
    dose_range: tuple[float, float] = (0.1, 0.5)
    rician_range: tuple[float, float] = (0.02, 0.10)
    fwhm_range: tuple[float, float] = (1.0, 3.0)
    blur_noise: float = 0.0
    blur_noise_range: tuple[float, float] | None = None
    blur_anisotropy: float = 1.0
    blur_tail: float = 0.0
    zoom_range: tuple[float, float] | None = None
    ct_noise_method: str = "image"
    ct_noise_hu: tuple[float, float] | None = None
    ct_filters: tuple[str, ...] = ("cosine",)
    ct_pixel_range: tuple[float, float] | None = None
    log_draw: bool = False
    clean_fraction: float = 0.0
    single_slice_fraction: float = 0.0
    disk_fraction: float = 0.0
    disk_weight: float = 1.0
    smooth_fraction: float = 0.0
    smooth_sigma: tuple[float, float] = (0.5, 2.0)
    target_nlm: float = 0.0
    distill_ensemble: int = 0
    distill_weight: float = 1.0
    self_supervised: str = "n2n"
    n2n_gamma: float = 1.0
    pd_factor: int | None = None
    blind_spot: int = 1
    n2v_spacing: int | None = None
    patch_size: tuple[int, ...] = (128, 128)
    batch_size: int = 16
    epochs: int = 50
    steps_per_epoch: int = 100
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    loss: str = "l1"
    ssim_weight: float = 0.0
    patience: int = 10
    max_minutes: float = 0.0
    keep: str = "best"
    val_slices: int = 8
    val_crop: int = 256
    augment: bool = True
    jitter: float = 0.05
    reslice: bool = False
    seed: int = 0
    device: str = "auto"
    num_workers: int = 0
    name: str | None = None
    version: str = "0.1.0"
    description: str = ""
    license: str = ""
    data_description: list[str] = field(default_factory=list)
    overwrite: bool = False
    tensorboard: bool = True
    progress_bar: bool = True
    command: str | None = None

    # ------------------------------------------------------------------ checks
    def validate(self) -> "TrainConfig":
        """Check the arguments; raises :class:`InputError` naming the bad one."""
        def bad(msg: str) -> InputError:
            return InputError(f"training configuration: {msg}")

        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]
        self.data = [str(p) for p in self.data]
        self.low_data = [str(p) for p in ([self.low_data] if isinstance(self.low_data, (str, Path)) else self.low_data)]
        self.val_data = [str(p) for p in ([self.val_data] if isinstance(self.val_data, (str, Path)) else self.val_data)]
        if not self.data:
            raise bad("no training data given")
        if self.mode not in MODES:
            raise bad(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.task not in TRAIN_TASKS:
            raise bad(f"task must be one of {TRAIN_TASKS}, got {self.task!r}")
        if self.mode != "supervised" and self.task != "denoise":
            raise bad(f"mode {self.mode!r} trains denoisers only (task='denoise')")
        if self.mode == "paired" and not self.low_data:
            raise bad("paired mode needs low_data (the low-dose scans matched to data)")
        if self.mode != "paired" and self.low_data:
            raise bad("low_data is only used in paired mode")
        self.modality = self.modality if self.modality == "auto" else str(self.modality).upper()
        if self.modality not in ("auto", *IMAGE_MODALITIES):
            raise bad(f"modality must be 'auto', 'CT' or 'MR', got {self.modality!r}")
        if self.dims not in (2, 3):
            raise bad(f"dims must be 2 or 3, got {self.dims!r}")
        if self.noise_input and self.dims != 2:
            raise bad("noise_input (the measured noise level as an input channel) needs dims=2")
        if self.context is not None and (int(self.context) < 0 or (int(self.context) and self.dims != 2)):
            raise bad(f"context (neighbouring slices per side) must be >= 0 and needs dims=2, got {self.context!r}")
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dims == 3 and self.patch_size == (128, 128):  # the 2-D default left in place
            self.patch_size = (32, 96, 96)
        if len(self.patch_size) == 1:
            self.patch_size = self.patch_size * self.dims
        if len(self.patch_size) != self.dims or min(self.patch_size) < 16:
            raise bad(f"patch_size must be {self.dims} sizes >= 16, got {self.patch_size}")
        for name in ("batch_size", "epochs", "steps_per_epoch"):
            if int(getattr(self, name)) < 1:
                raise bad(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise bad(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.schedule not in SCHEDULES:
            raise bad(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.loss not in LOSSES:
            raise bad(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.keep not in KEEP_CHOICES:
            raise bad(f"keep must be one of {KEEP_CHOICES}, got {self.keep!r}")
        if self.self_supervised not in SELF_SUPERVISED:
            raise bad(f"self_supervised must be one of {SELF_SUPERVISED}, got {self.self_supervised!r}")
        if self.ct_noise_method not in ("image", "projection"):
            raise bad(f"ct_noise_method must be 'image' or 'projection', got {self.ct_noise_method!r}")
        lo, hi = (float(v) for v in self.dose_range)
        if not 0.0 < lo <= hi <= 1.0:
            raise bad(f"dose_range must be 0 < low <= high <= 1, got {self.dose_range}")
        if self.ct_noise_hu is not None:
            lo, hi = (float(v) for v in self.ct_noise_hu)
            if not 0.0 < lo <= hi:
                raise bad(f"ct_noise_hu must be 0 < low <= high (HU), got {self.ct_noise_hu}")
        from ..degrade import _FILTERS

        self.ct_filters = tuple(str(f) for f in ([self.ct_filters] if isinstance(self.ct_filters, str) else self.ct_filters))
        if not self.ct_filters or any(f not in _FILTERS for f in self.ct_filters):
            raise bad(f"ct_filters must be among {_FILTERS}, got {self.ct_filters}")
        if self.ct_pixel_range is not None:
            lo, hi = (float(v) for v in self.ct_pixel_range)
            if not 0.0 < lo <= hi:
                raise bad(f"ct_pixel_range must be 0 < low <= high (mm), got {self.ct_pixel_range}")
        if not 0.0 <= self.clean_fraction < 1.0:
            raise bad(f"clean_fraction must be in [0, 1), got {self.clean_fraction}")
        if not 0.0 <= self.target_nlm <= 3.0:
            raise bad(f"target_nlm (NLM h as a multiple of the noise SD; 0 = off) must be in [0, 3], got {self.target_nlm}")
        if not 0.0 <= self.single_slice_fraction < 1.0:
            raise bad(f"single_slice_fraction must be in [0, 1), got {self.single_slice_fraction}")
        if not 0.0 <= self.disk_fraction <= 1.0:
            raise bad(f"disk_fraction must be in [0, 1], got {self.disk_fraction}")
        if not self.disk_weight > 0:
            raise bad(f"disk_weight must be > 0, got {self.disk_weight}")
        if self.disk_weight != 1.0 and not self.disk_fraction > 0:
            raise bad(f"disk_weight {self.disk_weight} needs disk_fraction > 0")
        if not 0.0 <= self.smooth_fraction <= 1.0:
            raise bad(f"smooth_fraction must be in [0, 1], got {self.smooth_fraction}")
        if not 0.0 < self.smooth_sigma[0] <= self.smooth_sigma[1]:
            raise bad(f"smooth_sigma must be 0 < low <= high pixels, got {self.smooth_sigma}")
        if self.smooth_fraction and (self.mode != "supervised" or self.dims != 2):
            raise bad(f"smooth_fraction is for supervised 2-D / 2.5-D training, got {self.mode} {self.dims}-D")
        if self.target_nlm and self.mode != "supervised":
            raise bad(f"target_nlm (cleaner targets) is for supervised training, not {self.mode}")
        if self.disk_weight != 1.0 and self.loss not in ("l1", "mse"):
            raise bad(f"disk_weight needs the l1 or mse loss, got {self.loss!r}")
        if self.distill_ensemble not in (0, *ENSEMBLE_SIZES[1:]):
            raise bad(f"distill_ensemble must be 0 (off) or one of {ENSEMBLE_SIZES[1:]}, got {self.distill_ensemble}")
        if self.distill_ensemble and (self.mode != "supervised" or not self.init_model):
            raise bad("distill_ensemble needs supervised training from an init model (--init-model): "
                      "the init model's self-ensemble is the teacher")
        if not 0.0 < self.distill_weight <= 1.0:
            raise bad(f"distill_weight must be in (0, 1], got {self.distill_weight}")
        lo, hi = (float(v) for v in self.rician_range)
        if not 0.0 <= lo <= hi:
            raise bad(f"rician_range must be 0 <= low <= high, got {self.rician_range}")
        lo, hi = (float(v) for v in self.fwhm_range)
        if not 0.0 < lo <= hi:
            raise bad(f"fwhm_range must be 0 < low <= high (voxels), got {self.fwhm_range}")
        if self.blur_noise_range is not None:
            lo, hi = (float(v) for v in self.blur_noise_range)
            if not 0.0 <= lo <= hi <= 0.5:
                raise bad(f"blur_noise_range must be 0 <= low <= high <= 0.5 (fraction of the range), got {self.blur_noise_range}")
        if not 1.0 <= self.blur_anisotropy <= 4.0:
            raise bad(f"blur_anisotropy (ratio of the two FWHMs) must be in [1, 4], got {self.blur_anisotropy}")
        if not 0.0 <= self.blur_tail < 1.0:
            raise bad(f"blur_tail must be in [0, 1), got {self.blur_tail}")
        if self.zoom_range is not None:
            lo, hi = (float(v) for v in self.zoom_range)
            if not 0.4 <= lo <= hi <= 2.5:
                raise bad(f"zoom_range must be 0.4 <= low <= high <= 2.5 (output pixels per source pixel), got {self.zoom_range}")
        if (self.pd_factor is not None and self.pd_factor < 1) or self.blind_spot < 1 or self.blind_spot % 2 == 0:
            raise bad("pd_factor must be >= 1 and blind_spot an odd number >= 1")
        if self.n2v_spacing is None:  # keep the masked share of the input near 5 % or below
            self.n2v_spacing = max(6, int(round(4.5 * self.blind_spot)))
        if self.n2v_spacing < self.blind_spot + 2:
            raise bad(f"n2v_spacing must be at least blind_spot + 2 = {self.blind_spot + 2}")
        pd = self.pd_factor or 2
        if self.mode == "self-supervised" and any(p % (2 * pd) for p in self.patch_size[-2:]):
            raise bad(f"patch_size {self.patch_size} must be a multiple of 2 * pd_factor = {2 * pd} in-plane")
        if self.reslice and (self.dims != 2 or self.mode == "paired"):
            raise bad("reslice draws 2-D slices across the other axes of unpaired series: needs dims=2, not paired mode")
        if self.lr <= 0 or self.weight_decay < 0 or self.ssim_weight < 0 or self.jitter < 0:
            raise bad("lr must be > 0; weight_decay, ssim_weight and jitter >= 0")
        if self.name is None:
            self.name = Path(self.output).name or "model"
        if self.command is None:
            self.command = invocation()
        return self

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        out = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}

    @property
    def run_path(self) -> Path:
        """Folder for checkpoints and logs."""
        if self.run_dir:
            return Path(self.run_dir)
        out = Path(self.output)
        return out.with_name(out.name + ".run")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank).

    Attributes:
        model_dir: the saved model folder (rank 0 wrote it).
        run_dir: checkpoints and logs.
        history: one dict per epoch (epoch, step, train_loss, val_loss, val_psnr, val_ssim, lr, seconds).
        best: the best epoch's record; ``baseline``: metrics of the degraded validation input.
        epochs, steps: epochs and optimiser steps done in total (including resumed ones).
        stopped_early: early stopping ended the run.
        seconds: wall time of this call.
        network: the network the model folder holds (the best epoch, or the last with ``keep="last"``), unwrapped from DDP, eval mode, on the CPU.
        world_size: number of processes that trained (DDP).
    """

    model_dir: Path
    run_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any]
    baseline: dict[str, Any]
    epochs: int
    steps: int
    stopped_early: bool
    seconds: float
    network: Any = None
    world_size: int = 1

    def summary(self, keep: str = "best") -> str:
        """One line for the terminal: where the model went, how long it trained, its validation PSNR."""
        line = f"saved {self.model_dir} after {self.epochs} epochs ({self.steps} steps, {self.seconds:.0f} s)"
        if self.best.get("val_psnr") is not None:
            line += (f"; best validation PSNR {self.best['val_psnr']:.2f} dB "
                     f"(degraded input {self.baseline.get('val_psnr', float('nan')):.2f} dB)")
            if keep == "last" and self.history:
                line += f"; kept the last epoch ({self.history[-1].get('val_psnr', float('nan')):.2f} dB)"
        return line


# ---------------------------------------------------------------------------- argparse
def _floats2(text: str) -> tuple[float, float]:
    parts = [float(v) for v in text.replace(",", " ").split()]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected 'LOW,HIGH', got {text!r}")
    return parts[0], parts[1]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.replace("x", ",").replace(" ", ",").split(",") if v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like '128,128', got {text!r}") from None


def add_train_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add every :class:`TrainConfig` field as an option (``--patch-size 128,128`` ...)."""
    d = TrainConfig(data=[], output="")
    p = parser
    p.add_argument("data", nargs="+", help="training scans: folders/files (DICOM, NIfTI, MHA/NRRD)")
    p.add_argument("-o", "--output", required=True, help="model folder to write (card.json + model.pt); required")
    p.add_argument("--mode", choices=MODES, default=d.mode,
                   help="supervised: clean scans + simulated degradations; paired: low-dose/full-dose pairs (--low-data); self-supervised: noisy scans only")
    p.add_argument("--task", choices=TRAIN_TASKS, default=d.task,
                   help="what the model learns: denoise or deblur (deblur: supervised only)")
    p.add_argument("--modality", choices=("auto", *IMAGE_MODALITIES), default=d.modality,
                   help="CT, MR or auto (from the data: DICOM headers, HU range of NIfTI)")
    p.add_argument("--low-data", nargs="+", default=[], help="paired mode: the low-dose scans, matched to DATA by position (default: none)")
    p.add_argument("--val-data", nargs="+", default=[], help="validation scans (default: split by patient)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the series held out for validation when --val-data is not given (split by series, never within one)")
    p.add_argument("--cache-dir", default=None, help="cache decoded volumes as .npy here (default: in memory only)")
    p.add_argument("--run-dir", default=None, help="checkpoints and logs (default <output>.run)")
    p.add_argument("--dims", type=int, choices=(2, 3), default=d.dims,
                   help="2: slice by slice (2-D network), 3: 3-D patches (3-D network)")
    p.add_argument("--channels", type=_ints, default=None, help="U-Net channels per level, e.g. 16,32,64,128 (default: 16,32,64,128 for 2-D, or the init model's)")
    p.add_argument("--res-units", type=int, default=None,
                   help="residual units per U-Net level (default 0: one plain convolution)")
    p.add_argument("--context", type=int, default=None,
                   help="2-D: neighbouring slices on each side as extra input channels (2.5-D; default 0)")
    p.add_argument("--noise-input", action="store_true",
                   help="2-D: the network measures the slice's noise level and reads it as an extra input channel "
                        "(FFDNet-style; an init model without it starts as the same function)")
    p.add_argument("--intensity-scale", type=float, default=None, help="CT: HU per network unit (default 512)")
    p.add_argument("--init-model", default=None, help="fine-tune from an installed model name or a model/bundle folder (default: train from scratch)")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder to continue from (default: a new run)")
    p.add_argument("--dose-range", type=_floats2, default=d.dose_range,
                   help="supervised CT: dose fraction LOW,HIGH of the simulated low-dose noise, drawn per sample")
    p.add_argument("--rician-range", type=_floats2, default=d.rician_range,
                   help="supervised MR: Rician noise SD LOW,HIGH as a fraction of the tissue signal")
    p.add_argument("--fwhm-range", type=_floats2, default=d.fwhm_range,
                   help="deblur: Gaussian blur FWHM LOW,HIGH in voxels")
    p.add_argument("--blur-noise", type=float, default=d.blur_noise,
                   help="deblur: SD of white noise added after the blur, in normalised units")
    p.add_argument("--blur-noise-range", type=_floats2, default=None,
                   help="deblur: draw the noise SD per sample from LOW,HIGH x the series' 1-99 %% intensity range "
                        "(log-uniform with --log-draw; replaces --blur-noise)")
    p.add_argument("--blur-anisotropy", type=float, default=d.blur_anisotropy,
                   help="deblur: largest ratio of the PSF's two in-plane FWHMs, drawn per sample (1 = round)")
    p.add_argument("--zoom-range", type=_floats2, default=None,
                   help="deblur: resample each patch by a factor drawn from LOW,HIGH (output pixels per source pixel; "
                        "below 1: sharper detail per pixel than the training scans have) before the blur (default: native)")
    p.add_argument("--blur-tail", type=float, default=d.blur_tail,
                   help="deblur: largest weight of a second Gaussian twice as wide (a PSF with heavier tails)")
    p.add_argument("--ct-noise-method", choices=("image", "projection"), default=d.ct_noise_method,
                   help="CT noise simulation: image (fast image-domain FBP noise) or projection (~100x slower per sample)")
    p.add_argument("--ct-noise-hu", type=_floats2, default=None,
                   help="CT: draw the added noise's median SD in the body (HU) from LOW,HIGH instead of a dose (default: by --dose-range)")
    p.add_argument("--ct-filters", type=lambda t: tuple(v for v in t.replace(" ", ",").split(",") if v),
                   default=d.ct_filters,
                   help="CT: FBP filters of the simulated noise, e.g. ramp,shepp-logan,cosine,hamming,hann "
                        "(several: two drawn and blended per sample)")
    p.add_argument("--ct-pixel-range", type=_floats2, default=None,
                   help="CT: resample patches to an in-plane pixel size (mm) drawn from LOW,HIGH (default: the native pixel size)")
    p.add_argument("--log-draw", action="store_true", help="draw the dose / noise level log-uniformly")
    p.add_argument("--clean-fraction", type=float, default=d.clean_fraction,
                   help="share of training samples left undegraded (learn to leave clean input alone)")
    p.add_argument("--single-slice-fraction", type=float, default=d.single_slice_fraction,
                   help="2.5-D: share of samples whose neighbouring slices are the slice itself, noise and all "
                        "(as a single-slice series reaches the model)")
    p.add_argument("--disk-fraction", type=float, default=d.disk_fraction,
                   help="CT, 2-D: share of samples given a few faint disks (2-12 mm, 2-30 HU) in the clean patch "
                        "and its target, so the network learns to keep small faint lesions")
    p.add_argument("--disk-weight", type=float, default=d.disk_weight,
                   help="with --disk-fraction: the loss weight of the disks' pixels (the others weigh 1)")
    p.add_argument("--smooth-fraction", type=float, default=d.smooth_fraction,
                   help="2-D: share of samples whose clean patch (and target) is Gaussian-smoothed before the noise "
                        "(anatomy as smooth as a thick-slice head CT's)")
    p.add_argument("--smooth-sigma", type=_floats2, default=d.smooth_sigma, metavar="LOW,HIGH",
                   help="with --smooth-fraction: the smoothing Gaussian's SD range, pixels")
    p.add_argument("--target-nlm", type=float, default=d.target_nlm, metavar="H",
                   help="supervised: learn the scans without their own noise (non-local means per slice, "
                        "h = H x the slice's measured noise SD, e.g. 0.8; 0 = the scans as they are)")
    p.add_argument("--distill-ensemble", type=int, default=d.distill_ensemble, metavar="N",
                   help="supervised fine-tune: move the target towards the init model averaged over N in-plane "
                        "flips/rotations (2, 4 or 8), so that one pass learns the self-ensemble (0 = off)")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight, metavar="W",
                   help="with --distill-ensemble: 1 = the ensemble's output is the target, 0.5 = half way to the "
                        "training target")
    p.add_argument("--self-supervised", choices=SELF_SUPERVISED, default=d.self_supervised,
                   help="self-supervised method: n2n (Neighbor2Neighbor) or n2v (Noise2Void)")
    p.add_argument("--n2n-gamma", type=float, default=d.n2n_gamma,
                   help="weight of the Neighbor2Neighbor regulariser")
    p.add_argument("--pd-factor", type=int, default=d.pd_factor,
                   help="pixel-shuffle downsampling before the N2N sub-sampler against correlated noise; 1 = off (default: 2 for CT, 1 for MR)")
    p.add_argument("--blind-spot", type=int, default=d.blind_spot,
                   help="N2V blind-spot box side in pixels (1: classic; 3 or 5 for correlated CT noise)")
    p.add_argument("--n2v-spacing", type=int, default=d.n2v_spacing,
                   help="grid spacing of the N2V masked pixels (default: max(6, 4.5 x blind spot))")
    p.add_argument("--patch-size", type=_ints, default=None,
                   help="training patch size, e.g. 128,128 (2-D) or 64,64,64 (3-D) (default: 128,128 for 2-D, 32,96,96 for 3-D)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="patches per optimisation step")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="most epochs (early stopping or --max-minutes may end the run sooner)")
    p.add_argument("--steps-per-epoch", type=int, default=d.steps_per_epoch,
                   help="optimisation steps per epoch (then a validation)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate (AdamW)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay")
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="learning-rate schedule")
    p.add_argument("--loss", choices=LOSSES, default=d.loss,
                   help="training loss: l1, mse or psnr (the mean of each sample's 10 log10 MSE: a mild "
                        "degradation weighs as much as a strong one), plus --ssim-weight x SSIM loss")
    p.add_argument("--ssim-weight", type=float, default=d.ssim_weight,
                   help="weight of MONAI's SSIM loss added to the L1/MSE loss (0 = none)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stopping: end after this many epochs without a better validation loss (0 = off)")
    p.add_argument("--max-minutes", type=float, default=d.max_minutes,
                   help="stop after the epoch that ends past this many minutes; a cosine schedule "
                        "then spans this time (0 = no limit)")
    p.add_argument("--keep", choices=KEEP_CHOICES, default=d.keep,
                   help="the weights the model gets: the epoch of the best validation loss, or the last epoch")
    p.add_argument("--val-slices", type=int, default=d.val_slices,
                   help="validation slices (2-D) or patches (3-D) per volume, at most")
    p.add_argument("--val-crop", type=int, default=d.val_crop,
                   help="in-plane crop side of validation slices in pixels (0 = whole slices)")
    p.add_argument("--no-augment", dest="augment", action="store_false",
                   help="no flips/rotations of the training patches (augmentation is on by default)")
    p.add_argument("--jitter", type=float, default=d.jitter,
                   help="relative intensity jitter applied to input and target alike")
    p.add_argument("--reslice", action="store_true",
                   help="2-D: also train on slices across the other two axes of series with near-isotropic voxels "
                        "(more views of few scans; MR and deblurring, not CT denoising)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="random seed (data split, sampling, degradations, initialisation)")
    p.add_argument("--device", default=d.device,
                   help="auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps; under torchrun one GPU per rank")
    p.add_argument("--num-workers", type=int, default=d.num_workers,
                   help="DataLoader worker processes (0: in the main process)")
    p.add_argument("--name", default=None,
                   help="the model's name in its card (default: the output folder's name)")
    p.add_argument("--version", dest="model_version", default=d.version,
                   help="the model's version in its card")
    p.add_argument("--description", default=d.description,
                   help="one-paragraph description written into the card")
    p.add_argument("--license", default=d.license,
                   help="licence statement written into the card (e.g. 'BSD-3-Clause (weights)'), default: none")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the output model folder if it exists")
    p.add_argument("--no-tensorboard", dest="tensorboard", action="store_false",
                   help="no TensorBoard logs (log.csv only); without the [train] extra TensorBoard is skipped anyway")
    p.add_argument("--no-progress", dest="progress_bar", action="store_false",
                   help="no progress bar")
    return p


def invocation(argv: list[str] | None = None) -> str:
    """The command line that started this process, as a user would type it (no interpreter or
    script path of this machine): ``napari-restore train ...`` or ``python -m napari_restore.training ...``."""
    argv = list(sys.argv if argv is None else argv)
    prog = Path(argv[0]).name if argv else ""
    args = argv[1:]
    if prog == "__main__.py":
        head = "python -m napari_restore.training"
    elif prog in ("napari-restore", "cli.py"):
        head = "napari-restore"
    else:
        head = prog or "python"
    return " ".join([head, *(shlex.quote(a) for a in args)])


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """Build a :class:`TrainConfig` from :func:`add_train_arguments`' namespace."""
    kw = {f.name: getattr(ns, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(ns, f.name)}
    kw["version"] = getattr(ns, "model_version", TrainConfig.version)
    dims = kw.get("dims", 2)
    if kw.get("patch_size") is None:
        kw["patch_size"] = (128, 128) if dims == 2 else (32, 96, 96)
    channels, res_units = getattr(ns, "channels", None), getattr(ns, "res_units", None)
    if channels or res_units is not None:
        from ..networks import DEFAULT_2D, DEFAULT_3D

        arch = dict(DEFAULT_2D if dims == 2 else DEFAULT_3D)
        if channels:
            arch["channels"] = list(channels)
            arch["strides"] = [2] * (len(channels) - 1)
        if res_units is not None:
            arch["num_res_units"] = int(res_units)
        kw["architecture"] = arch
    scale = getattr(ns, "intensity_scale", None)
    if scale:
        kw["intensity"] = {"kind": "ct", "center": 0.0, "scale": float(scale), "clip": [-1024.0, 3071.0]}
    kw["command"] = invocation()
    return TrainConfig(**kw)
