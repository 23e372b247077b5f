"""Never a result from part of a series: real senders (DCMTK storescu), a real node running the
shipped ct-body model, and Orthanc as the PACS that receives the results.

- A CT sent one instance per association with pauses gets one result, on all its slices.
- A CT sent as two halves with a pause longer than the quiet times gets a first result on the
  first half, then a second version on all slices with new UIDs, and an IOCM rejection note
  that withdraws the first; nothing reaches the PACS twice under one SOP Instance UID.
- kill -9 during the re-run of version 2: after a restart version 2 reaches the PACS once.
- A rule asking for a SEG only sends only a SEG.
- ``require_series`` waits for a missing series; ``when_incomplete`` acts after its time.
- The demo rules match the shipped demo series.
"""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
import testdata
from conftest import NodeFactory, RunningNode, storescu, wait_until
from orthanc import OrthancServer, requires_orthanc

ROOT = Path(__file__).resolve().parents[1]
KEY = b"partial-series-test-key-0123456789"
CRANIUM_SLICES = 108
KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def _rules(folder: Path, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "rules.yaml").write_text(text)
    return folder


CT_RULE = """rules:
  - name: ct-external
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [pacs]
"""


def _node(node_factory: NodeFactory, tmp_path: Path, orthanc: OrthancServer, *,
          rules: str = CT_RULE, **overrides: Any) -> RunningNode:
    key = tmp_path / "deid.key"
    key.write_bytes(KEY)
    return node_factory(
        peers={"pacs": orthanc.peer(),
               "storescu": {"ae_title": "STORESCU", "host": "localhost"}},
        rules_dir=str(_rules(tmp_path / "rules", rules)), models_dir=str(ROOT / "models"),
        deid={"key_file": str(key)},
        # a frame for every slice and structure: a SEG's frame count then says it covers
        # every slice of the series (empty frames are left out by default)
        outputs={"seg_omit_empty_frames": False, **overrides.pop("outputs", {})},
        outbox={"retry_initial_seconds": 1, "check_interval_seconds": 0.5}, **overrides)


def _jobs(node: RunningNode) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = json.loads(node.cli("jobs", "--json").stdout)["jobs"]
    return jobs


def _outbox(node: RunningNode) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(node.cli("outbox", "--json").stdout)
    return report


def _instances(orthanc: OrthancServer) -> dict[str, pydicom.Dataset]:
    """Every result instance Orthanc holds (not the CT), by SOP Instance UID."""
    found: dict[str, pydicom.Dataset] = {}
    for series in orthanc.get("/series?expand"):
        if series["MainDicomTags"].get("Modality") == "CT":
            continue
        for instance in series["Instances"]:
            ds = pydicom.dcmread(BytesIO(orthanc.file(instance)))
            found[str(ds.SOPInstanceUID)] = ds
    return found


def _segs(instances: dict[str, pydicom.Dataset]) -> list[pydicom.Dataset]:
    return sorted((ds for ds in instances.values() if ds.Modality == "SEG"),
                  key=lambda ds: str(ds.SeriesDescription))


def _structures(seg: pydicom.Dataset) -> int:
    return len(seg.SegmentSequence)


def _sent_once(node: RunningNode) -> None:
    """Each object went to the PACS under its own SOP Instance UID, once."""
    items = [i for i in _outbox(node)["items"] if i["state"] == "sent"]
    counts = Counter((i["sop_instance_uid"], i["destination"]) for i in items)
    assert counts and set(counts.values()) == {1}


def _wait_sent(node: RunningNode, count: int, timeout: float) -> None:
    wait_until(lambda: sum(i["state"] == "sent" for i in _outbox(node)["items"]) >= count
               and not any(i["state"] in ("pending", "sending")
                           for i in _outbox(node)["items"]),
               timeout, f"{count} objects sent; node log:\n{node.log()[-3000:]}")


@pytest.mark.slow
@requires_orthanc
def test_one_instance_per_association_with_pauses_gives_one_result_on_all_slices(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    files = testdata.cranium_ct(tmp_path / "ct")
    rng = random.Random(14)
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        node = _node(node_factory, tmp_path, orthanc,
                     completion={"quiet_seconds": 5, "series_quiet_seconds": 4})
        for path in files:  # as many modalities send: one association per image
            assert storescu(node.port, path).returncode == 0
            # pauses of 0.1-3 s, the long ones now and then (the suite's time is bounded)
            time.sleep(rng.uniform(0.1, 3.0) if rng.random() < 0.12 else 0.1)
        wait_until(lambda: [j["state"] for j in _jobs(node)] == ["done"], 120,
                   f"one job done; log:\n{node.log()[-3000:]}")
        _wait_sent(node, 2, 60)
        (job,) = _jobs(node)
        assert job["version"] == 1 and job["instances"] == CRANIUM_SLICES
        instances = _instances(orthanc)
        (seg,) = _segs(instances)
        assert seg.NumberOfFrames == CRANIUM_SLICES * _structures(seg)
        assert "result 1" in seg.SeriesDescription
        _sent_once(node)


@pytest.mark.slow
@requires_orthanc
def test_two_halves_give_a_second_version_and_a_rejection_note_for_the_first(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    first = testdata.cranium_ct(tmp_path / "a", study_uid=study_uid, slices=range(54))
    series_uid = str(pydicom.dcmread(first[0], stop_before_pixels=True).SeriesInstanceUID)
    second = testdata.cranium_ct(tmp_path / "b", study_uid=study_uid,
                                 slices=range(54, CRANIUM_SLICES))
    for path in second:  # the same series (the generator makes one per call)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = pydicom.dcmread(first[0]).FrameOfReferenceUID
        ds.save_as(path)
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        node = _node(node_factory, tmp_path, orthanc,
                     completion={"quiet_seconds": 2, "series_quiet_seconds": 3})
        assert storescu(node.port, *first).returncode == 0
        # the first half is whole and quiet: version 1 runs on it and is sent
        wait_until(lambda: any(j["state"] == "done" for j in _jobs(node)), 60,
                   f"version 1 done; log:\n{node.log()[-3000:]}")
        _wait_sent(node, 2, 60)
        v1_objects = {r["sop_instance_uid"] for r in _jobs(node)[0]["results"]}
        time.sleep(max(0.0, 15 - 8))  # the second half comes 15 s or so after the first
        assert storescu(node.port, *second).returncode == 0
        wait_until(lambda: [(j["version"], j["state"]) for j in _jobs(node)]
                   == [(2, "done"), (1, "done")], 120,
                   f"version 2 done; log:\n{node.log()[-3000:]}")
        _wait_sent(node, 5, 60)  # v1 SEG + RTSTRUCT, v2 SEG + RTSTRUCT + rejection note
        v2, v1 = _jobs(node)
        assert v2["instances"] == CRANIUM_SLICES and v1["instances"] == 54
        assert v2["changes"].startswith("+54 instance(s)")
        assert v1["withdrawn_by"] == v2["id"]
        # the audit trail tells it: version 1 rejected by version 2
        trail = json.loads(node.cli("audit", "--job", str(v1["id"]), "--json").stdout)
        rejected = [e for e in trail["events"] if e["kind"] == "job.rejected"]
        assert [e["details"]["by_job"] for e in rejected] == [v2["id"]]
        instances = _instances(orthanc)
        segs = _segs(instances)
        assert [s.SeriesDescription.split()[-2:] for s in segs] == [["result", "1"],
                                                                   ["result", "2"]]
        old, new = segs
        assert old.NumberOfFrames == 54 * _structures(old)
        assert new.NumberOfFrames == CRANIUM_SLICES * _structures(new)
        assert new.SeriesInstanceUID != old.SeriesInstanceUID
        # the rejection note withdraws exactly version 1's objects, in the original study
        (note,) = [ds for ds in instances.values() if ds.SOPClassUID == KOS]
        assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
        assert note.StudyInstanceUID == study_uid
        referenced = {str(i.ReferencedSOPInstanceUID)
                      for study in note.CurrentRequestedProcedureEvidenceSequence
                      for series in study.ReferencedSeriesSequence
                      for i in series.ReferencedSOPSequence}
        assert referenced == v1_objects
        _sent_once(node)


@pytest.mark.slow
@requires_orthanc
def test_killed_during_version_2_sends_version_2_once_after_a_restart(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    files = testdata.cranium_ct(tmp_path / "ct", study_uid=study_uid)
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        node = _node(node_factory, tmp_path, orthanc,
                     completion={"quiet_seconds": 1, "series_quiet_seconds": 1})
        assert storescu(node.port, *files[:80]).returncode == 0
        wait_until(lambda: any(j["state"] == "done" for j in _jobs(node)), 60, "version 1")
        _wait_sent(node, 2, 60)
        assert storescu(node.port, *files[80:]).returncode == 0
        wait_until(lambda: any(j["version"] == 2 and j["state"] == "running"
                               for j in _jobs(node)), 60, "version 2 running")
        node.kill()
        node.start()
        wait_until(lambda: [(j["version"], j["state"]) for j in _jobs(node)]
                   == [(2, "done"), (1, "done")], 120,
                   f"version 2 done after the restart; log:\n{node.log()[-3000:]}")
        _wait_sent(node, 5, 60)
        time.sleep(2)  # anything sent twice would be sent by now
        _sent_once(node)
        (v2, _v1) = _jobs(node)
        instances = _instances(orthanc)
        assert {r["sop_instance_uid"] for r in v2["results"]} <= set(instances)
        newest = _segs(instances)[-1]
        assert newest.NumberOfFrames == CRANIUM_SLICES * _structures(newest)


@pytest.mark.slow
@requires_orthanc
def test_a_rule_asking_for_a_seg_sends_only_a_seg(node_factory: NodeFactory,
                                                   tmp_path: Path) -> None:
    files = testdata.cranium_ct(tmp_path / "ct", slices=range(0, 60))
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        node = _node(node_factory, tmp_path, orthanc,
                     rules=CT_RULE + "    outputs: [seg]\n",
                     outputs={"rtstruct": True, "sr": False},
                     completion={"quiet_seconds": 1, "series_quiet_seconds": 1})
        assert storescu(node.port, *files).returncode == 0
        wait_until(lambda: [j["state"] for j in _jobs(node)] == ["done"], 90, "job done")
        _wait_sent(node, 1, 60)
        (job,) = _jobs(node)
        assert [r["kind"] for r in job["results"]] == ["SEG"]
        assert {ds.Modality for ds in _instances(orthanc).values()} == {"SEG"}


REQUIRED = """rules:
  - name: ct-with-pet
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [pacs]
    require_series: [ct, "PET AC"]
    when_incomplete: {{after_seconds: {after}, action: {action}}}
"""


@pytest.mark.slow
@requires_orthanc
@pytest.mark.parametrize("action", ["run", "discard", "wait"])
def test_required_series_missing_waits_then_when_incomplete_acts(
        node_factory: NodeFactory, tmp_path: Path, action: str) -> None:
    files = testdata.cranium_ct(tmp_path / "ct", slices=range(0, 40))
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        node = _node(node_factory, tmp_path, orthanc,
                     rules=REQUIRED.format(after=10, action=action),
                     completion={"quiet_seconds": 1, "series_quiet_seconds": 1})
        assert storescu(node.port, *files).returncode == 0
        sent = time.monotonic()
        time.sleep(3)  # settled and quiet, but the "PET AC" series is missing
        assert _jobs(node) == []
        assert "waiting for required series PET AC" in node.log()
        if action == "run":
            wait_until(lambda: [j["state"] for j in _jobs(node)] == ["done"], 90,
                       f"the job run without PET; log:\n{node.log()[-2000:]}")
            assert _jobs(node)[0]["trigger"] == "incomplete"
        elif action == "discard":
            wait_until(lambda: [j["state"] for j in _jobs(node)] == ["discarded"], 20,
                       "a discarded job")
            assert "PET AC did not arrive" in _jobs(node)[0]["error"]
        else:
            time.sleep(max(0.0, sent + 13 - time.monotonic()))
            assert _jobs(node) == []


@pytest.mark.slow
@requires_orthanc
def test_required_series_arriving_fires_without_the_study_quiet_time(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    study_uid = pydicom.uid.generate_uid()
    ct = testdata.cranium_ct(tmp_path / "ct", study_uid=study_uid, slices=range(0, 40))
    pet = testdata.synthetic_ct(tmp_path / "pet", slices=6, rows=32, columns=32,
                                study_uid=study_uid, series_description="PET AC WB")
    with OrthancServer(tmp_path / "orthanc") as orthanc:
        node = _node(node_factory, tmp_path, orthanc,
                     rules=REQUIRED.format(after=600, action="wait"),
                     completion={"quiet_seconds": 120, "series_quiet_seconds": 1})
        assert storescu(node.port, *ct).returncode == 0
        time.sleep(2.5)
        assert _jobs(node) == []
        assert storescu(node.port, *pet).returncode == 0
        wait_until(lambda: len(_jobs(node)) == 1, 15, "the rule fired once PET settled")
        assert _jobs(node)[0]["trigger"] == "early"


@pytest.mark.parametrize("source", ["colin27", "cranium"])
def test_demo_rules_match_the_shipped_demo_series(node_factory: NodeFactory, tmp_path: Path,
                                                  source: str) -> None:
    if source == "colin27":
        if not Path("/usr/share/mricron/templates/ch2.nii.gz").is_file():
            pytest.skip("install the Debian package mricron-data")
        folder, rule = tmp_path / "mr", "t1-brain"
        testdata.colin27_mr(folder)
    else:
        folder, rule = tmp_path / "ct", "ct-external"
        testdata.cranium_ct(folder)
    node = node_factory(rules_dir=str(ROOT / "rules"), models_dir=str(ROOT / "models"),
                        start=False)
    out = node.cli("rules", "test", "--path", str(folder)).stdout
    assert f"rule {rule}: MATCH" in out, out



@pytest.mark.slow
def test_run_now_from_the_console_forces_completion(node_factory: NodeFactory,
                                                    tmp_path: Path) -> None:
    import urllib.error
    import urllib.request

    from conftest import write_model_card

    write_model_card(tmp_path / "models" / "body", [("ct", "CT")])
    rules = _rules(tmp_path / "rules", """rules:
  - name: ct-any
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: body
""")
    node = node_factory(rules_dir=str(rules), models_dir=str(tmp_path / "models"),
                        completion={"quiet_seconds": 300, "series_quiet_seconds": 300})
    ct = testdata.synthetic_ct(tmp_path / "ct", slices=10, rows=32, columns=32)
    assert storescu(node.port, *ct).returncode == 0
    time.sleep(1.5)
    assert _jobs(node) == []  # neither the series nor the study is quiet yet

    def post(path: str) -> tuple[int, str]:
        request = urllib.request.Request(node.console_url() + path, method="POST",
                                         headers={"X-Dicomnode": "1"})
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    page = urllib.request.urlopen(node.console_url() + "/studies/1", timeout=10).read().decode()
    assert "/api/v1/studies/1/rules/ct-any/run" in page
    assert post("/api/v1/studies/1/rules/nosuchrule/run")[0] == 404
    status, text = post("/api/v1/studies/1/rules/ct-any/run")
    assert status == 200, text
    (job,) = _jobs(node)
    assert job["trigger"] == "manual" and job["instances"] == 10
    # asked again on the same input: the same version runs again
    assert post("/api/v1/studies/1/rules/ct-any/run")[0] == 200
    assert [j["version"] for j in _jobs(node)] == [1]
