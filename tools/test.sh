#!/usr/bin/env bash
# Run the whole test suite, installing first what it needs (Debian packages as root, then pip).
# This is the README's test command, and CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers and real data used by the tests, from Debian packages:
#   dcmtk (storescu, storescp, dcmcjpeg, ...), dicom3tools (dciodvfy), orthanc,
#   orthanc-dicomweb (Orthanc's DICOMweb plugin: STOW-RS to and from the node),
#   plastimatch (rasterises RTSTRUCTs back onto the images),
#   chromium, chromium-driver (the console in a headless browser),
#   invesalius-examples (Cranium CT), mricron-data (Colin27 T1 MR),
#   postgresql (the shared index of several nodes; tests/postgres.py starts its own server),
#   pixelmed-apps (PixelMed's DicomInstanceValidator and DicomSRValidator judge SEG and SR)
DEBS="dcmtk dicom3tools orthanc orthanc-dicomweb plastimatch chromium chromium-driver invesalius-examples mricron-data postgresql pixelmed-apps"
missing=""
for deb in $DEBS; do
  dpkg -s "$deb" >/dev/null 2>&1 || missing="$missing $deb"
done
if [ -n "$missing" ]; then
  echo "installing Debian packages:$missing"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends $missing
fi

# onnxruntime and onnxruntime-gpu install the same module: where pyproject asks for the
# GPU build (Linux x86_64), a CPU-only onnxruntime left over would shadow it.
if [ "$(uname -s)-$(uname -m)" = "Linux-x86_64" ] && python3 -m pip show -q onnxruntime >/dev/null 2>&1; then
  python3 -m pip uninstall -y -q onnxruntime
  python3 -m pip uninstall -y -q onnxruntime-gpu >/dev/null 2>&1 || true
fi
# torch first, pinned: the CPU build of exactly this version (nnunetv2 and monai would
# otherwise pull a CUDA build of several GB)
python3 -m pip install -q "torch==2.13.0"
python3 -m pip install -q -e ".[test,import,triton]"
# A real NVIDIA Triton server for tests/test_triton.py: the tritonserver binary and its
# Python backend from the nvidia-pytriton wheel (55 MB download, ~145 MB installed), taken
# --no-deps because its Python package pins numpy<2, which the node does not share. Its
# Python-backend stub needs numpy<2 itself: it runs in a venv of its own that sees this
# interpreter's packages (onnxruntime) but holds numpy 1.26 (~80 MB, tools/triton_server.py).
python3 -m pip install -q --no-deps "nvidia-pytriton==0.7.0"
STUB_VENV="${DICOMNODE_TRITON_STUB_VENV:-$HOME/.cache/dicomnode/triton-stub-venv}"
if [ ! -x "$STUB_VENV/bin/python3" ] || ! "$STUB_VENV/bin/python3" -c 'import numpy, sys; sys.exit(not numpy.__version__.startswith("1."))' 2>/dev/null; then
  python3 -m venv --system-site-packages "$STUB_VENV"
  "$STUB_VENV/bin/python3" -m pip install -q "numpy<2"
fi
# third-party readers the result tests run (tests/test_outputs.py), without their declared
# dependencies: rt-utils 1.2.7 would add opencv-python beside opencv-python-headless (both
# write cv2/) and the dataclasses backport; pydicom-seg 0.4.1, its last release, would
# downgrade numpy to < 2 and jsonschema to < 4 (it runs with today's; the test maps the
# pydicom module it imports that pydicom 3 renamed)
python3 -m pip install -q --no-deps "rt-utils==1.2.7" "pydicom-seg==0.4.1"
python3 -m ruff check dicomnode tests tools
python3 -m mypy
lint-imports --config pyproject.toml --no-cache
# two test processes (pytest-xdist), each taking whole files (module fixtures built once):
# the suite waits on peers and timers as much as it computes
python3 -m pytest -n "${DICOMNODE_TEST_WORKERS:-2}" --dist loadfile "$@"
