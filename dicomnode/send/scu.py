"""Verification and Storage SCU: C-ECHO a peer, C-STORE files and folders to it.

What is sent to a peer is a :class:`~dicomnode.boundary.PeerCopy`, made by
:func:`dicomnode.boundary.for_peer` (pseudonymized for research peers, re-identified for
clinical ones): :func:`send_files` takes nothing else, so no path to a peer can skip the
boundary. Files are sent as they are stored, in their own transfer syntax, streamed
from disk without decoding (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``). For
uncompressed files the little endian syntaxes are proposed too, and a file is
converted in memory only when the peer accepted none of its own syntax.

Every failure says whether it is *transient*: whether the same file may go
through on a later association (peer down, association rejected, aborted or
timed out, status 0xA7xx out of resources) or not (unreadable file, SOP class
or transfer syntax not accepted, any other failure status). The outbox
(:mod:`dicomnode.send.outbox`) retries the transient ones only.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext, build_context
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import PeerConfig
from dicomnode.dicom.status import is_stored, is_transient
from dicomnode.net.sockets import set_nodelay
from dicomnode.net.tls import TlsError, client_tls_args

if TYPE_CHECKING:
    from dicomnode.boundary import PeerCopy

__all__ = [
    "SendError",
    "SendResult",
    "collect_files",
    "echo",
    "is_transient_status",
    "peer_copies",
    "send_files",
]

LOG = logging.getLogger(__name__)

_UNCOMPRESSED = (ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian)
_MAX_CONTEXTS = 128


class SendError(Exception):
    """The peer could not be reached or refused the association.

    ``transient`` is False when trying again cannot help by itself: the peer has no
    address configured, or it accepted none of the proposed presentation contexts.
    """

    def __init__(self, message: str, *, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient


def is_transient_status(status: int) -> bool:
    """Whether a C-STORE failure status may change on a later try
    (:func:`dicomnode.dicom.status.is_transient`: ``A7xx`` out of resources and ``FE00``
    cancel are, every other failure is final)."""
    return is_transient(status)


@dataclass(frozen=True)
class SendResult:
    """The outcome for one file: the DICOM status (None if never sent) and a message.

    ``transient`` marks a file that was not stored for a reason that lies with the
    association (lost, aborted, no response, sending cancelled) or with a transient
    status (:func:`is_transient_status`): the same file may go through later.
    ``cancelled`` marks a file not even tried because sending was cancelled.
    """

    path: Path
    status: int | None
    message: str
    transient: bool = False
    cancelled: bool = False

    @property
    def ok(self) -> bool:
        """Success (0x0000) or a warning (0xBxxx): the peer stored the instance."""
        return self.status is not None and is_stored(self.status)


def _peer_address(peer: PeerConfig, name: str) -> tuple[str, int]:
    if peer.host is None or peer.port is None:
        raise SendError(f"peer {name!r} has no host and port configured (peers.{name}.host/port)",
                        transient=False)
    return peer.host, peer.port


def _new_ae(ae_title: str, timeout: float) -> AE:
    """An AE whose connection, ACSE, DIMSE and network timeouts are all ``timeout`` seconds."""
    ae = AE(ae_title=ae_title)
    ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    return ae


def _associate(ae: AE, peer: PeerConfig, name: str, contexts: list[PresentationContext],
               ) -> Association:
    host, port = _peer_address(peer, name)
    ae.requested_contexts = contexts
    try:
        tls_args = client_tls_args(peer, name)
    except TlsError as exc:
        raise SendError(str(exc), transient=False) from None
    assoc = ae.associate(host, port, ae_title=peer.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        answer = assoc.acceptor.primitive
        if assoc.is_rejected:
            why = ""
            if answer is not None:
                why = f": {answer.result_str}, {answer.source_str}, {answer.reason_str}"
            raise SendError(f"peer {name!r} ({host}:{port}) rejected the association{why}")
        if answer is not None and getattr(answer, "result", None) == 0x00:
            classes = sorted({UID(str(cx.abstract_syntax)).name for cx in contexts})
            raise SendError(f"peer {name!r} ({host}:{port}) accepted none of the proposed "
                            f"presentation contexts ({', '.join(classes)})", transient=False)
        if tls_args is not None:
            raise SendError(f"peer {name!r} ({host}:{port}) could not be reached over TLS "
                            "(no connection, a certificate not trusted (peers."
                            f"{name}.tls), or no answer to the association request)")
        raise SendError(f"peer {name!r} ({host}:{port}) could not be reached "
                        "(no connection, no answer to the association request, or the "
                        "connection closed before an answer was read: some peers reset it "
                        "right after rejecting the association, e.g. for an unknown AE title)")
    set_nodelay(assoc)
    return assoc


def echo(ae_title: str, peer: PeerConfig, name: str, *, timeout: float = 30.0) -> int:
    """C-ECHO a peer; returns the status (0x0000 is success).

    Raises:
        SendError: the association could not be established.
    """
    ae = _new_ae(ae_title, timeout)
    assoc = _associate(ae, peer, name, [build_context(Verification)])
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise SendError(f"peer {name!r} did not answer the C-ECHO")
        return int(status.Status)
    finally:
        assoc.release()


def collect_files(paths: Iterable[Path], *, skip_hidden: bool = False) -> Iterator[Path]:
    """Every regular file named, and every file below each folder named, in sorted order;
    with ``skip_hidden``, files whose name starts with a dot are left out."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file()
                              and not (skip_hidden and p.name.startswith(".")))
        elif path.is_file():
            if not (skip_hidden and path.name.startswith(".")):
                yield path
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")


@dataclass(frozen=True)
class _Item:
    path: Path  # the file sent
    source: Path  # what results name: the file the caller handed to the boundary
    sop_class: str
    transfer_syntax: str


def _read_item(copy: PeerCopy) -> _Item | SendResult:
    try:
        ds = pydicom.dcmread(copy.path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return _Item(copy.path, copy.source, str(ds.SOPClassUID),
                     str(ds.file_meta.TransferSyntaxUID))
    except Exception as exc:
        return SendResult(copy.source, None, f"not a DICOM file: {type(exc).__name__}")


def _pairs(item: _Item) -> list[tuple[str, str]]:
    """The (SOP class, transfer syntax) contexts proposed for one file: its own syntax first."""
    extra = _UNCOMPRESSED if UID(item.transfer_syntax) in _UNCOMPRESSED else ()
    return [(item.sop_class, ts) for ts in dict.fromkeys((item.transfer_syntax, *extra))]


def _contexts(items: list[_Item]) -> list[PresentationContext]:
    # one context per (SOP class, syntax) so that the file's own syntax can be accepted
    pairs = dict.fromkeys(pair for item in items for pair in _pairs(item))
    return [build_context(sop, ts) for sop, ts in pairs]


def _batches(items: list[_Item]) -> Iterator[list[_Item]]:
    """Split items so that each association needs at most 128 presentation contexts."""
    batch: list[_Item] = []
    pairs: set[tuple[str, str]] = set()
    for item in items:
        wanted = pairs.union(_pairs(item))
        if len(wanted) > _MAX_CONTEXTS and batch:
            yield batch
            batch, wanted = [], set(_pairs(item))
        batch.append(item)
        pairs = wanted
    if batch:
        yield batch


def _send_one(assoc: Association, item: _Item) -> SendResult:
    accepted = {(cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    try:
        if (item.sop_class, item.transfer_syntax) in accepted:
            # a path is streamed from disk as it is (STORE_SEND_CHUNKED_DATASET)
            status = assoc.send_c_store(item.path)
        elif any(sop == item.sop_class for sop, _ in accepted) and (
                UID(item.transfer_syntax) in _UNCOMPRESSED):
            # a dataset is re-encoded by pynetdicom in the accepted syntax
            status = assoc.send_c_store(pydicom.dcmread(item.path))
        else:
            return SendResult(item.source, None,
                              f"peer accepted no presentation context for SOP class "
                              f"{item.sop_class} in transfer syntax {item.transfer_syntax}")
    except Exception as exc:
        # the text of a network error helps; that of an encoding error may quote values
        detail = f": {exc}" if isinstance(exc, OSError) else ""
        return SendResult(item.source, None, f"send failed: {type(exc).__name__}{detail}",
                          transient=True)
    if "Status" not in status:
        return SendResult(item.source, None, "no response from peer (association lost)",
                          transient=True)
    code = int(status.Status)
    comment = str(status.get("ErrorComment", "")).strip()
    text = "Success" if code == 0 else f"status 0x{code:04X}" + (f": {comment}" if comment else "")
    return SendResult(item.source, code, text, transient=is_transient_status(code))


def peer_copies(copies: Iterable[PeerCopy], peer: PeerConfig, name: str, *,
                sender: str) -> list[PeerCopy]:
    """``copies`` as a list, each checked to be a :class:`dicomnode.boundary.PeerCopy` made
    for ``peer`` (the boundary, :func:`dicomnode.boundary.for_peer`, is the only way to a
    peer, whatever carries the files: ``sender`` names it in the error).

    Raises:
        TypeError: something other than a PeerCopy made for ``peer``.
    """
    from dicomnode.boundary import PeerCopy

    checked = list(copies)
    for copy in checked:
        if not isinstance(copy, PeerCopy):  # callers' types are not a promise: checked
            raise TypeError(f"{sender} sends only PeerCopy objects made by "
                            f"dicomnode.boundary.for_peer, not {type(copy).__name__}")
        if copy.peer != peer:
            raise TypeError(f"a PeerCopy made for peer {copy.peer_name!r} cannot be sent to "
                            f"peer {name!r}")
    return checked


def send_files(ae_title: str, peer: PeerConfig, name: str, copies: Iterable[PeerCopy], *,
               timeout: float = 60.0,
               on_result: Callable[[SendResult], None] | None = None,
               cancel: threading.Event | None = None) -> list[SendResult]:
    """C-STORE files made fit for ``peer`` over as few associations as the 128-context
    limit allows.

    Each result names the copy's ``source`` (the file handed to the boundary).
    ``on_result`` is called with each file's result as soon as the peer answered it.
    Once ``cancel`` is set, the files not yet sent are reported as cancelled (and
    transient) and the association is released.

    Raises:
        TypeError: something other than a PeerCopy made for ``peer`` (the boundary,
            :func:`dicomnode.boundary.for_peer`, is the only way to a peer).
        SendError: the peer could not be reached or refused the association; the files
            of the batches already sent have been reported.
    """
    copies = peer_copies(copies, peer, name, sender="send_files()")
    results: list[SendResult] = []

    def report(result: SendResult) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    items: list[_Item] = []
    for copy in copies:
        read = _read_item(copy)
        if isinstance(read, SendResult):
            report(read)
        else:
            items.append(read)
    _config.STORE_SEND_CHUNKED_DATASET = True
    ae = _new_ae(ae_title, timeout)
    for batch in _batches(items):
        if cancel is not None and cancel.is_set():
            for item in batch:
                report(SendResult(item.source, None, "not sent: cancelled", transient=True,
                                  cancelled=True))
            continue
        assoc = _associate(ae, peer, name, _contexts(batch))
        try:
            for item in batch:
                if cancel is not None and cancel.is_set():
                    report(SendResult(item.source, None, "not sent: cancelled",
                                      transient=True, cancelled=True))
                elif not assoc.is_established:
                    report(SendResult(item.source, None, "association lost before sending",
                                      transient=True))
                else:
                    report(_send_one(assoc, item))
        finally:
            if assoc.is_established:
                assoc.release()
    return results
