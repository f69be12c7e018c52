#!/usr/bin/env bash
# One-time set-up of a fresh machine: system packages for the tests (Xvfb + Mesa for napari,
# DICOM validators) and a virtual environment in .venv with the project installed.
# Safe to rerun: it skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=()
command -v Xvfb >/dev/null || need_apt+=(xvfb)
command -v dciodvfy >/dev/null || need_apt+=(dicom3tools)
command -v dcmdump >/dev/null || need_apt+=(dcmtk)
command -v dcm2niix >/dev/null || need_apt+=(dcm2niix)
command -v Orthanc >/dev/null || need_apt+=(orthanc)  # tests/test_pacs.py starts its own loopback Orthanc
ls /usr/share/orthanc/plugins*/libOrthancDicomWeb.so >/dev/null 2>&1 || need_apt+=(orthanc-dicomweb)
[ -e /usr/lib/x86_64-linux-gnu/libxkbcommon-x11.so.0 ] || [ -e /usr/lib/aarch64-linux-gnu/libxkbcommon-x11.so.0 ] || need_apt+=(libxkbcommon-x11-0)
if [ ${#need_apt[@]} -gt 0 ]; then
  need_apt+=(libgl1-mesa-dri libegl1 libdbus-1-3 libfontconfig1 libxcb-icccm4 libxcb-image0
             libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 libxcb-xinerama0 libxcb-xfixes0
             libxcb-shape0 libxcb-cursor0)
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing system packages: ${need_apt[*]}"
  $SUDO apt-get update -qq
  # policy-rc.d exit 101: the Debian orthanc service is installed but never started (tests run their own)
  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1
  [ $had_policy = 1 ] || printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
  [ $had_policy = 1 ] || $SUDO chmod +x /usr/sbin/policy-rc.d
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  [ $had_policy = 1 ] || $SUDO rm -f /usr/sbin/policy-rc.d
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP="$VENV/bin/pip"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    "$PIP" install -q torch            # a GPU is present: take the default CUDA build
  else
    "$PIP" install -q torch==2.13.0    # no GPU: the CPU build, never a multi-GB CUDA download
  fi
fi
# everything the tests need: the plugin, Qt, TensorBoard, PACS, figures (the [all] extra), the docs
# builder (mkdocs build --strict runs in the tests) and the BM3D baseline
"$PIP" install -q -e ".[all,testing,docs,benchmark]"
"$VENV/bin/python" - <<'PY'
import torch
print(f"setup: torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
PY
