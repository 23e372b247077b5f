"""Ingest: turn a received temporary file into a stored, indexed instance.

This is the store's single entry point for new data, in two forms:

* :meth:`InstanceStore.receive` (the SCP's): returns once the instance itself is durable
  (the file fsynced in its final place and its folder entry fsynced), so the network
  layer may answer Success; its index row follows from the single background writer
  (:mod:`dicomnode.receive.indexer`) within about 0.1 s, and recovery at start
  (:mod:`dicomnode.receive.recovery`) indexes any stored file whose row was never
  written. While a received instance waits for its row it is *in flight*: a re-send of
  it waits for that row, then takes the synchronous path below, so duplicates are found
  exactly as before.
* :meth:`InstanceStore.ingest` (folder import, recovery, tests): returns only after the
  file is durable and its index row committed.

Re-sending an instance (same SOP Instance UID) is idempotent:

* identical bytes: nothing changes on disk; the index counts the re-send;
* different bytes: the new version replaces the old one (the last one
  received wins, as when a modality re-sends a corrected image), the index
  row is updated, and a warning is logged. The study is re-opened if it had
  been completed, so later stages see the change.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import filecmp
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode.dicom.status import Status
from dicomnode.receive.indexer import IndexWriter
from dicomnode.receive.validate import DatasetError, check_dataset
from dicomnode.states import IngestOutcome, StudyState
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.header import HeaderError, InstanceHeader, read_header
from dicomnode.store.tables import Instance, Patient, Series, Study, utcnow

__all__ = ["DEFAULT_MAX_INFLATED_BYTES", "IngestResult", "InstanceStore", "Pending",
           "StoreFailure"]

LOG = logging.getLogger(__name__)

# the node's C-STORE refusals by name (see dicomnode.dicom.status)
STATUS_OUT_OF_RESOURCES = Status.OUT_OF_RESOURCES
STATUS_INDEX_UNAVAILABLE = Status.OUT_OF_RESOURCES_INDEX_UNAVAILABLE
STATUS_INVALID_UID = Status.CANNOT_UNDERSTAND_INVALID_UID
STATUS_UID_MISMATCH = Status.CANNOT_UNDERSTAND_UID_MISMATCH
STATUS_SOP_CLASS_MISMATCH = Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS

#: How often an ingest that lost a race on a unique key to another node stores again.
_RACE_RETRIES = 3

_INSTANCE = cast(Table, Instance.__table__)
_SERIES = cast(Table, Series.__table__)
_STUDY = cast(Table, Study.__table__)

DEFAULT_MAX_INFLATED_BYTES = 1 << 30
"""Largest inflated size of a deflated dataset (1 GiB): ``storage.max_inflated_bytes``."""


class StoreFailure(Exception):
    """The instance was not stored; ``status`` is the C-STORE failure status to answer.

    Raises:
        ValueError: ``status`` is not one of :class:`dicomnode.dicom.status.Status`.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = Status(status)


@dataclass(frozen=True)
class IngestResult:
    """What happened to one received instance (index primary keys, never identity)."""

    study_pk: int
    series_pk: int
    instance_pk: int
    outcome: IngestOutcome  # stored, duplicate (identical re-send) or replaced


@dataclass(eq=False)
class Pending:
    """A received instance, durable in the store, whose index row is yet to be written."""

    header: InstanceHeader
    relative: Path
    size: int
    calling_ae_title: str
    received_at: dt.datetime
    on_indexed: Callable[[IngestResult], None] | None = None
    attempts: int = 0
    cached: bool = field(default=False)


class InstanceStore:
    """Stores received files durably and indexes them.

    Args:
        files: the raw store.
        index: the index database.
        min_free_bytes: refuse (0xA700) when storing would leave less free disk.
        max_inflated_bytes: refuse (0xC007) a deflated dataset that inflates to more
            (it is inflated in chunks to a scratch file in ``tmp/`` to be checked).
    """

    def __init__(self, files: InstanceFiles, index: Index, *, min_free_bytes: int,
                 max_inflated_bytes: int = DEFAULT_MAX_INFLATED_BYTES) -> None:
        if min_free_bytes < 0:
            raise ValueError("min_free_bytes must be >= 0")
        if max_inflated_bytes < 1:
            raise ValueError("max_inflated_bytes must be >= 1")
        self.files = files
        self.index = index
        self.min_free_bytes = min_free_bytes
        self.max_inflated_bytes = max_inflated_bytes
        self._lock = threading.Lock()
        # SOP Instance UIDs acknowledged whose index row is not written yet
        self._in_flight: set[str] = set()
        self._in_flight_changed = threading.Condition()
        # SeriesInstanceUID -> (series pk, study pk), checked by the writer on every use
        self._series_keys: dict[str, tuple[int, int]] = {}
        self.writer = IndexWriter(self)

    def ingest(
        self, tmp_file: Path, *, calling_ae_title: str, expected_sop_instance_uid: str | None = None
    ) -> IngestResult:
        """Store and index one complete received file (DICOM Part 10, as written by the SCP).

        The temporary file is consumed: it is either moved into the store or
        left for the caller to delete.

        Raises:
            StoreFailure: with the DICOM failure status to answer; nothing was stored.
        """
        header, relative, size = self._prepare(tmp_file, expected_sop_instance_uid)
        self._wait_not_in_flight(header.sop_instance_uid)
        return self._store_retrying(tmp_file, relative, size, header, calling_ae_title)

    def _store_retrying(self, tmp_file: Path, relative: Path, size: int,
                        header: InstanceHeader, calling_ae_title: str) -> IngestResult:
        """:meth:`_store`, again on top of another node's rows when it lost a race on a
        unique key (two nodes receiving the same instance at once).

        Raises:
            StoreFailure: 0xA701 when the index cannot be written.
        """
        with self._lock:
            for attempt in range(_RACE_RETRIES + 1):
                try:
                    return self._store(tmp_file, relative, size, header, calling_ae_title,
                                       in_place=not tmp_file.exists())
                except IntegrityError:
                    # another node inserted the same instance, series, study or patient
                    # first: store again on top of its rows
                    if attempt < _RACE_RETRIES:
                        LOG.info("instance indexed by another node at the same time: "
                                 "storing again (attempt %d)", attempt + 2)
                        continue
                    LOG.error("index write failed: IntegrityError, %d attempts",
                              _RACE_RETRIES + 1)
                    raise StoreFailure("index unavailable", STATUS_INDEX_UNAVAILABLE) from None
                except SQLAlchemyError as exc:
                    LOG.error("index write failed: %s", type(exc).__name__)
                    raise StoreFailure("index unavailable",
                                       STATUS_INDEX_UNAVAILABLE) from None
            raise AssertionError("unreachable")

    def receive(
        self, tmp_file: Path, *, calling_ae_title: str,
        expected_sop_instance_uid: str | None = None,
        on_indexed: Callable[[IngestResult], None] | None = None,
    ) -> IngestOutcome:
        """Store one complete received file durably; its index row follows (module docstring).

        Returns once the file and its folder entry are fsynced (the instance is then
        durable: Success may be answered), with the outcome: "stored" when the row is
        queued for the index writer, which calls ``on_indexed`` (in its thread) once the
        row is committed; "duplicate" or "replaced" for a re-send of an instance already
        stored, handled as :meth:`ingest` does (``on_indexed`` is called before this
        returns).

        Raises:
            StoreFailure: with the DICOM failure status to answer; nothing was stored.
                0xA701 while the writer holds instances whose index write failed.
        """
        if self.writer.failing:
            raise StoreFailure("index unavailable", STATUS_INDEX_UNAVAILABLE)
        header, relative, size = self._prepare(tmp_file, expected_sop_instance_uid)
        uid = header.sop_instance_uid
        with self._in_flight_changed:
            fresh = uid not in self._in_flight and not (self.files.root / relative).exists()
            if fresh:
                self._in_flight.add(uid)
        if not fresh:  # a re-send: decided against the index, as ingest() does
            self._wait_not_in_flight(uid)
            result = self._store_retrying(tmp_file, relative, size, header, calling_ae_title)
            if on_indexed is not None:
                on_indexed(result)
            return result.outcome
        try:
            self.files.commit(tmp_file, relative, new=True)
        except BaseException:
            self._forget_uid(uid)
            raise
        self.writer.put(Pending(header, relative, size, calling_ae_title, utcnow(), on_indexed))
        return IngestOutcome.STORED

    def _wait_not_in_flight(self, uid: str) -> None:
        with self._in_flight_changed:
            while uid in self._in_flight:
                self._in_flight_changed.wait(0.5)

    def forget(self, item: Pending) -> None:
        """The writer is done with ``item`` (written, or given up to recovery)."""
        self._forget_uid(item.header.sop_instance_uid)

    def _forget_uid(self, uid: str) -> None:
        with self._in_flight_changed:
            self._in_flight.discard(uid)
            self._in_flight_changed.notify_all()

    def _prepare(self, tmp_file: Path, expected_sop_instance_uid: str | None
                 ) -> tuple[InstanceHeader, Path, int]:
        """Check and read a received file: its header, its place in the store, its size.

        Raises:
            StoreFailure: the dataset is refused (nothing was stored).
        """
        size = tmp_file.stat().st_size
        self._reserve(0)  # the received file is already on disk
        try:
            checked = check_dataset(tmp_file, max_inflated_bytes=self.max_inflated_bytes,
                                    scratch=self.files.tmp, on_write=self._reserve)
        except DatasetError as exc:
            raise StoreFailure(str(exc), exc.status) from None
        try:
            header = read_header(checked.readable)
        except HeaderError as exc:
            raise StoreFailure(str(exc), exc.status) from None
        finally:
            checked.discard()
        header = dataclasses.replace(header, transfer_syntax_uid=checked.transfer_syntax_uid)
        if checked.meta_sop_class_uid and header.sop_class_uid != checked.meta_sop_class_uid:
            raise StoreFailure("SOP Class UID of the dataset differs from the request's",
                               STATUS_SOP_CLASS_MISMATCH)
        if expected_sop_instance_uid and header.sop_instance_uid != expected_sop_instance_uid:
            raise StoreFailure("SOP Instance UID of the dataset differs from the request's",
                               STATUS_UID_MISMATCH)
        try:
            relative = self.files.relative_path(
                header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid)
        except ValueError as exc:
            raise StoreFailure(str(exc), STATUS_INVALID_UID) from None
        return header, relative, size

    def _reserve(self, more: int) -> None:
        """Refuse (0xA700) when writing ``more`` bytes would leave less free disk than
        ``min_free_bytes``."""
        free = self.files.free_bytes()
        if free - more < self.min_free_bytes:
            raise StoreFailure(
                f"out of resources: {free} bytes free, storage.min_free_bytes is "
                f"{self.min_free_bytes}", STATUS_OUT_OF_RESOURCES)

    def _store(self, tmp_file: Path, relative: Path, size: int, header: InstanceHeader,
               calling_ae_title: str, *, in_place: bool = False) -> IngestResult:
        """Index the instance, moving ``tmp_file`` to ``relative`` (``in_place``: it is
        there already, moved by an attempt that lost a race with another node)."""
        now = utcnow()
        with self.index.session() as session:
            existing = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
            ).one_or_none()
            if existing is not None and in_place:
                # the other node's row: the file in its place is one of the two copies
                existing.times_received += 1
                existing.series.study.last_received_at = now
                session.commit()
                series = existing.series
                return IngestResult(series.study_pk, series.id, existing.id,
                                    IngestOutcome.DUPLICATE)
            if existing is not None:
                old = self.files.root / existing.file_path
                if old.is_file() and filecmp.cmp(old, tmp_file, shallow=False):
                    existing.times_received += 1
                    series = existing.series
                    series.study.last_received_at = now
                    session.commit()
                    return IngestResult(series.study_pk, series.id, existing.id,
                                        IngestOutcome.DUPLICATE)

            series = self._series(session, header, now)
            created = existing is None
            # the version stored at the same place (a replacement) is kept until the index
            # has the new one: a failed commit puts it back, nothing acknowledged is lost
            kept = None
            if not in_place:
                session.flush()  # a unique key another node took fails here, file untouched
                kept = self.files.keep(relative)
                self.files.commit(tmp_file, relative)
            try:
                stale = self._fill(session, existing, series, header, relative, size,
                                   calling_ae_title, now)
                session.commit()
            except IntegrityError:
                session.rollback()  # another node's row: its file is this same place
                raise
            except SQLAlchemyError:
                session.rollback()
                if kept is not None:
                    self.files.restore(kept, relative)
                elif created and not in_place:
                    self.files.remove(relative)
                raise
            finally:
                if kept is not None:
                    kept.unlink(missing_ok=True)
            if stale is not None:
                self.files.remove(stale)  # the replaced version lived elsewhere
            instance = session.scalars(
                select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
            ).one()
            return IngestResult(series.study_pk, series.id, instance.id,
                                IngestOutcome.STORED if created else IngestOutcome.REPLACED)

    def _fill(self, session: Session, existing: Instance | None, series: Series,
              header: InstanceHeader, relative: Path, size: int, calling_ae_title: str,
              now: dt.datetime) -> Path | None:
        """Write the row of an instance whose file is in place at ``relative``; returns the
        previous file of a replaced instance stored elsewhere (to remove once committed)."""
        stale: Path | None = None
        if existing is None:
            existing = Instance(sop_instance_uid=header.sop_instance_uid)
            session.add(existing)
        else:
            LOG.warning("instance %d re-sent with different content: replacing it",
                        existing.id)
            existing.times_received += 1
            if existing.file_path != relative.as_posix():
                stale = Path(existing.file_path)
        existing.series = series
        existing.sop_class_uid = header.sop_class_uid
        existing.transfer_syntax_uid = header.transfer_syntax_uid
        for key, value in header.instance.items():
            setattr(existing, key, value)
        existing.calling_ae_title = calling_ae_title
        existing.received_at = now
        existing.file_path = relative.as_posix()
        existing.file_size = size
        return stale

    # -------------------------------------------------------------- the index writer's

    def write_batch(self, batch: list[Pending]) -> list[IngestResult]:
        """Write the rows of ``batch`` (files already durable in place) in one transaction;
        the results in the order of ``batch``. Called by the index writer only.

        Raises:
            SQLAlchemyError: nothing of the batch was written.
        """
        stale: list[Path] = []
        with self._lock, self.index.session() as session:
            try:
                results = self._write_rows(session, batch, stale)
                session.commit()
            except BaseException:
                session.rollback()
                self._series_keys.clear()
                raise
        for relative in stale:
            self.files.remove(relative)
        return results

    def _write_rows(self, session: Session, batch: list[Pending],
                    stale: list[Path]) -> list[IngestResult]:
        uids = [item.header.sop_instance_uid for item in batch]
        indexed = set(session.scalars(
            select(Instance.sop_instance_uid).where(Instance.sop_instance_uid.in_(uids))))
        fast = [item for item in batch if item.header.sop_instance_uid not in indexed
                and item.header.series_instance_uid in self._series_keys]
        fast = self._check_keys(session, fast, batch[0].received_at)
        results: dict[int, IngestResult] = {}
        if fast:
            self._insert_fast(session, fast, results)
        for item in batch:
            if id(item) not in results:
                results[id(item)] = self._write_slow(session, item, stale)
        return [results[id(item)] for item in batch]

    def _check_keys(self, session: Session, fast: list[Pending], now: dt.datetime
                    ) -> list[Pending]:
        """Mark each cached series dirty and received now, keeping the instances of those
        whose cached keys still hold (a series deleted or moved since is forgotten)."""
        valid: set[str] = set()
        for uid in {item.header.series_instance_uid for item in fast}:
            series_pk, study_pk = self._series_keys[uid]
            done = session.execute(
                update(Series).where(and_(Series.id == series_pk,
                                          Series.series_instance_uid == uid,
                                          Series.study_pk == study_pk))
                .values(geometry_dirty=True, last_received_at=now)
                .execution_options(synchronize_session=False))
            if getattr(done, "rowcount", 0) == 1:
                valid.add(uid)
            else:
                del self._series_keys[uid]
        return [item for item in fast if item.header.series_instance_uid in valid]

    def _insert_fast(self, session: Session, fast: list[Pending],
                     results: dict[int, IngestResult]) -> None:
        """Core statements for instances of series whose keys are cached."""
        rows: list[dict[str, Any]] = []
        for item in fast:
            header = item.header
            series_pk, _ = self._series_keys[header.series_instance_uid]
            rows.append({
                "sop_instance_uid": header.sop_instance_uid, "series_pk": series_pk,
                "sop_class_uid": header.sop_class_uid,
                "transfer_syntax_uid": header.transfer_syntax_uid, **header.instance,
                "calling_ae_title": item.calling_ae_title, "received_at": item.received_at,
                "file_path": item.relative.as_posix(), "file_size": item.size,
                "times_received": 1,
            })
        table = _INSTANCE
        ids = list(session.execute(
            insert(table).returning(table.c.id, sort_by_parameter_order=True), rows).scalars())
        # descriptive values a later instance of a series brings where the series lacked them
        fills: dict[tuple[int, tuple[tuple[str, Any], ...]], None] = {}
        for item in fast:
            values = tuple((k, v) for k, v in item.header.series.items() if v is not None)
            if values:
                fills[(self._series_keys[item.header.series_instance_uid][0], values)] = None
        for series_pk, values in fills:
            columns = _SERIES.c
            session.execute(update(_SERIES).where(columns.id == series_pk).values(
                {k: func.coalesce(columns[k], v) for k, v in values}))
        studies = {self._series_keys[i.header.series_instance_uid][1] for i in fast}
        now = fast[-1].received_at
        study = _STUDY.c
        session.execute(update(_STUDY).where(study.id.in_(studies))
                        .values(last_received_at=now))
        complete = list(session.scalars(
            select(study.id).where(and_(study.id.in_(studies),
                                        study.state == StudyState.COMPLETE))))
        if complete:
            session.execute(
                update(_STUDY).where(and_(study.id.in_(complete),
                                          study.state == StudyState.COMPLETE))
                .values(state=StudyState.RECEIVING, reopened_count=study.reopened_count + 1,
                        completed_at=None))
            for study_pk in complete:
                audit.record(session, audit.EventKind.STUDY_REOPENED, study_pk=study_pk)
            LOG.info("%d study(ies) re-opened by a late instance", len(complete))
        for item, instance_pk in zip(fast, ids, strict=True):
            series_pk, study_pk = self._series_keys[item.header.series_instance_uid]
            results[id(item)] = IngestResult(study_pk, series_pk, instance_pk,
                                             IngestOutcome.STORED)

    def _write_slow(self, session: Session, item: Pending, stale: list[Path]) -> IngestResult:
        """The ORM path: the first instance of a series, or an instance indexed already."""
        header = item.header
        now = item.received_at
        existing = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
        ).one_or_none()
        if existing is not None and existing.file_path != item.relative.as_posix():
            old = self.files.root / existing.file_path
            if old.is_file() and filecmp.cmp(old, self.files.root / item.relative,
                                              shallow=False):
                existing.times_received += 1  # identical: the copy received now goes
                series = existing.series
                series.study.last_received_at = now
                stale.append(item.relative)
                return IngestResult(series.study_pk, series.id, existing.id,
                                        IngestOutcome.DUPLICATE)
        series = self._series(session, header, now)
        created = existing is None
        old_file = self._fill(session, existing, series, header, item.relative, item.size,
                              item.calling_ae_title, now)
        if old_file is not None:
            stale.append(old_file)
        session.flush()
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)).one()
        self._series_keys[header.series_instance_uid] = (series.id, series.study_pk)
        return IngestResult(series.study_pk, series.id, instance.id,
                            IngestOutcome.STORED if created else IngestOutcome.REPLACED)

    def _series(self, session: Session, header: InstanceHeader, now: dt.datetime) -> Series:
        series = session.scalars(
            select(Series).where(Series.series_instance_uid == header.series_instance_uid)
        ).one_or_none()
        if series is None:
            study = self._study(session, header)
            series = Series(series_instance_uid=header.series_instance_uid, study=study,
                            **header.series)
            session.add(series)
            audit.series_received(session, series)
        else:
            study = series.study
            for key, value in header.series.items():
                if value is not None and getattr(series, key) is None:
                    setattr(series, key, value)
        series.geometry_dirty = True
        series.last_received_at = now
        study.last_received_at = now
        if study.state == StudyState.COMPLETE:
            study.state = StudyState.RECEIVING
            study.reopened_count += 1
            study.completed_at = None
            audit.record(session, audit.EventKind.STUDY_REOPENED, study_pk=study.id)
            LOG.info("study %s re-opened by a late instance", study.id or "new")
        return series

    def _study(self, session: Session, header: InstanceHeader) -> Study:
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == header.study_instance_uid)
        ).one_or_none()
        if study is not None:
            return study
        patient = self._patient(session, header)
        study = Study(study_instance_uid=header.study_instance_uid, patient=patient,
                      state=StudyState.RECEIVING, **header.study)
        session.add(study)
        return study

    def _patient(self, session: Session, header: InstanceHeader) -> Patient:
        key = (header.patient["patient_id"] or "", header.patient["issuer_of_patient_id"] or "")
        patient = session.scalars(
            select(Patient).where(Patient.patient_id == key[0],
                                  Patient.issuer_of_patient_id == key[1])
        ).one_or_none()
        if patient is None:
            patient = Patient(**header.patient)
            session.add(patient)
        else:
            for field, value in header.patient.items():
                if value:
                    setattr(patient, field, value)
        return patient
