"""Read-only views of the index for the command line and the console.

The JSON form of :func:`studies_report` is stable (see docs/studies-json.md):
keys are only ever added, never renamed or removed. It holds no patient
identity (no names, IDs or birth dates).
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from dicomnode.states import SeriesGeometry, StudyStatus
from dicomnode.store.db import Index
from dicomnode.store.studystatus import study_status
from dicomnode.store.tables import Instance, Series, Study

__all__ = ["STUDIES_SCHEMA_VERSION", "count_by_state", "format_timings", "iso_utc",
           "studies_report", "study_pk"]

STUDIES_SCHEMA_VERSION = 1


def iso_utc(value: dt.datetime | None) -> str | None:
    """A naive UTC time of the index as ISO 8601 with ``Z``; None stays None."""
    return None if value is None else value.isoformat() + "Z"


def format_timings(timings: Mapping[str, Any] | None) -> str:
    """A job's step timings in one line (``pseudonymize 0.91 s, read 0.59 s``); entries
    that are not seconds (the provider) are left out."""
    return ", ".join(f"{k} {v:.2f} s" for k, v in (timings or {}).items()
                     if isinstance(v, float))


def count_by_state(index: Index, column: Any, states: Iterable[enum.Enum]) -> dict[str, int]:
    """Rows per value of an enum ``column`` (e.g. ``Job.state``), every state listed (0 too)."""
    counts = {str(s.value): 0 for s in states}
    with index.session() as session:
        for state, n in session.execute(select(column, func.count()).group_by(column)):
            value = state.value if hasattr(state, "value") else str(state)
            counts[value] = int(n)
    return counts


def study_pk(index: Index, study_uid: str) -> int | None:
    """The index key of the study with this StudyInstanceUID, or None."""
    with index.session() as session:
        found: int | None = session.scalars(
            select(Study.id).where(Study.study_instance_uid == study_uid)).first()
    return found


def series_files(index: Index, root: Path, series_uid: str) -> list[Path]:
    """The stored files of series ``series_uid`` (under the storage root ``root``); empty
    when none is stored (never received, or deleted by retention)."""
    with index.session() as session:
        paths = session.scalars(
            select(Instance.file_path).join(Series)
            .where(Series.series_instance_uid == series_uid)).all()
    return [root / p for p in paths]


def studies_report(index: Index, *, study_uid: str | None = None) -> dict[str, Any]:
    """Studies with their state, the operator's status (``status``, see
    :mod:`dicomnode.store.studystatus`) and their series with geometry verdicts."""
    with index.session() as session:
        counts = {pk: n for pk, n in session.execute(
            select(Instance.series_pk, func.count(Instance.id)).group_by(Instance.series_pk))}
        frames = {pk: n for pk, n in session.execute(
            select(Instance.series_pk, func.sum(Instance.number_of_frames))
            .group_by(Instance.series_pk))}
        query = (select(Study, study_status()).options(selectinload(Study.series))
                 .order_by(Study.id))
        if study_uid:
            query = query.where(Study.study_instance_uid == study_uid)
        studies = session.execute(query).all()
        out = []
        for study, status in studies:
            series_out = []
            for s in sorted(study.series, key=lambda x: (x.series_number is None,
                                                         x.series_number or 0, x.id)):
                series_out.append(_series(s, counts.get(s.id, 0), frames.get(s.id) or 0))
            out.append({
                "id": study.id,
                "study_instance_uid": study.study_instance_uid,
                "state": study.state.value,
                "status": StudyStatus(status).value,
                "study_date": study.study_date,
                "study_description": study.study_description,
                "instance_count": sum(x["instance_count"] for x in series_out),
                "first_received_at": iso_utc(study.first_received_at),
                "last_received_at": iso_utc(study.last_received_at),
                "completed_at": iso_utc(study.completed_at),
                "reopened_count": study.reopened_count,
                "series": series_out,
            })
    return {"schema": STUDIES_SCHEMA_VERSION, "studies": out}


def _series(s: Series, count: int, frames: int) -> dict[str, Any]:
    return {
        "id": s.id,
        "series_instance_uid": s.series_instance_uid,
        "modality": s.modality,
        "series_number": s.series_number,
        "series_description": s.series_description,
        "body_part_examined": s.body_part_examined,
        "frame_of_reference_uid": s.frame_of_reference_uid,
        "instance_count": count,
        "frame_count": int(frames),
        "geometry": {
            "state": SeriesGeometry.of(s.geometry_dirty, s.geometry_whole).value,
            "whole": None if s.geometry_dirty else s.geometry_whole,
            "reason": None if s.geometry_dirty else s.geometry_reason,
            "frames": s.geometry_frames,
            "slice_spacing_mm": s.slice_spacing,
            "orientation": s.orientation,
            "stated_size": s.stated_size,
            "settled_by_size": s.settled_by_size,
        },
    }
