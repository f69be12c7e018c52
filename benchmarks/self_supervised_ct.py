"""Self-supervised denoising on CT with projection-domain (FBP, spatially correlated) noise.

Trains Neighbor2Neighbor (plain and with pixel-shuffle downsampling), Noise2Void (classic and with
a structured 5x5 blind spot) and, for reference, a supervised model, all on the same noisy slices
(the first 14 slices of the Siemens body CT in ../shared/data with 25 % dose projection-domain
noise), then scores them on the other 6 slices (same noise model, other seeds) with
:func:`napari_restore.evaluate.evaluate`, next to tuned NLM.

Usage: python benchmarks/self_supervised_ct.py [--steps 300] [--out outputs/self-supervised]
Prints the machine, the inputs and a table; writes evaluation.md/json and panel.png.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300, help="optimiser steps per model")
    ap.add_argument("--out", default=str(REPO / "outputs" / "self-supervised"))
    ap.add_argument("--variants", default="n2n,n2n-pd2,n2v,n2v-bs3,n2v-bs5,supervised")
    ap.add_argument("--dose", type=float, default=0.25)
    ap.add_argument("--eval-only", action="store_true", help="score the models already trained in OUT/models")
    ap.add_argument("--slices", type=int, default=6, help="held-out slices scored")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from napari_restore import load, save
    from napari_restore.degrade import ct_lowdose_noise
    from napari_restore.evaluate import evaluate, machine_description
    from napari_restore.training import TrainConfig, train
    from napari_restore.volume import Volume

    print(machine_description())
    vol = load(DATA / "ct" / "siemens-body-j2k")[0]
    train_idx, test_idx = slice(0, 14), slice(14, 20)
    noisy_path = out / "siemens_train_noisy.nii.gz"
    clean_path = out / "siemens_train_clean.nii.gz"
    if not noisy_path.exists():
        t = time.time()
        clean = vol.array[train_idx]
        noisy = ct_lowdose_noise(clean, vol.spacing, args.dose, method="projection", seed=11)
        save(Volume(noisy, vol.affine, "CT", {}), noisy_path)
        save(Volume(clean, vol.affine, "CT", {}), clean_path)
        print(f"projection-domain noise for {clean.shape[0]} slices: {time.time() - t:.0f} s")
    # validation (checkpoint choice only): another patient's CT with the same kind of noise
    val_path = out / "val_noisy.nii.gz"
    if not val_path.exists():
        v = load(DATA / "ct" / "nifti" / "example_ct.nii.gz")[0]
        mid = v.array.shape[0] // 2
        sub = v.array[mid - 3: mid + 3]
        save(Volume(ct_lowdose_noise(sub, v.spacing, args.dose, method="projection", seed=12), v.affine, "CT", {}), val_path)
    test = Volume(vol.array[test_idx], vol.affine, "CT", {"description": "siemens slices 14-19 (held out)"})

    arch = {"channels": [16, 32, 64, 128], "strides": [2, 2, 2]}
    common = dict(val_data=[str(val_path)], architecture=arch, patch_size=(64, 64), batch_size=8,
                  epochs=3, steps_per_epoch=max(1, args.steps // 3), lr=2e-3, patience=0, val_slices=3, val_crop=128,
                  progress_bar=False, tensorboard=False, overwrite=True, seed=0)
    variants = {
        "n2n": dict(data=[str(noisy_path)], mode="self-supervised", self_supervised="n2n"),
        "n2n-pd2": dict(data=[str(noisy_path)], mode="self-supervised", self_supervised="n2n", pd_factor=2),
        "n2v": dict(data=[str(noisy_path)], mode="self-supervised", self_supervised="n2v", blind_spot=1),
        "n2v-bs3": dict(data=[str(noisy_path)], mode="self-supervised", self_supervised="n2v", blind_spot=3),
        "n2v-bs5": dict(data=[str(noisy_path)], mode="self-supervised", self_supervised="n2v", blind_spot=5),
        "supervised": dict(data=[str(clean_path)], mode="supervised", dose_range=(0.15, 0.35),
                           val_data=[str(DATA / "ct" / "nifti" / "example_ct.nii.gz")]),
    }
    results = {}
    for name in args.variants.split(","):
        if args.eval_only:
            if (out / "models" / name / "card.json").is_file():
                results[name] = out / "models" / name
            continue
        t = time.time()
        r = train(TrainConfig(output=str(out / "models" / name), name=name, **{**common, **variants[name]}))
        print(f"trained {name}: {r.steps} steps in {time.time() - t:.0f} s")
        results[name] = r.model_dir
    rows = []
    for name, folder in results.items():
        res = evaluate([test], "ct_lowdose", {"dose": args.dose}, methods=["input", "model"] + (["nlm"] if not rows else []),
                       model=str(folder), slices=args.slices, crop=256, seed=21)
        for r in res.rows:
            r = dict(r, method=name if r["method"] == "model" else r["method"])
            if r["method"] not in [x["method"] for x in rows]:
                rows.append(r)
        res.save_panel(out / f"panel_{name}.png")
    lines = ["| method | PSNR (dB) | SSIM | s/slice |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['sec_per_slice']:.3f} |" for r in rows]
    table = "\n".join(lines)
    print(f"CT, Siemens body slices 14-19, {args.dose:.0%} dose projection-domain noise, W400/L50, crop 256")
    print(table)
    (out / "self_supervised.md").write_text(table + "\n")
    (out / "self_supervised.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
