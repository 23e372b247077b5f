"""What crosses the node's boundary: pseudonymized exports and inputs, and results made fit
for each destination.

* :func:`pseudonymize_files` writes pseudonymized copies of instances (PS3.15 Basic
  Profile with the configured options, keyed UIDs) and records the pseudonym map in the
  index, so that results made from them can be re-identified.
  :func:`pseudonymize_datasets` does the same in memory, for a job's inputs.
* :func:`for_peer` gives the file to send to one peer, as a :class:`PeerCopy`: the only
  thing the SCU (:func:`dicomnode.send.scu.send_files`) sends, so every path that hands a
  file to a peer (the outbox, ``dicomnode send``, ``outbox resend``) crosses this
  boundary. :class:`PeerBoundary` binds it to a node. For a clinical peer
  (``pseudonymize: false``) a result made from pseudonymized inputs is re-identified
  (patient and study restored, every UID of the source mapped back) so that it attaches
  to the original study; a result that looks pseudonymized but whose study the map does
  not know is refused. For a research peer (``pseudonymize: true``) pseudonymous objects
  go as they are (unless made under options the peer does not take) and identified ones
  are pseudonymized first, with the peer's ``deid_options`` (default: ``deid.options``).

Copies are written atomically under names made of UIDs only. Errors and log lines name
files, peers and counts, never identity.
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.dataset import Dataset

from dicomnode.config import Config, DeidConfig, DeidOption, PeerConfig
from dicomnode.deid import (
    ProfileOptions,
    PseudonymizationError,
    PseudonymizationRecord,
    Pseudonymizer,
    load_key,
    reidentify,
    reidentify_encoded,
)
from dicomnode.store.files import write_atomic, write_temporary
from dicomnode.store.pseudonyms import PseudonymMap

__all__ = ["BoundaryError", "DatasetReport", "ExportReport", "PeerBoundary", "PeerCopy",
           "for_peer", "node_key", "profile_options", "pseudonymize_datasets",
           "pseudonymize_files", "pseudonymizer"]

LOG = logging.getLogger(__name__)
_RECORD_BATCH = 256


class BoundaryError(Exception):
    """An object that must not cross the boundary as asked (no identity in the message)."""


def profile_options(deid: DeidConfig | Sequence[DeidOption]) -> ProfileOptions:
    """The PS3.15 profile options a configuration (``deid.options``) or a list enables."""
    chosen = set(deid.options if isinstance(deid, DeidConfig) else deid)
    return ProfileOptions(
        retain_longitudinal_temporal_modified_dates=(
            DeidOption.RETAIN_LONGITUDINAL_TEMPORAL_MODIFIED_DATES in chosen),
        retain_patient_characteristics=DeidOption.RETAIN_PATIENT_CHARACTERISTICS in chosen,
        clean_descriptors=DeidOption.CLEAN_DESCRIPTORS in chosen,
        retain_device_identity=DeidOption.RETAIN_DEVICE_IDENTITY in chosen,
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


_SEAL = object()


@dataclass(frozen=True)
class PeerCopy:
    """A file made fit for one peer by :func:`for_peer`: what the SCU sends to that peer.

    ``path`` is the file to send (``source`` itself, or a copy written for the peer);
    ``source`` the file it was made from; ``peer`` the peer it is fit for. Only
    :func:`for_peer` makes one.
    """

    path: Path
    source: Path
    peer_name: str
    peer: PeerConfig
    seal: object = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.seal is not _SEAL:
            raise TypeError("a PeerCopy is made by dicomnode.boundary.for_peer only")


def _copy(path: Path, source: Path, peer_name: str, peer: PeerConfig) -> PeerCopy:
    return PeerCopy(path, source, peer_name, peer, _SEAL)


def _method_codes(ds: Dataset) -> set[str]:
    return {str(item.get("CodeValue", "")) for item in
            ds.get("DeidentificationMethodCodeSequence", None) or ()}


def for_peer(path: Path, peer_name: str, peer: PeerConfig, *, pseudonyms: PseudonymMap,
             out_dir: Path | None, pseudonymizer: Pseudonymizer | None = None,
             dataset: Dataset | None = None, encoded: bytes | None = None) -> PeerCopy:
    """The file to send to ``peer``: ``path`` itself, or a copy made fit for it.

    ``dataset`` is the object of ``path`` already in memory (it is then not read back);
    making the copy may change it in place. ``encoded`` is the content of ``path`` (with
    ``dataset``): a re-identified copy is then spliced from these bytes
    (:func:`dicomnode.deid.reidentify_encoded`) instead of encoding the dataset again.
    Without ``dataset``, ``path`` is read up to its pixel data
    to decide, and whole only when a copy is made. Copies are written to ``out_dir``.
    ``pseudonymizer`` is the one for this peer (its options are what the peer takes).

    Raises:
        BoundaryError: a pseudonymized result whose study the map does not know, for a
            clinical peer; for a research peer, an identified object when no
            pseudonymizer (key) is available, or a pseudonymized one made under a PS3.15
            option the peer does not take; a copy is needed and ``out_dir`` is None.
    """
    ds = dataset if dataset is not None else pydicom.dcmread(path, stop_before_pixels=True)
    study_uid = str(ds.get("StudyInstanceUID", "") or "")
    sop = str(ds.SOPInstanceUID)
    if peer.pseudonymize:
        if (study_uid and pseudonyms.is_pseudonymous_study(study_uid)) or _looks_pseudonymized(ds):
            if pseudonymizer is not None:
                allowed = {code for code, _ in pseudonymizer.options.method_codes()}
                extra = _method_codes(ds) - allowed
                if extra:
                    raise BoundaryError(
                        f"a pseudonymized object made under PS3.15 option(s) "
                        f"{', '.join(sorted(extra))} (CID 7050) that research peer "
                        f"{peer_name!r} does not take is not sent to it")
            return _copy(path, path, peer_name, peer)
        if pseudonymizer is None:
            raise BoundaryError(f"peer {peer_name!r} takes pseudonymized data only and no "
                                "pseudonymization key is available")
        folder = _folder(out_dir, peer_name)
        ds = _whole(ds, path, dataset)
        record = pseudonymizer.apply(ds)
        pseudonyms.record([record])
        LOG.info("pseudonymized an object for research peer %s", peer_name)
        return _copy(write_atomic(folder / f"{record.sop_instance_uid[1]}.pseudonymized.dcm",
                                  _save(ds)), path, peer_name, peer)
    identity = pseudonyms.study(study_uid) if study_uid else None  # the whole UID map
    if identity is None:
        if _looks_pseudonymized(ds):
            raise BoundaryError(
                f"an object of a pseudonymized study that this node's map does not know cannot "
                f"be re-identified: it is not sent to clinical peer {peer_name!r}")
        return _copy(path, path, peer_name, peer)
    folder = _folder(out_dir, peer_name)
    spliced = (None if encoded is None
               else reidentify_encoded(encoded, identity.uid_map, identity.patient_study))
    if spliced is not None:
        LOG.info("re-identified an object for clinical peer %s", peer_name)
        return _copy(write_atomic(folder / f"{sop}.reidentified.dcm",
                                  lambda fp: fp.write(spliced)), path, peer_name, peer)
    ds = _whole(ds, path, dataset)
    reidentify(ds, identity.uid_map, identity.patient_study)
    LOG.info("re-identified an object for clinical peer %s", peer_name)
    return _copy(write_atomic(folder / f"{sop}.reidentified.dcm", _save(ds)), path,
                 peer_name, peer)


def _folder(out_dir: Path | None, peer_name: str) -> Path:
    if out_dir is None:
        raise BoundaryError(f"an object for peer {peer_name!r} needs a copy and no folder for "
                            "copies is given")
    return out_dir


def _whole(ds: Dataset, path: Path, given: Dataset | None) -> Dataset:
    """``ds`` with everything after its pixel data too: as given, or read whole."""
    return given if given is not None else pydicom.dcmread(path)


class PeerBoundary:
    """:func:`for_peer` bound to one node: its peers, pseudonym map, key and options.

    ``key`` gives the pseudonymization key when first needed (None: no key, identified
    objects are refused for research peers); ``options`` are the node's PS3.15 options
    (``deid.options``), which a research peer's ``deid_options`` replace. Copies go to
    ``out_dir/<peer name>/``.
    """

    def __init__(self, peers: Mapping[str, PeerConfig], pseudonyms: PseudonymMap, *,
                 out_dir: Path | None, key: Callable[[], bytes] | None = None,
                 options: ProfileOptions | None = None) -> None:
        self.peers = dict(peers)
        self.pseudonyms = pseudonyms
        self.out_dir = out_dir
        self._key = key
        self._options = options or profile_options(DeidConfig())
        self._engines: dict[ProfileOptions, Pseudonymizer] = {}

    @classmethod
    def from_config(cls, config: Config, pseudonyms: PseudonymMap, *,
                    out_dir: Path | None = None) -> PeerBoundary:
        """The boundary of a configured node; copies under ``out_dir`` (default:
        ``storage.path/outbox``)."""
        return cls(config.peers, pseudonyms,
                   out_dir=out_dir if out_dir is not None else config.storage.path / "outbox",
                   key=lambda: node_key(config), options=profile_options(config.deid))

    def pseudonymizer(self, peer: PeerConfig) -> Pseudonymizer | None:
        """The pseudonymizer for a research peer's options, or None without a key."""
        if self._key is None:
            return None
        options = (self._options if peer.deid_options is None
                   else profile_options(peer.deid_options))
        engine = self._engines.get(options)
        if engine is None:
            engine = self._engines[options] = Pseudonymizer(self._key(), options)
        return engine

    def copy(self, path: Path, peer_name: str, *, dataset: Dataset | None = None,
             encoded: bytes | None = None) -> PeerCopy:
        """:func:`for_peer` for the configured peer ``peer_name``.

        Raises:
            BoundaryError: see :func:`for_peer`; or ``peer_name`` is not configured.
            DeidKeyError: the configured key cannot be read.
        """
        peer = self.peers.get(peer_name)
        if peer is None:
            raise BoundaryError(f"peer {peer_name!r} is not configured")
        out = None if self.out_dir is None else self.out_dir / peer_name
        return for_peer(path, peer_name, peer, pseudonyms=self.pseudonyms, out_dir=out,
                        pseudonymizer=self.pseudonymizer(peer) if peer.pseudonymize else None,
                        dataset=dataset, encoded=encoded)
