"""Pull: find studies at a query/retrieve peer (C-FIND) and retrieve them (C-MOVE or C-GET).

Pulling is a way of receiving. A peer configured with ``query_retrieve: true`` is asked, in
the Study Root Query/Retrieve Information Model, for the studies matching a
:class:`PullQuery` (C-FIND at STUDY level; then at SERIES level for each study when the
query names a modality or a station, which are series attributes). What was found is then
retrieved, one C-MOVE or C-GET per study (per matching series with a series filter):

* ``retrieve: move`` (default): C-MOVE with the node's own AE title as the move destination.
  The peer opens its own association to the node's running SCP and C-STOREs the instances
  there; the peer must know the node's AE title, host and port as a move destination, and the
  node must list the peer (its calling AE title) in ``peers``. The instances go through the
  SCP like any pushed instance.
* ``retrieve: get``: C-GET. The peer sends the instances back as C-STORE sub-operations on the
  pulling association (the node takes the SCP role for the storage SOP classes); each is
  stored through :meth:`~dicomnode.receive.ingest.InstanceStore.ingest`, exactly as the SCP
  stores one, so it is durable before the sub-operation is answered Success.

Either way pulled studies are then settled, completed and routed by the rules like pushed
ones. Log lines carry counts and the peer's name only, never a value the peer returned
(UIDs included); :class:`PullReport` holds the Study Instance UIDs for the command line.
"""

from __future__ import annotations

import datetime as dt
import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, _config, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from dicomnode.config import PeerConfig, PullConfig, RetrieveMethod, parse_date_bound
from dicomnode.net.access import printable
from dicomnode.net.contexts import storage_sop_classes
from dicomnode.net.sockets import set_nodelay
from dicomnode.net.tls import TlsError, client_tls_args
from dicomnode.receive.ingest import STATUS_OUT_OF_RESOURCES, InstanceStore, StoreFailure
from dicomnode.receive.spool import ReceiveFiles

if TYPE_CHECKING:
    from dicomnode.completion import AssociationActivity

__all__ = [
    "GET_STORAGE_CLASSES",
    "PullError",
    "PullQuery",
    "PullReport",
    "Puller",
    "RetrieveOutcome",
    "parse_cli_date",
]

LOG = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_CODE_STRING = re.compile(r"^[A-Z0-9 _]{1,16}$")
_PENDING = (0xFF00, 0xFF01)
_MAX_CONTEXTS = 128

STATUS_MOVE_DESTINATION_UNKNOWN = 0xA801

_STATUS_MEANINGS = {
    0xA701: "out of resources: unable to calculate the number of matches",
    0xA702: "out of resources: unable to perform sub-operations",
    0xA801: "move destination unknown",
    0xA900: "identifier does not match SOP class",
    0xB000: "sub-operations complete, one or more failures or warnings",
    0xFE00: "cancelled",
    0x0122: "SOP class not supported",
}

GET_STORAGE_CLASSES: tuple[str, ...] = (
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image
    "1.2.840.10008.5.1.4.1.1.128",  # PET Image
    "1.2.840.10008.5.1.4.1.1.130",  # Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.128.1",  # Legacy Converted Enhanced PET Image
    "1.2.840.10008.5.1.4.1.1.20",  # NM Image
    "1.2.840.10008.5.1.4.1.1.6.1",  # US Image
    "1.2.840.10008.5.1.4.1.1.3.1",  # US Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.1",  # CR Image
    "1.2.840.10008.5.1.4.1.1.1.1",  # DX Image, for presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX Image, for processing
    "1.2.840.10008.5.1.4.1.1.1.2",  # MG Image, for presentation
    "1.2.840.10008.5.1.4.1.1.12.1",  # XA Image
    "1.2.840.10008.5.1.4.1.1.12.2",  # RF Image
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.30",  # Parametric Map
    "1.2.840.10008.5.1.4.1.1.66.1",  # Spatial Registration
    "1.2.840.10008.5.1.4.1.1.66.3",  # Deformable Spatial Registration
    "1.2.840.10008.5.1.4.1.1.481.1",  # RT Image
    "1.2.840.10008.5.1.4.1.1.481.2",  # RT Dose
    "1.2.840.10008.5.1.4.1.1.481.3",  # RT Structure Set
    "1.2.840.10008.5.1.4.1.1.481.5",  # RT Plan
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
)
"""The storage SOP classes a C-GET proposes (SCP role) besides those the peer reports in
the study (``SOPClassesInStudy``); a presentation context per class, 128 at most in all."""

_GET_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                 ExplicitVRBigEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLosslessSV1,
                 JPEGLSLossless, JPEGLSNearLossless, JPEG2000Lossless, JPEG2000, RLELossless)
"""The transfer syntaxes proposed for each storage class of a C-GET: the instances are
stored as the peer sends them, nothing is decoded."""


class PullError(Exception):
    """The peer could not be asked at all: no address, unreachable, the association refused,
    or its C-FIND failed. Nothing was retrieved."""


def _check_uid(value: str, what: str) -> str:
    text = value.strip()
    if not text or len(text) > 64 or not _UID.match(text):
        raise ValueError(f"{what} {printable(value)} is not a UID (digits and dots, at most 64)")
    return text


@dataclass(frozen=True)
class PullQuery:
    """What to pull: the C-FIND matching keys (all optional, at least one given).

    ``since`` and ``until`` bound the Study Date (inclusive); ``modality`` and ``station``
    (Station Name) select series, so only the matching series are retrieved.
    """

    study_uid: str | None = None
    accession: str | None = None
    patient_id: str | None = None
    modality: str | None = None
    station: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None

    def __post_init__(self) -> None:
        if not any((self.study_uid, self.accession, self.patient_id, self.modality,
                    self.station, self.since, self.until)):
            raise ValueError("a pull needs at least one of: study, accession, patient id, "
                             "modality, station, since, until")
        if self.study_uid is not None:
            object.__setattr__(self, "study_uid", _check_uid(self.study_uid, "study"))
        if self.modality is not None and not _CODE_STRING.match(self.modality):
            raise ValueError(f"{printable(self.modality)} is not a modality (a DICOM code "
                             "string such as CT, MR)")
        for name, value, limit in (("accession", self.accession, 16),
                                   ("patient id", self.patient_id, 64),
                                   ("station", self.station, 16)):
            if value is not None and (not value or len(value) > limit or "\\" in value
                                      or any(c in value for c in "*?")):
                raise ValueError(f"{name} must be 1 to {limit} characters, without a "
                                 "backslash or wildcards")
        if self.since is not None and self.until is not None and self.since > self.until:
            raise ValueError(f"since ({self.since.isoformat()}) is after until "
                             f"({self.until.isoformat()})")

    @property
    def by_series(self) -> bool:
        """Whether series are selected (a modality or station filter)."""
        return self.modality is not None or self.station is not None

    @classmethod
    def from_config(cls, pull: PullConfig, day: dt.date) -> PullQuery:
        """The query of a scheduled pull for a run due on ``day`` (relative dates resolved)."""

        def resolve(bound: str | None) -> dt.date | None:
            if bound is None:
                return None
            value = parse_date_bound(bound)
            return day + dt.timedelta(days=value) if isinstance(value, int) else value

        return cls(accession=pull.accession, patient_id=pull.patient_id,
                   modality=pull.modality, station=pull.station,
                   since=resolve(pull.since), until=resolve(pull.until))

    def study_date(self) -> str:
        """The Study Date matching key: a date range, or empty (any date)."""
        if self.since is None and self.until is None:
            return ""
        low = "" if self.since is None else self.since.strftime("%Y%m%d")
        high = "" if self.until is None else self.until.strftime("%Y%m%d")
        return low if low == high else f"{low}-{high}"

    def describe(self) -> str:
        """The filters, for a log line: which keys are set and the dates (no identifier)."""
        parts = [f"{k} given" for k, v in (("study", self.study_uid),
                                           ("accession", self.accession),
                                           ("patient id", self.patient_id)) if v]
        if self.modality:
            parts.append(f"modality {self.modality}")
        if self.station:
            parts.append("station given")
        if self.since or self.until:
            parts.append(f"study date {self.study_date()}")
        return ", ".join(parts)


@dataclass
class RetrieveOutcome:
    """One C-MOVE or C-GET: of a study, or of one series (``series_uid``)."""

    study_uid: str
    series_uid: str | None
    status: int | None = None  # the final status; None: no final response
    completed: int = 0
    failed: int = 0
    warning: int = 0
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 0x0000 and self.failed == 0


@dataclass
class PullReport:
    """What a pull found and retrieved. ``studies`` lists the Study Instance UIDs found (for
    the operator; never logged); ``retrieves`` one outcome per C-MOVE/C-GET."""

    peer: str
    method: RetrieveMethod
    studies: list[str] = field(default_factory=list)
    series: int = 0  # series matched (series filters only)
    retrieves: list[RetrieveOutcome] = field(default_factory=list)
    stored: int = 0  # C-GET: instances this process stored
    store_failed: int = 0  # C-GET: instances refused by the store
    problems: list[str] = field(default_factory=list)  # the node's own messages

    @property
    def instances(self) -> int:
        """Instances retrieved (completed sub-operations, as the peer counts them)."""
        return sum(r.completed + r.warning for r in self.retrieves)

    @property
    def failed(self) -> int:
        """Failed sub-operations, plus retrieves that failed as a whole, plus problems."""
        return (sum(r.failed for r in self.retrieves)
                + sum(1 for r in self.retrieves if r.failed == 0 and not r.ok)
                + len(self.problems))

    @property
    def ok(self) -> bool:
        return self.failed == 0


def _meaning(status: int) -> str:
    if status in _STATUS_MEANINGS:
        return _STATUS_MEANINGS[status]
    if status >> 12 == 0xC:
        return "unable to process"
    if status >> 8 == 0xA7:
        return "out of resources"
    return "failure"


class Puller:
    """Pulls from one query/retrieve peer.

    Args:
        ae_title: the node's AE title (calling AE title, and the C-MOVE destination).
        peer: the peer (``query_retrieve: true``, host and port).
        name: the peer's name in the configuration (for messages).
        store: where C-GET stores the instances (needed for ``retrieve: get``).
        receive: the temporary files of received datasets (the SCP's, in the node; else
            one is made on ``store``'s ``tmp/`` and installed in pynetdicom).
        activity: the node's association activity: a study a C-GET is delivering to does
            not complete meanwhile.
        timeout: connection, ACSE and network timeouts (s).
        dimse_timeout: seconds without a response (a pending one counts) before a C-FIND,
            C-MOVE or C-GET is given up.
    """

    def __init__(self, ae_title: str, peer: PeerConfig, name: str, *,
                 store: InstanceStore | None = None, receive: ReceiveFiles | None = None,
                 activity: AssociationActivity | None = None, timeout: float = 30.0,
                 dimse_timeout: float = 600.0) -> None:
        if not peer.query_retrieve:
            raise ValueError(f"peer {name!r} is not a query/retrieve peer "
                             f"(peers.{name}.query_retrieve: true)")
        if peer.host is None or peer.port is None:
            raise ValueError(f"peer {name!r} has no host and port configured")
        if timeout <= 0 or dimse_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        self.method = peer.retrieve_method
        if self.method is RetrieveMethod.GET and store is None:
            raise ValueError("retrieve: get stores what it receives: a store is needed")
        self.ae_title = ae_title
        self.peer = peer
        self.name = name
        self.store = store
        self.receive = receive
        self.activity = activity
        self.timeout = timeout
        self.dimse_timeout = dimse_timeout
        self._lock = threading.Lock()
        self._get_stored = self._get_failed = self._invalid_matches = 0

    # -- association ------------------------------------------------------------------

    def _associate(self, extra_classes: tuple[str, ...] = ()) -> Association:
        # the identifiers of queries and answers hold patient data: pynetdicom never logs them
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        ae = AE(ae_title=self.ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.network_timeout = self.timeout
        ae.dimse_timeout = self.dimse_timeout
        contexts: list[PresentationContext] = [
            build_context(StudyRootQueryRetrieveInformationModelFind)]
        roles: list[Any] = []  # SCP/SCU role selection items
        handlers: list[evt.EventHandlerType] = []
        if self.method is RetrieveMethod.MOVE:
            contexts.append(build_context(StudyRootQueryRetrieveInformationModelMove))
        else:
            contexts.append(build_context(StudyRootQueryRetrieveInformationModelGet))
            known = set(storage_sop_classes())
            classes = list(dict.fromkeys(
                [c for c in extra_classes if c in known] + list(GET_STORAGE_CLASSES)))
            for uid in classes[:_MAX_CONTEXTS - len(contexts)]:
                contexts.append(build_context(uid, list(_GET_SYNTAXES)))
                roles.append(build_role(uid, scp_role=True))
            handlers.append((evt.EVT_C_STORE, self._on_store))
        ae.requested_contexts = contexts
        host, port = cast(str, self.peer.host), cast(int, self.peer.port)
        try:
            tls_args = client_tls_args(self.peer, self.name)
        except TlsError as exc:
            raise PullError(str(exc)) from None
        if self.method is RetrieveMethod.GET:
            _config.STORE_RECV_CHUNKED_DATASET = True
            if self.receive is None:
                assert self.store is not None
                self.receive = ReceiveFiles(self.store.files.tmp, self.store.min_free_bytes)
                self.receive.install()
        assoc = ae.associate(host, port, ae_title=self.peer.ae_title, ext_neg=roles or None,
                             evt_handlers=handlers or None, tls_args=tls_args)
        if not assoc.is_established:
            answer = assoc.acceptor.primitive
            if assoc.is_rejected and answer is not None:
                raise PullError(f"peer {self.name!r} ({host}:{port}) rejected the association: "
                                f"{answer.result_str}, {answer.source_str}, {answer.reason_str}")
            if answer is not None and getattr(answer, "result", None) == 0x00:
                raise PullError(f"peer {self.name!r} ({host}:{port}) accepted no query/retrieve "
                                "context (it is not a Study Root Query/Retrieve SCP)")
            raise PullError(f"peer {self.name!r} ({host}:{port}) could not be reached (no "
                            "connection, or no answer to the association request)")
        set_nodelay(assoc)
        return assoc

    def _close(self, assoc: Association) -> None:
        if assoc.is_established:
            assoc.release()
        if self.receive is not None:  # a C-GET cut short leaves no temporary file
            self.receive.discard_unclaimed(assoc.dul)
        if self.activity is not None:
            self.activity.close(id(assoc))

    # -- C-FIND -----------------------------------------------------------------------

    def _find(self, assoc: Association, identifier: Dataset, what: str) -> Iterator[Dataset]:
        status: int | None = None
        for answer, found in assoc.send_c_find(identifier,
                                               StudyRootQueryRetrieveInformationModelFind):
            if not answer or "Status" not in answer:
                break
            status = int(answer.Status)
            if status in _PENDING:
                if found is not None:
                    yield found
            else:
                break
        if status is None:
            raise PullError(f"peer {self.name!r} did not answer the {what} C-FIND "
                            "(association lost or timed out)")
        if status != 0x0000:
            raise PullError(f"peer {self.name!r} refused the {what} C-FIND: status "
                            f"0x{status:04X} ({_meaning(status)})")

    def find_studies(self, assoc: Association, query: PullQuery,
                     ) -> list[tuple[str, tuple[str, ...]]]:
        """The studies matching ``query``: (Study Instance UID, SOP classes in the study)."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.StudyInstanceUID = query.study_uid or ""
        ds.StudyDate = query.study_date()
        if query.accession is not None:
            ds.AccessionNumber = query.accession
        if query.patient_id is not None:
            ds.PatientID = query.patient_id
        if self.method is RetrieveMethod.GET:
            ds.SOPClassesInStudy = ""
        studies: dict[str, tuple[str, ...]] = {}
        invalid = 0
        for found in self._find(assoc, ds, "study-level"):
            uid = str(found.get("StudyInstanceUID", "") or "").strip()
            if not _UID.match(uid) or len(uid) > 64:
                invalid += 1
                continue
            # a peer that ignores a key would answer every study: check what it returned
            if query.study_uid is not None and uid != query.study_uid:
                continue
            if not self._date_matches(found, query):
                continue
            classes = found.get("SOPClassesInStudy")
            values = () if not classes else ((classes,) if isinstance(classes, str)
                                             else tuple(str(c) for c in classes))
            studies[uid] = tuple(str(v) for v in values)
        self._invalid_matches = invalid
        return list(studies.items())

    @staticmethod
    def _date_matches(found: Dataset, query: PullQuery) -> bool:
        if query.since is None and query.until is None:
            return True
        value = str(found.get("StudyDate", "") or "").strip()
        if not re.fullmatch(r"\d{8}", value):
            return True  # not returned: the peer's matching is trusted
        low = "" if query.since is None else query.since.strftime("%Y%m%d")
        high = "99999999" if query.until is None else query.until.strftime("%Y%m%d")
        return low <= value <= high

    def find_series(self, assoc: Association, study_uid: str, query: PullQuery) -> list[str]:
        """The series of a study matching the query's modality and station (checked on what
        the peer returns: a peer that does not return a key matches nothing by it)."""
        ds = Dataset()
        ds.QueryRetrieveLevel = "SERIES"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = ""
        ds.Modality = query.modality or ""
        if query.station is not None:
            ds.StationName = query.station
        series: list[str] = []
        for found in self._find(assoc, ds, "series-level"):
            uid = str(found.get("SeriesInstanceUID", "") or "").strip()
            if not _UID.match(uid) or len(uid) > 64:
                continue
            if query.modality is not None and \
                    str(found.get("Modality", "") or "").strip() != query.modality:
                continue
            if query.station is not None and \
                    str(found.get("StationName", "") or "").strip() != query.station:
                continue
            if uid not in series:
                series.append(uid)
        return series

    # -- C-MOVE / C-GET ---------------------------------------------------------------

    def _retrieve(self, assoc: Association, study_uid: str,
                  series_uid: str | None) -> RetrieveOutcome:
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY" if series_uid is None else "SERIES"
        ds.StudyInstanceUID = study_uid
        if series_uid is not None:
            ds.SeriesInstanceUID = series_uid
        outcome = RetrieveOutcome(study_uid, series_uid)
        if self.method is RetrieveMethod.MOVE:
            responses = assoc.send_c_move(ds, self.ae_title,
                                          StudyRootQueryRetrieveInformationModelMove)
        else:
            responses = assoc.send_c_get(ds, StudyRootQueryRetrieveInformationModelGet)
        for answer, _identifier in responses:
            if not answer or "Status" not in answer:
                break
            status = int(answer.Status)
            outcome.completed = int(answer.get("NumberOfCompletedSuboperations", 0) or 0)
            outcome.failed = int(answer.get("NumberOfFailedSuboperations", 0) or 0)
            outcome.warning = int(answer.get("NumberOfWarningSuboperations", 0) or 0)
            if status not in _PENDING:
                outcome.status = status
                break
        if outcome.status is None:
            outcome.message = "no final response (association lost or timed out)"
        elif outcome.status == STATUS_MOVE_DESTINATION_UNKNOWN:
            outcome.message = (f"peer {self.name!r} does not know the move destination "
                               f"{self.ae_title!r} (0xA801): add the node's AE title, host and "
                               "port to the peer's known destinations")
        elif outcome.status != 0x0000:
            outcome.message = f"status 0x{outcome.status:04X} ({_meaning(outcome.status)})"
            if self.method is RetrieveMethod.MOVE and outcome.completed == 0:
                outcome.message += ("; the node's SCP must be running (dicomnode serve) and "
                                    "accept the peer's AE title (peers)")
        return outcome

    def _on_store(self, event: evt.Event) -> int | Dataset:
        """A C-STORE sub-operation of a C-GET: stored exactly as the SCP stores one."""
        assert self.store is not None
        path = event.dataset_path
        received = None if self.receive is None else self.receive.claim(path)
        if received is not None and received.refused is not None:
            with self._lock:
                self._get_failed += 1
            LOG.warning("pull from %s: instance refused with 0x%04X: %s", self.name,
                        STATUS_OUT_OF_RESOURCES, received.refused)
            return STATUS_OUT_OF_RESOURCES
        try:
            result = self.store.ingest(
                path, calling_ae_title=self.peer.ae_title,
                expected_sop_instance_uid=str(
                    cast(C_STORE, event.request).AffectedSOPInstanceUID or ""))
        except StoreFailure as exc:
            with self._lock:
                self._get_failed += 1
            LOG.warning("pull from %s: instance refused with 0x%04X: %s", self.name,
                        exc.status, exc)
            return exc.status
        except Exception as exc:
            with self._lock:
                self._get_failed += 1
            LOG.exception("pull from %s: storing failed unexpectedly: %s", self.name,
                          type(exc).__name__)
            return 0x0110
        finally:
            if received is not None:
                received.discard()  # gone already when stored (moved into the store)
            else:
                path.unlink(missing_ok=True)
        if self.activity is not None:
            self.activity.touch(id(event.assoc), result.study_pk)
        with self._lock:
            self._get_stored += 1
        return 0x0000

    # -- the whole pull ---------------------------------------------------------------

    def pull(self, query: PullQuery,
             on_study: Callable[[str, list[RetrieveOutcome]], None] | None = None) -> PullReport:
        """Find the studies matching ``query`` and retrieve them.

        ``on_study`` is called after each study's retrieves (its UID and outcomes).

        Raises:
            PullError: the peer could not be asked (nothing was retrieved).
        """
        report = PullReport(self.name, self.method)
        self._get_stored = self._get_failed = self._invalid_matches = 0
        LOG.info("pull from %s (%s): %s", self.name, self.method.value, query.describe())
        assoc = self._associate()
        try:
            studies = self.find_studies(assoc, query)
            targets: list[tuple[str, list[str | None]]] = []
            for uid, _classes in studies:
                if query.by_series:
                    series = self.find_series(assoc, uid, query)
                    report.series += len(series)
                    if not series:
                        continue
                    targets.append((uid, list(series)))
                else:
                    targets.append((uid, [None]))
            report.studies = [uid for uid, _ in targets]
            classes = tuple(c for _uid, cls in studies for c in cls
                            if c not in GET_STORAGE_CLASSES)
            if self.method is RetrieveMethod.GET and targets and classes:
                # the study holds classes not proposed yet: propose them on a new association
                self._close(assoc)
                assoc = self._associate(classes)
            for uid, series_uids in targets:
                outcomes = []
                for series_uid in series_uids:
                    if not assoc.is_established:
                        outcome = RetrieveOutcome(uid, series_uid,
                                                  message="association lost before the retrieve")
                    else:
                        outcome = self._retrieve(assoc, uid, series_uid)
                    outcomes.append(outcome)
                    report.retrieves.append(outcome)
                if on_study is not None:
                    on_study(uid, outcomes)
        finally:
            self._close(assoc)
        report.stored, report.store_failed = self._get_stored, self._get_failed
        if self._invalid_matches:
            report.problems.append(f"{self._invalid_matches} study match(es) without a valid "
                                   "Study Instance UID ignored")
        LOG.info("pull from %s: %d study(ies) found, %d instance(s) retrieved, %d failure(s)",
                 self.name, len(report.studies), report.instances, report.failed)
        return report


def parse_cli_date(value: str, today: dt.date) -> dt.date:
    """A command-line date: ``YYYY-MM-DD``, ``YYYYMMDD`` or ``-Nd`` (N days before today)."""
    bound = parse_date_bound(value)
    return today + dt.timedelta(days=bound) if isinstance(bound, int) else bound

