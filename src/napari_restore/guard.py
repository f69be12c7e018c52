"""Do-no-harm guard: does the input lie inside the range a model was trained and tested on?

A model card may carry ``trusted_range`` (see :data:`RANGE_KEYS`); :func:`check_trusted_range`
measures the input (in-plane pixel size, slice thickness, noise level) and returns one warning per
measure that falls outside, naming the model, the measured value and the range. ``restore()`` adds
them to the result's ``meta["warnings"]``, which the CLI prints, the widget shows and the batch
manifest records. A warning is not a refusal: the user decides.

Noise is measured as in :func:`napari_restore.metrics.noise_sd_estimate` (mode of local SDs): CT
in soft tissue (0-100 HU, in HU), MR relative to the foreground mean. The edge spread
(``edge_fwhm_voxels``, :func:`napari_restore.metrics.edge_width_fwhm`) is how blurred the input
already is: a deblurrer handed an image that is already sharp rings at its edges. ``fwhm_voxels``
(the blur added in training, on top of the training scans' own) is recorded but not measured.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .volume import Volume

#: trusted_range keys: [low, high] numbers, except ``kernels`` (names, informational)
RANGE_KEYS = {
    "pixel_mm": "in-plane pixel size (mm)",
    "slice_thickness_mm": "slice thickness (mm)",
    "noise_sd_hu": "noise SD in soft tissue (HU)",
    "noise_fraction": "noise SD relative to the tissue signal",
    "fwhm_voxels": "blur FWHM (voxels)",
    "edge_fwhm_voxels": "edge spread (FWHM, voxels)",
}
#: what a measure below its range means, added to the warning
LOW_HINTS = {
    "edge_fwhm_voxels": "the input is already sharp, and deblurring it can add rings at its edges",
}
#: a measure this much beyond a bound still counts as inside (estimation error)
SLACK = 0.15


def validate_range(value: Any) -> dict[str, Any]:
    """Check a card's ``trusted_range``; raises ``ValueError`` naming the bad key."""
    if not isinstance(value, dict):
        raise ValueError("trusted_range must be a JSON object")
    for key, v in value.items():
        if key == "kernels":
            if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
                raise ValueError("trusted_range.kernels must be a list of names")
            continue
        if key == "note":
            continue
        if key not in RANGE_KEYS:
            raise ValueError(f"trusted_range: unknown key {key!r} (known: {sorted(RANGE_KEYS)}, kernels, note)")
        if (not isinstance(v, list) or len(v) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                               for x in v) or not v[0] <= v[1]):
            raise ValueError(f"trusted_range.{key} must be [low, high] with low <= high, got {v!r}")
    return dict(value)


def measure(volume: Volume, max_slices: int = 5, edges: bool = True) -> dict[str, float]:
    """Pixel size, slice thickness, noise level and (``edges``) edge spread of ``volume`` (a few middle slices)."""
    arr = volume.array if volume.array.ndim == 3 else volume.array[0]
    nz = arr.shape[0]
    idx = np.unique(np.linspace(nz * 0.25, nz * 0.75, min(max_slices, nz)).astype(int).clip(0, nz - 1))
    sub = arr[idx].astype(np.float32)
    out: dict[str, float] = {"pixel_mm": float(min(volume.spacing[1:]))}
    thick = volume.meta.get("slice_thickness") if volume.meta else None
    out["slice_thickness_mm"] = float(thick) if thick else float(volume.slice_distance)
    sd, mean = tissue_noise(sub, volume.modality)
    if sd is not None and volume.modality == "CT":
        out["noise_sd_hu"] = sd
    elif sd is not None and mean > 0:
        out["noise_fraction"] = sd / mean
    edge = _edge_spread(sub, sd) if edges else None
    if edge is not None:
        out["edge_fwhm_voxels"] = edge
    return out


def _edge_spread(sub: np.ndarray, noise_sd: float | None) -> float | None:
    """:func:`metrics.edge_width_fwhm` of ``(z, y, x)`` slices; the noise from the whole image when
    there is too little tissue to measure it (``None``: too small, or too few strong edges)."""
    from .errors import InputError
    from .metrics import edge_width_fwhm, noise_sd_estimate

    if min(sub.shape[-2:]) < 16:
        return None
    try:
        sd = noise_sd if noise_sd is not None else noise_sd_estimate(sub)
        return edge_width_fwhm(sub, sd)
    except InputError:
        return None


def tissue_noise(image: np.ndarray, modality: str) -> tuple[float | None, float]:
    """``(noise SD, mean)`` of soft tissue (CT: 0-100 HU) or of the MR foreground (top 30 %).

    ``image``: ``(y, x)`` or ``(z, y, x)`` in physical units. The SD is ``None`` when there is too
    little tissue to measure (CT: at most 2000 pixels)."""
    from scipy import ndimage as ndi

    from .errors import InputError
    from .metrics import noise_sd_estimate

    a = np.asarray(image, dtype=np.float32)
    smooth = ndi.gaussian_filter(a, (0, 2, 2) if a.ndim == 3 else 2)  # the mask must not follow the noise
    mask = (smooth > 0) & (smooth < 100) if modality == "CT" else smooth > np.percentile(smooth, 70)
    mean = float(smooth[mask].mean()) if mask.any() else 0.0
    if (modality == "CT" and mask.sum() <= 2000) or not mask.any():
        return None, mean
    try:
        return float(noise_sd_estimate(a, mask)), mean
    except InputError:  # too little flat tissue to measure
        return None, mean


def outside_range(card: Any, measured: dict[str, float]) -> dict[str, tuple[float, float, float]]:
    """``{key: (value, low, high)}`` for every measure in ``measured`` outside ``card``'s ``trusted_range``.

    The structured form of :func:`check_trusted_range` (the benchmark records it per cell)."""
    rng = getattr(card, "trusted_range", None) or {}
    out: dict[str, tuple[float, float, float]] = {}
    for key in RANGE_KEYS:
        if key not in rng or key not in measured:
            continue
        lo, hi = (float(v) for v in rng[key])
        v = float(measured[key])
        if v < lo * (1 - SLACK) or v > hi * (1 + SLACK):
            out[key] = (v, lo, hi)
    return out


def check_trusted_range(volume: Volume, card: Any, measured: dict[str, float] | None = None) -> list[str]:
    """Warnings for every measure of ``volume`` outside ``card``'s ``trusted_range``."""
    if not (getattr(card, "trusted_range", None) or {}):
        return []
    m = measured if measured is not None else measure(volume, edges=_wants_edges([card]))
    return [f"{card.name}: the input's {RANGE_KEYS[key]} is {v:.3g}, outside the range it was trained and "
            f"tested on ({lo:g}-{hi:g}){'; ' + LOW_HINTS[key] if key in LOW_HINTS and v < lo else ''}; "
            "check the result against the input (docs/robustness.md shows where each model can be trusted)"
            for key, (v, lo, hi) in outside_range(card, m).items()]


def _wants_edges(cards: list[Any]) -> bool:
    return any("edge_fwhm_voxels" in (getattr(c, "trusted_range", None) or {}) for c in cards)


def range_warnings(volume: Volume, cards: list[Any]) -> list[str]:
    """:func:`check_trusted_range` for several cards, measuring the input once (none: no work)."""
    cards = [c for c in cards if getattr(c, "trusted_range", None)]
    if not cards:
        return []
    measured = measure(volume, edges=_wants_edges(cards))
    return [w for card in cards for w in check_trusted_range(volume, card, measured)]
