"""The napari dock widget: assembles the Restore, Compare & measure, Export and Fine-tune tabs
around one shared, Qt-free state (:mod:`._state`) and one model catalogue (:mod:`._catalogue`).

Each tab is its own module and talks to the others only through :class:`._state.WidgetEvents`;
every job a person waits for runs through a :class:`._jobs.JobPanel` (progress, ETA, status, Cancel,
errors in the tab's status line and as a notification). Qt comes through ``qtpy`` only.
"""
from __future__ import annotations

from typing import Any

from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QTabWidget, QVBoxLayout, QWidget

from . import _layers as L
from ._catalogue import ModelCatalogue
from ._common import card_html, image_layer_names
from ._compare_tab import CompareTab
from ._export_tab import ExportTab
from ._restore_tab import RestoreTab
from ._state import CompareState, ExportState, RestoreState, TrainState, WidgetEvents, load_settings, save_settings
from ._train_tab import TrainTab

#: state fields that change while a job runs (not worth writing the settings file for)
_TRANSIENT = {"running", "done", "total", "status", "train_loss", "val_loss", "layer"}


def _install_view() -> None:
    """Keep the real viewer upright and open series in their plane (the widget gets a proxy)."""
    try:
        import napari

        from ._view import install

        install(napari.current_viewer())
    except Exception:  # no current viewer (a bare widget in a script)
        pass


class RestoreWidget(QWidget):
    """The napari-restore dock widget: four tabs over one state.

    ``restore_tab``, ``compare_tab``, ``export_tab``, ``train_tab`` hold the controls and their
    public methods (``run_restore``, ``run_preview``, ``show_side_by_side``, ``export_dicom``,
    ``start_training``, ...); ``state``, ``compare_state``, ``export_state``, ``train_state`` are
    the evented state the tabs show.
    """

    def __init__(self, napari_viewer: Any) -> None:
        super().__init__()
        self.viewer = napari_viewer
        _install_view()
        self.state, self.compare_state = RestoreState(), CompareState()
        self.export_state, self.train_state = ExportState(), TrainState()
        self._states = {"restore": self.state, "export": self.export_state, "train": self.train_state}
        load_settings(self._states)
        self.events = WidgetEvents()
        self.catalogue = ModelCatalogue(self.state.extra_models)
        self.restore_tab = RestoreTab(self.viewer, self.state, self.catalogue, self.events)
        self.compare_tab = CompareTab(self.viewer, self.compare_state)
        self.export_tab = ExportTab(self.viewer, self.export_state)
        self.train_tab = TrainTab(self.viewer, self.train_state, self.catalogue, self.events)
        self.tabs = QTabWidget()
        for tab, title in ((self.restore_tab, "Restore"), (self.compare_tab, "Compare && measure"),
                           (self.export_tab, "Export"), (self.train_tab, "Fine-tune")):
            self.tabs.addTab(tab, title)
        self.compare_page = self.compare_tab
        outer = QVBoxLayout(self)
        outer.setContentsMargins(4, 4, 4, 4)
        outer.addWidget(self.tabs)
        self.setMinimumWidth(360)
        self._connect()
        self.refresh_layers()
        self.restore_tab.sync_from_state()
        self.export_tab.sync_from_state()
        self.train_tab.sync_from_state()

    def _connect(self) -> None:
        self.last_error = ""  # the error the last action of any tab ended with ("" after a success)
        for tab in (self.restore_tab, self.export_tab, self.train_tab):
            tab.jobs.running_changed.connect(self._on_job_running)
            tab.jobs.error.connect(self._on_error)
        ev = self.events
        ev.restored.connect(self.compare_tab.on_restored)
        ev.restored.connect(self.export_tab.on_restored)
        ev.models_changed.connect(self.restore_tab.refresh_models)
        ev.models_changed.connect(self.train_tab.refresh_models)
        ev.model_saved.connect(self._select_saved_model)
        self._save_timer = QTimer(self, singleShot=True, interval=300)
        self._save_timer.timeout.connect(lambda: save_settings(self._states))
        self._roi_timer = QTimer(self, singleShot=True, interval=120)
        self._roi_timer.timeout.connect(self.compare_tab.update_roi_stats)
        self.compare_tab.roi_requested.connect(self._schedule_roi)
        self.tabs.currentChanged.connect(self._schedule_roi)
        layers = self.viewer.layers
        for e in (layers.events.inserted, layers.events.removed, layers.events.reordered):
            e.connect(self.refresh_layers)
        layers.selection.events.active.connect(lambda _e=None: self.restore_tab.on_active_layer(
            self.viewer.layers.selection.active))
        self.viewer.dims.events.current_step.connect(self._schedule_roi)
        self.state.events.connect(lambda info: self.restore_tab.on_state_changed(info.signal.name))
        for st in self._states.values():
            st.events.connect(self._on_state_changed)

    # ------------------------------------------------------------------ shared
    def _on_job_running(self, running: bool) -> None:
        if running:
            self.last_error = ""

    def _on_error(self, message: str) -> None:
        self.last_error = message

    def refresh_layers(self, event: Any = None) -> None:
        """The viewer's layers changed: every tab refreshes its layer lists."""
        names = image_layer_names(self.viewer)
        restored = [n for n in names if (L.record_of(self.viewer.layers[n]) or {}).get("source")]
        inserted = getattr(event, "value", None) if getattr(event, "type", "") == "inserted" else None
        meta = (getattr(inserted, "metadata", None) or {}) if inserted is not None else {}
        new_data = inserted is not None and not (L.record_of(inserted) or {}).get("source") and not any(
            k.startswith(L.LAYER_META_KEY + "_") for k in meta) and inserted.name in names
        self.restore_tab.refresh_layers(names, new_data)
        self.compare_tab.refresh_layers(names, restored)
        self.export_tab.refresh_layers(names)
        self.train_tab.refresh_layers(names)
        for n in names:  # follow renames
            ev = self.viewer.layers[n].events.name
            try:
                ev.disconnect(self.refresh_layers)
            except (TypeError, ValueError, RuntimeError):
                pass
            ev.connect(self.refresh_layers)

    def _schedule_roi(self, *_args: Any) -> None:
        """Recompute the ROI statistics soon, when the Compare tab is showing (they cost ~0.1 s)."""
        if self.tabs.currentWidget() is self.compare_tab:
            self._roi_timer.start()

    def _select_saved_model(self, name: str) -> None:
        i = self.restore_tab.model_combo.findData(name)
        if i >= 0:
            self.restore_tab.model_combo.setCurrentIndex(i)

    def _on_state_changed(self, info: Any = None) -> None:
        """A remembered choice changed: write the settings file soon (one write per burst of edits)."""
        if getattr(getattr(info, "signal", None), "name", "") not in _TRANSIENT:
            self._save_timer.start()

    def closeEvent(self, event) -> None:  # noqa: N802 - Qt name
        save_settings(self._states)
        self.train_tab.closing = True  # a running fine-tune deletes its temporary copies when it stops
        for tab in (self.restore_tab, self.export_tab, self.train_tab):
            tab.jobs.cancel()
        self.train_tab.drop_tmp()
        layers = self.viewer.layers
        for e in (layers.events.inserted, layers.events.removed, layers.events.reordered):
            e.disconnect(self.refresh_layers)
        self.viewer.dims.events.current_step.disconnect(self._schedule_roi)
        super().closeEvent(event)


def make_widget(napari_viewer: Any) -> RestoreWidget:
    """npe2 widget factory."""
    return RestoreWidget(napari_viewer)


__all__ = ["RestoreWidget", "make_widget", "card_html"]
