"""HU fidelity, noise and edges on the uniform inserts of the real CT head phantom.

The Philips head phantom of ../shared/data (5 mm series S2010) has uniform inserts (about 98 HU,
SD 2-3 HU). We inject projection-model low-dose CT noise scaled to a stated SD, restore, and
report per insert:
- mean HU change: mean(restored) - mean(clean) inside the insert (eroded by 4 pixels), next to
  the noisy input's own offset mean(noisy) - mean(clean) (the injected noise's low frequencies,
  which no denoiser can tell from the insert), the restoration's own shift mean(restored) -
  mean(noisy) (what the network did to the mean, before vs after) and the systematic shift (the
  change averaged over the seeds, per insert);
- noise drop: 1 - SD(restored - clean) / SD(noisy - clean) inside the insert;
- edge: 10-90 % rise distance (mm) of the insert's radially averaged boundary profile,
  restored vs clean (widening in %).
Targets (issue): |mean change| <= 1 HU, noise drop >= 60 %, edge widening <= 10 %.

Usage: ``python benchmarks/phantom_inserts.py [--model denoise-ct] [--noise-hu 20] [--seeds 3] [--ensemble 8]``
Writes ``docs/phantom_inserts.md`` and ``docs/phantom_inserts.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

import napari_restore as nr
from napari_restore.degrade import ct_lowdose_added_noise
from napari_restore.metrics import edge_rise_distance
from napari_restore.metrics import uniform_inserts as inserts

REPO = Path(__file__).resolve().parents[1]
SERIES = REPO.parent / "shared" / "data" / "ct" / "philips-head-phantom" / "exam" / "S2010"
SLICES = (13, 14, 15)


def radial_profile(img: np.ndarray, centre: tuple[float, float], radius: float, step: float = 0.25) -> np.ndarray:
    """Mean over 360 angles of the values from 0.5 r to 1.5 r (outside to inside: a rising edge)."""
    rs = np.arange(1.5 * radius, 0.5 * radius, -step)
    th = np.linspace(0, 2 * np.pi, 360, endpoint=False)
    yy = centre[0] + rs[:, None] * np.sin(th)[None]
    xx = centre[1] + rs[:, None] * np.cos(th)[None]
    return ndi.map_coordinates(img, [yy, xx], order=1).mean(axis=1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model name or folder (default: the best installed CT denoiser)")
    ap.add_argument("--noise-hu", type=float, default=20.0, help="SD of the injected noise in the inserts (HU)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--ensemble", type=int, choices=(1, 2, 4, 8), default=None,
                    help="the model's self-ensemble of in-plane flips/rotations (default: its card's)")
    ap.add_argument("--out", type=Path, default=REPO / "docs")
    args = ap.parse_args(argv)

    from napari_restore.models import find_model, load_model

    vol = nr.load(SERIES)[0]
    card = load_model(args.model).card if args.model else find_model("denoise", "CT", 2, vol.slice_distance)
    dims, context = card.dims, card.context
    clean = vol.array[list(SLICES)]
    spacing = vol.spacing
    rows = []
    panel = None
    for seed in range(args.seeds):
        noise = np.stack([ct_lowdose_added_noise(s, spacing[1:], 0.25, method="projection", seed=seed * 100 + k)
                          for k, s in enumerate(clean)])
        body = clean > -500
        scale = args.noise_hu / noise[body].std()
        noise *= scale
        noisy = vol.copy_with((clean + noise).astype(np.float32))
        if dims == 3 or context:  # a model that sees neighbours gets the whole volume, every slice with its own noise
            full = vol.array.astype(np.float32).copy()
            for z in range(len(full)):
                full[z] += scale * ct_lowdose_added_noise(full[z], spacing[1:], 0.25, method="projection",
                                                          seed=seed * 100 + 50 + z) if z not in SLICES else 0.0
            full[list(SLICES)] = noisy.array
            restored = nr.restore(vol.copy_with(full), task="denoise", model=args.model, mode=f"{dims}d",
                                  device="cpu", ensemble=args.ensemble).array[list(SLICES)]
        else:
            restored = nr.restore(noisy, task="denoise", model=args.model, mode="2d", device="cpu",
                                  ensemble=args.ensemble).array
        for k in range(len(SLICES)):
            for mask, centre, radius in inserts(clean[k]):
                e_noisy = (noisy.array[k] - clean[k])[mask]
                e_rest = (restored[k] - clean[k])[mask]
                edge_c = edge_rise_distance(radial_profile(clean[k], centre, radius), 0.25 * spacing[2])
                edge_r = edge_rise_distance(radial_profile(restored[k], centre, radius), 0.25 * spacing[2])
                rows.append({"slice": SLICES[k], "centre": centre, "mean_clean": float(clean[k][mask].mean()),
                             "mean_change": float(restored[k][mask].mean() - clean[k][mask].mean()),
                             "input_offset": float(e_noisy.mean()),
                             "own_shift": float(restored[k][mask].mean() - noisy.array[k][mask].mean()),
                             "noise_drop": float(1 - e_rest.std() / e_noisy.std()),
                             "edge_clean": edge_c, "edge_restored": edge_r})
        if panel is None:
            panel = (clean[1], noisy.array[1], restored[1])
    lines = [f"input: {SERIES.name} slices {SLICES}, injected projection-model noise scaled to SD {args.noise_hu} HU, "
             f"{args.seeds} seeds; model: {args.model or card.name} {card.version}"
             + (f", self-ensemble of {ens} flips/rotations" if (ens := args.ensemble or card.self_ensemble) > 1 else ""), "",
             "| slice | insert centre (px) | clean mean HU | mean change HU | noisy input's offset HU | restored - noisy HU | noise drop | edge 10-90% clean mm | restored mm | widening |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['slice']} | ({r['centre'][0]:.0f}, {r['centre'][1]:.0f}) | {r['mean_clean']:.1f} | "
                     f"{r['mean_change']:+.2f} | {r['input_offset']:+.2f} | {r['own_shift']:+.2f} | "
                     f"{100 * r['noise_drop']:.0f}% | {r['edge_clean']:.2f} | "
                     f"{r['edge_restored']:.2f} | {100 * (r['edge_restored'] / r['edge_clean'] - 1):+.0f}% |")
    worst_mean = max(abs(r["mean_change"]) for r in rows)
    min_drop = min(r["noise_drop"] for r in rows)
    max_widen = max(r["edge_restored"] / r["edge_clean"] - 1 for r in rows)
    per_insert: dict[tuple, list[float]] = {}
    for r in rows:
        per_insert.setdefault((r["slice"], round(r["centre"][0]), round(r["centre"][1])), []).append(r["mean_change"])
    worst_shift = max(abs(float(np.mean(v))) for v in per_insert.values())
    worst_input = max(abs(r["input_offset"]) for r in rows)
    worst_own = max(abs(r["own_shift"]) for r in rows)
    lines += ["", f"worst |mean change| {worst_mean:.2f} HU (target <= 1), smallest noise drop {100 * min_drop:.0f}% "
              f"(target >= 60%), largest edge widening {100 * max_widen:+.0f}% (target <= 10%)",
              f"for scale: worst |offset| of the noisy input itself {worst_input:.2f} HU; worst systematic shift "
              f"(mean change averaged over the {args.seeds} seeds, per insert) {worst_shift:.2f} HU; "
              f"worst |restored - noisy| (the restoration's own change of the mean) {worst_own:.2f} HU"]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "phantom_inserts.md").write_text("# CT phantom inserts\n\n" + text + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(12, 4.3), constrained_layout=True)
    for ax, img, title in zip(axes, panel, ("clean", f"+ noise ({args.noise_hu:g} HU)", "restored")):
        ax.imshow(img[140:360, 150:370], cmap="gray", vmin=40, vmax=160)
        ax.set_title(f"{title}, W120/L100")
        ax.axis("off")
    fig.savefig(args.out / "phantom_inserts.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
