"""STOW-RS receive (PS3.18 10.5): a ``multipart/related; type="application/dicom"`` request
body streamed part by part to spool files and stored through the C-STORE SCP's ingest.

What the route in :mod:`dicomnode.web.dicomweb` needs, without FastAPI (the console's
server builds a :class:`StowReceiver` when it is made):

* :class:`MultipartParser`: a push parser of a multipart body (RFC 2046), fed chunk by
  chunk, that hands each part's bytes on as they arrive: nothing larger than a chunk and a
  part's header block (at most :data:`MAX_PART_HEADER_BYTES`) is held in memory;
* :class:`StowCredentials`: who is sending: the console's token, or a peer's
  ``dicomweb.receive_auth`` (a bearer token, or HTTP Basic), from the peer's ``host``
  when it names one, as the SCP's access policy checks a calling AE title;
* :class:`StowReceiver`: each part to a spool file of the store's ``tmp/`` within the disk
  reserve (:class:`dicomnode.receive.spool.ReceiveFile`: a part crossing
  ``storage.min_free_bytes`` is read on and discarded, refused with 0xA700), then
  :meth:`dicomnode.receive.ingest.InstanceStore.ingest` in a worker thread: each
  instance is durable and indexed before the response. A request counts as an open
  association for completion (:class:`dicomnode.completion.AssociationActivity`) from
  its first stored instance until its response, as the SCP counts an association until
  its release;
* :func:`store_response`: the Store Instances Response Module (PS3.18 Annex I) as
  ``application/dicom+json`` and its HTTP status: 200 all stored, 202 some stored, 409
  none stored; each failure's Failure Reason is the DIMSE status the C-STORE SCP would
  have answered (:class:`dicomnode.dicom.status.Status`), 0xA901 for an instance of
  another study than the one of the URL. There is no WADO-RS: Retrieve URL is empty.

Nothing here logs a value from a dataset; credentials are never logged, peers are named
by their configuration name, client addresses escaped.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pydicom.filereader

from dicomnode.completion import AssociationActivity
from dicomnode.config import ConfigError, DicomwebAuthConfig, PeerConfig
from dicomnode.dicom.status import Status
from dicomnode.net.access import from_host, printable
from dicomnode.receive.ingest import InstanceStore, StoreFailure
from dicomnode.receive.spool import ReceiveFile, ReceiveFiles
from dicomnode.receive.validate import DatasetError, check_dataset
from dicomnode.send.stow import read_secret
from dicomnode.store.header import HeaderError, read_header

__all__ = [
    "DICOM_JSON",
    "MAX_PART_HEADER_BYTES",
    "MultipartError",
    "MultipartParser",
    "PartOutcome",
    "Sender",
    "StowCredentials",
    "StowReceiver",
    "multipart_boundary",
    "store_response",
]

LOG = logging.getLogger("dicomnode.web.stow")

DICOM_JSON = "application/dicom+json"
#: The largest header block of one part (bytes); a longer one is a bad request.
MAX_PART_HEADER_BYTES = 16_384


# ---------------------------------------------------------------- the multipart body


class MultipartError(ValueError):
    """The body is not a well-formed multipart body (a 400 Bad Request)."""


def _parameters(value: str) -> tuple[str, dict[str, str]]:
    """A Content-Type value as (media type, parameters), names lower-cased, quotes off."""
    media, _, rest = value.partition(";")
    params: dict[str, str] = {}
    for item in rest.split(";"):
        name, sep, raw = item.strip().partition("=")
        if sep:
            raw = raw.strip()
            if len(raw) >= 2 and raw[0] == raw[-1] == '"':
                raw = raw[1:-1]
            params[name.strip().lower()] = raw
    return media.strip().lower(), params


def multipart_boundary(content_type: str | None) -> tuple[bytes | None, str]:
    """The boundary of a STOW-RS request's Content-Type, or (None, why it is refused).

    ``multipart/related`` whose ``type`` is ``application/dicom`` (or absent) is accepted;
    the DICOM JSON or XML metadata with bulk data forms of PS3.18 are not.
    """
    media, params = _parameters(content_type or "")
    if media != "multipart/related":
        return None, "a STOW-RS request is multipart/related; type=\"application/dicom\""
    kind = params.get("type", "application/dicom").lower()
    if kind != "application/dicom":
        return None, f"only type=\"application/dicom\" parts are accepted, not {printable(kind)}"
    boundary = params.get("boundary", "")
    # RFC 2046 allows 70 characters; Orthanc's DICOMweb plugin sends 73: up to 200 here
    if not 1 <= len(boundary) <= 200 or not boundary.isascii():
        return None, "multipart/related needs a boundary of 1 to 200 ASCII characters"
    return boundary.encode("ascii"), ""


class MultipartParser:
    """A push parser of a multipart body: :meth:`feed` it the body's chunks, then
    :meth:`close`. Callbacks: ``on_part(headers)`` at each part's start (header names
    lower-cased), ``on_data(bytes)`` with its body as it arrives, ``on_end()`` at its end.

    Raises (from :meth:`feed` and :meth:`close`):
        MultipartError: a part's headers exceed MAX_PART_HEADER_BYTES or do not parse,
            or the body ends before its closing delimiter.
    """

    _PREAMBLE, _AFTER_DELIMITER, _HEADERS, _BODY, _DONE = range(5)

    def __init__(self, boundary: bytes, on_part: Callable[[dict[str, str]], None],
                 on_data: Callable[[bytes], None], on_end: Callable[[], None]) -> None:
        self.delimiter = b"\r\n--" + boundary
        self.on_part, self.on_data, self.on_end = on_part, on_data, on_end
        self._buffer = bytearray(b"\r\n")  # the first delimiter has no line break before it
        self._state = self._PREAMBLE
        self.parts = 0

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def feed(self, chunk: bytes) -> None:
        if self._state == self._DONE:
            return  # the epilogue: ignored
        self._buffer += chunk
        while self._step():
            pass

    def close(self) -> None:
        if self._state != self._DONE:
            raise MultipartError("the body ended before the closing delimiter of its parts")

    def _step(self) -> bool:
        """Consume what the buffer allows in the current state; whether to go on."""
        buffer, delimiter = self._buffer, self.delimiter
        if self._state == self._PREAMBLE:
            found = buffer.find(delimiter)
            if found < 0:
                del buffer[:max(0, len(buffer) - len(delimiter))]
                return False
            del buffer[:found + len(delimiter)]
            self._state = self._AFTER_DELIMITER
            return True
        if self._state == self._AFTER_DELIMITER:
            if len(buffer) < 2:
                return False
            if buffer[:2] == b"--":
                self._state = self._DONE
                buffer.clear()
                return False
            end = buffer.find(b"\r\n")
            if end < 0:
                if len(buffer) > 1024:
                    raise MultipartError("no line break after a boundary delimiter")
                return False
            if buffer[:end].strip(b" \t"):
                raise MultipartError("characters after a boundary delimiter")
            del buffer[:end + 2]
            self._state = self._HEADERS
            return True
        if self._state == self._HEADERS:
            if buffer[:2] == b"\r\n":  # a part with no header at all
                headers_end, block = 2, b""
            else:
                found = buffer.find(b"\r\n\r\n")
                if found < 0:
                    if len(buffer) > MAX_PART_HEADER_BYTES:
                        raise MultipartError("a part's headers are longer than "
                                             f"{MAX_PART_HEADER_BYTES} bytes")
                    return False
                headers_end, block = found + 4, bytes(buffer[:found])
            headers: dict[str, str] = {}
            for line in block.decode("latin-1").split("\r\n"):
                if not line:
                    continue
                name, sep, value = line.partition(":")
                if not sep or not name.strip():
                    raise MultipartError("a part's header line does not parse")
                headers[name.strip().lower()] = value.strip()
            del buffer[:headers_end]
            self.parts += 1
            self.on_part(headers)
            self._state = self._BODY
            return True
        if self._state == self._BODY:
            found = buffer.find(delimiter)
            if found < 0:
                keep = len(delimiter) - 1  # a delimiter may straddle two chunks
                if len(buffer) > keep:
                    self.on_data(bytes(buffer[:len(buffer) - keep]))
                    del buffer[:len(buffer) - keep]
                return False
            if found:
                self.on_data(bytes(buffer[:found]))
            del buffer[:found + len(delimiter)]
            self.on_end()
            self._state = self._AFTER_DELIMITER
            return True
        return False


# ---------------------------------------------------------------- who is sending


@dataclass(frozen=True)
class Sender:
    """Who sent a STOW-RS request: a configured peer (its name), or the console's token
    holder (``peer`` None). ``ae_title`` is what the index records as the calling AE
    title of what it stored (the peer's; empty for the token)."""

    peer: str | None
    ae_title: str


def _equal(presented: str, secret: str) -> bool:
    return hmac.compare_digest(presented.encode("utf-8", "replace"), secret.encode("utf-8"))


class StowCredentials:
    """Checks a request's ``Authorization`` against the console token and the peers'
    ``dicomweb.receive_auth`` (secrets read from their files at each check, so a changed
    file applies at once; a file that cannot be read is logged and matches nothing).

    Args:
        peers: the configured peers.
        console_token: the console's token (None: none configured).
    """

    def __init__(self, peers: Mapping[str, PeerConfig], console_token: str | None) -> None:
        self.peers = {n: p for n, p in peers.items()
                      if p.dicomweb is not None and p.dicomweb.receive_auth is not None}
        self.console_token = console_token
        self._warned: set[str] = set()

    def _secret(self, name: str, auth: DicomwebAuthConfig) -> str | None:
        path = auth.token_file if auth.token_file is not None else auth.password_file
        assert path is not None
        try:
            return read_secret(path, f"peers.{name}.dicomweb.receive_auth")
        except ConfigError as exc:
            if name not in self._warned:
                self._warned.add(name)
                LOG.error("STOW-RS: %s", exc)
            return None

    def identify(self, authorization: str | None, address: str) -> tuple[Sender | None, int]:
        """(sender, 0), or (None, HTTP status): 401 no or a wrong credential, 403 a peer's
        credential from an address that is not its configured host."""
        scheme, _, value = (authorization or "").strip().partition(" ")
        value = value.strip()
        scheme = scheme.lower()
        if scheme == "bearer" and value:
            if self.console_token is not None and _equal(value, self.console_token):
                return Sender(None, ""), 0
            for name, peer in self.peers.items():
                auth = peer.dicomweb.receive_auth if peer.dicomweb else None
                assert auth is not None
                if auth.token_file is not None:
                    secret = self._secret(name, auth)
                    if secret is not None and _equal(value, secret):
                        return self._from_host(name, peer, address)
            return None, 401
        if scheme == "basic" and value:
            try:
                user, sep, password = base64.b64decode(value, validate=True).decode(
                    "utf-8").partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return None, 401
            if not sep:
                return None, 401
            for name, peer in self.peers.items():
                auth = peer.dicomweb.receive_auth if peer.dicomweb else None
                assert auth is not None
                if auth.user is not None and _equal(user, auth.user):
                    secret = self._secret(name, auth)
                    if secret is not None and _equal(password, secret):
                        return self._from_host(name, peer, address)
            return None, 401
        return None, 401

    @staticmethod
    def _from_host(name: str, peer: PeerConfig, address: str) -> tuple[Sender | None, int]:
        if from_host(address, peer.host):
            return Sender(name, peer.ae_title), 0
        LOG.warning("STOW-RS: peer %s's credential from %s, not from its configured host",
                    name, printable(address))
        return None, 403


# ---------------------------------------------------------------- one request


@dataclass
class PartOutcome:
    """What happened to one part: stored (``status`` 0) or not (the failure status), and
    the SOP class and instance UIDs read from it (empty when unreadable)."""

    status: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""


@dataclass
class _Part:
    """A part being received into a spool file (``file`` None: not kept)."""

    file: ReceiveFile | None
    refusal: int | None = None  # a failure status decided before ingest


@dataclass
class StowRequest:
    """The state of one STOW-RS request: its parts as they arrive, the finished ones
    waiting for ingest, and what happened to each."""

    receiver: StowReceiver
    sender: Sender
    study_uid: str | None
    current: _Part | None = None
    finished: list[_Part] = field(default_factory=list)
    outcomes: list[PartOutcome] = field(default_factory=list)
    key: object = field(default_factory=object)  # its key in the association activity

    def on_part(self, headers: dict[str, str]) -> None:
        media, _ = _parameters(headers.get("content-type", "application/dicom"))
        if media != "application/dicom":
            self.current = _Part(None, int(Status.CANNOT_UNDERSTAND))
            return
        try:
            spool = ReceiveFile(self.receiver.spool)
        except OSError as exc:
            LOG.error("STOW-RS: cannot create a spool file: %s", type(exc).__name__)
            self.current = _Part(None, int(Status.OUT_OF_RESOURCES))
            return
        self.current = _Part(spool)

    def on_data(self, data: bytes) -> None:
        part = self.current
        if part is not None and part.file is not None:
            part.file.write(data)  # past the disk reserve: read on, not kept (refused)

    def on_end(self) -> None:
        if self.current is not None:
            self.finished.append(self.current)
            self.current = None

    def discard(self) -> None:
        """Delete the spool files of parts not stored (a request cut or refused)."""
        for part in [*self.finished, *([self.current] if self.current else [])]:
            if part.file is not None:
                self.receiver.release(part.file)
        self.finished.clear()
        self.current = None

    def ingest_finished(self) -> None:
        """Store the finished parts (call it in a worker thread: ingest fsyncs)."""
        parts, self.finished = self.finished, []
        for part in parts:
            self.outcomes.append(self.receiver.ingest(part, self))


class StowReceiver:
    """Receives STOW-RS requests into the node's store (see the module's docstring).

    Args:
        store: the node's instance store; its ``tmp/`` holds the spool files.
        activity: the node's association activity (completion waits for open requests).
        credentials: who may send.
    """

    def __init__(self, store: InstanceStore, activity: AssociationActivity,
                 credentials: StowCredentials) -> None:
        self.store = store
        self.activity = activity
        self.credentials = credentials
        self.spool = ReceiveFiles(store.files.tmp, store.min_free_bytes)
        self.counters: dict[str, int] = {"requests": 0, "stored": 0, "failed": 0}
        self._lock = threading.Lock()

    def request(self, sender: Sender, study_uid: str | None) -> StowRequest:
        with self._lock:
            self.counters["requests"] += 1
        return StowRequest(self, sender, study_uid)

    def release(self, spool: ReceiveFile) -> None:
        self.spool.claim(spool.name)  # a refused file was kept until claimed
        spool.claimed = True
        spool.discard()

    def finish(self, request: StowRequest) -> None:
        """The request is answered or cut: its spool files go, its studies may complete."""
        request.discard()
        self.activity.close(request.key)
        stored = sum(1 for o in request.outcomes if o.status == Status.SUCCESS)
        with self._lock:
            self.counters["stored"] += stored
            self.counters["failed"] += len(request.outcomes) - stored
        who = "the console's token" if request.sender.peer is None else \
            f"peer {request.sender.peer}"
        failures = sorted({f"0x{o.status:04X}" for o in request.outcomes
                           if o.status != Status.SUCCESS})
        LOG.info("STOW-RS from %s: %d instance(s) stored, %d failed%s", who, stored,
                 len(request.outcomes) - stored,
                 f" ({', '.join(failures)})" if failures else "")

    def ingest(self, part: _Part, request: StowRequest) -> PartOutcome:
        spool = part.file
        if spool is None:
            return PartOutcome(part.refusal or int(Status.PROCESSING_FAILURE))
        try:
            spool.close()
            outcome = self._uids(Path(spool.name))
            if spool.refused is not None:
                outcome.status = int(Status.OUT_OF_RESOURCES)
                return outcome
            if request.study_uid is not None:
                found = self._study(Path(spool.name))
                if isinstance(found, int) or found != request.study_uid:
                    outcome.status = int(Status.DATA_SET_DOES_NOT_MATCH_STUDY) \
                        if isinstance(found, str) else found
                    return outcome
            try:
                result = self.store.ingest(Path(spool.name),
                                           calling_ae_title=request.sender.ae_title)
            except StoreFailure as exc:
                outcome.status = int(exc.status)
                return outcome
            except Exception as exc:
                LOG.exception("STOW-RS: storing failed unexpectedly: %s", type(exc).__name__)
                outcome.status = int(Status.PROCESSING_FAILURE)
                return outcome
            self.activity.touch(request.key, result.study_pk)
            outcome.status = int(Status.SUCCESS)
            return outcome
        finally:
            self.release(spool)  # gone already when stored (moved into the store)

    @staticmethod
    def _uids(path: Path) -> PartOutcome:
        """The part's SOP class and instance UIDs from its File Meta Information (empty
        when it cannot be read); the dataset is not read here."""
        try:
            meta = pydicom.filereader.read_file_meta_info(path)
        except Exception:
            return PartOutcome(0)
        return PartOutcome(0, str(meta.get("MediaStorageSOPClassUID", "") or "")[:64],
                           str(meta.get("MediaStorageSOPInstanceUID", "") or "")[:64])

    def _study(self, path: Path) -> str | int:
        """The Study Instance UID of a part, read as ingest reads it (the dataset walked
        to its end, a deflated one inflated in chunks within the limits), or the failure
        status ingest would answer."""
        try:
            checked = check_dataset(path, max_inflated_bytes=self.store.max_inflated_bytes,
                                    scratch=self.store.files.tmp)
        except DatasetError as exc:
            return int(exc.status)
        try:
            return read_header(checked.readable).study_instance_uid
        except HeaderError as exc:
            return int(exc.status)
        finally:
            checked.discard()


def _reference(outcome: PartOutcome) -> dict[str, Any]:
    item: dict[str, Any] = {"00081150": {"vr": "UI"}, "00081155": {"vr": "UI"}}
    if outcome.sop_class_uid:
        item["00081150"]["Value"] = [outcome.sop_class_uid]
    if outcome.sop_instance_uid:
        item["00081155"]["Value"] = [outcome.sop_instance_uid]
    return item


def store_response(outcomes: list[PartOutcome]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the Store Instances Response Module (DICOM JSON) of a request:
    200 when every instance was stored, 202 when some were, 409 when none was."""
    stored = [o for o in outcomes if o.status == Status.SUCCESS]
    failed = [o for o in outcomes if o.status != Status.SUCCESS]
    body: dict[str, Any] = {"00081190": {"vr": "UR"}}  # Retrieve URL: no WADO-RS here
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": [
            {**_reference(o), "00081197": {"vr": "US", "Value": [o.status]}} for o in failed]}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [
            {**_reference(o), "00081190": {"vr": "UR"}} for o in stored]}
    if not failed:
        return 200, body
    return (202 if stored else 409), body
