"""Screenshots of the napari-restore widget in a real napari viewer, for the README.

Opens napari (run it under Xvfb on a headless machine: ``xvfb-run -a python scripts/widget_screenshot.py``),
reads the real body CT series ``ct/siemens-body-j2k`` (Siemens Biograph mCT) from ../shared/data
with the plugin's reader, restores it through the widget with the best installed CT denoiser (the
bundled one; with none installed, a *tiny* test denoiser trained for a few hundred steps with the
recipe of ``tests/_engine_helpers.py``), shows input and result side by side with an ROI, and writes
``docs/widget.png`` (Restore tab) and ``docs/widget_compare.png`` (Compare & measure tab).

Models and settings go to a temporary folder; nothing of the user's is touched.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERIES = "ct/siemens-body-j2k"  # real patient body CT, 20 x 3 mm slices, ~10 HU noise


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default=str(REPO / "docs"), help="folder for widget.png and widget_compare.png")
    ap.add_argument("--steps", type=int, default=300, help="training steps of the tiny demo model")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="napari-restore-shot-"))
    os.environ["NAPARI_RESTORE_CONFIG_DIR"] = str(tmp / "config")
    os.environ["NAPARI_RESTORE_MODELS"] = str(tmp / "models")
    os.environ["NAPARI_CONFIG"] = str(tmp / "napari.yaml")  # leave the user's napari settings alone
    sys.path.insert(0, str(REPO / "tests"))
    from _engine_helpers import TINY_ARGS, _trained_state, save_tiny  # the tests' tiny-model recipe

    import napari
    import numpy as np
    from qtpy.QtWidgets import QApplication

    from napari_restore._napari._reader import read_layers
    from napari_restore.networks import build_network

    from napari_restore.models import find_model

    data = Path(args.data)
    if find_model("denoise", "CT", dims=2) is None:
        t0 = time.perf_counter()
        net = build_network("ResidualUNet", TINY_ARGS)
        net.load_state_dict(_trained_state(str(data), args.steps))
        save_tiny(tmp / "models" / "demo-ct-denoise-2d", net.eval(), name="demo-ct-denoise-2d",
                  description="tiny demo denoiser (8-16 channels) trained for the screenshot; not a clinical model",
                  training_data=f"{args.steps} steps, 60 HU noise on ct/nifti/example_ct_sm.nii.gz slices 0-19")
        print(f"tiny model trained in {time.perf_counter() - t0:.0f} s")

    from napari.settings import get_settings

    get_settings().application.gui_notification_level = "none"  # no toasts over the image
    viewer = napari.Viewer(title="napari-restore")
    for layer_data, kwargs, kind in read_layers(str(data / SERIES)):
        viewer.add_image(layer_data, **kwargs)
    _dock, widget = viewer.window.add_plugin_dock_widget("napari-restore", "Restore")  # as a user opens it
    app = QApplication.instance()
    qt_window = viewer.window._qt_window
    qt_window.resize(1640, 900)

    def wait(cond, timeout=300.0):
        t = time.perf_counter()
        while not cond():
            app.processEvents()
            if time.perf_counter() - t > timeout:
                raise TimeoutError("the widget did not finish in time")
            time.sleep(0.02)

    src = viewer.layers[0]
    mid = src.data.shape[0] // 2
    viewer.dims.set_current_step(0, mid)
    widget.restore_tab.select_layer(src.name)
    widget.state.strength = 0.9
    widget.restore_tab.run_restore()
    wait(lambda: not widget.state.running)
    if widget.last_error:
        raise SystemExit(widget.last_error)
    widget.compare_tab.show_side_by_side(True)
    roi = widget.compare_tab.add_roi_layer("ellipse")
    cy, cx, r = _uniform_spot(np.asarray(src.data[mid], dtype=np.float64))
    roi.add_ellipses(np.array([[mid, cy - r, cx - r], [mid, cy - r, cx + r], [mid, cy + r, cx + r],
                               [mid, cy + r, cx - r]]))
    roi.mode = "pan_zoom"
    roi.visible = True
    viewer.layers.selection.active = viewer.layers[src.name]
    viewer.reset_view()
    viewer.camera.zoom *= 1.3
    for _ in range(20):
        app.processEvents()
        time.sleep(0.02)
    from napari._qt.dialogs.qt_notification import NapariQtNotification

    for toast in qt_window.findChildren(NapariQtNotification):  # e.g. napari's PyQt5 deprecation notice
        toast.hide()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    widget.tabs.setCurrentIndex(0)
    for _ in range(10):
        app.processEvents()
        time.sleep(0.02)
    qt_window.grab().save(str(out_dir / "widget.png"))
    widget.tabs.setCurrentWidget(widget.compare_tab)
    wait(lambda: not widget._roi_timer.isActive())
    rows = widget.compare_tab.update_roi_stats()
    for _ in range(10):
        app.processEvents()
        time.sleep(0.02)
    qt_window.grab().save(str(out_dir / "widget_compare.png"))
    for r in rows:
        print(f"ROI {r.shape + 1}: input {r.mean_in:.1f} +- {r.sd_in:.1f} HU, restored {r.mean_out:.1f} +- "
              f"{r.sd_out:.1f} HU, noise -{r.noise_reduction:.0f} %")
    print("wrote", out_dir / "widget.png", "and", out_dir / "widget_compare.png")
    viewer.close()


def _uniform_spot(plane, r: int = 16):
    """``(y, x, r)``: the centre of the most uniform soft-tissue disc (30..90 HU) in the central 60 %."""
    import numpy as np
    from scipy import ndimage as ndi

    m = ndi.uniform_filter(plane, 2 * r + 1)
    sd = np.sqrt(np.maximum(ndi.uniform_filter(plane * plane, 2 * r + 1) - m * m, 0.0))
    ok = (m > 30) & (m < 90)
    ny, nx = plane.shape
    ok[: int(0.2 * ny)] = ok[int(0.8 * ny):] = False
    ok[:, : int(0.2 * nx)] = ok[:, int(0.8 * nx):] = False
    sd[~ok] = np.inf
    y, x = np.unravel_index(int(np.argmin(sd)), sd.shape)
    return float(y), float(x), float(r)


if __name__ == "__main__":
    main()
