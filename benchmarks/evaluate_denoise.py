"""Quality and speed of restoration methods side by side, on real scans with simulated degradation.

Methods: a trained model (``--model``), tuned non-local means, BM3D (when the optional ``bm3d``
package is installed; given the true noise SD), Richardson-Lucy (blur only; true PSF, reflect
padding, 20 iterations) and the degraded input itself. Metrics: PSNR/SSIM, CT on HU windowed
W400/L50 to [0, 1]; see :mod:`napari_restore.evaluate`.

Examples::

    python benchmarks/evaluate_denoise.py                                  # CT, 25 % dose, NLM (+BM3D)
    python benchmarks/evaluate_denoise.py --model ct-denoise-2d --slices 6
    python benchmarks/evaluate_denoise.py ../shared/data/mr/nifti/T1.nii.gz --degradation gaussian_blur --fwhm-vox 2 \
        --methods input,rl,model --model mr-deblur-2d

Prints the machine, the inputs and the table; writes evaluation.md, evaluation.json, panel.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
DEFAULT_CT = [DATA / "ct" / "siemens-body-j2k"]


def main(argv: list[str] | None = None) -> int:
    from napari_restore.evaluate import add_evaluate_arguments, run_from_args

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_evaluate_arguments(ap)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not any(not a.startswith("-") for a in argv[:1]):  # no data given: the default CT
        argv = [str(p) for p in DEFAULT_CT] + argv
    ap.set_defaults(out=str(REPO / "outputs" / "evaluate"))
    run_from_args(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
