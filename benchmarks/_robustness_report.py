"""Tables, figures and the low-contrast study of ``benchmarks/robustness.py`` (see its docstring)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from napari_restore import robustness as R

BASELINES = ("input", "nlm", "bm3d", "rl")


def _fmt_cond(c) -> str:
    k = c.key
    if "filter" in k:
        px = "native" if k["pixel_mm"] is None else f"{k['pixel_mm']:g} mm"
        return f"{k['filter']}, {k['dose']:.0%} dose, {px} ({k['pixel_mm_actual']:g} mm)"
    if "sigma_fraction" in k:
        return f"Rician {k['sigma_fraction']:.0%}"
    return f"{k['modality']} FWHM {k['fwhm_vox']:g} vox, noise {100 * k['noise']:g} %"


def _methods(cells) -> list[str]:
    out: list[str] = []
    for c in cells:
        out += [m for m in c.scores if m not in out]
    return out


def _models(cells) -> list[str]:
    return [m for m in _methods(cells) if m not in BASELINES]


def _counted(c, model: str) -> bool:
    return model in c.scores and not c.reference_limited and model not in c.seen


def _worse_slices(cells, m: str) -> tuple[int, int, str]:
    """(slices where ``m`` is below the input, slices, what the guard said in those cells)."""
    worse = n = warned = recorded = 0
    for c in cells:
        w = sum(p < q for p, q in zip(c.scores[m]["slice_psnr"], c.scores["input"]["slice_psnr"]))
        worse += w
        n += len(c.scores[m]["slice_psnr"])
        recorded += w if "guard" in c.scores[m] else 0
        warned += w if c.scores[m].get("guard") else 0
    return worse, n, _warned_text(warned, recorded, worse)


def _warned_text(warned: int, recorded: int, of: int) -> str:
    if not of:
        return ""
    if recorded == of:
        return f"{warned} warned"
    return f"{warned} warned of {recorded} recorded" if recorded else "not recorded"


def _reference_limited_note(cells, m: str) -> list[str]:
    """One line: how the model fares in the reference-limited cells, against its own ceiling there."""
    cs = [c for c in cells if m in c.scores and c.reference_limited and m not in c.seen]
    if not cs:
        return []
    below = [c for c in cs if c.gain(m) < 0]
    line = f"- {m}: {len(cs)} reference-limited cells, below the input in {len(below)}"
    gaps = [c.scores[m]["ref_psnr"] - c.scores[m]["psnr"] for c in below if "ref_psnr" in c.scores[m]]
    if gaps:
        line += (f"; there its PSNR is {np.median(gaps):.2f} dB (median; at most {max(gaps):.2f} dB) below its PSNR "
                 "on the noise-free reference itself (the ceiling: what it removes of the reference's own noise)")
    warned = _warned_text(sum(bool(c.scores[m].get("guard")) for c in below),
                          sum("guard" in c.scores[m] for c in below), len(below))
    if below:
        worst = min(below, key=lambda c: c.gain(m))
        line += f"; guard: {warned}; worst {worst.gain(m):+.2f} dB ({worst.key['series']}, {_fmt_cond(worst)})"
    return [line]


def summary(cells, key: str) -> list[str]:
    """Win/loss of every model against the best baseline, the worst cell, slices worse than the input."""
    base = ["rl"] if key == "deblur" else [m for m in ("nlm", "bm3d") if m in _methods(cells)]
    margin = 0.5 if key != "mr" else 1.0
    L = [f"{len(cells)} cells, {sum(c.reference_limited for c in cells)} reference-limited. "
         f"Target: model >= best of {'/'.join(base)} + {margin} dB in every cell, never below the input.", "",
         f"| method | cells counted | >= best baseline + {margin} dB | >= best baseline | losses | mean margin dB "
         "| SSIM >= baselines | worst cell (margin dB) | worst gain over input (dB) | slices worse than input |",
         "|---|---:|---:|---:|---:|---:|---:|---|---|---:|"]
    reflim: list[str] = []
    for m in _methods(cells):
        if m == "input":
            continue
        # the comparison with the input counts the same cells as the win/loss columns: in a
        # reference-limited cell PSNR against the reference cannot rank a denoiser against its input either
        cs = [c for c in cells if _counted(c, m)]
        worse, n_sl, warned = _worse_slices(cs, m)
        wg = min(cs, key=lambda c: c.gain(m)) if cs else None
        wgs = f"{wg.gain(m):+.2f} ({wg.key['series']}, {_fmt_cond(wg)})" if wg is not None else ""
        worse_s = f"{worse} / {n_sl}" + (f" (guard: {warned})" if warned and m not in BASELINES else "")
        if m not in BASELINES:
            reflim += _reference_limited_note(cells, m)
        if m in base or not cs or not base:
            L.append(f"| {m} | {len(cs)} | | | | | | | {wgs} | {worse_s} |")
            continue
        mg = [c.scores[m]["psnr"] - max(c.scores[b]["psnr"] for b in base) for c in cs]
        ss = sum(c.scores[m]["ssim"] >= max(c.scores[b]["ssim"] for b in base) for c in cs)
        w = cs[int(np.argmin(mg))]
        L.append(f"| {m} | {len(cs)} | {sum(x >= margin for x in mg)} | {sum(x >= 0 for x in mg)} | "
                 f"{sum(x < 0 for x in mg)} | {np.mean(mg):+.2f} | {ss} | {w.key['series']}, {_fmt_cond(w)} "
                 f"({min(mg):+.2f}) | {wgs} | {worse_s} |")
    if reflim:
        L += ["", "Counted: cells neither reference-limited nor on a series the model trained on; *warned*: "
                  "`restore()`'s guard said the input lies outside the model's trusted range (`meta[\"warnings\"]`)."
                  " Reference-limited cells (the reference's own noise exceeds the added noise, so PSNR against it "
                  "counts what a method removes of the reference's noise as error):", ""] + reflim
    wins: dict[str, int] = {}
    for c in cells:
        if not c.reference_limited:
            b = max(c.scores, key=lambda m: c.scores[m]["psnr"])
            wins[b] = wins.get(b, 0) + 1
    L += ["", "Best PSNR per cell (not reference-limited): " + ", ".join(f"{k} {v}" for k, v in
                                                                       sorted(wins.items(), key=lambda kv: -kv[1]))]
    return L


def matrix_table(cells, key: str) -> list[str]:
    ms = _methods(cells)
    L = ["| series | condition | added SD | ref SD | | " + " | ".join(ms) + " |",
         "|---|---|---:|---:|---|" + "---|" * len(ms)]
    for c in cells:
        best = max(c.scores, key=lambda m: c.scores[m]["psnr"])
        flag = "ref-lim" if c.reference_limited else ""
        if c.seen:
            flag += (" " if flag else "") + "seen: " + ",".join(c.seen)
        cols = []
        for m in ms:
            if m not in c.scores:
                cols.append("")
                continue
            sc = c.scores[m]
            s = f"{sc['psnr']:.2f} / {sc['ssim']:.3f}"
            s = f"**{s}**" if m == best else s
            if sc.get("guard"):
                s += " †"
            if c.reference_limited and "ref_psnr" in sc and sc["psnr"] < c.scores["input"]["psnr"]:
                s += f" (ceiling {sc['ref_psnr']:.2f})"
            cols.append(s)
        ref = f"{c.ref_sd:.1f}" if c.ref_sd == c.ref_sd else ""
        L.append(f"| {c.key['series']} | {_fmt_cond(c)} | {c.sigma:.1f} | {ref} | {flag} | " + " | ".join(cols) + " |")
    L += ["", "Cells: PSNR dB / SSIM; bold: the best PSNR of the row. †: `restore()`'s guard warned that the input "
              "lies outside the model's trusted range. *ceiling*: in a reference-limited cell where a model is below "
              "the input, its PSNR on the noise-free reference itself (the most it can score against that reference)."]
    return L


def heatmap(cells: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    parts = [(k, v) for k, v in cells.items() if v]
    n_rows = max(len(v) for _, v in parts)
    fig, axes = plt.subplots(1, len(parts), figsize=(6.0 * len(parts), 1.2 + 0.13 * n_rows), squeeze=False)
    titles = {"ct": "CT denoising", "mr": "MR denoising", "deblur": "deblurring"}
    for ax, (k, cs) in zip(axes[0], parts):
        ms = _methods(cs)  # the input's column is 0: where every method loses, the input is the best
        g = np.array([[c.gain(m) if m in c.scores else np.nan for m in ms] for c in cs])
        # the colour scale from the cells that rank methods (reference-limited rows can reach -30 dB)
        rank = np.array([not c.reference_limited for c in cs])
        lim = float(np.nanpercentile(np.abs(g[rank] if rank.any() else g), 98)) or 1.0
        im = ax.imshow(g, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto", interpolation="nearest")
        for i, c in enumerate(cs):
            j = int(np.nanargmax(g[i]))
            ax.plot(j, i, marker="*", color="gold" if not c.reference_limited else "grey", ms=4, mec="k", mew=0.3)
            if c.reference_limited:  # not counted: PSNR against a reference noisier than the added noise
                ax.add_patch(Rectangle((-0.5, i - 0.5), len(ms), 1, facecolor="white", alpha=0.55, hatch="////",
                                       edgecolor="0.5", lw=0))
        ax.set_xticks(range(len(ms)), ms, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(cs)), [f"{c.key['series'][:16]}: {_fmt_cond(c).split(' (')[0]}"
                                       + (" (ref-lim)" if c.reference_limited else "") for c in cs], fontsize=4)
        ax.set_title(f"{titles[k]}: PSNR gain over input (dB); * best"
                     + ("; hatched: reference-limited" if (~rank).any() else ""), fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.3, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def method_noise_panel(panel: dict, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    inp, outs = panel["input"], panel["outputs"]
    if panel["modality"] == "CT":
        lo, hi = -160.0, 240.0
    else:
        lo, hi = (float(v) for v in np.percentile(inp, [1, 99.5]))
    names = list(outs)
    fig, axes = plt.subplots(max(1, len(names)), 3, figsize=(7.5, 2.6 * max(1, len(names))), squeeze=False)
    for r, n in enumerate(names):
        d = inp - outs[n]
        dl = float(np.percentile(np.abs(d), 99.5)) or 1.0
        for ax, img, t, cm, lim in ((axes[r, 0], inp, "input", "gray", (lo, hi)), (axes[r, 1], outs[n], n, "gray", (lo, hi)),
                                    (axes[r, 2], d, f"input - {n} (+-{dl:.0f})", "RdBu_r", (-dl, dl))):
            ax.imshow(img, cmap=cm, vmin=lim[0], vmax=lim[1], interpolation="nearest")
            ax.set_title(t, fontsize=7)
            ax.axis("off")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)
    return path


def real_scan_table(rows) -> list[str]:
    L = ["Middle slice of every real series, as it is (no noise added), centre crop of the body. Noise SD: "
         "`metrics.noise_sd_estimate` (mode of 5x5 local SDs) in flat tissue of the input; corr: Pearson "
         "correlation of |input - output| with the input's gradient magnitude (Gaussian, 1 px) over the body "
         "(a residual that traces anatomy is removed signal). NLM/BM3D are given the estimated SD. "
         "Targets (CT): SD down >= 50 %, corr <= 0.1. Method-noise panels: `docs/robustness_method_noise/`.", "",
         "| series | method | SD in | SD out | drop | corr |", "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        L.append(f"| {r['series']} ({r['modality']}) | {r['method']}{' (seen)' if r['seen'] else ''} | {r['sd_in']:.2f} | "
                 f"{r['sd_out']:.2f} | {100 * r['sd_drop']:.0f} % | {r['residual_gradient_corr']:.2f} |")
    return L


# ---------------------------------------------------------------------------- low contrast
LC_IMAGES = (("ct/philips-head-phantom/exam/S2010", "phantom", "inserts"),
             ("ct/siemens-body-j2k", "patient", "flat"))
LC_DOSES = (0.25, 1.0)


def low_contrast_section(data: Path, models, seeds: int, baselines, log) -> list[dict]:
    """Disks of every contrast and diameter in uniform regions, before the noise; paired present/absent."""
    from napari_restore.degrade import ct_lowdose_added_noise
    from napari_restore.evaluate import _nlm, _score, _scorer
    from napari_restore.metrics import flat_tissue, uniform_inserts

    rows = []
    context = max([m.card.context for m in models] + [0])
    for rel, label, how in LC_IMAGES:
        s = R.load_series(data, rel, label)
        vol = s.volume
        scored, block_z = R.pick_block(vol.array.shape[0], 1, context)
        k = block_z.index(scored[0])
        block = vol.array[block_z].astype(np.float64)
        clean = block[k]
        px = vol.spacing[2]
        if how == "inserts":
            region = np.zeros(clean.shape, bool)
            for m, _, _ in uniform_inserts(clean):
                region |= m
        else:
            region, _ = flat_tissue(clean, "CT")
        ys, xs = np.nonzero(region)
        cy, cx = int(ys.mean()), int(xs.mean())
        h = w = min(256, clean.shape[0])
        y0, x0 = int(np.clip(cy - h // 2, 0, clean.shape[0] - h)), int(np.clip(cx - w // 2, 0, clean.shape[1] - w))
        box = (slice(y0, y0 + h), slice(x0, x0 + w))
        inbox = np.zeros(clean.shape, bool)
        inbox[box] = True
        diam = [d / px for d in R.LC_DIAMETERS_MM]
        ring = max(2.0 / px, 3.0)
        centres = R.place_disks(region & inbox, diam, ring)  # one image per contrast, the same places
        disks = [R.disk_image(clean.shape, c, d) if c is not None else None for c, d in zip(centres, diam)]
        to_unit, _ = _scorer("CT", clean, (400.0, 50.0))
        ref_sd = R.reference_noise_sd(clean, "CT")
        acc: dict = {}
        for dose in LC_DOSES:
            for seed in range(seeds if dose < 1 else 1):
                t0 = time_now()
                if dose < 1:  # the noise of the disk-free slice (a few HU change the line integrals by < 0.1 %)
                    noise = np.stack([ct_lowdose_added_noise(sl, vol.spacing, dose, method="projection",
                                                             filter_name="cosine", seed=R.cell_seed(rel, dose, seed, z))
                                      for z, sl in zip(block_z, block)])
                    sigma = float(noise[k][region].std())
                else:
                    noise = np.zeros_like(block)
                    sigma = ref_sd
                ab = block + noise
                crop_c, crop_a = clean[box], ab[k][box]
                f = 0.8
                if "nlm" in baselines and dose < 1:  # oracle h on the signal-absent image
                    f = max(((f, _score(to_unit, crop_c, _nlm(crop_a, sigma, f * sigma))[0]) for f in (0.4, 0.6, 0.8, 1.0, 1.2)),
                            key=lambda t: t[1])[0]

                def run(b: np.ndarray) -> dict:
                    out = {"input": b[k][box]}
                    if "nlm" in baselines:
                        out["nlm"] = _nlm(b[k][box], sigma, f * sigma)
                    if "bm3d" in baselines:
                        out["bm3d"] = R._bm3d(b[k][box][None], sigma)[0]
                    for m in models:
                        out[m.card.name] = R._model_out(m, b.astype(np.float32), vol.affine, "CT", [k])[0][box]
                    return out

                absent = run(ab)
                for contrast in R.LC_CONTRASTS_HU:
                    pb = ab.copy()
                    pb[k] += contrast * sum(d for d in disks if d is not None)
                    present = run(pb)
                    for meth in present:
                        for i, d in enumerate(disks):
                            if d is not None:
                                acc.setdefault((dose, meth, contrast, i), []).append(
                                    R.contrast_and_cnr(present[meth], absent[meth], d[box], contrast, ring))
                log(f"  [low contrast] {label} dose {dose:.0%} seed {seed}: sigma {sigma:.1f} HU; {time_now() - t0:.0f} s")
        for (dose, meth, contrast, i), v in acc.items():
            kept, cnr = np.mean(v, axis=0)
            cnr_in = np.mean([x[1] for x in acc[(dose, "input", contrast, i)]])
            rows.append({"image": label, "series": rel, "dose": dose, "method": meth, "contrast_hu": contrast,
                         "diameter_mm": R.LC_DIAMETERS_MM[i], "kept": round(float(kept), 3),
                         "cnr": round(float(cnr), 3), "cnr_ratio": round(float(cnr / cnr_in), 3) if cnr_in else None,
                         "seen": meth in [m.card.name for m in models if R.seen_by(m.card, rel)]})
        missing = [f"{R.LC_DIAMETERS_MM[i]:g} mm" for i, c in enumerate(centres) if c is None]
        if missing:
            log(f"  [low contrast] {label}: no room for disks of {missing}")
    return rows


def time_now() -> float:
    import time

    return time.perf_counter()


def low_contrast_table(rows) -> list[str]:
    ms = list(dict.fromkeys(r["method"] for r in rows))
    L = ["Disks (area-weighted edge) of 3, 7 and 14 HU (one image per contrast, the disks at the same places) added to "
         "uniform regions of a slice, under the same noise draw as the disk-free slice (the projection noise is simulated "
         "on the disk-free slice: a few HU change the line integrals by < 0.1 %): the head phantom's "
         "inserts (`ct/philips-head-phantom/exam/S2010`, which the shipped CT models trained on: *seen*) and flat "
         "soft tissue of the patient `ct/siemens-body-j2k`. 25 % dose: projection noise, cosine filter, "
         "averaged over the seeds; full dose: the scan's own noise. **kept**: the paired mean of "
         "(with disk - without disk, same noise) inside the disk over the inserted contrast; **CNR**: kept x "
         "contrast / SD of the disk-free output over the disk and a ring around it; x: CNR over the input's. "
         "Targets: kept >= 90 %, CNR x >= 1.5 at 25 % dose; at full dose CNR must not fall (x >= 1).", "",
         "| image | dose | contrast HU | diameter mm | " + " | ".join(f"{m} kept / CNR (x)" for m in ms) + " |",
         "|---|---:|---:|---:|" + "---|" * len(ms)]
    keys = list(dict.fromkeys((r["image"], r["dose"], r["contrast_hu"], r["diameter_mm"]) for r in rows))
    by = {(r["image"], r["dose"], r["contrast_hu"], r["diameter_mm"], r["method"]): r for r in rows}
    for key in sorted(keys, key=lambda t: (t[0], t[1], t[3], t[2])):
        cols = []
        for m in ms:
            r = by.get((*key, m))
            cols.append("" if r is None else f"{100 * r['kept']:.0f} % / {r['cnr']:.2f} ({r['cnr_ratio']:.2f})")
        L.append(f"| {key[0]} | {key[1]:.0%} | {key[2]:g} | {key[3]:g} | " + " | ".join(cols) + " |")
    return L
