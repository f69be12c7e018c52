"""Modality-aware intensity normalisation with an exact inverse.

A model card's ``"intensity"`` field names the mapping the model was trained with (a dict):

- ``{"kind": "ct", "center": 0.0, "scale": 512.0, "clip": [-1024.0, 3071.0]}`` (CT default):
  ``y = (clip(HU, lo, hi) - center) / scale``. Fixed, so absolute HU keeps its meaning; with a
  power-of-two scale the inverse is bit-exact for every HU value in the clip range. Voxels
  outside the clip range (out-of-field padding such as -2048 or -3024, metal above 3071) are
  clipped before the network and get their original value back afterwards. Noise of 10 HU is
  0.02 in these units, not a tiny fraction of the input range.
- ``{"kind": "percentile", "lower": 1.0, "upper": 99.0}`` (MR default): robust percentiles of
  the whole volume (from a regular subsample, never a full copy) map to 0 and 1; no clipping,
  the result comes back in the source units.
- ``{"kind": "identity"}``: values are used as they are.

Usage: ``norm = Normalizer.fit(spec, array)``; per batch ``y = norm.forward(x)`` and
``x_out = norm.inverse(y_out, original=x)``. ``forward`` and ``inverse_linear`` accept numpy
arrays and torch tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ModelError

CT_DEFAULT: dict[str, Any] = {"kind": "ct", "center": 0.0, "scale": 512.0, "clip": [-1024.0, 3071.0]}
MR_DEFAULT: dict[str, Any] = {"kind": "percentile", "lower": 1.0, "upper": 99.0}
IDENTITY: dict[str, Any] = {"kind": "identity"}
KINDS = ("ct", "percentile", "identity")

#: Most voxels a percentile estimate reads (a regular subsample of the volume).
_MAX_SAMPLE = 2_000_000


def default_spec(modality: str) -> dict[str, Any]:
    """The default mapping for a DICOM modality code (CT -> fixed HU, else percentiles)."""
    return dict(CT_DEFAULT if (modality or "").upper() == "CT" else MR_DEFAULT)


def validate_spec(spec: Any, source: str = "intensity") -> dict[str, Any]:
    """Check a card's ``intensity`` dict; returns it with defaults filled in.

    Raises:
        ModelError: unknown kind or bad parameters.
    """
    if not isinstance(spec, dict) or spec.get("kind") not in KINDS:
        raise ModelError(f"{source}: 'intensity' must be a dict with kind in {KINDS}, got {spec!r}")
    kind = spec["kind"]
    base = {"ct": CT_DEFAULT, "percentile": MR_DEFAULT, "identity": IDENTITY}[kind]
    out = {**base, **spec}
    try:
        if kind == "ct":
            out["center"], out["scale"] = float(out["center"]), float(out["scale"])
            lo, hi = (float(v) for v in out["clip"])
            out["clip"] = [lo, hi]
            ok = out["scale"] > 0 and lo < hi and np.isfinite([lo, hi, out["center"], out["scale"]]).all()
        elif kind == "percentile":
            out["lower"], out["upper"] = float(out["lower"]), float(out["upper"])
            ok = 0.0 <= out["lower"] < out["upper"] <= 100.0
        else:
            ok = True
    except (TypeError, ValueError, KeyError):
        ok = False
    if not ok:
        raise ModelError(f"{source}: invalid intensity parameters {spec!r}")
    return out


def sample_values(array: np.ndarray, max_voxels: int = _MAX_SAMPLE) -> np.ndarray:
    """A regular subsample (a view where possible) of ``array`` with at most ~``max_voxels``."""
    step = max(1, int(np.ceil((array.size / max_voxels) ** (1.0 / array.ndim))))
    return array[(slice(None, None, step),) * array.ndim]


@dataclass
class Normalizer:
    """A fitted intensity mapping: ``y = (clip(x, lo, hi) - offset) / scale``.

    ``lo``/``hi`` are ``-inf``/``inf`` when nothing is clipped. ``spec`` is the card's dict,
    ``stats`` what was measured on the volume (for provenance).
    """

    offset: float = 0.0
    scale: float = 1.0
    lo: float = -np.inf
    hi: float = np.inf
    spec: dict[str, Any] = field(default_factory=lambda: dict(IDENTITY))
    stats: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, spec: dict[str, Any], array: np.ndarray) -> "Normalizer":
        """Fit ``spec`` to ``array`` (any shape, physical units). CT and identity read nothing."""
        spec = validate_spec(spec)
        kind = spec["kind"]
        if kind == "ct":
            lo, hi = spec["clip"]
            return cls(spec["center"], spec["scale"], lo, hi, spec)
        if kind == "identity":
            return cls(0.0, 1.0, -np.inf, np.inf, spec)
        sample = sample_values(array)
        sample = sample[np.isfinite(sample)]
        if sample.size == 0:
            return cls(0.0, 1.0, -np.inf, np.inf, spec, {"p_lower": 0.0, "p_upper": 1.0})
        p_lo, p_hi = (float(v) for v in np.percentile(sample, [spec["lower"], spec["upper"]]))
        if not p_hi > p_lo:  # a (nearly) constant volume: fall back to its range, then to 1
            p_lo, p_hi = float(sample.min()), float(sample.max())
            if not p_hi > p_lo:
                p_hi = p_lo + 1.0
        return cls(p_lo, p_hi - p_lo, -np.inf, np.inf, spec, {"p_lower": p_lo, "p_upper": p_hi})

    @property
    def clips(self) -> bool:
        return bool(np.isfinite(self.lo) or np.isfinite(self.hi))

    def forward(self, x):
        """Physical units -> network units (numpy array or torch tensor, float32 result)."""
        if self.clips:
            x = x.clip(self.lo, self.hi) if isinstance(x, np.ndarray) else x.clamp(self.lo, self.hi)
        y = (x - self.offset) / self.scale
        return y.astype(np.float32, copy=False) if isinstance(y, np.ndarray) else y.float()

    def inverse_linear(self, y):
        """Network units -> physical units, without restoring clipped voxels."""
        return y * self.scale + self.offset

    def restore_outside(self, out: np.ndarray, original: np.ndarray) -> np.ndarray:
        """Put the original value back (in place) where ``original`` lies outside the clip range."""
        if self.clips:
            outside = (original < self.lo) | (original > self.hi)
            np.copyto(out, original, where=outside)
        return out

    def inverse(self, y: np.ndarray, original: np.ndarray | None = None) -> np.ndarray:
        """Exact inverse of :meth:`forward`: network units -> physical units (float32).

        With ``original`` (the input of :meth:`forward`), voxels that were clipped get their
        original value back, so ``inverse(forward(x), x) == x``.
        """
        out = np.asarray(self.inverse_linear(y), dtype=np.float32)
        if original is not None:
            self.restore_outside(out, original)
        return out

    def describe(self) -> dict[str, Any]:
        """The spec plus measured statistics, for provenance."""
        return {**self.spec, **self.stats}


__all__ = ["Normalizer", "default_spec", "validate_spec", "sample_values", "CT_DEFAULT", "MR_DEFAULT",
           "IDENTITY", "KINDS"]
