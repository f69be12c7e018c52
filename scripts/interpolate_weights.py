"""Interpolate two models' weights (WiSE-FT, Wortsman et al. 2022): ``(1 - w) x START + w x TUNED``.

Usage::

    python scripts/interpolate_weights.py START TUNED WEIGHT OUT

START and TUNED are model folders (``card.json`` + ``model.pt``) of the same architecture, TUNED a
fine-tune of START; OUT gets the interpolated ``model.pt`` and TUNED's card with the
interpolation recorded under ``training.weight_interpolation``. `denoise-ct-25d` 0.3.0 is
``denoise-ct-25d 0.2.0`` and its fine-tune towards cleaner targets at WEIGHT 0.25 (docs/models.md).
Measure the result (``benchmarks/robustness.py --models OUT``) before shipping it: the card's
validation figures are the fine-tune's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def interpolate(start: Path, tuned: Path, weight: float, out: Path) -> None:
    a = torch.load(start / "model.pt", map_location="cpu", weights_only=True)
    b = torch.load(tuned / "model.pt", map_location="cpu", weights_only=True)
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        sys.exit(f"{start} and {tuned} are not the same architecture")
    mixed = {k: ((1 - weight) * a[k].double() + weight * b[k].double()).to(a[k].dtype)
             if a[k].is_floating_point() else b[k] for k in a}  # integer buffers (BatchNorm counts): TUNED's
    card = json.loads((tuned / "card.json").read_text(encoding="utf-8"))
    start_card = json.loads((start / "card.json").read_text(encoding="utf-8"))
    card.setdefault("training", {})["weight_interpolation"] = {
        "from": f"{start_card['name']} {start_card['version']}", "to": "the fine-tune this card's command trains",
        "weight_of_fine_tune": weight}
    out.mkdir(parents=True, exist_ok=True)
    torch.save(mixed, out / "model.pt")
    (out / "card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    interpolate(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
