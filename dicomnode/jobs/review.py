"""The review of a job's results before they are sent (a rule's ``review: required``).

The job pipeline writes the results as usual and queues their outbox items ``held``
(:meth:`dicomnode.send.outbox.Outbox.enqueue` with ``held=True``), then records a
:class:`~dicomnode.store.tables.Review` row ``awaiting`` and the audit event ``job.held``
(:func:`hold`). Held items are never due and never retried. A console user then decides
(:func:`decide`), in one transaction: the review row becomes ``approved`` or ``rejected``
with the user's name and the time, the held items become ``pending`` (sent as usual) or
``rejected`` (never sent), and the audit event ``job.approved`` or ``job.review_rejected``
names the user. A decision is final: a second one is refused (:class:`ReviewError`).

This module is the only writer of ``review.state``; it is light (the node's process imports
it for the console).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import CursorResult, select, update
from sqlalchemy.exc import IntegrityError

from dicomnode.send.outbox import Outbox
from dicomnode.states import OutboxState, ReviewState
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.queries import iso_utc
from dicomnode.store.tables import Job, OutboxItem, Review, utcnow

__all__ = ["USER_PATTERN", "Decision", "ReviewError", "check_user", "decide", "hold",
           "reviews_report"]

LOG = logging.getLogger(__name__)

#: A reviewer's name as the console records it: 1 to 64 characters, letters (any script),
#: digits, space and ``. _ @ ' -``, starting with a letter or digit.
USER_PATTERN = re.compile(r"^[^\W_][\w .@'-]{0,63}$")


class ReviewError(ValueError):
    """No review awaits this job's decision (none held, or already decided), or the user's
    name is not acceptable."""


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` did: the review's new state and the outbox items it moved."""

    job_id: int
    state: ReviewState
    user: str
    items: int


def check_user(user: str) -> str:
    """The reviewer's name, stripped.

    Raises:
        ReviewError: empty, longer than 64 characters, or holding other characters than
            :data:`USER_PATTERN` allows.
    """
    name = (user or "").strip()
    if not USER_PATTERN.match(name):
        raise ReviewError("the reviewer's name: 1 to 64 letters, digits, spaces or . _ @ ' -, "
                          "starting with a letter or digit")
    return name


def hold(index: Index, job_id: int) -> None:
    """Record that ``job_id``'s results await a review (idempotent: a job run again keeps
    its review and its decision)."""
    with index.session() as session:
        if session.scalar(select(Review.id).where(Review.job_pk == job_id)) is not None:
            return
        session.add(Review(job_pk=job_id, state=ReviewState.AWAITING, created_at=utcnow()))
        held = session.scalar(select(OutboxItem.id).where(
            OutboxItem.job_pk == job_id, OutboxItem.state == OutboxState.HELD).limit(1))
        audit.record(session, audit.EventKind.HELD, job_id=job_id,
                     reason="review required" if held is not None else
                     "review required (nothing to send)")
        try:
            session.commit()
        except IntegrityError:  # recorded meanwhile by another run of the job
            session.rollback()
            return
    LOG.info("job %d: results held until a user reviews them", job_id)


def decide(index: Index, outbox: Outbox, job_id: int, *, approve: bool, user: str) -> Decision:
    """A user's decision on ``job_id``'s held results: approved (its held items become
    pending and are sent) or rejected (never sent); recorded with the user and the time.

    Raises:
        ReviewError: the user's name is not acceptable, no review awaits this job, or it
            was decided already (by whom and when is said).
    """
    name = check_user(user)
    state = ReviewState.APPROVED if approve else ReviewState.REJECTED
    now = utcnow()
    with index.session() as session:
        review = session.scalars(select(Review).where(Review.job_pk == job_id)).first()
        if review is None:
            raise ReviewError(f"job {job_id} has no results awaiting review")
        if review.state is not ReviewState.AWAITING:
            raise ReviewError(f"job {job_id}'s results were {review.state.value} already, by "
                              f"{review.decided_by} at {iso_utc(review.decided_at)}")
        done = cast(CursorResult[Any], session.execute(
            update(Review).where(Review.id == review.id,
                                 Review.state == ReviewState.AWAITING)
            .values(state=state, decided_at=now, decided_by=name)
            .execution_options(synchronize_session=False)))
        if done.rowcount != 1:
            raise ReviewError(f"job {job_id}'s results were decided meanwhile")
        if approve:
            items = outbox.release_held([job_id], session=session)
            audit.approved(session, job_id, user=name, count=items)
        else:
            items = outbox.reject_held([job_id], reason=f"rejected in review by {name}",
                                       session=session)
            audit.review_rejected(session, job_id, user=name, count=items)
        session.commit()
    LOG.info("job %d: results %s by a console user (%d item(s))", job_id, state.value, items)
    return Decision(job_id, state, name, items)


def reviews_report(index: Index, *, state: ReviewState | None = ReviewState.AWAITING
                   ) -> list[dict[str, Any]]:
    """The reviews (those in ``state``; all with None), oldest first, without identity:
    job id, study key, rule, model, when held, the decision, the held items per
    destination, and the kinds of objects the job wrote. A job whose results a newer version
    withdrew (its held items cancelled) awaits nothing and is left out of the awaiting ones."""
    query = (select(Review, Job).join(Job, Job.id == Review.job_pk)
             .order_by(Review.created_at, Review.id))
    if state is not None:
        query = query.where(Review.state == state)
    if state is ReviewState.AWAITING:
        query = query.where(Job.withdrawn_by.is_(None))
    with index.session() as session:
        rows = session.execute(query).all()
        counts: dict[int, dict[str, int]] = {}
        for job_pk, destination, item_state in session.execute(
                select(OutboxItem.job_pk, OutboxItem.destination, OutboxItem.state)
                .where(OutboxItem.job_pk.in_([r.Review.job_pk for r in rows]))):
            if item_state is OutboxState.HELD and job_pk is not None:
                per = counts.setdefault(int(job_pk), {})
                per[destination] = per.get(destination, 0) + 1
        return [_review(review, job, counts.get(job.id, {})) for review, job in rows]


def _review(review: Review, job: Job, held: dict[str, int]) -> dict[str, Any]:
    return {
        "job": job.id, "study": job.study_pk, "rule": job.rule_name, "model": job.model,
        "version": job.version, "job_state": job.state.value, "state": review.state.value,
        "held_at": iso_utc(review.created_at), "decided_at": _iso(review.decided_at),
        "decided_by": review.decided_by, "held_items": held,
        "objects": [str(r.get("kind")) for r in job.results or []],
    }


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else iso_utc(value)
