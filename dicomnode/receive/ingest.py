"""Ingest: turn a received temporary file into a stored, indexed instance.

This is the store's single entry point for new data. :meth:`InstanceStore.ingest`
returns only after the file is fsynced in its final place and its index row
is committed, so the network layer may then answer Success.

Re-sending an instance (same SOP Instance UID) is idempotent:

* identical bytes: nothing changes on disk; the index counts the re-send;
* different bytes: the new version replaces the old one (the last one
  received wins, as when a modality re-sends a corrected image), the index
  row is updated, and a warning is logged. The study is re-opened if it had
  been completed, so later stages see the change.

Several nodes sharing the index and the storage root may receive the same instance (or
the first instances of the same series, study or patient) at the same moment. The index's
unique keys decide: the node whose insert loses (``IntegrityError``) rolls back and stores
again, now finding the other node's rows. The file's place is a function of its UIDs, so
both wrote the same file (the last rename wins) and neither removes it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import filecmp
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from dicomnode.dicom.status import Status
from dicomnode.receive.validate import DatasetError, check_dataset
from dicomnode.states import IngestOutcome, StudyState
from dicomnode.store.db import Index
from dicomnode.store.files import InstanceFiles
from dicomnode.store.header import HeaderError, InstanceHeader, read_header
from dicomnode.store.tables import Instance, Patient, Series, Study, utcnow

__all__ = ["DEFAULT_MAX_INFLATED_BYTES", "IngestResult", "InstanceStore", "StoreFailure"]

LOG = logging.getLogger(__name__)

# the node's C-STORE refusals by name (see dicomnode.dicom.status)
STATUS_OUT_OF_RESOURCES = Status.OUT_OF_RESOURCES
STATUS_INDEX_UNAVAILABLE = Status.OUT_OF_RESOURCES_INDEX_UNAVAILABLE
STATUS_INVALID_UID = Status.CANNOT_UNDERSTAND_INVALID_UID
STATUS_UID_MISMATCH = Status.CANNOT_UNDERSTAND_UID_MISMATCH
STATUS_SOP_CLASS_MISMATCH = Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS

#: How often an ingest that lost a race on a unique key to another node stores again.
_RACE_RETRIES = 3

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

    def ingest(
        self, tmp_file: Path, *, calling_ae_title: str, expected_sop_instance_uid: str | None = None
    ) -> IngestResult:
        """Store and index one complete received file (DICOM Part 10, as written by the SCP).

        The temporary file is consumed: it is either moved into the store or
        left for the caller to delete.

        Raises:
            StoreFailure: with the DICOM failure status to answer; nothing was stored.
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
            if not in_place:
                session.flush()  # a unique key another node took fails here, file untouched
                self.files.commit(tmp_file, relative)
            try:
                if existing is None:
                    existing = Instance(sop_instance_uid=header.sop_instance_uid)
                    session.add(existing)
                else:
                    LOG.warning("instance %d re-sent with different content: replacing it",
                                existing.id)
                    existing.times_received += 1
                    if existing.file_path != relative.as_posix():
                        self.files.remove(Path(existing.file_path))
                existing.series = series
                existing.sop_class_uid = header.sop_class_uid
                existing.transfer_syntax_uid = header.transfer_syntax_uid
                for key, value in header.instance.items():
                    setattr(existing, key, value)
                existing.calling_ae_title = calling_ae_title
                existing.received_at = now
                existing.file_path = relative.as_posix()
                existing.file_size = size
                session.commit()
            except IntegrityError:
                session.rollback()  # another node's row: its file is this same place
                raise
            except SQLAlchemyError:
                session.rollback()
                if created and not in_place:
                    self.files.remove(relative)
                raise
            return IngestResult(series.study_pk, series.id, existing.id,
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
