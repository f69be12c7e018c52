"""Run one restoration step over ``(z, y, x)`` arrays: batches, tiles, out-of-memory fallback, progress, cancel.

:class:`_Step` is a network in normalised units with its intensity mapping (built by
:mod:`napari_restore.inference`); :class:`_Runner` runs it slice by slice (2-D, 2.5-D) or as a 3-D
sliding window (:mod:`napari_restore.tiling`), writing into a preallocated float32 output. The
batch size adapts to free memory; an out-of-memory error retries with half the batch, then on the CPU.
"""
from __future__ import annotations

import copy
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import Cancelled, RestoreError
from .intensity import Normalizer
from .networks import mirror_indices
from .tiling import _aligned_windows, _inferer, _pad_array


CancelFn = Callable[[], bool]


#: Largest volume (voxels) run as a single 3-D window when neither ``tile`` nor the card's
#: ``patch_size`` says otherwise.
_WHOLE_3D_MAX = 1 << 22


_DEFAULT_3D_TILE = (64, 192, 192)


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


#: Most CPU threads restoring 2-D batches at once (:func:`cpu_workers`).
MAX_CPU_WORKERS = 8


def cpu_workers(device: torch.device, batches: int) -> int:
    """Threads that restore 2-D batches at once: on the CPU one per torch thread (at most
    :data:`MAX_CPU_WORKERS`, at most ``batches``); elsewhere 1."""
    if device.type != "cpu":
        return 1
    return int(max(1, min(torch.get_num_threads(), MAX_CPU_WORKERS, batches)))


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
        """``arr``, ``out``: ``(z, y, x)`` physical units; writes ``out`` batch by batch.

        On the CPU, batches run in :func:`cpu_workers` threads at once, each with one torch
        thread: slices are independent, and on small convolutions that is faster than spreading
        each one over every core (2 cores: ~1.4x). Each slice's result is the same.
        """
        nz, ny, nx = arr.shape
        if self.batch is None:
            self.batch = self._auto_batch(ny * nx, self._per_pixel_bytes())
        z = 0
        workers = cpu_workers(self.device, -(-nz // self.batch))
        if workers > 1:
            z = self._run_2d_parallel(arr, out, strength, workers)
        while z < nz:
            self._check_cancel()
            if self.batch is None:  # after a fall-back to the CPU
                self.batch = self._auto_batch(ny * nx, self._per_pixel_bytes())
            b = min(self.batch, nz - z)
            try:
                with warnings.catch_warnings():  # read-only input arrays: torch warns, we never write
                    warnings.simplefilter("ignore", UserWarning)
                    self._restore_slices(arr, out, z, b, strength)
            except Exception as exc:
                if not _is_oom(exc):
                    raise
                self._on_oom(exc)
                continue
            z += b
            self.report(b)

    def _run_2d_parallel(self, arr: np.ndarray, out: np.ndarray, strength: float, workers: int) -> int:
        """Batches in ``workers`` threads, reported in order; returns the first slice not done
        (``len(arr)`` unless memory ran out, when the rest is left to the one-thread loop)."""
        nz = arr.shape[0]
        threads = max(1, torch.get_num_threads() // workers)
        pending: deque[tuple[int, int, Future]] = deque()
        z = 0
        with warnings.catch_warnings(), ThreadPoolExecutor(workers, thread_name_prefix="napari-restore",
                                                           initializer=torch.set_num_threads,
                                                           initargs=(threads,)) as pool:
            warnings.simplefilter("ignore", UserWarning)  # read-only input arrays (see _restore_slices)
            try:
                while z < nz or pending:
                    while z < nz and len(pending) < 2 * workers:
                        self._check_cancel()
                        b = min(self.batch, nz - z)
                        pending.append((z, b, pool.submit(self._restore_slices, arr, out, z, b, strength)))
                        z += b
                    first, b, future = pending[0]
                    try:
                        future.result()
                    except Exception as exc:
                        if not _is_oom(exc):
                            raise
                        self._on_oom(exc)
                        return first
                    pending.popleft()
                    self.report(b)
            finally:
                for _, _, f in pending:
                    f.cancel()
        return nz

    def _restore_slices(self, arr: np.ndarray, out: np.ndarray, z: int, b: int, strength: float) -> None:
        """Restore slices ``z .. z+b-1`` of ``arr`` into ``out`` (both ``(z, y, x)``, physical units)."""
        norm = self.step.normalizer
        nz, ny, nx = arr.shape
        k = int(getattr(self.step.network, "context", 0))
        src = arr[z:z + b]
        # (torch warns about read-only input arrays, which are never written: the callers silence
        # that around all their calls, as a per-call catch_warnings is not safe across threads)
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
