"""Model registry: bundled and user models, safe loading, atomic saving.

A model is a folder ``<name>/`` holding ``card.json`` (see :mod:`napari_restore.models.card` for
the schema) and ``model.pt`` (a plain ``state_dict``), or a pair of files ``<stem>.json`` +
``<stem>.pt`` side by side. Models are looked up in

1. the bundled folder ``napari_restore/models/`` (the trained models that ship with the package), and
2. the user folder: ``$NAPARI_RESTORE_MODELS`` (several folders separated by ``os.pathsep``),
   default ``~/.napari-restore/models``.

Card JSON schema (full description in :mod:`napari_restore.models.card`): ``name``, ``version``,
``task`` (denoise | deblur | enhance | restore), ``modality`` (CT | MR | any), ``dims`` (2 | 3),
``architecture`` ``{"name": "ResidualUNet", "args": {...}}``, ``intensity`` (the mapping of
:mod:`napari_restore.intensity`, e.g. ``{"kind": "ct", "center": 0, "scale": 512,
"clip": [-1024, 3071]}``), optional ``patch_size``, ``max_slice_spacing_mm``, ``self_ensemble``,
``training_data``, ``metrics``, ``description``, ``license``, ``created``, ``format_version`` (1).

Loading is safe: weights are read with ``torch.load(..., weights_only=True)`` (no pickle code
runs), only whitelisted architectures are built, and the state dict must match exactly.
Anything else is refused with a :class:`~napari_restore.errors.ModelError`.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelError
from ..constants import MODALITIES, TASKS
from .card import ModelCard

BUNDLED_DIR = Path(__file__).resolve().parent
CARD_NAME, WEIGHTS_NAME = "card.json", "model.pt"
DEFAULT_USER_DIR = "~/.napari-restore/models"


def user_model_dirs() -> list[Path]:
    """The user model folders: ``$NAPARI_RESTORE_MODELS`` or ``~/.napari-restore/models``."""
    value = os.environ.get("NAPARI_RESTORE_MODELS") or DEFAULT_USER_DIR
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p]


def _resolve_files(path: Path) -> tuple[Path, Path]:
    """``(card.json, weights.pt)`` of a model folder, a card file or a weights file."""
    if path.is_dir():
        return path / CARD_NAME, path / WEIGHTS_NAME
    if not path.exists() and path.suffix not in (".json", ".pt", ".pth"):
        raise ModelError("no such model folder or file", path)
    if path.suffix == ".json":
        return path, path.parent / WEIGHTS_NAME if path.name == CARD_NAME else path.with_suffix(".pt")
    if path.suffix in (".pt", ".pth"):
        card = path.parent / CARD_NAME if path.name == WEIGHTS_NAME else path.with_suffix(".json")
        return card, path
    raise ModelError("not a model: expected a folder with card.json + model.pt, or a .json/.pt pair", path)


def read_card(path: str | os.PathLike, source: str = "path") -> ModelCard:
    """Read the card of the model at ``path`` (folder, ``.json`` or ``.pt``) without the weights."""
    card_path, weights = _resolve_files(Path(path))
    card = ModelCard.read(card_path)
    card.path, card.source = weights, source
    return card


def _scan(folder: Path, source: str) -> list[ModelCard]:
    cards: list[ModelCard] = []
    if not folder.is_dir():
        return cards
    for entry in sorted(folder.iterdir()):
        candidate = None
        if entry.is_dir() and (entry / CARD_NAME).is_file():
            candidate = entry
        elif entry.is_file() and entry.suffix == ".json" and entry.with_suffix(".pt").is_file():
            candidate = entry
        if candidate is None:
            continue
        try:
            card = read_card(candidate, source)
        except ModelError as exc:
            warnings.warn(f"skipping model: {exc}", RuntimeWarning, stacklevel=3)
            continue
        if not card.path.is_file():
            warnings.warn(f"skipping model {card.name!r}: weights file missing at {card.path}",
                          RuntimeWarning, stacklevel=3)
            continue
        cards.append(card)
    return cards


def list_models(task: str | None = None, modality: str | None = None) -> list[ModelCard]:
    """Installed models (bundled first, then user folders), optionally filtered.

    Args:
        task: keep only this task (``"denoise"``, ``"deblur"``, ``"enhance"``, ``"restore"``).
        modality: keep models for this modality (or for ``"any"``).

    A broken card in a user folder is skipped with a ``RuntimeWarning`` naming the file.
    """
    cards = _scan(BUNDLED_DIR, "bundled")
    for folder in user_model_dirs():
        cards += _scan(folder, "user")
    if task is not None:
        cards = [c for c in cards if c.task == task]
    if modality is not None:
        m = modality.upper()
        cards = [c for c in cards if c.modality in (m, "any")]
    return cards


def find_model(task: str, modality: str, dims: int | None = None,
               slice_spacing_mm: float | None = None) -> ModelCard | None:
    """The best installed model for ``task`` and ``modality`` (and ``dims``), or ``None``.

    ``slice_spacing_mm``: the volume's slice step. A model whose card sets ``max_slice_spacing_mm``
    (e.g. a 2.5-D model, which averages across slices) is only picked for slices at most that far
    apart, and never when the spacing is not given.
    Preference: exact modality over ``"any"``, then a model made for this slice spacing over a
    general one, then the highest version, then a user model over a bundled one. A volume of
    unknown modality (``"OT"``) only matches ``"any"`` models. A model worse than its input on its
    validation, or a fine-tune that does not beat the model it started from, is never picked
    (:meth:`ModelCard.auto_eligible`).
    """
    cards = [c for c in list_models(task=task) if c.modality in (modality.upper(), "any") and c.auto_eligible()]
    if dims is not None:
        cards = [c for c in cards if c.dims == dims]
    cards = [c for c in cards if c.max_slice_spacing_mm is None
             or (slice_spacing_mm is not None and abs(slice_spacing_mm) <= c.max_slice_spacing_mm * 1.001)]  # header rounding
    if not cards:
        return None
    return max(cards, key=lambda c: (c.modality != "any", c.max_slice_spacing_mm is not None, c.version_key(),
                                     c.source == "user"))


@dataclass
class LoadedModel:
    """A model ready to run: its card and the network (eval mode, on ``device``)."""

    card: ModelCard
    network: Any  # torch.nn.Module

    @property
    def name(self) -> str:
        return self.card.name


def _lookup(name: str) -> ModelCard:
    matches = [c for c in list_models() if c.name == name]
    if not matches:
        folders = ", ".join(str(p) for p in [BUNDLED_DIR, *user_model_dirs()])
        raise ModelError(f"no installed model is named {name!r} (looked in {folders}); "
                         "pass the path of a model folder (card.json + model.pt) instead")
    return max(matches, key=lambda c: (c.version_key(), c.source == "user"))


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``state_dict`` safely (``weights_only=True``); refuses anything else."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise ModelError("weights file not found", path)
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": we refuse it anyway
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code payloads, RuntimeError/EOFError if truncated
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"refused to load the weights: not a plain tensor state dict, or corrupt "
                         f"({type(exc).__name__}: {first[:300]})", path) from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise ModelError("the weights file does not hold a state dict (str -> tensor)", path)
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise ModelError(f"weight {key!r} holds NaN or infinite values", path)
    return state


def build_from_card(card: ModelCard, state: dict[str, Any] | None = None):
    """Build the card's network (whitelisted only) and load ``state`` into it exactly."""
    from ..networks import build_network

    where = card.path
    try:
        net = build_network(card.architecture["name"], card.architecture.get("args", {}))
    except ModelError as exc:
        raise ModelError(str(exc), where) from None
    if state is not None:
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())
            raise ModelError(f"the weights do not fit the card's architecture: {detail[:600]}", where) from None
    return net


def load_model(name_or_path: str | os.PathLike | ModelCard, device: str = "cpu") -> LoadedModel:
    """Load an installed model by name, or a model folder / ``.json`` / ``.pt`` by path.

    Args:
        name_or_path: an installed model's name (see :func:`list_models`), a path, or a card.
        device: torch device for the network (``"cpu"``, ``"cuda"``, ...).

    Raises:
        ModelError: unknown name, missing files, invalid card, unknown architecture, a weights
            file that is not a plain state dict (e.g. a pickle with code), or weights that do
            not match the architecture.
    """
    if isinstance(name_or_path, ModelCard):
        card = name_or_path
        if card.path is None:
            raise ModelError(f"model card {card.name!r} has no weights path")
    else:
        path = Path(name_or_path)
        if path.is_dir() and (path / "configs" / "metadata.json").is_file():  # a MONAI bundle
            from .bundle import load_bundle

            return load_bundle(path, device=device)
        looks_like_path = path.exists() or path.suffix in (".json", ".pt", ".pth") or len(path.parts) > 1
        card = read_card(path) if looks_like_path else _lookup(str(name_or_path))
    net = build_from_card(card, load_weights(card.path))
    net.eval().to(device)
    return LoadedModel(card, net)


def save_model(network, card: dict[str, Any] | ModelCard, folder: str | os.PathLike,
               overwrite: bool = False) -> Path:
    """Save ``network``'s weights and its card as a model folder, atomically.

    The card's ``architecture`` is filled from the network (a whitelisted one) when absent and
    must match it when given; the saved weights are checked to load back before the folder
    appears. Returns the folder.

    Raises:
        ModelError: invalid card or a network that is not whitelisted / does not match.
        OutputError: the folder exists (without ``overwrite``) or cannot be written.
    """
    import torch

    from ..io.atomic import atomic_dir
    from ..networks import build_network, network_spec

    folder = Path(folder)
    data = card.to_dict() if isinstance(card, ModelCard) else dict(card)
    spec = network_spec(network)
    given = data.get("architecture")
    if given is not None:  # compared as built: arguments left at their defaults match
        try:
            same = given["name"] == spec["name"] and build_network(given["name"], given.get("args")).config == spec["args"]
        except (KeyError, TypeError, ModelError):
            same = False
        if not same:
            raise ModelError(f"the card's architecture {given} does not match the network {spec}", folder)
    data["architecture"] = spec
    data.setdefault("dims", spec["args"]["spatial_dims"])
    valid = ModelCard.from_dict(data, folder)
    state = {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()}
    build_from_card(valid, state)  # must load back
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        (tmp / CARD_NAME).write_text(json.dumps(valid.to_dict(), indent=2) + "\n", encoding="utf-8")
        torch.save(state, tmp / WEIGHTS_NAME)
    return folder


__all__ = ["ModelCard", "LoadedModel", "list_models", "find_model", "load_model", "save_model", "read_card",
           "load_weights", "build_from_card", "user_model_dirs", "BUNDLED_DIR", "TASKS", "MODALITIES"]
