"""The training loop: AdamW, cosine/plateau schedule, validation every epoch, early stopping,
atomic best/last checkpoints, exact resume, CSV + TensorBoard logs, model card at the end.

Checkpoints (``<run_dir>/last.pt``, ``best.pt``) are plain dicts of tensors and numbers, read back
with ``torch.load(weights_only=True)``; ``last.pt`` holds the model, optimiser, scheduler, the
epoch and step counters, the torch RNG state, the best weights so far and the history. Training
data are a pure function of ``(seed, epoch, sample index)``, so a resumed run continues with
exactly the batches an uninterrupted run would have drawn.
"""
from __future__ import annotations

import copy
import csv
import datetime as _dt
import math
import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import Cancelled, InputError, ModelError, OutputError
from .config import TrainConfig, TrainResult
from .data import (Degradation, PatchDataset, SeriesData, load_series, match_pairs, prewarm_ct_maps, resliced_views,
                   split_series, validation_set)
from .distributed import DistInfo, all_mean, barrier, setup, sync_buffers, teardown, unwrap, wrap
from .distill import EnsembleTargets
from .losses import Neighbor2NeighborLoss, Noise2VoidLoss, SupervisedLoss

CHECKPOINT_FORMAT = "napari-restore-checkpoint"
_LOG_FIELDS = ("epoch", "step", "train_loss", "val_loss", "val_psnr", "val_ssim", "lr", "seconds")


# ---------------------------------------------------------------------------- checkpoints
def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``); a run folder means its ``last.pt``.

    Raises:
        ModelError: missing, unreadable, or not a napari-restore checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise ModelError("checkpoint not found", path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
                         path) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ModelError("not a napari-restore training checkpoint", path)
    ckpt["path"] = str(path)
    return ckpt


def _save_checkpoint(path: Path, data: dict[str, Any]) -> None:
    from ..io.atomic import atomic_file

    with atomic_file(path, overwrite=True) as tmp:
        torch.save(data, tmp)


def _state_cpu(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in unwrap(net).state_dict().items()}


# ---------------------------------------------------------------------------- metrics
def _metrics(item: dict[str, Any], pred: np.ndarray) -> tuple[float, float]:
    """PSNR/SSIM of one validation item: CT windowed W400/L50 in HU, MR in network units (range 1)."""
    from .. import metrics as M

    s: SeriesData = item["series"]
    tgt, out = item["target"][0], pred[0]
    if min(tgt.shape[-2:]) < 7:
        return math.nan, math.nan
    if s.modality == "CT":
        t_hu, p_hu = s.physical(tgt), s.physical(out)
        return M.ct_psnr(t_hu, p_hu), M.ct_ssim(t_hu, p_hu)
    return M.psnr(tgt, out, 1.0), M.ssim(tgt, out, 1.0)


def _mean(values: list[float]) -> float | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    return float(np.mean(v)) if v else None


# ---------------------------------------------------------------------------- the run
def train(config: TrainConfig, progress: Callable[[int, int], Any] | None = None,
          cancel: Callable[[], bool] | None = None) -> TrainResult:
    """Train a restoration network; see :class:`~napari_restore.training.config.TrainConfig`.

    Works in one process or under ``torchrun`` (DDP; logs and saves on rank 0 only). Every bad
    input (missing/empty/unreadable data, too few series to split, unmatched pairs, a checkpoint
    of another architecture, an existing output) is reported before training starts.

    Args:
        config: the run's configuration.
        progress: ``progress(step, total_steps)`` after every optimiser step (rank 0).
        cancel: asked before every step; ``True`` stops the run with :class:`Cancelled` (the
            checkpoints of finished epochs stay, so the run can be resumed).

    Returns:
        :class:`TrainResult` (on every rank). The model folder ``config.output`` holds the best
        weights and a card with the data, the command and the validation figures.
    """
    cfg = copy.deepcopy(config).validate()
    info = setup(cfg.device)
    try:
        return _Run(cfg, info, progress, cancel).run()
    finally:
        teardown(info)


def _new_args(cfg: TrainConfig) -> dict[str, Any]:
    """ResidualUNet arguments of a network trained from scratch."""
    from ..networks import DEFAULT_2D, DEFAULT_3D

    args = dict(cfg.architecture) if cfg.architecture else dict(DEFAULT_2D if cfg.dims == 2 else DEFAULT_3D)
    args["spatial_dims"] = cfg.dims
    if cfg.context is not None:
        args["context"] = int(cfg.context)
    if cfg.noise_input:
        args["noise_input"] = True
    return args


def _warm_start(cfg: TrainConfig, init_card: Any, arch: dict[str, Any],
                state: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(architecture, weights) of a fine-tune from ``init_card``'s network ``arch`` / ``state``.

    A warm start may add context slices (to a single-slice network) and the noise-level channel;
    the grown network starts as the same function. Any other difference is refused."""
    from ..networks import build_network, expand_context

    wanted = build_network("ResidualUNet", cfg.architecture).config if cfg.architecture is not None else arch["args"]
    if cfg.context is not None:
        wanted = {**wanted, "context": int(cfg.context)}
    if cfg.noise_input:
        wanted = {**wanted, "noise_input": True}
    grown = ("context", "noise_input")
    if {k: v for k, v in wanted.items() if k not in grown} != {k: v for k, v in arch["args"].items() if k not in grown} \
            or arch["args"]["context"] not in (0, wanted["context"]) \
            or (arch["args"].get("noise_input") and not wanted.get("noise_input")):
        raise ModelError(f"init_model {init_card.name!r} has architecture {arch['args']}, which differs from "
                         f"the requested {wanted}", init_card.path)
    if wanted == arch["args"]:
        return arch, state
    net = build_network("ResidualUNet", wanted)
    return {"name": "ResidualUNet", "args": net.config}, expand_context(state, net)


class _Run:
    def __init__(self, cfg: TrainConfig, info: DistInfo, progress, cancel):
        self.cfg, self.info, self.progress, self.cancel = cfg, info, progress, cancel
        self.t0 = time.perf_counter()

    # ------------------------------------------------------------------ preparation (all checks)
    def prepare(self) -> None:
        cfg = self.cfg
        out = Path(cfg.output)
        if out.exists() and not cfg.overwrite and not cfg.resume:
            raise OutputError("the output model folder exists already; pass overwrite=True (--overwrite)", out)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)

        from ..models import load_model
        from ..networks import build_network, network_spec

        self.ckpt = read_checkpoint(cfg.resume) if cfg.resume else None
        self.teacher: EnsembleTargets | None = None  # distill_ensemble: towards the init model's self-ensemble
        init_card = None
        init_state = None
        if cfg.init_model:
            loaded = load_model(cfg.init_model, device="cpu")
            init_card = loaded.card
            if init_card.dims != cfg.dims:
                raise ModelError(f"init_model {init_card.name!r} is {init_card.dims}-D but dims={cfg.dims}", init_card.path)
            init_state = _state_cpu(loaded.network)
            arch = network_spec(loaded.network)
            if cfg.distill_ensemble:
                self.teacher = EnsembleTargets(loaded.network, cfg.distill_ensemble, cfg.distill_weight, self.info.device)
            arch, init_state = _warm_start(cfg, init_card, arch, init_state)
        else:
            arch = {"name": "ResidualUNet", "args": build_network("ResidualUNet", _new_args(cfg)).config}
        self.arch = arch
        self.context = int(arch["args"]["context"])  # always present: built by build_network
        if cfg.single_slice_fraction and not self.context:
            raise InputError("single_slice_fraction needs a 2.5-D network (context > 0: --context or a 2.5-D "
                             f"init model), got context {self.context}")
        self.init_spacing_limit = init_card.max_slice_spacing_mm if init_card is not None else None
        self.init_name = f"{init_card.name} v{init_card.version}" if init_card is not None else None
        if self.ckpt is not None:
            saved = self.ckpt.get("architecture") or {}
            if saved.get("name") != arch["name"] or build_network(saved["name"], saved.get("args")).config != arch["args"]:
                raise ModelError(f"the checkpoint was trained with architecture {self.ckpt.get('architecture')}, "
                                 f"but this run builds {arch}; resume with the same architecture", self.ckpt["path"])

        # ---- data
        spec = cfg.intensity or (init_card.intensity if init_card else None)
        modality = cfg.modality if cfg.modality != "auto" else (init_card.modality if init_card and init_card.modality != "any" else "auto")
        if self.ckpt is not None:
            spec = spec or self.ckpt.get("intensity")
        if cfg.mode == "paired":
            full = load_series(cfg.data, modality, spec, cfg.cache_dir)
            low = load_series(cfg.low_data, full[0].modality, spec, cfg.cache_dir)
            pairs = match_pairs(low, full)
            lows, fulls = [p[0] for p in pairs], [p[1] for p in pairs]
            if cfg.val_data:
                raise InputError("paired mode splits the matched pairs itself; val_data is not used (drop --val-data)")
            tr_low, va_low = split_series(lows, cfg.val_fraction, cfg.seed)
            by_key = {id(lo): fu for lo, fu in zip(lows, fulls)}
            self.train_series, self.train_targets = tr_low, [by_key[id(s)] for s in tr_low]
            self.val_series, self.val_targets = va_low, [by_key[id(s)] for s in va_low]
        else:
            series = load_series(cfg.data, modality, spec, cfg.cache_dir)
            if cfg.val_data:
                self.train_series = series
                self.val_series = load_series(cfg.val_data, series[0].modality, spec, cfg.cache_dir)
                overlap = {s.key for s in series} & {s.key for s in self.val_series}
                if overlap:
                    raise InputError(f"the same series is in the training and the validation data: {sorted(overlap)[:3]}")
            else:
                self.train_series, self.val_series = split_series(series, cfg.val_fraction, cfg.seed)
            self.train_targets = self.val_targets = None
        self.modality = self.train_series[0].modality
        if cfg.disk_fraction and (self.modality != "CT" or cfg.mode != "supervised" or cfg.dims != 2):
            raise InputError("disk_fraction is for supervised 2-D / 2.5-D CT training, got "
                             f"{self.modality} {cfg.mode} {cfg.dims}-D")
        if cfg.reslice:
            if self.modality == "CT" and cfg.task == "denoise":
                raise InputError("reslice is not for CT denoising: its noise is simulated in the axial plane")
            views = resliced_views(self.train_series)
            if not views:
                raise InputError("reslice: no training series has near-isotropic voxels "
                                 f"(spacings {sorted({tuple(round(v, 2) for v in s.spacing) for s in self.train_series})})")
            self.train_series = self.train_series + views
        if cfg.target_nlm:
            from .targets import denoised_targets

            self.train_series = denoised_targets(self.train_series, cfg.target_nlm, cfg.cache_dir)
            self.val_series = denoised_targets(self.val_series, cfg.target_nlm, cfg.cache_dir)
        if init_card is not None and init_card.modality not in ("any", self.modality):
            raise ModelError(f"init_model {init_card.name!r} is for {init_card.modality}, the data are {self.modality}",
                             init_card.path)
        from ..intensity import default_spec, validate_spec

        self.spec = validate_spec(spec or default_spec(self.modality))
        if cfg.mode == "self-supervised" and cfg.dims != 2:
            raise InputError("self-supervised training is implemented for 2-D slices (dims=2) only")

        if cfg.mode == "supervised":
            kind = "gaussian_blur" if cfg.task == "deblur" else ("ct_lowdose" if self.modality == "CT" else "mr_rician")
            self.degradation = Degradation(kind, tuple(cfg.dose_range), tuple(cfg.rician_range), tuple(cfg.fwhm_range),
                                           cfg.blur_noise, cfg.ct_noise_method,
                                           None if cfg.ct_noise_hu is None else tuple(cfg.ct_noise_hu),
                                           tuple(cfg.ct_filters),
                                           None if cfg.ct_pixel_range is None else tuple(cfg.ct_pixel_range),
                                           bool(cfg.log_draw), float(cfg.clean_fraction),
                                           None if cfg.blur_noise_range is None else tuple(cfg.blur_noise_range),
                                           float(cfg.blur_anisotropy), float(cfg.blur_tail),
                                           None if cfg.zoom_range is None else tuple(cfg.zoom_range))
        else:
            self.degradation = None

        # ---- network, optimiser, schedule
        net = build_network("ResidualUNet", arch["args"])
        if init_state is not None:
            net.load_state_dict(init_state)
        if self.ckpt is not None:
            try:
                net.load_state_dict(self.ckpt["model"], strict=True)
            except RuntimeError as exc:
                raise ModelError(f"the checkpoint's weights do not fit: {' '.join(str(exc).split())[:300]}",
                                 self.ckpt["path"]) from None
        self.net = wrap(net.to(self.info.device), self.info)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        total = cfg.epochs * cfg.steps_per_epoch
        if cfg.schedule == "cosine":
            self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total, eta_min=cfg.lr * 0.01)
        elif cfg.schedule == "plateau":
            self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(self.opt, factor=0.5, patience=max(1, cfg.patience // 3))
        else:
            self.sched = None
        if cfg.pd_factor is None:  # measured: PD 2 helps N2N on CT projection-domain noise
            cfg.pd_factor = 2 if self.modality == "CT" else 1
        if cfg.mode == "self-supervised":
            self.ss_loss = (Neighbor2NeighborLoss(cfg.n2n_gamma, cfg.pd_factor) if cfg.self_supervised == "n2n"
                            else Noise2VoidLoss(cfg.blind_spot, cfg.n2v_spacing))
        else:
            self.sup_loss = SupervisedLoss(cfg.loss, cfg.ssim_weight, cfg.dims)

        # ---- datasets
        if cfg.num_workers > 1 and self.degradation is not None and self.degradation.uses_ct_maps():
            # once here, in parallel, instead of once per DataLoader worker (they fork from here)
            prewarm_ct_maps(self.train_series, cfg.num_workers)
        per_rank = cfg.steps_per_epoch * cfg.batch_size
        self.dataset = PatchDataset(self.train_series, cfg.patch_size, per_rank * self.info.world_size,
                                    self.degradation, self.train_targets, cfg.augment, cfg.jitter, cfg.seed,
                                    context=self.context, single_slice_fraction=cfg.single_slice_fraction,
                                    disk_fraction=cfg.disk_fraction, disk_weight=cfg.disk_weight,
                                    smooth_fraction=cfg.smooth_fraction, smooth_sigma=cfg.smooth_sigma)
        self.sampler = None
        if self.info.distributed:
            self.sampler = torch.utils.data.DistributedSampler(self.dataset, self.info.world_size, self.info.rank,
                                                               shuffle=False, drop_last=True)
        self.val_items = validation_set(self.val_series, cfg.patch_size, cfg.val_slices, cfg.val_crop,
                                        self.degradation, self.val_targets, cfg.seed,
                                        context=self.context)

        # ---- restore the run state
        self.epoch, self.step = 0, 0
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.since_best = 0
        self.init_val: dict[str, Any] = {}  # validation of the init model before any step
        if self.ckpt is not None:
            if self.ckpt.get("optimizer"):
                self.opt.load_state_dict(self.ckpt["optimizer"])
            if self.sched is not None and self.ckpt.get("scheduler"):
                self.sched.load_state_dict(self.ckpt["scheduler"])
            self.epoch, self.step = int(self.ckpt["epoch"]), int(self.ckpt["step"])
            self.history = list(self.ckpt.get("history", []))
            self.best = dict(self.ckpt.get("best", {}))
            self.best_state = self.ckpt.get("best_state")
            self.since_best = int(self.ckpt.get("since_best", 0))
            self.init_val = dict(self.ckpt.get("init_val") or {})
            if "torch_rng" in self.ckpt:
                torch.set_rng_state(self.ckpt["torch_rng"])
            if self.epoch >= cfg.epochs:
                warnings.warn(f"the checkpoint has done {self.epoch} epochs already (epochs={cfg.epochs}); "
                              "only the model is written", RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------ validation
    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        net = self.net
        net.eval()
        inner = unwrap(net)
        losses, psnrs, ssims = [], [], []
        for k, item in enumerate(self.val_items):
            x = torch.from_numpy(item["input"])[None].to(self.info.device)
            y = torch.from_numpy(item["target"])[None].to(self.info.device)
            if self.cfg.mode == "self-supervised":
                g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + k)
                h, w = x.shape[-2:]
                m = 2 * self.cfg.pd_factor
                x = x[..., : h - h % m, : w - w % m]
                losses.append(float(self.ss_loss(inner, x, g)))
                continue
            pred = inner(x)
            losses.append(float(self.sup_loss(pred, y)))
            p, s = _metrics(item, pred.float().cpu().numpy()[0])
            psnrs.append(p)
            ssims.append(s)
        net.train()
        return {"val_loss": _mean(losses), "val_psnr": _mean(psnrs), "val_ssim": _mean(ssims)}

    def baseline(self) -> dict[str, Any]:
        """Metrics of the degraded validation input itself (what the network must beat)."""
        if self.cfg.mode == "self-supervised":
            return {}
        ps, ss, ls = [], [], []
        for item in self.val_items:
            c = item["input"].shape[0] // 2  # 2.5-D: the centre slice; otherwise the one channel
            inp = item["input"][c:c + 1]
            p, s = _metrics(item, inp)
            ps.append(p)
            ss.append(s)
            ls.append(float(self.sup_loss(torch.from_numpy(inp), torch.from_numpy(item["target"]))))
        return {"val_loss": _mean(ls), "val_psnr": _mean(ps), "val_ssim": _mean(ss)}

    # ------------------------------------------------------------------ main
    def run(self) -> TrainResult:
        self.prepare()
        cfg, info = self.cfg, self.info
        run_dir = cfg.run_path
        self.base = self.baseline()
        if self.init_name and not self.init_val and self.step == 0:
            self.init_val = self.validate()  # the model it starts from, on the same validation data
        writer, log_path = None, run_dir / "log.csv"
        if info.is_main:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot create the run folder: {exc.strerror or exc}", run_dir) from None
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    writer = SummaryWriter(str(run_dir / "tensorboard"))
                except ImportError:  # the core install has no TensorBoard: the CSV log is the record
                    warnings.warn(f"TensorBoard logging is off: tensorboard is not installed (pip install "
                                  f"'napari-restore[train]'); the training log is {log_path}", RuntimeWarning,
                                  stacklevel=2)
                except Exception as exc:  # tensorboard broken: only TB is skipped
                    warnings.warn(f"TensorBoard logging is off ({type(exc).__name__}: {exc})", RuntimeWarning, stacklevel=2)
            if not log_path.exists() or self.ckpt is None:
                with open(log_path, "w", newline="") as fh:
                    csv.writer(fh).writerow(_LOG_FIELDS)
                    if self.base:
                        csv.writer(fh).writerow([0, 0, "", *(self.base.get(k, "") for k in ("val_loss", "val_psnr", "val_ssim")), "", ""])
        total_steps = cfg.epochs * cfg.steps_per_epoch
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                             shuffle=False, num_workers=cfg.num_workers, drop_last=True,
                                             persistent_workers=cfg.num_workers > 0)
        bar = None
        if info.is_main and cfg.progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=total_steps, initial=self.step, desc="train", unit="step", file=sys.stderr,
                       dynamic_ncols=True)
        stopped_early = False
        gen = torch.Generator()
        last_val = self.history[-1] if self.history else {}
        try:
            while self.epoch < cfg.epochs:
                te = time.perf_counter()
                if cfg.max_minutes > 0 and isinstance(self.sched, torch.optim.lr_scheduler.CosineAnnealingLR):
                    self._time_cosine(info)
                self.dataset.set_epoch(self.epoch)
                if self.sampler is not None:
                    self.sampler.set_epoch(self.epoch)
                self.net.train()
                losses = []
                for batch in loader:
                    if self.cancel is not None and self.cancel():
                        raise Cancelled(f"training cancelled at step {self.step}; resume from {run_dir / 'last.pt'}")
                    x = batch["input"].to(info.device, non_blocking=True)
                    y = batch["target"].to(info.device, non_blocking=True)
                    if cfg.mode == "self-supervised":
                        gen.manual_seed((cfg.seed * 7919 + self.step) * 131 + info.rank)
                        loss = self.ss_loss(self.net, x, gen)
                    else:
                        if self.teacher is not None:
                            y = self.teacher(x, y)
                        w = batch.get("weight")
                        loss = self.sup_loss(self.net(x), y, None if w is None else w.to(info.device, non_blocking=True))
                    if not torch.isfinite(loss):
                        raise ModelError(f"the training loss became {float(loss)} at step {self.step}; lower lr (now {cfg.lr})")
                    self.opt.zero_grad(set_to_none=True)
                    loss.backward()
                    self.opt.step()
                    if isinstance(self.sched, torch.optim.lr_scheduler.CosineAnnealingLR) and not cfg.max_minutes > 0:
                        self.sched.step()
                    self.step += 1
                    losses.append(loss.item())
                    if bar is not None:
                        bar.update(1)
                        post = {"loss": f"{losses[-1]:.4g}", "epoch": self.epoch + 1}
                        if last_val.get("val_psnr") is not None:
                            post["val_psnr"] = f"{last_val['val_psnr']:.2f}"
                        elif last_val.get("val_loss") is not None:
                            post["val_loss"] = f"{last_val['val_loss']:.4g}"
                        bar.set_postfix(post)
                    if self.progress is not None and info.is_main:
                        self.progress(self.step, total_steps)
                sync_buffers(self.net, info)
                self.epoch += 1
                val = self.validate()
                rec = {"epoch": self.epoch, "step": self.step, "train_loss": all_mean(float(np.mean(losses)), info),
                       **val, "lr": float(self.opt.param_groups[0]["lr"]), "seconds": round(time.perf_counter() - te, 2)}
                if isinstance(self.sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
                    self.sched.step(val["val_loss"])
                self.history.append(rec)
                last_val = rec
                improved = not self.best or (val["val_loss"] is not None and val["val_loss"] < self.best["val_loss"])
                if improved:
                    self.best, self.best_state, self.since_best = dict(rec), _state_cpu(self.net), 0
                else:
                    self.since_best += 1
                stop = cfg.patience > 0 and self.since_best >= cfg.patience
                if cfg.max_minutes > 0:  # rank 0's clock decides, so that all ranks stop together
                    late = float(time.perf_counter() - self.t0 > 60.0 * cfg.max_minutes) if info.is_main else 0.0
                    stop = stop or all_mean(late, info) > 0
                if info.is_main:
                    self._log(rec, log_path, writer)
                    self._checkpoint(run_dir, improved)
                barrier(info)
                if stop and self.epoch < cfg.epochs:
                    stopped_early = True
                    break
        finally:
            if bar is not None:
                bar.close()
            if writer is not None:
                writer.close()
        return self.finish(run_dir, stopped_early)

    def _time_cosine(self, info) -> None:
        """Set this epoch's learning rate on a cosine over the run's time budget.

        With ``max_minutes`` the run ends on the clock, so the cosine spans whichever is further
        along: the epochs done or the wall time used (ranks' clocks averaged, so that every rank
        uses the same rate). Decays to 1 % of ``lr`` like the per-step cosine.
        """
        cfg = self.cfg
        used = all_mean(time.perf_counter() - self.t0, info) / (60.0 * cfg.max_minutes)
        progress = min(1.0, max(self.epoch / cfg.epochs, used))
        lr = cfg.lr * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * progress)))
        for group in self.opt.param_groups:
            group["lr"] = lr

    def _log(self, rec: dict[str, Any], log_path: Path, writer) -> None:
        with open(log_path, "a", newline="") as fh:
            csv.writer(fh).writerow(["" if rec.get(k) is None else rec[k] for k in _LOG_FIELDS])
        if writer is not None:
            for k in ("train_loss", "val_loss", "val_psnr", "val_ssim", "lr"):
                if rec.get(k) is not None:
                    writer.add_scalar(k, rec[k], rec["step"])
            writer.flush()

    def _checkpoint(self, run_dir: Path, improved: bool) -> None:
        state = _state_cpu(self.net)
        data = {
            "format": CHECKPOINT_FORMAT, "format_version": 1, "architecture": self.arch, "intensity": self.spec,
            "modality": self.modality, "model": state, "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict() if self.sched is not None else {},
            "epoch": self.epoch, "step": self.step, "history": self.history, "best": self.best,
            "best_state": self.best_state, "since_best": self.since_best, "torch_rng": torch.get_rng_state(),
            "init_val": self.init_val,
            "config": self.cfg.to_dict(),
        }
        _save_checkpoint(run_dir / "last.pt", data)
        if improved:
            _save_checkpoint(run_dir / "best.pt", {**data, "optimizer": {}, "scheduler": {}})

    def finish(self, run_dir: Path, stopped_early: bool) -> TrainResult:
        cfg, info = self.cfg, self.info
        net = unwrap(self.net)
        if self.best_state is not None and cfg.keep == "best":
            net.load_state_dict(self.best_state)
        net = net.to("cpu").eval()
        if info.is_main:
            from ..models import save_model

            save_model(net, _model_card(self), cfg.output, overwrite=cfg.overwrite or bool(cfg.resume))
        barrier(info)
        return TrainResult(Path(cfg.output), run_dir, self.history, self.best, self.base, self.epoch, self.step,
                           stopped_early, time.perf_counter() - self.t0, net, info.world_size)


def _model_card(run: _Run) -> dict[str, Any]:
    """The trained model's card: metrics against the input and the initial model, what it was trained on."""
    cfg = run.cfg
    metrics: dict[str, Any] = {"epochs": run.epoch, "steps": run.step}
    kept = run.history[-1] if cfg.keep == "last" and run.history else run.best  # the weights the folder holds
    if cfg.keep == "last":
        metrics["kept"] = "last epoch"
    for k in ("val_loss", "val_psnr", "val_ssim"):
        if kept.get(k) is not None:
            metrics[k] = float(f"{float(kept[k]):.6g}")
        if run.base.get(k) is not None:
            metrics[k + "_input"] = float(f"{float(run.base[k]):.6g}")
        if run.init_val.get(k) is not None:
            metrics[k + "_init"] = float(f"{float(run.init_val[k]):.6g}")
    if metrics.get("val_psnr") is not None and metrics.get("val_psnr_input") is not None:
        metrics["psnr_gain_db"] = round(metrics["val_psnr"] - metrics["val_psnr_input"], 3)
    if run.modality == "CT" and "val_psnr" in metrics:
        metrics["metric_convention"] = "CT PSNR/SSIM on HU windowed W400/L50 to [0, 1]"
    elif "val_psnr" in metrics:
        metrics["metric_convention"] = "MR PSNR/SSIM in network units (1st..99th percentile -> 0..1), data range 1"
    if cfg.target_nlm and "metric_convention" in metrics:
        metrics["metric_convention"] += (f"; against the validation scans without their own noise (non-local means, "
                                         f"h {cfg.target_nlm:g} x each slice's noise SD)")
    sources = list(cfg.data_description) or sorted({s.source for s in run.train_series})
    val_sources = [] if cfg.data_description else sorted({s.source for s in run.val_series})
    # data written to a temporary folder (the widget): the card names the description, not the files
    hidden = {"command"} | ({"data", "val_data", "low_data", "output", "run_dir", "cache_dir"}
                            if cfg.data_description else set())
    what = {"supervised": f"supervised on synthetic {run.degradation.kind if run.degradation else ''} degradations",
            "paired": "paired low-dose / full-dose scans",
            "self-supervised": f"self-supervised ({cfg.self_supervised})"}[cfg.mode]
    return {
        "name": cfg.name, "version": cfg.version, "task": cfg.task, "modality": run.modality, "dims": cfg.dims,
        "architecture": run.arch, "intensity": run.spec,
        "patch_size": list(cfg.patch_size) if cfg.dims == 3 else None,
        # a fine-tuned context model keeps the slice spacing its init model is limited to
        "max_slice_spacing_mm": run.init_spacing_limit if run.context else None,
        "training_data": sources, "metrics": metrics,
        "description": cfg.description or f"{cfg.task} model for {run.modality}, trained {what}.",
        "license": cfg.license, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        # data written to a temporary folder (the widget): not the host program's own argv either
        "training": {"mode": cfg.mode, "command": None if cfg.data_description else cfg.command,
                     "validation_data": val_sources,
                     "init_model": run.init_name,
                     "config": {k: v for k, v in cfg.to_dict().items() if k not in hidden},
                     "history": run.history, "stopped_early": run.epoch < cfg.epochs},
    }


__all__ = ["train", "read_checkpoint", "CHECKPOINT_FORMAT"]
