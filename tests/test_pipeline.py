"""The pipeline end to end with real peers: Orthanc pushes the Cranium CT and the Colin27
MR to a real `dicomnode serve`; rules fire, worker processes pseudonymize, segment and write
SEG and RTSTRUCT, results are re-identified and Orthanc ends up holding them in the original
studies. Also: a node killed (or stopped by SIGTERM) while a model runs finishes the job
exactly once after a restart, receiving stays responsive while a model runs, failing jobs stop
after bounded attempts, and the `jobs`, `jobs retry` and `run` commands.

All traffic goes to 127.0.0.1 (Orthanc 1.10 cannot be told which address to listen on)."""

from __future__ import annotations

import json
import shutil
import time
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import testdata
from conftest import DcmtkStoreSCP, NodeFactory, RunningNode, free_port, storescu, wait_until
from orthanc import OrthancServer, requires_orthanc

ROOT = Path(__file__).resolve().parents[1]
CH2 = Path("/usr/share/mricron/templates/ch2.nii.gz")
KEY = b"pipeline-test-key-0123456789"


def _rules(folder: Path, send_to: str, *, model_ct: str = "ct-body") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rules.yaml").write_text(f"""rules:
  - name: ct-external
    select: >-
      SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: {model_ct}
    send_to: [{send_to}]
  - name: t1-brain
    select: >-
      SELECT study FROM patient WHERE series NAMED "t1" HAS Modality = "MR"
    model: brain-mr
    send_to: [{send_to}]
""")
    return folder


def _node(node_factory: NodeFactory, tmp_path: Path, peer: dict[str, Any], *,
          rules: Path | None = None, models: Path = ROOT / "models",
          **overrides: Any) -> RunningNode:
    key = tmp_path / "deid.key"
    key.write_bytes(KEY)
    return node_factory(
        # a research peer: brain-mr (card status research) may send only to research peers
        peers={"dest": {"research": True, **peer}},
        rules_dir=str(rules or _rules(tmp_path / "rules", "dest")),
        models_dir=str(models),
        deid={"key_file": str(key)},
        outbox={"retry_initial_seconds": 1, "check_interval_seconds": 0.5},
        **overrides)


def _jobs(node: RunningNode) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = json.loads(node.cli("jobs", "--json").stdout)["jobs"]
    return jobs


def _series_of(orthanc: OrthancServer, study_id: str) -> dict[str, list[dict[str, Any]]]:
    by_modality: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.get(f"/studies/{study_id}/series?expand"):
        by_modality.setdefault(series["MainDicomTags"]["Modality"], []).append(series)
    return by_modality


def _stored(orthanc: OrthancServer, series: dict[str, Any]) -> pydicom.Dataset:
    (instance,) = series["Instances"]
    return pydicom.dcmread(BytesIO(orthanc.file(instance)))


@requires_orthanc
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_orthanc_gets_seg_and_rtstruct_back_in_the_original_studies(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    if not CH2.is_file():
        pytest.skip(f"{CH2} missing: install the Debian package mricron-data")
    node_port = free_port()
    with OrthancServer(tmp_path / "orthanc",
                       modalities={"dicomnode": ("DICOMNODE", node_port)}) as orthanc:
        node = _node(node_factory, tmp_path, {**orthanc.peer()},
                     node={"port": node_port}, completion={"quiet_seconds": 2})
        sources = {"ct": testdata.cranium_ct(tmp_path / "ct", patient_id="PAT-CT-1",
                                             patient_name="Cranium^Carl"),
                   "t1": testdata.colin27_mr(tmp_path / "mr", patient_id="PAT-MR-2",
                                             patient_name="Colin^Twentyseven")}
        studies = {}
        for name, files in sources.items():
            for path in files:
                answer = orthanc.upload(path)
            studies[name] = answer["ParentStudy"]
        for study_id in studies.values():
            orthanc.push("dicomnode", [study_id])

        def results_back() -> bool:
            return all({"SEG", "RTSTRUCT"} <= set(_series_of(orthanc, s)) for s in
                       studies.values())

        wait_until(results_back, 240, f"SEG and RTSTRUCT in Orthanc; node log:\n{node.log()}")
        assert len(orthanc.get("/studies")) == 2  # nothing landed in a pseudonymous study
        for name, files in sources.items():
            source = {str(ds.SOPInstanceUID): ds for ds in
                      (pydicom.dcmread(p, stop_before_pixels=True) for p in files)}
            first = next(iter(source.values()))
            series = _series_of(orthanc, studies[name])
            seg, rtstruct = _stored(orthanc, series["SEG"][0]), _stored(orthanc,
                                                                         series["RTSTRUCT"][0])
            for ds in (seg, rtstruct):
                assert ds.StudyInstanceUID == first.StudyInstanceUID
                assert ds.PatientID == first.PatientID
                assert ds.PatientName == first.PatientName
                assert ds.FrameOfReferenceUID == first.FrameOfReferenceUID
            assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
            # SEG frames lie on the original slices, RTSTRUCT contours reference them
            for frame in seg.PerFrameFunctionalGroupsSequence:
                ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
                image = source[ref.ReferencedSOPInstanceUID]
                np.testing.assert_allclose(
                    [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                    [float(v) for v in image.ImagePositionPatient], atol=1e-3)
            contours = [c for roi in rtstruct.ROIContourSequence
                        for c in roi.get("ContourSequence", [])]
            assert contours
            assert {c.ContourImageSequence[0].ReferencedSOPInstanceUID
                    for c in contours} <= set(source)
        jobs = _jobs(node)
        assert sorted(j["rule"] for j in jobs) == ["ct-external", "t1-brain"]
        assert all(j["state"] == "done" and j["attempts"] == 1 for j in jobs)
        assert all(j["timings"]["model"] > 0 for j in jobs)
        outbox = json.loads(node.cli("outbox", "--json").stdout)
        assert outbox["counts"]["sent"] == len(outbox["items"]) >= 4
        assert "PAT-CT-1" not in node.log() and "Cranium^Carl" not in node.log()


@pytest.fixture
def storescp(tmp_path: Path) -> Any:
    scp = DcmtkStoreSCP(tmp_path / "received")
    yield scp
    scp.close()


@pytest.mark.slow
@pytest.mark.parametrize("stop", ["kill", "sigterm"])
def test_a_node_stopped_while_a_model_runs_finishes_the_job_exactly_once(
        node_factory: NodeFactory, tmp_path: Path, storescp: DcmtkStoreSCP, stop: str) -> None:
    """kill -9 counts the interrupted attempt (the job is found running at the next start);
    SIGTERM stops the worker within the node's grace and gives the attempt back."""
    if not CH2.is_file():
        pytest.skip(f"{CH2} missing: install the Debian package mricron-data")
    node = _node(node_factory, tmp_path, {"ae_title": "DEST", "host": "127.0.0.1",
                                          "port": storescp.port})
    files = testdata.colin27_mr(tmp_path / "mr")
    assert storescu(node.port, *files).returncode == 0

    def running() -> bool:
        return any(j["state"] == "running" for j in _jobs(node))

    wait_until(running, 60, "a running job")
    if stop == "kill":
        node.kill()  # kill -9 while the worker is in the middle of the job
    else:
        grace = 20  # node.shutdown_grace_seconds of the test configuration
        started = time.monotonic()
        assert node.terminate(timeout=grace + 15) == 0
        took = time.monotonic() - started
        assert took < grace, f"the node took {took:.1f} s to stop on SIGTERM"
        assert "running job(s) stopped; they run again at the next start" in node.log()
        (job,) = _jobs(node)  # read from the index while the node is down
        assert (job["state"], job["attempts"]) == ("pending", 0)
    assert not storescp.received()
    node.start()
    wait_until(lambda: [j["state"] for j in _jobs(node)] == ["done"], 120, "the job done")
    wait_until(lambda: len(storescp.received()) == 2, 60, "SEG and RTSTRUCT received")
    time.sleep(2)  # anything sent twice would arrive now
    received = storescp.received()
    assert sorted(received.values()) == [1, 1]  # the re-run wrote the same UIDs, sent once
    (job,) = _jobs(node)
    assert job["attempts"] == (2 if stop == "kill" else 1)
    assert {r["sop_instance_uid"] for r in job["results"]} == set(received)


@pytest.mark.slow
def test_workers_load_the_rules_models_when_the_node_starts(
        node_factory: NodeFactory, tmp_path: Path, storescp: DcmtkStoreSCP) -> None:
    node = _node(node_factory, tmp_path, {"ae_title": "DEST", "host": "127.0.0.1",
                                          "port": storescp.port})
    # before any study arrives, each rule's model has its session in the worker
    wait_until(lambda: all(f"model {m} " in node.log() and "runs on" in node.log()
                           for m in ("ct-body", "brain-mr")), 60,
               f"the models loaded at start; node log:\n{node.log()}")
    assert _jobs(node) == []


@pytest.mark.slow
def test_receiving_stays_responsive_while_a_model_runs(
        node_factory: NodeFactory, tmp_path: Path, storescp: DcmtkStoreSCP,
        small_ct: list[Path]) -> None:
    if not CH2.is_file():
        pytest.skip(f"{CH2} missing: install the Debian package mricron-data")
    node = _node(node_factory, tmp_path, {"ae_title": "DEST", "host": "127.0.0.1",
                                          "port": storescp.port})
    assert storescu(node.port, *testdata.colin27_mr(tmp_path / "mr")).returncode == 0
    wait_until(lambda: any(j["state"] == "running" for j in _jobs(node)), 60, "a running job")
    started = time.monotonic()
    sent = storescu(node.port, *small_ct)
    took = time.monotonic() - started
    assert sent.returncode == 0, sent.stderr
    assert any(j["state"] == "running" for j in _jobs(node)) or took < 5
    assert took < 10, f"24 small instances took {took:.1f} s while a model ran"


@pytest.mark.slow
def test_failing_jobs_stop_with_their_error(node_factory: NodeFactory, tmp_path: Path,
                                            storescp: DcmtkStoreSCP, small_ct: list[Path]) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models", models)
    (models / "ct-body" / "model.onnx").write_bytes(b"not an onnx model")  # broken
    node = _node(node_factory, tmp_path, {"ae_title": "DEST", "host": "127.0.0.1",
                                          "port": storescp.port}, models=models,
                 pipeline={"max_attempts": 2})
    assert storescu(node.port, *small_ct).returncode == 0
    wait_until(lambda: [j["state"] for j in _jobs(node)] == ["failed"], 60, "the job failed")
    (job,) = _jobs(node)
    assert job["attempts"] <= 2 and job["error"]
    assert not storescp.received()
    # the operator fixes the model and retries: the job runs in the command's process
    (models / "ct-body" / "model.onnx").write_bytes(
        (ROOT / "models" / "ct-body" / "model.onnx").read_bytes())
    retry = node.cli("jobs", "retry", str(job["id"]))
    assert "done: 3 object(s) written" in retry.stdout or "done: 2 object(s)" in retry.stdout
    (job,) = _jobs(node)
    assert job["state"] == "done" and job["attempts"] == 1
    wait_until(lambda: len(storescp.received()) == len(job["results"]), 30, "results received")


@pytest.mark.slow
def test_a_manual_run_of_a_rule_on_a_study(node_factory: NodeFactory, tmp_path: Path,
                                          storescp: DcmtkStoreSCP, small_ct: list[Path]) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text("""rules:
  - name: nightly-ct
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [dest]
    schedule: "0 2 * * *"
""")
    node = _node(node_factory, tmp_path, {"ae_title": "DEST", "host": "127.0.0.1",
                                          "port": storescp.port}, rules=rules)
    assert storescu(node.port, *small_ct).returncode == 0
    node.wait_for(lambda s: len(s) == 1 and s[0]["state"] == "complete")
    time.sleep(1)
    assert _jobs(node) == []  # a scheduled rule does not fire on arrival
    uid = node.studies()[0]["study_instance_uid"]
    run = node.cli("run", "--rule", "nightly-ct", "--study", uid)
    assert "job 1 done" in run.stdout
    again = node.cli("run", "--rule", "nightly-ct", "--study", uid)
    assert "job 1 done" in again.stdout  # the operator asked: the same job runs again
    (job,) = _jobs(node)
    assert job["trigger"] == "manual" and job["state"] == "done"
    wait_until(lambda: len(storescp.received()) == len(job["results"]), 30, "results received")
    assert max(storescp.received().values()) == 1
    bad = node.cli("run", "--rule", "nightly-ct", "--study", "1.2.3", check=False)
    assert bad.returncode == 2 and "no such study" in bad.stderr
