"""STOW-RS SCU: store files at a DICOMweb peer (PS3.18 10.5, ``POST {url}/studies``).

The counterpart of :func:`dicomnode.send.scu.send_files` for a peer whose
``dicomweb.url`` is set: it takes the same :class:`~dicomnode.boundary.PeerCopy` objects
(nothing else reaches a peer) and reports the same :class:`~dicomnode.send.scu.SendResult`
per file, so the outbox retries and records both kinds of peers alike.

Files go as they are stored, ``multipart/related; type="application/dicom"``, up to
:data:`FILES_PER_REQUEST` per request, streamed from disk with a Content-Length (no
chunked encoding, which some servers refuse). Each file's result is read from the Store
Instances Response (``application/dicom+json``, or ``+xml`` from servers that answer
nothing else): an instance in the Referenced SOP Sequence is stored (its Warning Reason,
if any, is the result's warning status), one in the Failed SOP Sequence is not, with its
Failure Reason as the result's status (transient when ``A7xx``, as for C-STORE).

What is transient (the outbox tries again later) and what is final:

* transient: no connection, a timeout, a connection lost, HTTP 408, 429, 5xx; 401 and
  403 too (like an association the peer rejects: its configuration may change); an
  instance the response leaves out;
* final: any other HTTP 4xx (wrong URL, media type refused, a 409 without a response
  body), a credential file that cannot be read, a file that is not DICOM.

``requests`` is used without the environment's proxies or netrc (``trust_env`` off): a
destination is reached exactly as configured, https verified against
``dicomweb.ca_bundle`` (default: the system's trust store).
"""

from __future__ import annotations

import io
import logging
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom.filereader
import requests

from dicomnode.config import ConfigError, PeerConfig
from dicomnode.dicom.status import Status, is_transient
from dicomnode.send.scu import SendError, SendResult, peer_copies

if TYPE_CHECKING:
    from dicomnode.boundary import PeerCopy

__all__ = ["FILES_PER_REQUEST", "read_secret", "stow_files"]

LOG = logging.getLogger(__name__)

#: The most files sent in one STOW-RS request.
FILES_PER_REQUEST = 32
_TRANSIENT_HTTP = frozenset({401, 403, 408, 425, 429})


def read_secret(path: Path, what: str) -> str:
    """The first line of a secret file, stripped.

    Raises:
        ConfigError: the file cannot be read or is empty (naming ``what`` and the file,
            never its content).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read it: {exc.strerror}") from None
    secret = (text.splitlines() or [""])[0].strip()
    if not secret:
        raise ConfigError(f"{what} {path}: empty")
    return secret


@dataclass(frozen=True)
class _File:
    path: Path  # the file sent
    source: Path  # what results name
    sop_instance_uid: str
    size: int


class _Body:
    """A multipart/related body read from the files in turn (``len()`` is its size, so
    ``requests`` sends a Content-Length and streams it with ``read``; no ``tell``, which
    would make ``requests`` fall back to chunked encoding)."""

    def __init__(self, files: list[_File], boundary: str) -> None:
        self._pieces: list[bytes | Path] = []
        self._length = 0
        for file in files:
            head = (f"--{boundary}\r\nContent-Type: application/dicom\r\n"
                    f"Content-Length: {file.size}\r\n\r\n").encode("ascii")
            self._pieces += [head, file.path, b"\r\n"]
            self._length += len(head) + file.size + 2
        tail = f"--{boundary}--\r\n".encode("ascii")
        self._pieces.append(tail)
        self._length += len(tail)
        self._index = 0
        self._current: io.BufferedReader | io.BytesIO | None = None

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        while data := self.read(1 << 16):
            yield data

    def read(self, size: int = -1) -> bytes:
        while self._index < len(self._pieces):
            if self._current is None:
                piece = self._pieces[self._index]
                self._current = (io.BytesIO(piece) if isinstance(piece, bytes)
                                 else piece.open("rb"))
            data = self._current.read(size if size and size > 0 else 1 << 20)
            if data:
                return data
            self._current.close()
            self._current = None
            self._index += 1
        return b""

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None


def _read_file(copy: PeerCopy) -> _File | SendResult:
    try:
        meta = pydicom.filereader.read_file_meta_info(copy.path)
        uid = str(meta.MediaStorageSOPInstanceUID)
        return _File(copy.path, copy.source, uid, copy.path.stat().st_size)
    except Exception as exc:
        return SendResult(copy.source, None, f"not a DICOM file: {type(exc).__name__}")


def _auth(peer: PeerConfig, name: str) -> dict[str, str] | tuple[str, str] | None:
    """The headers or the Basic pair of the node's credential at the peer."""
    web = peer.dicomweb
    if web is None or web.auth is None:
        return None
    what = f"peers.{name}.dicomweb.auth"
    try:
        if web.auth.token_file is not None:
            return {"Authorization": f"Bearer {read_secret(web.auth.token_file, what)}"}
        assert web.auth.user is not None and web.auth.password_file is not None
        return web.auth.user, read_secret(web.auth.password_file, what)
    except ConfigError as exc:
        raise SendError(str(exc), transient=False) from None


def _uid_of(item: dict[str, Any], tag: str) -> str:
    value = item.get(tag, {}).get("Value") or [""]
    return str(value[0])


def _code_of(item: dict[str, Any], tag: str) -> int | None:
    value = item.get(tag, {}).get("Value")
    return int(value[0]) if value else None


def _outcomes_json(body: Any) -> dict[str, int]:
    """SOP Instance UID -> status (0 stored, Bxxx stored with a warning, else the failure)."""
    found: dict[str, int] = {}
    if not isinstance(body, dict):
        return found
    for item in body.get("00081199", {}).get("Value") or []:
        found[_uid_of(item, "00081155")] = _code_of(item, "00081196") or 0
    for item in body.get("00081198", {}).get("Value") or []:
        found[_uid_of(item, "00081155")] = _code_of(item, "00081197") or int(
            Status.PROCESSING_FAILURE)
    return found


def _local(element: ET.Element) -> str:
    """An element's name without its namespace (PS3.19's native model may carry one)."""
    return element.tag.rsplit("}", 1)[-1]


def _outcomes_xml(text: bytes) -> dict[str, int]:
    """The same from a PS3.19 native DICOM model (``application/dicom+xml``) answer."""
    found: dict[str, int] = {}
    root = ET.fromstring(text)  # from the configured peer; no entities are resolved
    for attribute in root.iter():
        tag = attribute.get("tag", "").upper()
        if _local(attribute) != "DicomAttribute" or tag not in ("00081199", "00081198"):
            continue
        for item in (c for c in attribute if _local(c) == "Item"):
            values: dict[str, str] = {}
            for element in item:
                if _local(element) == "DicomAttribute":
                    value = next((v for v in element if _local(v) == "Value"), None)
                    values[element.get("tag", "").upper()] = (
                        (value.text or "").strip() if value is not None else "")
            uid = values.get("00081155", "")
            if tag == "00081199":
                found[uid] = int(values.get("00081196") or 0)
            else:
                found[uid] = int(values.get("00081197") or int(Status.PROCESSING_FAILURE))
    return found


def _results(answer: requests.Response, files: list[_File], name: str) -> list[SendResult]:
    status = answer.status_code
    if status in _TRANSIENT_HTTP or status >= 500 or status < 200 or (
            300 <= status < 400):
        return [SendResult(f.source, None, f"HTTP {status} from {name}'s STOW-RS",
                           transient=status < 400 or status in _TRANSIENT_HTTP
                           or status >= 500) for f in files]
    found: dict[str, int] = {}
    kind = answer.headers.get("content-type", "").split(";")[0].strip().lower()
    try:
        if answer.content and kind.endswith("json"):
            found = _outcomes_json(answer.json())
        elif answer.content and kind.endswith("xml"):
            found = _outcomes_xml(answer.content)
    except (ValueError, ET.ParseError):
        LOG.warning("STOW-RS to %s: the response does not parse (HTTP %d)", name, status)
    results = []
    for f in files:
        code = found.get(f.sop_instance_uid)
        if code is None and status == 200:
            code = int(Status.SUCCESS)  # all stored (a 200 may come without a body)
        if code is None:
            final = 400 <= status < 500
            results.append(SendResult(
                f.source, None, f"HTTP {status} from {name}'s STOW-RS without this instance "
                "in its response", transient=not final))
        elif code == Status.SUCCESS or code >> 12 == 0xB:
            text = "Success" if code == 0 else f"stored with warning 0x{code:04X}"
            results.append(SendResult(f.source, code, text))
        else:
            results.append(SendResult(f.source, code, f"failure reason 0x{code:04X} "
                                      f"(HTTP {status})", transient=is_transient(code)))
    return results


def stow_files(peer: PeerConfig, name: str, copies: Iterable[PeerCopy], *,
               timeout: float = 60.0,
               on_result: Callable[[SendResult], None] | None = None,
               cancel: threading.Event | None = None) -> list[SendResult]:
    """STOW-RS files made fit for ``peer`` to ``{peer.dicomweb.url}/studies``.

    Same contract as :func:`dicomnode.send.scu.send_files`: each result names the copy's
    ``source``; ``on_result`` gets each one as soon as its request was answered; once
    ``cancel`` is set, the files not yet sent are reported cancelled (and transient).

    Raises:
        TypeError: something other than a PeerCopy made for ``peer``.
        SendError: the peer has no DICOMweb URL or its credential file cannot be read
            (final), or it cannot be reached (transient); the files of the requests
            already answered have been reported.
    """
    copies = peer_copies(copies, peer, name, sender="stow_files()")
    url = peer.stow_url
    if url is None:
        raise SendError(f"peer {name!r} has no DICOMweb URL (peers.{name}.dicomweb.url)",
                        transient=False)
    results: list[SendResult] = []

    def report(result: SendResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    files: list[_File] = []
    for copy in copies:
        read = _read_file(copy)
        if isinstance(read, SendResult):
            report(read)
        else:
            files.append(read)
    if not files:
        return results
    auth = _auth(peer, name)
    assert peer.dicomweb is not None
    verify: bool | str = str(peer.dicomweb.ca_bundle) if peer.dicomweb.ca_bundle else True
    with requests.Session() as session:
        session.trust_env = False  # no proxy or netrc from the environment
        for start in range(0, len(files), FILES_PER_REQUEST):
            batch = files[start:start + FILES_PER_REQUEST]
            if cancel is not None and cancel.is_set():
                for f in batch:
                    report(SendResult(f.source, None, "not sent: cancelled", transient=True,
                                      cancelled=True))
                continue
            boundary = uuid.uuid4().hex
            headers = {"Content-Type": f'multipart/related; type="application/dicom"; '
                                       f"boundary={boundary}",
                       "Accept": "application/dicom+json"}
            if isinstance(auth, dict):
                headers.update(auth)
            body = _Body(batch, boundary)
            try:
                answer = session.post(f"{url}/studies", data=body, headers=headers,
                                      auth=auth if isinstance(auth, tuple) else None,
                                      timeout=timeout, verify=verify, allow_redirects=False)
            except requests.exceptions.SSLError:
                raise SendError(f"peer {name!r} ({url}) could not be reached over https "
                                "(a certificate not trusted: peers."
                                f"{name}.dicomweb.ca_bundle)") from None
            except requests.exceptions.RequestException as exc:
                raise SendError(f"peer {name!r} ({url}) could not be reached: "
                                f"{type(exc).__name__}") from None
            finally:
                body.close()
            for result in _results(answer, batch, name):
                report(result)
    return results
