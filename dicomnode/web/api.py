"""The console's JSON API (``/api/v1``): response models and their allow-listed builders.

Every answer is built field by field from the reports of the command line
(``studies --json``, ``jobs --json``, ``outbox --json``): a field is sent only when it is
named here, so a column added to a report later never reaches the console by itself.
Each model's fields come in two lists:

* the public fields: states, counts, times, index keys, rule and model names, errors with
  every quoted value hidden (:func:`hide_values`);
* the identity fields (``*_IDENTITY``): patient names, identifiers, birth dates and sex,
  accession numbers, UIDs, dates and descriptions of studies and series (descriptions can
  hold names), file paths and errors as written. They are filled only for a request that
  carries the console's token; otherwise they are left out of the answer (not null).

This module imports pydantic and the index's light modules only, never the model stack.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from sqlalchemy import select

from dicomnode.store.db import Index
from dicomnode.store.tables import Patient, Study

__all__ = [
    "API_PREFIX", "Geometry", "Job", "JobList", "Message", "ModelCard", "ModelList",
    "OutboxItem", "OutboxList", "PatientOut", "QueueJob", "QueueList", "Review",
    "ReviewDecision", "ReviewList", "RuleInfo", "RuleList", "Series", "StudyDetail",
    "StudyList", "StudySummary", "hide_values", "job_overlay_path", "jobs_view",
    "models_view", "outbox_view", "patient_of", "queue_view", "reviews_view", "rules_view",
    "studies_view",
]

API_PREFIX = "/api/v1"

_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NUMBERS = re.compile(r"\d[\d.\-/:]{5,}")  # UIDs, dates, identifiers made of digits
_PERSON_NAMES = re.compile(r"[^\s()\[\]{},;]*\^[^\s()\[\]{},;]*")  # DICOM PN: Doe^John


def hide_values(text: str | None) -> str | None:
    """An error message without quoted values, person names (``Doe^John``) or long runs of
    digits (UIDs, dates, IDs)."""
    if text is None:
        return None
    for pattern in (_QUOTED, _PERSON_NAMES, _NUMBERS):
        text = pattern.sub("<value hidden>", text)
    return text


def job_overlay_path(storage_path: Path, job_id: int) -> Path:
    """The picture a job's worker drew: ``storage.path/jobs/ID/overlay.png`` (the path the
    pipeline writes, computed here so that the console never imports the pipeline)."""
    return storage_path / "jobs" / str(int(job_id)) / "overlay.png"


class _Out(BaseModel):
    # a field not declared here is dropped, never passed through
    model_config = ConfigDict(extra="ignore")


class Message(_Out):
    """The answer of an action, and of an error."""

    detail: str


class PatientOut(_Out):
    """A study's patient (identity: only with the token)."""

    name: str | None = None
    id: str | None = None
    issuer_of_id: str | None = None
    birth_date: str | None = None
    sex: str | None = None


class Geometry(_Out):
    state: str
    whole: bool | None = None
    reason: str | None = None
    frames: int | None = None
    slice_spacing_mm: float | None = None
    orientation: str | None = None
    stated_size: int | None = None
    settled_by_size: bool | None = None


class Series(_Out):
    id: int
    modality: str | None = None
    series_number: int | None = None
    body_part_examined: str | None = None
    instance_count: int
    frame_count: int
    geometry: Geometry
    # identity
    series_instance_uid: str | None = None
    series_description: str | None = None
    frame_of_reference_uid: str | None = None


class StudySummary(_Out):
    id: int
    state: str  # receiving or complete (dicomnode.states.StudyState)
    # what an operator sees: receiving, waiting for series, ready, processing, results
    # sent, failed (dicomnode.states.StudyStatus, dicomnode.store.studystatus)
    status: str | None = None
    instance_count: int
    first_received_at: str | None = None
    last_received_at: str | None = None
    completed_at: str | None = None
    reopened_count: int = 0
    series: list[Series]
    # identity
    study_instance_uid: str | None = None
    study_date: str | None = None
    study_description: str | None = None
    accession_number: str | None = None
    patient: PatientOut | None = None


class StudyList(_Out):
    schema_version: int
    studies: list[StudySummary]


class Event(_Out):
    """One entry of the audit trail (docs/audit.md): keys, counts and status codes only."""

    id: int
    at: str | None = None
    kind: str
    study: int | None = None
    job: int | None = None
    details: dict[str, Any]


class EventList(_Out):
    schema_version: int
    events: list[Event]


class StudyDetail(StudySummary):
    """One study, with how each rule evaluates on it (``rules test``; without the token only
    each rule's verdict line, as the compared values may quote descriptions), and its
    timeline (the audit events of the study and its jobs)."""

    explanation: str
    runnable_rules: list[str]
    events: list[Event] = []


class JobResult(_Out):
    kind: str
    # an RTSTRUCT's structures the model found empty, left out of it (card names)
    omitted: list[str] | None = None
    # identity
    sop_instance_uid: str | None = None
    file: str | None = None


class Job(_Out):
    id: int
    rule: str
    model: str
    priority: str | None = None  # urgent, normal or background
    study: int
    inputs: list[str]
    trigger: str
    version: int
    changes: str | None = None
    instances: int | None = None
    withdrawn_by: int | None = None
    state: str
    attempts: int
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    seconds: float | None = None
    timings: dict[str, float | str] | None = None  # seconds per step; the provider
    results: list[JobResult]
    error: str | None = None  # without the token: with its quoted values hidden
    overlay: str | None = None  # the URL of the job's picture, when there is one


class JobList(_Out):
    schema_version: int
    jobs: list[Job]


class QueueJob(_Out):
    """A running or waiting job, in claim order (keys and names only: no study UID, no
    patient value). ``expected_start`` is an estimate (UTC)."""

    position: int | None = None  # 1 = claimed next; None: running
    id: int
    rule: str
    model: str
    priority: str  # urgent, normal or background (dicomnode.states.JobPriority)
    state: str
    study: int
    attempts: int
    created_at: str | None = None
    started_at: str | None = None
    expected_start: str | None = None  # estimate; None: running, or no worker here
    expected_in_seconds: float | None = None
    mean_seconds: float | None = None  # the model's mean run time the estimate used


class QueueList(_Out):
    schema_version: int
    estimate: bool  # expected starts are estimates
    at: str | None = None
    workers: int
    background_hours: str | None = None
    background_open: bool
    mean_seconds: dict[str, float]
    jobs: list[QueueJob]


class OutboxItem(_Out):
    id: int
    state: str
    destination: str
    sop_class_uid: str
    sop_class_name: str | None = None
    job_id: int | None = None
    attempts: int
    next_attempt_at: str | None = None
    last_status: int | None = None
    last_error: str | None = None  # without the token: with its quoted values hidden
    created_at: str | None = None
    sent_at: str | None = None
    # identity
    sop_instance_uid: str | None = None
    file_path: str | None = None


class OutboxList(_Out):
    schema_version: int
    counts: dict[str, int]
    items: list[OutboxItem]


class RuleInfo(_Out):
    name: str
    model: str
    enabled: bool
    priority: str  # urgent, normal or background
    schedule: str | None = None
    inputs: list[str]
    send_to: list[str]
    outputs: list[str] | None = None
    wait_seconds: float | None = None
    review: bool = False  # ``review: required``: results held until a user approves them
    source: str


class RuleList(_Out):
    rules: list[RuleInfo]


class ModelInput(_Out):
    name: str
    modality: str | None = None


class ModelCard(_Out):
    """What a package's ``card.yaml`` says (read, not validated: ``models check`` does)."""

    name: str
    version: str | None = None
    description: str | None = None
    intended_use: str | None = None
    license: str | None = None
    source: str | None = None
    rule_based: bool = False
    status: str | None = None  # approval: clinical, research (a card without one) or qa
    inputs: list[ModelInput]
    structures: list[str]
    used_by: list[str]
    error: str | None = None  # the card cannot be read


class ModelList(_Out):
    models: list[ModelCard]


class Review(_Out):
    """A job whose results are held for review (``review: required``): keys, names, times
    and counts only, never identity."""

    job: int
    study: int
    rule: str
    model: str
    version: int | None = None
    job_state: str
    state: str  # awaiting, approved, rejected
    held_at: str | None = None
    decided_at: str | None = None
    decided_by: str | None = None  # the console user who decided
    held_items: dict[str, int]  # destination -> items held
    objects: list[str]  # the kinds of objects the job wrote (SEG, RTSTRUCT, SR)


class ReviewList(_Out):
    schema_version: int
    reviews: list[Review]


class ReviewDecision(BaseModel):
    """The body of ``POST /api/v1/jobs/ID/approve`` and ``.../reject``: who decides (the
    console user's name, recorded with the decision and in the audit trail)."""

    model_config = ConfigDict(extra="forbid")

    user: str


# the keys each view copies from the reports: public first, then identity
_STUDY = ("id", "state", "status", "instance_count", "first_received_at", "last_received_at",
          "completed_at", "reopened_count")
_STUDY_IDENTITY = ("study_instance_uid", "study_date", "study_description")
_SERIES = ("id", "modality", "series_number", "body_part_examined", "instance_count",
           "frame_count")
_SERIES_IDENTITY = ("series_instance_uid", "series_description", "frame_of_reference_uid")
_GEOMETRY = ("state", "whole", "reason", "frames", "slice_spacing_mm", "orientation",
             "stated_size", "settled_by_size")
_JOB = ("id", "rule", "model", "priority", "study", "inputs", "trigger", "version", "changes",
        "instances", "withdrawn_by", "state", "attempts", "created_at", "started_at",
        "finished_at", "seconds", "timings")
_RESULT_IDENTITY = ("sop_instance_uid", "file")
_QUEUED = ("position", "id", "rule", "model", "priority", "state", "study", "attempts",
           "created_at", "started_at", "expected_start", "expected_in_seconds", "mean_seconds")
_QUEUE = ("estimate", "at", "workers", "background_hours", "background_open", "mean_seconds")
_ITEM = ("id", "state", "destination", "sop_class_uid", "sop_class_name", "job_id",
         "attempts", "next_attempt_at", "last_status", "created_at", "sent_at")
_ITEM_IDENTITY = ("sop_instance_uid", "file_path")


def _pick(source: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    return {k: source.get(k) for k in keys}


def patient_of(index: Index, study_ids: Iterable[int] | None = None) -> dict[int, dict[str, Any]]:
    """Per study key, its patient and accession number (identity: for token holders)."""
    query = select(Study.id, Study.accession_number, Patient.patient_name, Patient.patient_id,
                   Patient.issuer_of_patient_id, Patient.patient_birth_date,
                   Patient.patient_sex).join(Patient)
    if study_ids is not None:
        query = query.where(Study.id.in_(list(study_ids)))
    with index.session() as session:
        rows = session.execute(query).all()
    return {sid: {"accession_number": accession,
                  "patient": {"name": name, "id": pid, "issuer_of_id": issuer or None,
                              "birth_date": birth, "sex": sex}}
            for sid, accession, name, pid, issuer, birth, sex in rows}


def _study(study: Mapping[str, Any], identity: dict[int, dict[str, Any]] | None
           ) -> dict[str, Any]:
    out = _pick(study, _STUDY)
    series = []
    for s in study["series"]:
        one = _pick(s, _SERIES)
        one["geometry"] = _pick(s["geometry"], _GEOMETRY)
        if identity is not None:
            one.update(_pick(s, _SERIES_IDENTITY))
        series.append(one)
    out["series"] = series
    if identity is not None:
        out.update(_pick(study, _STUDY_IDENTITY))
        out.update(identity.get(study["id"], {}))
    return out


def studies_view(report: Mapping[str, Any], *, identity: dict[int, dict[str, Any]] | None
                 ) -> dict[str, Any]:
    """``studies --json`` as :class:`StudyList`; ``identity`` (from :func:`patient_of`) only
    for a request with the token, else None."""
    return {"schema_version": report["schema"],
            "studies": [_study(s, identity) for s in report["studies"]]}


def jobs_view(report: Mapping[str, Any], *, authenticated: bool,
              overlays: set[int]) -> dict[str, Any]:
    """``jobs --json`` as :class:`JobList`."""
    jobs = []
    for job in report["jobs"]:
        out = _pick(job, _JOB)
        out["results"] = [
            {"kind": r.get("kind"), **({"omitted": r["omitted"]} if r.get("omitted") else {}),
             **(_pick(r, _RESULT_IDENTITY) if authenticated else {})}
            for r in job.get("results") or []]
        out["error"] = job.get("error") if authenticated else hide_values(job.get("error"))
        out["overlay"] = (f"/jobs/{job['id']}/overlay.png" if job["id"] in overlays else None)
        jobs.append(out)
    return {"schema_version": report["schema"], "jobs": jobs}


def queue_view(report: Mapping[str, Any]) -> dict[str, Any]:
    """The queue (:func:`dicomnode.jobs.policy.queue_report`) as :class:`QueueList`: the
    same for every request (it holds no identity)."""
    return {"schema_version": report["schema"], **_pick(report, _QUEUE),
            "jobs": [_pick(job, _QUEUED) for job in report["jobs"]]}


def outbox_view(report: Mapping[str, Any], *, authenticated: bool) -> dict[str, Any]:
    """``outbox --json`` as :class:`OutboxList`."""
    items = []
    for item in report["items"]:
        out = _pick(item, _ITEM)
        error = item.get("last_error")
        out["last_error"] = error if authenticated else hide_values(error)
        if authenticated:
            out.update(_pick(item, _ITEM_IDENTITY))
        items.append(out)
    return {"schema_version": report["schema"], "counts": dict(report["counts"]),
            "items": items}


def rules_view(rules: Iterable[Any]) -> dict[str, Any]:
    """The loaded rules (:class:`dicomnode.rules.loader.Rule`) as :class:`RuleList`."""
    return {"rules": [{
        "name": r.name, "model": r.model, "enabled": r.enabled, "priority": r.priority.value,
        "schedule": r.schedule, "inputs": list(r.input_names), "send_to": list(r.send_to),
        "outputs": None if r.outputs is None else list(r.outputs),
        "wait_seconds": r.wait_seconds, "review": bool(getattr(r, "review_required", False)),
        "source": Path(r.source.split(":")[0]).name,
    } for r in rules]}


def reviews_view(reviews: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """:func:`dicomnode.jobs.review.reviews_report` as :class:`ReviewList`."""
    return {"schema_version": 1, "reviews": [dict(r) for r in reviews]}


def models_view(models_dir: Path, rules: Iterable[Any]) -> dict[str, Any]:
    """The packages in ``models_dir`` as :class:`ModelList`, from their ``card.yaml`` read
    as YAML (a card is validated by ``models check`` and when a job loads it; validating
    here would import the profiles' image libraries into the node's process)."""
    from dicomnode.config import ConfigError, read_yaml_mapping

    used: dict[str, list[str]] = {}
    for rule in rules:
        used.setdefault(rule.model, []).append(rule.name)
    models = []
    folders = sorted(p for p in models_dir.iterdir() if (p / "card.yaml").is_file()) \
        if models_dir.is_dir() else []
    for folder in folders:
        try:
            _, card = read_yaml_mapping(folder / "card.yaml", "a model card", ConfigError)
        except ConfigError as exc:
            models.append({"name": folder.name, "inputs": [], "structures": [],
                           "used_by": used.get(folder.name, []),
                           "error": str(exc).splitlines()[0] if str(exc) else "unreadable"})
            continue
        name = str(card.get("name") or folder.name)
        inputs: list[Any] = _list(card.get("inputs"))
        outputs = card.get("outputs")
        labels = _list(outputs.get("labels")) if isinstance(outputs, dict) else []
        one: dict[str, Any] = {k: _text(card.get(k)) for k in (
            "version", "description", "intended_use", "license", "source")}
        one.update({
            "name": name, "rule_based": card.get("rule_based") is True,
            "status": _text(card.get("status")) or "research",
            "inputs": [{"name": str(i.get("name")), "modality": _text(i.get("modality"))}
                       for i in inputs if isinstance(i, dict)],
            "structures": [str(label.get("name")) for label in labels
                           if isinstance(label, dict)],
            "used_by": used.get(name, []),
        })
        models.append(one)
    return {"models": models}


def events_view(events: Iterable[Mapping[str, Any]], *, authenticated: bool
                ) -> dict[str, Any]:
    """Audit events (:func:`dicomnode.store.audit.event_json`); without the token a job's
    error has its quoted values hidden, as in the jobs' view."""
    rows = []
    for event in events:
        details = dict(event["details"])
        if not authenticated and "error" in details:
            details["error"] = hide_values(str(details["error"]))
        rows.append({**event, "details": details})
    return {"schema_version": 1, "events": rows}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    return None if value is None else str(value).strip()
