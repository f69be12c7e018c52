"""The batch run: :func:`run_batch` walks, plans, restores and records a whole tree of studies.

:func:`run_batch` walks ``INPUT_ROOT`` (:mod:`.walk`), keeps the image series, restores each one
with :func:`napari_restore.restore` and writes the results under ``OUTPUT_ROOT`` mirroring the
input tree, through a reader pool and a writer pool around the model (:mod:`.pipeline`). A
manifest (:mod:`.manifest`) records one row per series as the run goes; a rerun skips what is done
(and still on disk), retries failures with ``retry_failed=True`` and never trusts an output the
manifest does not vouch for. Under ``torchrun`` or with ``shard=(i, n)`` each process takes its
deterministic share (:mod:`.shard`).
"""
from __future__ import annotations

import functools
import os
import secrets
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from ..constants import IMAGE_MODALITIES
from ..errors import InputError, ModelError, OutputError
from ..options import RestoreOptions, with_option_parameters
from .manifest import DONE, FAILED, MANIFEST_NAME, Manifest
from .pipeline import Outcome, Pipeline, read_item, write_result
from .shard import Shard, agree, all_ok, barrier, digest, from_environment, init_group, parse_shard, select, teardown
from .walk import SeriesItem, WalkResult, plan_outputs, walk_tree

FORMATS = ("auto", "dicom", "nifti")


@dataclass
class BatchResult:
    """What a batch run did (this process's share; rank 0 of torchrun also sees the merged total).

    Attributes:
        planned: ``(item, output, action)`` for every series of this share, ``action`` one of
            ``"restore"``, ``"retry"``, ``"done"`` (done earlier), ``"failed"`` (failed earlier).
        outcomes: what happened to each series run now.
        skipped: series and files left out, by category.
        timings: ``walk``, ``wall`` and summed ``read``/``compute``/``write`` seconds, and
            ``model_wait`` (time the model waited for input).
        failed_total: failed series over the whole run as the manifest says (rank 0/single process).
    """

    input_root: Path
    output_root: Path
    shard: Shard
    planned: list[tuple[SeriesItem, Path, str]] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    skipped_lines: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    manifest: Path | None = None
    dry_run: bool = False
    failed_total: int = 0
    peak_series_in_memory: int = 0

    @property
    def done_now(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == DONE]

    @property
    def failed_now(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == FAILED]

    @property
    def failed_before(self) -> int:
        return sum(1 for _, _, a in self.planned if a == "failed")

    @property
    def ok(self) -> bool:
        """True when every series of the run is done."""
        return self.failed_total == 0 and not self.failed_now and not self.failed_before

    @property
    def exit_code(self) -> int:
        """0 when every series is done (a dry run: 0), else 1."""
        return 0 if self.ok or self.dry_run else 1


# ----------------------------------------------------------------------------- models
class _Models:
    """The model for each modality, loaded once for the whole run."""

    def __init__(self, task: str, model: Any, mode: str):
        from ..models import LoadedModel, load_model

        self.task, self.mode = task, mode
        self.cache: dict[str, Any] = {}
        self.fixed = None
        if model is not None and not isinstance(model, (dict, LoadedModel)):
            self.fixed = load_model(model, device="cpu")  # ModelError here stops the run before it starts
        elif model is not None:
            self.fixed = model

    def for_modality(self, modality: str) -> Any:
        if self.fixed is not None or self.task == "restore":
            return self.fixed
        mod = modality if modality in IMAGE_MODALITIES else "any"
        if mod not in self.cache:
            from ..models import find_model, load_model

            card = find_model(self.task, mod, 2 if self.mode == "2d" else 3)
            self.cache[mod] = load_model(card, device="cpu") if card is not None else None
        return self.cache[mod]

    def check(self, modalities: set[str]) -> None:
        """Fail before the run when no series at all could find a model."""
        if self.fixed is not None or self.task in ("enhance", "restore") or not modalities:
            return
        if all(self.for_modality(m) is None for m in modalities):
            from ..inference import _no_model_message

            raise ModelError(_no_model_message(self.task, sorted(modalities)[0], self.mode)
                             + " For a batch run pass --model.")


# ----------------------------------------------------------------------------- progress
class _Progress:
    """An overall bar (slices, series, time left) and one line per finished series."""

    def __init__(self, total_series: int, total_slices: int, bar: bool, prefix: str, out=None):
        self.n, self.k = total_series, 0
        self.prefix, self.out = prefix, out or sys.stdout
        self.lock = threading.Lock()
        self.bar = None
        if bar and total_series:
            from tqdm import tqdm

            self.bar = tqdm(total=total_slices, unit="slice", desc=f"{prefix}series 0/{total_series}",
                            file=sys.stderr, dynamic_ncols=True, smoothing=0.1)

    def line(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def finished(self, o: Outcome, output_root: Path) -> None:
        with self.lock:
            self.k += 1
            shape = "x".join(str(s) for s in (o.shape or o.item.shape)) or "?"
            where = os.path.relpath(o.output, output_root) if o.status == DONE else o.error
            warned = f" ({len(o.warnings)} warning{'s' if len(o.warnings) > 1 else ''})" if o.warnings else ""
            self.line(f"{self.prefix}[{self.k}/{self.n}] {o.status:<6} {o.item.input} "
                      f"{('#' + o.item.series_number) if o.item.series_number else ''} ({shape}) "
                      f"{o.seconds:.1f} s -> {where}{warned}")
            if self.bar is not None:
                self.bar.set_description(f"{self.prefix}series {self.k}/{self.n}", refresh=False)
                self.bar.update(max(1, o.item.slices))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----------------------------------------------------------------------------- main entry
@with_option_parameters
def run_batch(input_root: str | os.PathLike, output_root: str | os.PathLike,
              options: RestoreOptions | Mapping[str, Any] | None = None, *, format: str = "auto",
              deidentify: bool = False, deidentify_key: str | None = None, deidentify_dates: str = "remove",
              accept_burned_in: bool = False, retry_failed: bool = False, dry_run: bool = False,
              shard: str | tuple[int, int] | None = None, readers: int = 2, writers: int = 2, prefetch: int = 1,
              pool: str = "process", walk_workers: int | None = None, max_voxels: int | None = None,
              progress: bool | str = "auto", out=None, stop: threading.Event | None = None,
              **restore_options: Any) -> BatchResult:
    """Restore every image series under ``input_root`` into ``output_root``.

    Args:
        input_root: a tree of studies: DICOM folders (any depth, with or without DICOMDIR), NIfTI,
            MHA/NRRD files.
        output_root: where results go, mirroring the input tree, plus ``manifest.csv``.
        options: how to restore every series, a :class:`~napari_restore.options.RestoreOptions`
            (or a mapping of its fields); the fields may also be passed as keyword arguments
            (``task=``, ``model=``, ``mode=``, ``device=``, ``strength=``, ...), which override it.
            ``model`` is loaded once (``None``: the best installed model per modality).
        format: ``"auto"`` (DICOM series for DICOM input, NIfTI for NIfTI/MHA input), ``"dicom"`` or
            ``"nifti"`` (``.nii.gz``).
        deidentify: DICOM output with the PS3.15 Annex E basic profile; ``deidentify_key`` (or
            ``$NAPARI_RESTORE_DEID_KEY``) keeps UIDs consistent across runs, shards and ranks (under
            torchrun rank 0's key is shared); ``deidentify_dates``: ``"remove"`` or ``"shift"``.
        retry_failed: run again the series the manifest records as failed (else they stay failed).
        dry_run: only list what would be done; nothing is written.
        shard: ``"i/n"`` or ``(i, n)``: do share ``i`` (0-based) of ``n`` (Slurm job arrays);
            under torchrun the rank and world size are used instead.
        readers, writers, prefetch: reader/writer pool sizes and the read-ahead length (memory:
            at most ``readers + prefetch + 1 + 2 * writers`` series at once).
        pool: ``"process"`` (reader and writer processes, the default: the model thread never
            waits for the GIL) or ``"thread"`` (lighter to start; for small trees).
        walk_workers: processes reading headers during the walk (default up to 4).
        max_voxels: series larger than this fail with "too large" instead of being read.
        progress: ``"auto"`` (a bar when stderr is a terminal), True or False; one line per
            finished series is printed to ``out`` (default stdout) in any case.
        stop: an Event that ends the run early when set (what is finished stays recorded).

    Returns:
        :class:`BatchResult`; ``result.exit_code`` is 0 when every series is done.

    Raises:
        InputError: bad roots or options. ModelError: the model cannot be loaded, or none is
            installed for any series. OutputError: the output root is not writable.
    """
    t_start = time.perf_counter()
    opts = RestoreOptions.build(options, **restore_options)  # checked once here, not once per series
    src, dst = Path(input_root), Path(output_root)
    fmt = str(format or "auto").lower()
    if fmt not in FORMATS:
        raise InputError(f"unknown --format {format!r}; use dicom or nifti")
    if not src.is_dir():
        raise InputError("the input root must be an existing folder", src)
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r or dst_r in src_r.parents or dst_r.is_relative_to(src_r):
        raise OutputError("the output root must not be the input root, contain it or lie inside it; inputs are "
                          "never modified (nothing was written)", dst)
    sh = shard if isinstance(shard, Shard) else from_environment(parse_shard(shard) if isinstance(shard, str)
                                                                 else tuple(shard) if shard else None)
    prefix = f"[{sh.tag}] " if sh.tag else ""
    printer = out or sys.stdout
    started_group = init_group(sh)
    try:
        return _run(src, dst, sh, prefix, printer, t_start, opts, fmt=fmt,
                    deidentify=deidentify, deidentify_key=deidentify_key, deidentify_dates=deidentify_dates,
                    accept_burned_in=accept_burned_in, retry_failed=retry_failed, dry_run=dry_run, readers=readers,
                    writers=writers, prefetch=prefetch, pool=pool, walk_workers=walk_workers, max_voxels=max_voxels,
                    progress=progress, stop=stop)
    finally:
        teardown(started_group)


def _say(printer, text: str) -> None:
    print(text, file=printer, flush=True)


def _output_ok(output: Path, fmt_dicom: bool) -> bool:
    if fmt_dicom:
        return output.is_dir() and any(output.iterdir())
    return output.is_file() and output.stat().st_size > 0


def _run(src: Path, dst: Path, sh: Shard, prefix: str, printer, t_start: float, opts: RestoreOptions, *, fmt: str,
         deidentify: bool, deidentify_key: str | None, deidentify_dates: str,
         accept_burned_in: bool, retry_failed: bool, dry_run: bool, readers: int, writers: int, prefetch: int,
         pool: str, walk_workers: int | None, max_voxels: int | None, progress: bool | str,
         stop: threading.Event | None) -> BatchResult:
    from ..inference import restore

    exclude = dst if dst.resolve().is_relative_to(src.resolve()) else None
    walked: WalkResult = walk_tree(src, workers=walk_workers, exclude=exclude)
    items = walked.items
    plans = plan_outputs(items, dst, fmt)
    key = deidentify_key or os.environ.get("NAPARI_RESTORE_DEID_KEY") or None
    if deidentify and key is None and sh.distributed and sh.index == 0:
        key = secrets.token_hex(32)  # one key for every rank: one UID mapping per run
    key = agree(sh, digest(items), key if deidentify else None)
    mine = select(items, sh)
    result = BatchResult(src, dst, sh, skipped=walked.skipped, skipped_lines=walked.skipped_lines(), dry_run=dry_run)
    result.timings["walk"] = time.perf_counter() - t_start

    manifest = Manifest(dst, sh.tag)
    state = manifest.state() if dst.is_dir() else {}
    barrier(sh)  # every rank has read the old state before anyone appends
    for it in mine:
        out_path = plans[it.id]
        as_dicom = fmt == "dicom" or (fmt == "auto" and it.kind not in ("file",))
        row = state.get(it.id)
        rel = os.path.relpath(out_path, dst)
        if row and row["status"] == DONE and row.get("output") == rel and _output_ok(out_path, as_dicom):
            action = "done"
        elif row and row["status"] == FAILED and row.get("output") == rel:
            action = "retry" if retry_failed else "failed"
        else:
            action = "restore"
        result.planned.append((it, out_path, action))
    todo = [(it, p) for it, p, a in result.planned if a in ("restore", "retry")]
    n_done = sum(1 for *_, a in result.planned if a == "done")
    n_fail = result.failed_before
    share = f" (share {sh.index + 1} of {sh.count})" if sh.count > 1 else ""
    _say(printer, f"{prefix}{len(items)} series under {src}{share}: {len(mine)} here, {len(todo)} to restore, "
                  f"{n_done} done earlier, {n_fail} failed earlier"
                  + ("" if not n_fail or retry_failed else " (rerun with --retry-failed to try them again)"))
    for line in walked.skipped_lines():
        _say(printer, f"{prefix}  skipped {line}")

    if dry_run:
        for it, p, a in result.planned:
            shape = "x".join(map(str, it.shape)) or "?"
            what = it.error if it.kind == "error" else f"-> {os.path.relpath(p, dst)}"
            _say(printer, f"{prefix}  {a:<8} {it.input} {('#' + it.series_number) if it.series_number else ''} "
                          f"[{it.modality or it.kind}] ({shape}) {what}")
        result.timings["wall"] = time.perf_counter() - t_start
        return result

    from ..inference import resolve_device

    models = _Models(opts.task, opts.model, opts.mode)
    models.check({it.modality or "OT" for it, _ in todo if it.kind not in ("error", "file")}
                 | (set(IMAGE_MODALITIES) if any(it.kind == "file" for it, _ in todo) else set()))
    dev = opts.device
    if sh.distributed and str(dev) == "auto":
        import torch

        if torch.cuda.is_available():
            dev = f"cuda:{sh.local_rank % torch.cuda.device_count()}"
    dev = resolve_device(dev)
    deid = None
    if deidentify:
        if sh.count > 1 and not sh.distributed and key is None:
            warnings.warn("--deidentify with --shard and no --deidentify-key: each shard makes its own UID mapping, "
                          "so series of one study in different shards get different study UIDs", RuntimeWarning)
        from ..deidentify import Deidentifier

        deid = Deidentifier(key=key, dates=deidentify_dates)
        _say(printer, f"{prefix}note: manifest.csv lists the input paths (which may name patients) next to the "
                      "de-identified series UIDs; keep it apart from the data you share")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create the output root ({exc.strerror or exc})", dst) from None

    stop = stop or threading.Event()
    manifest.open()
    bar = progress is True or (progress == "auto" and sys.stderr.isatty() and sh.index == 0)
    prog = _Progress(len(todo), sum(max(1, it.slices) for it, _ in todo), bar, prefix, printer)
    timings = Counter()
    lock = threading.Lock()

    def finished(o: Outcome) -> None:
        row = {
            "input": o.item.input, "series_uid": deid.uid(o.item.series_uid) if deid and o.item.series_uid
            else o.item.series_uid, "modality": o.modality or o.item.modality,
            "shape": "x".join(str(s) for s in (o.shape or o.item.shape)), "slices": o.slices,
            "output": os.path.relpath(o.output, dst), "model": o.model, "model_version": o.model_version,
            "seconds": f"{o.seconds:.3f}", "status": o.status, "error": o.error, "warnings": " | ".join(o.warnings),
            "read_s": f"{o.read_s:.3f}", "compute_s": f"{o.compute_s:.3f}", "write_s": f"{o.write_s:.3f}",
            "finished": datetime.now().isoformat(timespec="microseconds"),
            "worker": sh.tag or "main", "id": o.item.id,
        }
        manifest.append(row)
        with lock:
            result.outcomes.append(o)
            timings["read"] += o.read_s
            timings["compute"] += o.compute_s
            timings["write"] += o.write_s
        prog.finished(o, dst)


    def compute(vol, item: SeriesItem):
        if fmt == "auto" and item.kind != "file" or fmt == "dicom":
            if vol.array.ndim != 3:
                raise OutputError(f"a {vol.array.ndim}-D series ({vol.array.shape}) cannot be written as a DICOM "
                                  "series; use --format nifti for 4-D data", item.files[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = restore(vol, options=opts, model=models.for_modality(vol.modality), device=dev,
                          cancel=stop.is_set)
        step = (res.meta.get("provenance") or [{}])[-1]
        return res, {"model": step.get("model", ""), "model_version": step.get("model_version", "")}

    read = functools.partial(read_item, max_voxels=max_voxels)  # picklable: runs in reader processes
    write = functools.partial(write_result, fmt=fmt, deidentify=deid, accept_burned_in=accept_burned_in)
    pipe = Pipeline(read, compute, write, finished, readers=readers, writers=writers, prefetch=prefetch, pool=pool,
                    stop=stop)
    import torch

    threads = torch.get_num_threads()
    if dev.type == "cpu" and pool == "process" and todo:
        # leave a core to the reader/writer processes: oversubscribed intra-op threads stall each other
        torch.set_num_threads(max(1, min(threads, (os.cpu_count() or 1) - 1)))
    t_run = time.perf_counter()
    try:
        # each series' warnings go to its manifest row; silenced here, in the calling thread, for the whole
        # run: a catch_warnings() in a worker thread alone is not thread-safe and can let one escape
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.run(todo)
    finally:
        torch.set_num_threads(threads)
        prog.close()
        manifest.close()
        result.peak_series_in_memory = pipe.peak_in_flight
        result.timings.update(timings)
        result.timings["model_wait"] = pipe.idle_s
        result.timings["run"] = time.perf_counter() - t_run
    # merge: torchrun -> rank 0 after everyone finished; --shard -> each shard folds in what is there
    ok_here = not result.failed_now and not result.failed_before
    if sh.distributed:
        ok_all = all_ok(sh, ok_here)
        if sh.index == 0:
            state = manifest.merge(remove_parts=[manifest.root / "manifest.parts" / f"rank{r}-of-{sh.count}.csv"
                                                 for r in range(sh.count)])
            ids = {it.id for it in items}
            result.failed_total = sum(1 for i, r in state.items() if i in ids and r["status"] == FAILED)
        barrier(sh)
        if not ok_all:
            result.failed_total = max(1, result.failed_total)
    elif sh.count > 1:
        manifest.merge(remove_parts=[manifest.live])
        result.failed_total = 0 if ok_here else 1
    else:
        state = manifest.state()
        ids = {it.id for it in items}
        result.failed_total = sum(1 for i, r in state.items() if i in ids and r["status"] == FAILED)
    result.manifest = dst / MANIFEST_NAME
    result.timings["wall"] = time.perf_counter() - t_start
    _summary(result, printer, prefix)
    return result


def _summary(r: BatchResult, printer, prefix: str) -> None:
    """The table printed at the end of a run."""
    done, failed = r.done_now, r.failed_now
    before_done = sum(1 for *_, a in r.planned if a == "done")
    slices = sum(o.slices for o in done)
    t = r.timings
    run = max(t.get("run", 0.0), 1e-9)
    rows = [("restored now", len(done), slices), ("failed now", len(failed), sum(o.slices for o in failed)),
            ("done earlier (skipped)", before_done, sum(it.slices for it, _, a in r.planned if a == "done")),
            ("failed earlier (not retried)", r.failed_before, sum(it.slices for it, _, a in r.planned if a == "failed"))]
    lines = [f"{prefix}batch summary: {r.input_root} -> {r.output_root}",
             f"{prefix}  {'status':<30}{'series':>8}{'slices':>10}"]
    lines += [f"{prefix}  {name:<30}{n:>8}{s:>10}" for name, n, s in rows]
    for line in r.skipped_lines:
        lines.append(f"{prefix}  skipped {line}")
    lines.append(f"{prefix}  time: walk {t.get('walk', 0):.1f} s, restore run {t.get('run', 0):.1f} s "
                 f"({len(done) / run:.2f} series/s, {slices / run:.1f} slices/s); per series summed: "
                 f"read {t.get('read', 0):.1f} s, compute {t.get('compute', 0):.1f} s, write {t.get('write', 0):.1f} s; "
                 f"model waited {t.get('model_wait', 0):.1f} s for input")
    for o in failed[:20]:
        lines.append(f"{prefix}  FAILED {o.item.input}: {o.error}")
    if len(failed) > 20:
        lines.append(f"{prefix}  ... {len(failed) - 20} more failures in the manifest")
    warned = [o for o in done if o.warnings]
    for o in warned[:20]:
        lines += [f"{prefix}  WARNING {o.item.input}: {w}" for w in o.warnings]
    if len(warned) > 20:
        lines.append(f"{prefix}  ... {len(warned) - 20} more series with warnings in the manifest")
    if r.manifest is not None:
        lines.append(f"{prefix}  manifest: {r.manifest}" + ("" if r.shard.index == 0 or not r.shard.distributed
                                                           else " (merged by rank 0)"))
    for line in lines:
        _say(printer, line)


__all__ = ["run_batch", "BatchResult", "FORMATS"]
