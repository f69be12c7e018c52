"""A small loss-curve plot drawn with QPainter (no plotting library in the dock widget)."""
from __future__ import annotations

import math

from qtpy.QtCore import QPointF, QRectF, Qt
from qtpy.QtGui import QColor, QPainter, QPainterPath, QPen
from qtpy.QtWidgets import QSizePolicy, QWidget

TRAIN_COLOUR = QColor(80, 170, 255)
VAL_COLOUR = QColor(255, 165, 60)


class CurvePlot(QWidget):
    """Training and validation loss per epoch (log scale when they span over a decade)."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.train: list[float] = []
        self.val: list[float] = []
        self.setMinimumHeight(140)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def set_data(self, train: list[float], val: list[float]) -> None:
        self.train = [float(v) for v in train]
        self.val = [float(v) for v in val]
        self.update()

    def _values(self) -> list[float]:
        return [v for v in self.train + self.val if v == v and v > 0 and math.isfinite(v)]

    def y_labels(self) -> tuple[str, ...]:
        """The texts at the top and bottom of the y axis."""
        values = self._values()
        return (f"{max(values):.3g}", f"{min(values):.3g}") if values else ("",)

    def plot_area(self) -> QRectF:
        """Where the curves are drawn: right of the widest y label, below the legend line."""
        fm = self.fontMetrics()
        left = 8 + max(fm.horizontalAdvance(t) for t in self.y_labels())  # the y labels always fit
        top = fm.height() + 6  # the legend sits above the plot, never on the lines
        return QRectF(self.rect()).adjusted(left, top, -10, -(fm.height() + 8))

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt name
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        fg = self.palette().color(self.foregroundRole())
        dim = QColor(fg)
        dim.setAlpha(90)
        values = self._values()
        n = max(len(self.train), len(self.val))
        fm = p.fontMetrics()
        r = self.plot_area()
        left = r.left()
        p.setPen(QPen(dim, 1))
        p.drawRect(r)
        p.setPen(fg)
        if not values or n == 0:
            p.drawText(r, Qt.AlignCenter, "loss per epoch appears here")
            p.end()
            return
        lo, hi = min(values), max(values)
        log = hi / lo > 10.0
        f = (lambda v: math.log10(v)) if log else (lambda v: v)
        flo, fhi = f(lo), f(hi)
        if fhi - flo < 1e-12:
            flo, fhi = flo - 0.5 * abs(flo or 1), fhi + 0.5 * abs(fhi or 1)

        def pt(i: int, v: float) -> QPointF:
            x = r.left() + (i / max(1, n - 1)) * r.width() if n > 1 else r.center().x()
            y = r.bottom() - (f(v) - flo) / (fhi - flo) * r.height()
            return QPointF(x, y)

        for series, colour in ((self.train, TRAIN_COLOUR), (self.val, VAL_COLOUR)):
            pts = [pt(i, v) for i, v in enumerate(series) if v == v and v > 0]
            if not pts:
                continue
            path = QPainterPath(pts[0])
            for q in pts[1:]:
                path.lineTo(q)
            p.setPen(QPen(colour, 2))
            p.drawPath(path)
            for q in pts:
                p.drawEllipse(q, 2.5, 2.5)
        p.setPen(fg)
        h = fm.height()
        p.drawText(QRectF(0, r.top() - h / 2, left - 4, h), Qt.AlignRight | Qt.AlignVCenter, f"{hi:.3g}")
        p.drawText(QRectF(0, r.bottom() - h / 2, left - 4, h), Qt.AlignRight | Qt.AlignVCenter, f"{lo:.3g}")
        p.drawText(QRectF(r.left(), r.bottom() + 4, r.width(), h + 2), Qt.AlignCenter,
                   f"epoch 1..{n}" + ("  (log scale)" if log else ""))
        # legend, above the plot area
        x, y = r.left(), r.top() - h / 2 - 3
        for label, colour in (("train", TRAIN_COLOUR), ("validation", VAL_COLOUR)):
            p.setPen(QPen(colour, 3))
            p.drawLine(QPointF(x, y), QPointF(x + 14, y))
            p.setPen(fg)
            p.drawText(QPointF(x + 18, y + fm.ascent() / 2 - 1), label)
            x += 24 + fm.horizontalAdvance(label)
        p.end()
