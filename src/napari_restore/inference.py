"""Run restoration models over a :class:`~napari_restore.volume.Volume`.

- ``mode="2d"``: slice by slice along the Volume's axis 0 (the acquisition axis), slices in
  batches; big slices may be tiled with ``tile=(ty, tx)`` (MONAI ``SlidingWindowInferer``).
- ``mode="3d"``: MONAI ``SlidingWindowInferer`` with Gaussian blending; windows are computed on
  the compute device and stitched on the CPU when the GPU is small.
- Intensities are normalised per batch (2-D) or per window (3-D) with the model card's mapping
  (:mod:`napari_restore.intensity`), never for the whole volume at once; the output is written
  into one preallocated float32 array.
- ``device="auto"``: CUDA, then Apple MPS, then CPU. float32 everywhere (on CUDA convolutions may
  use TF32 tensor cores, PyTorch's default: within 0.2 HU of the CPU on CT, where bf16 autocast
  differed by up to 11 HU); normalisation and blending run on the compute device. The batch
  size adapts to free memory; an out-of-memory error retries with half the batch, then on the
  CPU.
- ``progress(done, total)`` is called after every batch, ``cancel()`` is asked before every
  batch; a cancel raises :class:`~napari_restore.errors.Cancelled` and returns nothing.

Task ``"enhance"`` without a trained model uses a classical, noise-aware unsharp mask
(:class:`UnsharpEnhance`); ``"denoise"`` and ``"deblur"`` need a trained model.
"""
from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .constants import PIPELINE, TASKS
from .errors import Cancelled, InputError, ModelError, RestoreError
from .geometry import largest_step
from .intensity import Normalizer, default_spec
from . import models as _models
from .models import LoadedModel, ModelCard, find_model, load_model, user_model_dirs
from .networks import mirror_indices
from .options import RestoreOptions, accepts_options
from .volume import Volume

ProgressFn = Callable[[int, int], Any]
CancelFn = Callable[[], bool]

#: Largest volume (voxels) run as a single 3-D window when neither ``tile`` nor the card's
#: ``patch_size`` says otherwise.
_WHOLE_3D_MAX = 1 << 22
_DEFAULT_3D_TILE = (64, 192, 192)


# ---------------------------------------------------------------------------- classical enhance
def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-6)) ** 2)
    return k / k.sum()


class UnsharpEnhance(nn.Module):
    """Noise-aware unsharp masking: ``y = x + amount * g(d) * d``.

    ``d = G(sigma_small) * x - G(sigma_large) * x`` is a band-pass detail layer (it leaves out the
    finest scale, where pixel noise lives) and ``g(d) = d^2 / (d^2 + (k * noise_d)^2)`` cores
    it: detail at the noise level of ``d`` is hardly boosted, real edges are. Separable Gaussian
    filters with reflect padding; a local operation, so tiled and whole results agree.

    Args:
        spatial_dims: 2 (``(B, 1, H, W)``) or 3 (``(B, 1, D, H, W)``).
        sigmas_small, sigmas_large: Gaussian sigmas per spatial axis, in voxels.
        noise_d: noise SD of ``d`` (same units as ``x``); see :meth:`estimate_noise`.
        amount: gain of the detail layer; ``k``: coring threshold in noise SDs.
    """

    def __init__(self, spatial_dims: int, sigmas_small: Sequence[float], sigmas_large: Sequence[float],
                 noise_d: float = 0.0, amount: float = 1.5, k: float = 3.0):
        super().__init__()
        self.spatial_dims, self.amount, self.k = spatial_dims, float(amount), float(k)
        self.noise_d = float(noise_d)
        self.small = [_gaussian_kernel(s) for s in sigmas_small]
        self.large = [_gaussian_kernel(s) for s in sigmas_large]

    def _blur(self, x: torch.Tensor, kernels: list[torch.Tensor]) -> torch.Tensor:
        for axis, k in enumerate(kernels):
            r = (k.numel() - 1) // 2
            if r == 0 or x.shape[2 + axis] == 1:
                continue
            shape = [1, 1] + [1] * self.spatial_dims
            shape[2 + axis] = k.numel()
            pad = [0, 0] * self.spatial_dims
            pad[2 * (self.spatial_dims - 1 - axis)] = pad[2 * (self.spatial_dims - 1 - axis) + 1] = r
            mode = "reflect" if x.shape[2 + axis] > r else "replicate"
            xp = F.pad(x, pad, mode=mode)
            conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
            x = conv(xp, k.to(x.device, x.dtype).reshape(shape))
        return x

    def detail(self, x: torch.Tensor) -> torch.Tensor:
        """The band-pass detail layer ``d`` (same shape as ``x``)."""
        return self._blur(x, self.small) - self._blur(x, self.large)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        d = self.detail(x32)
        t2 = (self.k * self.noise_d) ** 2
        gain = d * d / (d * d + t2) if t2 > 0 else torch.ones_like(d)
        return x32 + self.amount * gain * d

    @torch.no_grad()
    def estimate_noise(self, x: torch.Tensor) -> float:
        """Robust SD of ``d`` over a sample ``x``: ``1.4826 * median |d|`` (edges are sparse)."""
        d = self.detail(x.float()).abs().flatten()
        d = d[d > 0]
        return float(1.4826 * d.median()) if d.numel() else 0.0


# ---------------------------------------------------------------------------- helpers
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA, then Apple MPS, then CPU; otherwise the named torch device."""
    if isinstance(device, torch.device):
        return device
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r} ({exc}); use 'auto', 'cpu', 'cuda', 'cuda:1' or 'mps'") from None


def _is_oom(exc: BaseException) -> bool:
    oom_type = getattr(torch.cuda, "OutOfMemoryError", ())
    return (isinstance(exc, oom_type) or isinstance(exc, MemoryError)
            or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()))


def _free_bytes(device: torch.device) -> int | None:
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except Exception:  # pragma: no cover - driver quirks
            return None
    return None


def _split_pad(size: int, multiple: int) -> tuple[int, int]:
    """Padding (before, after) that the network itself would add (see ResidualUNet.forward)."""
    extra = (-size) % multiple
    return extra // 2, extra - extra // 2


def _aligned_windows(shape: Sequence[int], roi: Sequence[int], overlap: float, multiple: int):
    """A window grid that matches the whole-image result as closely as possible.

    A strided U-Net is shift-equivariant only for shifts by ``multiple``, so every window starts
    at a multiple of it, on the input padded exactly as the network pads a whole image. The grid
    also fits the padded size exactly (windows grow a little where needed): MONAI would
    otherwise shift the last window back, and a window edge next to the image border gets
    weight where no other window is reliable. Returns ``(pads, roi, overlap)`` with ``overlap``
    chosen so that MONAI's ``int(roi * (1 - overlap))`` is the step.
    """
    pads = [_split_pad(int(s), multiple) for s in shape]
    padded = [int(s) + a + b for s, (a, b) in zip(shape, pads)]
    roi_a, ovl = [], []
    for r, size in zip(roi, padded):
        r = min(size, max(multiple, int(r) // multiple * multiple))
        if r >= size:
            roi_a.append(size)
            ovl.append(0.0)
            continue
        step = max(multiple, int(r * (1.0 - overlap)) // multiple * multiple)
        n = -(-(size - r) // step) + 1  # windows along this axis
        step = max(multiple, (size - r) // (n - 1) // multiple * multiple)
        r = size - (n - 1) * step
        roi_a.append(r)
        ovl.append(min(0.999, max(0.0, 1.0 - (step + 0.5) / r)))
    return pads, tuple(roi_a), tuple(ovl)


def _blend_weights(roi: Sequence[int], device: torch.device) -> torch.Tensor:
    """Gaussian window weights ``(1, 1, *roi)``, sigma = roi / 8, NOT clamped.

    MONAI's own Gaussian map is clamped at 1e-3 of its peak; near the image border, where the
    other axis' factor is already small, that clamp gives a window's unreliable edge the same
    weight as another window's centre. An unclamped separable product keeps the ratios.
    """
    w = torch.ones((1, 1), dtype=torch.float32)
    for r in roi:
        t = torch.arange(r, dtype=torch.float64) - (r - 1) / 2.0
        g = torch.exp(-0.5 * (t / (0.125 * r)) ** 2)
        w = w[..., None] * (g / g.max()).float()
    return w.to(device)


def _inferer(roi, batch: int, overlap, device: torch.device, stitch: torch.device):
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(roi_size=roi, sw_batch_size=batch, overlap=overlap, mode="gaussian",
                                   padding_mode="replicate", sw_device=device, device=stitch)
    inferer.roi_weight_map = _blend_weights(roi, device)
    return inferer


def _pad_array(x: torch.Tensor, pads: list[tuple[int, int]]) -> torch.Tensor:
    """Pad the trailing ``len(pads)`` axes of ``x`` (reflect where possible, like the network)."""
    flat = [p for ab in reversed(pads) for p in ab]
    if not any(flat):
        return x
    small = any(max(a, b) >= s for (a, b), s in zip(pads, x.shape[-len(pads):]))
    return F.pad(x, flat, mode="replicate" if small else "reflect")


@dataclass
class _Step:
    """One restoration step ready to run: a network in normalised units and its mapping."""

    task: str
    name: str
    version: str
    network: nn.Module
    intensity: dict[str, Any]
    dims: int
    patch_size: list[int] | None = None
    learned: bool = True
    normalizer: Normalizer | None = None
    info: dict[str, Any] = field(default_factory=dict)
    card: Any = None  # the ModelCard of a learned step (for the trusted-range guard)


class _Runner:
    """Runs one step over 3-D arrays with batching, OOM fallback, progress and cancel."""

    def __init__(self, step: _Step, device: torch.device, batch_size: int | None, tile, overlap: float,
                 stitch_device: str | None, report: Callable[[int], None], cancel: CancelFn | None):
        self.step, self.device, self.overlap = step, device, overlap
        self.tile, self.report, self.cancel = tile, report, cancel
        self.user_batch = batch_size
        self.batch: int | None = batch_size
        self.stitch_device = stitch_device
        self.fell_back = ""
        # keep the CPU network untouched: it is the fallback after an out-of-memory error
        self.net = step.network if device.type == "cpu" else copy.deepcopy(step.network).to(device)

    # -- bookkeeping
    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel():
            raise Cancelled("restoration cancelled by the user; nothing was returned")

    def _on_oom(self, exc: BaseException) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if self.batch is not None and self.batch > 1:
            self.batch //= 2
            return
        if self.device.type != "cpu":
            self.fell_back = f"{self.device.type} ran out of memory; finished on the CPU"
            warnings.warn(self.fell_back, RuntimeWarning, stacklevel=4)
            self.device = torch.device("cpu")
            self.net = self.step.network
            self.batch = None
            return
        raise RestoreError(f"out of memory on the CPU even with a batch of one ({exc}); "
                           "pass a smaller tile= or close other programs") from None

    def _auto_batch(self, pixels: int, per_pixel: float) -> int:
        free = _free_bytes(self.device)
        if free is not None:
            return int(max(1, min(64, free * 0.4 // max(1.0, pixels * per_pixel))))
        if self.device.type == "mps":
            return 4
        # CPU: bigger batches do not run faster per slice on big slices (memory bound)
        return int(max(1, min(32, (1 << 18) // max(1, pixels))))

    def _multiple(self) -> int:
        return int(getattr(self.step.network, "multiple", 1))

    def _per_pixel_bytes(self) -> float:
        ch = self.step.network.config["channels"][0] if hasattr(self.step.network, "config") else 8
        return 4.0 * 6 * ch

    # -- 2-D
    def run_2d(self, arr: np.ndarray, out: np.ndarray, strength: float) -> None:
        """``arr``, ``out``: ``(z, y, x)`` physical units; writes ``out`` batch by batch."""
        norm = self.step.normalizer
        nz, ny, nx = arr.shape
        k = int(getattr(self.step.network, "context", 0))
        z = 0
        while z < nz:
            self._check_cancel()
            if self.batch is None:
                self.batch = self._auto_batch(ny * nx, self._per_pixel_bytes())
            b = min(self.batch, nz - z)
            src = arr[z:z + b]
            try:
                with warnings.catch_warnings():  # read-only input arrays: torch warns, we never write
                    warnings.simplefilter("ignore", UserWarning)
                    src_t = torch.from_numpy(src).to(self.device, torch.float32)
                    if k:  # 2.5-D: slices z-k .. z+k as channels, mirrored at the volume's ends
                        block = torch.from_numpy(arr[mirror_indices(z - k, b + 2 * k, nz)]).to(self.device, torch.float32)
                with torch.inference_mode():
                    if k:
                        xn = norm.forward(block).unfold(0, 2 * k + 1, 1).permute(0, 3, 1, 2).contiguous()
                    else:
                        xn = norm.forward(src_t)[:, None]
                    if self.tile is not None and (self.tile[0] < ny or self.tile[1] < nx):
                        pads, roi, ovl = _aligned_windows((ny, nx), self.tile, self.overlap, self._multiple())
                        inferer = _inferer(roi, 4, ovl, self.device, self.device)
                        yn = inferer(_pad_array(xn, pads), self.net)
                        yn = yn[..., pads[0][0]:pads[0][0] + ny, pads[1][0]:pads[1][0] + nx]
                    else:
                        yn = self.net(xn)
                    y = norm.inverse_linear(yn[:, 0].float())
                    if norm.clips:  # clipped voxels keep their original value
                        y = torch.where((src_t < norm.lo) | (src_t > norm.hi), src_t, y)
                    if strength <= 0.0:
                        y = src_t
                    elif strength < 1.0:
                        y = torch.lerp(src_t, y, float(strength))
                    out[z:z + b] = y.cpu().numpy()
                del src_t, xn, yn, y
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                self._on_oom(exc)
                continue
            z += b
            self.report(b)

    # -- 3-D
    def run_3d(self, arr: np.ndarray, out: np.ndarray, strength: float) -> None:
        """Sliding window over one ``(z, y, x)`` array; ``out`` receives the blended result."""
        norm = self.step.normalizer
        shape = arr.shape
        roi = self._roi_3d(shape)
        whole = tuple(roi) == tuple(shape)
        pads, roi, ovl = ([(0, 0)] * 3, roi, (0.0,) * 3) if whole else \
            _aligned_windows(shape, roi, self.overlap, self._multiple())
        with warnings.catch_warnings():  # read-only input arrays: torch warns, we never write
            warnings.simplefilter("ignore", UserWarning)
            x = _pad_array(torch.from_numpy(arr)[None, None], pads)
        while True:
            if self.batch is None:
                self.batch = self._auto_batch(int(np.prod(roi)), self._per_pixel_bytes())
            stitch = self._stitch_device(arr.nbytes)
            done = [0]

            def predictor(w: torch.Tensor) -> torch.Tensor:
                self._check_cancel()
                with torch.inference_mode():
                    y = self.net(norm.forward(w.to(self.device)))
                y = norm.inverse_linear(y.float())
                done[0] += w.shape[0]
                self.report(w.shape[0])
                return y

            inferer = _inferer(roi, self.batch, ovl, self.device, stitch)
            try:
                with torch.inference_mode():
                    y = inferer(x, predictor)
                break
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                self.report(-done[0])
                self._on_oom(exc)
        crop = tuple(slice(a, a + n) for (a, _), n in zip(pads, shape))
        y = np.ascontiguousarray(y[(0, 0, *crop)].float().cpu().numpy())
        del x
        norm.restore_outside(y, arr)
        _blend_into(out, arr, y, strength)
        del y

    def _stitch_device(self, nbytes: int) -> torch.device:
        if self.stitch_device not in (None, "auto"):
            return torch.device(self.stitch_device)
        free = _free_bytes(self.device)
        if free is not None and free > 4 * nbytes:
            return self.device
        return torch.device("cpu")

    def _roi_3d(self, shape: Sequence[int]) -> tuple[int, ...]:
        if self.tile is not None:
            roi = self.tile
        elif self.step.patch_size:
            roi = tuple(self.step.patch_size)
        elif int(np.prod(shape)) <= _WHOLE_3D_MAX:
            roi = tuple(shape)
        else:
            roi = _DEFAULT_3D_TILE
        return tuple(min(int(r), int(s)) for r, s in zip(roi, shape))

    def windows_3d(self, shape: Sequence[int]) -> int:
        """Number of sliding windows for one ``(z, y, x)`` array (for progress totals)."""
        from monai.data.utils import dense_patch_slices
        from monai.inferers.utils import _get_scan_interval

        roi = self._roi_3d(shape)
        if tuple(roi) == tuple(shape):
            return 1
        pads, roi, ovl = _aligned_windows(shape, roi, self.overlap, self._multiple())
        padded = tuple(int(n) + a + b for n, (a, b) in zip(shape, pads))
        return len(dense_patch_slices(padded, roi, _get_scan_interval(padded, roi, 3, ovl)))


def _blend_into(out: np.ndarray, src: np.ndarray, restored: np.ndarray, strength: float) -> None:
    """``out = src + strength * (restored - src)`` (``out`` may be ``restored``'s storage)."""
    if strength >= 1.0:
        out[...] = restored
    elif strength <= 0.0:
        out[...] = src
    else:
        np.subtract(restored, src, out=restored)
        restored *= np.float32(strength)
        np.add(restored, src, out=out)


# ---------------------------------------------------------------------------- model resolution
def _no_model_message(task: str, modality: str, mode: str) -> str:
    folders = ", ".join(str(p) for p in [_models.BUNDLED_DIR, *user_model_dirs()])
    what = (f"for {modality}" if modality in ("CT", "MR")
            else "for any modality (the volume's modality is unknown: set it to CT or MR)")
    return (f"no trained {task!r} model {what} in {mode} mode is installed (looked in {folders}). "
            f"Train one (napari-restore train) and put its folder (card.json + model.pt) into "
            f"{user_model_dirs()[0]} (or set NAPARI_RESTORE_MODELS), or pass model=<path to a model folder>.")


def _classical_enhance(modality: str, mode: str, volume: Volume) -> _Step:
    if mode == "2d":
        net = UnsharpEnhance(2, (1.0, 1.0), (2.5, 2.5))
    else:
        sz, sy, sx = volume.spacing
        rz = min(sy, sx) / sz if sz > 0 else 1.0
        net = UnsharpEnhance(3, (1.0 * rz, 1.0, 1.0), (2.5 * rz, 2.5, 2.5))
    return _Step("enhance", "classical-unsharp", "1", net, default_spec(modality), 2 if mode == "2d" else 3,
                 learned=False, info={"note": "classical noise-aware unsharp mask, no learned weights"})


def _step_from_model(task: str, model: Any, modality: str, mode: str, device: torch.device,
                     warn: list[str], ensemble: int | None = None) -> _Step:
    from .networks import SelfEnsemble, prepare_for_inference

    if isinstance(model, LoadedModel):
        loaded = model
    elif isinstance(model, (str, Path, ModelCard)):
        loaded = load_model(model, device="cpu")
    else:
        raise ModelError(f"model must be a name, a path, a ModelCard or a LoadedModel, got {type(model).__name__}")
    card = loaded.card
    where = card.path
    if card.task != task:
        raise ModelError(f"model {card.name!r} is a {card.task!r} model, not {task!r}", where)
    dims = 2 if mode == "2d" else 3
    if card.dims != dims:
        raise ModelError(f"model {card.name!r} is {card.dims}-D; run it with mode='{card.dims}d'", where)
    if card.modality != "any" and modality in ("CT", "MR") and card.modality != modality:
        raise ModelError(f"model {card.name!r} is for {card.modality}, the volume is {modality}", where)
    if card.modality != "any" and modality not in ("CT", "MR"):
        warn.append(f"the volume's modality is {modality!r}; model {card.name!r} assumes {card.modality} intensities")
    n = card.self_ensemble if ensemble is None else int(ensemble)
    net = prepare_for_inference(loaded.network).cpu()
    step = _Step(task, card.name, card.version, SelfEnsemble(net, n) if n > 1 else net, card.intensity, card.dims,
                 card.patch_size, True, info={"self_ensemble": n} if n > 1 else {})
    step.card = card
    return step


def _resolve_steps(task: str, model: Any, volume: Volume, mode: str, device: torch.device,
                   warn: list[str], ensemble: int | None = None) -> tuple[list[_Step], list[str]]:
    modality = volume.modality
    dims = 2 if mode == "2d" else 3

    def auto(t: str) -> _Step | None:
        card = find_model(t, modality if modality in ("CT", "MR") else "any", dims, largest_step(volume))
        if card is not None:
            return _step_from_model(t, card, modality, mode, device, warn, ensemble)
        if t == "enhance":
            return _classical_enhance(modality, mode, volume)
        return None

    if task != "restore":
        if model is None:
            step = auto(task)
            if step is None:
                raise ModelError(_no_model_message(task, modality, mode))
            return [step], []
        return [_step_from_model(task, model, modality, mode, device, warn, ensemble)], []
    # the pipeline: one all-in-one "restore" model, or denoise -> deblur -> enhance
    if model is not None and not isinstance(model, dict):
        return [_step_from_model("restore", model, modality, mode, device, warn, ensemble)], []
    chosen = dict(model or {})
    unknown = set(chosen) - set(PIPELINE)
    if unknown:
        raise InputError(f"model dict keys must be among {PIPELINE}, got {sorted(unknown)}")
    steps, skipped = [], []
    for t in PIPELINE:
        step = (_step_from_model(t, chosen[t], modality, mode, device, warn, ensemble) if chosen.get(t) is not None
                else auto(t))
        if step is None:
            skipped.append(t)
            warn.append(f"restore: step {t!r} skipped, no trained {t} model is installed for {modality} ({mode})")
        else:
            steps.append(step)
    if not steps:
        raise ModelError(_no_model_message("restore", modality, mode))
    return steps, skipped


# ---------------------------------------------------------------------------- public
def check_options(task: str, mode: str, strength: Any, overlap: float, batch_size: int | None,
                  ensemble: int | None) -> tuple[str, str, float]:
    """Validate some of :func:`restore`'s options; returns ``(task, mode, strength)`` normalised.

    Kept for callers of earlier versions: :class:`~napari_restore.options.RestoreOptions` checks them all.

    Raises:
        InputError: an unknown task or mode, or a value out of range.
    """
    o = RestoreOptions(task=task, mode=mode, strength=strength, overlap=overlap, batch_size=batch_size,
                       ensemble=ensemble)
    return o.task, o.mode, o.strength


@accepts_options
def restore(volume: Volume, task: str = "denoise", model: Any = None, mode: str = "2d",
            device: str | torch.device = "auto", progress: ProgressFn | None = None,
            cancel: CancelFn | None = None, strength: float = 1.0, batch_size: int | None = None,
            tile: int | Sequence[int] | None = None, overlap: float = 0.25,
            stitch_device: str | None = None, ensemble: int | None = None,
            options: RestoreOptions | None = None) -> Volume:
    """Restore ``volume`` with a model; returns a new Volume (same geometry) with provenance.

    The options (``task`` ... ``ensemble``) may come as one :class:`~napari_restore.options.RestoreOptions`
    (``options=``); the ones also passed as arguments override it. They are checked once, there.

    Args:
        volume: 3-D ``(z, y, x)`` or 4-D ``(t, z, y, x)`` Volume in physical units (HU for CT);
            a 4-D volume is restored time point by time point.
        task: ``"denoise"``, ``"deblur"``, ``"enhance"`` or ``"restore"`` (the pipeline
            denoise -> deblur -> enhance; a step without a model is skipped and said so).
        model: ``None`` (the best installed model for task, modality and mode), an installed
            model's name, a model folder / ``.json`` / ``.pt`` path, a ``ModelCard`` or a
            ``LoadedModel``; for ``"restore"`` also a dict ``{"denoise": ..., "enhance": ...}``.
        mode: ``"2d"`` (slice by slice along axis 0) or ``"3d"`` (sliding window).
        device: ``"auto"`` (CUDA, MPS, CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``.
        progress: ``progress(done, total)`` after every batch/window.
        cancel: asked before every batch/window; ``True`` raises :class:`Cancelled`.
        strength: 0..1, blends input (0) and full restoration (1).
        batch_size: slices (2-D) or windows (3-D) per forward pass; ``None`` adapts to memory.
        tile: 2-D ``(ty, tx)`` / 3-D ``(tz, ty, tx)`` window size (an int for all axes);
            ``None``: whole slices (2-D) or the card's ``patch_size`` / whole volume (3-D).
        overlap: window overlap fraction for tiling (Gaussian blending).
        stitch_device: where 3-D windows are stitched; ``None`` = the compute device when it has
            room for 4x the volume, else the CPU.
        ensemble: geometric self-ensemble of the learned steps: the mean over 1, 2, 4 or 8 in-plane
            flips/rotations of the input (that many times the time); ``None`` = each model card's
            ``self_ensemble`` (1 unless the card says otherwise).
        options: all of the above at once (see :class:`~napari_restore.options.RestoreOptions`).

    Raises:
        InputError: bad arguments. ModelError: no usable model. Cancelled: ``cancel()`` said so.
    """
    t0 = time.perf_counter()
    if not isinstance(volume, Volume):
        raise InputError(f"restore() needs a napari_restore.Volume, got {type(volume).__name__}")
    tile_t = tile  # options (made by @accepts_options) checked them: tile is None or one int per axis
    dev = resolve_device(device)
    warn: list[str] = []
    steps, skipped = _resolve_steps(task, model, volume, mode, dev, warn, ensemble)
    _guard(volume, steps, warn)

    arr = volume.array
    frames = arr if arr.ndim == 4 else arr[None]
    state = {"done": 0, "shown": 0}
    runners = [_Runner(s, dev, batch_size, tile_t, float(overlap), stitch_device, lambda n: None, cancel)
               for s in steps]
    per_frame = [frames.shape[1] if mode == "2d" else r.windows_3d(frames.shape[1:]) for r in runners]
    total = int(sum(per_frame) * frames.shape[0])

    def report(n: int) -> None:
        state["done"] += n
        if progress is not None and state["done"] > state["shown"]:
            state["shown"] = state["done"]
            progress(min(state["done"], total), total)

    current = arr
    records = []
    for i, (step, runner) in enumerate(zip(steps, runners)):
        ts = time.perf_counter()
        runner.report = report
        step.normalizer = Normalizer.fit(step.intensity, current)
        if isinstance(step.network, UnsharpEnhance):
            _fit_enhance_noise(step, current, mode)
        out = np.empty(arr.shape, dtype=np.float32)
        # the pipeline blends once at the end; a single step blends as it goes
        s = strength if len(steps) == 1 else 1.0
        cur_frames = current if current.ndim == 4 else current[None]
        out_frames = out if out.ndim == 4 else out[None]
        runs = _slice_runs(volume, step, mode, warn)
        for f in range(cur_frames.shape[0]):
            for a, b in runs:  # each uniformly spaced run alone: no neighbour across a gap
                if mode == "2d":
                    runner.run_2d(cur_frames[f][a:b], out_frames[f][a:b], s)
                else:
                    runner.run_3d(cur_frames[f][a:b], out_frames[f][a:b], s)
        if i > 0:
            del current
        current = out
        records.append({
            "task": step.task, "model": step.name, "model_version": step.version,
            "learned": step.learned, "intensity": step.normalizer.describe(),
            "device": str(runner.device), "batch_size": runner.batch, "seconds": round(time.perf_counter() - ts, 3),
            **({"fallback": runner.fell_back} if runner.fell_back else {}), **step.info,
        })
    if len(steps) > 1 and strength < 1.0:
        for f in range(frames.shape[0]):
            o = current if current.ndim == 3 else current[f]
            _blend_into(o, frames[f], o, strength)
    if progress is not None and state["shown"] < total:
        progress(total, total)

    used_dev = records[-1]["device"] if records else str(dev)
    prov: dict[str, Any] = {
        "task": task, "strength": strength, "mode": mode, "device": used_dev,
        "tile": list(tile_t) if tile_t else None, "overlap": float(overlap),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if task == "restore":
        prov.update({"model": "+".join(r["model"] for r in records),
                     "model_version": "+".join(r["model_version"] for r in records),
                     "steps": records, "skipped": skipped})
    else:
        rec = records[0]
        prov.update({k: rec[k] for k in ("model", "model_version", "learned", "intensity", "batch_size")})
        prov.update({k: rec[k] for k in ("fallback", "note", "self_ensemble") if k in rec})
    if warn:
        prov["warnings"] = list(warn)
        for w in warn:
            warnings.warn(w, RuntimeWarning, stacklevel=2)
    result = volume.copy_with(current, step=prov)
    if warn:
        result.meta["warnings"] = list(volume.meta.get("warnings", [])) + warn
    return result


def _guard(volume: Volume, steps: list[_Step], warn: list[str]) -> None:
    """Warn when the input lies outside a model's trusted range (see :mod:`napari_restore.guard`)."""
    from .guard import range_warnings

    warn.extend(w for w in range_warnings(volume, [s.card for s in steps if s.card is not None]) if w not in warn)


def _slice_runs(volume: Volume, step: _Step, mode: str, warn: list[str]) -> list[tuple[int, int]]:
    """Slice ranges the step restores alone (see :func:`napari_restore.geometry.restore_runs`)."""
    from .geometry import restore_runs

    reads = mode == "3d" or int(getattr(step.network, "context", 0) or 0) > 0
    runs, note = restore_runs(volume, reads)
    if note and f"{step.name}: {note}" not in warn:
        warn.append(f"{step.name}: {note}")
    return runs


def _fit_enhance_noise(step: _Step, current: np.ndarray, mode: str) -> None:
    """Measure the noise SD of the enhancer's detail layer on a few slices (normalised units)."""
    frames = current if current.ndim == 4 else current[None]
    vol = frames[frames.shape[0] // 2]
    nz = vol.shape[0]
    net: UnsharpEnhance = step.network  # type: ignore[assignment]
    norm = step.normalizer
    if mode == "2d":
        idx = np.unique(np.linspace(0, nz - 1, min(nz, 8)).round().astype(int))
        src = vol[idx]
        x = torch.from_numpy(norm.forward(src))[:, None]
    else:
        z0 = max(0, nz // 2 - 8)
        src = vol[z0:z0 + 16]
        x = torch.from_numpy(norm.forward(src))[None, None]
    if norm.clips:  # out-of-field padding is flat: leave it out of the estimate
        inside = torch.from_numpy(((src >= norm.lo) & (src <= norm.hi)))
        inside = inside[:, None] if mode == "2d" else inside[None, None]
        d = net.detail(x.float())[inside].abs()
        d = d[d > 0]
        net.noise_d = float(1.4826 * d.median()) if d.numel() else 0.0
    else:
        net.noise_d = net.estimate_noise(x)
    step.info = {**step.info, "noise_d": round(net.noise_d, 6)}


__all__ = ["restore", "resolve_device", "UnsharpEnhance", "TASKS"]
