"""The model card: a JSON file that says what a weights file is and how to use it.

Schema (``card.json``, format_version 1; unknown keys are kept in ``extra``)::

    {
      "format_version": 1,
      "name": "ct-denoise-2d",            # str, [A-Za-z0-9._-]+, unique among installed models
      "version": "0.1.0",                 # str, dotted numbers; the higher wins when choosing
      "task": "denoise",                  # "denoise" | "deblur" | "enhance" | "restore"
      "modality": "CT",                   # "CT" | "MR" | "any"
      "dims": 2,                          # 2: slice by slice (mode "2d"), 3: sliding window ("3d")
      "architecture": {                   # only whitelisted names (networks.ARCHITECTURES)
        "name": "ResidualUNet",
        "args": {"spatial_dims": 2, "channels": [16, 32, 64, 128], "strides": [2, 2, 2],
                 "num_res_units": 0, "norm": "batch", "act": "PRELU", "dropout": 0.0,
                 "kernel_size": 3, "up_kernel_size": 3}
      },
      "intensity": {"kind": "ct", "center": 0.0, "scale": 512.0, "clip": [-1024, 3071]},
                                          # see napari_restore.intensity
      "patch_size": [64, 128, 128],       # optional: default tile for 3-D sliding window (z, y, x)
      "max_slice_spacing_mm": 3.0,        # optional: made for slices at most this far apart ("Auto"
                                          # prefers it there and never picks it for thicker slices)
      "self_ensemble": 8,                 # optional (default 1): run the network on 1, 2, 4 or 8 in-plane
                                          # flips/rotations of each input and average (n times the time)
      "trusted_range": {"pixel_mm": [0.4, 1.0], "noise_sd_hu": [2, 150], "kernels": ["ramp", "hann"]},
                                          # optional: the inputs it was trained and tested on (napari_restore.guard);
                                          # restore() warns outside them
      "training_data": ["..."],           # str or list of str: what it was trained on (+ licences)
      "metrics": {"psnr_gain_db": 0.7},   # free-form dict of numbers measured on held-out data
      "description": "...", "license": "...", "created": "2025-01-01T00:00:00Z"   # optional
    }
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..constants import ENSEMBLE_SIZES, MODALITIES, TASKS
from ..errors import ModelError
from ..intensity import validate_spec

FORMAT_VERSION = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_KNOWN = {"format_version", "name", "version", "task", "modality", "dims", "architecture", "intensity",
          "patch_size", "max_slice_spacing_mm", "self_ensemble", "trusted_range", "training_data", "metrics", "description", "license", "created"}


#: Bounds on a ``card.json``: a real card is a few KiB and nests 3 levels.
MAX_CARD_BYTES = 1024 * 1024
MAX_CARD_DEPTH = 32


def _depth(data: Any) -> int:
    """Nesting depth of parsed JSON (iterative: no recursion on hostile input)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        value, d = todo.pop()
        if isinstance(value, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return deepest

@dataclass
class ModelCard:
    """A validated model card. ``path`` (the weights file) and ``source`` are not serialised."""

    name: str
    version: str
    task: str
    modality: str
    dims: int
    architecture: dict[str, Any]
    intensity: dict[str, Any]
    training_data: Any = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    license: str = ""
    created: str = ""
    patch_size: list[int] | None = None
    max_slice_spacing_mm: float | None = None
    self_ensemble: int = 1
    trusted_range: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    path: Path | None = field(default=None, compare=False, repr=False)
    source: str = field(default="", compare=False)

    def __repr__(self) -> str:
        """One short line (the full card, with its training history, is :meth:`to_dict`)."""
        extra = "".join([f", context={self.context}" if self.context else "",
                         f", self_ensemble={self.self_ensemble}" if self.self_ensemble > 1 else "",
                         f", source={self.source!r}" if self.source else ""])
        return (f"ModelCard(name={self.name!r}, version={self.version!r}, task={self.task!r}, "
                f"modality={self.modality!r}, dims={self.dims}{extra})")

    @classmethod
    def from_dict(cls, data: Any, where: str | Path | None = None) -> "ModelCard":
        """Validate a card dict. Raises :class:`ModelError` naming ``where`` and the problem."""
        def bad(msg: str) -> ModelError:
            return ModelError(f"invalid model card: {msg}", where)

        if not isinstance(data, dict):
            raise bad(f"expected a JSON object, got {type(data).__name__}")
        missing = [k for k in ("name", "version", "task", "modality", "dims", "architecture", "intensity")
                   if k not in data]
        if missing:
            raise bad(f"missing field(s) {missing}")
        fv = data.get("format_version", FORMAT_VERSION)
        if not isinstance(fv, int) or isinstance(fv, bool) or fv < 1:
            raise bad(f"format_version must be a positive integer, got {fv!r}")
        if fv > FORMAT_VERSION:
            raise bad(f"format_version {data['format_version']} is newer than this napari-restore "
                      f"reads ({FORMAT_VERSION})")
        name = data["name"]
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise bad(f"name {name!r} must match {_NAME_RE.pattern}")
        if data["task"] not in TASKS:
            raise bad(f"task {data['task']!r} is not one of {TASKS}")
        modality = data["modality"] if data["modality"] == "any" else str(data["modality"]).upper()
        if modality not in MODALITIES:
            raise bad(f"modality {data['modality']!r} is not one of {MODALITIES}")
        if data["dims"] not in (2, 3):
            raise bad(f"dims must be 2 or 3, got {data['dims']!r}")
        arch = data["architecture"]
        if (not isinstance(arch, dict) or not isinstance(arch.get("name"), str)
                or not isinstance(arch.get("args", {}), dict)):
            raise bad('architecture must be {"name": str, "args": {...}}')
        from ..networks import ARCHITECTURES

        if arch["name"] not in ARCHITECTURES:
            raise bad(f"unknown architecture {arch['name']!r}; only {sorted(ARCHITECTURES)} can be loaded")
        sd = arch.get("args", {}).get("spatial_dims", data["dims"])
        if sd != data["dims"]:
            raise bad(f"dims={data['dims']} but the architecture has spatial_dims={sd}")
        try:
            intensity = validate_spec(data["intensity"], source="card")
        except ModelError as exc:
            raise ModelError(f"invalid model card: {exc}", where) from None
        patch = data.get("patch_size")
        if patch is not None and (not isinstance(patch, list) or len(patch) != data["dims"]
                                  or not all(isinstance(p, int) and p > 0 for p in patch)):
            raise bad(f"patch_size must be a list of {data['dims']} positive ints, got {patch!r}")
        spacing = data.get("max_slice_spacing_mm")
        if spacing is not None and (isinstance(spacing, bool) or not isinstance(spacing, (int, float)) or not spacing > 0):
            raise bad(f"max_slice_spacing_mm must be a positive number (mm), got {spacing!r}")
        ensemble = data.get("self_ensemble", 1)
        if isinstance(ensemble, bool) or ensemble not in ENSEMBLE_SIZES:
            raise bad(f"self_ensemble must be one of {ENSEMBLE_SIZES}, got {ensemble!r}")
        from ..guard import validate_range

        try:
            trusted = validate_range(data.get("trusted_range", {}))
        except ValueError as exc:
            raise bad(str(exc)) from None
        metrics = data.get("metrics", {})
        if not isinstance(metrics, dict):
            raise bad("metrics must be a JSON object")
        return cls(
            name=name, version=str(data["version"]), task=data["task"], modality=modality,
            dims=int(data["dims"]), architecture={"name": arch["name"], "args": dict(arch.get("args", {}))},
            intensity=intensity, training_data=data.get("training_data", ""), metrics=metrics,
            description=str(data.get("description", "")), license=str(data.get("license", "")),
            created=str(data.get("created", "")), patch_size=patch,
            max_slice_spacing_mm=None if spacing is None else float(spacing), self_ensemble=int(ensemble),
            trusted_range=trusted,
            extra={k: v for k, v in data.items() if k not in _KNOWN},
        )

    @classmethod
    def read(cls, path: str | Path) -> "ModelCard":
        """Read and validate a ``card.json``."""
        path = Path(path)
        try:
            if path.stat().st_size > MAX_CARD_BYTES:
                raise ModelError(f"model card is larger than {MAX_CARD_BYTES // 1024} KiB; refused", path)
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelError("model card not found", path) from None
        except RecursionError:
            raise ModelError(f"model card nests deeper than {MAX_CARD_DEPTH} levels; refused", path) from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"model card is not readable JSON ({exc})", path) from None
        if _depth(data) > MAX_CARD_DEPTH:
            raise ModelError(f"model card nests deeper than {MAX_CARD_DEPTH} levels; refused", path)
        return cls.from_dict(data, path)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready dict (``path`` and ``source`` left out)."""
        out = {
            "format_version": self.format_version, "name": self.name, "version": self.version,
            "task": self.task, "modality": self.modality, "dims": self.dims,
            "architecture": self.architecture, "intensity": self.intensity,
            "training_data": self.training_data, "metrics": self.metrics,
            "description": self.description, "license": self.license, "created": self.created,
        }
        if self.patch_size is not None:
            out["patch_size"] = self.patch_size
        if self.max_slice_spacing_mm is not None:
            out["max_slice_spacing_mm"] = self.max_slice_spacing_mm
        if self.self_ensemble != 1:
            out["self_ensemble"] = self.self_ensemble
        if self.trusted_range:
            out["trusted_range"] = self.trusted_range
        out.update(self.extra)
        return out

    @property
    def context(self) -> int:
        """Neighbouring slices per side a 2-D (2.5-D) network reads; 0 for single-slice and 3-D models."""
        return int(self.architecture.get("args", {}).get("context", 0))

    def auto_eligible(self) -> bool:
        """Whether "Auto" may pick this model: it is not worse than its input on its own validation
        data (``psnr_gain_db`` >= 0), and a fine-tuned model beats the model it started from on the
        same validation data (``val_psnr`` > ``val_psnr_init``, else ``val_loss`` < ``val_loss_init``),
        or does less harm than it across the condition matrix (:meth:`less_harm_than_previous`).
        A model that fails is still listed and can be chosen by name."""
        m = self.metrics or {}
        num = lambda k: _is_number(m.get(k))  # noqa: E731
        if num("psnr_gain_db") and m["psnr_gain_db"] < 0:
            return False
        if num("val_psnr") and num("val_psnr_init"):
            return m["val_psnr"] > m["val_psnr_init"] or self.less_harm_than_previous()
        if num("val_loss") and num("val_loss_init"):
            return m["val_loss"] < m["val_loss_init"] or self.less_harm_than_previous()
        return True

    def less_harm_than_previous(self) -> bool:
        """Whether the card's condition matrix (``metrics.condition_matrix``, unseen series x conditions)
        shows this model further from harm than the version it replaces
        (``metrics.previous_version.condition_matrix``, the same cells): less summed loss below the
        input (``harm_db``, dB) and a better worst cell (``worst_gain_over_input_db``). A validation
        set drawn from the training range can miss the mild conditions where a restorer does harm
        (a deblurrer given a sharp image); the matrix has them."""
        m = self.metrics or {}
        previous = m.get("previous_version")
        now, prev = m.get("condition_matrix"), previous.get("condition_matrix") if isinstance(previous, dict) else None
        ok = lambda d: isinstance(d, dict) and all(  # noqa: E731
            _is_number(d.get(k)) for k in ("harm_db", "worst_gain_over_input_db", "cells"))
        if not (ok(now) and ok(prev)) or now["cells"] != prev["cells"]:
            return False
        return now["harm_db"] < prev["harm_db"] and now["worst_gain_over_input_db"] > prev["worst_gain_over_input_db"]

    def version_key(self) -> tuple[int, ...]:
        """``"1.10.2"`` -> ``(1, 10, 2)``; non-numeric parts count as 0."""
        return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.\-+]", self.version))


def _is_number(value: Any) -> bool:
    """A JSON number (``True``/``False`` are not)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


__all__ = ["ModelCard", "TASKS", "MODALITIES", "FORMAT_VERSION"]
