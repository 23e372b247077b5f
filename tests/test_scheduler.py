"""Scheduled rules (off-hours batches) and retention, on real index files and real stores."""

from __future__ import annotations

import datetime as dt
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import testdata
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from conftest import NodeFactory, RunningNode, write_model_card
from sqlalchemy import delete, func, select, update

from dicomnode.config import load_config
from dicomnode.node import Node
from dicomnode.scheduler import (
    SCHEDULE_MISFIRE_GRACE,
    apply_retention,
    install_scheduled_jobs,
    missed_fire_time,
    run_scheduled_rule,
)
from dicomnode.store.db import open_index
from dicomnode.store.tables import (
    Instance,
    Job,
    JobState,
    OutboxItem,
    OutboxState,
    Patient,
    RuleSchedule,
    Series,
    Study,
    StudyState,
    utcnow,
)

RULES = '''rules:
  - name: ct-nightly
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT" AND NumImages >= 10
    model: body
    schedule: "0 3 * * *"
  - name: ct-minutely
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT"
    model: body
    schedule: "* * * * *"
  - name: ct-off
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT"
    model: body
    schedule: "0 4 * * *"
    enabled: false
  - name: ct-now
    select: SELECT study WHERE series NAMED "CT" HAS Modality = "CT"
    model: body
'''

NIGHTLY = "cron[month='*', day='*', day_of_week='*', hour='3', minute='0']"


def _node(node_factory: NodeFactory, tmp_path: Path, *, rules: str | None = None,
          **overrides: Any) -> tuple[RunningNode, Node]:
    """A node configuration (for a later `dicomnode serve`) and an in-process, unstarted Node."""
    if rules is not None:
        folder = tmp_path / "rules"
        folder.mkdir(exist_ok=True)
        (folder / "main.yaml").write_text(rules)
        write_model_card(tmp_path / "models" / "body", [("CT", "CT")])
        overrides = {"rules_dir": str(folder), "models_dir": str(tmp_path / "models"),
                     **overrides}
    running = node_factory(start=False, **overrides)
    return running, Node(load_config(running.config_path))


@pytest.fixture
def nodes() -> Iterator[list[Node]]:
    made: list[Node] = []
    yield made
    for node in made:
        if node.scheduler.running:
            node.scheduler.shutdown(wait=False)
        node.index.dispose()


def _receive(node: Node, folder: Path, slices: int = 12) -> int:
    """Store one new CT study in-process; returns its study key."""
    study_pk = -1
    for path in testdata.synthetic_ct(folder, slices=slices, rows=16, columns=16):
        staged = node.files.tmp / path.name
        shutil.copyfile(path, staged)
        study_pk = node.store.ingest(staged, calling_ae_title="TESTSCU").study_pk
    return study_pk


def _complete(node: Node, study_pk: int, at: dt.datetime) -> None:
    """Complete quiet studies the way the node does (listeners fire), then date it ``at``."""
    assert study_pk in node.completion.check(now=utcnow() + dt.timedelta(minutes=1))
    with node.index.session() as session:
        session.execute(update(Study).where(Study.id == study_pk).values(completed_at=at))
        session.commit()


def _jobs(node: Node, rule: str) -> list[Job]:
    with node.index.session() as session:
        return list(session.scalars(select(Job).where(Job.rule_name == rule)
                                    .order_by(Job.id)).all())


def test_scheduled_rule_runs_in_batches_over_studies_completed_since_its_last_run(
        node_factory: NodeFactory, tmp_path: Path, nodes: list[Node]) -> None:
    _, node = _node(node_factory, tmp_path, rules=RULES)
    nodes.append(node)
    nightly = node.rules.get("ct-nightly")
    t0 = utcnow().replace(microsecond=0)

    a = _receive(node, tmp_path / "a")
    _complete(node, a, t0 - dt.timedelta(days=2))
    # on arrival only the unscheduled rule fires
    assert [j.study_pk for j in _jobs(node, "ct-now")] == [a]
    assert _jobs(node, "ct-nightly") == []

    first = run_scheduled_rule(node.index, node.trigger, nightly, t0 - dt.timedelta(days=1))
    assert (first.studies, first.jobs, first.failed) == (1, 1, 0)
    (job,) = _jobs(node, "ct-nightly")
    assert (job.study_pk, job.trigger, job.state) == (a, "schedule", JobState.PENDING)
    with node.index.session() as session:
        row = session.get(RuleSchedule, "ct-nightly")
        assert row is not None and row.last_run_at == t0 - dt.timedelta(days=1)

    # b completes later, with no run in between (the node was down at 03:00, say); d was
    # stamped complete 5 minutes before the first run started but committed after it
    b = _receive(node, tmp_path / "b")
    _complete(node, b, t0 - dt.timedelta(hours=12))
    d = _receive(node, tmp_path / "d")
    _complete(node, d, t0 - dt.timedelta(days=1, minutes=5))
    receiving = _receive(node, tmp_path / "c")  # never completes: never evaluated

    second = run_scheduled_rule(node.index, node.trigger, nightly, t0)
    assert (second.studies, second.jobs) == (2, 2)
    assert sorted(j.study_pk for j in _jobs(node, "ct-nightly")) == sorted([a, b, d])

    third = run_scheduled_rule(node.index, node.trigger, nightly, t0 + dt.timedelta(days=1))
    assert (third.studies, third.jobs) == (0, 0)

    # a rule run over everything again fires nothing twice
    with node.index.session() as session:
        session.execute(delete(RuleSchedule))
        session.commit()
    again = run_scheduled_rule(node.index, node.trigger, nightly, t0 + dt.timedelta(days=2))
    assert (again.studies, again.jobs) == (3, 0)
    assert receiving not in {j.study_pk for j in _jobs(node, "ct-nightly")}
    assert len(_jobs(node, "ct-nightly")) == 3
    assert [j.trigger for j in _jobs(node, "ct-now")] == ["complete"] * 3


def test_install_adds_a_cron_job_per_enabled_scheduled_rule_and_retention(
        node_factory: NodeFactory, tmp_path: Path, nodes: list[Node]) -> None:
    _, node = _node(node_factory, tmp_path, rules=RULES,
                    retention={"raw_days": 30, "check_interval_minutes": 15})
    nodes.append(node)
    with node.index.session() as session:  # ct-minutely last ran 10 minutes ago
        session.add(RuleSchedule(rule_name="ct-minutely",
                                 last_run_at=utcnow() - dt.timedelta(minutes=10)))
        session.commit()
    install_scheduled_jobs(node)

    nightly = node.scheduler.get_job("rule:ct-nightly")
    assert nightly is not None and isinstance(nightly.trigger, CronTrigger)
    assert str(nightly.trigger) == NIGHTLY
    assert str(nightly.trigger.timezone) == "UTC"
    assert (nightly.max_instances, nightly.coalesce) == (1, True)
    assert nightly.misfire_grace_time == SCHEDULE_MISFIRE_GRACE.total_seconds()
    assert nightly.args[2].name == "ct-nightly"
    assert node.scheduler.get_job("rule:ct-now") is None  # fires on arrival
    assert node.scheduler.get_job("rule:ct-off") is None  # disabled
    retention = node.scheduler.get_job("retention")
    assert retention is not None and isinstance(retention.trigger, IntervalTrigger)
    assert retention.trigger.interval == dt.timedelta(minutes=15)
    assert retention.args[2:] == (30.0, ("ct-minutely", "ct-nightly"))

    node.scheduler.start(paused=True)
    now = dt.datetime.now(dt.timezone.utc)
    next_three = (now + dt.timedelta(days=1 if now.hour >= 3 else 0)).replace(
        hour=3, minute=0, second=0, microsecond=0)
    assert node.scheduler.get_job("rule:ct-nightly").next_run_time == next_three
    # the run ct-minutely missed (the node was down) is made up at once; retention runs at start
    for job_id in ("rule:ct-minutely", "retention"):
        assert node.scheduler.get_job(job_id).next_run_time <= now

    _, plain = _node(node_factory, tmp_path / "plain")
    nodes.append(plain)
    install_scheduled_jobs(plain)
    assert plain.scheduler.get_jobs() == []


def test_missed_runs_are_made_up_only_within_the_grace_time() -> None:
    cron = CronTrigger.from_crontab("0 3 * * *", timezone="UTC")
    last = dt.datetime(2026, 1, 1, 3, 0, 5)
    utc = dt.timezone.utc
    due = dt.datetime(2026, 1, 2, 3, 0, tzinfo=utc)
    assert missed_fire_time(cron, last, dt.datetime(2026, 1, 2, 3, 20)) == due
    assert missed_fire_time(cron, last, dt.datetime(2026, 1, 2, 9, 0)) is None  # too late
    assert missed_fire_time(cron, last, dt.datetime(2026, 1, 2, 2, 0)) is None  # not yet due
    assert missed_fire_time(cron, None, dt.datetime(2026, 1, 2, 3, 20)) is None  # never ran
    # the run itself, started on time, missed nothing
    assert missed_fire_time(cron, dt.datetime(2026, 1, 2, 3, 0, 1),
                            dt.datetime(2026, 1, 2, 3, 20)) is None


def _deliveries(node: Node, study_pk: int, *states: tuple[JobState, list[tuple[OutboxState,
                dt.datetime | None]]]) -> None:
    """Give a study jobs in ``states``, each with outbox items (state, sent_at)."""
    with node.index.session() as session:
        for number, (job_state, items) in enumerate(states):
            job = Job(rule_name=f"rule{number}", model="body", study_pk=study_pk,
                      inputs_key=f"{study_pk}-{number}", bindings=[], trigger="complete",
                      state=job_state)
            session.add(job)
            session.flush()
            for k, (state, sent_at) in enumerate(items):
                session.add(OutboxItem(sop_instance_uid=f"2.25.{study_pk}{number}{k}",
                                       sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
                                       file_path=f"/results/{job.id}/{k}.dcm",
                                       destination="pacs", state=state, sent_at=sent_at,
                                       job_pk=job.id))
        session.commit()


def _files(node: Node, study_pk: int) -> list[Path]:
    with node.index.session() as session:
        return [node.files.root / p for p in session.scalars(
            select(Instance.file_path).join(Series).where(Series.study_pk == study_pk)).all()]


def _count(node: Node, table: Any) -> int:
    with node.index.session() as session:
        return int(session.scalar(select(func.count()).select_from(table)) or 0)


def test_retention_deletes_only_fully_delivered_studies_older_than_raw_days(
        node_factory: NodeFactory, tmp_path: Path, nodes: list[Node]) -> None:
    _, node = _node(node_factory, tmp_path)
    nodes.append(node)
    now = utcnow()
    old, recent = now - dt.timedelta(days=40), now - dt.timedelta(days=1)
    sent, pending = OutboxState.SENT, OutboxState.PENDING
    done = JobState.DONE
    studies: dict[str, int] = {}
    for name in ("delivered", "pending-item", "failed-job", "failed-item", "recent", "no-jobs",
                 "reopened"):
        studies[name] = _receive(node, tmp_path / name, slices=4)
        _complete(node, studies[name], now - dt.timedelta(days=41))
    _deliveries(node, studies["delivered"], (done, [(sent, old), (sent, old)]),
                (done, [(sent, now - dt.timedelta(days=35))]))
    _deliveries(node, studies["pending-item"], (done, [(sent, old), (pending, None)]))
    _deliveries(node, studies["failed-job"], (done, [(sent, old)]), (JobState.FAILED, []))
    _deliveries(node, studies["failed-item"], (done, [(sent, old), (OutboxState.FAILED, None)]))
    _deliveries(node, studies["recent"], (done, [(sent, old)]), (done, [(sent, recent)]))
    _deliveries(node, studies["reopened"], (done, [(sent, old)]))
    with node.index.session() as session:  # a late instance re-opened it
        session.execute(update(Study).where(Study.id == studies["reopened"])
                        .values(state=StudyState.RECEIVING, completed_at=None))
        session.commit()
    delivered = _files(node, studies["delivered"])
    assert len(delivered) == 4 and all(p.is_file() for p in delivered)
    delivered[0].unlink()  # a file already gone is not an error
    kept = [p for name, pk in studies.items() if name != "delivered" for p in _files(node, pk)]
    jobs, items, patients = _count(node, Job), _count(node, OutboxItem), _count(node, Patient)

    # a scheduled rule that has not yet run over the study holds it back
    assert apply_retention(node.index, node.files, 30, now, scheduled_rules=["ct-nightly"]) == 0
    with node.index.session() as session:
        session.add(RuleSchedule(rule_name="ct-nightly", last_run_at=now - dt.timedelta(days=41)))
        session.commit()
    assert apply_retention(node.index, node.files, 30, now, scheduled_rules=["ct-nightly"]) == 0
    with node.index.session() as session:
        session.execute(update(RuleSchedule).values(last_run_at=now - dt.timedelta(hours=1)))
        session.commit()
    assert all(p.is_file() for p in delivered[1:])

    assert apply_retention(node.index, node.files, 30, now, scheduled_rules=["ct-nightly"]) == 4
    assert not any(p.exists() for p in delivered)
    assert _files(node, studies["delivered"]) == []
    assert all(p.is_file() for p in kept)
    assert len(kept) == 4 * (len(studies) - 1) == _count(node, Instance)
    # patient, study and series rows stay, and so do the jobs and their outbox items
    assert (_count(node, Job), _count(node, OutboxItem), _count(node, Patient)) == (
        jobs, items, patients)
    with node.index.session() as session:
        study = session.get(Study, studies["delivered"])
        assert study is not None and len(study.series) == 1
    assert apply_retention(node.index, node.files, 30, now) == 0

    # "recent" goes once its newest delivery is raw_days old; never before it settled
    assert apply_retention(node.index, node.files, 0.5, now) == 4
    assert not any(p.exists() for p in _files(node, studies["recent"]))
    young = _receive(node, tmp_path / "young", slices=4)
    _complete(node, young, now - dt.timedelta(minutes=1))
    _deliveries(node, young, (done, [(sent, now - dt.timedelta(minutes=1))]))
    assert apply_retention(node.index, node.files, 0, now) == 0


def _wait_log(node: RunningNode, text: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log():
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not logged:\n{node.log()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.slow
def test_node_applies_retention_and_a_restart_does_not_index_deleted_files_again(
        node_factory: NodeFactory, tmp_path: Path) -> None:
    running, node = _node(node_factory, tmp_path,
                          retention={"raw_days": 30, "check_interval_minutes": 60})
    now = utcnow()
    gone = _receive(node, tmp_path / "gone", slices=6)
    _complete(node, gone, now - dt.timedelta(days=41))
    kept = _receive(node, tmp_path / "kept", slices=6)
    _complete(node, kept, now - dt.timedelta(days=41))
    _deliveries(node, gone, (JobState.DONE, [(OutboxState.SENT, now - dt.timedelta(days=40))]))
    _deliveries(node, kept, (JobState.DONE, [(OutboxState.PENDING, None)]))
    gone_files, kept_files = _files(node, gone), _files(node, kept)
    node.index.dispose()

    running.start()  # the first retention pass runs at start
    _wait_log(running, f"retention: deleted 6 received instance(s) of study {gone}")
    assert not any(p.exists() for p in gone_files)
    assert all(p.is_file() for p in kept_files)
    assert running.terminate() == 0

    before = len(running.log())
    running.start()  # the log already says "listening as": wait for the second time
    deadline = time.monotonic() + 20
    while "listening as" not in running.log()[before:] and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert running.terminate() == 0
    restarted = running.log()[before:]
    assert "listening as" in restarted
    assert "stored file(s) whose index row was lost" not in restarted
    assert "retention: deleted" not in restarted
    index = open_index(f"sqlite:///{running.store / 'index.sqlite'}", create=False)
    try:
        with index.session() as session:
            counts = {pk: n for pk, n in session.execute(
                select(Series.study_pk, func.count(Instance.id))
                .join(Instance, Instance.series_pk == Series.id, isouter=True)
                .group_by(Series.study_pk)).all()}
            assert counts == {gone: 0, kept: 6}
            assert session.get(Study, gone) is not None
    finally:
        index.dispose()
    assert not any(p.exists() for p in gone_files)
