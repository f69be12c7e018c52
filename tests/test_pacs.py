"""PACS query/retrieve/send against a real Orthanc on 127.0.0.1 (DIMSE and DICOMweb), with real CT/MR series.

Orthanc and its DICOMweb plugin come from the Debian packages installed by scripts/setup.sh; a missing
Orthanc or ../shared/data is a failure, not a skip.
"""
from __future__ import annotations

import csv
import http.server
import os
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest

from _orthanc import ORTHANC_AET, OUR_AET, Orthanc, configure_server, free_port

import napari_restore
from napari_restore import pacs
from napari_restore.errors import Cancelled, InputError, PacsError, PartialRetrieveError

CT_DIR = "ct/philips-head-phantom/exam/S2010"  # 28 axial CT slices, 5 mm
MR_DIR = "mr/siemens-prisma-jpeg-fragments"  # 96 MR slices, JPEG lossless


def _files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.iterdir() if f.is_file() and f.name != "DIRFILE")


def _uids(folder: Path) -> tuple[str, str]:
    ds = pydicom.dcmread(_files(folder)[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory, shared_data):
    o = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    try:
        o.upload(_files(shared_data / CT_DIR) + _files(shared_data / MR_DIR))
        yield o
    finally:
        o.stop()


@pytest.fixture()
def server(orthanc, tmp_path, monkeypatch):
    """A configured server named 'test' (config file in tmp, credentials from environment variables)."""
    return configure_server(orthanc, "test", tmp_path, monkeypatch)


def test_config_roundtrip_keeps_no_secret(server, orthanc):
    text = pacs.config_path().read_text()
    assert orthanc.password not in text and "TEST_PACS_PASSWORD" in text
    again = pacs.get_server("test")
    assert again.credentials() == (orthanc.user, orthanc.password)
    assert orthanc.password not in again.describe() and orthanc.password not in repr(again)
    with pytest.raises(InputError, match="exists already"):
        pacs.save_server(again)
    with pytest.raises(InputError, match="no PACS server named 'nope'"):
        pacs.get_server("nope")


@pytest.mark.parametrize("via", ["dimse", "web"])
def test_echo_and_find(server, shared_data, via):
    assert pacs.echo("test", via=via) < 10
    ct_study, ct_series = _uids(shared_data / CT_DIR)
    rows = pacs.find("test", via=via)
    assert {r["Modality"] for r in rows} == {"CT", "MR"}
    ct = pacs.find("test", modality="CT", via=via)
    assert [r["SeriesInstanceUID"] for r in ct] == [ct_series]
    assert ct[0]["StudyInstanceUID"] == ct_study and int(ct[0]["NumberOfSeriesRelatedInstances"]) == 28
    assert pacs.find("test", description="BRAIN", via=via)[0]["SeriesInstanceUID"] == ct_series
    for text in ("brain", "Std Brain*", "*brain 5?M"):  # case-insensitive, by either protocol
        assert [r["SeriesInstanceUID"] for r in pacs.find("test", description=text, via=via)] == [ct_series], text
    date = ct[0]["StudyDate"]
    assert pacs.find("test", modality="CT", date=f"{date}-{date}", via=via)
    assert pacs.find("test", modality="CT", date="19000101-19000102", via=via) == []
    studies = pacs.find("test", level="study", via=via)
    assert ct_study in {r["StudyInstanceUID"] for r in studies}
    assert [r["StudyInstanceUID"] for r in pacs.find("test", level="study", description="plain head", via=via)] \
        == [ct_study]


@pytest.mark.parametrize("via", ["get", "move", "wado"])
def test_retrieve_is_whole_resumable_and_same_geometry(server, shared_data, tmp_path, via):
    study, series = _uids(shared_data / CT_DIR)
    seen = []
    got = pacs.get("test", tmp_path / "ct", study=study, series=series, via=via,
                   progress=lambda d, t: seen.append((d, t)))
    assert (got.expected, got.fetched, got.skipped) == (28, 28, 0) and seen[-1] == (28, 28)
    (ref,) = napari_restore.load(shared_data / CT_DIR)
    (vol,) = napari_restore.load(tmp_path / "ct")
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_array_equal(vol.array, ref.array)
    for f in got.files[::3]:  # resume: delete a few, only those come again
        f.unlink()
    again = pacs.get("test", tmp_path / "ct", study=study, series=series, via=via)
    assert (again.fetched, again.skipped) == (10, 18)


def test_retrieve_compressed_mr(server, shared_data, tmp_path):
    study, series = _uids(shared_data / MR_DIR)
    got = pacs.get("test", tmp_path / "mr", study=study, series=series, via="get")
    assert got.expected == 96 and len(got.files) == 96
    (ref,) = napari_restore.load(shared_data / MR_DIR)
    (vol,) = napari_restore.load(tmp_path / "mr")
    np.testing.assert_allclose(vol.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(vol.array, ref.array)


@pytest.mark.parametrize("via", ["store", "stow"])
def test_restore_and_send_back_derived_series(server, orthanc, shared_data, tmp_path, via):
    study, series = _uids(shared_data / CT_DIR)
    got = pacs.fetch_source(f"pacs://test/{study}/{series}")
    (vol,) = napari_restore.load(got.folder)
    restored = napari_restore.restore(vol, task="denoise", device="cpu")
    out = napari_restore.save(restored, tmp_path / f"derived_{via}", format="dicom")
    result = pacs.send("test", out, via=via)
    assert (result.stored, result.refused) == (28, [])
    derived_uid = str(pydicom.dcmread(next(Path(out).iterdir()), stop_before_pixels=True).SeriesInstanceUID)
    assert derived_uid != series
    info = orthanc.series_of(derived_uid)
    assert info is not None and len(info["Instances"]) == 28
    back = pacs.get("test", tmp_path / "back", study=study, series=derived_uid, via="wado")
    (derived,) = napari_restore.load(back.folder)
    np.testing.assert_allclose(derived.affine, vol.affine, atol=1e-4)
    source_sops = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in got.files}
    for f in back.files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        assert ds.StudyInstanceUID == study and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series
        assert str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID) in source_sops
        assert "DERIVED" in ds.ImageType


def test_server_down_wrong_ae_and_unknown_caller(server, tmp_path):
    down = free_port()
    for kw, pattern in [({"port": down}, "server down: nothing is listening"),
                        ({"ae_title": "WRONG"}, "Called AE title not recognised"),
                        ({"our_ae_title": "STRANGER"}, "may refuse this request from our AE title 'STRANGER'")]:
        s = pacs.Server(**{**server.__dict__, "timeout": 3, **kw})
        with pytest.raises(PacsError, match=pattern):
            pacs.find(s, via="dimse")
    web_down = pacs.Server(**{**server.__dict__, "url": f"http://127.0.0.1:{down}/dicom-web"})
    with pytest.raises(PacsError, match="server down or unreachable") as err:
        pacs.find(web_down, via="web")
    assert "TEST_PACS" not in str(err.value)


def test_http_401_names_no_secret(server, orthanc, monkeypatch):
    monkeypatch.setenv("TEST_PACS_PASSWORD", "wrong-secret")
    with pytest.raises(PacsError, match="HTTP 401 authentication") as err:
        pacs.find("test", via="web")
    assert "wrong-secret" not in str(err.value) and orthanc.password not in str(err.value)
    monkeypatch.delenv("TEST_PACS_PASSWORD")
    with pytest.raises(PacsError, match="TEST_PACS_PASSWORD not set"):
        pacs.find("test", via="web")


@pytest.mark.parametrize("code,pattern", [(403, "HTTP 403 forbidden"), (503, "HTTP 503 server error")])
def test_http_errors_from_a_dicomweb_peer(code, pattern, tmp_path, monkeypatch):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(code)
            self.end_headers()

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    try:
        s = pacs.Server(name="stub", url=f"http://127.0.0.1:{httpd.server_port}/dicom-web", timeout=5)
        with pytest.raises(PacsError, match=pattern):
            pacs.find(s)
    finally:
        httpd.shutdown()
        t.join(5)


def test_cstore_refusal_status_is_reported(shared_data, tmp_path):
    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
    from pynetdicom.sop_class import CTImageStorage

    ae = AE(ae_title="REFUSER")
    ae.add_supported_context(CTImageStorage, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    scp = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda e: 0xA700)])
    try:
        s = pacs.Server(name="refuser", ae_title="REFUSER", host="127.0.0.1", port=port, timeout=5)
        files = _files(shared_data / CT_DIR)[:3]
        with pytest.raises(PacsError, match=r"0 of 3 instances stored, 3 refused .*0xA700.*Out of Resources"):
            pacs.send(s, files)
        assert len(pacs.send(s, files, check=False).refused) == 3
    finally:
        scp.shutdown()


def test_our_move_scp_accepts_only_configured_peers(server, shared_data, tmp_path):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    from napari_restore.pacs.common import FileSink
    from napari_restore.pacs.dimse import _store_scp

    ds = pydicom.dcmread(_files(shared_data / CT_DIR)[0])
    sink = FileSink(tmp_path / "in", {str(ds.SOPInstanceUID)})
    with _store_scp(server, sink.store_event):
        for calling, ok in (("INTRUDER", False), (ORTHANC_AET, True)):
            ae = AE(ae_title=calling)
            ae.add_requested_context(CTImageStorage, str(ds.file_meta.TransferSyntaxUID))
            assoc = ae.associate("127.0.0.1", server.store_port, ae_title=OUR_AET)
            assert assoc.is_established is ok
            if ok:
                assert assoc.send_c_store(ds).Status == 0
                assoc.release()
    assert sink.fetched == 1


def test_cancel_then_resume(server, shared_data, tmp_path):
    study, series = _uids(shared_data / MR_DIR)
    state = {"n": 0}

    def progress(done, total):
        state["n"] = done

    with pytest.raises(Cancelled):
        pacs.get("test", tmp_path / "mr", study=study, series=series, via="wado", progress=progress,
                 cancel=lambda: state["n"] >= 10)
    partial = len(list((tmp_path / "mr").glob("*.dcm")))
    assert 10 <= partial < 96
    got = pacs.get("test", tmp_path / "mr", study=study, series=series, via="wado")
    assert got.skipped == partial and got.fetched == 96 - partial


@pytest.mark.parametrize("via", ["get", "wado"])
def test_orthanc_stopped_mid_retrieve_is_partial_then_resumes(shared_data, tmp_path, monkeypatch, via):
    o = Orthanc(tmp_path / "orthanc").start()
    try:
        o.upload(_files(shared_data / MR_DIR))
        monkeypatch.setenv("U", o.user)
        monkeypatch.setenv("P", o.password)
        s = pacs.Server(name="dying", ae_title=ORTHANC_AET, host="127.0.0.1", port=o.dicom_port,
                        url=f"{o.url}/dicom-web", username_env="U", password_env="P", timeout=5)
        study, series = _uids(shared_data / MR_DIR)

        def progress(done, total):
            if done == 20:
                o.kill()

        t0 = time.monotonic()
        with pytest.raises(PartialRetrieveError, match="not opened as complete") as err:
            pacs.get(s, tmp_path / "mr", study=study, series=series, via=via, progress=progress)
        assert time.monotonic() - t0 < 60
        assert 20 <= err.value.received < err.value.expected == 96
        o.start()  # same storage, same ports: the retrieve resumes
        got = pacs.get(s, tmp_path / "mr", study=study, series=series, via=via)
        assert got.skipped == err.value.received and len(got.files) == 96
    finally:
        o.stop()


def test_cli_pacs_commands(server, orthanc, shared_data, tmp_path, capsys):
    from napari_restore.cli import main

    assert main(["pacs", "add", "cli", "--ae-title", ORTHANC_AET, "--host", "127.0.0.1", "--port",
                 str(orthanc.dicom_port), "--url", f"{orthanc.url}/dicom-web", "--username-env", "TEST_PACS_USER",
                 "--password-env", "TEST_PACS_PASSWORD", "--store-port", str(orthanc.store_port)]) == 0
    assert main(["pacs", "list"]) == 0
    assert main(["pacs", "echo", "cli"]) == 0
    assert main(["pacs", "find", "cli", "--modality", "CT"]) == 0
    out = capsys.readouterr().out
    assert "STD BRAIN 5MM" in out and orthanc.password not in out
    study, series = _uids(shared_data / CT_DIR)
    assert main(["pacs", "get", "cli", "--study", study, "--series", series, str(tmp_path / "got")]) == 0
    assert len(list((tmp_path / "got").glob("*.dcm"))) == 28
    assert main(["restore", f"pacs://cli/{study}/{series}", str(tmp_path / "restored"), "--device", "cpu",
                 "--send-to", "cli", "--send-via", "stow"]) == 0
    assert "28 of 28 instances stored" in capsys.readouterr().out
    assert main(["pacs", "send", "cli", str(tmp_path / "restored")]) == 0  # again: Orthanc keeps one copy
    assert main(["pacs", "echo", "nope"]) == 1


def test_cli_batch_from_pacs_and_send_to(server, orthanc, shared_data, tmp_path, capsys):
    from napari_restore.cli import main

    study, series = _uids(shared_data / CT_DIR)
    out = tmp_path / "batch_out"
    argv = ["batch", f"pacs://test/{study}/{series}", str(out), "--device", "cpu", "--pool", "thread",
            "--readers", "1", "--writers", "1", "--no-progress", "--send-to", "test"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "28 instances" in text and "sent to test: 28 of 28 instances stored" in text
    written = sorted(out.rglob("*.dcm"))
    assert len(written) == 28
    ds = pydicom.dcmread(written[0], stop_before_pixels=True)
    assert ds.StudyInstanceUID == study and ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series
    info = orthanc.series_of(str(ds.SeriesInstanceUID))
    assert info is not None and len(info["Instances"]) == 28
    assert main(argv) == 0  # resumed: nothing retrieved, nothing restored, nothing sent again
    text = capsys.readouterr().out
    assert "28 already there" in text and "nothing sent" in text
    assert main(argv[:-2] + ["--format", "nifti", "--send-to", "test"]) != 0
    assert "--send-to needs DICOM output" in capsys.readouterr().err


def test_cli_batch_over_a_whole_study(shared_data, tmp_path, monkeypatch, capsys):
    """``batch pacs://NAME/STUDY``: every image series of the study restored and sent back; the
    localizer and the secondary-capture summary skipped and named; each series' guard warning named
    with its series, none escaping on stderr; --no-progress draws no bar."""
    from napari_restore.cli import main

    exam = shared_data / "ct" / "philips-head-phantom" / "exam"  # localizer, 5 mm, 1 mm, exam summary
    files = [f for d in ("S1000", "S2010", "S2020", "S4010") for f in _files(exam / d)]
    study = _uids(exam / "S2010")[0]
    assert {_uids(exam / d)[0] for d in ("S1000", "S2020", "S4010")} == {study}
    o = Orthanc(tmp_path / "orthanc").start()
    try:
        assert o.upload(files) == len(files) == 175
        configure_server(o, "test", tmp_path, monkeypatch)
        out = tmp_path / "out"
        argv = ["batch", f"pacs://test/{study}", str(out), "--device", "cpu", "--pool", "thread",
                "--readers", "1", "--writers", "1", "--no-progress", "--send-to", "test"]
        assert main(argv) == 0
        cap = capsys.readouterr()
        assert "175 instances" in cap.out and "skipped 1 localizer series" in cap.out
        assert "skipped 1 secondary-capture series" in cap.out
        assert "sent to test: 140 of 140 instances stored" in cap.out and "sent to test: 28 of 28" in cap.out
        assert "warning:" not in cap.err and "%|" not in cap.err + cap.out  # no stray warning, no bar
        rows = list(csv.DictReader(open(out / "manifest.csv", newline="")))
        assert sorted(int(r["slices"]) for r in rows) == [28, 140] and {r["status"] for r in rows} == {"done"}
        for r in rows:  # both thin-noise phantom series are below the CT model's trusted noise range
            assert "outside the range it was trained" in r["warnings"]
            assert f"WARNING {r['input']}: {r['warnings']}" in cap.out
            assert f"({r['slices']}x512x512) " in cap.out and "(1 warning)" in cap.out
        for sources in (_files(exam / "S2010"), _files(exam / "S2020")):
            src = pydicom.dcmread(sources[0], stop_before_pixels=True)
            derived = [p for p in out.rglob("*.dcm")
                       if pydicom.dcmread(p, stop_before_pixels=True).ReferencedSeriesSequence[0].SeriesInstanceUID
                       == src.SeriesInstanceUID]
            assert len(derived) == len(sources)
            ds = pydicom.dcmread(derived[0], stop_before_pixels=True)
            assert ds.StudyInstanceUID == study and ds.SeriesInstanceUID != src.SeriesInstanceUID
            info = o.series_of(str(ds.SeriesInstanceUID))
            assert info is not None and len(info["Instances"]) == len(sources)
    finally:
        o.stop()
