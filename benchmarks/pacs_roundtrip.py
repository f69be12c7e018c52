"""PACS round trip on loopback: retrieve + restore + send of a ~200-slice CT series through a real Orthanc.

The series is the 140-slice Philips head phantom (ct/philips-head-phantom/exam/S2020, 1 mm) extended to
``--slices`` by repeating slices beyond its end (new SOP/Series UIDs, positions continuing at 1 mm), uploaded
through Orthanc's REST API (not timed). Timed stages: retrieve (C-GET and WADO-RS), load, restore (denoise),
write the derived DICOM series, send (C-STORE and STOW-RS). Prints the machine, the input and a table of
seconds per stage and slices/s.

    python benchmarks/pacs_roundtrip.py [--slices 200] [--device cpu]
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
DATA = Path(os.environ.get("NAPARI_RESTORE_SHARED_DATA", REPO.parent / "shared" / "data"))


def make_series(out: Path, n: int) -> list[Path]:
    import numpy as np
    import pydicom
    from pydicom.uid import generate_uid

    src = sorted((DATA / "ct/philips-head-phantom/exam/S2020").glob("I*"))
    heads = [pydicom.dcmread(f) for f in src]
    normal = np.cross(*np.array(heads[0].ImageOrientationPatient, float).reshape(2, 3))
    heads.sort(key=lambda d: float(np.dot(normal, np.array(d.ImagePositionPatient, float))))
    p0 = np.array(heads[0].ImagePositionPatient, float)
    step = (np.array(heads[-1].ImagePositionPatient, float) - p0) / (len(heads) - 1)
    series_uid = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for k in range(n):
        ds = heads[k % len(heads)].copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{v:.4f}" for v in p0 + k * step]
        if "SliceLocation" in ds:
            ds.SliceLocation = f"{float(np.dot(normal, p0 + k * step)):.4f}"
        ds.SeriesDescription = f"PACS BENCH {n}"
        f = out / f"{k:04d}.dcm"
        ds.save_as(f, enforce_file_format=True)
        files.append(f)
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    import napari_restore
    from _orthanc import ORTHANC_AET, Orthanc
    from napari_restore import pacs

    tmp = Path(tempfile.mkdtemp(prefix="pacs_bench_"))
    files = make_series(tmp / "src", args.slices)
    o = Orthanc(tmp / "orthanc").start()
    rows = []
    try:
        o.upload(files)
        os.environ["BENCH_U"], os.environ["BENCH_P"] = o.user, o.password
        s = pacs.Server(name="bench", ae_title=ORTHANC_AET, host="127.0.0.1", port=o.dicom_port,
                        url=f"{o.url}/dicom-web", store_port=o.store_port, username_env="BENCH_U",
                        password_env="BENCH_P", timeout=60)
        import pydicom

        head = pydicom.dcmread(files[0], stop_before_pixels=True)
        study, series = str(head.StudyInstanceUID), str(head.SeriesInstanceUID)

        def stage(name, fn):
            t0 = time.perf_counter()
            value = fn()
            dt = time.perf_counter() - t0
            rows.append((name, dt, args.slices / dt))
            return value

        stage("retrieve C-MOVE", lambda: pacs.get(s, tmp / "move", study=study, series=series, via="move"))
        stage("retrieve WADO-RS", lambda: pacs.get(s, tmp / "wado", study=study, series=series, via="wado"))
        got = stage("retrieve C-GET", lambda: pacs.get(s, tmp / "get", study=study, series=series, via="get"))
        (vol,) = stage("load", lambda: napari_restore.load(got.folder))
        restored = stage("restore (denoise)", lambda: napari_restore.restore(vol, task="denoise", device=args.device))
        out = stage("write DICOM", lambda: napari_restore.save(restored, tmp / "derived", format="dicom"))
        r1 = stage("send C-STORE", lambda: pacs.send(s, out, via="store"))
        o.rest("DELETE", f"/series/{o.series_of(str(pydicom.dcmread(next(Path(out).iterdir())).SeriesInstanceUID))['ID']}")
        r2 = stage("send STOW-RS", lambda: pacs.send(s, out, via="stow"))
        assert r1.stored == r2.stored == args.slices, (r1.summary(), r2.summary())
    finally:
        o.stop()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} threads {torch.get_num_threads()}, device {args.device}")
    print(f"input: {args.slices} slices 512x512 CT (S2020 extended), Orthanc on 127.0.0.1")
    print(f"{'stage':<20} {'seconds':>8} {'slices/s':>9}")
    for name, dt, rate in rows:
        print(f"{name:<20} {dt:8.2f} {rate:9.1f}")
    path = [r for r in rows if r[0] in ("retrieve C-GET", "load", "restore (denoise)", "write DICOM", "send C-STORE")]
    total = sum(r[1] for r in path)
    print(f"{'C-GET..C-STORE':<20} {total:8.2f} {args.slices / total:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
