"""Speed benchmark: our 2-D model vs non-local means vs BM3D on real 512x512 CT slices.

One run, side by side, on the same slices of a real CT series from ../shared/data:
- ours, preloaded: ``restore()`` on a Volume already in memory, with the model "Auto" picks for
  the series (or ``--model``);
- ours, end to end: read the DICOM series -> restore -> write a derived DICOM series;
- skimage non-local means (fast mode, patch 5, search 13) and BM3D (``pip install bm3d``, the
  optional benchmark extra) on a few slices each.
Prints the machine, the inputs and a table; writes ``docs/speed.md`` and ``docs/speed.png``.

``--against REV`` also times the end-to-end run of this checkout and of git revision ``REV`` (the
previous release, say) alternately, each run in a fresh process, ``--rounds`` times each: this
host's speed drifts between sittings, so only figures from one sitting compare.

Usage: ``python benchmarks/speed.py [--series PATH] [--model NAME] [--bm3d-slices 2] [--nlm-slices 4]
[--against REV [--rounds 3]]``
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import napari_restore as nr
from napari_restore.models import find_model, load_model

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SERIES = REPO.parent / "shared" / "data" / "ct" / "philips-head-phantom" / "exam" / "S2020"


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return (f"{cpu}; {os.cpu_count()} cores; torch {torch.__version__} ({torch.get_num_threads()} threads); "
            f"GPU: {gpu}; load average at start {load:.2f}")


def timed(fn, repeat: int = 1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


#: One end-to-end run in a fresh process: warm-up on 4 slices, then read -> restore -> write, timed.
_E2E_CHILD = r"""
import sys, tempfile, time
src, series, model, out = sys.argv[1:5]
sys.path.insert(0, src)
import napari_restore as nr
if not nr.__file__.startswith(src):
    sys.exit(f"imported {nr.__file__}, not the code under {src}")
v = nr.load(series)[0]
nr.restore(v.copy_with(v.array[:4]), model=model, device="cpu")
t0 = time.perf_counter()
r = nr.restore(nr.load(series)[0], model=model, device="cpu")
nr.save(r, out, format="dicom", overwrite=True)
print(f"{v.array.shape[0]} {time.perf_counter() - t0:.4f}")
"""


def versus(rev: str, series: Path, model: str, rounds: int, tmp: Path) -> list[tuple[str, int, float]]:
    """End-to-end seconds of this checkout and of ``rev`` (``git archive``), alternating, each in a new process.

    Returns one row per code: ``(name, slices, median seconds)``.
    """
    old = tmp / "rev"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    codes = {"this checkout": REPO / "src", rev: old / "src"}
    times: dict[str, list[float]] = {k: [] for k in codes}
    n = 0
    for i in range(rounds):
        for name, src in codes.items():
            done = subprocess.run([sys.executable, "-c", _E2E_CHILD, str(src), str(series), model, str(tmp / f"v{i}")],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{name}: {done.stderr.strip()[-2000:]}")
            n, t = done.stdout.split()[-2:]
            n, t = int(n), float(t)
            times[name].append(t)
            print(f"  round {i + 1}: {name}: {n / t:.1f} slices/s")
    return [(f"ours ({model}), end to end, {name} (median of {rounds}, alternating)", n, float(np.median(ts)))
            for name, ts in times.items()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--series", type=Path, default=DEFAULT_SERIES)
    p.add_argument("--model", default=None, help="model name or folder (default: what Auto picks for the series)")
    p.add_argument("--nlm-slices", type=int, default=4)
    p.add_argument("--bm3d-slices", type=int, default=2)
    p.add_argument("--gpu", action="store_true", help="also time the model on CUDA from a preloaded tensor")
    p.add_argument("--out", type=Path, default=REPO / "docs")
    p.add_argument("--against", metavar="REV", default=None,
                   help="also time end to end this checkout against git revision REV, alternately, in fresh processes")
    p.add_argument("--rounds", type=int, default=3, help="with --against: runs of each")
    args = p.parse_args(argv)

    print(f"machine: {machine()}")
    tmp = Path(tempfile.mkdtemp(prefix="napari-restore-speed-"))
    vol = nr.load(args.series)[0]
    card = load_model(args.model).card if args.model else find_model("denoise", "CT", 2, vol.slice_distance)
    model = args.model or card.name
    n = vol.array.shape[0]
    print(f"input: {args.series.name}: {n} slices of {vol.array.shape[1]}x{vol.array.shape[2]} ({vol.modality}); "
          f"model: {card.name} {card.version}")
    rows: list[tuple[str, int, float]] = []

    nr.restore(vol.copy_with(vol.array[:4]), model=str(model), device="cpu")  # warm-up
    t, _ = timed(lambda: nr.restore(vol, model=str(model), device="cpu"), repeat=2)
    rows.append((f"ours ({card.name}), preloaded volume (CPU)", n, t))

    def end_to_end(device: str) -> None:
        v = nr.load(args.series)[0]
        r = nr.restore(v, model=str(model), device=device)
        nr.save(r, tmp / f"e2e-{device}", format="dicom", overwrite=True)

    t, _ = timed(lambda: end_to_end("cpu"), repeat=2)
    rows.append((f"ours ({card.name}), end to end: read DICOM -> restore -> write DICOM (CPU)", n, t))

    if args.against:
        rows += versus(args.against, args.series, str(model), args.rounds, tmp)

    if args.gpu and torch.cuda.is_available():
        from napari_restore.networks import prepare_for_inference

        net = prepare_for_inference(load_model(str(model), device="cuda").network)  # what restore() runs
        x = torch.randn(64, 2 * getattr(net, "context", 0) + 1, 512, 512, device="cuda")
        with torch.inference_mode():  # float32 (TF32 convolutions), as restore() runs
            net(x)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                net(x)
            torch.cuda.synchronize()
        rows.append((f"ours ({card.name}), preloaded tensor (GPU, float32/TF32, batch 64)", 640, time.perf_counter() - t0))
        vg = nr.load(args.series)[0]
        t, _ = timed(lambda: nr.restore(vg, model=str(model), device="cuda"), repeat=2)
        rows.append((f"ours ({card.name}), preloaded volume (GPU)", n, t))

        t, _ = timed(lambda: end_to_end("cuda"), repeat=2)
        rows.append((f"ours ({card.name}), end to end: read DICOM -> restore -> write DICOM (GPU)", n, t))

    from skimage.restoration import denoise_nl_means

    sl = [vol.array[n // 2 + i] for i in range(args.nlm_slices)]
    sigma = 20.0
    t, _ = timed(lambda: [denoise_nl_means(s, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                                           fast_mode=True) for s in sl])
    rows.append(("skimage non-local means (fast, patch 5, search 13)", len(sl), t))

    try:
        import bm3d
    except ImportError:
        print("BM3D not installed (pip install bm3d): its row is left out")
    else:
        sl = [vol.array[n // 2 + i].astype(np.float64) for i in range(args.bm3d_slices)]
        t, _ = timed(lambda: [bm3d.bm3d(s, sigma_psd=sigma) for s in sl])
        rows.append(("BM3D (bm3d package, sigma given)", len(sl), t))

    rate = {name: k / t for name, k, t in rows}
    bm3d_rate = next((r for name, r in rate.items() if name.startswith("BM3D")), None)
    lines = ["| method | slices | seconds | slices/s | x BM3D |", "|---|---:|---:|---:|---:|"]
    for name, k, t in rows:
        ratio = f"{rate[name] / bm3d_rate:.0f}" if bm3d_rate else "-"
        lines.append(f"| {name} | {k} | {t:.2f} | {rate[name]:.1f} | {ratio} |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "speed.md").write_text(f"# Speed, 512x512 CT slices\n\nmachine: {machine()}\n\n"
                                       f"input: {args.series.name}, {n} slices; model: {card.name} {card.version}\n\n{table}\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.5), constrained_layout=True)
    names = [name for name, _, _ in rows]
    ax.barh(names, [rate[nm] for nm in names], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("slices per second (log scale), 512x512")
    ax.invert_yaxis()
    fig.savefig(args.out / "speed.png", dpi=110)
    print(f"wrote {args.out / 'speed.md'} and {args.out / 'speed.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
