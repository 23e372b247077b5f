"""What an operator sees of a study, derived in one place from the index.

A study's :class:`~dicomnode.states.StudyStatus` is not stored: it follows from the
study's stored state (:class:`~dicomnode.states.StudyState`, written by ingest and
completion), its jobs (:class:`~dicomnode.states.JobState`, written by the rule trigger
and the job queue) and the outbox items of those jobs
(:class:`~dicomnode.states.OutboxState`, written by the outbox), so it can never
disagree with them. :func:`study_status` is that derivation as one SQL expression; the
console, ``dicomnode studies``, the metrics and retention (``results sent``) all use it.

In order, the first that holds:

1. ``receiving``: the study is receiving (not yet quiet for ``completion.quiet_seconds``).
2. ``failed``: one of its jobs failed, or an outbox item of one of its jobs failed for good.
3. ``processing``: a job is running, or one of its result objects waits to be sent
   (pending or sending).
4. ``awaiting review``: a result object of one of its jobs is held until a user approves
   or rejects the job's results (``review: required``).
5. ``ready``: a job waits for a worker, or no job was created (yet).
6. ``waiting for series``: every job was discarded (``when_incomplete: discard``: the
   rule's required series did not arrive; a new instance re-opens the study).
7. ``results sent``: every job is done (or discarded) and every result object its jobs
   queued was sent (or cancelled, superseded by a newer version, or rejected in review).

A rule that keeps waiting without recording a job (``when_incomplete: wait``, or
``require_series`` not there yet) leaves no row behind, so such a study shows ``ready``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import case, exists, literal, select
from sqlalchemy.sql.elements import ColumnElement

from dicomnode.states import JobState, OutboxState, StudyState, StudyStatus
from dicomnode.store.db import Index
from dicomnode.store.tables import Job, OutboxItem, Study

__all__ = ["study_status", "study_statuses"]


def _jobs() -> Any:
    """The study's jobs (correlated to :class:`Study`)."""
    return select(Job.id).where(Job.study_pk == Study.id).correlate(Study)


def _items() -> Any:
    """The outbox items of the study's jobs (correlated to :class:`Study`)."""
    return (select(OutboxItem.id).join(Job, OutboxItem.job_pk == Job.id)
            .where(Job.study_pk == Study.id).correlate(Study))


def study_status() -> ColumnElement[str]:
    """The operator's status of each :class:`Study` row, as a SQL expression whose value
    is a :class:`StudyStatus` value (select it along with ``Study``, or compare it)."""
    jobs, items = _jobs(), _items()
    return case(
        (Study.state == StudyState.RECEIVING, literal(StudyStatus.RECEIVING.value)),
        (exists(jobs.where(Job.state == JobState.FAILED))
         | exists(items.where(OutboxItem.state == OutboxState.FAILED)),
         literal(StudyStatus.FAILED.value)),
        (exists(jobs.where(Job.state == JobState.RUNNING))
         | exists(items.where(OutboxItem.state.in_((OutboxState.PENDING,
                                                     OutboxState.SENDING)))),
         literal(StudyStatus.PROCESSING.value)),
        (exists(items.where(OutboxItem.state == OutboxState.HELD)),
         literal(StudyStatus.AWAITING_REVIEW.value)),
        (exists(jobs.where(Job.state == JobState.PENDING)) | ~exists(jobs),
         literal(StudyStatus.READY.value)),
        (~exists(jobs.where(Job.state != JobState.DISCARDED)),
         literal(StudyStatus.WAITING_FOR_SERIES.value)),
        else_=literal(StudyStatus.RESULTS_SENT.value),
    )


def study_statuses(index: Index, study_pks: Iterable[int] | None = None
                   ) -> dict[int, StudyStatus]:
    """The operator's status of each study (all, or those of ``study_pks``), by index key."""
    query = select(Study.id, study_status())
    if study_pks is not None:
        query = query.where(Study.id.in_(list(study_pks)))
    with index.session() as session:
        return {int(pk): StudyStatus(value) for pk, value in session.execute(query)}
