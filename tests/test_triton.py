"""Inference on NVIDIA Triton: ``models export-triton``'s repository, and ``models run`` with
``inference.backend: triton`` against a REAL ``tritonserver`` (from the nvidia-pytriton
wheel, see ``tools/triton_server.py``) serving the exported ONNX file, compared with the
local ONNX Runtime session."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import yaml
from pydantic import ValidationError
from triton_server import TritonServer, python_repository, stub_venv, tritonserver_binary

from dicomnode.config import Config, InferenceBackend
from dicomnode.inference import runtime
from dicomnode.inference.predict import InferenceError
from dicomnode.inference.triton import (
    ExportOptions,
    InstanceKind,
    TritonSession,
    TritonSettings,
    max_batch_size,
    model_name,
)
from dicomnode.models.card import load_card

ROOT = Path(__file__).resolve().parents[1]
CT_BODY = ROOT / "models" / "ct-body"

try:
    import tritonclient.grpc
    import tritonclient.http

    del tritonclient
    HAVE_CLIENT = True
except ImportError:
    HAVE_CLIENT = False

requires_client = pytest.mark.skipif(
    not HAVE_CLIENT, reason="tritonclient is not installed (pip install -e '.[triton]'; "
    "tools/test.sh installs it)")
requires_triton = pytest.mark.skipif(
    not HAVE_CLIENT or tritonserver_binary() is None or stub_venv() is None,
    reason="a real Triton server needs tritonclient, the nvidia-pytriton wheel (tritonserver) "
    "and the stub's numpy<2 venv (~/.cache/dicomnode/triton-stub-venv): tools/test.sh "
    "installs all three")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--config", str(config)] if config is not None else []
    return subprocess.run([sys.executable, "-m", "dicomnode", *args, *extra],
                          capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)


def _config(folder: Path, **inference: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dicomnode.yaml"
    body: dict[str, Any] = {"models_dir": str(ROOT / "models"),
                            "storage": {"path": str(folder / "var")},
                            "logging": {"level": "WARNING"}}
    if inference:
        body["inference"] = inference
    path.write_text(yaml.safe_dump(body), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- configuration


def test_triton_backend_needs_a_url() -> None:
    with pytest.raises(ValidationError, match=r"backend triton needs triton\.url"):
        Config.model_validate({"inference": {"backend": "triton"}})
    config = Config.model_validate(
        {"inference": {"backend": "triton", "triton": {"url": "grpc://triton:8001",
                                                        "protocol": "grpc"}}})
    assert config.inference.backend is InferenceBackend.TRITON
    assert Config.model_validate({}).inference.backend is InferenceBackend.ONNXRUNTIME


@pytest.mark.parametrize("url", ["triton", "http://triton", "ftp://triton:8000",
                                 "triton:99999", "triton:8000/v2"])
def test_triton_url_is_host_and_port(url: str) -> None:
    with pytest.raises(ValidationError, match=r"host:port|scheme"):
        Config.model_validate({"inference": {"backend": "triton", "triton": {"url": url}}})


def test_model_names_follow_the_package() -> None:
    card = load_card(CT_BODY)
    assert model_name(card) == "ct-body-1.0.0"
    assert model_name(card, prefix="site-") == "site-ct-body-1.0.0"
    assert max_batch_size(card) == 16  # the card's 2-D batch


# --------------------------------------------------------------------------- export


def _parse(path: Path) -> Any:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


@pytest.mark.slow
@requires_client
def test_export_triton_writes_a_repository_triton_parses(tmp_path: Path) -> None:
    out = tmp_path / "repo"
    proc = _cli("models", "export-triton", "ct-body", str(out), "--tensorrt", "--gpus", "0,1",
                "--count", "2", "--dynamic-batching")
    assert proc.returncode == 0, proc.stderr
    folder = out / "ct-body-1.0.0"
    assert (folder / "1" / "model.onnx").read_bytes() == (CT_BODY / "model.onnx").read_bytes()
    config = _parse(folder / "config.pbtxt")
    assert config.name == "ct-body-1.0.0" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 16
    assert [(i.name, list(i.dims)) for i in config.input] == [("hu", [1, -1, -1])]
    assert [(o.name, list(o.dims)) for o in config.output] == [("prob", [3, -1, -1])]
    assert config.input[0].data_type == config.output[0].data_type == 11  # TYPE_FP32
    group = config.instance_group[0]
    assert (group.count, group.kind, list(group.gpus)) == (2, group.KIND_GPU, [0, 1])
    assert config.HasField("dynamic_batching")
    accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accelerator.name == "tensorrt"
    # ct-body's card does not allow half precision
    assert accelerator.parameters["precision_mode"] == "FP32"
    # a second export of the same version does not overwrite the first
    again = _cli("models", "export-triton", "ct-body", str(out))
    assert again.returncode == 1 and "exists" in again.stderr


@pytest.mark.slow
@requires_client
def test_export_triton_fp16_only_where_the_card_allows(tmp_path: Path) -> None:
    package = tmp_path / "ct-body"
    shutil.copytree(CT_BODY, package)
    card = yaml.safe_load((package / "card.yaml").read_text())
    card["runtime"] = {"fp16": True}
    (package / "card.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    for flags, precision in (([], "FP16"), (["--no-fp16"], "FP32")):
        out = tmp_path / f"repo{len(flags)}"
        proc = _cli("models", "export-triton", str(package), str(out), "--tensorrt", *flags)
        assert proc.returncode == 0, proc.stderr
        config = _parse(out / "ct-body-1.0.0" / "config.pbtxt")
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
        assert accelerator.parameters["precision_mode"] == precision


@requires_client
def test_export_triton_cpu_instances(tmp_path: Path) -> None:
    proc = _cli("models", "export-triton", "ct-body", str(tmp_path / "r"), "--kind", "cpu",
                "--max-batch-size", "4", "--prefix", "site-")
    assert proc.returncode == 0, proc.stderr
    config = _parse(tmp_path / "r" / "site-ct-body-1.0.0" / "config.pbtxt")
    assert config.name == "site-ct-body-1.0.0"
    assert config.instance_group[0].kind == config.instance_group[0].KIND_CPU
    assert config.max_batch_size == 4 and not config.HasField("optimization")
    refused = _cli("models", "export-triton", "ct-body", str(tmp_path / "x"), "--kind", "cpu",
                   "--tensorrt")
    assert refused.returncode == 2 and "GPU instances" in refused.stderr


def test_export_options_refuse_nonsense() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        ExportOptions(count=0)
    with pytest.raises(ValueError, match="GPU instances"):
        ExportOptions(kind=InstanceKind.CPU, gpus=(0,))
    with pytest.raises(ValueError, match="prefix"):
        ExportOptions(prefix="a/b")


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """tritonserver serving ct-body as export-triton wrote it (KIND_CPU, Python backend
    running the exported model.onnx with ONNX Runtime)."""
    base = tmp_path_factory.mktemp("triton")
    proc = _cli("models", "export-triton", "ct-body", str(base / "exported"), "--kind", "cpu",
                "--dynamic-batching")
    assert proc.returncode == 0, proc.stderr
    repo = python_repository(base / "exported", base / "repo")
    with TritonServer(repo, base / "server") as triton:
        yield triton


@pytest.fixture
def fresh_runtime() -> Iterator[None]:
    runtime.clear_cache()
    yield
    runtime.configure(runtime.GpuSettings())
    runtime.clear_cache()


@pytest.mark.slow
@requires_triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_triton_session_gives_the_local_probabilities(
        server: TritonServer, protocol: str, fresh_runtime: None) -> None:
    """The same windows through Triton and through the local session: the same numbers."""
    card = load_card(CT_BODY)
    local = runtime.open_card_session(card)
    url = server.grpc_url if protocol == "grpc" else server.http_url
    runtime.configure(runtime.GpuSettings(), TritonSettings(url=url, protocol=protocol))
    remote = runtime.open_card_session(card)
    assert isinstance(remote, TritonSession) and remote.provider == "Triton"
    assert (remote.input_name, remote.output_name) == ("hu", "prob")
    assert remote.input_shape == (None, 1, None, None)
    rng = np.random.default_rng(18)
    for shape in ((1, 1, 64, 64), (16, 1, 48, 80)):
        batch = rng.uniform(-1100, 1600, shape).astype(np.float32)
        ours, theirs = local.run(batch), remote.run(batch)
        assert theirs.dtype == np.float32 and theirs.shape == ours.shape
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    # more than the exported max_batch_size: Triton refuses, and says so
    with pytest.raises(InferenceError, match=f"Triton at {url}: model ct-body-1.0.0 failed"):
        remote.run(np.zeros((17, 1, 8, 8), np.float32))


@pytest.mark.slow
@requires_triton
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_models_run_through_triton_gives_the_local_labels(
        server: TritonServer, small_ct: list[Path], tmp_path: Path, protocol: str) -> None:
    series = small_ct[0].parent
    local = _cli("models", "run", "ct-body", "-i", str(series), "-o", str(tmp_path / "local"),
                 config=_config(tmp_path / "a"))
    assert local.returncode == 0, local.stderr
    url = server.grpc_url if protocol == "grpc" else server.http_url
    config = _config(tmp_path / "b", backend="triton", triton={"url": url, "protocol": protocol})
    remote = _cli("models", "run", "ct-body", "-i", str(series), "-o", str(tmp_path / "remote"),
                  config=config)
    assert remote.returncode == 0, remote.stderr
    ours = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "local" / "labels.nii.gz")))
    theirs = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "remote" / "labels.nii.gz")))
    assert np.count_nonzero(ours) > 0
    assert np.array_equal(ours, theirs)  # bit-identical labels
    assert "on Triton" in remote.stdout and "on CPUExecutionProvider" in local.stdout
    report = [json.loads((tmp_path / run / "volumes.json").read_text())["structures"]
              for run in ("local", "remote")]
    assert report[0] == report[1]  # the same structures and volumes


@requires_client
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_unreachable_server_is_a_clear_error(small_ct: list[Path], tmp_path: Path,
                                             protocol: str) -> None:
    from conftest import free_port

    url = f"127.0.0.1:{free_port()}"  # nothing listens there
    config = _config(tmp_path, backend="triton",
                     triton={"url": url, "protocol": protocol, "timeout_seconds": 5})
    proc = _cli("models", "run", "ct-body", "-i", str(small_ct[0].parent), "-o",
                str(tmp_path / "out"), config=config)
    assert proc.returncode == 1
    assert f"Triton at {url} ({protocol}) is not reachable" in proc.stderr
    assert "Traceback" not in proc.stderr
    ds = pydicom.dcmread(small_ct[0], stop_before_pixels=True)
    for identity in (str(ds.PatientName), str(ds.PatientID)):
        assert identity not in proc.stderr + proc.stdout


@requires_triton
def test_missing_model_is_a_clear_error(server: TritonServer, small_ct: list[Path],
                                        tmp_path: Path) -> None:
    config = _config(tmp_path, backend="triton",
                     triton={"url": server.http_url, "model_prefix": "other-"})
    proc = _cli("models", "run", "ct-body", "-i", str(small_ct[0].parent), "-o",
                str(tmp_path / "out"), config=config)
    assert proc.returncode == 1
    assert (f"Triton at {server.http_url} has no model other-ct-body-1.0.0 ready"
            in proc.stderr), proc.stderr


# --------------------------------------------------------------------------- docker


def test_compose_scale_is_valid_and_wired() -> None:
    """docker/compose.scale.yaml (not built here: no Docker engine in the test
    environment): valid YAML, the five services, the nodes' configuration valid and
    pointing at the Triton service, and Triton serving the repository the export writes."""
    from dicomnode.config import load_config

    compose = yaml.safe_load((ROOT / "docker" / "compose.scale.yaml").read_text())
    services = compose["services"]
    assert {"postgres", "orthanc", "triton", "node1", "node2", "triton-export"} <= set(services)
    for name in ("node1", "node2"):
        node = services[name]
        assert node["build"]["args"]["DICOMNODE_EXTRAS"] == "triton"
        assert "dicomnode-shared:/var/lib/dicomnode" in node["volumes"]
        assert set(node["depends_on"]) == {"postgres", "orthanc", "triton"}
        assert all(p.startswith("127.0.0.1:") for p in node["ports"])
    assert "triton-models:/models:ro" in services["triton"]["volumes"]
    assert "--model-repository=/models" in services["triton"]["command"]
    export = services["triton-export"]
    assert "triton-models:/models" in export["volumes"]
    assert "export-triton $$m /models" in export["command"][0]
    mounted = next(v.split(":")[0] for v in services["node1"]["volumes"]
                   if v.endswith("/etc/dicomnode/dicomnode.yaml:ro"))
    config = load_config(ROOT / "docker" / mounted)
    assert config.inference.backend is InferenceBackend.TRITON
    assert config.inference.triton.url == "triton:8001"
    assert config.storage.database_url is not None
    assert config.storage.database_url.startswith("postgresql")
    # every package the export step names exists
    names = export["command"][0].split("; do ")[0].split(" in ")[1].split()
    assert all((ROOT / "models" / n / "card.yaml").exists() for n in names)


# --------------------------------------------------------------------------- nnU-Net folds


@requires_triton
@pytest.mark.slow
def test_nnunet_folds_through_triton_give_the_local_labels(
        tmp_path: Path, small_ct: list[Path], fresh_runtime: None) -> None:
    """The tiny trained nnU-Net (tests/data/nnunet_tiny, two folds, mirroring on 3 axes)
    imported, exported (one Triton model per fold, batches of 8 mirrored windows) and run
    through Triton: the same labels as the local sessions."""
    trained = ROOT / "tests" / "data" / "nnunet_tiny" / "nnUNetTrainerTiny__nnUNetPlans__3d_fullres"
    models = tmp_path / "models"
    env_dirs = {k: str(tmp_path / k) for k in ("nnUNet_raw", "nnUNet_preprocessed",
                                               "nnUNet_results")}
    os.environ.update({k: v for k, v in env_dirs.items() if k not in os.environ})
    base = _config(tmp_path / "local")
    body = yaml.safe_load(base.read_text())
    body["models_dir"] = str(models)
    base.write_text(yaml.safe_dump(body))
    proc = _cli("models", "import", "nnunet", str(trained), "--name", "tiny-ct", config=base)
    assert proc.returncode == 0, proc.stderr
    exported = _cli("models", "export-triton", "tiny-ct", str(tmp_path / "exported"),
                    "--kind", "cpu", config=base)
    assert exported.returncode == 0, exported.stderr
    card = load_card(models / "tiny-ct")
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == [
        f"tiny-ct-{card.version}-fold_0", f"tiny-ct-{card.version}-fold_1"]
    assert _parse(tmp_path / "exported" / f"tiny-ct-{card.version}-fold_0" /
                  "config.pbtxt").max_batch_size == 8
    repo = python_repository(tmp_path / "exported", tmp_path / "repo")
    series = small_ct[0].parent
    local = _cli("models", "run", "tiny-ct", "-i", str(series), "-o", str(tmp_path / "a"),
                 config=base)
    assert local.returncode == 0, local.stderr
    with TritonServer(repo, tmp_path / "server") as server:
        body["inference"] = {"backend": "triton", "triton": {"url": server.grpc_url,
                                                             "protocol": "grpc"}}
        remote_config = tmp_path / "remote.yaml"
        remote_config.write_text(yaml.safe_dump(body))
        remote = _cli("models", "run", "tiny-ct", "-i", str(series), "-o",
                      str(tmp_path / "b"), config=remote_config)
        assert remote.returncode == 0, remote.stderr
        # one window's logits, both folds, directly
        window = np.random.default_rng(5).normal(size=(8, 1, *card.profile["patch_size"]))
        window = window.astype(np.float32)
        for fold in ("fold_0.onnx", "fold_1.onnx"):
            runtime.configure(runtime.GpuSettings())
            ours = runtime.open_session(models / "tiny-ct" / fold, input_name=card.onnx_input,
                                        output_name=card.onnx_output).run(window)
            runtime.configure(runtime.GpuSettings(), TritonSettings(server.grpc_url, "grpc"))
            theirs = runtime.open_session(models / "tiny-ct" / fold,
                                          input_name=card.onnx_input,
                                          output_name=card.onnx_output).run(window)
            np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "a" / "labels.nii.gz")))
    b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "b" / "labels.nii.gz")))
    assert np.array_equal(a, b)


# --------------------------------------------------------------------------- a node's jobs


@pytest.mark.slow
@requires_triton
def test_a_nodes_jobs_wait_for_triton_and_then_run_there(
        node_factory: Any, tmp_path: Path, small_ct: list[Path]) -> None:
    """`dicomnode serve` with backend triton: while Triton is down the job fails as
    TRANSIENT (tried max_attempts times, the error names the URL); once Triton serves the
    exported model, the job runs through it and the results reach the peer."""
    from conftest import DcmtkStoreSCP, free_port, storescu, wait_until

    http_port = free_port()
    url = f"127.0.0.1:{http_port}"
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text("""rules:
  - name: ct-external
    select: >-
      SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [dest]
""")
    key = tmp_path / "deid.key"
    key.write_bytes(b"triton-test-key-0123456789")
    scp = DcmtkStoreSCP(tmp_path / "received")
    try:
        node = node_factory(
            peers={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": scp.port}},
            rules_dir=str(rules), models_dir=str(ROOT / "models"),
            deid={"key_file": str(key)}, pipeline={"max_attempts": 3},
            inference={"backend": "triton",
                       "triton": {"url": url, "protocol": "http", "timeout_seconds": 5}})

        def jobs() -> list[dict[str, Any]]:
            report: list[dict[str, Any]] = json.loads(node.cli("jobs", "--json").stdout)["jobs"]
            return report

        assert storescu(node.port, *small_ct).returncode == 0
        wait_until(lambda: [j["state"] for j in jobs()] == ["failed"], 90, "the job failed")
        (job,) = jobs()
        assert job["attempts"] == 3  # transient: tried again, not failed at once
        assert f"Triton at {url} (http) is not reachable" in job["error"]
        assert not scp.received()
        exported = _cli("models", "export-triton", "ct-body", str(tmp_path / "exported"),
                        "--kind", "cpu")
        assert exported.returncode == 0, exported.stderr
        repo = python_repository(tmp_path / "exported", tmp_path / "repo")
        with TritonServer(repo, tmp_path / "server", http_port=http_port):
            retry = node.cli("jobs", "retry", str(job["id"]))
            assert "done:" in retry.stdout, retry.stdout + retry.stderr
            (job,) = jobs()
            assert job["state"] == "done"
            wait_until(lambda: len(scp.received()) == len(job["results"]), 30,
                       "results received")
    finally:
        scp.close()
