"""/metrics: Prometheus text over a real index, refusals counted over real associations."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
import testdata
from conftest import free_port
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from dicomnode.completion import AssociationActivity
from dicomnode.config import NodeConfig, PeerConfig
from dicomnode.net.access import REFUSAL_KINDS, AccessPolicy
from dicomnode.receive.ingest import InstanceStore
from dicomnode.receive.scp import StorageSCP
from dicomnode.store.db import Index, open_index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.tables import Job, JobState, OutboxItem, OutboxState, Study
from dicomnode.web.metrics import (
    CONTENT_TYPE,
    INFERENCE_BUCKETS,
    RefusalCounter,
    metrics_text,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

PATIENT_NAME = "Test^Patient"  # testdata's default patient
PATIENT_ID = "DN-TEST-0001"


def _samples(body: bytes) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(body.decode("utf-8")):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _start_scp(tmp_path: Path, index: Index, refused: RefusalCounter, *,
               maximum_associations: int = 4) -> StorageSCP:
    files = InstanceFiles(tmp_path / "store", fsync=False)
    store = InstanceStore(files, index, min_free_bytes=0)
    node = NodeConfig(ae_title="DICOMNODE", host="127.0.0.1", port=free_port(),
                      maximum_associations=maximum_associations, network_timeout_seconds=10)
    peers = {"testscu": PeerConfig(ae_title="TESTSCU", host="127.0.0.1"),
             "far": PeerConfig(ae_title="FARSCU", host="192.0.2.7")}
    scp = StorageSCP(node, store, AccessPolicy(node.ae_title, peers), AssociationActivity(),
                     on_refused=refused.increment)
    scp.start()
    return scp


def _associate(port: int, aet: str, aec: str = "DICOMNODE") -> Any:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage, pydicom.uid.ExplicitVRLittleEndian)
    return ae.associate("127.0.0.1", port, ae_title=aec)


def test_metrics_over_received_instances_jobs_outbox_and_refusals(
        tmp_path: Path, small_ct: list[Path], pynetdicom_globals: None) -> None:
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite")
    refused = RefusalCounter()
    scp = _start_scp(tmp_path, index, refused, maximum_associations=1)
    try:
        # refusals by the access policy: unknown calling AE, wrong called AE, wrong host
        for aet, aec in (("INTRUDER", "DICOMNODE"), ("INTRUDER", "DICOMNODE"),
                         ("TESTSCU", "SOMEONEELSE"), ("FARSCU", "DICOMNODE")):
            assert _associate(scp.port, aet, aec).is_rejected
        # and by pynetdicom: one association open, maximum_associations is 1
        assoc = _associate(scp.port, "TESTSCU")
        assert assoc.is_established
        second = _associate(scp.port, "TESTSCU")
        assert second.is_rejected
        assert second.acceptor.primitive.result_source == 0x03
        # receive the series, then two identical re-sends
        for path in [*small_ct, *small_ct[:2]]:
            assert int(assoc.send_c_store(path).Status) == 0
        assoc.release()
    finally:
        scp.stop(5)
    assert scp.counters["refused"] == 5

    stored = {p.stem: p.stat().st_size for p in (tmp_path / "store").rglob("*.dcm")}
    assert len(stored) == len(small_ct)
    resent = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
              for p in small_ct[:2]]
    received_bytes = sum(stored.values()) + sum(stored[uid] for uid in resent)

    with index.session() as session, session.begin():
        study_pk = session.query(Study.id).scalar()
        for i, (state, timings) in enumerate([
                (JobState.DONE, {"read": 0.1, "inference": 0.7, "write": 0.2}),
                (JobState.DONE, {"inference": 3.0}),
                (JobState.DONE, {"inference": 45.0}),
                (JobState.DONE, {"inference": 700.0}),
                (JobState.DONE, {"read": 1.0}),  # no inference step recorded
                (JobState.DONE, None),
                (JobState.PENDING, None),
                (JobState.RUNNING, None),
                (JobState.FAILED, {"inference": 9999.0}),  # not a done job: not observed
        ]):
            session.add(Job(rule_name=f"rule{i}", model="m", study_pk=study_pk,
                            inputs_key=str(i), bindings=[], trigger="complete", state=state,
                            timings=timings))
        for i, (destination, state) in enumerate([
                ("pacs", OutboxState.PENDING), ("pacs", OutboxState.PENDING),
                ("pacs", OutboxState.SENDING), ("pacs", OutboxState.SENT),
                ("pacs", OutboxState.FAILED), ("research", OutboxState.FAILED),
                ("research", OutboxState.FAILED), ("research", OutboxState.SENT),
        ]):
            session.add(OutboxItem(sop_instance_uid=f"1.2.3.{i}", sop_class_uid="1.2",
                                   file_path=f"out/{i}.dcm", destination=destination,
                                   state=state))

    body, content_type = metrics_text(index, refused=refused, storage_path=tmp_path / "store")
    assert content_type == CONTENT_TYPE
    samples = _samples(body)

    assert _value(samples, "dicomnode_instances_received_total") == len(small_ct) + 2
    assert _value(samples, "dicomnode_received_bytes_total") == received_bytes
    assert _value(samples, "dicomnode_instances_stored") == len(small_ct)
    assert _value(samples, "dicomnode_stored_bytes") == sum(stored.values())

    refusals = {kind: _value(samples, "dicomnode_associations_refused_total", reason=kind)
                for kind in REFUSAL_KINDS}
    assert refusals == {"calling_ae_not_recognised": 2, "called_ae_not_recognised": 1,
                        "host_not_allowed": 1, "too_many_associations": 1, "other": 0}

    assert _value(samples, "dicomnode_studies", state="receiving") == 1
    assert _value(samples, "dicomnode_studies", state="complete") == 0
    assert {s: _value(samples, "dicomnode_jobs", state=s)
            for s in ("pending", "running", "done", "failed")} == {
        "pending": 1, "running": 1, "done": 6, "failed": 1}

    assert _value(samples, "dicomnode_inference_seconds_count") == 4
    assert _value(samples, "dicomnode_inference_seconds_sum") == pytest.approx(748.7)
    buckets = {float(labels[0][1]): v for (name, labels), v in samples.items()
               if name == "dicomnode_inference_seconds_bucket"}
    expected = {0.5: 0, 1: 1, 2: 1, 5: 2, 10: 2, 30: 2, 60: 3, 120: 3, 300: 3, 600: 3,
                float("inf"): 4}
    assert buckets == expected
    assert set(buckets) == {*map(float, INFERENCE_BUCKETS), float("inf")}

    assert {s: _value(samples, "dicomnode_outbox_items", state=s)
            for s in ("pending", "sending", "sent", "failed")} == {
        "pending": 2, "sending": 1, "sent": 2, "failed": 3}
    assert _value(samples, "dicomnode_outbox_backlog_items", destination="pacs") == 3
    assert ("dicomnode_outbox_backlog_items", (("destination", "research"),)) not in samples
    assert _value(samples, "dicomnode_outbox_failed_items", destination="pacs") == 1
    assert _value(samples, "dicomnode_outbox_failed_items", destination="research") == 2

    assert _value(samples, "dicomnode_free_disk_bytes") > 0
    assert _value(samples, "dicomnode_disk_size_bytes") >= _value(
        samples, "dicomnode_free_disk_bytes")

    # no patient identity, no UID of the data, no AE title or address of a peer
    text = body.decode("utf-8")
    first = pydicom.dcmread(small_ct[0], stop_before_pixels=True)
    assert str(first.PatientName) == PATIENT_NAME and first.PatientID == PATIENT_ID
    forbidden = [PATIENT_NAME, "Test", "Patient", PATIENT_ID, str(first.StudyInstanceUID),
                 str(first.SeriesInstanceUID), str(first.FrameOfReferenceUID),
                 "INTRUDER", "TESTSCU", "FARSCU", "SOMEONEELSE", "127.0.0.1", "192.0.2.7",
                 str(tmp_path)]
    forbidden += [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in small_ct]
    for value in forbidden:
        assert value not in text, f"{value!r} appears in /metrics"
    index.dispose()


def test_metrics_of_an_empty_index_list_every_state_at_zero(tmp_path: Path) -> None:
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite")
    body, _ = metrics_text(index, refused=RefusalCounter(),
                           storage_path=tmp_path / "not" / "created" / "yet")
    samples = _samples(body)
    assert _value(samples, "dicomnode_instances_received_total") == 0
    assert _value(samples, "dicomnode_received_bytes_total") == 0
    for name, states in (("dicomnode_studies", ("receiving", "complete")),
                         ("dicomnode_jobs", ("pending", "running", "done", "failed")),
                         ("dicomnode_outbox_items", ("pending", "sending", "sent", "failed"))):
        for state in states:
            assert _value(samples, name, state=state) == 0
    for kind in REFUSAL_KINDS:
        assert _value(samples, "dicomnode_associations_refused_total", reason=kind) == 0
    assert _value(samples, "dicomnode_inference_seconds_count") == 0
    assert _value(samples, "dicomnode_inference_seconds_bucket", le="+Inf") == 0
    assert _value(samples, "dicomnode_free_disk_bytes") > 0
    index.dispose()


class _YieldingReason(str):
    """A refusal reason whose hash gives the GIL away: every dict access with it in
    ``RefusalCounter.increment`` (the read and the write of ``+= 1``) lets another thread
    run, so without the counter's lock two threads interleave between read and write."""

    def __hash__(self) -> int:
        time.sleep(0)  # releases the GIL: forces a switch inside the critical section
        return str.__hash__(self)

    def __eq__(self, other: object) -> bool:
        return str.__eq__(self, other)


def test_refusal_counter_is_thread_safe_and_keeps_its_labels_fixed() -> None:
    counter = RefusalCounter()
    reason = _YieldingReason("host_not_allowed")
    start = threading.Barrier(8)

    def hammer() -> None:
        start.wait(10)  # all threads increment at once
        for _ in range(500):
            counter.increment(reason)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads)
    counter.increment("calling AE title 'X' from 10.0.0.1")  # not a known reason
    counts = counter.counts()
    assert counts["host_not_allowed"] == 8 * 500  # no increment lost between read and write
    assert counts["other"] == 1
    assert set(counts) == set(REFUSAL_KINDS)


def test_a_failing_refusal_hook_does_not_break_the_scp(
        tmp_path: Path, pynetdicom_globals: None) -> None:
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite")

    class Broken(RefusalCounter):
        def increment(self, reason: str) -> None:
            raise RuntimeError("broken")

    scp = _start_scp(tmp_path, index, Broken())
    try:
        assoc = _associate(scp.port, "INTRUDER")
        assert assoc.is_rejected
        assert assoc.acceptor.primitive.diagnostic == 0x03
        ok = _associate(scp.port, "TESTSCU")
        assert ok.is_established
        assert int(ok.send_c_echo().Status) == 0
        ok.release()
    finally:
        scp.stop(5)
    assert scp.counters["refused"] == 1
    index.dispose()


def test_no_identity_even_with_identity_rich_data(tmp_path: Path, data_dir: Path,
                                                  pynetdicom_globals: None) -> None:
    name, patient_id = "Doe^Jane^Q", "MRN-884422"
    files = testdata.synthetic_ct(data_dir / "identity", slices=3, rows=16, columns=16,
                                  patient_name=name, patient_id=patient_id)
    index = open_index(f"sqlite:///{tmp_path}/index.sqlite")
    refused = RefusalCounter()
    scp = _start_scp(tmp_path, index, refused)
    try:
        assoc = _associate(scp.port, "TESTSCU")
        for path in files:
            assert int(assoc.send_c_store(path).Status) == 0
        assoc.release()
    finally:
        scp.stop(5)
    body, _ = metrics_text(index, refused=refused, storage_path=tmp_path / "store")
    text = body.decode("utf-8")
    assert _value(_samples(body), "dicomnode_instances_received_total") == 3
    for value in (name, "Doe", "Jane", patient_id, "884422"):
        assert value not in text
    index.dispose()
