"""The job queue in the index: claims, leases and outcomes.

States (``job.state``)::

    pending --claim--> running --done----------------------------> done
                          |-----failure, permanent or last attempt-> failed
                          |-----failure, attempts left-------------> pending
                          '-----lease ended (owner gone)-----------> pending

A claim makes a pending job running (attempts + 1) under an owner (the claiming node's
``node.id``) and a lease (``lease_expires_at``), which the owner renews while the job runs
(:func:`renew`, every ``node.heartbeat_seconds``). On PostgreSQL, :func:`claim_next` picks
pending jobs with ``SELECT ... FOR UPDATE SKIP LOCKED``, so competing nodes never wait on
each other's rows; on SQLite (one writer at a time) it is a conditional UPDATE per job.

Claim order (:func:`claim_next`, index ``ix_job_claim_order``): urgent jobs first, then
normal, then background ones (``job.priority``, the rule's
:class:`~dicomnode.states.JobPriority`), oldest (lowest id) first within a class. A
:class:`ClaimPolicy` says what may be taken now: outside ``pipeline.background_hours`` a
background job is taken only when no urgent or normal job is pending (waiting to be claimed,
by any node; running jobs do not hold it back), and a job whose model already runs its limit
of jobs under the claiming owner (per node: one GPU per node) is skipped for the next one, so
one busy model never blocks the queue.

Either way a job is claimed by one process at a time, and only its owner records its outcome
(:func:`finish`). A job whose lease ended (its node was killed, its machine lost)
goes back to pending (:func:`recover`), never one whose owner still renews it: its re-run
writes the same objects (see :mod:`dicomnode.jobs.pipeline`). Only this module changes
``job.state``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from sqlalchemy import CursorResult, Select, func, or_, select, update
from sqlalchemy.orm import Session

from dicomnode.states import JobPriority, JobTrigger
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.leases import lease_end
from dicomnode.store.queries import format_timings, iso_utc
from dicomnode.store.tables import Job, JobState, utcnow

__all__ = ["DEFAULT_LEASE_SECONDS", "LOCAL_OWNER", "ClaimPolicy", "Outcome", "claim",
           "claim_next", "finish", "jobs_report", "pending", "recover", "renew", "requeue",
           "reset"]

LOG = logging.getLogger("dicomnode.jobs")

Outcome = dict[str, Any]
"""How a run ended: ``{"ok": True, "timings", "results", ...}`` or ``{"ok": False, "error",
"permanent"}``."""


_OUTCOME_EVENTS = {JobState.DONE: audit.EventKind.JOB_FINISHED,
                   JobState.PENDING: audit.EventKind.JOB_RETRYING,
                   JobState.FAILED: audit.EventKind.JOB_FAILED}

#: The lease of a claim when none is given (s): ``node.lease_seconds``' default.
DEFAULT_LEASE_SECONDS = 60.0

#: The owner of claims made without a node id (tests, tools).
LOCAL_OWNER = "local"


def _claimed(owner: str, lease_seconds: float) -> dict[str, Any]:
    now = utcnow()
    return {"state": JobState.RUNNING, "attempts": Job.attempts + 1, "started_at": now,
            "finished_at": None, "owner": owner, "heartbeat_at": now,
            "lease_expires_at": lease_end(lease_seconds, now)}


def claim(index: Index, job_id: int, *, owner: str = LOCAL_OWNER,
          lease_seconds: float = DEFAULT_LEASE_SECONDS) -> bool:
    """Mark a pending job running (attempts + 1) under ``owner`` for ``lease_seconds``;
    False when it is not pending."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.PENDING)
            .values(**_claimed(owner, lease_seconds))))
        if result.rowcount == 1:
            audit.record(session, audit.EventKind.JOB_CLAIMED, job_id=job_id)
        return result.rowcount == 1


def _no_limit(model: str) -> int | None:
    return None


def _no_group(model: str) -> str | None:
    return None


@dataclass(frozen=True)
class ClaimPolicy:
    """What a claim may take now.

    Attributes:
        background_open: whether background jobs may be taken even while urgent or normal
            jobs are pending (inside ``pipeline.background_hours``, or none configured).
        model_limit: the most jobs of a model (by name) the claiming owner may run at once;
            None: no limit but the free workers.
        model_group: the group a model's jobs count in (e.g. ``"gpu"``: the models whose
            session runs on a GPU), or None.
        group_limits: the most jobs of each group the claiming owner may run at once, all
            of the group's models together (e.g. ``{"gpu": 1}``: one GPU model at a time).
    """

    background_open: bool = True
    model_limit: Callable[[str], int | None] = field(default=_no_limit)
    model_group: Callable[[str], str | None] = field(default=_no_group)
    group_limits: Mapping[str, int] = field(default_factory=dict)


_CLAIM_ORDER = (Job.priority, Job.id)


def _candidates(session: Session, policy: ClaimPolicy, owner: str
                ) -> tuple[dict[str, int], bool]:
    """The owner's running jobs per model, and whether background jobs are held back."""
    running: dict[str, int] = {model: int(n) for model, n in session.execute(
        select(Job.model, func.count()).where(Job.state == JobState.RUNNING,
                                              Job.owner == owner).group_by(Job.model))}
    if policy.group_limits:  # the pending models of a group at its limit are passed over
        for model in session.scalars(select(Job.model).where(
                Job.state == JobState.PENDING).distinct()):
            running.setdefault(model, 0)
    hold = not policy.background_open and session.scalar(
        select(Job.id).where(Job.state == JobState.PENDING,
                             Job.priority < JobPriority.BACKGROUND.rank).limit(1)) is not None
    return running, hold


def _next_query(policy: ClaimPolicy, running: dict[str, int], hold: bool,
                skip: list[int]) -> Select[int, str]:
    groups = ({model: policy.model_group(model) for model in running}
              if policy.group_limits else {})
    in_group: Counter[str] = Counter()
    for model, n in running.items():
        if (group := groups.get(model)) is not None:
            in_group[group] += n

    def group_full(model: str) -> bool:
        group = groups.get(model)
        return (group is not None and group in policy.group_limits
                and in_group[group] >= policy.group_limits[group])

    full = [model for model, n in running.items()
            if ((limit := policy.model_limit(model)) is not None and n >= limit)
            or group_full(model)]
    query = select(Job.id, Job.model).where(Job.state == JobState.PENDING)
    if full:
        query = query.where(Job.model.not_in(full))
    if hold:
        query = query.where(Job.priority < JobPriority.BACKGROUND.rank)
    if skip:
        query = query.where(Job.id.not_in(skip))
    return query.order_by(*_CLAIM_ORDER).limit(1)


def claim_next(index: Index, limit: int, *, owner: str = LOCAL_OWNER,
               lease_seconds: float = DEFAULT_LEASE_SECONDS,
               policy: ClaimPolicy | None = None) -> list[int]:
    """Claim up to ``limit`` pending jobs in claim order (urgent, normal, background; oldest
    first within each) for ``owner``, as ``policy`` allows; returns their ids.

    A job whose model runs ``policy.model_limit(model)`` jobs of ``owner`` already (counting
    those claimed now), or whose model's group (``policy.model_group``) runs its
    ``policy.group_limits`` already, is passed over for the next one. PostgreSQL: one
    transaction selects them ``FOR UPDATE SKIP LOCKED`` (rows another node is claiming at
    the same moment are skipped, not waited for) and marks them running. SQLite: each job
    is claimed by its own conditional UPDATE (one lost to another process is passed over).
    """
    if limit <= 0:
        return []
    policy = policy or ClaimPolicy()
    claimed: list[int] = []
    if index.is_sqlite:
        with index.session() as session:
            running, hold = _candidates(session, policy, owner)
        lost: list[int] = []
        while len(claimed) < limit:
            with index.session() as session:
                row = session.execute(_next_query(policy, running, hold, lost)).first()
            if row is None:
                break
            if claim(index, row.id, owner=owner, lease_seconds=lease_seconds):
                claimed.append(row.id)
                running[row.model] = running.get(row.model, 0) + 1
            else:
                lost.append(row.id)
        return claimed
    with index.session() as session, session.begin():
        running, hold = _candidates(session, policy, owner)
        while len(claimed) < limit:
            row = session.execute(_next_query(policy, running, hold, claimed)
                                  .with_for_update(skip_locked=True, of=Job)).first()
            if row is None:
                break
            claimed.append(row.id)
            running[row.model] = running.get(row.model, 0) + 1
        if claimed:
            session.execute(update(Job).where(Job.id.in_(claimed))
                            .values(**_claimed(owner, lease_seconds))
                            .execution_options(synchronize_session=False))
            for job_id in claimed:
                audit.record(session, audit.EventKind.JOB_CLAIMED, job_id=job_id)
    return claimed


def renew(index: Index, job_ids: Sequence[int], *, owner: str,
          lease_seconds: float) -> list[int]:
    """Extend the leases of ``owner``'s running jobs among ``job_ids`` (the heartbeat);
    returns the ids it no longer holds (taken over after its lease ended)."""
    if not job_ids:
        return []
    now = utcnow()
    with index.session() as session, session.begin():
        session.execute(
            update(Job).where(Job.id.in_(list(job_ids)), Job.state == JobState.RUNNING,
                              Job.owner == owner)
            .values(heartbeat_at=now, lease_expires_at=lease_end(lease_seconds, now))
            .execution_options(synchronize_session=False))
        held = set(session.scalars(select(Job.id).where(
            Job.id.in_(list(job_ids)), Job.state == JobState.RUNNING, Job.owner == owner)))
    lost = [job_id for job_id in job_ids if job_id not in held]
    for job_id in lost:
        LOG.warning("job %d: this node's claim lapsed and another node took it over", job_id)
    return lost


def reset(index: Index, job_id: int) -> bool:
    """Make a job pending again with no attempt counted (an operator's retry)."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.id == job_id, Job.state != JobState.RUNNING)
            .values(state=JobState.PENDING, attempts=0, error=None, owner=None,
                    lease_expires_at=None)))
        return result.rowcount == 1


def finish(index: Index, job_id: int, outcome: Outcome, max_attempts: int, *,
           owner: str | None = None) -> JobState:
    """Record a run's outcome: done, failed, or pending again for another attempt.

    With ``owner``, only while the job is still ``owner``'s running job: a run whose claim
    lapsed and was taken over records nothing (the node running it now does); the job's
    state is returned unchanged.
    """
    with index.session() as session, session.begin():
        job = session.get(Job, job_id, with_for_update=not index.is_sqlite)
        if job is None:
            return JobState.FAILED
        if owner is not None and (job.state is not JobState.RUNNING or job.owner != owner):
            LOG.warning("job %d: its claim lapsed and another node took it over; this run's "
                        "outcome is not recorded", job_id)
            return job.state
        job.finished_at = utcnow()
        job.owner = None
        job.lease_expires_at = None
        if outcome["ok"]:
            job.state = JobState.DONE
            job.error = None
            job.timings = outcome["timings"]
            job.results = outcome["results"]
        else:
            job.error = str(outcome["error"])[:2000]
            last = outcome["permanent"] or job.attempts >= max_attempts
            job.state = JobState.FAILED if last else JobState.PENDING
        state = job.state
        audit.job_outcome(session, job_id, _OUTCOME_EVENTS[job.state], attempts=job.attempts,
                          error=job.error, objects=len(job.results or []) or None)
    if outcome["ok"]:
        LOG.info("job %d done (%s)", job_id, format_timings(outcome["timings"]))
    else:
        LOG.warning("job %d %s: %s", job_id,
                    "failed" if state is JobState.FAILED else "will be tried again",
                    outcome["error"])
    return state


def pending(index: Index, limit: int) -> list[int]:
    """Up to ``limit`` pending jobs in claim order (urgent, normal, background; oldest first
    within each)."""
    with index.session() as session:
        return list(session.scalars(
            select(Job.id).where(Job.state == JobState.PENDING).order_by(*_CLAIM_ORDER)
            .limit(limit)))


def recover(index: Index, *, owner: str | None = None, now: dt.datetime | None = None) -> int:
    """Return to ``pending`` the running jobs whose lease ended at ``now`` (their node is
    gone; their attempt is counted), and, with ``owner``, the running jobs of ``owner``
    (a node starting again under the same ``node.id``: what it ran before it stopped).

    A job whose owner still renews its lease is never taken.
    """
    now = now or utcnow()
    lapsed = or_(Job.lease_expires_at.is_(None), Job.lease_expires_at <= now)
    mine = Job.owner == owner if owner is not None else None
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.state == JobState.RUNNING,
                              lapsed if mine is None else or_(lapsed, mine))
            .values(state=JobState.PENDING, owner=None, lease_expires_at=None)
            .execution_options(synchronize_session=False)))
        count = int(result.rowcount)
    if count:
        LOG.info("%d job(s) interrupted by a stop or crash (their lease ended) will run again",
                 count)
    return count


def requeue(index: Index, job_ids: Sequence[int], *, owner: str | None = None) -> None:
    """Jobs stopped while running go back to pending with their attempt not counted (with
    ``owner``: only those it still holds)."""
    conditions = [Job.id.in_(list(job_ids)), Job.state == JobState.RUNNING]
    if owner is not None:
        conditions.append(Job.owner == owner)
    with index.session() as session, session.begin():
        session.execute(update(Job).where(*conditions)
                        .values(state=JobState.PENDING, attempts=Job.attempts - 1, owner=None,
                                lease_expires_at=None)
                        .execution_options(synchronize_session=False))


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def jobs_report(index: Index, *, state: str | None = None) -> dict[str, Any]:
    """Every job (newest first) as JSON-ready data (docs/jobs-json.md)."""
    with index.session() as session:
        query = select(Job).order_by(Job.id.desc())
        if state is not None:
            query = query.where(Job.state == JobState(state))
        jobs = session.scalars(query).all()
        rows = [{
            "id": job.id,
            "rule": job.rule_name,
            "model": job.model,
            "priority": JobPriority.of_rank(job.priority).value,
            "study": job.study_pk,
            "inputs": [name for name, _ in job.bindings],
            "trigger": JobTrigger(job.trigger).value,
            "version": job.version or 1,
            "changes": job.changes,
            "instances": job.instance_count,
            "withdrawn_by": job.withdrawn_by,
            "state": job.state.value,
            "attempts": job.attempts,
            "created_at": iso_utc(job.created_at),
            "started_at": iso_utc(job.started_at),
            "finished_at": iso_utc(job.finished_at),
            "seconds": _seconds(job.started_at, job.finished_at),
            "timings": job.timings,
            "results": job.results or [],
            "error": job.error,
            "owner": job.owner,
            "lease_expires_at": iso_utc(job.lease_expires_at),
        } for job in jobs]
    return {"schema": 1, "jobs": rows}
