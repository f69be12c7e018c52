"""Small Qt helpers shared by the tabs: notifications, hint labels, buttons, collapsible sections,
filling a layer combo box, and the model card as HTML.

Layers are always named, never compared by identity: a plugin widget gets napari's
public-only viewer proxy, which hands out a new wrapper object on every access.
"""
from __future__ import annotations

from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QLabel, QPushButton, QToolButton, QVBoxLayout, QWidget

from ..errors import RestoreError

ACCENT = "#2b7bd6"
HINT_STYLE = "color: #9aa4ae; font-size: 11px;"
ERROR_STYLE = "color: #ff8a80; font-size: 11px;"


def notify(kind: str, message: str) -> None:
    """A napari notification: ``kind`` is ``"error"``, ``"warning"`` or ``"info"``."""
    from napari.utils import notifications as n

    {"error": n.show_error, "warning": n.show_warning, "info": n.show_info}[kind](message)


def error_text(exc: BaseException) -> str:
    """Our errors carry a message meant for people; anything else gets its type named."""
    if isinstance(exc, RestoreError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"


def hint(text: str = "") -> QLabel:
    """A small grey word-wrapped label."""
    lab = QLabel(text)
    lab.setWordWrap(True)
    lab.setStyleSheet(HINT_STYLE)
    return lab


def primary(button: QPushButton) -> QPushButton:
    """Style ``button`` as the tab's main action."""
    button.setStyleSheet(f"QPushButton {{ background-color: {ACCENT}; color: white; font-weight: bold;"
                         " padding: 5px 10px; border-radius: 3px; }"
                         " QPushButton:disabled { background-color: #4a5562; color: #a0a8b0; }")
    return button


class Section(QWidget):
    """A collapsible section: a flat tool button with an arrow, and a body shown when open."""

    def __init__(self, title: str, body: QWidget, expanded: bool = False) -> None:
        super().__init__()
        self.button = QToolButton(text=title, checkable=True, checked=expanded)
        self.button.setToolButtonStyle(Qt.ToolButtonTextBesideIcon)
        self.button.setStyleSheet("QToolButton { border: none; font-weight: bold; }")
        self.button.setArrowType(Qt.DownArrow if expanded else Qt.RightArrow)
        self.body = body
        body.setVisible(expanded)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.button)
        lay.addWidget(body)
        self.button.toggled.connect(self._toggle)

    def set_title(self, title: str) -> None:
        self.button.setText(title)

    def _toggle(self, on: bool) -> None:
        self.button.setArrowType(Qt.DownArrow if on else Qt.RightArrow)
        self.body.setVisible(on)


def fill_combo(combo: QComboBox, items: list[str], target: str | None = None) -> None:
    """Replace ``combo``'s items without emitting signals; select ``target``, else keep the current
    text, else the first item."""
    current = combo.currentText()
    combo.blockSignals(True)
    try:
        combo.clear()
        combo.addItems(items)
        if target not in items:
            target = current if current in items else (items[0] if items else "")
        combo.setCurrentText(target or "")
    finally:
        combo.blockSignals(False)


def image_layer_names(viewer: Any, previews: bool = False) -> list[str]:
    """The names of the viewer's image layers (without ``[preview]`` layers unless asked)."""
    from napari.layers import Image

    return [lay.name for lay in viewer.layers if isinstance(lay, Image)
            and (previews or not lay.name.endswith("[preview]"))]


def layer_named(viewer: Any, name: str | None) -> Any:
    """The layer called ``name``, or None."""
    if not name or name not in viewer.layers:
        return None
    return viewer.layers[name]


def card_html(card: Any) -> str:
    """The model card as a short HTML summary (tooltip and info box)."""
    if card is None:
        return ""
    metrics = ", ".join(f"{k} {v}" for k, v in (card.metrics or {}).items() if isinstance(v, (int, float)))
    data = card.training_data if isinstance(card.training_data, str) else "; ".join(map(str, card.training_data or []))
    rows = [f"<b>{card.name}</b> v{card.version} &middot; {card.task} &middot; {card.modality} &middot; {card.dims}-D",
            card.description, f"<i>trained on:</i> {data}" if data else "",
            f"<i>validation:</i> {metrics}" if metrics else "", f"<i>licence:</i> {card.license}" if card.license else "",
            f"<i>from:</i> {card.source or 'file'} {card.path.parent if card.path else ''}"]
    return "<br>".join(r for r in rows if r)


def card_title(card: Any) -> str:
    """One line naming a model (the collapsed card section's title)."""
    return f"{card.name} v{card.version} · {card.dims}-D · {card.modality}" if card is not None else "Model"
