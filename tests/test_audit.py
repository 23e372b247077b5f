"""The audit trail: every transition of a study and its jobs leaves one append-only event
with keys only (no identity), read back by `dicomnode audit`, the console's API and its
study page. In-process on a real index, a real store and a real C-STORE peer."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import testdata
from conftest import NodeFactory, start_storage_scp, write_model_card
from sqlalchemy import select

from dicomnode.config import load_config
from dicomnode.jobs.queue import claim, finish
from dicomnode.node import Node
from dicomnode.scheduler import apply_retention
from dicomnode.states import JobTrigger
from dicomnode.store import audit
from dicomnode.store.audit import EventKind
from dicomnode.store.tables import Event, Job, utcnow

ROOT = Path(__file__).resolve().parents[1]

RULES = '''rules:
  - name: ct-now
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT"
    model: body
    send_to: [dest]
'''


@pytest.fixture
def peer() -> Iterator[tuple[int, list[Any]]]:
    received: list[Any] = []

    def on_store(event: Any) -> int:
        received.append(event.dataset.SOPInstanceUID)
        return 0x0000

    port, server = start_storage_scp("DEST", on_store)
    yield port, received
    server.shutdown()


def _node(node_factory: NodeFactory, tmp_path: Path, port: int) -> Node:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "main.yaml").write_text(RULES)
    write_model_card(tmp_path / "models" / "body", [("CT", "CT")])
    running = node_factory(start=False, rules_dir=str(rules),
                           models_dir=str(tmp_path / "models"),
                           peers={"dest": {"ae_title": "DEST", "host": "127.0.0.1",
                                           "port": port}})
    node = Node(load_config(running.config_path))
    node.completion.listeners.clear()  # the test fires the rules itself (no worker process)
    node.completion.settled_listeners.clear()
    return node


def _receive(node: Node, files: list[Path], association: object) -> int:
    study_pk = -1
    for path in files:
        staged = node.files.tmp / path.name
        shutil.copyfile(path, staged)
        study_pk = node.store.ingest(staged, calling_ae_title="TESTSCU").study_pk
        node.activity.touch(association, study_pk)
    node.activity.close(association)
    return study_pk


def _kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


def test_the_trail_of_a_study_from_receipt_to_retention(
        node_factory: NodeFactory, tmp_path: Path, peer: tuple[int, list[Any]]) -> None:
    port, received = peer
    node = _node(node_factory, tmp_path, port)
    try:
        files = testdata.synthetic_ct(tmp_path / "ct", slices=5, rows=16, columns=16)
        study_pk = _receive(node, files[:4], "association-1")
        later = utcnow() + dt.timedelta(minutes=1)
        assert node.completion.check(now=later) == [study_pk]
        # a late instance of the same series re-opens it; it completes again
        _receive(node, files[4:], "association-2")
        assert node.completion.check(now=later + dt.timedelta(minutes=2)) == [study_pk]
        (firing,) = node.trigger.on_study(study_pk, trigger=JobTrigger.COMPLETE)
        assert firing.job_id is not None
        job_id = firing.job_id
        for _ in range(2):  # the same decision again is recorded once
            (again,) = node.trigger.on_study(study_pk, trigger=JobTrigger.COMPLETE)
            assert again.job_id is None and again.existing_job == job_id
        assert claim(node.index, job_id)
        result = files[0]  # stands for a result object: a real DICOM file to send
        finish(node.index, job_id, {"ok": True, "timings": {"model": 0.1},
                                    "results": [{"kind": "SEG"}]}, 3)
        node.outbox.enqueue([result], ["dest"], job_pk=job_id)
        assert node.outbox.deliver_due().sent == 1
        assert len(received) == 1
        deleted = apply_retention(node.index, node.files, 0, utcnow() + dt.timedelta(days=2))
        assert deleted == 5

        report = audit.audit_report(node.index, study_uid=_study_uid(files[0]))
        events = report["events"]
        assert report["study"] == study_pk
        assert _kinds(events) == [
            "series.received", "study.received", "study.completed", "study.reopened",
            "study.received", "study.completed", "rule.fired", "rule.not_fired",
            "job.claimed", "job.finished", "item.sent", "retention.deleted"]
        by_kind = {e["kind"]: e for e in events}
        assert [e["details"].get("instances") for e in events
                if e["kind"] == "study.received"] == [4, 1]
        assert by_kind["rule.fired"]["job"] == job_id
        assert by_kind["rule.fired"]["details"] == {
            "rule": "ct-now", "model": "body", "trigger": "complete", "version": 1,
            "reason": "fired"}
        assert by_kind["rule.not_fired"]["details"]["reason"].startswith("already fired as job")
        assert by_kind["job.finished"]["details"]["objects"] == 1
        assert by_kind["item.sent"]["details"] == {
            "rule": "ct-now", "model": "body", "item": 1, "peer": "dest", "status": 0,
            "attempts": 1}
        assert by_kind["retention.deleted"]["details"] == {"instances": 5}
        assert all(e["study"] == study_pk for e in events)
        _no_identity(json.dumps(report), files[0])
        assert [e["kind"] for e in audit.audit_report(node.index, job_id=job_id)["events"]] == [
            "rule.fired", "rule.not_fired", "job.claimed", "job.finished", "item.sent"]

        # the command line reads the same
        config = str(node.config.source)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        out = subprocess.run([sys.executable, "-m", "dicomnode", "audit", "--study",
                              _study_uid(files[0]), "--json", "--config", config],
                             capture_output=True, text=True, timeout=120, env=env)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["events"] == events
        text = subprocess.run([sys.executable, "-m", "dicomnode", "audit", "--job",
                               str(job_id), "--config", config],
                              capture_output=True, text=True, timeout=120, env=env)
        assert text.returncode == 0, text.stderr
        assert f"job {job_id}: 5 event(s)" in text.stdout and "item.sent" in text.stdout
        missing = subprocess.run([sys.executable, "-m", "dicomnode", "audit", "--study",
                                  "1.2.3", "--config", config],
                                 capture_output=True, text=True, timeout=120, env=env)
        assert missing.returncode == 1 and "no such study" in missing.stderr
    finally:
        node.index.dispose()


def _study_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _no_identity(text: str, source: Path) -> None:
    ds = pydicom.dcmread(source, stop_before_pixels=True)
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientID",
                    "PatientName", "PatientBirthDate", "AccessionNumber"):
        value = str(ds.get(keyword) or "")
        if value:
            assert value not in text, f"{keyword} in the audit trail"


def test_a_job_failing_records_its_attempts_with_the_model_digest(
        node_factory: NodeFactory, tmp_path: Path, peer: tuple[int, list[Any]]) -> None:
    node = _node(node_factory, tmp_path, peer[0])
    try:
        study_pk = _receive(node, testdata.synthetic_ct(tmp_path / "ct", slices=3, rows=16,
                                                        columns=16), "a")
        node.completion.settle_study(study_pk)
        (firing,) = node.trigger.on_study(study_pk, trigger=JobTrigger.MANUAL)
        job_id = firing.job_id
        assert job_id is not None
        digest = "ab" * 32
        for attempt in (1, 2):
            assert claim(node.index, job_id)
            with node.index.session() as session, session.begin():  # what the worker writes
                audit.record(session, EventKind.JOB_STARTED, job_id=job_id, model="body",
                             model_version="0.0.1", digest=digest)
            finish(node.index, job_id, {"ok": False, "permanent": False,
                                        "error": f"RuntimeError: attempt {attempt}"}, 2)
        with node.index.session() as session:
            events = [audit.event_json(e) for e in audit.job_events(session, job_id)]
        assert _kinds(events) == ["rule.fired", "job.claimed", "job.started", "job.retrying",
                                  "job.claimed", "job.started", "job.failed"]
        failed = events[-1]["details"]
        assert failed["digest"] == digest and failed["model_version"] == "0.0.1"
        assert failed["attempts"] == 2 and failed["error"] == "RuntimeError: attempt 2"
        assert events[3]["details"]["digest"] == digest
    finally:
        node.index.dispose()


def test_details_hold_only_allow_listed_keys_and_scalars(tmp_path: Path) -> None:
    from dicomnode.store.db import open_index

    index = open_index(f"sqlite:///{tmp_path / 'index.sqlite'}")
    try:
        with index.session() as session:
            with pytest.raises(ValueError, match="patient_name are not allowed"):
                audit.record(session, EventKind.STUDY_COMPLETED, study_pk=1,
                             patient_name="Doe^John")
            with pytest.raises(ValueError, match="not a key, count or short text"):
                audit.record(session, EventKind.STUDY_COMPLETED, study_pk=1,
                             reason={"a": "b"})
            with pytest.raises(ValueError, match="integers"):
                audit.record(session, EventKind.STUDY_COMPLETED, study_pk=1,
                             series=["1.2.3"])
            assert session.scalars(select(Event)).all() == []
    finally:
        index.dispose()


def test_an_approval_names_the_user_and_the_job(
        node_factory: NodeFactory, tmp_path: Path, peer: tuple[int, list[Any]]) -> None:
    node = _node(node_factory, tmp_path, peer[0])
    try:
        study_pk = _receive(node, testdata.synthetic_ct(tmp_path / "ct", slices=3, rows=16,
                                                        columns=16), "a")
        node.completion.settle_study(study_pk)
        (firing,) = node.trigger.on_study(study_pk, trigger=JobTrigger.MANUAL)
        assert firing.job_id is not None
        with node.index.session() as session, session.begin():
            audit.approved(session, firing.job_id, user="dr.who")
            with pytest.raises(ValueError, match="1 to 64"):
                audit.approved(session, firing.job_id, user="")
        with node.index.session() as session:
            last = audit.job_events(session, firing.job_id)[-1]
            assert (last.kind, last.study_pk, last.details) == (
                "job.approved", study_pk, {"user": "dr.who", "rule": "ct-now", "model": "body"})
    finally:
        node.index.dispose()


def test_no_code_updates_or_deletes_events() -> None:
    """Append-only: the only writer inserts; nothing in the package updates or deletes an
    event (by the ORM or by SQL)."""
    pattern = re.compile(r"(update|delete)\(\s*Event\b|(UPDATE|DELETE\s+FROM)\s+event\b|"
                         r"session\.delete\(\s*event", re.IGNORECASE)
    offenders = [f"{path.relative_to(ROOT)}:{n}" for path in (ROOT / "dicomnode").rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert offenders == []
    # and the one writer only adds rows
    source = (ROOT / "dicomnode" / "store" / "audit.py").read_text()
    assert "session.add(event)" in source and ".delete(" not in source


def test_a_claim_that_loses_records_nothing(
        node_factory: NodeFactory, tmp_path: Path, peer: tuple[int, list[Any]]) -> None:
    """A claim that loses (the job is no longer pending) records nothing."""
    node = _node(node_factory, tmp_path, peer[0])
    try:
        study_pk = _receive(node, testdata.synthetic_ct(tmp_path / "ct", slices=3, rows=16,
                                                        columns=16), "a")
        node.completion.settle_study(study_pk)
        (firing,) = node.trigger.on_study(study_pk, trigger=JobTrigger.MANUAL)
        assert firing.job_id is not None
        assert claim(node.index, firing.job_id)
        assert not claim(node.index, firing.job_id)
        with node.index.session() as session:
            kinds = session.scalars(select(Event.kind).where(
                Event.job_id == firing.job_id)).all()
            assert list(kinds) == ["rule.fired", "job.claimed"]
            assert session.get(Job, firing.job_id) is not None
    finally:
        node.index.dispose()
