"""The layout holds: the stages import one way (import-linter's contracts in pyproject.toml),
and a serving node's own process never loads the models' stack - only its worker processes
do (checked in the memory maps of a real `dicomnode serve` and its workers)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import NodeFactory, wait_until

ROOT = Path(__file__).resolve().parents[1]
# shared libraries of the models' stack, as their paths in /proc/PID/maps show them (numpy's
# own BLAS is called libscipy_openblas: match package folders, not bare names)
MODEL_LIBRARIES = ("/onnxruntime/", "/SimpleITK/", "/cv2/", "/opencv_python", "/scipy/",
                   "/scipy.libs/", "/torch/")


def test_import_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    proc = subprocess.run([lint, "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Contracts: 2 kept, 0 broken." in proc.stdout


def _mapped(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text(errors="replace")


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.extend(int(v) for v in text)
    return found


@pytest.mark.slow
def test_the_serving_process_maps_no_model_library(node_factory: NodeFactory,
                                                   tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(
        'rules:\n  - name: ct\n    select: SELECT study FROM patient WHERE series NAMED "ct" '
        'HAS Modality = "CT"\n    model: ct-body\n')
    node = node_factory(rules_dir=str(rules), models_dir=str(ROOT / "models"))
    assert node.proc is not None
    wait_until(lambda: "model ct-body " in node.log() and "runs on" in node.log(), 60,
               f"the worker's model loaded; node log:\n{node.log()}")
    workers = [pid for pid in _children(node.proc.pid) if "/onnxruntime/" in _mapped(pid)]
    assert workers, "the check must see ONNX Runtime where it is loaded: in a worker"
    own = _mapped(node.proc.pid)
    assert not [name for name in MODEL_LIBRARIES if name in own]
    modules = subprocess.run(
        [sys.executable, "-c", "import sys, dicomnode.node, dicomnode.cli; "
         "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
         "('onnxruntime', 'SimpleITK', 'cv2', 'highdicom', 'scipy', 'torch'))))"],
        capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert modules == []
