"""Study completion: when has a study finished arriving?

A study is complete when no instance has arrived for ``quiet_seconds`` and no
association that delivered to it is still open. Every image series gets a
geometry verdict (see :mod:`dicomnode.geometry`) kept in the index, computed
again whenever the series receives an instance. A late instance re-opens a
complete study (the store does that); the next check completes it again.

Completion is decided from the index alone, plus the set of open
associations held in memory: after a crash and a restart, no association is
open and completion is simply recomputed from the stored times.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections.abc import Callable, Hashable

from sqlalchemy import select, update

from dicomnode.geometry import Frame, GeometryVerdict, assess
from dicomnode.store.db import Index
from dicomnode.store.tables import Instance, Series, Study, StudyState, utcnow

__all__ = ["AssociationActivity", "CompletionMonitor", "series_verdict"]

LOG = logging.getLogger(__name__)


class AssociationActivity:
    """Which open associations have delivered to which studies (thread-safe).

    ``on_closed`` listeners are called (in the closing association's thread, after its
    studies are released) when an association that delivered something closes: its
    series have settled, so a completion check need not wait for its next interval.
    """

    def __init__(self, on_closed: list[Callable[[], None]] | None = None) -> None:
        self._lock = threading.Lock()
        self._studies: dict[Hashable, set[int]] = {}
        self.on_closed = list(on_closed or [])

    def touch(self, association: Hashable, study_pk: int) -> None:
        with self._lock:
            self._studies.setdefault(association, set()).add(study_pk)

    def close(self, association: Hashable) -> None:
        with self._lock:
            delivered = self._studies.pop(association, None)
        if delivered:
            _notify(self.on_closed)

    def busy_studies(self) -> set[int]:
        with self._lock:
            return set().union(*self._studies.values()) if self._studies else set()


#: Segmentations have frames with positions, but they are results, not images to segment:
#: (binary/fractional) Segmentation, Surface Segmentation, Label Map Segmentation Storage.
NOT_IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.5",
    "1.2.840.10008.5.1.4.1.1.66.7",
})


def series_verdict(instances: list[Instance]) -> GeometryVerdict | None:
    """The geometry verdict of a series from its index rows; None for non-image series."""
    frames: list[Frame] = []
    for inst in instances:
        if (inst.rows is None or inst.columns is None
                or inst.sop_class_uid in NOT_IMAGE_SOP_CLASSES):
            continue
        if inst.frame_positions:
            # a frame with its own orientation is stored as 9 numbers: position, orientation
            frames.extend(
                Frame(pos[:3], pos[3:] if len(pos) == 9 else inst.image_orientation_patient,
                      inst.rows, inst.columns, inst.pixel_spacing)
                for pos in inst.frame_positions)
        elif (inst.number_of_frames or 1) > 1:
            # frames without a position each (cine, or positions that could not be read)
            # are no stack of slices: never "whole, single slice"
            frames.extend(Frame(None, inst.image_orientation_patient, inst.rows, inst.columns,
                                inst.pixel_spacing) for _ in range(inst.number_of_frames))
        else:
            frames.append(Frame(inst.image_position_patient, inst.image_orientation_patient,
                                inst.rows, inst.columns, inst.pixel_spacing))
    if not frames:
        return None
    return assess(frames)


CompletionListener = Callable[[int], None]


class CompletionMonitor:
    """Computes geometry verdicts and completes quiet studies; run :meth:`check` periodically.

    Args:
        index: the index database.
        activity: the open associations and the studies they delivered to.
        quiet_seconds: how long a study must be without new instances.
        listeners: called with the study primary key after a study completes.
    """

    def __init__(self, index: Index, activity: AssociationActivity, *, quiet_seconds: float,
                 series_quiet_seconds: float = 1.0,
                 listeners: list[CompletionListener] | None = None,
                 settled_listeners: list[CompletionListener] | None = None) -> None:
        if quiet_seconds < 0 or series_quiet_seconds < 0:
            raise ValueError("quiet_seconds and series_quiet_seconds must be >= 0")
        self.index = index
        self.activity = activity
        self.quiet = dt.timedelta(seconds=quiet_seconds)
        self.series_quiet = dt.timedelta(seconds=series_quiet_seconds)
        self.listeners = list(listeners or [])
        self.settled_listeners = list(settled_listeners or [])
        self._lock = threading.Lock()

    def update_geometry(self, busy: set[int], now: dt.datetime | None = None) -> set[int]:
        """Recompute the verdict of changed series that have settled.

        A series has settled when no association delivering to its study is
        open, or when it has had no new instance for ``series_quiet_seconds``
        (an association sending a whole study moves on to the next series).
        Returns the studies whose series got a new verdict.
        """
        now = now or utcnow()
        studies: set[int] = set()
        with self.index.session() as session:
            dirty = session.scalars(select(Series).where(Series.geometry_dirty.is_(True))).all()
            for series in dirty:
                if series.study_pk in busy and series.last_received_at > now - self.series_quiet:
                    continue
                verdict = series_verdict(list(series.instances))
                series.geometry_dirty = False
                if verdict is None:
                    series.geometry_whole = None
                    series.geometry_reason = "not an image series"
                    series.geometry_frames = 0
                    series.slice_spacing = None
                    series.orientation = None
                else:
                    series.geometry_whole = verdict.whole
                    series.geometry_reason = verdict.reason
                    series.geometry_frames = verdict.frames
                    series.slice_spacing = verdict.slice_spacing
                    series.orientation = verdict.orientation
                    if not verdict.whole:
                        LOG.info("series %d is not whole: %s", series.id, verdict.reason)
                studies.add(series.study_pk)
            session.commit()
        return studies

    def check(self, now: dt.datetime | None = None) -> list[int]:
        """One pass: update verdicts, complete quiet studies; returns completed study keys."""
        with self._lock:
            now = now or utcnow()
            busy = self.activity.busy_studies()
            settled = self.update_geometry(busy, now)
            completed: list[int] = []
            cutoff = now - self.quiet
            with self.index.session() as session:
                candidates = session.scalars(
                    select(Study.id).where(Study.state == StudyState.RECEIVING,
                                           Study.last_received_at <= cutoff)
                ).all()
                for pk in candidates:
                    if pk in busy:
                        continue
                    # conditional, so an instance stored meanwhile keeps the study open
                    result = session.execute(
                        update(Study)
                        .where(Study.id == pk, Study.state == StudyState.RECEIVING,
                               Study.last_received_at <= cutoff)
                        .values(state=StudyState.COMPLETE, completed_at=now))
                    if result.rowcount:  # type: ignore[attr-defined]
                        completed.append(pk)
                session.commit()
        for pk in sorted(settled - set(completed)):
            _notify(self.settled_listeners, pk)
        for pk in completed:
            LOG.info("study %d complete", pk)
            _notify(self.listeners, pk)
        return completed


def _notify(listeners: list[Callable[..., None]], *args: int) -> None:
    """Call each listener with ``args``; one that fails is logged and the others still run."""
    for listener in listeners:
        try:
            listener(*args)
        except Exception:
            LOG.exception("listener %s failed%s", getattr(listener, "__name__", "?"),
                          f" for study {args[0]}" if args else "")
