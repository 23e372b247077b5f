"""Explicit state: the enums read and write the index's stored strings, the operator's study
status follows the study's jobs and outbox items (real SQLite index, real rows written by
their owners, real associations), and the SCP answers the named DIMSE statuses."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import testdata
from conftest import NodeFactory, start_storage_scp, write_model_card
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]
from sqlalchemy import select, text

from dicomnode.completion import AssociationActivity, CompletionMonitor
from dicomnode.config import load_config
from dicomnode.dicom.status import Status, StatusCategory, category, is_stored, is_transient
from dicomnode.jobs.queue import claim, finish, jobs_report
from dicomnode.node import Node
from dicomnode.receive import ingest, scp, validate
from dicomnode.states import (
    IngestOutcome,
    JobState,
    JobTrigger,
    OutboxState,
    SeriesGeometry,
    StudyState,
    StudyStatus,
)
from dicomnode.store import header
from dicomnode.store.db import Index, open_index
from dicomnode.store.queries import studies_report
from dicomnode.store.studystatus import study_status, study_statuses
from dicomnode.store.tables import Instance, Job, OutboxItem, Series, Study, utcnow
from dicomnode.web.metrics import RefusalCounter, metrics_text

# ------------------------------------------------------------------ stored values


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    yield idx
    idx.dispose()


# what rows written before this change hold: the state columns the member *names*, the
# trigger column the *values* (a plain string column then)
STORED_STUDY = {"RECEIVING": StudyState.RECEIVING, "COMPLETE": StudyState.COMPLETE}
STORED_JOB = {"PENDING": JobState.PENDING, "RUNNING": JobState.RUNNING, "DONE": JobState.DONE,
              "FAILED": JobState.FAILED, "DISCARDED": JobState.DISCARDED}
STORED_TRIGGER = {t: JobTrigger(t) for t in ("early", "complete", "settled", "quiet", "manual",
                                             "incomplete", "schedule")}
STORED_OUTBOX = {"PENDING": OutboxState.PENDING, "SENDING": OutboxState.SENDING,
                 "SENT": OutboxState.SENT, "FAILED": OutboxState.FAILED,
                 "CANCELLED": OutboxState.CANCELLED}


def test_every_enum_reads_and_writes_the_strings_stored_today(index: Index) -> None:
    with index.engine.begin() as conn:
        conn.execute(text("INSERT INTO patient (id, patient_id, issuer_of_patient_id) "
                          "VALUES (1, 'p', '')"))
        for n, stored in enumerate(STORED_STUDY, 1):
            conn.execute(text(
                "INSERT INTO study (id, study_instance_uid, patient_pk, state, "
                "first_received_at, last_received_at, reopened_count) "
                "VALUES (:id, :uid, 1, :state, '2026-01-01 00:00:00', "
                "'2026-01-01 00:00:00', 0)"), {"id": n, "uid": f"2.25.{n}", "state": stored})
        pairs = list(zip(STORED_JOB, STORED_TRIGGER, strict=False))
        for n, (state, trigger) in enumerate(pairs, 1):
            conn.execute(text(
                "INSERT INTO job (id, rule_name, model, study_pk, inputs_key, bindings, "
                "trigger, version, state, created_at, attempts) VALUES (:id, 'r', 'm', 1, "
                ":key, '[]', :trigger, 1, :state, '2026-01-01 00:00:00', 0)"),
                {"id": n, "key": str(n), "trigger": trigger, "state": state})
        for n, trigger in enumerate(list(STORED_TRIGGER)[len(pairs):], len(pairs) + 1):
            conn.execute(text(
                "INSERT INTO job (id, rule_name, model, study_pk, inputs_key, bindings, "
                "trigger, version, state, created_at, attempts) VALUES (:id, 'r', 'm', 1, "
                ":key, '[]', :trigger, 1, 'DONE', '2026-01-01 00:00:00', 0)"),
                {"id": n, "key": str(n), "trigger": trigger})
        for n, stored in enumerate(STORED_OUTBOX, 1):
            conn.execute(text(
                "INSERT INTO outbox_item (id, sop_instance_uid, sop_class_uid, file_path, "
                "destination, state, attempts, next_attempt_at, created_at) VALUES (:id, :uid, "
                "'1.2', 'f', 'pacs', :state, 0, '2026-01-01 00:00:00', '2026-01-01 00:00:00')"),
                {"id": n, "uid": f"2.25.{n}", "state": stored})

    with index.session() as session:
        studies = {s.id: s.state for s in session.scalars(select(Study))}
        jobs = {j.id: (j.state, j.trigger) for j in session.scalars(select(Job))}
        items = {i.id: i.state for i in session.scalars(select(OutboxItem))}
    assert list(studies.values()) == list(STORED_STUDY.values())
    assert [s for s, _ in jobs.values()][:len(STORED_JOB)] == list(STORED_JOB.values())
    assert [t for _, t in jobs.values()] == list(STORED_TRIGGER.values())
    assert all(type(t) is JobTrigger for _, t in jobs.values())
    assert list(items.values()) == list(STORED_OUTBOX.values())

    # written through the ORM (enum members, or the trigger as a plain string as callers
    # and tests still do), the columns hold the same strings as before
    with index.session() as session:
        session.add(Job(rule_name="new", model="m", study_pk=1, inputs_key="x", bindings=[],
                        trigger=JobTrigger.SCHEDULE, state=JobState.DISCARDED))
        session.add(Job(rule_name="new", model="m", study_pk=1, inputs_key="y", bindings=[],
                        trigger="manual"))
        session.commit()
    with index.engine.connect() as conn:
        rows = conn.execute(text("SELECT trigger, state FROM job WHERE rule_name = 'new' "
                                 "ORDER BY inputs_key")).all()
    assert [tuple(r) for r in rows] == [("schedule", "DISCARDED"), ("manual", "PENDING")]

    # the stored strings the reports and the console show are the enums' values
    report = jobs_report(index)
    assert {j["trigger"] for j in report["jobs"]} == {t.value for t in JobTrigger}
    assert {s["state"] for s in studies_report(index)["studies"]} == {"receiving", "complete"}


def test_enum_values_are_the_reported_words() -> None:
    assert [s.value for s in StudyStatus] == [
        "receiving", "failed", "processing", "awaiting review", "ready", "waiting for series",
        "results sent"]
    assert {t for t in JobTrigger if t.forced} == {
        JobTrigger.MANUAL, JobTrigger.SCHEDULE, JobTrigger.INCOMPLETE}
    assert [SeriesGeometry.of(True, True), SeriesGeometry.of(False, None),
            SeriesGeometry.of(False, True), SeriesGeometry.of(False, False)] == [
        SeriesGeometry.PENDING, SeriesGeometry.NOT_IMAGE, SeriesGeometry.WHOLE,
        SeriesGeometry.NOT_WHOLE]
    assert {o.value for o in IngestOutcome} == {"stored", "duplicate", "replaced", "failed"}
    with pytest.raises(ValueError):
        JobTrigger("later")


# ------------------------------------------------------------------ DIMSE statuses


def test_dimse_statuses_by_name_and_category() -> None:
    assert Status.OUT_OF_RESOURCES == 0xA700
    assert Status.SOP_CLASS_NOT_SUPPORTED == 0x0122
    assert Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS == 0xA900
    assert Status.CANNOT_UNDERSTAND == 0xC000
    assert Status.WARNING_COERCION_OF_DATA_ELEMENTS.category is StatusCategory.WARNING
    assert [category(c) for c in (0x0000, 0xB007, 0xA702, 0xC123, 0xFE00, 0xFF01, 0x0001)] == [
        StatusCategory.SUCCESS, StatusCategory.WARNING, StatusCategory.FAILURE,
        StatusCategory.FAILURE, StatusCategory.CANCEL, StatusCategory.PENDING,
        StatusCategory.WARNING]
    assert [is_stored(c) for c in (0x0000, 0xB000, 0xA700, 0x0122)] == [True, True, False, False]
    assert [is_transient(c) for c in (0xA700, 0xA7FF, 0xFE00, 0xA900, 0xC000, 0x0122)] == [
        True, True, True, False, False, False]
    with pytest.raises(ValueError, match="16-bit"):
        category(0x10000)
    # every status the receiving modules answer is a named Status
    constants = [getattr(m, n) for m in (ingest, scp, validate, header) for n in dir(m)
                 if n.startswith("STATUS_")]
    assert constants and all(isinstance(c, Status) for c in constants)
    with pytest.raises(ValueError):
        ingest.StoreFailure("no such status", 0xC0FF)


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_the_scp_answers_named_statuses(node_factory: NodeFactory, tmp_path: Path) -> None:
    running = node_factory()
    files = testdata.synthetic_ct(tmp_path / "ct", slices=2, rows=16, columns=16)
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", running.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        echo = assoc.send_c_echo()
        stored = assoc.send_c_store(files[0])
        # a Study Instance UID that is not a UID: refused as Cannot Understand
        ds = pydicom.dcmread(files[1])
        ds.StudyInstanceUID = "1.2.3.not-a-uid"
        refused = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert Status(echo.Status) is Status.SUCCESS
    assert Status(stored.Status) is Status.SUCCESS
    assert Status(refused.Status) is Status.CANNOT_UNDERSTAND_INVALID_UID


# ------------------------------------------------------------------ the operator's status

RULES = '''rules:
  - name: ct-now
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT"
    model: body
'''

REQUIRED = '''rules:
  - name: ct-with-pet
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT"
    model: body
    require_series: ["PET AC"]
    when_incomplete: {after_seconds: 60, action: discard}
'''


class Peer:
    """A pynetdicom Storage SCP answering every C-STORE with one status."""

    def __init__(self, status: int) -> None:
        self.status = status
        self.port, self.server = start_storage_scp("PEER", self._store)

    def _store(self, event: Any) -> int:
        return self.status

    def config(self) -> dict[str, Any]:
        return {"ae_title": "PEER", "host": "127.0.0.1", "port": self.port}


@pytest.fixture
def peers() -> Iterator[dict[str, Peer]]:
    made = {"pacs": Peer(Status.SUCCESS), "refuses": Peer(Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS)}
    yield made
    for peer in made.values():
        peer.server.shutdown()


@pytest.fixture
def make_node(node_factory: NodeFactory, tmp_path: Path,
              peers: dict[str, Peer]) -> Iterator[Any]:
    made: list[Node] = []

    def make(rules: str) -> Node:
        folder = tmp_path / f"rules{len(made)}"
        folder.mkdir()
        (folder / "main.yaml").write_text(rules)
        write_model_card(tmp_path / "models" / "body", [("CT", "CT")])
        running = node_factory(start=False, rules_dir=str(folder),
                               models_dir=str(tmp_path / "models"),
                               peers={n: p.config() for n, p in peers.items()},
                               outbox={"timeout_seconds": 5, "max_attempts": 1})
        node = Node(load_config(running.config_path))
        made.append(node)
        return node

    yield make
    for node in made:
        node.outbox.stop(5)
        node.index.dispose()


def _receive(node: Node, folder: Path, slices: int = 3) -> tuple[int, list[Path]]:
    study_pk, paths = -1, testdata.synthetic_ct(folder, slices=slices, rows=16, columns=16)
    for path in paths:
        staged = node.files.tmp / path.name
        shutil.copyfile(path, staged)
        study_pk = node.store.ingest(staged, calling_ae_title="TESTSCU").study_pk
    return study_pk, paths


def _complete(node: Node, *study_pks: int) -> None:
    """Complete the study with the node's completion monitor settings, firing the rules
    (as the node does, without dispatching the jobs to worker processes: the test moves
    them on through the queue's own functions)."""
    monitor = CompletionMonitor(
        node.index, AssociationActivity(), quiet_seconds=node.config.completion.quiet_seconds,
        series_quiet_seconds=node.config.completion.series_quiet_seconds,
        listeners=[lambda pk: node.trigger.on_study(pk, trigger=JobTrigger.COMPLETE)])
    assert set(study_pks) <= set(monitor.check(now=utcnow() + dt.timedelta(minutes=1)))


def _status(node: Node, study_pk: int) -> StudyStatus:
    statuses = study_statuses(node.index, [study_pk])
    with node.index.session() as session:  # the expression compares as retention uses it
        matching = session.scalars(select(Study.id).where(
            study_status() == statuses[study_pk].value)).all()
    assert study_pk in matching
    reported = {s["id"]: s["status"] for s in studies_report(node.index)["studies"]}
    assert reported[study_pk] == statuses[study_pk].value
    return statuses[study_pk]


def _job(node: Node, study_pk: int) -> int:
    with node.index.session() as session:
        return int(session.scalars(select(Job.id).where(Job.study_pk == study_pk)).one())


def _stored_files(node: Node, study_pk: int) -> list[Path]:
    with node.index.session() as session:
        return [node.files.root / p for p in session.scalars(
            select(Instance.file_path).join(Series).where(Series.study_pk == study_pk))]


DONE: dict[str, Any] = {"ok": True, "timings": {}, "results": []}


def test_study_status_follows_jobs_and_outbox_items_to_results_sent(
        make_node: Any, tmp_path: Path) -> None:
    node = make_node(RULES)
    study, paths = _receive(node, tmp_path / "a")
    assert _status(node, study) is StudyStatus.RECEIVING

    _complete(node, study)  # ct-now fires: a pending job
    assert _status(node, study) is StudyStatus.READY
    job = _job(node, study)
    assert claim(node.index, job)
    assert _status(node, study) is StudyStatus.PROCESSING
    assert finish(node.index, job, DONE, max_attempts=3) is JobState.DONE
    node.outbox.enqueue(_stored_files(node, study), ["pacs"], job_pk=job)
    assert _status(node, study) is StudyStatus.PROCESSING  # results waiting to be sent
    report = node.outbox.deliver_due()
    assert report.sent == 3
    assert _status(node, study) is StudyStatus.RESULTS_SENT
    body, _ = metrics_text(node.index, refused=RefusalCounter(),
                           storage_path=node.config.storage.path)
    assert 'dicomnode_studies_by_status{status="results sent"} 1.0' in body.decode()
    assert 'dicomnode_studies_by_status{status="failed"} 0.0' in body.decode()

    # a late instance re-opens it
    more = testdata.synthetic_ct(tmp_path / "late", slices=1, rows=16, columns=16,
                                 study_uid=str(pydicom.dcmread(paths[0]).StudyInstanceUID))
    staged = node.files.tmp / more[0].name
    shutil.copyfile(more[0], staged)
    node.store.ingest(staged, calling_ae_title="TESTSCU")
    assert _status(node, study) is StudyStatus.RECEIVING


def test_study_status_failed_by_a_job_or_an_outbox_item(make_node: Any, tmp_path: Path) -> None:
    node = make_node(RULES)
    failing, _ = _receive(node, tmp_path / "a")
    refused, _ = _receive(node, tmp_path / "b")
    _complete(node, failing, refused)
    failing_job, refused_job = _job(node, failing), _job(node, refused)

    assert claim(node.index, failing_job)
    state = finish(node.index, failing_job, {"ok": False, "error": "model refused the input",
                                             "permanent": True}, max_attempts=3)
    assert state is JobState.FAILED
    assert _status(node, failing) is StudyStatus.FAILED

    assert claim(node.index, refused_job)
    finish(node.index, refused_job, DONE, max_attempts=3)
    node.outbox.enqueue(_stored_files(node, refused), ["refuses"], job_pk=refused_job)
    assert node.outbox.deliver_due().failed == 3  # 0xA900: final
    with node.index.session() as session:
        assert set(session.scalars(select(OutboxItem.state))) == {OutboxState.FAILED}
    assert _status(node, refused) is StudyStatus.FAILED


def test_study_status_waiting_for_series_when_a_rule_gave_up(
        make_node: Any, tmp_path: Path) -> None:
    node = make_node(REQUIRED)
    study, _ = _receive(node, tmp_path / "a")
    _complete(node, study)  # the rule waits for "PET AC": no job yet
    assert _status(node, study) is StudyStatus.READY
    rule = node.rules.get("ct-with-pet")
    (firing,) = node.trigger.on_incomplete(study, [rule])
    assert firing.existing_job is not None  # a discarded job records that it gave up
    with node.index.session() as session:
        job = session.get(Job, firing.existing_job)
        assert job is not None
        assert (job.state, job.trigger) == (JobState.DISCARDED, JobTrigger.INCOMPLETE)
    assert _status(node, study) is StudyStatus.WAITING_FOR_SERIES
