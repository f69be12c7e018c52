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
        self.setMinimumHeight(130)
        self.setSizePolicy(QSizePolicy.Expanding, QSizePolicy.Preferred)

    def set_data(self, train: list[float], val: list[float]) -> None:
        self.train = [float(v) for v in train]
        self.val = [float(v) for v in val]
        self.update()

    def paintEvent(self, event) -> None:  # noqa: N802 - Qt name
        p = QPainter(self)
        p.setRenderHint(QPainter.Antialiasing)
        fg = self.palette().color(self.foregroundRole())
        dim = QColor(fg)
        dim.setAlpha(90)
        r = QRectF(self.rect()).adjusted(44, 10, -10, -22)
        p.setPen(QPen(dim, 1))
        p.drawRect(r)
        values = [v for v in self.train + self.val if v == v and v > 0 and math.isfinite(v)]
        n = max(len(self.train), len(self.val))
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
        p.drawText(QRectF(0, r.top() - 6, 42, 14), Qt.AlignRight, f"{hi:.3g}")
        p.drawText(QRectF(0, r.bottom() - 8, 42, 14), Qt.AlignRight, f"{lo:.3g}")
        p.drawText(QRectF(r.left(), r.bottom() + 4, r.width(), 16), Qt.AlignCenter,
                   f"epoch 1..{n}" + ("  (log scale)" if log else ""))
        # legend
        x = r.right() - 150
        for label, colour in (("train", TRAIN_COLOUR), ("validation", VAL_COLOUR)):
            p.setPen(QPen(colour, 3))
            p.drawLine(QPointF(x, r.top() + 10), QPointF(x + 14, r.top() + 10))
            p.setPen(fg)
            p.drawText(QPointF(x + 18, r.top() + 14), label)
            x += 62
        p.end()
