"""Scheduled work: off-hours batches of scheduled rules, and retention of received instances.

**Scheduled rules.** A rule with a ``schedule`` (a crontab line, in UTC) does not fire
when a study arrives; the scheduler runs it as a batch over every study that completed
since its previous run (:func:`run_scheduled_rule`). When each rule last ran is kept in
the index (:class:`~dicomnode.store.tables.RuleSchedule`), so a batch after a restart
covers the studies that completed while the node was down or between runs; the first
run of a rule covers every complete study. A run records its *start* time, so a study
completing during the run is evaluated by the next one; each run also looks
:data:`SCHEDULE_OVERLAP` further back than the previous start, because a study's
``completed_at`` is stamped a moment before it is committed. Evaluating a study twice
is harmless: a firing is unique per rule and input series (see
:mod:`dicomnode.rules.trigger`). A run that the node missed while it was down is made
up when the node starts, if it was due less than :data:`SCHEDULE_MISFIRE_GRACE` ago;
otherwise the studies wait for the next scheduled run (they are delayed, never missed).

**Retention.** With ``retention.raw_days`` set, received instances are deleted once
their study is fully processed and delivered (:func:`apply_retention`): the study is
complete, has at least one job, every job is ``done``, every outbox item of those jobs
is ``sent`` (at least one), the newest ``sent_at`` is more than ``raw_days`` old, the
study completed at least :data:`RETENTION_SETTLE` ago, and every enabled scheduled rule
has run over it. Only the instance files and their ``instance`` rows go: the patient,
study and series rows stay, and so do jobs and outbox items (they refer to the study).
Rows are deleted in a transaction that is committed only after the files are unlinked
(and, with ``storage.fsync``, the unlinks made durable): a crash in between leaves rows
whose files are gone, which the next pass removes; never a file without a row, which
start-up recovery would index again as a new receipt.

**Scheduled pulls.** Each entry of ``pulls:`` is a cron job (id ``pull:<name>``, in UTC)
that finds the matching studies at a query/retrieve peer and retrieves them
(:mod:`dicomnode.receive.pull`); they are received like pushed studies. Every run is
recorded in the index (:class:`~dicomnode.store.tables.PullRun`) under the time it was due,
before it starts: a due time is served at most once, also across restarts; a run the node
missed while it was down is made up at start when it was due less than
:data:`SCHEDULE_MISFIRE_GRACE` ago (its relative dates count from the missed due time).

Log lines name studies by their index key (``study 12``), never by patient data.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from apscheduler.triggers.cron import CronTrigger
from sqlalchemy import ColumnElement, delete, exists, or_, select
from sqlalchemy.exc import IntegrityError

from dicomnode.config import PullConfig
from dicomnode.receive.pull import Puller, PullError, PullQuery
from dicomnode.rules.loader import Rule
from dicomnode.rules.trigger import RuleTrigger
from dicomnode.states import JobTrigger, StudyStatus
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.files import InstanceFiles, fsync_dir
from dicomnode.store.studystatus import study_status
from dicomnode.store.tables import (
    Instance,
    Job,
    OutboxItem,
    OutboxState,
    PullRun,
    RuleSchedule,
    Series,
    Study,
    StudyState,
    utcnow,
)

if TYPE_CHECKING:
    from apscheduler.schedulers.base import BaseScheduler

    from dicomnode.config import Config
    from dicomnode.rules.loader import RuleSet


class ScheduledNode(Protocol):
    """What :func:`install_scheduled_jobs` needs of the node (:class:`dicomnode.node.Node`)."""

    config: Config
    index: Index
    files: InstanceFiles
    trigger: RuleTrigger
    scheduler: BaseScheduler

    @property
    def rules(self) -> RuleSet | None: ...

__all__ = [
    "RETENTION_SETTLE",
    "SCHEDULE_MISFIRE_GRACE",
    "SCHEDULE_OVERLAP",
    "ScheduledNode",
    "ScheduledRun",
    "apply_retention",
    "install_scheduled_jobs",
    "install_scheduled_pulls",
    "last_pull_due",
    "last_run_at",
    "missed_fire_time",
    "rule_trigger",
    "run_scheduled_pull",
    "run_scheduled_rule",
    "studies_completed_since",
]

LOG = logging.getLogger(__name__)

SCHEDULE_OVERLAP = dt.timedelta(minutes=10)
"""How much further back than its previous start a scheduled run looks."""

SCHEDULE_MISFIRE_GRACE = dt.timedelta(hours=1)
"""A scheduled run late by less than this still runs (also a run missed while down)."""

RETENTION_SETTLE = dt.timedelta(minutes=10)
"""A study's instances are never deleted sooner than this after the study completed."""


@dataclass(frozen=True)
class ScheduledRun:
    """What one run of a scheduled rule did."""

    rule: str
    studies: int  # studies evaluated
    jobs: int  # jobs created
    failed: int  # studies whose evaluation raised (logged; not retried)


def _naive_utc(moment: dt.datetime | None) -> dt.datetime:
    """``moment`` (default: now) as a naive UTC datetime, the index's convention."""
    if moment is None:
        return utcnow()
    if moment.tzinfo is not None:
        return moment.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return moment


def _aware_utc(moment: dt.datetime) -> dt.datetime:
    return moment.replace(tzinfo=dt.timezone.utc) if moment.tzinfo is None else moment


def rule_trigger(rule: Rule) -> CronTrigger:
    """The APScheduler trigger of a scheduled rule (its crontab line, in UTC)."""
    if rule.schedule is None:
        raise ValueError(f"rule {rule.name} has no schedule")
    return CronTrigger.from_crontab(rule.schedule, timezone="UTC")


# --------------------------------------------------------------------------- scheduled rules


def last_run_at(index: Index, rule_name: str) -> dt.datetime | None:
    """When a scheduled rule last ran (naive UTC), or None if it never did."""
    with index.session() as session:
        row = session.get(RuleSchedule, rule_name)
        return None if row is None else row.last_run_at


def _record_run(index: Index, rule_name: str, started: dt.datetime) -> None:
    """Store a run's start time; it never moves back (a slower concurrent run)."""
    for _ in range(2):
        with index.session() as session:
            row = session.get(RuleSchedule, rule_name)
            if row is None:
                session.add(RuleSchedule(rule_name=rule_name, last_run_at=started))
            elif row.last_run_at < started:
                row.last_run_at = started
            try:
                session.commit()
                return
            except IntegrityError:  # another run inserted the row first: update it
                session.rollback()
    raise RuntimeError(f"could not record the run of rule {rule_name}")


def _has_instances() -> Any:
    """The condition "the study still holds an instance" (correlated to ``Study``)."""
    return exists(select(Instance.id).join(Series, Instance.series_pk == Series.id)
                  .where(Series.study_pk == Study.id).correlate(Study))


def studies_completed_since(index: Index, since: dt.datetime | None) -> list[int]:
    """Complete studies (that still hold instances) completed at or after ``since``."""
    query = select(Study.id).where(Study.state == StudyState.COMPLETE,
                                   Study.completed_at.is_not(None), _has_instances())
    if since is not None:
        query = query.where(Study.completed_at >= since)
    with index.session() as session:
        return list(session.scalars(query.order_by(Study.completed_at, Study.id)).all())


def run_scheduled_rule(index: Index, trigger: RuleTrigger, rule: Rule,
                       now: dt.datetime | None = None) -> ScheduledRun:
    """Run a scheduled rule over the studies completed since its last run.

    Args:
        index: the index database.
        trigger: creates the jobs (``trigger="schedule"``).
        rule: the scheduled rule.
        now: the run's start time (default: now), recorded as the rule's last run.

    Returns:
        How many studies were evaluated and jobs created.
    """
    started = _naive_utc(now)
    previous = last_run_at(index, rule.name)
    since = None if previous is None else previous - SCHEDULE_OVERLAP
    jobs = failed = 0
    studies = studies_completed_since(index, since)
    for study_pk in studies:
        try:
            firings = trigger.on_study(study_pk, trigger=JobTrigger.SCHEDULE, rules=[rule])
        except Exception:
            failed += 1
            LOG.exception("scheduled rule %s could not be evaluated on study %d",
                          rule.name, study_pk)
            continue
        jobs += sum(1 for f in firings if f.job_id is not None)
    _record_run(index, rule.name, started)
    LOG.info("scheduled rule %s: %d study(ies) evaluated, %d job(s) created%s", rule.name,
             len(studies), jobs, f", {failed} study(ies) failed" if failed else "")
    return ScheduledRun(rule.name, len(studies), jobs, failed)


def missed_fire_time(trigger: CronTrigger, last_run: dt.datetime | None, now: dt.datetime,
                     grace: dt.timedelta = SCHEDULE_MISFIRE_GRACE) -> dt.datetime | None:
    """The latest due-but-missed fire time since ``last_run``, if less than ``grace`` ago.

    A rule that never ran has missed nothing. Times may be naive (UTC) or aware.
    """
    if last_run is None:
        return None
    now = _aware_utc(now)
    start = max(_aware_utc(last_run) + dt.timedelta(microseconds=1), now - grace)
    missed: dt.datetime | None = None
    fire: dt.datetime | None = trigger.get_next_fire_time(None, start)
    while fire is not None and fire <= now:
        missed = fire
        fire = trigger.get_next_fire_time(fire, fire + dt.timedelta(seconds=1))
    return missed


def _scheduled_rule_job(index: Index, trigger: RuleTrigger, rule: Rule) -> None:
    run_scheduled_rule(index, trigger, rule)


# --------------------------------------------------------------------------- scheduled pulls


def last_pull_due(index: Index, pull_name: str) -> dt.datetime | None:
    """The due time (naive UTC) of a scheduled pull's latest run, or None if it never ran."""
    with index.session() as session:
        found: dt.datetime | None = session.scalars(
            select(PullRun.due_at).where(PullRun.pull_name == pull_name)
            .order_by(PullRun.due_at.desc()).limit(1)).first()
        return found


def _claim_pull_run(index: Index, name: str, peer: str, due: dt.datetime) -> int | None:
    """Record that the run due at ``due`` starts; None when that due time was served."""
    with index.session() as session:
        row = PullRun(pull_name=name, peer=peer, due_at=due, started_at=utcnow())
        session.add(row)
        try:
            session.commit()
        except IntegrityError:
            session.rollback()
            return None
        return row.id


def run_scheduled_pull(index: Index, name: str, pull: PullConfig, puller: Puller,
                       due: dt.datetime) -> PullRun | None:
    """Run a scheduled pull for the time it was due, once.

    Args:
        index: the index database (where the run is recorded).
        name: the pull's name (``pulls.NAME``).
        pull: its configuration.
        puller: pulls from ``pull.peer``.
        due: the scheduled time this run serves (naive or aware UTC); relative dates
            (``since: -1d``) count from its day.

    Returns:
        The recorded run, or None when a run for ``due`` was already recorded.
    """
    due = _naive_utc(due).replace(microsecond=0)
    run_id = _claim_pull_run(index, name, pull.peer, due)
    if run_id is None:
        LOG.info("scheduled pull %s: the run due at %s UTC already ran", name,
                 due.strftime("%Y-%m-%d %H:%M"))
        return None
    studies = instances = failed = 0
    error: str | None = None
    try:
        report = puller.pull(PullQuery.from_config(pull, due.date()))
        studies, instances, failed = len(report.studies), report.instances, report.failed
        if failed:
            error = "; ".join(dict.fromkeys(
                [r.message for r in report.retrieves if not r.ok and r.message]
                + report.problems))[:2000] or None
    except (PullError, ValueError) as exc:
        error, failed = str(exc), 1
    except Exception as exc:  # logged; the next due time runs again
        error, failed = f"unexpected {type(exc).__name__}", 1
        LOG.exception("scheduled pull %s failed unexpectedly", name)
    with index.session() as session:
        row = session.get(PullRun, run_id)
        assert row is not None
        row.finished_at = utcnow()
        row.studies, row.instances, row.failed, row.error = studies, instances, failed, error
        session.commit()
        session.refresh(row)
        session.expunge(row)
    LOG.log(logging.WARNING if failed else logging.INFO,
            "scheduled pull %s (due %s UTC) from %s: %d study(ies) found, %d instance(s) "
            "retrieved, %d failure(s)%s", name, due.strftime("%Y-%m-%d %H:%M"), pull.peer,
            studies, instances, failed, f": {error}" if error else "")
    return row


def _due_time(trigger: CronTrigger, now: dt.datetime) -> dt.datetime:
    """The latest fire time of ``trigger`` at or before ``now`` (within the misfire grace);
    ``now`` to the minute when there is none."""
    found = missed_fire_time(trigger, now - SCHEDULE_MISFIRE_GRACE, now)
    return found if found is not None else now.replace(second=0, microsecond=0)


def _scheduled_pull_job(index: Index, name: str, pull: PullConfig,
                        make_puller: Callable[[str], Puller]) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    due = _due_time(CronTrigger.from_crontab(pull.schedule, timezone="UTC"), now)
    try:
        puller = make_puller(pull.peer)
    except ValueError as exc:
        LOG.error("scheduled pull %s not run: %s", name, exc)
        return
    run_scheduled_pull(index, name, pull, puller, due)


def install_scheduled_pulls(scheduler: BaseScheduler, config: Config, index: Index,
                            make_puller: Callable[[str], Puller]) -> None:
    """Add one cron job per enabled scheduled pull (id ``pull:<name>``); a run missed while
    the node was down (due less than :data:`SCHEDULE_MISFIRE_GRACE` ago) runs at once.

    ``make_puller`` makes the :class:`~dicomnode.receive.pull.Puller` of a peer name.
    """
    now = dt.datetime.now(dt.timezone.utc)
    grace = int(SCHEDULE_MISFIRE_GRACE.total_seconds())
    for name, pull in config.pulls.items():
        if not pull.enabled:
            continue
        cron = CronTrigger.from_crontab(pull.schedule, timezone="UTC")
        options: dict[str, Any] = {}
        missed = missed_fire_time(cron, last_pull_due(index, name), now)
        if missed is not None:
            LOG.info("scheduled pull %s missed its run at %s UTC: running it now", name,
                     missed.strftime("%Y-%m-%d %H:%M"))
            options["next_run_time"] = now
        scheduler.add_job(_scheduled_pull_job, cron, args=(index, name, pull, make_puller),
                          id=f"pull:{name}", name=f"scheduled pull {name}", max_instances=1,
                          coalesce=True, misfire_grace_time=grace, replace_existing=True,
                          **options)
        LOG.info("pull %s from %s runs on schedule %r (UTC)", name, pull.peer, pull.schedule)


# --------------------------------------------------------------------------- retention


def _eligible(cutoff: dt.datetime, completed_before: dt.datetime) -> list[ColumnElement[bool]]:
    """Conditions on :class:`Study` under which its received instances may be deleted: its
    results were sent (:func:`dicomnode.store.studystatus.study_status`), there was at
    least one to send, each before ``cutoff``, and it completed before ``completed_before``."""
    items = (select(OutboxItem.id).join(Job, OutboxItem.job_pk == Job.id)
             .where(Job.study_pk == Study.id).correlate(Study))
    return [
        study_status() == StudyStatus.RESULTS_SENT.value,
        Study.completed_at.is_not(None),
        Study.completed_at < completed_before,
        exists(items),
        # every item sent before the cutoff (cancelled ones were superseded)
        ~exists(items.where(OutboxItem.state == OutboxState.SENT,
                            or_(OutboxItem.sent_at.is_(None), OutboxItem.sent_at >= cutoff))),
    ]


def _scheduled_boundary(index: Index, scheduled_rules: Iterable[str],
                        bound: dt.datetime) -> dt.datetime | None:
    """The completion time before which every scheduled rule has seen a study.

    None when a scheduled rule never ran: no study may go yet.
    """
    for name in scheduled_rules:
        last = last_run_at(index, name)
        if last is None:
            return None
        bound = min(bound, last - SCHEDULE_OVERLAP)
    return bound


def _purge_study(index: Index, files: InstanceFiles, study_pk: int,
                 conditions: Sequence[ColumnElement[bool]]) -> int:
    """Delete one study's instances if it is still eligible; returns how many went."""
    still_eligible = exists(select(Study.id).where(Study.id == study_pk, *conditions))
    with index.session() as session:
        deleted = session.execute(
            delete(Instance)
            .where(Instance.series_pk.in_(select(Series.id).where(Series.study_pk == study_pk)),
                   still_eligible)
            .returning(Instance.file_path)
            .execution_options(synchronize_session=False)).scalars().all()
        dirs: set[Path] = set()
        for relative in deleted:
            files.remove(Path(relative))  # a file already missing is not an error
            dirs.add((files.root / relative).parent)
        if files.fsync:
            for folder in sorted(dirs):
                fsync_dir(folder, missing_ok=True)
        if deleted:
            audit.record(session, audit.EventKind.RETENTION_DELETED, study_pk=study_pk,
                         instances=len(deleted))
        session.commit()
    return len(deleted)


def apply_retention(index: Index, files: InstanceFiles, raw_days: float,
                    now: dt.datetime | None = None, *,
                    scheduled_rules: Iterable[str] = ()) -> int:
    """Delete the received instances of fully delivered studies; returns how many went.

    Args:
        index: the index database.
        files: the raw store.
        raw_days: days after the newest delivery of a study's results.
        now: the current time (default: now).
        scheduled_rules: names of the enabled scheduled rules; a study is kept until
            each of them has run over it.
    """
    if raw_days < 0:
        raise ValueError("raw_days must be >= 0")
    current = _naive_utc(now)
    cutoff = current - dt.timedelta(days=raw_days)
    completed_before = _scheduled_boundary(index, scheduled_rules, current - RETENTION_SETTLE)
    if completed_before is None:
        return 0
    conditions = _eligible(cutoff, completed_before)
    with index.session() as session:
        candidates = list(session.scalars(
            select(Study.id).where(*conditions, _has_instances()).order_by(Study.id)).all())
    total = 0
    for study_pk in candidates:
        count = _purge_study(index, files, study_pk, conditions)
        if count:
            LOG.info("retention: deleted %d received instance(s) of study %d", count, study_pk)
        total += count
    return total


def _retention_job(index: Index, files: InstanceFiles, raw_days: float,
                   scheduled_rules: tuple[str, ...]) -> None:
    apply_retention(index, files, raw_days, scheduled_rules=scheduled_rules)


# --------------------------------------------------------------------------- installation


def install_scheduled_jobs(node: ScheduledNode) -> None:
    """Add the node's scheduled work to its scheduler (before the scheduler starts).

    One cron job per enabled scheduled rule (id ``rule:<name>``), and, when
    ``retention.raw_days`` is set, the retention pass (id ``retention``), run once at
    start and then every ``retention.check_interval_minutes``.
    """
    scheduled = [r for r in (node.rules.enabled if node.rules is not None else ())
                 if r.schedule is not None]
    now = dt.datetime.now(dt.timezone.utc)
    grace = int(SCHEDULE_MISFIRE_GRACE.total_seconds())
    for rule in scheduled:
        cron = rule_trigger(rule)
        options: dict[str, Any] = {}
        missed = missed_fire_time(cron, last_run_at(node.index, rule.name), now)
        if missed is not None:
            LOG.info("scheduled rule %s missed its run at %s UTC: running it now", rule.name,
                     missed.strftime("%Y-%m-%d %H:%M"))
            options["next_run_time"] = now
        node.scheduler.add_job(_scheduled_rule_job, cron, args=(node.index, node.trigger, rule),
                               id=f"rule:{rule.name}", name=f"scheduled rule {rule.name}",
                               max_instances=1, coalesce=True, misfire_grace_time=grace,
                               replace_existing=True, **options)
        LOG.info("rule %s runs on schedule %r (UTC)", rule.name, rule.schedule)
    retention = node.config.retention
    if retention.raw_days is None:
        return
    interval = dt.timedelta(minutes=retention.check_interval_minutes)
    node.scheduler.add_job(
        _retention_job, "interval", seconds=interval.total_seconds(),
        args=(node.index, node.files, retention.raw_days, tuple(r.name for r in scheduled)),
        id="retention", name="retention", next_run_time=now, max_instances=1, coalesce=True,
        misfire_grace_time=max(1, int(interval.total_seconds())), replace_existing=True)
    LOG.info("retention: received instances are deleted %g day(s) after their study's "
             "results were delivered; checked every %g minute(s)", retention.raw_days,
             retention.check_interval_minutes)
