"""What crosses the node's boundary: pseudonymized exports and inputs, and results made fit
for each destination.

* :func:`pseudonymize_files` writes pseudonymized copies of instances (PS3.15 Basic
  Profile with the configured options, keyed UIDs) and records the pseudonym map in the
  index, so that results made from them can be re-identified.
  :func:`pseudonymize_datasets` does the same in memory, for a job's inputs.
* :func:`for_peer` gives the file to send to one peer: for a clinical peer
  (``pseudonymize: false``) a result made from pseudonymized inputs is re-identified
  (patient and study restored, every UID of the source mapped back) so that it attaches
  to the original study; a result that looks pseudonymized but whose study the map does
  not know is refused. For a research peer (``pseudonymize: true``) pseudonymous objects
  go as they are and identified ones are pseudonymized first.

Copies are written atomically under names made of UIDs only. Errors and log lines name
files, peers and counts, never identity.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset

from dicomnode.config import Config, DeidConfig, PeerConfig
from dicomnode.deid import (
    ProfileOptions,
    PseudonymizationError,
    PseudonymizationRecord,
    Pseudonymizer,
    load_key,
    reidentify,
)
from dicomnode.store.files import write_atomic, write_temporary
from dicomnode.store.pseudonyms import PseudonymMap

__all__ = ["BoundaryError", "DatasetReport", "ExportReport", "for_peer", "node_key",
           "profile_options", "pseudonymize_datasets", "pseudonymize_files", "pseudonymizer"]

LOG = logging.getLogger(__name__)
_RECORD_BATCH = 256


class BoundaryError(Exception):
    """An object that must not cross the boundary as asked (no identity in the message)."""


def profile_options(deid: DeidConfig) -> ProfileOptions:
    """The PS3.15 profile options the configuration enables."""
    return ProfileOptions(
        retain_longitudinal_temporal_modified_dates=(
            deid.retain_longitudinal_temporal_modified_dates),
        retain_patient_characteristics=deid.retain_patient_characteristics,
        clean_descriptors=deid.clean_descriptors,
        retain_device_identity=deid.retain_device_identity,
    )


def node_key(config: Config) -> bytes:
    """The pseudonymization key: ``deid.key_file``, else ``$deid.key_env``, else the node's own.

    The node's own key is ``storage.path/deid.key``: 32 random bytes created (mode 0600)
    the first time a key is needed and none is configured, so that a node pseudonymizes
    out of the box and the same way after restarts. Nodes that must agree on pseudonyms
    share a key file or the environment variable.

    Raises:
        DeidKeyError: the configured key file cannot be read, or a key is too short.
    """
    deid = config.deid
    if deid.key_file is not None or os.environ.get(deid.key_env):
        return load_key(deid.key_file, deid.key_env)
    path = config.storage.path / "deid.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".deid.key.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # atomic, and never replaces a key another process made
            LOG.warning("no pseudonymization key configured: created %s (keep it with the "
                        "index; share it through deid.key_file to agree with other nodes)",
                        path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return load_key(path, deid.key_env)


def pseudonymizer(config: Config) -> Pseudonymizer:
    """A pseudonymizer with the node's key (:func:`node_key`) and the configured options.

    Raises:
        DeidKeyError: the configured key file cannot be read, or a key is too short.
    """
    return Pseudonymizer(node_key(config), profile_options(config.deid))


def _save(ds: Dataset) -> Callable[[BinaryIO], object]:
    return lambda fp: ds.save_as(fp, enforce_file_format=True)


@dataclass
class ExportReport:
    """The outcome of :func:`pseudonymize_files`: files written, studies, failures."""

    written: list[Path] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)  # pseudonymous StudyInstanceUIDs
    failed: list[tuple[Path, str]] = field(default_factory=list)


def _pseudonymized(paths: Iterable[Path], pseudonymizer: Pseudonymizer,
                   failed: list[tuple[Path, str]]
                   ) -> Iterator[tuple[Path, Dataset, PseudonymizationRecord]]:
    """Each file read whole and pseudonymized in place; one that cannot be goes to
    ``failed`` with the reason's type, not its values."""
    for path in paths:
        try:
            ds = pydicom.dcmread(path)
            record = pseudonymizer.apply(ds)
        except PseudonymizationError as exc:
            failed.append((path, str(exc)))
            continue
        except Exception as exc:
            failed.append((path, f"not a readable DICOM file ({type(exc).__name__})"))
            continue
        yield path, ds, record


def pseudonymize_files(paths: Iterable[Path], out_dir: Path, pseudonymizer: Pseudonymizer,
                       pseudonyms: PseudonymMap) -> ExportReport:
    """Write a pseudonymized copy of each file to ``out_dir/STUDY/SERIES/SOP.dcm``.

    The names are the pseudonymous UIDs. Pixel data is copied unchanged. The pseudonym
    map is recorded in the index before the call returns. A file that cannot be read or
    pseudonymized is reported in ``failed`` (with the reason's type, not its values).
    """
    report = ExportReport()
    records: list[PseudonymizationRecord] = []
    pending: list[tuple[Path, Path]] = []

    def flush() -> None:
        # the map first, then the files: a file that exists can always be re-identified
        pseudonyms.record(records)
        for tmp, final in pending:
            os.replace(tmp, final)
            report.written.append(final)
        records.clear()
        pending.clear()

    for _path, ds, record in _pseudonymized(paths, pseudonymizer, report.failed):
        study, series, sop = (record.study_instance_uid[1], record.series_instance_uid[1],
                              record.sop_instance_uid[1])
        final = out_dir / study / series / f"{sop}.dcm"
        pending.append((write_temporary(final, _save(ds)), final))
        records.append(record)
        report.studies.add(study)
        if len(records) >= _RECORD_BATCH:
            flush()
    if records:
        flush()
    LOG.info("pseudonymized %d instance(s) of %d study(ies); %d failed",
             len(report.written), len(report.studies), len(report.failed))
    return report


@dataclass
class DatasetReport:
    """The outcome of :func:`pseudonymize_datasets`: per file read, its pseudonymized dataset."""

    datasets: list[tuple[Path, Dataset]] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)


def pseudonymize_datasets(paths: Iterable[Path], pseudonymizer: Pseudonymizer,
                          pseudonyms: PseudonymMap) -> DatasetReport:
    """Read each file and pseudonymize it in memory, as :func:`pseudonymize_files` would
    without writing the copies (a job's inputs: read once, never written).

    The pseudonym map is recorded in the index before the call returns. A file that
    cannot be read or pseudonymized is reported in ``failed`` (with the reason's type,
    not its values).
    """
    report = DatasetReport()
    records: list[PseudonymizationRecord] = []
    for path, ds, record in _pseudonymized(paths, pseudonymizer, report.failed):
        report.datasets.append((path, ds))
        records.append(record)
        if len(records) >= _RECORD_BATCH:
            pseudonyms.record(records)
            records.clear()
    if records:
        pseudonyms.record(records)
    return report


def _looks_pseudonymized(ds: Dataset) -> bool:
    return (str(ds.get("PatientIdentityRemoved", "")).upper() == "YES"
            or "DeidentificationMethod" in ds
            or "DeidentificationMethodCodeSequence" in ds)


def for_peer(path: Path, peer_name: str, peer: PeerConfig, *, pseudonyms: PseudonymMap,
             out_dir: Path, pseudonymizer: Pseudonymizer | None = None,
             dataset: Dataset | None = None) -> Path:
    """The file to send to ``peer``: ``path`` itself, or a copy made fit for it.

    ``dataset`` is the object of ``path`` already in memory (it is then not read back);
    making the copy changes it in place. Without it, ``path`` is read up to its pixel data
    to decide, and whole only when a copy is made.

    Raises:
        BoundaryError: a pseudonymized result whose study the map does not know, for a
            clinical peer; or an identified object for a research peer when no
            pseudonymizer (key) is available.
    """
    ds = dataset if dataset is not None else pydicom.dcmread(path, stop_before_pixels=True)
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    sop = str(ds.SOPInstanceUID)
    if peer.pseudonymize:
        if (study_uid and pseudonyms.is_pseudonymous_study(study_uid)) or _looks_pseudonymized(ds):
            return path
        if pseudonymizer is None:
            raise BoundaryError(f"peer {peer_name!r} takes pseudonymized data only and no "
                                "pseudonymization key is available")
        ds = _whole(ds, path, dataset)
        record = pseudonymizer.apply(ds)
        pseudonyms.record([record])
        LOG.info("pseudonymized an object for research peer %s", peer_name)
        return write_atomic(out_dir / f"{record.sop_instance_uid[1]}.pseudonymized.dcm", _save(ds))
    identity = pseudonyms.study(study_uid) if study_uid else None  # the whole UID map
    if identity is None:
        if _looks_pseudonymized(ds):
            raise BoundaryError(
                f"an object of a pseudonymized study that this node's map does not know cannot "
                f"be re-identified: it is not sent to clinical peer {peer_name!r}")
        return path
    ds = _whole(ds, path, dataset)
    reidentify(ds, identity.uid_map, identity.patient_study)
    LOG.info("re-identified an object for clinical peer %s", peer_name)
    return write_atomic(out_dir / f"{sop}.reidentified.dcm", _save(ds))


def _whole(ds: Dataset, path: Path, given: Dataset | None) -> Dataset:
    """``ds`` with everything after its pixel data too: as given, or read whole."""
    return given if given is not None else pydicom.dcmread(path)
