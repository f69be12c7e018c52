"""A screenshot of the PACS panel with real query results, for docs/pacs.md.

Starts a throw-away Orthanc on 127.0.0.1 (the tests' fixture, ``tests/_orthanc.py``; Debian packages
``orthanc`` and ``orthanc-dicomweb`` from scripts/setup.sh), stores a real CT and a real MR series of
../shared/data in it, configures it as server "orthanc" in a temporary config folder, opens napari
(run under Xvfb: ``xvfb-run -a python scripts/pacs_panel_screenshot.py``), queries through the PACS
dock widget, retrieves the CT series as a layer and writes ``docs/pacs_panel.png``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERIES = ("ct/philips-head-phantom/exam/S2010", "mr/siemens-prisma-jpeg-fragments")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    ap.add_argument("--out", default=str(REPO / "docs" / "pacs_panel.png"), help="the PNG to write")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="napari-restore-pacs-shot-"))
    os.environ["NAPARI_RESTORE_CONFIG_DIR"] = str(tmp / "config")
    os.environ["NAPARI_RESTORE_PACS_CACHE"] = str(tmp / "cache")
    os.environ["NAPARI_CONFIG"] = str(tmp / "napari.yaml")  # leave the user's napari settings alone
    sys.path.insert(0, str(REPO / "tests"))
    from _orthanc import ORTHANC_AET, OUR_AET, Orthanc

    from napari_restore import pacs

    orthanc = Orthanc(tmp / "orthanc").start()
    try:
        for rel in SERIES:
            folder = Path(args.data) / rel
            orthanc.upload(sorted(f for f in folder.iterdir() if f.is_file() and f.name != "DIRFILE"))
        os.environ["SHOT_PACS_USER"], os.environ["SHOT_PACS_PASSWORD"] = orthanc.user, orthanc.password
        pacs.save_server(pacs.Server(name="orthanc", ae_title=ORTHANC_AET, host="127.0.0.1", port=orthanc.dicom_port,
                                     url=f"{orthanc.url}/dicom-web", our_ae_title=OUR_AET,
                                     username_env="SHOT_PACS_USER", password_env="SHOT_PACS_PASSWORD", timeout=10))
        shoot(Path(args.out))
    finally:
        orthanc.stop()


def shoot(out: Path) -> None:
    import napari
    from napari.settings import get_settings
    from qtpy.QtWidgets import QApplication

    get_settings().application.gui_notification_level = "none"  # no toasts over the image
    viewer = napari.Viewer(title="napari-restore")
    dock, panel = viewer.window.add_plugin_dock_widget("napari-restore", "PACS")  # as a user opens it
    dock.setMinimumWidth(620)  # room for the result table's columns
    app = QApplication.instance()
    qt_window = viewer.window._qt_window
    qt_window.resize(1600, 900)

    def wait(timeout: float = 120.0) -> None:
        t = time.perf_counter()
        while panel.jobs.running or time.perf_counter() - t < 0.3:
            app.processEvents()
            if time.perf_counter() - t > timeout:
                raise TimeoutError("the PACS panel did not finish in time")
            time.sleep(0.02)
        if panel.jobs.last_error:
            raise RuntimeError(panel.jobs.last_error)

    panel.server_combo.setCurrentText("orthanc")
    panel.search_button.click()  # everything on the server: the CT and the MR series
    wait()
    ct = next(i for i, r in enumerate(panel.rows) if r.get("Modality") == "CT")
    panel.table.selectRow(ct)
    panel.retrieve_button.click()
    wait()
    layer = viewer.layers[0]
    viewer.dims.set_current_step(0, layer.data.shape[0] // 2)
    viewer.reset_view()
    for _ in range(20):
        app.processEvents()
        time.sleep(0.05)
    out.parent.mkdir(parents=True, exist_ok=True)
    qt_window.grab().save(str(out))
    print(f"wrote {out} ({len(panel.rows)} series listed; status: {panel.jobs.status_label.text()})")
    viewer.close()


if __name__ == "__main__":
    main()
