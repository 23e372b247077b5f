#!/usr/bin/env bash
# Run the whole test suite, installing first what it needs (Debian packages as root, then pip).
# This is the README's test command, and CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

# Real peers and real data used by the tests, from Debian packages:
#   dcmtk (storescu, storescp, dcmcjpeg, ...), dicom3tools (dciodvfy), orthanc,
#   plastimatch (rasterises RTSTRUCTs back onto the images),
#   chromium, chromium-driver (the console in a headless browser),
#   invesalius-examples (Cranium CT), mricron-data (Colin27 T1 MR),
#   pixelmed-apps (PixelMed's DicomInstanceValidator and DicomSRValidator judge SEG and SR)
DEBS="dcmtk dicom3tools orthanc plastimatch chromium chromium-driver invesalius-examples mricron-data pixelmed-apps"
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
python3 -m pip install -q -e ".[test,import]"
# third-party readers the result tests run (tests/test_outputs.py), without their declared
# dependencies: rt-utils 1.2.7 would add opencv-python beside opencv-python-headless (both
# write cv2/) and the dataclasses backport; pydicom-seg 0.4.1, its last release, would
# downgrade numpy to < 2 and jsonschema to < 4 (it runs with today's; the test maps the
# pydicom module it imports that pydicom 3 renamed)
python3 -m pip install -q --no-deps "rt-utils==1.2.7" "pydicom-seg==0.4.1"
python3 -m ruff check dicomnode tests tools
python3 -m mypy
lint-imports --config pyproject.toml --no-cache
python3 -m pytest "$@"
