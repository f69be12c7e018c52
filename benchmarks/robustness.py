"""The condition matrix (issue 18): where each restoration model can be trusted.

Rows are conditions, columns methods: the degraded input, non-local means with the oracle ``h``
(best of several factors of the true noise SD, chosen against the reference), BM3D given the true
noise SD (the optional ``bm3d`` package: ``pip install napari-restore[benchmark]``), Richardson-Lucy
with the true PSF (deblurring; best of 10/20/50 iterations) and every model given.

* CT denoising: FBP filters {ramp, shepp-logan, cosine, hann} x doses {10, 25, 50 %} x pixel sizes
  {native, 0.5, 0.8 mm} x every real CT series not trained on; projection-domain noise
  (``degrade.ct_lowdose_noise(method="projection")``); PSNR/SSIM at W400/L50 against the full-dose
  reference. A cell is *reference-limited* when the added noise SD is below the reference's own
  (flat tissue): there PSNR against the reference cannot rank denoisers.
* MR denoising: Rician {2, 5, 10 %} x every MR series not trained on.
* Deblurring: Gaussian FWHM {1, 2, 3} voxels x white noise {0.25, 1, 2 %} of the 1-99 % range, CT and MR.
* Real scans, no added noise: flat-tissue noise SD before/after, corr(|input - output|, gradient).
* Low contrast: 3-14 HU disks of 3-10 mm in uniform regions of the head phantom and a patient
  slice, before the noise; contrast kept and CNR at 25 % and full dose.

Usage::

    python benchmarks/robustness.py                                # every shipped model, docs/robustness.md
    python benchmarks/robustness.py --models runs/my-model denoise-ct --slices 1 --out outputs/robustness.md
    python benchmarks/robustness.py --sections ct --series ELSCINT1 --out outputs/part.md   # one series, then
    python benchmarks/robustness.py --replot docs/robustness.json --merge outputs/part.json  # merged into the full run

Writes ``<out>.md``, ``<out>.json``, ``<out>.png`` (heatmap) and method-noise panels in
``<out-folder>/robustness_method_noise/``. Prints the machine, the inputs and the tables.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from napari_restore import robustness as R
from napari_restore.evaluate import machine_description

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _robustness_report import (heatmap, low_contrast_section, matrix_table, method_noise_panel,  # noqa: E402
                                real_scan_table, summary)


def log(msg: str) -> None:
    print(msg, flush=True)


def load_models(names: list[str] | None):
    from napari_restore import list_models
    from napari_restore.models import load_model

    names = names or [c.name for c in list_models() if c.source == "bundled"]
    return [load_model(n, device="cpu") for n in names]


def pick(models, task: str, modality: str):
    return [m for m in models if m.card.task == task and m.card.modality in (modality, "any")]


def run_matrix(kind: str, series, models, conditions, args, cells: list) -> None:
    for s in series:
        for cond in conditions(s):
            t0 = time.perf_counter()
            if kind == "deblur":
                c = R.deblur_cell(s, cond, models, slices=args.slices, crop=args.crop)
            else:
                c = R.denoise_cell(s, cond, models, methods=args.baselines, slices=args.slices, crop=args.crop)
            cells.append(c)
            best = max(c.scores, key=lambda m: c.scores[m]["psnr"])
            log(f"  [{kind}] {s.name} {cond} sigma {c.sigma:.2f} ref {c.ref_sd:.2f}"
                f"{' (reference-limited)' if c.reference_limited else ''}: "
                + ", ".join(f"{m} {v['psnr']:.2f}" for m, v in c.scores.items())
                + f"; best {best}; {time.perf_counter() - t0:.1f} s")


def ct_conditions(s: R.Series):
    native = s.volume.spacing[2]
    out = []
    for px in R.CT_PIXELS:
        if px is not None and abs(px - native) / px < 0.1:
            continue  # within 10 % of the native pixel: the native row is that row
        out += [{"filter": f, "dose": d, "pixel_mm": px} for f in R.CT_FILTERS for d in R.CT_DOSES]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=None,
                    help="installed model names or model folders (default: every shipped model)")
    ap.add_argument("--slices", type=int, default=2, help="consecutive slices per series per cell")
    ap.add_argument("--crop", type=int, default=256, help="scored centre crop (pixels), after the simulation")
    ap.add_argument("--sections", default="ct,mr,deblur,real,lowcontrast",
                    help="comma-separated subset of ct, mr, deblur, real, lowcontrast")
    ap.add_argument("--series", nargs="*", default=None,
                    help="only these series (a part of the relative path or of the name, e.g. ELSCINT1 693_UNCR); "
                         "merge the run into the full JSON with --replot FULL.json --merge THIS.json")
    ap.add_argument("--lc-seeds", type=int, default=2, help="noise draws per dose for the low-contrast disks")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (each runs whole series)")
    ap.add_argument("--cache", type=Path, default=REPO / "outputs" / "robustness_cache",
                    help="folder of finished pieces of work (a rerun with the same settings reuses them)")
    ap.add_argument("--cached-only", action="store_true",
                    help="report what the cache holds and compute nothing (a partial report of a cut run)")
    ap.add_argument("--baselines", type=lambda t: tuple(v for v in t.split(",") if v), default=None,
                    help="comma-separated subset of input, nlm, bm3d (default: all installed); a run of a new model "
                         "with --baselines input is merged into a full run's JSON with --replot FULL.json --merge THIS.json")
    ap.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "robustness.md")
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="with --replot: JSONs of runs of other models (same --slices/--crop, hence the same noise); "
                         "their models' figures replace or join those of the --replot JSON, cell by cell")
    ap.add_argument("--replot", type=Path, default=None,
                    help="rewrite <out>.md and <out>.png from a JSON this script wrote (no computation)")
    args = ap.parse_args(argv)
    if args.replot:
        return replot(args.replot, args.out, args.merge)
    if not (args.data / "README.md").is_file():
        sys.exit(f"{args.data} is missing: this benchmark reads the shared data set")
    try:
        import bm3d  # noqa: F401
        found = ("input", "nlm", "bm3d")
    except ImportError:
        found = ("input", "nlm")
        log("BM3D not installed (pip install napari-restore[benchmark]): its column is left out")
    args.baselines = found if args.baselines is None else tuple(b for b in found if b in args.baselines)
    sections = set(args.sections.split(","))
    t_start = time.perf_counter()
    models = load_models(args.models)
    machine = machine_description()
    cmd = "python benchmarks/robustness.py " + " ".join(argv if argv is not None else sys.argv[1:])
    log(f"machine: {machine}")
    log(f"command: {cmd}")
    log("models: " + ", ".join(f"{m.card.name} {m.card.version} ({m.card.task} {m.card.modality}, context "
                               f"{m.card.context})" for m in models))
    log(f"data: {args.data.name}; slices/cell {args.slices}; crop {args.crop}")
    cells: dict[str, list] = {"ct": [], "mr": [], "deblur": []}
    inputs: dict[str, list[str]] = {}
    units: list[tuple] = []  # independent pieces of work, longest first; run in --jobs processes
    for key, table, task, mod, title in (("ct", R.CT_SERIES, "denoise", "CT", "CT denoising"),
                                          ("mr", R.MR_SERIES, "denoise", "MR", "MR denoising"),
                                          ("deblur", R.CT_SERIES, "deblur", "CT", "CT deblurring"),
                                          ("deblur", R.MR_SERIES, "deblur", "MR", "MR deblurring")):
        if ("deblur" if key == "deblur" else key) not in sections:
            continue
        ms = pick(models, task, mod)
        rels = [(rel, label) for rel, label in table if not (ms and all(R.seen_by(m.card, rel) for m in ms))
                and _selected(rel, args.series)]
        inputs[title] = [f"{rel} ({label})" for rel, label in rels]
        log(f"{title} series: " + "; ".join(inputs[title]))
        if key == "ct":  # one unit per series and pixel size (the 0.5 mm rows of a 1 mm series are the longest)
            units += [(key, task, mod, rel, label, px) for rel, label in rels for px in R.CT_PIXELS]
        else:
            units += [(key, task, mod, rel, label, None) for rel, label in rels]
    out_dir = args.out.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    if "lowcontrast" in sections:
        units.insert(3, ("lowcontrast",))
    if "real" in sections:
        units += [("real", rel, label) for rel, label in R.REAL_SERIES if _selected(rel, args.series)]
    global _CTX
    _CTX = (models, args, out_dir)
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=mp.get_context("fork")) as ex:
            results = list(ex.map(run_unit, units))
    else:
        results = [run_unit(u) for u in units]
    real_rows, lc_rows = [], []
    missing = [u for u, res in zip(units, results) if res is None]
    if missing:
        inputs["NOT MEASURED (the run was cut; rerun the same command to complete it)"] = [
            " ".join(str(x) for x in (u[0], u[3] if len(u) > 3 else u[1:], u[5] if len(u) > 5 else "") if x != "")
            for u in missing]
    for u, res in zip(units, results):
        if res is None:
            continue
        if u[0] in cells:
            cells[u[0]] += res
        elif u[0] == "real":
            real_rows += res
        else:
            lc_rows += res
    elapsed = time.perf_counter() - t_start
    text = report(cells, real_rows, lc_rows, [{"name": m.card.name, "version": m.card.version} for m in models],
                  machine, cmd, inputs, args.slices, args.crop, elapsed)
    print(text)
    args.out.write_text(text, encoding="utf-8")
    js = {"machine": machine, "command": cmd, "inputs": inputs, "slices": args.slices, "crop": args.crop,
          "models": [{"name": m.card.name, "version": m.card.version, "task": m.card.task,
                      "modality": m.card.modality} for m in models],
          "cells": {k: [c.to_dict() for c in v] for k, v in cells.items()},
          "real_scans": real_rows, "low_contrast": lc_rows, "seconds": round(elapsed, 1)}
    args.out.with_suffix(".json").write_text(json.dumps(js, indent=1) + "\n", encoding="utf-8")
    if any(cells.values()):
        heatmap(cells, args.out.with_suffix(".png"))
    log(f"wrote {args.out}, {args.out.with_suffix('.json').name}, {args.out.with_suffix('.png').name} "
        f"in {elapsed / 60:.1f} min")
    return 0


_CTX: tuple = ()


def _selected(rel: str, wanted: list[str] | None) -> bool:
    """Whether the series at ``rel`` is among ``--series`` (none given: every series)."""
    return not wanted or any(w in rel for w in wanted)


def _card_digest(card) -> str:
    """A digest of the whole card: a change of its inference settings (self-ensemble, trusted range)
    under the same name and version must not reuse cached figures."""
    import hashlib

    return hashlib.sha1(json.dumps(card.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_unit(unit: tuple):
    """One piece of work, cached in ``--cache`` so that an interrupted run resumes where it stopped."""
    import hashlib

    import torch

    torch.set_num_threads(1)
    models, args, out_dir = _CTX
    key = json.dumps([list(unit), args.slices, args.crop, args.lc_seeds, R.CT_N_VIEWS_MAX, list(args.baselines),
                      R.CELL_FORMAT,
                      [(m.card.name, m.card.version, str(m.card.path), _card_digest(m.card)) for m in models]],
                     default=str)
    cache = args.cache / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json") if args.cache else None
    if cache is not None and cache.is_file():
        res = json.loads(cache.read_text(encoding="utf-8"))
        log(f"  [cached] {unit}")
        return [R.Cell.from_dict(c) for c in res] if unit[0] in ("ct", "mr", "deblur") else res
    if args.cached_only:
        log(f"  [missing] {unit}: not in the cache (--cached-only)")
        return None
    res = _run_unit(unit, models, args, out_dir)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        data = [c.to_dict() for c in res] if unit[0] in ("ct", "mr", "deblur") else res
        cache.write_text(json.dumps(data), encoding="utf-8")
    return res


def _run_unit(unit: tuple, models, args, out_dir):
    if unit[0] in ("ct", "mr", "deblur"):
        key, task, mod, rel, label, px = unit
        s = R.load_series(args.data, rel, label)
        conds = {"ct": lambda s: [c for c in ct_conditions(s) if c["pixel_mm"] == px],
                 "mr": lambda s: [{"sigma_fraction": f} for f in R.MR_SIGMAS],
                 "deblur": lambda s: [{"fwhm_vox": f, "noise": n} for f in R.BLUR_FWHM for n in R.BLUR_NOISE]}[key]
        out: list = []
        run_matrix(key, [s], pick(models, task, mod), conds, args, out)
        return out
    if unit[0] == "real":
        s = R.load_series(args.data, unit[1], unit[2])
        t0 = time.perf_counter()
        rows, panel = real_scan(s, pick(models, "denoise", s.modality), args)
        panel_dir = out_dir / "robustness_method_noise"
        panel_dir.mkdir(exist_ok=True)
        method_noise_panel(panel, panel_dir / f"{s.name}.png", f"{s.name} ({unit[2]}): no added noise")
        log(f"  [real] {s.name}: " + "; ".join(f"{r['method']} SD {r['sd_in']:.2f} -> {r['sd_out']:.2f}, "
                                              f"corr {r['residual_gradient_corr']:.2f}" for r in rows)
            + f"; {time.perf_counter() - t0:.1f} s")
        return rows
    return low_contrast_section(args.data, pick(models, "denoise", "CT"), args.lc_seeds, args.baselines, log)


def real_scan(s: R.Series, models, args):
    """Models (and NLM/BM3D given the estimated noise SD) on the middle slice(s) of a real scan."""
    from napari_restore.evaluate import _nlm

    vol = s.volume
    context = max([m.card.context for m in models] + [0])
    scored, block_z = R.pick_block(vol.array.shape[0], min(args.slices, 1), context)
    keep = [block_z.index(z) for z in scored]
    block = vol.array[block_z].astype(np.float32)
    thr = -500.0 if s.modality == "CT" else float(np.percentile(block, 50))
    bb = R.body_box(block[keep[0]], thr, margin=0)
    cy, cx = ((bb[0].start or 0) + (bb[0].stop or block.shape[1])) // 2, ((bb[1].start or 0) + (bb[1].stop or block.shape[2])) // 2
    h, w = min(args.crop, block.shape[1]), min(args.crop, block.shape[2])
    y0, x0 = int(np.clip(cy - h // 2, 0, block.shape[1] - h)), int(np.clip(cx - w // 2, 0, block.shape[2] - w))
    box = (slice(y0, y0 + h), slice(x0, x0 + w))
    inp = block[keep][:, box[0], box[1]]
    sd = R.reference_noise_sd(inp[0], s.modality)
    outs = {}
    for m in models:
        outs[m.card.name] = R._model_out(m, block, vol.affine, s.modality, keep)[:, box[0], box[1]]
    if sd == sd and sd > 0:
        outs["nlm (h 0.8 est. SD)"] = np.stack([_nlm(a, sd, 0.8 * sd) for a in inp])
        if "bm3d" in args.baselines:
            outs["bm3d (est. SD)"] = R._bm3d(inp, sd)
    rows = []
    for name, out in outs.items():
        meas = R.real_scan_measures(inp, out, s.modality)
        rows.append({"series": s.name, "path": s.path, "modality": s.modality, "method": name,
                     "seen": name in [m.card.name for m in models if R.seen_by(m.card, s.path)],
                     "estimated_sd": round(sd, 3), **{k: round(v, 4) for k, v in meas.items()}})
    return rows, {"input": inp[0], "outputs": {k: v[0] for k, v in outs.items()}, "modality": s.modality}


def _merge(js: dict, other: dict) -> None:
    """Put ``other``'s models into ``js``: their scores replace (or join) those under the same name."""
    names = {m["name"] for m in other["models"]}
    js["models"] = [m for m in js["models"] if m["name"] not in names] + other["models"]
    for kind, cells in other["cells"].items():
        index = {json.dumps({k: v for k, v in c.items() if k not in R.CELL_RESULT_KEYS}, sort_keys=True): c
                 for c in js["cells"].get(kind, [])}
        for c in cells:
            mine = index.get(json.dumps({k: v for k, v in c.items() if k not in R.CELL_RESULT_KEYS}, sort_keys=True))
            if mine is not None:
                mine["scores"].update({n: sc for n, sc in c["scores"].items() if n in names})
                mine["seen_by"] = sorted(set(mine.get("seen_by", [])) - names | set(c.get("seen_by", [])))
    for key in ("real_scans", "low_contrast"):  # other's rows of its models replace the same rows, in place
        row_key = (lambda r: json.dumps({k: r.get(k) for k in ("image", "series", "dose", "method", "contrast_hu",
                                                               "diameter_mm")}, sort_keys=True))
        theirs = {row_key(r): r for r in other[key] if r.get("method") in names}
        rows = [theirs.pop(row_key(r), r) for r in js[key]]
        js[key] = rows + list(theirs.values())
    js["command"] += " + " + other["command"] + " (merged)"
    js["seconds"] += other["seconds"]


def replot(path: Path, out: Path, merge: list[Path] = ()) -> int:
    js = json.loads(path.read_text(encoding="utf-8"))
    for other in merge:
        _merge(js, json.loads(Path(other).read_text(encoding="utf-8")))
    if merge:
        out.with_suffix(".json").write_text(json.dumps(js, indent=1), encoding="utf-8")
    cells = {k: [R.Cell.from_dict(c) for c in v] for k, v in js["cells"].items()}
    text = report(cells, js["real_scans"], js["low_contrast"], js["models"], js["machine"], js["command"],
                  js["inputs"], js["slices"], js["crop"], js["seconds"])
    print(text)
    out.write_text(text, encoding="utf-8")
    if any(cells.values()):
        heatmap(cells, out.with_suffix(".png"))
    log(f"rewrote {out} and {out.with_suffix('.png').name} from {path.name}")
    return 0


def report(cells, real_rows, lc_rows, models, machine, cmd, inputs, slices, crop, elapsed) -> str:
    L = ["# Robustness: the condition matrix", "",
         f"`{cmd}` ({elapsed / 60:.0f} min). Machine: {machine}.", "",
         "Models: " + ", ".join(f"`{m['name']}` {m['version']}" for m in models) + ".", "",
         f"Each cell: {slices} consecutive middle slice(s) per series (single-slice series: that slice), "
         f"centre crop {crop} px of the body, scored after the noise is simulated on whole slices. "
         "CT: PSNR/SSIM on HU windowed W400/L50 to [0, 1] against the full-dose reference; MR: the clean "
         "volume's 1st/99th percentiles -> 0/1. PSNR pools the squared error of a cell's slices. NLM: scikit-image, "
         "patch 5, distance 6, `h` the best of (0.2 ... 1.5) x the true added-noise SD against the reference "
         "(an oracle); BM3D: the true added-noise SD; Richardson-Lucy: the true PSF, reflect padding, the best of "
         "10/20/50 iterations. CT noise: `degrade.ct_lowdose_noise(method=\"projection\")` with the filter named, "
         f"at most {R.CT_N_VIEWS_MAX} views; for a pixel size other than the native one the slice is cropped to "
         "the body and resampled in-plane (cubic, anti-aliased when shrinking) before the simulation, so the "
         "noise follows the smaller pixels at the same dose. Pixel sizes within 10 % of the native one are the native row. "
         "A model that reads neighbouring slices gets them with their own noise; on a single-slice series it sees "
         "that slice repeated. **ref-lim**: the added noise SD is below the reference's own noise SD in flat "
         "tissue: PSNR against the reference cannot rank denoisers there, such cells are left out of the "
         "win/loss counts (as are cells on a series the model trained on, marked *seen*).", "",
         "Inputs:"]
    for k, v in inputs.items():
        L.append(f"- {k}: " + "; ".join(v))
    L.append("- left out: " + "; ".join(f"`{p}` ({why})" for p, why in R.EXCLUDED))
    L.append("")
    L.append("![heatmap](robustness.png)")
    L.append("")
    for key, title in (("ct", "CT denoising"), ("mr", "MR denoising"), ("deblur", "Deblurring (CT and MR)")):
        if cells[key]:
            L += [f"## {title}", "", *summary(cells[key], key), "", *matrix_table(cells[key], key), ""]
    if real_rows:
        L += ["## Real scans, no added noise", "", *real_scan_table(real_rows), ""]
    if lc_rows:
        from _robustness_report import low_contrast_table

        L += ["## Low contrast", "", *low_contrast_table(lc_rows), ""]
    return "\n".join(L) + "\n"


if __name__ == "__main__":
    sys.exit(main())
