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

This module chooses the steps (models, the pipeline) and runs them over the volume; running one
step over arrays is :mod:`napari_restore.step_runner`'s, tiling :mod:`napari_restore.tiling`'s, the
classical enhancer :mod:`napari_restore.unsharp`'s, the options :mod:`napari_restore.options`'.
"""
from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import models as _models
from .constants import IMAGE_MODALITIES, PIPELINE, TASKS
from .errors import InputError, ModelError
from .geometry import largest_step
from .intensity import Normalizer, default_spec
from .models import LoadedModel, ModelCard, find_model, load_model, user_model_dirs
from .options import RestoreOptions, accepts_options
from .step_runner import CancelFn, _blend_into, _Runner, _Step
from .unsharp import UnsharpEnhance
from .volume import Volume

ProgressFn = Callable[[int, int], Any]


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


# ---------------------------------------------------------------------------- model resolution
def _no_model_message(task: str, modality: str, mode: str) -> str:
    folders = ", ".join(str(p) for p in [_models.BUNDLED_DIR, *user_model_dirs()])
    what = (f"for {modality}" if modality in IMAGE_MODALITIES
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
    if card.modality != "any" and modality in IMAGE_MODALITIES and card.modality != modality:
        raise ModelError(f"model {card.name!r} is for {card.modality}, the volume is {modality}", where)
    if card.modality != "any" and modality not in IMAGE_MODALITIES:
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
        card = find_model(t, modality if modality in IMAGE_MODALITIES else "any", dims, largest_step(volume))
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
