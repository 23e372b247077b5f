"""The index: patients, studies, series and instances as SQLAlchemy tables.

Times are stored as naive UTC datetimes. Multi-valued DICOM attributes
(ImageType, PixelSpacing, ImagePositionPatient, ImageOrientationPatient) are
stored as JSON lists of their values; positions and spacings are in mm in the
DICOM patient coordinate system (LPS).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# the states are defined with the node's other states; imported here for the columns and
# for the modules that import them from the tables
from dicomnode.states import (
    JobPriority,
    JobState,
    JobTrigger,
    NodeRole,
    OutboxState,
    ReviewState,
    StudyState,
)

__all__ = [
    "Base",
    "Event",
    "FeedbackObject",
    "FeedbackStructure",
    "Instance",
    "Job",
    "JobInput",
    "JobState",
    "JobTrigger",
    "NodeRecord",
    "NodeRole",
    "Notification",
    "OutboxItem",
    "OutboxState",
    "Patient",
    "PseudonymStudy",
    "PseudonymUID",
    "PullRun",
    "Review",
    "ReviewState",
    "RuleSchedule",
    "Series",
    "Study",
    "StudyState",
]


def utcnow() -> dt.datetime:
    """The current time as a naive UTC datetime (the index's time convention)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class Patient(Base):
    """One patient, keyed by PatientID (and IssuerOfPatientID when given)."""

    __tablename__ = "patient"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))

    studies: Mapped[list[Study]] = relationship(back_populates="patient")

    __table_args__ = (
        Index("ux_patient_key", "patient_id", "issuer_of_patient_id", unique=True),
    )


class Study(Base):
    """One study (StudyInstanceUID) with its completion state."""

    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    patient_pk: Mapped[int] = mapped_column(ForeignKey("patient.id"))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16), default=StudyState.RECEIVING, index=True
    )
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    completed_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    reopened_count: Mapped[int] = mapped_column(Integer, default=0)

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(
        back_populates="study", order_by="Series.series_number"
    )


class Series(Base):
    """One series with its geometry verdict (see :mod:`dicomnode.geometry`)."""

    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    series_description: Mapped[str | None] = mapped_column(String(64))
    series_number: Mapped[int | None] = mapped_column(Integer)
    body_part_examined: Mapped[str | None] = mapped_column(String(16))
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64))
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    # geometry verdict, recomputed when ``geometry_dirty`` is set by a new instance
    geometry_dirty: Mapped[bool] = mapped_column(Boolean, default=True, index=True)
    geometry_whole: Mapped[bool | None] = mapped_column(Boolean)
    geometry_reason: Mapped[str | None] = mapped_column(Text)
    geometry_frames: Mapped[int | None] = mapped_column(Integer)
    slice_spacing: Mapped[float | None] = mapped_column(Float)
    orientation: Mapped[str | None] = mapped_column(String(16))
    # the series' size as its instances state it (None: not stated), and whether it had
    # reached it when it settled (then it settled at once, without its quiet time)
    stated_size: Mapped[int | None] = mapped_column(Integer)
    settled_by_size: Mapped[bool | None] = mapped_column(Boolean)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One received SOP instance and the file holding it, exactly as received."""

    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    series_pk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    image_type: Mapped[list[Any] | None] = mapped_column(JSON)
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    pixel_spacing: Mapped[list[Any] | None] = mapped_column(JSON)
    slice_thickness: Mapped[float | None] = mapped_column(Float)
    image_position_patient: Mapped[list[Any] | None] = mapped_column(JSON)
    image_orientation_patient: Mapped[list[Any] | None] = mapped_column(JSON)
    frame_of_reference_uid: Mapped[str | None] = mapped_column(String(64))
    number_of_frames: Mapped[int] = mapped_column(Integer, default=1)
    # per-frame positions of multi-frame images: [[x, y, z] or null, ...] (mm, LPS); rows of
    # earlier releases may hold [x, y, z, 6 orientation numbers] for a frame of its own
    frame_positions: Mapped[list[Any] | None] = mapped_column(JSON)
    # per-frame orientation/pixel spacing of a multi-frame image whose frames differ from
    # the instance's columns: {"orientations": [...], "pixel_spacings": [...]}, else null
    # (see dicomnode.dicom.frames.frames_to_index)
    frame_geometry: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # what the instance states about the size of its series (see dicomnode.completion
    # stated_size): {"acquisition": AcquisitionNumber, "images_in_acquisition": ...}
    size_hints: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    file_path: Mapped[str] = mapped_column(Text)
    file_size: Mapped[int] = mapped_column(BigInteger)
    times_received: Mapped[int] = mapped_column(Integer, default=1)

    series: Mapped[Series] = relationship(back_populates="instances")


class Job(Base):
    """One version of a rule's firing on a set of input series.

    ``bindings`` is the rule's named series in clause order, the model's input
    channel order: ``[[name, SeriesInstanceUID], ...]``. A job is unique per rule, input
    series and ``version``: when the instances of its input series change after a job was
    created (late or replaced instances, ``content_key``), the rule fires again as the next
    version, whose results get new UIDs and withdraw the earlier version's. ``outputs`` and
    ``send_to`` are the rule's decisions, recorded when the job is created.
    """

    __tablename__ = "job"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rule_name: Mapped[str] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    study_pk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    inputs_key: Mapped[str] = mapped_column(String(64))
    bindings: Mapped[list[Any]] = mapped_column(JSON)
    alternatives: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    # why the rule fired: VARCHAR(16) holding the JobTrigger *value* ("early"), as rows
    # of earlier releases do (the state columns hold their enum's member *names*)
    trigger: Mapped[JobTrigger] = mapped_column(Enum(
        JobTrigger, native_enum=False, length=16,
        values_callable=lambda members: [m.value for m in members]))
    version: Mapped[int] = mapped_column(Integer, default=1)
    # digest of the bound series' instances (SOP Instance UID and time received)
    content_key: Mapped[str | None] = mapped_column(String(64))
    instance_count: Mapped[int | None] = mapped_column(Integer)
    changes: Mapped[str | None] = mapped_column(Text)  # what changed since the last version
    outputs: Mapped[list[Any] | None] = mapped_column(JSON)  # None: the configuration's
    send_to: Mapped[list[Any] | None] = mapped_column(JSON)
    # the job whose rejection note withdrew this job's results (IOCM)
    withdrawn_by: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[JobState] = mapped_column(
        Enum(JobState, native_enum=False, length=16), default=JobState.PENDING, index=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    # seconds per step of the last run ({"read": .., "inference": .., ...}) and the objects
    # it wrote ([{"kind", "sop_instance_uid", "file"}]), see dicomnode.jobs.pipeline
    timings: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    results: Mapped[list[Any] | None] = mapped_column(JSON)
    # while running: the node (``node.id``) that claimed it, until when its claim holds
    # unless renewed, and when it was last renewed (see dicomnode.jobs.queue)
    owner: Mapped[str | None] = mapped_column(String(128))
    lease_expires_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    # the rule's JobPriority as its rank (0 urgent, 1 normal, 2 background): claims take
    # pending jobs by (priority, id)
    priority: Mapped[int] = mapped_column(Integer, default=JobPriority.NORMAL.rank,
                                          server_default="1")

    study: Mapped[Study] = relationship()

    __table_args__ = (
        Index("ux_job_rule_inputs_version", "rule_name", "inputs_key", "version", unique=True),
        Index("ix_job_claim_order", "state", "priority", "id"),
    )


class OutboxItem(Base):
    """One result object to be C-STOREd to one destination (unique per instance and peer).

    ``destination`` is a peer name from the configuration. ``last_status`` is the
    last C-STORE status received (None when none was: peer down, association lost);
    ``last_error`` says what went wrong last, without patient data. ``job_pk`` names
    the job that produced the object, when one did.
    """

    __tablename__ = "outbox_item"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    file_path: Mapped[str] = mapped_column(Text)
    destination: Mapped[str] = mapped_column(String(64))
    state: Mapped[OutboxState] = mapped_column(
        Enum(OutboxState, native_enum=False, length=16), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_status: Mapped[int | None] = mapped_column(Integer)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    job_pk: Mapped[int | None] = mapped_column(Integer, index=True)
    # while sending: the node (``node.id``) that claimed it and when it last renewed the
    # claim, whose end is ``next_attempt_at`` (see dicomnode.send.outbox)
    owner: Mapped[str | None] = mapped_column(String(128))
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ux_outbox_item_instance_destination", "sop_instance_uid", "destination",
              unique=True),
        Index("ix_outbox_item_due", "state", "next_attempt_at"),
    )


class PseudonymStudy(Base):
    """A pseudonymized study and what re-identification restores (holds identity).

    ``patient_study`` is the original Patient, General Study and Patient Study modules
    (:attr:`dicomnode.deid.PseudonymizationRecord.patient_study`). Like the rest of the
    index, this table may hold identity; nothing from it is ever logged.
    """

    __tablename__ = "pseudonym_study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonymous_study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    original_study_uid: Mapped[str] = mapped_column(String(64), index=True)
    pseudonymous_patient_id: Mapped[str] = mapped_column(String(64))
    patient_study: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class PseudonymUID(Base):
    """One UID replaced by pseudonymization: pseudonym -> original, within a study (a UID
    referenced from several studies, e.g. a shared Frame of Reference, is in each)."""

    __tablename__ = "pseudonym_uid"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pseudonymous_uid: Mapped[str] = mapped_column(String(64))
    original_uid: Mapped[str] = mapped_column(String(64))
    study_pk: Mapped[int] = mapped_column(ForeignKey("pseudonym_study.id"), index=True)

    __table_args__ = (
        Index("ux_pseudonym_uid_study", "pseudonymous_uid", "study_pk", unique=True),
    )


class RuleSchedule(Base):
    """When a scheduled rule (``schedule:`` cron) last ran over the studies received since."""

    __tablename__ = "rule_schedule"

    rule_name: Mapped[str] = mapped_column(String(64), primary_key=True)
    last_run_at: Mapped[dt.datetime] = mapped_column(DateTime)


class PullRun(Base):
    """One run of a scheduled pull (``pulls.NAME``): which due time it served and what it got.

    A row is written when a run starts, so a due time is served once, also across restarts;
    its counts are filled in when the run ends (``finished_at`` stays NULL if the node
    stopped meanwhile). ``error`` is the node's own message (never a peer's value).
    """

    __tablename__ = "pull_run"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    pull_name: Mapped[str] = mapped_column(String(64))
    peer: Mapped[str] = mapped_column(String(64))
    due_at: Mapped[dt.datetime] = mapped_column(DateTime)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    studies: Mapped[int] = mapped_column(Integer, default=0)
    instances: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (
        Index("ux_pull_run_due", "pull_name", "due_at", unique=True),
    )


class JobInput(Base):
    """What a job's first input series was like (the input drift a model's feedback page
    shows next to the figures): recorded by the worker when the job runs, from the
    pseudonymized headers and the volume. ``manufacturer`` is the series' value as
    received (never identity; escaped where shown). Intensities are the modality values
    (HU for CT) at the 1st, 50th and 99th percentile of a subsample of the volume."""

    __tablename__ = "job_input"

    job_pk: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    slice_thickness_mm: Mapped[float | None] = mapped_column(Float)
    kvp: Mapped[float | None] = mapped_column(Float)
    intensity_p01: Mapped[float | None] = mapped_column(Float)
    intensity_p50: Mapped[float | None] = mapped_column(Float)
    intensity_p99: Mapped[float | None] = mapped_column(Float)
    recorded_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class FeedbackObject(Base):
    """An RTSTRUCT or SEG received for a study that dicomnode contoured, and its comparison
    with the result of the job it answers (:mod:`dicomnode.jobs.feedback`).

    ``state``: ``pending`` (found, not compared yet), ``running`` (a worker compares it),
    ``done`` (its structures are in ``feedback_structure``), ``skipped`` (nothing to
    compare: dicomnode's own object sent back unchanged, no matching job or structure;
    ``reason`` says which), ``failed`` (``reason``: the node's own message).
    ``matched_by``: how the job was found (``reference``: the object references the job's
    result or its SOP Instance UIDs; ``series``: it references the job's input series;
    ``own``: it is the job's own result, unchanged).
    """

    __tablename__ = "feedback_object"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(Integer, unique=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # RTSTRUCT or SEG
    study_pk: Mapped[int] = mapped_column(Integer, index=True)
    job_pk: Mapped[int | None] = mapped_column(Integer, index=True)
    model: Mapped[str | None] = mapped_column(String(64), index=True)
    model_version: Mapped[str | None] = mapped_column(String(64))
    matched_by: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    found_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    compared_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class FeedbackStructure(Base):
    """One structure of a job's result against the same structure in a received object.

    ``outcome``: ``compared``, ``deleted`` (the received object has no such structure or
    an empty one: Dice 0, no distances) or ``added`` (the result's structure is empty, the
    received one is not). Distances in mm over the surfaces (boundary voxels)
    of both masks on the source grid: ``hd95_mm`` the 95th percentile of the distances of
    both directions pooled, ``msd_mm`` their mean (symmetric mean surface distance).
    Volumes in ml; ``volume_change_ml`` = received - ours.
    """

    __tablename__ = "feedback_structure"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    feedback_pk: Mapped[int] = mapped_column(ForeignKey("feedback_object.id"), index=True)
    model: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    structure: Mapped[str] = mapped_column(String(64))
    received_name: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(16))
    dice: Mapped[float] = mapped_column(Float)
    hd95_mm: Mapped[float | None] = mapped_column(Float)
    msd_mm: Mapped[float | None] = mapped_column(Float)
    volume_ours_ml: Mapped[float] = mapped_column(Float)
    volume_received_ml: Mapped[float] = mapped_column(Float)
    volume_change_ml: Mapped[float] = mapped_column(Float)
    computed_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)


class Event(Base):
    """One entry of the audit trail: what happened to a study or a job, and when.

    Append-only: rows are inserted by :func:`dicomnode.store.audit.record` and never
    updated or deleted by the node (docs/audit.md). ``kind`` is a
    :class:`dicomnode.store.audit.EventKind` value. The keys are plain columns, not foreign
    keys: an event outlives what it names (retention deletes instances, never events).
    ``details`` holds keys and counts only (rule, model and digest, peer name, counts,
    status codes), never a DICOM value.
    """

    __tablename__ = "event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    study_pk: Mapped[int | None] = mapped_column(Integer, index=True)
    job_id: Mapped[int | None] = mapped_column(Integer, index=True)
    details: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    __table_args__ = (
        Index("ix_event_kind_at", "kind", "at"),
    )


class Notification(Base):
    """One message to one notification target (``notify.NAME``), sent like an outbox item.

    ``key`` makes a message unique per target and occasion (``job-failed:12``,
    ``summary:2026-12-04``), so an occasion seen twice queues one message. ``payload`` is
    the message as rendered (subject, body, JSON fields) from allow-listed fields.
    ``state`` is a :class:`dicomnode.states.OutboxState` member name (pending, sending,
    sent, failed).
    """

    __tablename__ = "notification"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    target: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[OutboxState] = mapped_column(
        Enum(OutboxState, native_enum=False, length=16), default=OutboxState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime)

    __table_args__ = (
        Index("ux_notification_target_key", "target", "key", unique=True),
        Index("ix_notification_due", "state", "next_attempt_at"),
    )


class NodeRecord(Base):
    """One node of the site sharing this index (``dicomnode serve`` or ``dicomnode worker``)
    and when it last said it is alive (``dicomnode status``)."""

    __tablename__ = "node"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)  # node.id
    role: Mapped[NodeRole] = mapped_column(Enum(NodeRole, native_enum=False, length=16))
    version: Mapped[str] = mapped_column(String(32))  # the dicomnode release it runs
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    stopped_at: Mapped[dt.datetime | None] = mapped_column(DateTime)


class Review(Base):
    """The review of one job's results (its rule says ``review: required``): its outbox
    items are held until a console user approves them (they go out) or rejects them (never
    sent). Written only by :mod:`dicomnode.jobs.review`; ``decided_by`` is the user's name as
    the console recorded it (never a patient's), ``decided_at`` naive UTC.
    """

    __tablename__ = "review"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_pk: Mapped[int] = mapped_column(Integer, index=True, unique=True)
    state: Mapped[ReviewState] = mapped_column(
        Enum(ReviewState, native_enum=False, length=16), default=ReviewState.AWAITING)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    decided_at: Mapped[dt.datetime | None] = mapped_column(DateTime)
    decided_by: Mapped[str | None] = mapped_column(String(64))
