"""Notifications: webhooks (a local HTTP server in a thread) and mail (aiosmtpd as the SMTP
server) for failed jobs, failed deliveries, sent results and the daily summary; durable in
the index and retried like the outbox; templates from allow-listed fields only."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiosmtpd.controller import Controller
from conftest import NodeFactory, free_port, storescu, wait_until
from sqlalchemy import select

from dicomnode.config import Config, ConfigError, load_config
from dicomnode.jobs.queue import claim, finish
from dicomnode.send.notify import Notifier
from dicomnode.states import JobTrigger, OutboxState
from dicomnode.store import audit
from dicomnode.store.audit import EventKind
from dicomnode.store.db import Index, open_index
from dicomnode.store.tables import Event, Notification, utcnow

ROOT = Path(__file__).resolve().parents[1]


class Webhook:
    """An HTTP server in a thread recording each POST's JSON body; answers ``status``."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.posts: list[dict[str, Any]] = []
        self.status = status
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                hook.posts.append({"path": self.path, "headers": dict(self.headers),
                                   "body": json.loads(self.rfile.read(length))})
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """aiosmtpd on a free loopback port keeping every message it accepts."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        box = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                box.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                     message_from_bytes(envelope.content)))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    yield box
    box.close()


def _config(tmp_path: Path, targets: dict[str, Any], **notify: Any) -> Config:
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"path": "store", "min_free_bytes": 0},
        "notify": {"targets": targets, "retry_initial_seconds": 1, **notify}}))
    return load_config(path)


def _index(config: Config) -> Index:
    config.storage.path.mkdir(parents=True, exist_ok=True)
    return open_index(config.db_url)


def _failed_job(index: Index) -> int:
    """A job that fails for good through the queue (the path the node's runner takes)."""
    from dicomnode.store.tables import Job, Patient, Study

    with index.session() as session, session.begin():
        patient = Patient(patient_id="PID-1234", patient_name="Doe^Jane")
        study = Study(study_instance_uid="1.2.826.0.1.3680043.2.1125.77", patient=patient,
                      accession_number="ACC-99")
        job = Job(rule_name="ct-now", model="body", study=study, inputs_key="k",
                  bindings=[], trigger=JobTrigger.COMPLETE)
        session.add(job)
        session.flush()
        job_id = job.id
    assert claim(index, job_id)
    finish(index, job_id, {"ok": False, "permanent": True,
                           "error": "CardError: file 'model.onnx' not found"}, 3)
    return job_id


def test_an_unreachable_webhook_is_retried_then_succeeds(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there yet
    config = _config(tmp_path, {"oncall": {"webhook": {"url": f"http://127.0.0.1:{port}/x",
                                                       "timeout_seconds": 2},
                                           "events": ["job_failed"]}})
    index = _index(config)
    notifier = Notifier(config, index)
    notifier.install()
    try:
        job_id = _failed_job(index)
        now = utcnow()
        assert notifier.tick(now) == 0
        with index.session() as session:
            (item,) = session.scalars(select(Notification)).all()
            assert item.state is OutboxState.PENDING and item.attempts == 1
            assert "webhook unreachable" in (item.last_error or "")
            assert item.next_attempt_at == now + dt.timedelta(seconds=1)
        hook = Webhook(port)
        try:
            assert notifier.tick(now + dt.timedelta(seconds=0.5)) == 0  # not due yet
            assert hook.posts == []
            assert notifier.tick(now + dt.timedelta(seconds=1)) == 1
            assert notifier.tick(now + dt.timedelta(seconds=60)) == 0  # sent once
            (post,) = hook.posts
        finally:
            hook.close()
        body = post["body"]
        assert post["headers"]["Content-Type"] == "application/json"
        assert body["event"] == "job_failed"
        assert body["fields"]["job"] == job_id and body["fields"]["rule"] == "ct-now"
        assert body["subject"] == f"dicomnode DICOMNODE: job {job_id} failed"
        assert "failed after 1 attempt(s): CardError: file <value hidden> not found" in \
            body["text"]
        text = json.dumps(body)
        for identity in ("1.2.826.0.1.3680043.2.1125.77", "PID-1234", "Doe", "ACC-99"):
            assert identity not in text
        with index.session() as session:
            (item,) = session.scalars(select(Notification)).all()
            assert item.state is OutboxState.SENT and item.attempts == 2
    finally:
        notifier.uninstall()
        index.dispose()


def test_a_refusing_webhook_fails_for_good_and_the_job_path_never_waits(
        tmp_path: Path, webhook: Webhook) -> None:
    webhook.status = 404
    config = _config(tmp_path, {"hook": {"webhook": {"url": webhook.url},
                                         "events": ["job_failed"]}})
    index = _index(config)
    notifier = Notifier(config, index)
    notifier.install()
    try:
        started = time.monotonic()
        _failed_job(index)
        assert time.monotonic() - started < 2 and webhook.posts == []  # only queued
        assert notifier.tick() == 0
        with index.session() as session:
            (item,) = session.scalars(select(Notification)).all()
            assert item.state is OutboxState.FAILED and item.last_error == "HTTP 404"
        assert len(webhook.posts) == 1
    finally:
        notifier.uninstall()
        index.dispose()


def test_the_daily_summary_counts_the_day_once(tmp_path: Path, mailbox: Mailbox) -> None:
    config = _config(tmp_path, {"team": {
        "email": {"host": "127.0.0.1", "port": mailbox.port, "sender": "node@example.org",
                  "to": ["physics@example.org", "it@example.org"]},
        "events": ["daily_summary"], "summary_at": "07:00"}})
    index = _index(config)
    notifier = Notifier(config, index)
    day = dt.datetime(2026, 3, 10, 7, 0)
    inside = [day - dt.timedelta(hours=h) for h in (1, 5, 23)]
    with index.session() as session, session.begin():
        def add(kind: EventKind, at: dt.datetime, study: int | None = None,
                **details: Any) -> None:
            session.add(Event(kind=kind.value, at=at, study_pk=study, details=details or None))

        for n, at in enumerate(inside):
            add(EventKind.SERIES_RECEIVED, at, n + 1)
            add(EventKind.STUDY_COMPLETED, at, n + 1)
        add(EventKind.SERIES_RECEIVED, inside[0], 1)  # a second series of study 1
        add(EventKind.JOB_FINISHED, inside[0])
        add(EventKind.JOB_FINISHED, inside[1])
        add(EventKind.JOB_FAILED, inside[2])
        add(EventKind.SENT, inside[0])
        add(EventKind.SEND_FAILED, inside[1])
        add(EventKind.RETENTION_DELETED, inside[1], 1, instances=120)
        add(EventKind.RETENTION_DELETED, inside[2], 2, instances=30)
        # outside the day: before it, and at the summary's time (the next day's)
        add(EventKind.JOB_FAILED, day - dt.timedelta(hours=25))
        add(EventKind.SERIES_RECEIVED, day, 9)
    try:
        assert notifier.queue_summaries(day - dt.timedelta(minutes=1)) == 0  # not yet
        assert notifier.queue_summaries(day + dt.timedelta(minutes=5)) == 1
        assert notifier.queue_summaries(day + dt.timedelta(hours=3)) == 0  # once a day
        assert notifier.deliver_due(day + dt.timedelta(minutes=5)) == 1
        (mail_from, rcpt, message) = mailbox.messages[0]
        assert len(mailbox.messages) == 1
        assert mail_from == "node@example.org"
        assert rcpt == ["physics@example.org", "it@example.org"]
        assert message["Subject"] == "dicomnode DICOMNODE: summary of 2026-03-10"
        body = message.get_payload(decode=True).decode()
        assert body.splitlines() == [
            "dicomnode DICOMNODE, 2026-03-10 (UTC):",
            "studies received: 3",
            "studies completed: 3",
            "jobs finished: 2",
            "jobs failed: 1",
            "result objects sent: 1",
            "deliveries failed: 1",
            "received instances deleted by retention: 150"]
        # the next day has its own
        assert notifier.queue_summaries(day + dt.timedelta(days=1, minutes=1)) == 1
    finally:
        index.dispose()


def test_templates_use_only_allow_listed_fields(tmp_path: Path) -> None:
    def target(**extra: Any) -> dict[str, Any]:
        return {"webhook": {"url": "http://127.0.0.1:9/x"}, "events": ["job_failed"], **extra}

    with pytest.raises(ConfigError, match=r"\$patient_name is not a field of job_failed "
                                          r"\(an identity field: only for a target with "
                                          r"identity: true\)"):
        _config(tmp_path, {"t": target(templates={"job_failed": {"body": "$patient_name"}})})
    with pytest.raises(ConfigError, match=r"\$uid is not a field of job_failed"):
        _config(tmp_path, {"t": target(templates={"job_failed": {"subject": "${uid}"}})})
    with pytest.raises(ConfigError, match=r"starts no field \(write \$\$"):
        _config(tmp_path, {"t": target(templates={"job_failed": {"body": "cost $5"}})})
    with pytest.raises(ConfigError, match="daily_summary needs summary_at"):
        _config(tmp_path, {"t": {**target(), "events": ["daily_summary"]}})
    with pytest.raises(ConfigError, match="either a webhook or an email"):
        _config(tmp_path, {"t": {"events": ["job_failed"]}})
    with pytest.raises(ConfigError, match="not an http:// or https:// URL"):
        _config(tmp_path, {"t": {"webhook": {"url": "ftp://x"}, "events": ["job_failed"]}})

    # a clinical channel may name the patient; its messages carry identity, others do not
    config = _config(tmp_path, {
        "ward": target(identity=True, templates={"job_failed": {
            "subject": "job $job failed for $patient_name ($accession_number)"}}),
        "ops": target()})
    index = _index(config)
    notifier = Notifier(config, index)
    notifier.install()
    try:
        _failed_job(index)
        with index.session() as session:
            payloads = {n.target: n.payload for n in session.scalars(select(Notification))}
        assert payloads["ward"]["subject"] == "job 1 failed for Doe^Jane (ACC-99)"
        assert "Doe" not in json.dumps(payloads["ops"])
    finally:
        notifier.uninstall()
        index.dispose()


def test_results_sent_is_told_once_when_the_last_item_of_a_job_is_delivered(
        tmp_path: Path) -> None:
    from dicomnode.store.tables import Job, OutboxItem, Study

    config = _config(tmp_path, {"hook": {"webhook": {"url": "http://127.0.0.1:9/x"},
                                         "events": ["results_sent", "delivery_failed"]}})
    index = _index(config)
    notifier = Notifier(config, index)
    notifier.install()
    try:
        with index.session() as session, session.begin():
            from dicomnode.store.tables import Patient

            study = Study(study_instance_uid="1.2.3.4", patient=Patient(patient_id="x"))
            job = Job(rule_name="r", model="m", study=study, inputs_key="k", bindings=[],
                      trigger=JobTrigger.COMPLETE)
            session.add(job)
            session.flush()
            items = [OutboxItem(sop_instance_uid=f"2.25.{k}", sop_class_uid="1.2", file_path="f",
                                destination=dest, job_pk=job.id)
                     for k, dest in enumerate(["pacs", "pacs", "tps"])]
            session.add_all(items)
            session.flush()
            ids = [i.id for i in items]

        def outcome(item_id: int, state: OutboxState) -> None:
            with index.session() as session, session.begin():
                item = session.get(OutboxItem, item_id)
                assert item is not None
                item.state, item.attempts = state, 1
                session.flush()
                audit.item_outcome(session, item_id, state, 0 if state is OutboxState.SENT
                                   else 0xA900)

        outcome(ids[0], OutboxState.SENT)
        outcome(ids[2], OutboxState.FAILED)
        with index.session() as session:
            assert [n.kind for n in session.scalars(select(Notification))] == [
                "delivery_failed"]
        outcome(ids[1], OutboxState.SENT)
        with index.session() as session:
            rows = {n.kind: n.payload for n in session.scalars(select(Notification))}
        assert set(rows) == {"delivery_failed", "results_sent"}
        assert rows["results_sent"]["fields"]["objects"] == 2
        assert rows["results_sent"]["fields"]["peers"] == "pacs"
        assert rows["delivery_failed"]["fields"]["status"] == "0xA900"
        assert rows["delivery_failed"]["fields"]["peer"] == "tps"
    finally:
        notifier.uninstall()
        index.dispose()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_failing_job_in_a_running_node_posts_once_and_mails_once(
        node_factory: NodeFactory, tmp_path: Path, webhook: Webhook, mailbox: Mailbox,
        small_ct: list[Path]) -> None:
    models = tmp_path / "models"
    shutil.copytree(ROOT / "models" / "ct-body", models / "ct-body")
    broken = b"not an onnx model"
    (models / "ct-body" / "model.onnx").write_bytes(broken)
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text("""rules:
  - name: ct-external
    select: SELECT study FROM patient WHERE series NAMED "ct" HAS Modality = "CT"
    model: ct-body
    send_to: [dest]
""")
    key = tmp_path / "deid.key"
    key.write_bytes(b"notify-test-key-0123456789")
    node = node_factory(
        peers={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": free_port()}},
        rules_dir=str(rules), models_dir=str(models), deid={"key_file": str(key)},
        pipeline={"max_attempts": 1},
        notify={"check_interval_seconds": 0.3, "targets": {
            "hook": {"webhook": {"url": webhook.url, "headers": {"Authorization": "Bearer t"}},
                     "events": ["job_failed", "results_sent"]},
            "mail": {"email": {"host": "127.0.0.1", "port": mailbox.port,
                               "sender": "node@example.org", "to": ["oncall@example.org"]},
                     "events": ["job_failed"]}}})
    assert storescu(node.port, *small_ct).returncode == 0
    wait_until(lambda: len(webhook.posts) >= 1 and len(mailbox.messages) >= 1, 90,
               "the webhook and the mail")
    time.sleep(1.5)  # several of the scheduler's ticks: nothing more comes
    (post,) = webhook.posts
    assert len(mailbox.messages) == 1
    assert post["headers"]["Authorization"] == "Bearer t"
    job = post["body"]["fields"]["job"]
    assert post["body"]["event"] == "job_failed" and post["body"]["fields"]["model"] == "ct-body"
    digest = hashlib.sha256(broken).hexdigest()
    assert post["body"]["fields"]["digest"] == digest
    _, rcpt, message = mailbox.messages[0]
    assert rcpt == ["oncall@example.org"]
    assert message["Subject"] == f"dicomnode DICOMNODE: job {job} failed"

    # the job's trail, with the digest of the model file that ran
    trail = json.loads(node.cli("audit", "--job", str(job), "--json").stdout)["events"]
    kinds = [e["kind"] for e in trail]
    assert kinds[:3] == ["rule.fired", "job.claimed", "job.started"]
    assert kinds[-1] == "job.failed"
    assert trail[2]["details"]["digest"] == trail[-1]["details"]["digest"] == digest
    assert "job.pseudonymized" in kinds
    uid = node.studies()[0]["study_instance_uid"]
    study_trail = json.loads(node.cli("audit", "--study", uid, "--json").stdout)["events"]
    study_kinds = [e["kind"] for e in study_trail]
    assert study_kinds[:2] == ["series.received", "study.received"]
    assert study_trail[1]["details"] == {"instances": len(small_ct)}
    assert "study.completed" in study_kinds and study_kinds[-len(kinds):] == kinds
    assert uid not in json.dumps(study_trail)

    # the console shows the same trail: API and the study page's timeline
    import httpx

    base = node.console_url()
    study = node.studies()[0]["id"]
    api = httpx.get(f"{base}/api/v1/studies/{study}/events", timeout=10).json()
    assert [e["kind"] for e in api["events"]] == [e["kind"] for e in study_trail]
    jobs = httpx.get(f"{base}/api/v1/jobs/{job}/events", timeout=10).json()
    assert [e["kind"] for e in jobs["events"]] == kinds
    assert httpx.get(f"{base}/api/v1/jobs/9999/events", timeout=10).status_code == 404
    page = httpx.get(f"{base}/studies/{study}", timeout=10).text
    assert "<h2>Timeline</h2>" in page and "job.failed" in page
