"""Interpolate two models' weights (WiSE-FT, Wortsman et al. 2022): ``(1 - w) x START + w x TUNED``;
or add to a model the difference of two others (task arithmetic, Ilharco et al. 2023):
``TUNED + w x (A - B)``.

Usage::

    python scripts/interpolate_weights.py START TUNED WEIGHT OUT
    python scripts/interpolate_weights.py add TUNED WEIGHT A B OUT

START and TUNED are model folders (``card.json`` + ``model.pt``) of the same architecture, TUNED a
fine-tune of START; OUT gets the interpolated ``model.pt`` and TUNED's card with the
interpolation recorded under ``training.weight_interpolation``. `denoise-ct-25d` 0.3.0 is
``denoise-ct-25d 0.2.0`` and its fine-tune towards cleaner targets at WEIGHT 0.25 (docs/models.md).
`denoise-ct-25d` 0.3.1 is a fine-tune of 0.3.0 towards the scans as they are (with faint disks)
plus 0.8 x (0.3.0 - 0.2.0): ``add TUNED 0.8 <0.3.0 folder> <0.2.0 folder> OUT``.
Measure the result (``benchmarks/robustness.py --models OUT``) before shipping it: the card's
validation figures are the fine-tune's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def _load_same(*dirs: Path) -> list[dict]:
    sds = [torch.load(d / "model.pt", map_location="cpu", weights_only=True) for d in dirs]
    for d, sd in zip(dirs[1:], sds[1:]):
        if sd.keys() != sds[0].keys() or any(sd[k].shape != sds[0][k].shape for k in sd):
            sys.exit(f"{dirs[0]} and {d} are not the same architecture")
    return sds


def _name(d: Path) -> str:
    card = json.loads((d / "card.json").read_text(encoding="utf-8"))
    return f"{card['name']} {card['version']}"


def _write(out: Path, weights: dict, card: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    torch.save(weights, out / "model.pt")
    (out / "card.json").write_text(json.dumps(card, indent=2), encoding="utf-8")


def add_task_vector(tuned: Path, weight: float, a: Path, b: Path, out: Path) -> None:
    """OUT = TUNED + ``weight`` x (A - B) on floating-point tensors (integer buffers: TUNED's);
    TUNED's card with the arithmetic recorded under ``training.weight_arithmetic``."""
    t, sa, sb = _load_same(tuned, a, b)
    mixed = {k: (t[k].double() + weight * (sa[k].double() - sb[k].double())).to(t[k].dtype)
             if t[k].is_floating_point() else t[k] for k in t}
    negative = [k for k, v in mixed.items() if k.endswith("running_var") and float(v.min()) <= 0]
    if negative:  # a variance below zero: BatchNorm would take the square root of it (NaN out)
        sys.exit(f"{weight} x ({a} - {b}) makes BatchNorm variances <= 0 ({', '.join(negative[:3])}"
                 f"{', ...' if len(negative) > 3 else ''}): a smaller weight, or not these models")
    card = json.loads((tuned / "card.json").read_text(encoding="utf-8"))
    card.setdefault("training", {})["weight_arithmetic"] = {
        "base": "the fine-tune this card's command trains", "plus": weight, "times_difference_of": [_name(a), _name(b)]}
    _write(out, mixed, card)


def interpolate(start: Path, tuned: Path, weight: float, out: Path) -> None:
    a, b = _load_same(start, tuned)
    mixed = {k: ((1 - weight) * a[k].double() + weight * b[k].double()).to(a[k].dtype)
             if a[k].is_floating_point() else b[k] for k in a}  # integer buffers (BatchNorm counts): TUNED's
    card = json.loads((tuned / "card.json").read_text(encoding="utf-8"))
    card.setdefault("training", {})["weight_interpolation"] = {
        "from": _name(start), "to": "the fine-tune this card's command trains",
        "weight_of_fine_tune": weight}
    _write(out, mixed, card)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "add":
        add_task_vector(Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), Path(sys.argv[6]))
        sys.exit(0)
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    interpolate(Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
