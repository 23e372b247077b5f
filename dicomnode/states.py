"""The node's states and enumerated outcomes, in one place.

Every class is a ``str`` enum whose values are the words the JSON reports, the console
and the metrics show (``receiving``, ``pending``, ...). In the index the state columns
(``study.state``, ``job.state``, ``outbox_item.state``) hold the member *names*
(``RECEIVING``) and ``job.trigger`` the *value* (``complete``), exactly as earlier releases
wrote them, so existing rows read back unchanged (SQLAlchemy ``Enum`` columns,
``native_enum=False``: VARCHAR). DIMSE status codes are in :mod:`dicomnode.dicom.status`.

Who writes each stored state (one owner per table):

* :class:`StudyState` (``study.state``): :mod:`dicomnode.receive.ingest` creates a
  study ``receiving`` and re-opens a complete one; :mod:`dicomnode.completion` completes it.
* :class:`JobState` (``job.state``): :mod:`dicomnode.rules.trigger` creates a job
  (``pending``, or ``discarded`` when ``when_incomplete`` gives up); every later transition
  is :mod:`dicomnode.jobs.queue`'s.
* :class:`OutboxState` (``outbox_item.state``): only :mod:`dicomnode.send.outbox`.
* :class:`ReviewState` (``review.state``): only :mod:`dicomnode.jobs.review`.
* :class:`SeriesGeometry` is not stored as such: it is read from the series' geometry
  columns (``geometry_dirty``, ``geometry_whole``) with :meth:`SeriesGeometry.of`.
* :class:`StudyStatus`, what an operator sees, is derived from the study, its jobs and
  their outbox items in one SQL expression, :func:`dicomnode.store.status.study_status`.

This module imports nothing from the node: every layer may use it.
"""

from __future__ import annotations

import enum

__all__ = ["IngestOutcome", "JobPriority", "JobState", "JobTrigger", "NodeRole", "OutboxState",
           "ReviewState", "SeriesGeometry", "StudyState", "StudyStatus"]


class StudyState(str, enum.Enum):
    """Where a study stands in the receive -> complete cycle (stored)."""

    RECEIVING = "receiving"  # instances arrived within ``completion.quiet_seconds``
    COMPLETE = "complete"  # quiet for ``completion.quiet_seconds``; a late instance re-opens it


class StudyStatus(str, enum.Enum):
    """What an operator sees of a study (derived, see :func:`dicomnode.store.status.study_status`).

    Checked in this order; the first that holds is the study's status.
    """

    RECEIVING = "receiving"  # still receiving (StudyState.RECEIVING)
    FAILED = "failed"  # a job failed, or an outbox item of its jobs failed for good
    PROCESSING = "processing"  # a job is running, or its results are being sent
    AWAITING_REVIEW = "awaiting review"  # results held until a user approves or rejects them
    READY = "ready"  # complete; a job waits for a worker, or no job was created yet
    WAITING_FOR_SERIES = "waiting for series"  # every job discarded (``when_incomplete``)
    RESULTS_SENT = "results sent"  # every job done and every result object it queued sent


class SeriesGeometry(str, enum.Enum):
    """A series' geometry verdict (see :mod:`dicomnode.geometry`)."""

    PENDING = "pending"  # instances arrived since the last verdict; not settled
    NOT_IMAGE = "not-image"  # no image geometry (SR, PR, RTSTRUCT, ...)
    WHOLE = "whole"  # one regular volume: rules may fire on it
    NOT_WHOLE = "not-whole"  # gaps, mixed orientations, ...: ``geometry_reason`` says

    @classmethod
    def of(cls, dirty: bool, whole: bool | None) -> SeriesGeometry:
        """The verdict of a series row from its ``geometry_dirty`` and ``geometry_whole``."""
        if dirty:
            return cls.PENDING
        if whole is None:
            return cls.NOT_IMAGE
        return cls.WHOLE if whole else cls.NOT_WHOLE


class JobState(str, enum.Enum):
    """Where a job stands; a job is created when a rule fires (stored)."""

    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    DISCARDED = "discarded"  # its required series never arrived (``when_incomplete``)


class JobPriority(str, enum.Enum):
    """How soon a rule's jobs are claimed (a rule's ``priority``; ``job.priority`` stores its
    :attr:`rank`). Claims take urgent jobs first, then normal, then background ones, oldest
    first within a class; background jobs wait for ``pipeline.background_hours`` unless no
    other job is pending (see :mod:`dicomnode.jobs.queue`)."""

    URGENT = "urgent"
    NORMAL = "normal"
    BACKGROUND = "background"

    @property
    def rank(self) -> int:
        """The stored value, in claim order: 0 urgent, 1 normal, 2 background."""
        return _PRIORITY_RANKS.index(self)

    @classmethod
    def of_rank(cls, rank: int) -> JobPriority:
        """The class of a stored ``job.priority`` (an unknown rank reads as normal)."""
        return _PRIORITY_RANKS[rank] if 0 <= rank < len(_PRIORITY_RANKS) else cls.NORMAL


_PRIORITY_RANKS = (JobPriority.URGENT, JobPriority.NORMAL, JobPriority.BACKGROUND)


class JobTrigger(str, enum.Enum):
    """Why a rule fired (``job.trigger``, stored as its value)."""

    EARLY = "early"  # while the study was receiving: series settled by size, required series
    COMPLETE = "complete"  # the study was quiet for ``completion.quiet_seconds``
    SETTLED = "settled"  # a series settled (quiet or reached its stated size)
    QUIET = "quiet"  # the study was quiet for the rule's ``wait_seconds``
    MANUAL = "manual"  # an operator ran it (console, ``dicomnode rules run``)
    INCOMPLETE = "incomplete"  # ``when_incomplete``: run without the required series
    SCHEDULE = "schedule"  # a scheduled (cron) rule's run

    @property
    def forced(self) -> bool:
        """Whether a rule fires at once, without waiting for the study's quiet time."""
        return self in (JobTrigger.MANUAL, JobTrigger.SCHEDULE, JobTrigger.INCOMPLETE)


class OutboxState(str, enum.Enum):
    """Where an outbox item stands (see :mod:`dicomnode.send.outbox`; stored)."""

    PENDING = "pending"  # waiting for its next attempt (``next_attempt_at``)
    SENDING = "sending"  # claimed by a delivery until ``next_attempt_at`` (a lease)
    SENT = "sent"  # the destination answered Success or a warning
    FAILED = "failed"  # refused for good, or transient failures ``max_attempts`` times
    CANCELLED = "cancelled"  # superseded by a newer version of its job before it was sent
    HELD = "held"  # its job's rule says ``review: required``: waits for a user's approval
    REJECTED = "rejected"  # a user rejected its job's results in review: never sent


class ReviewState(str, enum.Enum):
    """Where the review of a job's results stands (``review.state``; written only by
    :mod:`dicomnode.jobs.review`): its outbox items are held until a user decides."""

    AWAITING = "awaiting"  # results written, items held
    APPROVED = "approved"  # a user approved: the items went on to be sent
    REJECTED = "rejected"  # a user rejected: the items are never sent


class IngestOutcome(str, enum.Enum):
    """What happened to one received instance (the receive counters' labels)."""

    STORED = "stored"  # a new instance
    DUPLICATE = "duplicate"  # an identical re-send: nothing changed
    REPLACED = "replaced"  # the same SOP Instance UID with other content
    FAILED = "failed"  # refused with a failure status


class NodeRole(str, enum.Enum):
    """What a node of a site does (the ``node`` table, ``dicomnode status``)."""

    SERVE = "serve"  # receives (SCP), runs jobs (unless pipeline.workers is 0) and sends
    WORKER = "worker"  # runs jobs only: no SCP, no console
