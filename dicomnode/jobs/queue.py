"""The job queue in the index: claims and outcomes.

States (``job.state``)::

    pending --claim--> running --done----------------------------> done
                          |-----failure, permanent or last attempt-> failed
                          '-----failure, attempts left-------------> pending

A claim is one conditional UPDATE (``pending`` -> ``running``, attempts + 1), so two
processes (the node and ``dicomnode jobs retry``) never run the same job at once. At start,
jobs left ``running`` by a crash go back to ``pending`` (:func:`recover`): their re-run
writes the same objects (see :mod:`dicomnode.jobs.pipeline`). Only this module changes
``job.state``.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from dicomnode.states import JobTrigger
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.queries import format_timings, iso_utc
from dicomnode.store.tables import Job, JobState, utcnow

__all__ = ["Outcome", "claim", "finish", "jobs_report", "pending", "recover", "requeue",
           "reset"]

LOG = logging.getLogger("dicomnode.jobs")

Outcome = dict[str, Any]
"""How a run ended: ``{"ok": True, "timings", "results", ...}`` or ``{"ok": False, "error",
"permanent"}``."""


_OUTCOME_EVENTS = {JobState.DONE: audit.EventKind.JOB_FINISHED,
                   JobState.PENDING: audit.EventKind.JOB_RETRYING,
                   JobState.FAILED: audit.EventKind.JOB_FAILED}


def claim(index: Index, job_id: int) -> bool:
    """Mark a pending job running (attempts + 1); False when it is not pending."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.PENDING)
            .values(state=JobState.RUNNING, attempts=Job.attempts + 1, started_at=utcnow(),
                    finished_at=None)))
        if result.rowcount == 1:
            audit.record(session, audit.EventKind.JOB_CLAIMED, job_id=job_id)
        return result.rowcount == 1


def reset(index: Index, job_id: int) -> bool:
    """Make a job pending again with no attempt counted (an operator's retry)."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.id == job_id, Job.state != JobState.RUNNING)
            .values(state=JobState.PENDING, attempts=0, error=None)))
        return result.rowcount == 1


def finish(index: Index, job_id: int, outcome: Outcome, max_attempts: int) -> JobState:
    """Record a run's outcome: done, failed, or pending again for another attempt."""
    with index.session() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            return JobState.FAILED
        job.finished_at = utcnow()
        if outcome["ok"]:
            job.state = JobState.DONE
            job.error = None
            job.timings = outcome["timings"]
            job.results = outcome["results"]
        else:
            job.error = str(outcome["error"])[:2000]
            last = outcome["permanent"] or job.attempts >= max_attempts
            job.state = JobState.FAILED if last else JobState.PENDING
        audit.job_outcome(session, job_id, _OUTCOME_EVENTS[job.state], attempts=job.attempts,
                          error=job.error, objects=len(job.results or []) or None)
        state = job.state
    if outcome["ok"]:
        LOG.info("job %d done (%s)", job_id, format_timings(outcome["timings"]))
    else:
        LOG.warning("job %d %s: %s", job_id,
                    "failed" if state is JobState.FAILED else "will be tried again",
                    outcome["error"])
    return state


def pending(index: Index, limit: int) -> list[int]:
    """Up to ``limit`` pending jobs, oldest first."""
    with index.session() as session:
        return list(session.scalars(
            select(Job.id).where(Job.state == JobState.PENDING).order_by(Job.id).limit(limit)))


def recover(index: Index) -> int:
    """Return jobs a crash left ``running`` to ``pending`` (their attempt is counted)."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.state == JobState.RUNNING).values(state=JobState.PENDING)))
        count = int(result.rowcount)
    if count:
        LOG.info("%d job(s) interrupted by a stop or crash will run again", count)
    return count


def requeue(index: Index, job_ids: Sequence[int]) -> None:
    """Jobs stopped while running go back to pending with their attempt not counted."""
    with index.session() as session, session.begin():
        session.execute(update(Job).where(Job.id.in_(list(job_ids)),
                                          Job.state == JobState.RUNNING)
                        .values(state=JobState.PENDING, attempts=Job.attempts - 1))


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
        } for job in jobs]
    return {"schema": 1, "jobs": rows}
