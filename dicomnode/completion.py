"""Study completion: when has a series, and a study, finished arriving?

A series **settles** when no instance of it arrived for ``series_quiet_seconds``, or at
once when its instances state the series' size and it has reached that size
(:func:`stated_size`: ImagesInAcquisition per acquisition, NumberOfSlices x
NumberOfTimeSlices, NumberOfTemporalPositions, a concatenation's
InConcatenationTotalNumber, an enhanced multi-frame object's own frames). A series short
of its stated size never settles early: it waits for its quiet time like any other, and
its verdict says how many images are missing. An association's release says nothing about
whether a series is finished. When a series settles it gets a geometry verdict (see
:mod:`dicomnode.geometry`) kept in the index; a new instance makes it unsettled again.

A **study** is complete when no instance has arrived for ``quiet_seconds`` and no
association that delivered to it is still open. A rule fires on a study when every series
it binds is settled and whole and the study has been quiet for the rule's wait (its
``wait_seconds`` or ``quiet_seconds``), or earlier when every series it binds reached its
stated size (see :mod:`dicomnode.rules.trigger`). A late instance re-opens a complete
study (the store does that); the next check completes it again.

Completion is decided from the index alone, plus the set of open associations held in
memory: after a crash and a restart, no association is open and completion is simply
recomputed from the stored times.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from dicomnode.dicom.frames import frames_from_index
from dicomnode.geometry import Frame, GeometryVerdict, assess, planes
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.tables import Instance, Series, Study, StudyState, utcnow

__all__ = ["AssociationActivity", "CompletionMonitor", "StatedSize", "series_verdict",
           "stated_size"]

LOG = logging.getLogger(__name__)


class AssociationActivity:
    """Which open associations have delivered to which studies (thread-safe).

    ``on_closed`` listeners are called (in the closing association's thread, after its
    studies are released) when an association that delivered something closes: its
    series have settled, so a completion check need not wait for its next interval.
    With ``index``, each closing association's deliveries (instances per study) are an
    audit event (:func:`dicomnode.store.audit.record_delivered`).
    """

    def __init__(self, on_closed: list[Callable[[], None]] | None = None, *,
                 index: Index | None = None) -> None:
        self._lock = threading.Lock()
        self._studies: dict[Hashable, Counter[int]] = {}
        self.on_closed = list(on_closed or [])
        self.index = index

    def touch(self, association: Hashable, study_pk: int) -> None:
        with self._lock:
            self._studies.setdefault(association, Counter())[study_pk] += 1

    def close(self, association: Hashable) -> None:
        with self._lock:
            delivered = self._studies.pop(association, None)
        if delivered:
            if self.index is not None:
                audit.record_delivered(self.index, delivered)
            _notify(self.on_closed)

    def busy_studies(self) -> set[int]:
        with self._lock:
            return {pk for counts in self._studies.values() for pk in counts}


#: Segmentations have frames with positions, but they are results, not images to segment:
#: (binary/fractional) Segmentation, Surface Segmentation, Label Map Segmentation Storage.
NOT_IMAGE_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.5",
    "1.2.840.10008.5.1.4.1.1.66.7",
})


def _is_image(inst: Instance) -> bool:
    return (inst.rows is not None and inst.columns is not None
            and inst.sop_class_uid not in NOT_IMAGE_SOP_CLASSES)


@dataclass(frozen=True)
class StatedSize:
    """The number of images a series' instances say it has, and how many arrived."""

    expected: int
    received: int

    @property
    def complete(self) -> bool:
        return self.received >= self.expected


def _group_size(hints: Sequence[dict[str, Any]], key: str) -> int | None:
    """The one positive value ``key`` has in every instance of a group, else None."""
    values = {h.get(key) for h in hints}
    if len(values) != 1:
        return None
    value = values.pop()
    return value if isinstance(value, int) and 0 < value < 1_000_000 else None


def _single_frame_size(hints: Sequence[dict[str, Any]]) -> int | None:
    """The stated size of a series' single-frame images, or None when they do not state it
    (or state it inconsistently: more images arrived than stated, differing values)."""
    count = len(hints)
    if all("images_in_acquisition" in h for h in hints):
        groups: dict[Any, list[dict[str, Any]]] = defaultdict(list)
        for h in hints:
            groups[h.get("acquisition")].append(h)
        expected = 0
        for group in groups.values():
            size = _group_size(group, "images_in_acquisition")
            if size is None or len(group) > size:
                return None
            expected += size
        return expected
    if all("number_of_slices" in h for h in hints):  # PET/NM: slices x time slices
        slices = _group_size(hints, "number_of_slices")
        times = _group_size([{"t": h.get("number_of_time_slices", 1)} for h in hints], "t")
        if slices is None or times is None or count > slices * times:
            return None
        return slices * times
    if all("temporal_positions" in h and "temporal_position" in h for h in hints):
        positions = _group_size(hints, "temporal_positions")
        if positions is None:
            return None
        per_position = Counter(h["temporal_position"] for h in hints)
        if len(per_position) > positions:
            return None
        # every temporal position holds the same slices: as many as the fullest one
        return positions * max(per_position.values())
    return None


def stated_size(instances: Iterable[Instance]) -> StatedSize | None:
    """How many images a series should have, where its instances say so; None otherwise.

    An enhanced (multi-frame) image is complete by itself; a concatenation is complete
    with InConcatenationTotalNumber instances; single-frame images state their number
    with ImagesInAcquisition (per AcquisitionNumber), NumberOfSlices x
    NumberOfTimeSlices (PET, NM), or NumberOfTemporalPositions (every temporal position
    holding as many images as the fullest one). Values that contradict what arrived (more
    images than stated, different values in one group) count as not stated.
    """
    single: list[dict[str, Any]] = []
    concatenations: dict[str, list[dict[str, Any]]] = defaultdict(list)
    expected = received = 0
    for inst in instances:
        if not _is_image(inst):
            continue
        hints = inst.size_hints or {}
        if "concatenation_uid" in hints:
            concatenations[str(hints["concatenation_uid"])].append(hints)
        elif (inst.number_of_frames or 1) > 1 or inst.frame_positions or inst.frame_geometry:
            expected += 1
            received += 1
        else:
            single.append(hints)
    for group in concatenations.values():
        size = _group_size(group, "concatenation_total")
        if size is None or len(group) > size:
            return None
        expected += size
        received += len(group)
    if single:
        size = _single_frame_size(single)
        if size is None:
            return None
        expected += size
        received += len(single)
    return StatedSize(expected, received) if expected else None


def series_verdict(instances: list[Instance]) -> GeometryVerdict | None:
    """The geometry verdict of a series from its index rows; None for non-image series.

    Every frame is judged with its own position, orientation and pixel spacing, as the
    header model placed it at ingest (:func:`dicomnode.dicom.frames.frames_from_index`);
    multi-frame images without per-frame positions (cine) are no stack of slices.
    """
    frames: list[Frame] = []
    for inst in instances:
        if not _is_image(inst):
            continue
        try:
            geometry = frames_from_index(
                number_of_frames=inst.number_of_frames, position=inst.image_position_patient,
                orientation=inst.image_orientation_patient, pixel_spacing=inst.pixel_spacing,
                frame_positions=inst.frame_positions, frame_geometry=inst.frame_geometry)
        except ValueError as exc:
            return GeometryVerdict(False, f"indexed frame geometry is unusable: {exc}",
                                   len(frames) + max(inst.number_of_frames or 1, 1))
        frames.extend(planes(geometry, inst.rows, inst.columns))
    if not frames:
        return None
    return assess(frames)


CompletionListener = Callable[[int], None]
WaitListener = Callable[[int, float], None]


class CompletionMonitor:
    """Settles series, completes quiet studies, and tells when a study has been quiet for a
    rule's wait; run :meth:`check` periodically.

    Args:
        index: the index database.
        activity: the open associations and the studies they delivered to.
        quiet_seconds: how long a study must be without new instances to be complete.
        series_quiet_seconds: how long a series must be without new instances to settle
            (unless it reached its stated size, :func:`stated_size`).
        listeners: called with the study primary key after a study completes.
        settled_listeners: called with the study primary key after series of it settled.
        waits: further quiet times (seconds, e.g. rules' ``wait_seconds``) after which
            ``wait_listeners`` are called with the study key and the wait, once per quiet
            period of the study.
    """

    def __init__(self, index: Index, activity: AssociationActivity, *, quiet_seconds: float,
                 series_quiet_seconds: float = 10.0,
                 listeners: list[CompletionListener] | None = None,
                 settled_listeners: list[CompletionListener] | None = None,
                 waits: Iterable[float] = (),
                 wait_listeners: list[WaitListener] | None = None) -> None:
        waits = sorted(set(waits))
        if quiet_seconds < 0 or series_quiet_seconds < 0 or any(w < 0 for w in waits):
            raise ValueError("quiet_seconds, series_quiet_seconds and waits must be >= 0")
        self.index = index
        self.activity = activity
        self.quiet = dt.timedelta(seconds=quiet_seconds)
        self.series_quiet = dt.timedelta(seconds=series_quiet_seconds)
        self.waits = [dt.timedelta(seconds=w) for w in waits]
        self.listeners = list(listeners or [])
        self.settled_listeners = list(settled_listeners or [])
        self.wait_listeners = list(wait_listeners or [])
        self._lock = threading.Lock()
        self._last_check: dt.datetime | None = None

    def update_geometry(self, now: dt.datetime | None = None) -> set[int]:
        """Settle the changed series that have been quiet or reached their stated size,
        and compute their verdicts; returns the studies that have newly settled series."""
        now = now or utcnow()
        quiet_before = now - self.series_quiet
        studies: set[int] = set()
        with self.index.session() as session:
            dirty = session.scalars(select(Series).where(Series.geometry_dirty.is_(True))).all()
            for series in dirty:
                instances = list(series.instances)
                quiet = series.last_received_at <= quiet_before
                size = stated_size(instances)
                if not quiet and not (size is not None and size.complete):
                    continue
                self._settle(series, instances, size, quiet)
                studies.add(series.study_pk)
            session.commit()
        return studies

    @staticmethod
    def _settle(series: Series, instances: list[Instance], size: StatedSize | None,
                quiet: bool) -> None:
        verdict = series_verdict(instances)
        series.geometry_dirty = False
        series.stated_size = size.expected if size is not None else None
        series.settled_by_size = size is not None and size.complete and not quiet
        short = ""
        if size is not None and not size.complete:
            short = f"; {size.received} of the {size.expected} images its instances state"
            LOG.warning("series %d settled after its quiet time with %d of the %d images its "
                        "instances state", series.id, size.received, size.expected)
        if verdict is None:
            series.geometry_whole = None
            series.geometry_reason = "not an image series"
            series.geometry_frames = 0
            series.slice_spacing = None
            series.orientation = None
            return
        series.geometry_whole = verdict.whole
        series.geometry_reason = verdict.reason + short
        series.geometry_frames = verdict.frames
        series.slice_spacing = verdict.slice_spacing
        series.orientation = verdict.orientation
        if not verdict.whole:
            LOG.info("series %d is not whole: %s", series.id, verdict.reason)

    def settle_study(self, study_pk: int, now: dt.datetime | None = None) -> None:
        """Settle every changed series of a study now (an operator's "run now")."""
        with self._lock, self.index.session() as session:
            for series in session.scalars(select(Series).where(
                    Series.study_pk == study_pk, Series.geometry_dirty.is_(True))).all():
                instances = list(series.instances)
                self._settle(series, instances, stated_size(instances), True)
            session.commit()

    def check(self, now: dt.datetime | None = None) -> list[int]:
        """One pass: settle series, complete quiet studies; returns completed study keys."""
        with self._lock:
            now = now or utcnow()
            previous, self._last_check = self._last_check, now
            busy = self.activity.busy_studies()
            settled = self.update_geometry(now)
            completed: list[int] = []
            waited: list[tuple[int, float]] = []
            cutoff = now - self.quiet
            with self.index.session() as session:
                for wait in self.waits:  # quiet periods that reached a wait since last time
                    # (after a start: those that reached it within the hour before)
                    since = (previous if previous is not None
                             else now - dt.timedelta(hours=1)) - wait
                    waited.extend((pk, wait.total_seconds()) for pk in session.scalars(
                        select(Study.id).where(Study.last_received_at <= now - wait,
                                               Study.last_received_at > since)).all())
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
                        audit.record(session, audit.EventKind.STUDY_COMPLETED, study_pk=pk)
                session.commit()
        for pk in sorted(settled - set(completed)):
            _notify(self.settled_listeners, pk)
        for pk, seconds in waited:
            _notify_wait(self.wait_listeners, pk, seconds)
        for pk in completed:
            LOG.info("study %d complete", pk)
            _notify(self.listeners, pk)
        return completed


def _notify_wait(listeners: list[WaitListener], study_pk: int, seconds: float) -> None:
    for listener in listeners:
        try:
            listener(study_pk, seconds)
        except Exception:
            LOG.exception("listener %s failed for study %d", getattr(listener, "__name__", "?"),
                          study_pk)


def _notify(listeners: list[Callable[..., None]], *args: int) -> None:
    """Call each listener with ``args``; one that fails is logged and the others still run."""
    for listener in listeners:
        try:
            listener(*args)
        except Exception:
            LOG.exception("listener %s failed%s", getattr(listener, "__name__", "?"),
                          f" for study {args[0]}" if args else "")
