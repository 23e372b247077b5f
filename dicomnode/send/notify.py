"""Notifications: webhooks and mail for failed jobs, failed deliveries, sent results and a
daily summary, durable and retried like the outbox.

Messages are made from the audit trail (:mod:`dicomnode.store.audit`): the node's
:class:`Notifier` listens to the events recorded in its process and, for each target
(``notify.targets``) that wants the event, adds a :class:`~dicomnode.store.tables.Notification`
row in the same transaction as the transition (nothing is sent there: the job path and the
outbox never wait for a webhook or a mail server). The node's scheduler then calls
:meth:`Notifier.tick` every ``notify.check_interval_seconds``: it queues the daily summaries
that are due and delivers the due messages. States, claims and back-off are the outbox's::

    pending --claim--> sending --2xx / mail accepted--------------------> sent
                          |----refused for good (HTTP 4xx but 408/429)--> failed
                          '----otherwise: pending again after the back-off, failed after
                               notify.max_attempts attempts

A message is rendered when it is queued, from an allow-listed set of fields
(:data:`dicomnode.config.NOTIFY_FIELDS`): keys, names and counts, never identity, unless
the target is marked ``identity: true`` (then its templates may use the identity fields).
Each message is unique per target and occasion (``key``), so an occasion seen twice (a
restart, two destinations finishing together) queues one message. Logs name messages by
their index key and targets by name.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import smtplib
import urllib.error
import urllib.request
from collections.abc import Mapping
from email.message import EmailMessage
from string import Template
from typing import Any, cast

from sqlalchemy import CursorResult, func, select, update
from sqlalchemy.orm import Session

from dicomnode.config import (
    NOTIFY_COMMON_FIELDS,
    NOTIFY_FIELDS,
    NOTIFY_IDENTITY_FIELDS,
    Config,
    NotifyConfig,
    NotifyEvent,
    NotifyTargetConfig,
)
from dicomnode.store import audit
from dicomnode.store.audit import EventKind
from dicomnode.store.db import Index
from dicomnode.store.tables import (
    Event,
    Job,
    Notification,
    OutboxItem,
    OutboxState,
    Patient,
    Study,
    utcnow,
)

__all__ = ["DEFAULT_TEMPLATES", "NotificationError", "Notifier", "daily_summary_fields",
           "notification_delay", "render"]

LOG = logging.getLogger(__name__)

#: The texts of a target without templates of its own.
DEFAULT_TEMPLATES: dict[NotifyEvent, tuple[str, str]] = {
    NotifyEvent.JOB_FAILED: (
        "dicomnode $node: job $job failed",
        "Job $job (rule $rule, model $model $model_version) on study $study failed after "
        "$attempts attempt(s): $error"),
    NotifyEvent.DELIVERY_FAILED: (
        "dicomnode $node: delivery to $peer failed",
        "Results of job $job (rule $rule) on study $study could not be delivered to $peer: "
        "outbox item $item failed for good after $attempts attempt(s) (status $status)."),
    NotifyEvent.RESULTS_SENT: (
        "dicomnode $node: results of job $job sent",
        "Job $job (rule $rule, model $model $model_version) on study $study: $objects "
        "object(s) delivered to $peers."),
    NotifyEvent.DAILY_SUMMARY: (
        "dicomnode $node: summary of $date",
        "dicomnode $node, $date (UTC):\n"
        "studies received: $studies_received\n"
        "studies completed: $studies_completed\n"
        "jobs finished: $jobs_finished\n"
        "jobs failed: $jobs_failed\n"
        "result objects sent: $items_sent\n"
        "deliveries failed: $items_failed\n"
        "received instances deleted by retention: $instances_deleted"),
}

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBERS = re.compile(r"\d[\d.\-/:]{5,}")
_PERSON_NAMES = re.compile(r"[^\s()\[\]{},;]*\^[^\s()\[\]{},;]*")


def _hide_values(text: str) -> str:
    """An error text without quoted values, person names or long runs of digits."""
    for pattern in (_QUOTED, _PERSON_NAMES, _NUMBERS):
        text = pattern.sub("<value hidden>", text)
    return text


class NotificationError(Exception):
    """A message was not delivered; ``final`` when trying again cannot help."""

    def __init__(self, message: str, *, final: bool = False) -> None:
        super().__init__(message)
        self.final = final


def notification_delay(attempts: int, settings: NotifyConfig) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 for the first):
    ``min(retry_initial_seconds * 2 ** (attempts - 1), retry_max_seconds)``."""
    exponent = min(max(attempts - 1, 0), 62)
    return float(min(settings.retry_initial_seconds * 2**exponent, settings.retry_max_seconds))


def render(target: NotifyTargetConfig, event: NotifyEvent,
           fields: Mapping[str, Any]) -> dict[str, Any]:
    """The message for ``target``: subject, text and the fields it may carry (the
    allow-listed ones; identity only for an ``identity: true`` target)."""
    allowed = NOTIFY_FIELDS[event] | NOTIFY_COMMON_FIELDS
    if target.identity and event is not NotifyEvent.DAILY_SUMMARY:
        allowed |= NOTIFY_IDENTITY_FIELDS
    values = {k: ("" if v is None else v) for k, v in fields.items() if k in allowed}
    subject, body = DEFAULT_TEMPLATES[event]
    own = target.templates.get(event)
    if own is not None:
        subject, body = own.subject or subject, own.body or body
    # every allowed field exists (empty when unknown), so a template never fails here
    context = {name: "" for name in allowed} | {k: str(v) for k, v in values.items()}
    return {"event": event.value,
            "subject": Template(subject).safe_substitute(context),
            "text": Template(body).safe_substitute(context),
            "fields": values}


# ------------------------------------------------------------------------ the fields


def _job_fields(session: Session, job_id: int) -> dict[str, Any]:
    job = session.get(Job, job_id)
    if job is None:
        return {"job": job_id}
    started = audit.last_details(session, job_id, EventKind.JOB_STARTED)
    return {"job": job_id, "rule": job.rule_name, "model": job.model, "study": job.study_pk,
            "model_version": started.get("model_version"), "digest": started.get("digest"),
            "attempts": job.attempts}


def _identity(session: Session, study_pk: int | None) -> dict[str, Any]:
    if study_pk is None:
        return {}
    row = session.execute(
        select(Study.study_instance_uid, Study.accession_number, Patient.patient_id,
               Patient.patient_name).join(Patient, Study.patient_pk == Patient.id)
        .where(Study.id == study_pk)).one_or_none()
    if row is None:
        return {}
    return {"study_uid": row[0], "accession_number": row[1], "patient_id": row[2],
            "patient_name": row[3]}


def daily_summary_fields(session: Session, start: dt.datetime,
                         end: dt.datetime) -> dict[str, Any]:
    """The counts of the daily summary over ``[start, end)`` (naive UTC), from the audit
    trail: studies received (distinct studies with a received event) and completed, jobs
    finished and failed, result objects sent, deliveries failed, instances deleted."""
    def count(kind: EventKind) -> int:
        return int(session.scalar(select(func.count(Event.id)).where(
            Event.kind == kind.value, Event.at >= start, Event.at < end)) or 0)

    received = int(session.scalar(select(func.count(func.distinct(Event.study_pk))).where(
        Event.kind.in_([EventKind.SERIES_RECEIVED.value, EventKind.STUDY_RECEIVED.value]),
        Event.at >= start, Event.at < end)) or 0)
    deleted = 0
    for details in session.scalars(select(Event.details).where(
            Event.kind == EventKind.RETENTION_DELETED.value, Event.at >= start,
            Event.at < end)):
        deleted += int((details or {}).get("instances", 0))
    return {"date": (end - dt.timedelta(seconds=1)).date().isoformat(),
            "studies_received": received,
            "studies_completed": count(EventKind.STUDY_COMPLETED),
            "jobs_finished": count(EventKind.JOB_FINISHED),
            "jobs_failed": count(EventKind.JOB_FAILED),
            "items_sent": count(EventKind.SENT),
            "items_failed": count(EventKind.SEND_FAILED),
            "instances_deleted": deleted}


# ------------------------------------------------------------------------ the notifier


class Notifier:
    """Queues messages as the audit trail grows and sends them (the node's scheduler calls
    :meth:`tick`). ``install()`` starts listening to this process's audit events."""

    def __init__(self, config: Config, index: Index) -> None:
        self.settings = config.notify
        self.targets = config.notify.targets
        self.node = config.node.ae_title
        self.index = index

    def install(self) -> None:
        audit.add_listener(self.on_event)

    def uninstall(self) -> None:
        audit.remove_listener(self.on_event)

    # -- queueing (in the transition's transaction) -------------------------------------

    def _wanting(self, event: NotifyEvent) -> list[tuple[str, NotifyTargetConfig]]:
        return [(n, t) for n, t in self.targets.items() if event in t.events]

    def _queue(self, session: Session, event: NotifyEvent, key: str, fields: dict[str, Any],
               study_pk: int | None = None) -> int:
        """Add the message of ``event`` for every target that wants it and does not have
        ``key`` yet; returns how many were added."""
        added = 0
        identity: dict[str, Any] | None = None
        now = utcnow()
        for name, target in self._wanting(event):
            if session.scalar(select(Notification.id).where(
                    Notification.target == name, Notification.key == key)) is not None:
                continue
            values = {**fields, "node": self.node, "event": event.value, "target": name,
                      "time": now.replace(microsecond=0).isoformat() + "Z"}
            if target.identity and event is not NotifyEvent.DAILY_SUMMARY:
                if identity is None:
                    identity = _identity(session, study_pk)
                values.update(identity)
            session.add(Notification(target=name, kind=event.value, key=key,
                                     payload=render(target, event, values),
                                     state=OutboxState.PENDING, attempts=0,
                                     next_attempt_at=now, created_at=now))
            added += 1
        return added

    def on_event(self, session: Session, event: Event) -> None:
        """An audit event was recorded in ``session``: queue what the targets want of it."""
        if not self.targets:
            return
        details = event.details or {}
        kind = event.kind
        if kind == EventKind.JOB_FAILED.value and event.job_id is not None:
            session.flush()  # the event's id keys the message: each failure is told
            fields = _job_fields(session, event.job_id)
            fields["error"] = _hide_values(str(details.get("error", "")))
            self._queue(session, NotifyEvent.JOB_FAILED, f"job-failed:{event.id}", fields,
                        fields.get("study"))
        elif kind == EventKind.SEND_FAILED.value:
            fields = {**(_job_fields(session, event.job_id) if event.job_id else {}),
                      "peer": details.get("peer"), "item": details.get("item"),
                      "status": _status(details.get("status")),
                      "attempts": details.get("attempts")}
            self._queue(session, NotifyEvent.DELIVERY_FAILED,
                        f"delivery-failed:{event.job_id or 'item-' + str(details.get('item'))}"
                        f":{details.get('peer')}", fields, fields.get("study"))
        elif kind == EventKind.SENT.value and event.job_id is not None:
            self._results_sent(session, event.job_id)

    def _results_sent(self, session: Session, job_id: int) -> None:
        rows = session.execute(select(OutboxItem.destination, OutboxItem.state).where(
            OutboxItem.job_pk == job_id)).all()
        if any(state in (OutboxState.PENDING, OutboxState.SENDING) for _, state in rows):
            return  # told when the job's last item is delivered
        sent = [(dest, state) for dest, state in rows if state is OutboxState.SENT]
        if not sent:
            return
        fields = _job_fields(session, job_id)
        fields["peers"] = ", ".join(sorted({dest for dest, _ in sent}))
        fields["objects"] = len(sent)
        self._queue(session, NotifyEvent.RESULTS_SENT, f"results-sent:{job_id}", fields,
                    fields.get("study"))

    # -- the scheduler's work -------------------------------------------------------------

    def tick(self, now: dt.datetime | None = None) -> int:
        """Queue the daily summaries due, then deliver the due messages; returns how many
        were sent."""
        now = now or utcnow()
        try:
            self.queue_summaries(now)
        except Exception as exc:  # the deliveries still go
            LOG.error("notify: daily summary not queued: %s", type(exc).__name__)
        return self.deliver_due(now)

    def queue_summaries(self, now: dt.datetime) -> int:
        """Queue today's summary of each target whose ``summary_at`` has passed (once per
        day: keyed by the date; a node started later that day still sends it)."""
        added = 0
        with self.index.session() as session, session.begin():
            for name, target in self._wanting(NotifyEvent.DAILY_SUMMARY):
                assert target.summary_at is not None
                at = dt.datetime.combine(
                    now.date(), dt.datetime.strptime(target.summary_at, "%H:%M").time())
                if now < at:
                    continue
                fields = daily_summary_fields(session, at - dt.timedelta(days=1), at)
                key = f"summary:{at.date().isoformat()}"
                if session.scalar(select(Notification.id).where(
                        Notification.target == name, Notification.key == key)) is not None:
                    continue
                values = {**fields, "node": self.node,
                          "event": NotifyEvent.DAILY_SUMMARY.value, "target": name,
                          "time": now.replace(microsecond=0).isoformat() + "Z"}
                session.add(Notification(
                    target=name, kind=NotifyEvent.DAILY_SUMMARY.value, key=key,
                    payload=render(target, NotifyEvent.DAILY_SUMMARY, values),
                    state=OutboxState.PENDING, attempts=0, next_attempt_at=now,
                    created_at=now))
                added += 1
        return added

    def _claim(self, now: dt.datetime) -> list[tuple[int, str, dict[str, Any], int]]:
        timeouts = [t.webhook.timeout_seconds if t.webhook is not None
                    else t.email.timeout_seconds if t.email is not None else 0.0
                    for t in self.targets.values()]
        # one send at a time: the claim outlives every claimed message timing out once
        lease = dt.timedelta(seconds=60 + 100 * max([0.0, *timeouts]))
        claimed = []
        with self.index.session() as session:
            rows = session.execute(select(
                Notification.id, Notification.state, Notification.next_attempt_at,
                Notification.target, Notification.payload, Notification.attempts).where(
                Notification.state.in_([OutboxState.PENDING, OutboxState.SENDING]),
                Notification.next_attempt_at <= now).order_by(Notification.id).limit(100)).all()
            for item_id, state, next_at, target, payload, attempts in rows:
                result = cast(CursorResult[Any], session.execute(
                    update(Notification).where(Notification.id == item_id,
                                               Notification.state == state,
                                               Notification.next_attempt_at == next_at)
                    .values(state=OutboxState.SENDING, next_attempt_at=now + lease)))
                if result.rowcount == 1:
                    claimed.append((item_id, target, dict(payload), attempts))
            session.commit()
        return claimed

    def deliver_due(self, now: dt.datetime | None = None) -> int:
        """Send every due message once (in this thread); returns how many were sent."""
        now = now or utcnow()
        sent = 0
        for item_id, name, payload, attempts in self._claim(now):
            target = self.targets.get(name)
            attempts += 1
            values: dict[str, Any] = {"attempts": attempts}
            try:
                if target is None:
                    raise NotificationError(f"target {name} is no longer configured",
                                            final=True)
                self._send(target, payload)
            except NotificationError as exc:
                final = exc.final or attempts >= self.settings.max_attempts
                delay = notification_delay(attempts, self.settings)
                values.update(state=OutboxState.FAILED if final else OutboxState.PENDING,
                              last_error=str(exc)[:500],
                              next_attempt_at=now + dt.timedelta(seconds=delay))
                if final:
                    LOG.error("notification %d -> %s: failed, not retried: %s", item_id,
                              name, exc)
                else:
                    LOG.warning("notification %d -> %s: not sent (attempt %d of %d): %s; next "
                                "attempt in %g s", item_id, name, attempts,
                                self.settings.max_attempts, exc, delay)
            else:
                values.update(state=OutboxState.SENT, sent_at=utcnow(), last_error=None)
                sent += 1
                LOG.info("notification %d -> %s: sent (attempt %d)", item_id, name, attempts)
            with self.index.session() as session, session.begin():
                session.execute(update(Notification).where(Notification.id == item_id)
                                .values(**values))
        return sent

    def _send(self, target: NotifyTargetConfig, payload: dict[str, Any]) -> None:
        if target.webhook is not None:
            _post(target.webhook.url, payload, dict(target.webhook.headers),
                  target.webhook.timeout_seconds)
        else:
            assert target.email is not None
            _mail(target, payload)


def _status(value: Any) -> str:
    return "none" if value is None else f"0x{int(value):04X}"


def _post(url: str, payload: dict[str, Any], headers: dict[str, str], timeout: float) -> None:
    body = json.dumps(payload).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "dicomnode", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        final = 400 <= exc.code < 500 and exc.code not in (408, 429)
        raise NotificationError(f"HTTP {exc.code}", final=final) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NotificationError(f"webhook unreachable: {type(reason).__name__}") from None


def _mail(target: NotifyTargetConfig, payload: dict[str, Any]) -> None:
    settings = target.email
    assert settings is not None
    message = EmailMessage()
    message["Subject"] = str(payload.get("subject", ""))
    message["From"] = settings.sender
    message["To"] = ", ".join(settings.to)
    message.set_content(str(payload.get("text", "")))
    password = os.environ.get(settings.password_env) if settings.password_env else None
    try:
        with smtplib.SMTP(settings.host, settings.port,
                          timeout=settings.timeout_seconds) as smtp:
            if settings.starttls:
                smtp.starttls()
            if settings.username is not None:
                smtp.login(settings.username, password or "")
            smtp.send_message(message)
    except smtplib.SMTPRecipientsRefused:
        raise NotificationError("the mail server refused every recipient", final=True) from None
    except smtplib.SMTPResponseException as exc:
        final = 500 <= exc.smtp_code < 600
        raise NotificationError(f"SMTP {exc.smtp_code}", final=final) from None
    except (smtplib.SMTPException, OSError) as exc:
        raise NotificationError(f"mail server unreachable: {type(exc).__name__}") from None
