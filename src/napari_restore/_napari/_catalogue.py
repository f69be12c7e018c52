"""The model catalogue the widget shows (Qt-free, unit-tested): installed models, models the user
loaded from a folder or a MONAI bundle, the choices per task and modality, what "Auto" picks,
and the models a fine-tune can start from.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import RestoreError
from ._state import AUTO_MODEL


@dataclass(frozen=True)
class ModelChoice:
    """One entry of a model list: the value the state stores, the text shown, and the card."""

    key: str
    label: str
    card: Any


def model_label(card: Any) -> str:
    """``"name v1.2 (2D, CT)"``."""
    return f"{card.name} v{card.version} ({card.dims}D{', ' + card.modality if card.modality != 'any' else ''})"


class ModelCatalogue:
    """Installed models plus the ones loaded by path (``extra_models``: folders / files / bundles).

    ``extra_models`` starts as the list the restore state persists; :meth:`add_path` appends to it
    and the Restore tab writes the new list back to the state.
    """

    def __init__(self, extra_models: list[str] | None = None) -> None:
        self.extra_models: list[str] = list(extra_models or [])
        self.bundles: dict[str, Any] = {}  # path -> loaded MONAI bundle (a LoadedModel)

    # ------------------------------------------------------------------ cards
    def all_cards(self) -> list[Any]:
        """Every installed card, then the loaded ones (an unreadable extra path is skipped)."""
        from .. import list_models
        from ..models import read_card
        from ..models.bundle import is_bundle, read_bundle_card

        cards = list(list_models())
        for p in list(self.extra_models):
            try:
                if p in self.bundles:
                    cards.append(self.bundles[p].card)
                elif is_bundle(p):  # a MONAI bundle loaded in an earlier session: its card, weights later
                    cards.append(read_bundle_card(p))
                else:
                    cards.append(read_card(p, source="loaded"))
            except (RestoreError, TypeError):  # moved, deleted or not a path: skipped
                continue
        return cards

    def key_of(self, card: Any) -> str:
        """What the state stores for ``card``: an installed model's name, else its path."""
        if card.path is not None:
            for p in self.extra_models:
                if Path(card.path) == Path(p) or Path(card.path).is_relative_to(p):
                    return p
        if card.source in ("loaded", "") and card.path is not None:
            return str(card.path.parent if card.path.name == "model.pt" else card.path)
        return card.name

    def choices(self, task: str, modality: str) -> list[ModelChoice]:
        """The models for ``task`` that suit ``modality`` (all of them for an unknown modality)."""
        out = []
        for c in self.all_cards():
            if c.task == task and (modality not in ("CT", "MR") or c.modality in (modality, "any")):
                out.append(ModelChoice(self.key_of(c), model_label(c), c))
        return out

    def add_path(self, path: str | Path) -> tuple[str, Any]:
        """Load a model folder / file or a MONAI bundle folder; returns ``(key, card)``.

        Raises:
            ModelError: not a model (the message names the file and the problem).
        """
        from ..models import read_card

        from ..models.bundle import is_bundle, load_bundle

        path = Path(path)
        key = str(path)
        if is_bundle(path):
            loaded = load_bundle(path)
            self.bundles[key] = loaded
            card = loaded.card
        else:
            card = read_card(path, source="loaded")
        if key not in self.extra_models:
            self.extra_models.append(key)
        return key, card

    def model_arg(self, key: str) -> Any:
        """The ``model=`` argument of :func:`napari_restore.restore` for a stored key."""
        if key == AUTO_MODEL:
            return None
        return self.bundles.get(key, key)  # a bundle of an earlier session: its path (load_model reads bundles)

    # ------------------------------------------------------------------ auto
    @staticmethod
    def auto_card(task: str, modality: str, mode: str, slice_distance: float | None) -> Any:
        """The model "Auto" runs (None for the ``restore`` pipeline or when none is installed)."""
        if task == "restore":
            return None
        from ..models import find_model

        return find_model(task, modality if modality in ("CT", "MR") else "any", 3 if mode == "3d" else 2,
                          slice_distance)

    def auto_note(self, task: str, modality: str, mode: str, slice_distance: float | None,
                  n_models: int) -> tuple[str, str, bool]:
        """What the model card box says for "Auto": ``(html, one-line title, open the box)``."""
        from ._common import card_html, card_title

        if n_models == 0 and task == "enhance":
            return ("No trained enhance model installed: a classical noise-aware unsharp mask is used.",
                    "Classical unsharp mask", False)
        if n_models == 0:
            return (f"<b>No trained {task} model for {modality} is installed.</b> Train one in the Fine-tune tab, "
                    "or Load model...", "No model installed", True)
        best = self.auto_card(task, modality, mode, slice_distance)
        if best is None:
            return f"The best of {n_models} installed model(s) for the task, modality and mode.", "Auto", False
        return "Auto picks " + card_html(best), "Auto: " + card_title(best), False

    def context_slices(self, key: str, task: str, modality: str, slice_distance: float | None,
                       cards: dict[str, Any]) -> int:
        """Neighbouring slices per side the chosen 2-D model(s) read (2.5-D models; 0 otherwise)."""
        if key != AUTO_MODEL:
            chosen = [cards.get(key)]
        elif task == "restore":
            from ..constants import PIPELINE
            from ..models import find_model

            m = modality if modality in ("CT", "MR") else "any"
            chosen = [find_model(t, m, 2, slice_distance) for t in PIPELINE]
        else:
            chosen = [self.auto_card(task, modality, "2d", slice_distance)]
        return max([c.context for c in chosen if c is not None], default=0)

    # ------------------------------------------------------------------ fine-tune
    def base_choices(self, task: str, modality: str, every_modality: bool = False) -> list[ModelChoice]:
        """2-D models a fine-tune can start from: the layer's modality first; others only when
        ``every_modality`` (a CT model is no start for MR data)."""
        try:
            cards = [c for c in self.all_cards() if c.task == task and c.dims == 2]
        except RestoreError:
            return []
        known = modality in ("CT", "MR")
        same = [c for c in cards if not known or c.modality in (modality, "any")]
        other = [c for c in cards if known and c.modality not in (modality, "any")] if every_modality else []
        out = []
        for c in same + other:
            key = self.key_of(c)
            out.append(ModelChoice(key, f"{c.name} v{c.version}" + (f" ({c.modality})" if c in other else ""), c))
        return out
