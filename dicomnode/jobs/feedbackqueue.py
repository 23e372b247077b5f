"""The feedback loop's queue in the index: received RTSTRUCT/SEG objects to compare.

Light (SQL only): the node's process runs it. :func:`discover` finds instances of RT
Structure Set or Segmentation Storage received into a study that has a finished job and
that are not queued yet, and queues each (``feedback_object``, state ``pending``); the job
runner claims them (:func:`claim`, ``pending`` -> ``running``) and hands them to a worker
process, which compares them (:mod:`dicomnode.jobs.feedback`) and records how that ended
(:func:`finish`: ``done``, ``skipped`` or ``failed``). At start, objects left ``running``
by a crash go back to ``pending`` (:func:`recover`).

States: ``pending -> running -> done | skipped | failed``.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Any, cast

from sqlalchemy import CursorResult, exists, func, select, update
from sqlalchemy.exc import IntegrityError

from dicomnode.store.db import Index
from dicomnode.store.tables import FeedbackObject, Instance, Job, JobState, Series, utcnow

__all__ = ["FEEDBACK_CLASSES", "FeedbackState", "claim", "discover", "finish", "pending",
           "recover"]

LOG = logging.getLogger("dicomnode.feedback")

#: SOP classes compared with a job's result, and their kind.
FEEDBACK_CLASSES = {"1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
                    "1.2.840.10008.5.1.4.1.1.66.4": "SEG"}


class FeedbackState(str, Enum):
    """``feedback_object.state``."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    SKIPPED = "skipped"
    FAILED = "failed"


def discover(index: Index, *, after: int = 0, limit: int = 200) -> tuple[int, int]:
    """Queue the received RTSTRUCT/SEG instances (index key above ``after``) of studies with
    a finished job that are not queued yet, at most ``limit`` a call; returns how many were
    queued and the highest instance key looked at (``after`` for the next call; an object
    that arrived before its study's job finished is found by a call from 0)."""
    done_job = exists().where(Job.study_pk == Series.study_pk, Job.state == JobState.DONE)
    queued = exists().where(FeedbackObject.instance_pk == Instance.id)
    with index.session() as session:
        newest = session.scalar(select(func.max(Instance.id))) or 0
        rows = session.execute(
            select(Instance.id, Instance.sop_instance_uid, Instance.sop_class_uid,
                   Series.study_pk)
            .join(Series, Instance.series_pk == Series.id)
            .where(Instance.id > after, Instance.id <= newest,
                   Instance.sop_class_uid.in_(list(FEEDBACK_CLASSES)), done_job, ~queued)
            .order_by(Instance.id).limit(limit)).all()
    if len(rows) == limit:  # more to queue: the next call goes on after the last one
        newest = int(rows[-1][0])
    added = 0
    for instance_pk, sop_uid, sop_class, study_pk in rows:
        try:
            with index.session() as session, session.begin():
                session.add(FeedbackObject(
                    instance_pk=instance_pk, sop_instance_uid=sop_uid,
                    kind=FEEDBACK_CLASSES[sop_class], study_pk=study_pk,
                    state=FeedbackState.PENDING.value))
            added += 1
        except IntegrityError:  # queued meanwhile by another process
            continue
    if added:
        LOG.info("feedback: %d received object(s) queued for comparison", added)
    return added, int(newest)


def pending(index: Index, limit: int) -> list[int]:
    """Up to ``limit`` pending objects, oldest first."""
    with index.session() as session:
        return list(session.scalars(
            select(FeedbackObject.id).where(FeedbackObject.state == FeedbackState.PENDING.value)
            .order_by(FeedbackObject.id).limit(limit)).all())


def claim(index: Index, feedback_pk: int) -> bool:
    """Mark a pending object running; False when it is not pending."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(FeedbackObject).where(FeedbackObject.id == feedback_pk,
                                         FeedbackObject.state == FeedbackState.PENDING.value)
            .values(state=FeedbackState.RUNNING.value)))
        return result.rowcount == 1


def finish(index: Index, feedback_pk: int, state: FeedbackState, reason: str | None = None,
           **values: Any) -> None:
    """Record how the comparison of an object ended (and what it found of it: ``job_pk``,
    ``model``, ``model_version``, ``matched_by``)."""
    with index.session() as session, session.begin():
        session.execute(update(FeedbackObject).where(FeedbackObject.id == feedback_pk)
                        .values(state=state.value, reason=reason, compared_at=utcnow(),
                                **values))


def recover(index: Index) -> int:
    """Objects left running by a crash or a stop go back to pending; returns how many."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(FeedbackObject).where(FeedbackObject.state == FeedbackState.RUNNING.value)
            .values(state=FeedbackState.PENDING.value)))
        return int(result.rowcount)
