"""The audit trail: one append-only ``event`` row per transition of a study or a job.

The owner of each transition calls :func:`record` inside its own transaction, so an event
is committed with the change it describes (or not at all). Events carry keys only: the
study's index key, the job id, a rule, model or peer name, the model's digest, counts and
status codes; never a DICOM value of a peer (no UID, name, identifier or date). The kinds
are :class:`EventKind`; docs/audit.md says who records each.

This module only ever inserts: no event is updated or deleted by the node (a test reads
the source for it). Listeners (:func:`add_listener`) see each event as it is recorded, in
the same session: the notifications (:mod:`dicomnode.send.notify`) queue their messages
that way, durable with the transition.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from dicomnode.store.db import Index
from dicomnode.store.queries import iso_utc
from dicomnode.store.tables import Event, Job, OutboxItem, OutboxState, Series, Study, utcnow

__all__ = [
    "AUDIT_SCHEMA_VERSION",
    "DETAIL_KEYS",
    "EventKind",
    "Listener",
    "add_listener",
    "approved",
    "audit_report",
    "event_json",
    "format_event",
    "item_outcome",
    "job_events",
    "job_outcome",
    "last_details",
    "record",
    "record_delivered",
    "record_firings",
    "remove_listener",
    "review_rejected",
    "series_received",
    "study_events",
]

LOG = logging.getLogger(__name__)

AUDIT_SCHEMA_VERSION = 1


class EventKind(str, Enum):
    """What happened (``event.kind``)."""

    SERIES_RECEIVED = "series.received"  # the first instance of a series was stored
    STUDY_REOPENED = "study.reopened"  # an instance arrived for a complete study
    STUDY_RECEIVED = "study.received"  # an association ended: instances it delivered
    STUDY_COMPLETED = "study.completed"
    RULE_FIRED = "rule.fired"  # a job (version) was created
    RULE_NOT_FIRED = "rule.not_fired"  # matched or not, and why it did not fire
    JOB_CLAIMED = "job.claimed"
    JOB_STARTED = "job.started"  # in the worker, with the model's digest
    PSEUDONYMIZED = "job.pseudonymized"  # the inputs, in memory
    JOB_FINISHED = "job.finished"
    JOB_RETRYING = "job.retrying"  # an attempt failed, another follows
    JOB_FAILED = "job.failed"
    REJECTED = "job.rejected"  # its results withdrawn by a newer version (IOCM)
    HELD = "job.held"  # its results wait for a user's review (``review: required``)
    APPROVED = "job.approved"  # a user approved its results (review): they are sent
    REVIEW_REJECTED = "job.review_rejected"  # a user rejected its results: never sent
    SEND_REFUSED = "job.send_refused"  # a result not queued for a peer (model approval)
    SENT = "item.sent"
    SEND_FAILED = "item.failed"  # an outbox item failed for good
    RETENTION_DELETED = "retention.deleted"


#: The keys an event's ``details`` may hold; values are numbers, booleans, short strings
#: of the node's own (names, digests, reasons) or lists of numbers.
DETAIL_KEYS = frozenset({
    "rule", "model", "model_version", "digest", "peer", "item", "status", "state",
    "attempt", "attempts", "instances", "series", "series_pk", "reason", "trigger",
    "version", "matched", "by_job", "user", "error", "objects", "count",
})

_MAX_TEXT = 300

Listener = Callable[[Session, Event], None]
_LISTENERS: list[Listener] = []
_LISTENERS_LOCK = threading.Lock()


def add_listener(listener: Listener) -> None:
    """Call ``listener(session, event)`` for every event recorded in this process, in the
    recording session (before its commit); it may add rows to that session."""
    with _LISTENERS_LOCK:
        _LISTENERS.append(listener)


def remove_listener(listener: Listener) -> None:
    with _LISTENERS_LOCK:
        if listener in _LISTENERS:
            _LISTENERS.remove(listener)


def _check(details: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(details) - DETAIL_KEYS)
    if unknown:
        raise ValueError(f"audit details {', '.join(unknown)} are not allowed "
                         f"(allowed: {', '.join(sorted(DETAIL_KEYS))})")
    clean: dict[str, Any] = {}
    for key, value in details.items():
        if value is None:
            continue
        if isinstance(value, str):
            value = value[:_MAX_TEXT]
        elif isinstance(value, (list, tuple)):
            if not all(isinstance(v, int) for v in value):
                raise ValueError(f"audit detail {key}: lists hold index keys (integers) only")
            value = list(value)
        elif not isinstance(value, (bool, int, float)):
            raise ValueError(f"audit detail {key}: {type(value).__name__} is not a key, "
                             "count or short text")
        clean[key] = value
    return clean


def record(session: Session, kind: EventKind, *, study_pk: int | None = None,
           job_id: int | None = None, **details: Any) -> Event:
    """Add one event to ``session`` (committed with the caller's transaction).

    A job's event names its study too (looked up when not given) and its model.

    Raises:
        ValueError: a detail key outside :data:`DETAIL_KEYS` or a value that is not a key,
            count or short text (a programming error: nothing is recorded).
    """
    clean = _check(details)
    if job_id is not None and (study_pk is None or "model" not in clean):
        row = session.execute(select(Job.study_pk, Job.rule_name, Job.model)
                              .where(Job.id == job_id)).one_or_none()
        if row is not None:
            study_pk = row[0] if study_pk is None else study_pk
            clean.setdefault("rule", row[1])
            clean.setdefault("model", row[2])
    event = Event(at=utcnow(), kind=EventKind(kind).value, study_pk=study_pk, job_id=job_id,
                  details=clean or None)
    session.add(event)
    with _LISTENERS_LOCK:
        listeners = list(_LISTENERS)
    for listener in listeners:
        try:
            listener(session, event)
        except Exception as exc:  # a listener never stops the transition it hears of
            LOG.error("audit listener %s failed: %s", getattr(listener, "__name__", "?"),
                      type(exc).__name__)
    return event


def last_details(session: Session, job_id: int, kind: EventKind) -> dict[str, Any]:
    """The details of the job's newest event of ``kind`` (empty when none)."""
    details = session.scalars(select(Event.details).where(
        Event.job_id == job_id, Event.kind == kind.value).order_by(Event.id.desc())).first()
    return dict(details or {})


def job_outcome(session: Session, job_id: int, kind: EventKind, **details: Any) -> Event:
    """A job's finished/retrying/failed event, with the model version and digest its
    worker recorded when it started (:attr:`EventKind.JOB_STARTED`)."""
    started = last_details(session, job_id, EventKind.JOB_STARTED)
    return record(session, kind, job_id=job_id, model_version=started.get("model_version"),
                  digest=started.get("digest"), **details)


def record_firings(session: Session, study_pk: int, trigger: str,
                   firings: Sequence[Any]) -> None:
    """The rules' decisions on a study (:class:`dicomnode.rules.trigger.Firing`): a job
    created, or why not. A decision that repeats the study's previous one for the same
    rule (the same reason) is not recorded again."""
    last: dict[str, str] = {}
    for details in session.scalars(select(Event.details).where(
            Event.study_pk == study_pk,
            Event.kind.in_([EventKind.RULE_FIRED.value, EventKind.RULE_NOT_FIRED.value]))
            .order_by(Event.id)):
        if details and "rule" in details:
            last[str(details["rule"])] = str(details.get("reason"))
    for firing in firings:
        if firing.job_id is not None:
            record(session, EventKind.RULE_FIRED, study_pk=study_pk, job_id=firing.job_id,
                   rule=firing.rule, trigger=trigger, version=firing.version, reason="fired")
        elif last.get(firing.rule) != firing.reason:
            record(session, EventKind.RULE_NOT_FIRED, study_pk=study_pk,
                   job_id=firing.existing_job, rule=firing.rule, matched=firing.matched,
                   trigger=trigger, reason=firing.reason)
        last[firing.rule] = "fired" if firing.job_id is not None else firing.reason


def record_delivered(index: Index, delivered: Mapping[int, int]) -> None:
    """An association ended having delivered ``{study key: instances}``: one event per
    study (receiving is audited per association and per series, not per instance)."""
    try:
        with index.session() as session, session.begin():
            for study_pk, count in sorted(delivered.items()):
                record(session, EventKind.STUDY_RECEIVED, study_pk=study_pk, instances=count)
    except Exception as exc:  # the instances are stored; only their summary event is lost
        LOG.error("audit: association's deliveries not recorded: %s", type(exc).__name__)


def series_received(session: Session, series: Series) -> None:
    """The first instance of a new series is being stored (flushes for the keys)."""
    session.flush()
    record(session, EventKind.SERIES_RECEIVED, study_pk=series.study_pk, series_pk=series.id)


def item_outcome(session: Session, item_id: int, state: OutboxState,
                 status: int | None) -> None:
    """An outbox item sent, or failed for good (other outcomes are not events)."""
    kind = {OutboxState.SENT: EventKind.SENT, OutboxState.FAILED: EventKind.SEND_FAILED}.get(
        state)
    if kind is None:
        return
    row = session.execute(select(OutboxItem.job_pk, OutboxItem.destination,
                                 OutboxItem.attempts).where(OutboxItem.id == item_id)
                          ).one_or_none()
    if row is None:
        return
    record(session, kind, job_id=row[0], item=item_id, peer=row[1], status=status,
           attempts=row[2])


def approved(session: Session, job_id: int, *, user: str, count: int | None = None) -> Event:
    """A user approved a job's results (``review: required`` rules hold results until
    then; ``count``: the items released). ``user`` is the console user's name, not a
    patient's."""
    if not user or len(user) > 64:
        raise ValueError("the approving user's name: 1 to 64 characters")
    return record(session, EventKind.APPROVED, job_id=job_id, user=user, count=count)


def review_rejected(session: Session, job_id: int, *, user: str,
                    count: int | None = None) -> Event:
    """A user rejected a job's results in review: its held items are never sent."""
    if not user or len(user) > 64:
        raise ValueError("the rejecting user's name: 1 to 64 characters")
    return record(session, EventKind.REVIEW_REJECTED, job_id=job_id, user=user, count=count)


# ---------------------------------------------------------------------------- reading


def study_events(session: Session, study_pk: int) -> list[Event]:
    """A study's events and those of its jobs, oldest first."""
    jobs = select(Job.id).where(Job.study_pk == study_pk).scalar_subquery()
    return list(session.scalars(select(Event).where(
        or_(Event.study_pk == study_pk, Event.job_id.in_(jobs))).order_by(Event.id)))


def job_events(session: Session, job_id: int) -> list[Event]:
    """A job's events, oldest first."""
    return list(session.scalars(select(Event).where(Event.job_id == job_id)
                                .order_by(Event.id)))


def event_json(event: Event) -> dict[str, Any]:
    """One event as JSON-ready data (docs/audit.md)."""
    return {"id": event.id, "at": iso_utc(event.at), "kind": event.kind,
            "study": event.study_pk, "job": event.job_id, "details": event.details or {}}


def audit_report(index: Index, *, study_uid: str | None = None,
                 job_id: int | None = None) -> dict[str, Any]:
    """The events of a study (by StudyInstanceUID, with its jobs') or of a job, as
    JSON-ready data (docs/audit.md); exactly one of the two is given.

    Raises:
        LookupError: no such study or job in the index.
    """
    if (study_uid is None) == (job_id is None):
        raise ValueError("give a study or a job")
    with index.session() as session:
        if study_uid is not None:
            study_pk = session.scalar(select(Study.id).where(
                Study.study_instance_uid == study_uid))
            if study_pk is None:
                raise LookupError("no such study in the index")
            events = study_events(session, study_pk)
        else:
            assert job_id is not None
            study_pk = session.scalar(select(Job.study_pk).where(Job.id == job_id))
            if study_pk is None:
                raise LookupError(f"no job {job_id} in the index")
            events = job_events(session, job_id)
        return {"schema": AUDIT_SCHEMA_VERSION, "study": study_pk, "job": job_id,
                "events": [event_json(e) for e in events]}


def format_event(event: Mapping[str, Any]) -> str:
    """One event as a line of ``dicomnode audit``."""
    job = f"job {event['job']}" if event["job"] is not None else ""
    details = "  ".join(f"{k}={v}" for k, v in event["details"].items())
    return f"{event['at']}  {event['kind']:<18} {job:<9} {details}".rstrip()
