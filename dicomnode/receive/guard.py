"""Limits on what a peer can hold of the SCP before and during association.

pynetdicom's acceptor has one limit, ``maximum_associations``, and it counts every open
TCP connection, associated or not; it reads a PDU of whatever length the peer declares,
and it reads with blocking sockets. So a few connections that send nothing (or one byte
now and then) block every other peer, a PDU header declaring 4 GB makes the node buffer
whatever follows, and a connection stalled inside a PDU can hold a thread for ever. This
module is the small adaptation that closes those holes, bound to pynetdicom through a
subclass of its threaded server (:class:`GuardedAssociationServer`), of its request
handler and of its association socket:

* **Before association** (from the TCP accept until the node accepts the
  A-ASSOCIATE-RQ) a connection is *pending*. Pending connections are counted apart from
  associations, in total and per source address; one beyond either limit is closed at
  once, before any byte is read and without a thread. A pending connection has
  ``association_request_timeout_seconds`` in all to get its request accepted (each read
  has the same timeout); then its socket is shut. The A-ASSOCIATE-RQ itself may be at
  most :data:`ASSOCIATE_RQ_MAX_LENGTH` bytes long.
* **Associations** are counted in total and per source address when the node is about
  to accept one (:meth:`ConnectionGuard.admit`, called from the SCP's ``EVT_REQUESTED``
  handler after the access policy); beyond a limit the request is refused with
  A-ASSOCIATE-RJ (transient, service provider, local limit exceeded).
* **PDU lengths**: once associated, a PDU may declare at most the maximum length the
  node announced (``node.maximum_pdu_size``, the limit of a P-DATA-TF PDU's variable
  field, PS3.8 9.3.1). A longer declaration is answered with A-ABORT (service provider,
  invalid PDU parameter value) and the connection is closed before its body is read.
* **Reads and writes** of an associated connection time out after
  ``network_timeout_seconds`` without progress, so a peer stalled inside a PDU cannot
  hold its thread for ever.
* **Stop** (:meth:`GuardedAssociationServer.stop`) closes pending connections at once,
  gives associations the grace time, then aborts the rest and closes their sockets: it
  returns within the grace time plus :data:`STOP_ABORT_SECONDS` plus
  :data:`STOP_JOIN_SECONDS`.

An association counts until it is released or aborted or its connection closes; a
pending connection until it is associated or closed (checked every
:data:`SWEEP_SECONDS`). Log lines name peers by
address only; connections closed at once, timed out or aborted are logged at once the
first time, then summarised at most once per :data:`REFUSAL_LOG_SECONDS`.
"""

from __future__ import annotations

import enum
import logging
import os
import queue
import select
import socket
import ssl
import threading
import time
import weakref
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pynetdicom import _handlers, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from .storersp import encode_c_store_rsp

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association

    from dicomnode.config import NodeConfig

__all__ = [
    "ASSOCIATE_RQ_MAX_LENGTH",
    "LOCAL_LIMIT_EXCEEDED",
    "AcceptShare",
    "ConnectionGuard",
    "ConnectionState",
    "GuardLimits",
    "GuardedAssociationServer",
    "start_guarded_server",
]

LOG = logging.getLogger(__name__)
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

#: Bytes an A-ASSOCIATE-RQ may declare (its variable field): 128 presentation contexts
#: with 30 transfer syntaxes each take about 110 KB.
ASSOCIATE_RQ_MAX_LENGTH = 256 * 1024
#: What a PDU may declare when ``node.maximum_pdu_size`` is 0 (the node announces no
#: limit): the largest value of the PDU length field.
UNLIMITED_PDU_LENGTH = 0xFFFFFFFF
#: How often the guard looks for pending connections past their deadline and for
#: connections whose thread has ended (seconds).
SWEEP_SECONDS = 0.2
#: After the grace time, how long aborted associations get to send their A-ABORT before
#: their sockets are closed (seconds).
STOP_ABORT_SECONDS = 1.0
#: How long :meth:`GuardedAssociationServer.stop` then waits for their threads (seconds).
STOP_JOIN_SECONDS = 2.0
#: A connection closed before association keeps its (idle) thread until the request
#: timeout; at most this many times ``maximum_pending_connections`` such threads.
LINGERING_FACTOR = 4
#: pynetdicom's DUL thread polls its socket, sleeping ``_run_loop_delay`` (1 ms) when
#: idle: 50 idle connections would take most of a CPU core. Until its association is
#: accepted, a connection's DUL sleeps this long instead (seconds); then pynetdicom's.
PENDING_LOOP_DELAY = 0.02
#: Connections closed by the guard are summarised in the log at most this often (seconds).
REFUSAL_LOG_SECONDS = 10.0
#: pynetdicom's own ``maximum_associations`` counts pending connections too: the guard
#: counts instead, so pynetdicom's limit is set out of reach.
_PYNETDICOM_MAXIMUM_ASSOCIATIONS = 1_000_000
#: A receiver process holding more connections than another waits this long before it
#: accepts from the shared socket (the other takes the connection first unless it is
#: stuck), seconds; receivers holding as many wait their slot number times
#: :data:`SHARED_ACCEPT_TIE_SECONDS` (the lowest slot first).
SHARED_ACCEPT_DEFER_SECONDS = 0.05
SHARED_ACCEPT_TIE_SECONDS = 0.005
#: The listen backlog: a burst of connections waits in it to be accepted (and refused).
LISTEN_BACKLOG = 128

#: A-ASSOCIATE-RJ result 2 (transient), source 3 (service provider, presentation related),
#: reason 2 (local limit exceeded): the refusal of an association beyond a limit.
LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
# DUL states once an A-ABORT is sent: idle, or awaiting the peer's close
_ABORTED = ("Sta1", "Sta13")
#: How often the accept loop checks whether it is to stop (seconds).
ACCEPT_POLL_SECONDS = 0.1
# A-ABORT: source 2 (service provider), reason 6 (invalid PDU parameter value)
_ABORT_SOURCE_PROVIDER = 0x02
_ABORT_INVALID_PDU_PARAMETER = 0x06


@dataclass(frozen=True)
class GuardLimits:
    """The guard's limits. Counts are connections, times seconds, lengths bytes.

    Raises:
        ValueError: a limit is not positive.
    """

    association_request_timeout_seconds: float
    network_timeout_seconds: float
    maximum_pending_connections: int
    maximum_pending_connections_per_address: int
    maximum_associations: int
    maximum_associations_per_address: int
    maximum_pdu_length: int  # 0: the node announces no limit

    def __post_init__(self) -> None:
        for name in ("association_request_timeout_seconds", "network_timeout_seconds",
                     "maximum_pending_connections", "maximum_pending_connections_per_address",
                     "maximum_associations", "maximum_associations_per_address"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)!r}")
        if self.maximum_pdu_length < 0:
            raise ValueError(
                f"maximum_pdu_length must be 0 (no limit) or positive, "
                f"not {self.maximum_pdu_length!r}")

    @classmethod
    def from_config(cls, node: NodeConfig) -> GuardLimits:
        return cls(
            association_request_timeout_seconds=node.association_request_timeout_seconds,
            network_timeout_seconds=node.network_timeout_seconds,
            maximum_pending_connections=node.maximum_pending_connections,
            maximum_pending_connections_per_address=node.maximum_pending_connections_per_address,
            maximum_associations=node.maximum_associations,
            maximum_associations_per_address=node.maximum_associations_per_address,
            maximum_pdu_length=node.maximum_pdu_size,
        )

    @property
    def associated_pdu_length(self) -> int:
        """What a PDU may declare once associated."""
        return self.maximum_pdu_length or UNLIMITED_PDU_LENGTH


class ConnectionState(enum.Enum):
    """Where a connection stands with the guard."""

    PENDING = "pending"  # connected; its association is not accepted (yet)
    ASSOCIATED = "associated"  # the node accepted its A-ASSOCIATE-RQ
    CLOSED = "closed"  # closed before association; its thread may still wait a little
    ENDED = "ended"  # the association was released or aborted


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection, as the guard tracks it."""

    address: str
    sock: socket.socket
    deadline: float  # time.monotonic() by which a pending connection must be associated
    state: ConnectionState = ConnectionState.PENDING
    assoc: Association | None = None
    loop_delay: float = 0.001  # pynetdicom's DUL loop delay, restored once associated

    @property
    def finished(self) -> bool:
        """Its association thread ran and ended."""
        return self.assoc is not None and self.assoc.ident is not None \
            and not self.assoc.is_alive()


class _SummaryLog:
    """Counts events per peer address and reason; logs the first at once, then at most one
    summary line per ``period`` seconds (a flood of connections makes no flood of lines)."""

    def __init__(self, what: str, period: float) -> None:
        self.what = what
        self.period = period
        self._counts: Counter[str] = Counter()
        self._last = -period
        self._lock = threading.Lock()

    def note(self, address: str, why: str, *, flush: bool = True) -> None:
        with self._lock:
            self._counts[f"{address} ({why})"] += 1
        if flush:
            self.flush()

    def flush(self) -> None:
        with self._lock:
            now = time.monotonic()
            if not self._counts or now - self._last < self.period:
                return
            counts, self._counts = self._counts, Counter()
            self._last = now
        LOG.warning("%s: %s", self.what,
                    ", ".join(f"{n} from {key}" for key, n in sorted(counts.items())))


class ConnectionGuard:
    """Counts pending connections and associations, per address and in total (thread-safe).

    Args:
        limits: the limits to enforce.
    """

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._connections: list[Connection] = []
        self._refusals = _SummaryLog(
            "closed at once, over the limits on connections not yet associated",
            REFUSAL_LOG_SECONDS)
        self._closures = _SummaryLog("connection(s) closed", REFUSAL_LOG_SECONDS)

    # ---------------------------------------------------------------- counting

    def _count(self, state: ConnectionState, address: str | None = None) -> int:
        return sum(1 for c in self._connections
                   if c.state is state and (address is None or c.address == address))

    def open(self, address: str, sock: socket.socket) -> Connection | None:
        """Record a new connection from ``address``; None when it is over a limit (the
        caller closes it at once)."""
        limits = self.limits
        with self._lock:
            if self._count(ConnectionState.PENDING) >= limits.maximum_pending_connections:
                why = f"{limits.maximum_pending_connections} pending in all"
            elif (self._count(ConnectionState.CLOSED)
                  >= LINGERING_FACTOR * limits.maximum_pending_connections):
                why = "too many closed connections whose threads still wait"
            elif (self._count(ConnectionState.PENDING, address)
                  >= limits.maximum_pending_connections_per_address):
                why = f"{limits.maximum_pending_connections_per_address} pending from it"
            else:
                conn = Connection(address, sock, time.monotonic()
                                  + limits.association_request_timeout_seconds)
                self._connections.append(conn)
                return conn
        self._refusals.note(address, why)
        return None

    def attach(self, conn: Connection, assoc: Association) -> None:
        with self._lock:
            conn.assoc = assoc
            conn.loop_delay = assoc.dul._run_loop_delay
            if conn.loop_delay > 0:  # a polling DUL (an _EventDUL waits, it never polls)
                assoc.dul._run_loop_delay = max(PENDING_LOOP_DELAY, conn.loop_delay)

    def connection(self, assoc: Association) -> Connection | None:
        with self._lock:
            for conn in self._connections:
                if conn.assoc is assoc:
                    return conn
        return None

    def admit(self, assoc: Association) -> str | None:
        """Count ``assoc`` as an association; None when admitted, else why not (for the
        log). Call it when the node is about to accept the A-ASSOCIATE-RQ."""
        limits = self.limits
        with self._lock:
            conn = next((c for c in self._connections if c.assoc is assoc), None)
            if conn is None or conn.state is not ConnectionState.PENDING:
                return "its connection is closed"
            if self._count(ConnectionState.ASSOCIATED) >= limits.maximum_associations:
                return f"already {limits.maximum_associations} association(s) open"
            if (self._count(ConnectionState.ASSOCIATED, conn.address)
                    >= limits.maximum_associations_per_address):
                return (f"already {limits.maximum_associations_per_address} association(s) "
                        f"open from this address")
            conn.state = ConnectionState.ASSOCIATED
        try:  # from now on, reads wait for the network timeout, not the request deadline
            conn.sock.settimeout(limits.network_timeout_seconds)
        except OSError:
            pass
        assoc.dul._run_loop_delay = conn.loop_delay
        return None

    def end(self, assoc: Association) -> None:
        """The association was released or aborted, or its connection closed: count it
        no more."""
        with self._lock:
            for conn in self._connections:
                if conn.assoc is assoc:
                    if conn.state is ConnectionState.ASSOCIATED:
                        conn.state = ConnectionState.ENDED
                    elif conn.state is ConnectionState.PENDING:
                        conn.state = ConnectionState.CLOSED

    def discard(self, conn: Connection) -> None:
        """Forget a connection whose association could not even be created."""
        with self._lock:
            conn.state = ConnectionState.ENDED
            if conn in self._connections:
                self._connections.remove(conn)

    def pdu_limit(self, conn: Connection) -> int:
        """What the next PDU on ``conn`` may declare (its variable field, bytes)."""
        if conn.state in (ConnectionState.ASSOCIATED, ConnectionState.ENDED):
            return self.limits.associated_pdu_length
        return ASSOCIATE_RQ_MAX_LENGTH

    # ---------------------------------------------------------------- housekeeping

    def sweep(self) -> None:
        """Close pending connections past their deadline; forget those whose thread ended.

        A connection closed before association no longer counts as pending, but its
        thread waits until the ACSE timeout (pynetdicom's acceptor waits that long for the
        request even after the peer left; it then does nothing): such connections are
        counted apart and limited to ``LINGERING_FACTOR`` times the pending limit.
        """
        now = time.monotonic()
        expired: list[Connection] = []
        with self._lock:
            self._connections = [c for c in self._connections if not c.finished]
            for conn in self._connections:
                if conn.state is ConnectionState.PENDING and now >= conn.deadline:
                    conn.state = ConnectionState.CLOSED
                    expired.append(conn)
        for conn in expired:
            self._closures.note(conn.address, f"no association accepted within "
                                f"{self.limits.association_request_timeout_seconds:g} s",
                                flush=False)
            _shut(conn.sock)
        self._refusals.flush()
        self._closures.flush()

    def associated(self) -> list[Association]:
        with self._lock:
            return [c.assoc for c in self._connections
                    if c.state is ConnectionState.ASSOCIATED and c.assoc is not None]

    def live(self) -> list[Connection]:
        """Connections whose association thread has not ended."""
        with self._lock:
            return [c for c in self._connections if not c.finished]

    def close_pending(self) -> int:
        """Shut the sockets of every pending connection; returns how many."""
        with self._lock:
            closing = [c for c in self._connections if c.state is ConnectionState.PENDING]
            for conn in closing:
                conn.state = ConnectionState.CLOSED
        for conn in closing:
            _shut(conn.sock)
        return len(closing)

    def timed_out(self, conn: Connection) -> None:
        """A read inside a PDU timed out: close the connection."""
        with self._lock:
            if conn.state is ConnectionState.PENDING:
                conn.state = ConnectionState.CLOSED
        timeout = conn.sock.gettimeout()
        self._closures.note(conn.address, f"no data for {timeout or 0:g} s inside a PDU")
        _shut(conn.sock)

    def oversized(self, conn: Connection, declared: int, limit: int) -> None:
        """A PDU declared more than ``limit`` bytes: A-ABORT, then close the socket."""
        with self._lock:
            associated = conn.state is ConnectionState.ASSOCIATED
            if conn.state is ConnectionState.PENDING:
                conn.state = ConnectionState.CLOSED
        self._closures.note(conn.address, f"aborted: a PDU declared {declared} bytes, more "
                            f"than the {limit} allowed "
                            f"{'once associated' if associated else 'before association'}")
        abort = A_ABORT_RQ()
        abort.source = _ABORT_SOURCE_PROVIDER
        abort.reason_diagnostic = _ABORT_INVALID_PDU_PARAMETER
        try:
            conn.sock.settimeout(1.0)
            conn.sock.sendall(abort.encode())
        except OSError:
            pass
        _shut(conn.sock)


def _shut(sock: socket.socket) -> None:
    """Shut a socket down both ways: a read or write blocked on it returns at once."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class _GuardedSocket(AssociationSocket):
    """pynetdicom's association socket, refusing to read a PDU longer than allowed.

    pynetdicom's DUL reads a PDU as ``recv(6)`` (type and length) then
    ``recv(length)``: a read longer than the guard's limit is the body of an oversized
    PDU. Returning nothing makes the DUL treat the connection as closed (Evt17); so does
    a read that times out (logged in one line here).
    """

    guard: ConnectionGuard
    connection: Connection

    def recv(self, nr_bytes: int) -> bytearray:
        limit = self.guard.pdu_limit(self.connection)
        if nr_bytes > limit:
            self.guard.oversized(self.connection, nr_bytes, limit)
            return bytearray()
        try:
            return self._recv_whole(nr_bytes)
        except TimeoutError:  # one log line, not pynetdicom's traceback
            self.guard.timed_out(self.connection)
            return bytearray()

    def _recv_whole(self, nr_bytes: int) -> bytearray:
        """pynetdicom's ``recv`` (all ``nr_bytes``, or what came before the peer closed),
        read straight into one buffer as the kernel delivers it instead of in pieces of
        at most 4096 bytes, each copied onto the last (about 40 system calls and 40
        copies for a 160 KB P-DATA-TF PDU)."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        while read < nr_bytes:
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:  # closed by the peer: what was read so far (pynetdicom's Evt17)
                del view
                del buffer[read:]
                return buffer
            read += got
        return buffer


#: How long an idle DUL thread waits for its socket or a primitive to send before it
#: looks at its ARTIM timer and kill flag again (seconds).
DUL_WAIT_SECONDS = 0.02
#: How long an idle association thread waits for a DIMSE message before it looks for a
#: release or abort again (seconds).
DIMSE_WAIT_SECONDS = 0.005


class _EventDUL(DULServiceProvider):
    """pynetdicom's DUL provider, woken by events instead of polling with sleeps.

    pynetdicom's reactor loop (``run_reactor``) checks its queue of primitives to send,
    then its socket with a zero-timeout ``select``, and sleeps ``_run_loop_delay``
    (1 ms) whenever a pass found nothing: each P-DATA-TF PDU and each response can wait
    up to a sleep, and an idle association wakes 1000 times a second. Here the loop
    delay is 0 and the loop blocks, when nothing is queued, in one ``select`` on its
    socket and on a wake-up pipe that :meth:`send_pdu`, :meth:`kill_dul` and
    :meth:`stop_dul` write to: a PDU is read as soon as its first byte arrives, a
    primitive is sent as soon as it is queued. The ARTIM timer and the kill flag are
    looked at every :data:`DUL_WAIT_SECONDS` at least. pynetdicom's loop itself is
    unchanged (the class of the DUL an association made is swapped, see
    :meth:`GuardedRequestHandler._create_association`).
    """

    _wake_r: int
    _wake_w: int

    def arm(self) -> None:
        """Make the wake-up pipe (closed when the provider is collected) and stop polling."""
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._run_loop_delay = 0.0

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full (a wake-up is pending anyway) or closed
            pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
            self.join()
            return True
        return False

    def _is_transport_event(self) -> bool:
        self._wait()
        return bool(super()._is_transport_event())

    def _wait(self) -> None:
        """Block until the socket is readable, a wake-up is written or the wait ends."""
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass
        if self._kill_thread or self.to_provider_queue.qsize() or self.event_queue.qsize():
            return
        fds: list[Any] = [self._wake_r]
        sock = self.socket.socket if self.socket is not None else None
        if sock is not None and sock.fileno() >= 0:
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return  # decrypted bytes already buffered: select() would not see them
            fds.append(sock)
        try:
            select.select(fds, [], [], DUL_WAIT_SECONDS)
        except (OSError, ValueError):  # closed meanwhile: pynetdicom's check reports it
            pass


def _close_fds(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class _WaitingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider whose non-blocking ``get_msg`` waits a little.

    The acceptor's reactor (``Association._run_reactor``) sleeps 1 ms, then takes a
    message with ``get_msg(block=False)``, in a loop: each C-STORE request waits for the
    next pass. Here that call waits up to :data:`DIMSE_WAIT_SECONDS` for a message, so
    a request is served as soon as it is decoded (a release or abort is seen at most
    that much later). Blocking calls are pynetdicom's. C-STORE responses go out from bytes
    encoded without a Dataset (:meth:`send_msg`, :mod:`dicomnode.receive.storersp`).
    """

    def get_msg(self, block: bool = False) -> Any:
        if block:
            return super().get_msg(block=True)
        try:
            return self.msg_queue.get(timeout=DIMSE_WAIT_SECONDS)
        except queue.Empty:
            return None, None

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a C-STORE response of the required elements only from bytes encoded by
        :func:`~dicomnode.receive.storersp.encode_c_store_rsp` (the same bytes as
        pynetdicom's encoding, in one P-DATA-TF, without building a Dataset); anything
        else, or when someone listens to ``EVT_DIMSE_SENT`` (beyond pynetdicom's own
        debug log while it is off), as pynetdicom does."""
        encoded = self._fast_c_store_rsp(primitive)
        if encoded is None or (self.maximum_pdu_size
                               and len(encoded) + 6 > self.maximum_pdu_size):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        # message control header: a command fragment (bit 0), the last one (bit 1)
        pdata.presentation_data_value_list.append((context_id, b"\x03" + encoded))
        self.dul.send_pdu(pdata)

    def _fast_c_store_rsp(self, primitive: Any) -> bytes | None:
        if (type(primitive) is not C_STORE or primitive.MessageIDBeingRespondedTo is None
                or primitive.ErrorComment is not None
                or primitive.OffendingElement is not None
                or primitive.Status is None or primitive.AffectedSOPClassUID is None
                or primitive.AffectedSOPInstanceUID is None):
            return None
        bound: list[tuple[Any, Any]] = list(
            self.assoc.get_handlers(evt.EVT_DIMSE_SENT))  # type: ignore[arg-type]
        for handler, _args in bound:
            if handler is not _handlers.standard_dimse_sent_handler or \
                    _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG):
                return None
        try:
            return encode_c_store_rsp(
                affected_sop_class_uid=str(primitive.AffectedSOPClassUID),
                affected_sop_instance_uid=str(primitive.AffectedSOPInstanceUID),
                message_id_being_responded_to=int(primitive.MessageIDBeingRespondedTo),
                status=int(primitive.Status))
        except ValueError:
            return None


class _SharedContexts(list[Any]):
    """The server's supported presentation contexts, copied shallowly for each connection.

    pynetdicom deep-copies them for every new connection, before reading a byte: with
    every storage SOP class and transfer syntax that is about 40 ms of CPU (holding the
    GIL), so a burst of connections would slow every association. Negotiation only reads
    them (``presentation.negotiate_as_acceptor`` makes new result contexts)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


@dataclass
class AcceptShare:
    """How receiver processes sharing one listening socket share its connections.

    Every receiver is woken for each new connection; the first to ``accept()`` gets it.
    Each publishes how many connections it holds in ``counts`` (shared memory, one slot
    per receiver: e.g. a :func:`multiprocessing.Array` of ``"i"``), and before accepting
    waits :meth:`wait_before_accept`: so the receiver holding the fewest takes the next
    association, whichever the scheduler happens to run first. A stale count (a
    receiver publishes on accepting and every :data:`SWEEP_SECONDS`) only delays an
    accept by at most :data:`SHARED_ACCEPT_DEFER_SECONDS`.
    """

    counts: Any  # a shared sequence of int, one per receiver
    slot: int  # this receiver's index in ``counts``

    def __post_init__(self) -> None:
        if not 0 <= self.slot < len(self.counts):
            raise ValueError(f"slot {self.slot} is outside the {len(self.counts)} receivers")

    def publish(self, held: int) -> None:
        """Say that this receiver holds ``held`` connections."""
        self.counts[self.slot] = held

    def wait_before_accept(self, held: int) -> float:
        """Seconds to wait before accepting, holding ``held`` connections (published)."""
        self.publish(held)
        others = {i: int(c) for i, c in enumerate(self.counts[:]) if i != self.slot}
        fewest = min(others.values(), default=held)
        if held > fewest:
            return SHARED_ACCEPT_DEFER_SECONDS
        if held == fewest:  # a tie: the lower slots first
            ahead = sum(1 for i, c in others.items() if i < self.slot and c == held)
            return ahead * SHARED_ACCEPT_TIE_SECONDS
        return 0.0


class GuardedRequestHandler(RequestHandler):
    """pynetdicom's request handler, binding the new association to its guarded connection."""

    server: GuardedAssociationServer

    def __init__(self, request: socket.socket, client_address: Any,
                 server: GuardedAssociationServer, connection: Connection) -> None:
        self.connection = connection
        super().__init__(request, client_address, server)

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        sock = assoc.dul.socket
        assert sock is not None
        # AssociationSocket's constructor queues the transport event (Evt5) of the new
        # connection, so a second socket object cannot be made for it: the one pynetdicom
        # made becomes a _GuardedSocket, which only overrides recv().
        sock.__class__ = _GuardedSocket
        guarded: _GuardedSocket = sock  # type: ignore[assignment]
        guarded.guard = self.server.guard
        guarded.connection = self.connection
        # the same for its DUL and DIMSE providers: woken by events, not polling (their
        # threads start with the association, after this returns)
        assoc.dul.__class__ = _EventDUL
        dul: _EventDUL = assoc.dul  # type: ignore[assignment]
        dul.arm()
        assoc.dimse.__class__ = _WaitingDIMSE
        self.server.guard.attach(self.connection, assoc)
        return assoc


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the guard's limits (module docstring).

    Made by :func:`start_guarded_server`; extra keyword argument of pynetdicom's
    ``make_server``: ``guard``.
    """

    request_queue_size = LISTEN_BACKLOG

    def __init__(self, ae: AE, address: Any, ae_title: str, contexts: Any,
                 ssl_context: Any = None, evt_handlers: list[Any] | None = None, *,
                 guard: ConnectionGuard, listen_socket: socket.socket | None = None,
                 accept_share: AcceptShare | None = None) -> None:
        self.guard = guard
        self._listen_socket = listen_socket
        self.accept_share = accept_share
        super().__init__(ae, address, ae_title, contexts, ssl_context,
                         evt_handlers=evt_handlers, request_handler=GuardedRequestHandler)
        self.contexts = _SharedContexts(self.contexts)
        # after the caller's handlers: admits what they did not refuse nor admit themselves
        self.bind(evt.EVT_REQUESTED, self._on_requested)
        self.bind(evt.EVT_RELEASED, self._on_ended)
        self.bind(evt.EVT_ABORTED, self._on_ended)
        self.bind(evt.EVT_CONN_CLOSE, self._on_ended)
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_forever, name="dicom-guard",
                                         daemon=True)
        self._sweeper.start()

    def _on_requested(self, event: evt.Event) -> None:
        """Count the association unless a handler bound before refused or admitted it
        (the SCP admits after its access policy, to refuse in its own words)."""
        assoc = event.assoc
        conn = self.guard.connection(assoc)
        if (assoc.is_rejected or assoc.is_aborted or conn is None
                or conn.state is not ConnectionState.PENDING):
            return
        why = self.guard.admit(assoc)
        if why is not None:
            LOG.warning("association from %s refused: %s", conn.address, why)
            assoc.acse.send_reject(*LOCAL_LIMIT_EXCEEDED)
            assoc.kill()

    def _on_ended(self, event: evt.Event) -> None:
        self.guard.end(event.assoc)

    def _sweep_forever(self) -> None:
        while not self._stopping.wait(SWEEP_SECONDS):
            try:
                self.guard.sweep()
                if self.accept_share is not None:
                    self.accept_share.publish(len(self.guard.live()))
            except Exception as exc:  # never let the sweeper die
                LOG.error("connection guard: %s", type(exc).__name__)

    # ---------------------------------------------------------------- accepting

    def server_bind(self) -> None:
        """pynetdicom's bind, or, given ``listen_socket`` (bound, listening and
        non-blocking, shared with other receiver processes), that socket instead."""
        if self._listen_socket is None:
            super().server_bind()
            return
        assert self.socket is not None
        self.socket.close()
        self.socket = self._listen_socket
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self._listen_socket is None:
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        """Accept a connection; with TLS, wrap it without the handshake, which runs in the
        connection's own thread (a peer that never completes it cannot stall accepting)."""
        assert self.socket is not None
        share = self.accept_share
        if share is not None:
            held = len(self.guard.live())
            wait = share.wait_before_accept(held)
            if wait:
                time.sleep(wait)
        client, address = self.socket.accept()  # BlockingIOError: another took it
        if share is not None:
            share.publish(held + 1)
        client.settimeout(self.guard.limits.association_request_timeout_seconds)
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True,
                                                  do_handshake_on_connect=False)
        return client, address

    def process_request(self, request: Any, client_address: Any) -> None:
        """Close the connection at once when over a limit, else serve it in a new thread."""
        address = str(client_address[0])
        conn = self.guard.open(address, request)
        if conn is None:
            self.shutdown_request(request)
            return
        timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        threading.Thread(target=self._serve_connection, args=(request, client_address, conn),
                         name=f"ConnectionThread@{timestamp}", daemon=True).start()

    def _serve_connection(self, request: socket.socket, client_address: Any,
                          conn: Connection) -> None:
        try:
            if isinstance(request, ssl.SSLSocket):
                request.do_handshake()
            GuardedRequestHandler(request, client_address, self, conn)
        except Exception as exc:
            if conn.assoc is None or conn.assoc.ident is None:
                self.guard.discard(conn)
            # a TLS failure says why (e.g. CERTIFICATE_VERIFY_FAILED): no peer value in it
            reason = getattr(exc, "reason", None) if isinstance(exc, ssl.SSLError) else None
            LOG.warning("connection from %s closed before association: %s%s",
                        conn.address, type(exc).__name__,
                        f" ({reason})" if isinstance(reason, str) else "")
            self.shutdown_request(request)

    # ---------------------------------------------------------------- stopping

    def stop(self, grace_seconds: float) -> int:
        """Stop accepting; close pending connections at once; let associations finish for
        ``grace_seconds``, then abort the rest. Returns how many were aborted.

        Returns within ``grace_seconds + STOP_ABORT_SECONDS + STOP_JOIN_SECONDS`` (plus
        :data:`ACCEPT_POLL_SECONDS`), whatever the peers do.
        """
        self.shutdown()  # pynetdicom: stops the accept loop and closes the listening socket
        self.guard.close_pending()
        deadline = time.monotonic() + grace_seconds
        while self.guard.associated() and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = self.guard.associated()
        if remaining:
            LOG.warning("aborting %d association(s) still open after %g s",
                        len(remaining), grace_seconds)
            for assoc in remaining:
                assoc.abort(block=False)  # queues the A-ABORT; the DUL thread sends it
            # the A-ABORT is out once the DUL is idle again (or waits for the peer to close)
            deadline = time.monotonic() + STOP_ABORT_SECONDS
            while time.monotonic() < deadline and any(
                    a.dul.is_alive() and a.dul.state_machine.current_state not in _ABORTED
                    for a in remaining):
                time.sleep(0.02)
        # whatever is left (a peer that reads nothing, a read stalled inside a PDU): shut
        # the sockets so that blocked reads and writes return, and end the DUL threads
        # (not daemon threads: they would hold the process at exit)
        live = self.guard.live()
        for conn in live:
            _shut(conn.sock)
            if conn.assoc is not None:
                conn.assoc.dul.kill_dul()
        deadline = time.monotonic() + STOP_JOIN_SECONDS
        for assoc in [c.assoc for c in live if c.assoc is not None]:
            if assoc.dul.ident is not None:
                assoc.dul.join(max(0.0, deadline - time.monotonic()))
            # an association's thread may be in a handler (a C-STORE being written);
            # the thread of a connection never associated only waits: it is a daemon
            if assoc in remaining and assoc.ident is not None:
                assoc.join(max(0.0, deadline - time.monotonic()))
        self._stopping.set()
        self.guard.sweep()
        return len(remaining)


def start_guarded_server(ae: AE, address: tuple[str, int], *, guard: ConnectionGuard,
                         evt_handlers: list[Any], ssl_context: Any = None,
                         listen_socket: socket.socket | None = None,
                         accept_share: AcceptShare | None = None,
                         ) -> GuardedAssociationServer:
    """Start ``ae`` listening on ``address`` behind ``guard`` (as pynetdicom's
    ``AE.start_server(block=False)``), after setting the AE's ACSE timeout to the request
    timeout and its own association limit out of reach (the guard counts instead)."""
    ae.acse_timeout = guard.limits.association_request_timeout_seconds
    ae.maximum_associations = _PYNETDICOM_MAXIMUM_ASSOCIATIONS
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedAssociationServer, guard=guard,
                            listen_socket=listen_socket, accept_share=accept_share)
    assert isinstance(server, GuardedAssociationServer)
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    threading.Thread(target=server.serve_forever, args=(ACCEPT_POLL_SECONDS,),
                     name=f"AcceptorServer@{timestamp}", daemon=True).start()
    ae._servers.append(server)
    if guard.limits.maximum_pdu_length == 0:
        LOG.warning("node.maximum_pdu_size is 0 (no limit): an associated peer may send "
                    "PDUs of any length, each read into memory whole")
    return server
