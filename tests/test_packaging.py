"""Packaging: a light core install, its metadata, the public names, and the wheel in a core-only environment.

The wheel check (``test_wheel_runs_in_a_core_only_environment``) builds the wheel with
``pip wheel --no-deps``, makes a fresh venv without system site packages, installs the wheel with
``--no-deps`` and links in only the distributions its core ``Requires-Dist`` pull in
(``scripts/core_env.py``; no network needed), then runs the CLI, the MONAI transforms and a tiny
training there: napari, Qt, magicgui, npe2, TensorBoard and matplotlib are not importable in it.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import core_env  # noqa: E402

GUI_AND_PLOTS = ("napari", "npe2", "magicgui", "qtpy", "PyQt5", "tensorboard", "matplotlib")


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def test_import_is_light_and_public_names_are_visible():
    code = ("import sys, napari_restore as n\n"
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'import pulled in torch'\n"
            "names = dir(n)\n"
            "assert 'restore' in names and 'list_models' in names, names\n"
            "assert set(n.__all__) <= set(names)\n"
            "assert 'torch' not in sys.modules\n"
            "from napari_restore import restore, list_models\n"
            "assert callable(restore) and callable(list_models)\n"
            "print(n.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    import napari_restore

    assert out.stdout.strip() == napari_restore.__version__
    # type checkers and IDEs: the lazy names are imported under TYPE_CHECKING
    init = (REPO / "src" / "napari_restore" / "__init__.py").read_text(encoding="utf-8")
    assert "if TYPE_CHECKING:" in init and "from .inference import restore" in init
    assert "from .models import list_models" in init
    assert (REPO / "src" / "napari_restore" / "py.typed").is_file()


def test_pyproject_metadata():
    meta = _pyproject()
    project = meta["project"]
    assert project["license"] == "BSD-3-Clause" and project["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in project["classifiers"])  # deprecated with SPDX
    assert {"Programming Language :: Python :: 3.10", "Programming Language :: Python :: 3.11"} <= set(project["classifiers"])
    assert {"Homepage", "Documentation", "Source", "Issues"} <= set(project["urls"])
    assert project["dynamic"] == ["version"]  # single source: napari_restore.__version__
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "napari_restore.__version__"}
    core = {core_env.canon(r.split(";")[0].split(">")[0].split("=")[0].split("[")[0]) for r in project["dependencies"]}
    assert not core & {core_env.canon(n) for n in GUI_AND_PLOTS}, core
    extras = project["optional-dependencies"]
    for name in ("napari", "qt", "train", "pacs", "figures", "benchmark", "docs", "all", "testing"):
        assert name in extras, name
    assert any(r.startswith("qtpy") for r in extras["napari"]) and any(r.startswith("tensorboard") for r in extras["train"])
    assert any(r.startswith("bm3d") for r in extras["benchmark"])
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["napari_restore"]
    setup = (REPO / "scripts" / "setup.sh").read_text(encoding="utf-8")
    assert '".[all,testing,docs,benchmark]"' in setup  # make setup installs everything the tests use


def test_figures_without_matplotlib_name_the_extra(monkeypatch):
    from napari_restore import figures

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(figures.MissingExtraError, match=r"napari-restore\[figures\]"):
        figures.pyplot()


def test_sdist_ships_no_tests(tmp_path):
    subprocess.run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "-o", str(tmp_path), str(REPO)],
                   check=True, capture_output=True)
    (sdist,) = tmp_path.glob("napari_restore-*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
    assert not [n for n in names if "/tests/" in n], "the sdist ships tests that need ../shared/data"
    assert any(n.endswith("/LICENSE") for n in names) and any(n.endswith("/CHANGELOG.md") for n in names)
    assert any(n.endswith("napari_restore/py.typed") for n in names)


@pytest.mark.slow
def test_wheel_runs_in_a_core_only_environment(shared_data, tmp_path):
    wheel = core_env.build_wheel(tmp_path / "wheel")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    for must in ("napari_restore/py.typed", "napari_restore/napari.yaml", "napari_restore/models/denoise-ct/model.pt"):
        assert must in names, must
    assert not [n for n in names if n.startswith("tests/")]
    info = core_env.make_core_env(wheel, tmp_path / "env")
    fields = info["fields"]
    assert fields["License-Expression"] == "BSD-3-Clause" and "License ::" not in fields["Classifiers"]
    assert not set(info["core"]) & {core_env.canon(n) for n in GUI_AND_PLOTS}, sorted(info["core"])
    py, bindir = Path(info["python"]), Path(info["python"]).parent

    def run(*cmd: str, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=tmp_path, timeout=600, **kw)
        assert out.returncode == 0, f"{cmd}\n{out.stdout}\n{out.stderr}"
        return out

    probe = run(py, "-c", "import sys, importlib.util as u, napari_restore as n\n"
                "assert 'torch' not in sys.modules\n"
                f"print([m for m in {GUI_AND_PLOTS!r} if u.find_spec(m)])\n"
                "print(n.__file__)")
    missing, where = probe.stdout.strip().splitlines()
    assert missing == "[]", missing
    assert where.startswith(str(tmp_path / "env")), where  # the wheel's copy, not the checkout

    ct = shared_data / "ct" / "nifti" / "example_ct_sm.nii.gz"
    out = run(bindir / "napari-restore", "restore", ct, tmp_path / "restored.nii.gz", "--device", "cpu")
    assert "wrote" in out.stdout and (tmp_path / "restored.nii.gz").is_file()
    mr = shared_data / "mr" / "nifti" / "T1.nii.gz"
    run(bindir / "napari-restore", "restore", mr, tmp_path / "mr.nii.gz", "--modality", "MR", "--device", "cpu")

    # the MONAI transforms, in a MONAI pipeline, on the core alone
    script = ("import sys, numpy as np\n"
              "from monai.transforms import Compose, LoadImaged\n"
              "from napari_restore.transforms import Denoised\n"
              f"d = Compose([LoadImaged('image', ensure_channel_first=True), Denoised('image', modality='CT', device='cpu')])"
              f"({{'image': {str(ct)!r}}})\n"
              "img = d['image']\n"
              "assert img.shape[0] == 1 and np.isfinite(np.asarray(img)).all()\n"
              "print(tuple(img.shape))\n")
    run(py, "-c", script)

    # a MONAI bundle exported and run by MONAI's own runner, on the core alone
    run(bindir / "napari-restore", "export-bundle", "denoise-ct", tmp_path / "bundle")
    (tmp_path / "bundle-in").mkdir()
    (tmp_path / "bundle-in" / ct.name).symlink_to(ct)
    run(py, "-m", "monai.bundle", "run", "--config_file", tmp_path / "bundle" / "configs" / "inference.json",
        "--dataset_dir", tmp_path / "bundle-in", "--output_dir", tmp_path / "bundle-out")
    assert (tmp_path / "bundle-out" / "example_ct_sm_denoise.nii.gz").is_file()

    # training works without TensorBoard: the CSV log only, and a message naming the extra
    model = tmp_path / "tiny-model"
    tr = run(bindir / "napari-restore", "train", ct, "-o", model, "--val-data",
             shared_data / "ct" / "nifti" / "cta_aorta_cropped.nii.gz", "--channels", "8,16", "--res-units", "0",
             "--patch-size", "32,32", "--batch-size", "2", "--epochs", "1", "--steps-per-epoch", "1",
             "--val-slices", "1", "--val-crop", "32", "--no-progress")
    assert "napari-restore[train]" in tr.stderr, tr.stderr
    assert (tmp_path / "tiny-model.run" / "log.csv").is_file()
    assert json.loads((model / "card.json").read_text())["name"]

    # pictures are the one thing the core cannot do: the demo says so and writes the volumes
    demo = run(bindir / "napari-restore", "demo", "--out", tmp_path / "demo", "--device", "cpu")
    assert "napari-restore[figures]" in demo.stderr and not (tmp_path / "demo" / "before_after.png").exists()
    assert (tmp_path / "demo" / "sample_input.nii.gz").is_file()


def test_install_sizes_are_measured():
    sizes = core_env.sizes()
    (n_core, b_core), (n_all, b_all) = sizes["core"], sizes["all"]
    assert 0 < n_core < n_all and 0 < b_core < b_all
    print(f"core: {n_core} distributions {b_core / 2**20:.0f} MiB; [all]: {n_all} distributions {b_all / 2**20:.0f} MiB")
