"""How far the 25 %-dose CT target can be reached: the full-dose reference carries noise too.

The CT evaluation scores a restoration against the full-dose scan ``r = x + n0`` (anatomy ``x``,
the scanner's own quantum noise ``n0``, SD ``s0``); simulated 25 % dose adds ``a`` (SD ``sa``),
so the input is ``y = r + a``. Returning the noise-free anatomy ``x`` exactly still leaves ``n0``:
its gain over the input is ``10 log10(sa^2 / s0^2)``. The best any method can do (the MSE-optimal
estimate, given ``x``) keeps a share of the noise, ``x + (y - x) s0^2 / (s0^2 + sa^2)``, and gains
``10 log10(1 + sa^2 / s0^2)``.

In flat soft tissue of the evaluation's body CT (local mean -20 to 200 HU: muscle, liver,
spleen, kidney; gentle gradient; eroded)
the anatomy is its local mean, so both bounds can be measured there. The script scores the input,
those two bounds and the models in that region and in the rest of the image (edges, vessels, fat,
bone: where ``x`` is unknown), all in the evaluation's W400/L50 window, and says how much of each
model's remaining squared error lies outside the flat tissue.

Usage: ``python benchmarks/ct_noise_ceiling.py [--models denoise-ct denoise-ct-25d] [--seed 0]``
Writes ``docs/ct_noise_ceiling.md`` and ``docs/ct_noise_ceiling.png``.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

import napari_restore as nr
from napari_restore.degrade import ct_lowdose_added_noise
from napari_restore.metrics import flat_tissue

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO.parent / "shared" / "data" / "ct" / "siemens-body-j2k"
WINDOW = (-150.0, 250.0)  # W400 / L50, as in the evaluation


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["denoise-ct", "denoise-ct-25d"])
    ap.add_argument("--dose", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--crop", type=int, default=256, help="in-plane centre crop scored, as in the evaluation (0 = whole)")
    ap.add_argument("--out", default=str(REPO / "docs"))
    args = ap.parse_args(argv)
    if not SERIES.is_dir():
        sys.exit(f"{SERIES} is missing: this benchmark reads the shared data set")

    vol = max(nr.load(SERIES), key=lambda v: v.array.size)
    ref = vol.array.astype(np.float64)  # (z, y, x) HU
    added = ct_lowdose_added_noise(ref, vol.spacing, args.dose, seed=args.seed).astype(np.float64)
    noisy = ref + added
    outs = {m: nr.restore(dataclasses.replace(vol, array=noisy.astype(np.float32)), model=m).array.astype(np.float64)
            for m in args.models}

    w = lambda f: np.clip(f, *WINDOW)  # noqa: E731
    masks, locals_ = zip(*(flat_tissue(s) for s in ref))
    scored = np.zeros(ref.shape, dtype=bool)
    cy, cx = (min(args.crop, n) if args.crop else n for n in ref.shape[1:])
    y0, x0 = (ref.shape[1] - cy) // 2, (ref.shape[2] - cx) // 2
    scored[:, y0:y0 + cy, x0:x0 + cx] = True
    flat = np.stack(masks) & scored
    truth = np.stack(locals_)  # the anatomy, where flat
    s0sq = ((ref - truth)[flat] ** 2).mean()
    sasq = (added[flat] ** 2).mean()
    shrink = truth + (noisy - truth) * s0sq / (s0sq + sasq)
    rows = {"25 % dose input": noisy, "noise-free anatomy (local mean)": truth,
            "best possible (anatomy + optimal share of the noise)": shrink, **outs}

    def mse(est: np.ndarray, region: np.ndarray) -> float:
        return float(((w(est) - w(ref))[region] ** 2).mean())

    rest = scored & ~flat
    base_f, base_r, base_all = mse(noisy, flat), mse(noisy, rest), mse(noisy, scored)
    lines = [
        "# CT at 25 % dose: how much the full-dose reference's own noise leaves to gain",
        "",
        f"`python benchmarks/ct_noise_ceiling.py` ({SERIES.name}: {ref.shape[0]} slices of "
        f"{ref.shape[1]}x{ref.shape[2]}, {vol.spacing[0]:g} mm; projection-domain noise at {args.dose:.0%} dose, "
        f"seed {args.seed}; W400/L50 window; scored: the centre {cy}x{cx} of every slice, as in the evaluation).",
        "",
        f"Flat soft tissue: {flat.sum()} pixels ({flat.sum() / scored.sum():.1%} of the scored region). There the reference's own noise SD is "
        f"{np.sqrt(s0sq):.1f} HU and the added noise SD {np.sqrt(sasq):.1f} HU (variance ratio {sasq / s0sq:.2f}):",
        f"returning the noise-free anatomy gains {10 * np.log10(sasq / s0sq):+.2f} dB over the input, "
        f"the best possible estimate {10 * np.log10(1 + sasq / s0sq):+.2f} dB (computed from the two SDs; "
        "the table measures them on this noise draw).",
        "",
        "| estimate | flat soft tissue: RMSE HU / gain dB | the rest: RMSE HU / gain dB | all scored: RMSE HU / gain dB "
        "| share of its squared error outside flat tissue |",
        "|---|---|---|---|---|",
    ]
    for name, est in rows.items():
        ef = mse(est, flat)
        cells = [f"{np.sqrt(ef):.1f} / {10 * np.log10(base_f / ef):+.2f}"]
        if name in outs or name == "25 % dose input":
            er, ea = mse(est, rest), mse(est, scored)
            share = er * rest.sum() / (ea * scored.sum())
            cells += [f"{np.sqrt(er):.1f} / {10 * np.log10(base_r / er):+.2f}", f"{np.sqrt(ea):.1f} / {10 * np.log10(base_all / ea):+.2f}",
                      f"{share:.0%}"]
        else:
            cells += ["(anatomy unknown)", "", ""]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    best_f = mse(shrink, flat)
    lines += ["", "The issue's target is +4.5 dB over the input on all of it (docs/evaluation_ct_25pct.md: "
              "the mean of six slices' PSNR, the same region)."]
    for name, est in outs.items():
        lines.append(f"- {name}: in flat soft tissue {10 * np.log10(mse(est, flat) / best_f):.2f} dB short of the best "
                     f"possible; elsewhere (edges, vessels, fat, bowel, bone) {10 * np.log10(base_r / mse(est, rest)):+.2f} dB "
                     "over the input.")
    lines.append("")
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ct_noise_ceiling.md").write_text(text)
    _picture(ref, noisy, outs, flat, out / "ct_noise_ceiling.png", w, cy)
    print(f"wrote {out / 'ct_noise_ceiling.md'} and {out / 'ct_noise_ceiling.png'}")
    return 0


def _picture(ref, noisy, outs, flat, path: Path, w, crop: int) -> None:
    import matplotlib
    import matplotlib.patches

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    z = int(np.argmax(flat.sum(axis=(1, 2))))
    panels = [("full-dose reference", w(ref[z]), "gray", WINDOW)]
    panels.append(("|input - reference| (HU)", np.abs(w(noisy[z]) - w(ref[z])), "magma", (0, 60)))
    for name, o in outs.items():
        panels.append((f"|{name} - reference| (HU)", np.abs(w(o[z]) - w(ref[z])), "magma", (0, 60)))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.6))
    for ax, (title, img, cmap, lim) in zip(axes, panels):
        ax.imshow(img, cmap=cmap, vmin=lim[0], vmax=lim[1])
        ax.contour(flat[z], levels=[0.5], colors="cyan", linewidths=0.6)
        y0, x0 = (ref.shape[1] - crop) // 2, (ref.shape[2] - crop) // 2
        ax.add_patch(matplotlib.patches.Rectangle((x0, y0), crop, crop, fill=False, ec="lime", lw=0.8))
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"slice {z} (scored: the centre {crop}x{crop}, green); flat soft tissue outlined (cyan)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
