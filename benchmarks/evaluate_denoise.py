"""Quality and speed of restoration methods side by side, on real scans with simulated degradation.

Methods: a trained model (``--model``), tuned non-local means, BM3D (when the optional ``bm3d``
package is installed; given the true noise SD), Richardson-Lucy (blur only; true PSF, reflect
padding, 20 iterations) and the degraded input itself. Metrics: PSNR/SSIM, CT on HU windowed
W400/L50 to [0, 1]; see :mod:`napari_restore.evaluate`.

Examples::

    python benchmarks/evaluate_denoise.py                                  # CT, 25 % dose, NLM (+BM3D)
    python benchmarks/evaluate_denoise.py --model ct-denoise-2d --slices 6
    python benchmarks/evaluate_denoise.py --degradation gaussian_blur --fwhm-vox 2 \
        --data ../shared/data/mr/nifti/T1.nii.gz --methods input,rl,model --model mr-deblur-2d

Prints the machine, the inputs and the table; writes evaluation.md, evaluation.json, panel.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_CT = [DATA / "ct" / "siemens-body-j2k", DATA / "ct" / "nifti" / "example_ct.nii.gz"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=[str(p) for p in DEFAULT_CT], help="clean scans (files/folders)")
    ap.add_argument("--degradation", default="ct_lowdose",
                    choices=("ct_lowdose", "mr_rician", "gaussian_blur", "motion_blur"))
    ap.add_argument("--dose", type=float, default=0.25, help="ct_lowdose: dose fraction")
    ap.add_argument("--ct-noise-method", default="projection", choices=("projection", "image"))
    ap.add_argument("--sigma-fraction", type=float, default=0.05, help="mr_rician: noise SD / tissue signal")
    ap.add_argument("--fwhm-vox", type=float, default=2.0, help="gaussian_blur: FWHM in voxels")
    ap.add_argument("--noise-sd", type=float, default=0.0, help="blur: white noise SD added after the blur")
    ap.add_argument("--methods", default="input,nlm,bm3d,model,rl")
    ap.add_argument("--model", default=None, help="model name, folder or MONAI bundle")
    ap.add_argument("--slices", type=int, default=4)
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "outputs" / "evaluate"))
    args = ap.parse_args(argv)

    from napari_restore.evaluate import evaluate, machine_description

    params = {"ct_lowdose": {"dose": args.dose, "method": args.ct_noise_method},
              "mr_rician": {"sigma_fraction": args.sigma_fraction},
              "gaussian_blur": {"fwhm_vox": args.fwhm_vox, "noise_sd": args.noise_sd},
              "motion_blur": {"noise_sd": args.noise_sd}}[args.degradation]
    methods = [m for m in args.methods.split(",") if m and not (m == "model" and args.model is None)]
    print(f"machine: {machine_description()}")
    print(f"inputs: {args.data}; {args.degradation} {params}; {args.slices} slices/volume, crop {args.crop}")
    res = evaluate(args.data, args.degradation, params, methods=methods, model=args.model, slices=args.slices,
                   crop=args.crop, seed=args.seed, device=args.device)
    print(res.to_markdown())
    out = res.save(args.out, overwrite=True)
    print(f"wrote {out}/evaluation.md, evaluation.json, panel.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
