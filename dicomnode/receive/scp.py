"""The node's Storage and Verification SCP: small event handlers bound to the store.

Received datasets stream straight to a temporary file in the store's ``tmp/``
folder (pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` mode, with the temporary
directory pointed there), so memory stays bounded whatever the instance size
and the final rename never crosses file systems. The bytes of the dataset
are kept exactly as received: nothing is decoded or transcoded on receipt.
"""

from __future__ import annotations

import copy
import logging
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable
from typing import cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_RELEASE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.completion import AssociationActivity
from dicomnode.config import NodeConfig
from dicomnode.dicom.status import Status
from dicomnode.net.access import (
    CALLED_AE_NOT_RECOGNIZED,
    CALLING_AE_NOT_RECOGNIZED,
    REFUSED_CALLED_AE,
    REFUSED_CALLING_AE,
    REFUSED_OTHER,
    REFUSED_TOO_MANY,
    AccessPolicy,
    EscapeControlCharacters,
    printable,
    raw_ae_title_problem,
)
from dicomnode.net.contexts import storage_sop_classes, transfer_syntaxes
from dicomnode.net.sockets import set_nodelay
from dicomnode.net.tls import server_context
from dicomnode.receive.guard import (
    LOCAL_LIMIT_EXCEEDED,
    AcceptShare,
    ConnectionGuard,
    GuardedAssociationServer,
    GuardLimits,
    start_guarded_server,
)
from dicomnode.receive.ingest import IngestResult, InstanceStore, StoreFailure
from dicomnode.receive.spool import ReceiveFiles
from dicomnode.states import IngestOutcome

__all__ = ["StorageSCP"]

LOG = logging.getLogger(__name__)

STATUS_PROCESSING_FAILURE = Status.PROCESSING_FAILURE
#: Longest a release (and the end of an association) waits for the index writer to write
#: the rows of what was received (seconds); the rows are written later otherwise.
RELEASE_FLUSH_SECONDS = 5.0

# A-ASSOCIATE-RJ source 3 (service provider, presentation), reason 2: local limit exceeded
_LOCAL_LIMIT_EXCEEDED = (0x03, 0x02)


def _any_ae_title(value: str) -> tuple[bool, str]:
    """pynetdicom AE validator that lets every title through to the access policy."""
    return True, ""


def _status(code: Status, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = int(code)
    ds.ErrorComment = comment[:64]
    return ds


def add_storage_contexts(ae: AE, sop_classes: Iterable[str]) -> None:
    """Support ``sop_classes`` with the transfer syntaxes of ``ae``'s Verification context.

    The same as ``ae.add_supported_context(uid, syntaxes)`` for each class, whose checks
    (each syntax parsed, validated and looked up in a list) cost 0.18 s for 208 classes of
    63 syntaxes at every start: here the Verification context, added and checked through
    pynetdicom's API, is copied for each class instead (2 ms).
    """
    template = next(c for c in ae.supported_contexts if c.abstract_syntax == Verification)
    contexts = ae._supported_contexts  # pynetdicom's own map: abstract syntax -> context
    for uid in sop_classes:
        context = copy.copy(template)
        context._transfer_syntax = list(template.transfer_syntax)
        context.abstract_syntax = uid  # parsed and validated by pynetdicom's setter
        assert context.abstract_syntax is not None
        contexts[context.abstract_syntax] = context


class StorageSCP:
    """Accepts C-ECHO and C-STORE for every storage SOP class and transfer syntax.

    Args:
        node: the node's AE title, address and association limits.
        store: where received instances go; Success is answered once
            :meth:`InstanceStore.receive` returns (the instance is durable; its index row
            follows from the store's writer, and is written before a release is answered).
        policy: which peers may associate.
        activity: records which open association delivered to which study.
        on_refused: called with the kind of each refused association (one of
            :data:`dicomnode.net.access.REFUSAL_KINDS`, never an AE title or address),
            e.g. a metrics counter; called from the SCP's threads, so it must be quick
            and thread-safe.
    """

    def __init__(self, node: NodeConfig, store: InstanceStore, policy: AccessPolicy,
                 activity: AssociationActivity, *,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.node = node
        self.store = store
        self.policy = policy
        self.activity = activity
        self.on_refused = on_refused
        self.server: GuardedAssociationServer | None = None
        # connections not yet associated, associations per address, PDU lengths, timeouts
        self.guard = ConnectionGuard(GuardLimits.from_config(node))
        # by IngestOutcome value, and "refused" associations
        self.counters: dict[str, int] = {**{o.value: 0 for o in IngestOutcome}, "refused": 0}
        self._counter_lock = threading.Lock()
        self.receive = ReceiveFiles(store.files.tmp, store.min_free_bytes)
        # the AE title fields of each A-ASSOCIATE-RQ as received, before pynetdicom strips
        # them (by association id; taken by _on_requested)
        self._raw_titles: dict[int, tuple[bytes, bytes]] = {}
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.node.ae_title)
        ae.maximum_associations = self.node.maximum_associations
        ae.maximum_pdu_size = self.node.maximum_pdu_size
        ae.network_timeout = self.node.network_timeout_seconds
        ae.acse_timeout = self.node.network_timeout_seconds
        ae.dimse_timeout = self.node.network_timeout_seconds
        # Explicit VR Little Endian first: pynetdicom accepts the first of *our* syntaxes
        # that the requestor proposed (see dicomnode.net.contexts)
        ae.add_supported_context(Verification, list(transfer_syntaxes()))
        add_storage_contexts(ae, storage_sop_classes())
        return ae

    def _count(self, key: IngestOutcome | str) -> None:
        with self._counter_lock:
            self.counters[key.value if isinstance(key, IngestOutcome) else key] += 1

    def _refused(self, kind: str) -> None:
        self._count("refused")
        if self.on_refused is not None:
            try:
                self.on_refused(kind)
            except Exception as exc:  # a broken hook must not break the SCP
                LOG.error("refusal hook failed: %s", type(exc).__name__)

    # -- event handlers ---------------------------------------------------------------

    def _on_conn_open(self, event: evt.Event) -> None:
        set_nodelay(event.assoc)

    def _on_data(self, event: evt.Event) -> None:
        data = event.data
        if data[:1] == b"\x01" and len(data) >= 42:  # A-ASSOCIATE-RQ: keep the raw titles
            with self._counter_lock:
                self._raw_titles[id(event.assoc)] = (bytes(data[10:26]), bytes(data[26:42]))

    def _raw_title_refusal(self, assoc_id: int) -> tuple[str, int, str] | None:
        with self._counter_lock:
            raw = self._raw_titles.pop(assoc_id, None)
        if raw is None:
            return None
        for which, field, diagnostic, kind in (
                ("called", raw[0], CALLED_AE_NOT_RECOGNIZED, REFUSED_CALLED_AE),
                ("calling", raw[1], CALLING_AE_NOT_RECOGNIZED, REFUSED_CALLING_AE)):
            problem = raw_ae_title_problem(field)
            if problem is not None:
                shown = printable(field.decode("latin-1").strip(" "))
                return (f"{which} AE title {shown} is not a "
                        f"valid AE title ({problem})", diagnostic, kind)
        return None

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        rq = assoc.requestor.primitive
        address = str(assoc.requestor.address)
        raw_refusal = self._raw_title_refusal(id(assoc))
        if rq is None:
            return
        if raw_refusal is not None:
            reason, diagnostic, kind = raw_refusal
            self._refused(kind)
            LOG.warning("association from %s refused: %s", printable(address), reason)
            assoc.acse.send_reject(0x01, 0x01, diagnostic)
            assoc.kill()
            return
        peer, refusal = self.policy.check(str(rq.calling_ae_title), str(rq.called_ae_title),
                                          address)
        if refusal is not None:
            self._refused(refusal.kind)
            LOG.warning("association from %s refused: %s", printable(address), refusal.reason)
            assoc.acse.send_reject(0x01, 0x01, refusal.diagnostic)
            assoc.kill()  # returns once the A-ASSOCIATE-RJ is out and the DUL is idle
            return
        if not self._admit(assoc, address):
            return
        LOG.info("association from peer %s (%s) accepted", peer, printable(address))

    def _admit(self, assoc: Association, address: str) -> bool:
        """Count the association against the limits, or refuse it (local limit exceeded)."""
        why = self.guard.admit(assoc)
        if why is None:
            return True
        self._refused(REFUSED_TOO_MANY)
        LOG.warning("association from %s refused: %s", address, why)
        assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
        assoc.kill()
        return False

    def _on_rejected(self, event: evt.Event) -> None:
        # pynetdicom's own rejections, after the policy accepted (ours send no EVT_REJECTED)
        rj = event.assoc.acceptor.primitive
        source_reason = (None, None) if rj is None else (rj.result_source, rj.diagnostic)
        if source_reason == _LOCAL_LIMIT_EXCEEDED:
            LOG.warning("association from %s refused: already %d association(s) open",
                        printable(event.assoc.requestor.address),
                        self.node.maximum_associations)
            self._refused(REFUSED_TOO_MANY)
        else:
            LOG.warning("association from %s refused by the DICOM layer",
                        printable(event.assoc.requestor.address))
            self._refused(REFUSED_OTHER)

    def _on_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    def _on_store(self, event: evt.Event) -> int | Dataset:
        assoc = event.assoc
        calling = printable(assoc.requestor.ae_title)
        path = event.dataset_path
        received = self.receive.claim(path)
        if received is not None and received.refused is not None:
            self._count(IngestOutcome.FAILED)
            LOG.warning("C-STORE from %s refused with 0x%04X: %s", calling,
                        Status.OUT_OF_RESOURCES, received.refused)
            return _status(Status.OUT_OF_RESOURCES, "out of resources: disk reserve")
        association = id(assoc)

        def indexed(result: IngestResult) -> None:  # in the index writer's thread
            self.activity.touch(association, result.study_pk)

        try:
            outcome = self.store.receive(
                path,
                calling_ae_title=str(assoc.requestor.ae_title),
                expected_sop_instance_uid=str(
                    cast(C_STORE, event.request).AffectedSOPInstanceUID or ""),
                on_indexed=indexed,
            )
        except StoreFailure as exc:
            self._count(IngestOutcome.FAILED)
            LOG.warning("C-STORE from %s refused with 0x%04X: %s", calling, exc.status, exc)
            return _status(exc.status, str(exc))
        except Exception as exc:
            self._count(IngestOutcome.FAILED)
            LOG.exception("C-STORE failed unexpectedly: %s", type(exc).__name__)
            return _status(STATUS_PROCESSING_FAILURE, "internal error while storing")
        finally:
            if received is not None:
                received.discard()  # gone already when stored (moved into the store)
        self._count(outcome)
        return int(Status.SUCCESS)

    def _on_acse_recv(self, event: evt.Event) -> None:
        # a peer asks to release: its instances are all indexed before the A-RELEASE-RP
        primitive = getattr(event, "primitive", None)
        if isinstance(primitive, A_RELEASE) and primitive.result is None:
            self.store.writer.flush(RELEASE_FLUSH_SECONDS)

    def _on_closed(self, event: evt.Event) -> None:
        # the rows of what it delivered are written (their studies marked busy) before
        # the association stops counting as busy
        self.store.writer.flush(RELEASE_FLUSH_SECONDS)
        with self._counter_lock:
            self._raw_titles.pop(id(event.assoc), None)
        # the temporary files of transfers this association left unfinished go at once
        removed = self.receive.discard_unclaimed(event.assoc.dul)
        if removed:
            LOG.info("removed %d unfinished transfer(s) of a closed association", removed)
        self.activity.close(id(event.assoc))

    @property
    def handlers(self) -> list[evt.EventHandlerType]:
        return [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_DATA_RECV, self._on_data),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACSE_RECV, self._on_acse_recv),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]

    # -- lifecycle --------------------------------------------------------------------

    def start(self, *, listen_socket: socket.socket | None = None,
              accept_share: AcceptShare | None = None) -> None:
        """Start listening on ``node.host:node.port`` in background threads (or accepting
        from ``listen_socket``, bound and listening already, shared with other receiver
        processes: see :mod:`dicomnode.receive.processes`)."""
        _config.STORE_RECV_CHUNKED_DATASET = True
        _config.LOG_REQUEST_IDENTIFIERS = False
        tempfile.tempdir = str(self.store.files.tmp)
        self.receive.install()
        # decode every AE title, so the access policy refuses a bad one with an
        # A-ASSOCIATE-RJ (pynetdicom would abort, logging it raw); escape pynetdicom's logs
        _config.VALIDATORS["AE"] = _any_ae_title
        names = ["pynetdicom"] + [n for n in logging.Logger.manager.loggerDict
                                  if n.startswith("pynetdicom.")]
        for name in names:  # a logger's filters do not apply to its children's records
            logger = logging.getLogger(name)
            if not any(isinstance(f, EscapeControlCharacters) for f in logger.filters):
                logger.addFilter(EscapeControlCharacters())
        tls = None if self.node.tls is None else server_context(
            self.node.tls, handshake_timeout=self.node.network_timeout_seconds)
        self.server = start_guarded_server(
            self.ae, (self.node.host, self.node.port), guard=self.guard,
            evt_handlers=self.handlers, ssl_context=tls, listen_socket=listen_socket,
            accept_share=accept_share)
        if listen_socket is None:
            LOG.info("listening as %s on %s:%d%s", self.node.ae_title, self.node.host,
                     self.node.port, "" if tls is None else " (DICOM TLS)")
        else:  # the node says "listening as" once every receiver process accepts
            LOG.debug("receiver process %d accepting on the shared socket%s", os.getpid(),
                      "" if tls is None else " (DICOM TLS)")

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0)."""
        if self.server is None:
            return self.node.port
        return int(self.server.server_address[1])

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting, close connections not yet associated, let associations finish
        for ``grace_seconds``, abort the rest; returns within a few seconds of that."""
        server = self.server
        if server is None:
            return
        server.stop(grace_seconds)
        self.server = None
        self.store.writer.stop()
        LOG.info("stopped listening")
