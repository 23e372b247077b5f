"""A real NVIDIA Triton Inference Server on free loopback ports, for the tests
(``tests/test_triton.py``) and the benchmark (``tools/bench/triton.py``).

The ``tritonserver`` binary comes from the PyPI wheel ``nvidia-pytriton`` (installed with
``--no-deps`` by ``tools/test.sh``: only its files are used, not its Python package, whose
``numpy<2`` pin the node does not share). That wheel ships Triton's **Python backend only**
(no onnxruntime, TensorRT or PyTorch backend), so :func:`python_repository` turns a
repository written by ``dicomnode models export-triton`` into one Triton can load here:
each model keeps its exported name, inputs, outputs, dims and ``max_batch_size``, but
``platform: "onnxruntime_onnx"`` becomes ``backend: "python"`` with a ``model.py`` that runs
the exported ``model.onnx`` with ONNX Runtime on the CPU (TensorRT settings and GPU
instance groups are dropped). The windows still travel over the KServe v2 protocol (HTTP
and gRPC) exactly as they do to a production Triton.

Usage::

    repo = python_repository(exported, workdir / "repo")
    with TritonServer(repo, workdir / "server") as server:
        ...  # tritonclient at server.http_url / server.grpc_url
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from server_process import ServerProcess, free_port

__all__ = ["TritonServer", "python_repository", "pytriton_dir", "stub_venv", "tritonserver_binary"]

_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy

MODEL_PY = '''"""Triton Python-backend model: the exported model.onnx run by ONNX Runtime (CPU)."""
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.session = ort.InferenceSession(os.path.join(folder, "model.onnx"),
                                            providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]

    def execute(self, requests):
        responses = []
        for request in requests:
            feed = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                    for name in self.inputs}
            results = self.session.run(self.outputs, feed)
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, np.ascontiguousarray(value))
                 for name, value in zip(self.outputs, results)]))
        return responses
'''


def pytriton_dir() -> Path | None:
    """The installed ``pytriton`` package folder (not imported), or None."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def tritonserver_binary() -> Path | None:
    """``tritonserver`` of the nvidia-pytriton wheel, when it and a Python-backend stub
    for this interpreter are installed."""
    folder = pytriton_dir()
    if folder is None:
        return None
    binary = folder / "tritonserver" / "bin" / "tritonserver"
    stub = _stub(folder)
    return binary if binary.exists() and stub.exists() else None


def _stub(folder: Path) -> Path:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    return folder / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"


#: the Python-backend stub's virtual environment (see :func:`stub_venv`)
STUB_VENV_ENV = "DICOMNODE_TRITON_STUB_VENV"


def stub_venv() -> Path | None:
    """The virtual environment the Python-backend stub runs in, or None.

    The stub in nvidia-pytriton 0.7.0 is built against numpy 1's C layout: under numpy 2
    its output tensors reach Triton with 0 bytes (the client gets an empty array). The
    node itself runs numpy 2, so the stub runs in a venv made with
    ``--system-site-packages`` (it sees onnxruntime) holding ``numpy<2`` of its own:
    ``$DICOMNODE_TRITON_STUB_VENV``, default ``~/.cache/dicomnode/triton-stub-venv``
    (``tools/test.sh`` makes it). The embedded interpreter finds its ``sys.prefix`` from
    the ``python3`` first on ``PATH``, so that venv's ``bin`` goes first.
    """
    folder = Path(os.environ.get(STUB_VENV_ENV)
                  or Path.home() / ".cache" / "dicomnode" / "triton-stub-venv")
    return folder if (folder / "bin" / "python3").exists() else None


def python_repository(exported: Path, out: Path) -> Path:
    """Copy the export-triton repository ``exported`` to ``out`` as Python-backend models
    (see the module docstring); returns ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for config in sorted(exported.glob("*/config.pbtxt")):
        source = config.parent
        target = out / source.name
        shutil.copytree(source, target)
        text = config.read_text(encoding="utf-8")
        text = text.replace('platform: "onnxruntime_onnx"', 'backend: "python"')
        text = re.sub(r"\noptimization \{.*\n\}\n", "\n", text, flags=re.S)
        text = text.replace("kind: KIND_GPU", "kind: KIND_CPU")
        text = re.sub(r"\n *gpus: \[[^\]]*\]", "", text)
        (target / "config.pbtxt").write_text(text, encoding="utf-8")
        for version in target.iterdir():
            if version.is_dir() and (version / "model.onnx").exists():
                (version / "model.py").write_text(MODEL_PY, encoding="utf-8")
    return out


class TritonServer(ServerProcess):
    """One ``tritonserver`` process serving ``repository`` on free loopback ports (HTTP,
    gRPC; no metrics); a context manager that starts it and stops it."""

    host = "127.0.0.1"

    def __init__(self, repository: Path, workdir: Path, *, http_port: int | None = None,
                 grpc_port: int | None = None) -> None:
        binary = tritonserver_binary()
        if binary is None:
            raise RuntimeError("tritonserver not installed (pip install --no-deps "
                               "nvidia-pytriton)")
        self.binary = binary
        self.repository = Path(repository)
        self.workdir = Path(workdir)
        self.http_port = http_port or free_port()
        self.grpc_port = grpc_port or free_port()
        self.log_path = self.workdir / "tritonserver.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def _backends(self) -> Path:
        """The Python backend with this interpreter's stub (Triton looks for the stub
        beside the backend library)."""
        folder = self.binary.parent.parent
        backends = self.workdir / "backends"
        python = backends / "python"
        python.mkdir(parents=True, exist_ok=True)
        for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
            shutil.copy2(folder / "backends" / "python" / name, python / name)
        shutil.copy2(_stub(folder.parent), python / "triton_python_backend_stub")
        return backends

    def _env(self) -> dict[str, str]:
        libs = [str(self.binary.parents[3] / "nvidia_pytriton.libs")]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir:
            libs.insert(0, str(libdir))  # this interpreter's libpython, not the system's
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = ":".join([*libs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
        venv = stub_venv()
        python = venv / "bin" if venv is not None else Path(sys.executable).parent
        env["PATH"] = f"{python}:{env.get('PATH', '')}"
        env["ORT_DISABLE_TELEMETRY"] = "1"
        return env

    def start(self, timeout: float = 90.0) -> TritonServer:
        """Start the server; returns once every model of the repository is ready."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        backends = self._backends()
        args = [str(self.binary), f"--model-repository={self.repository}",
                f"--backend-directory={backends}",
                f"--http-address={self.host}", f"--http-port={self.http_port}",
                f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                "--allow-metrics=false", "--exit-timeout-secs=5", "--strict-readiness=true"]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.workdir, env=self._env())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tritonserver exited with code {self.proc.returncode}:\n"
                                   f"{self.log()[-4000:]}")
            if self._ready():
                return self
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"tritonserver not ready within {timeout:g} s:\n{self.log()[-4000:]}")

    def _ready(self) -> bool:
        try:
            with _HTTP.open(f"http://{self.http_url}/v2/health/ready", timeout=2) as r:
                return int(r.status) == 200
        except (OSError, urllib.error.URLError):
            return False

