"""Batch throughput: ``run_batch`` over a tree of a few hundred series built from ../shared/data.

The tree lives in a temporary folder outside the repository. DICOM series are copied with new
Study/Series/SOP Instance UIDs (copies sharing UIDs would be one series); NIfTI files are
symlinked. The model is the default 2-D residual U-Net (random weights: the speed of a trained
one is the same). Reported: series/s and slices/s of the batch run, the read / compute / write
split (summed over series; they overlap), the time the model waited for input, peak memory during
the run, and the ratio to restoring the same series preloaded in memory (pure compute, same model,
same device): ``ratio = preloaded compute time for the tree's slices / batch run time``.

Usage::

    python benchmarks/batch_throughput.py [--series 300] [--device auto] [--out outputs/benchmarks]
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NAPARI_RESTORE_SHARED_DATA", REPO.parent / "shared" / "data"))

#: (name, source, kind, share of the tree's series)
TEMPLATES = [
    ("ct-body-j2k", "ct/siemens-body-j2k", "dicom", 0.20),          # 20 x 512 x 512, JPEG 2000
    ("ct-head-5mm", "ct/philips-head-phantom/exam/S2010", "dicom", 0.15),  # 28 x 512 x 512, native
    ("mr-enhanced", "mr/siemens-xa30-enhanced/5_anat-T1w_acq-tfl", "dicom", 0.30),  # 96 x 128 x 128, 1 file
    ("ct-nifti", "ct/nifti/example_ct_sm.nii.gz", "nifti", 0.35),  # 30 x 101 x 122
]


def _rss(pid: str = "self") -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _tree_rss() -> int:
    """Resident memory of this process plus its child processes (the reader/writer pools)."""
    total = _rss()
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as fh:
                total += sum(_rss(pid) for pid in fh.read().split())
        except OSError:
            pass
    return total


class _PeakMemory:
    """Samples the resident memory of this process and its children every 50 ms."""

    def __init__(self):
        self.base = _tree_rss()
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, _tree_rss())

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def build_tree(root: Path, n_series: int) -> dict[str, int]:
    """Copies of the templates under ``root/patNNN/<template>/``; returns copies per template."""
    import pydicom
    from pydicom.uid import generate_uid

    counts = {}
    for name, rel, kind, share in TEMPLATES:
        n = max(1, round(n_series * share))
        counts[name] = n
        src = DATA / rel
        if kind == "nifti":
            for k in range(n):
                d = root / f"pat{k:03d}"
                d.mkdir(parents=True, exist_ok=True)
                os.symlink(src, d / f"{name}.nii.gz")
            continue
        files = sorted(p for p in src.iterdir() if p.is_file() and not p.name.upper().startswith("DIRFILE"))
        datasets = []
        for f in files:
            ds = pydicom.dcmread(f)
            if "SeriesInstanceUID" in ds:
                datasets.append((f.name, ds))
        for k in range(n):
            d = root / f"pat{k:03d}" / name
            d.mkdir(parents=True, exist_ok=True)
            study = generate_uid(entropy_srcs=[name, "study", str(k)])
            series = generate_uid(entropy_srcs=[name, "series", str(k)])
            for fname, ds in datasets:
                ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
                ds.SOPInstanceUID = generate_uid(entropy_srcs=[name, fname, str(k)])
                ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                ds.save_as(d / fname, enforce_file_format=False)
    return counts


def make_model(folder: Path) -> Path:
    import torch

    from napari_restore.intensity import CT_DEFAULT
    from napari_restore.models import save_model
    from napari_restore.networks import DEFAULT_2D, build_network

    torch.manual_seed(0)
    card = {"name": "bench-default-2d", "version": "0.0.0", "task": "denoise", "modality": "any", "dims": 2,
            "architecture": {"name": "ResidualUNet", "args": dict(DEFAULT_2D)}, "intensity": dict(CT_DEFAULT),
            "training_data": "none: random weights, for speed only", "metrics": {}, "description": "benchmark"}
    return save_model(build_network("ResidualUNet", DEFAULT_2D), card, folder)


def preloaded_seconds(model: Path, device: str) -> dict[str, tuple[float, int]]:
    """Restore each template preloaded (after a warm-up), best of 2 runs and of torch's default
    thread count and one thread (a loaded 2-core machine can make two threads much slower):
    ``name -> (seconds, slices)``. The conservative (fastest) baseline."""
    import torch

    import napari_restore as nr
    from napari_restore.models import load_model

    loaded = load_model(model)
    out = {}
    default = torch.get_num_threads()
    for name, rel, _, _ in TEMPLATES:
        vol = nr.load(DATA / rel)[0]
        best = float("inf")
        for threads in sorted({default, 1}):
            torch.set_num_threads(threads)
            nr.restore(vol, model=loaded, device=device)  # warm-up (allocator, kernels)
            for _ in range(2):
                t0 = time.perf_counter()
                nr.restore(vol, model=loaded, device=device)
                best = min(best, time.perf_counter() - t0)
        torch.set_num_threads(default)
        out[name] = (best, int(np.prod(vol.array.shape[:-2])))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--series", type=int, default=300, help="about this many series in the tree (default 300)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--readers", type=int, default=2)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to build the tree (default: a temporary folder)")
    ap.add_argument("--out", default=str(REPO / "outputs" / "benchmarks"), help="where the table and figure go")
    args = ap.parse_args(argv)
    if not (DATA / "README.md").is_file():
        print(f"shared data not found at {DATA}", file=sys.stderr)
        return 1

    import torch

    from napari_restore.batch import run_batch
    from napari_restore.inference import resolve_device

    device = str(resolve_device(args.device))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="napari-restore-batch-bench-"))
    try:
        t0 = time.perf_counter()
        counts = build_tree(work / "tree", args.series)
        build_s = time.perf_counter() - t0
        model = make_model(work / "model")
        load_before = os.getloadavg()
        log = io.StringIO()
        with _PeakMemory() as mem:
            result = run_batch(work / "tree", work / "out", model=model, device=device, readers=args.readers,
                               writers=args.writers, progress=False, out=log)
        load_during = os.getloadavg()
        pre = preloaded_seconds(model, device)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    t = result.timings
    done = result.done_now
    n_series, n_slices = len(done), sum(o.slices for o in done)
    run_s = t["run"]
    by_name = {}
    for o in done:
        name = next(n for n, *_ in TEMPLATES if o.item.input.endswith(n) or o.item.input.endswith(n + ".nii.gz"))
        by_name[name] = by_name.get(name, 0) + 1
    compute_pre = sum(pre[n][0] * c for n, c in by_name.items())
    ratio = compute_pre / run_s
    lines = [
        "# napari-restore batch throughput",
        "",
        f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), device {device}",
        f"load average (1/5/15 min) before the run {tuple(round(x, 2) for x in load_before)}, "
        f"after {tuple(round(x, 2) for x in load_during)}",
        f"tree: {sum(counts.values())} series ({', '.join(f'{c} x {n}' for n, c in counts.items())}); "
        f"built in {build_s:.0f} s; model: default 2-D residual U-Net (channels 16-128), random weights",
        f"pools: {args.readers} readers, {args.writers} writers, prefetch 1; failed: {len(result.failed_now)}",
        "",
        "| measure | value |",
        "|---|---|",
        f"| series restored | {n_series} ({n_slices} slices) |",
        f"| walk (headers of the whole tree) | {t['walk']:.1f} s |",
        f"| batch run (read + restore + write, overlapped) | {run_s:.1f} s |",
        f"| series/s | {n_series / run_s:.3f} |",
        f"| slices/s | {n_slices / run_s:.2f} |",
        f"| read, summed over series | {t['read']:.1f} s ({100 * t['read'] / run_s:.0f}% of the run) |",
        f"| compute, summed | {t['compute']:.1f} s ({100 * t['compute'] / run_s:.0f}%) |",
        f"| write, summed | {t['write']:.1f} s ({100 * t['write'] / run_s:.0f}%) |",
        f"| model waiting for input | {t['model_wait']:.1f} s |",
        f"| peak memory during the run (RSS, with the reader/writer processes) | {mem.peak / 2**20:.0f} MiB (before: {mem.base / 2**20:.0f} MiB); "
        f"at most {result.peak_series_in_memory} series in memory |",
        f"| same slices restored preloaded (pure compute) | {compute_pre:.1f} s "
        f"({n_slices / compute_pre:.2f} slices/s) |",
        f"| **ratio batch / preloaded (slices/s)** | **{ratio:.2f}** (target >= 0.90) |",
        "",
        "preloaded restore per template (best of 2 runs x {default, 1} torch threads): "
        + "; ".join(f"{n} {s:.2f} s / {k} slices = {k / s:.1f} slices/s" for n, (s, k) in pre.items()),
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "batch_throughput.md").write_text(text + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 2.6))
        parts = [("read", t["read"]), ("compute", t["compute"]), ("write", t["write"])]
        ax.barh(["summed per series"], [parts[0][1]], color="#4c72b0", label="read")
        ax.barh(["summed per series"], [parts[1][1]], left=[parts[0][1]], color="#dd8452", label="compute")
        ax.barh(["summed per series"], [parts[2][1]], left=[parts[0][1] + parts[1][1]], color="#55a868", label="write")
        ax.barh(["batch wall time"], [run_s], color="#8172b3", label="batch run (overlapped)")
        ax.barh(["preloaded compute"], [compute_pre], color="#937860", label="preloaded restore")
        ax.set_xlabel("seconds")
        ax.set_title(f"{n_series} series, {n_slices} slices: ratio {ratio:.2f}")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(out / "batch_throughput.png", dpi=120)
        print(f"wrote {out / 'batch_throughput.md'} and {out / 'batch_throughput.png'}")
    except ImportError:
        print(f"wrote {out / 'batch_throughput.md'} (matplotlib not installed: no figure)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
