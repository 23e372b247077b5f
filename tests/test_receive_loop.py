"""The adaptation of pynetdicom's receive loop (dicomnode/receive/guard.py): PDUs read whole,
DUL and acceptor threads woken by events instead of polling with 1 ms sleeps. Real
associations to a guarded server; real sockets."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.receive.guard import (
    ConnectionGuard,
    GuardedAssociationServer,
    GuardLimits,
    _EventDUL,
    _GuardedSocket,
    start_guarded_server,
)

LIMITS = GuardLimits(association_request_timeout_seconds=5, network_timeout_seconds=10,
                     maximum_pending_connections=8, maximum_pending_connections_per_address=8,
                     maximum_associations=8, maximum_associations_per_address=8,
                     maximum_pdu_length=1 << 20)


def _server() -> GuardedAssociationServer:
    ae = AE(ae_title="LOOPSCP")
    ae.add_supported_context(Verification)
    return start_guarded_server(ae, ("127.0.0.1", 0), guard=ConnectionGuard(LIMITS),
                                evt_handlers=[(evt.EVT_C_ECHO, lambda event: 0x0000)])


def _associate(port: int) -> Any:
    ae = AE(ae_title="LOOPSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="LOOPSCP")
    assert assoc.is_established
    return assoc


def test_recv_reads_a_whole_pdu_and_what_came_before_a_close() -> None:
    left, right = socket.socketpair()
    try:
        guarded = _GuardedSocket.__new__(_GuardedSocket)
        guarded.socket = left
        body = bytes(range(256)) * 4096  # 1 MiB
        sender = threading.Thread(target=right.sendall, args=(body,))
        sender.start()
        assert guarded._recv_whole(len(body)) == body
        sender.join()
        right.sendall(b"abc")
        right.close()
        assert guarded._recv_whole(10) == b"abc"  # the peer closed: what arrived
    finally:
        left.close()


def test_the_scps_dul_is_event_driven_and_an_idle_association_barely_wakes() -> None:
    server = _server()
    try:
        assoc = _associate(int(server.server_address[1]))
        try:
            (theirs,) = server.guard.associated()
            dul = theirs.dul
            assert isinstance(dul, _EventDUL) and dul._run_loop_delay == 0
            passes = [0]
            original = dul._is_transport_event

            def counted() -> bool:
                passes[0] += 1
                return original()

            dul._is_transport_event = counted  # type: ignore[method-assign]
            time.sleep(1.0)
            # pynetdicom's loop makes ~1000 passes a second when idle (1 ms sleeps)
            assert passes[0] < 200, f"{passes[0]} reactor passes in 1 s while idle"
            # and it still answers at once
            started = time.perf_counter()
            for _ in range(20):
                assert int(assoc.send_c_echo().Status) == 0
            assert time.perf_counter() - started < 2.0
        finally:
            assoc.release()
    finally:
        server.stop(0)


def test_release_and_abort_still_end_an_event_driven_association() -> None:
    server = _server()
    try:
        port = int(server.server_address[1])
        released = _associate(port)
        released.release()
        aborted = _associate(port)
        aborted.abort()
        deadline = time.monotonic() + 5
        while server.guard.associated() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not server.guard.associated()
        assert released.is_released and aborted.is_aborted
    finally:
        server.stop(0)


def test_c_store_responses_from_preencoded_bytes_carry_every_field() -> None:
    """A Success goes out from :func:`encode_c_store_rsp`'s bytes, a failure with an Error
    Comment through pynetdicom: the sender decodes both with every required field."""
    from pydicom.dataset import Dataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

    from dicomnode.receive import guard

    sent: list[bytes] = []
    real = guard.encode_c_store_rsp

    def spy(**kwargs: Any) -> bytes:
        sent.append(encoded := real(**kwargs))
        return encoded

    def on_store(event: evt.Event) -> int | Dataset:
        if str(event.request.AffectedSOPInstanceUID).endswith(".2"):  # type: ignore[union-attr]
            status = Dataset()
            status.Status = 0xC001
            status.ErrorComment = "refused for the test"
            return status
        return 0x0000

    ae = AE(ae_title="LOOPSCP")
    ae.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    server = start_guarded_server(ae, ("127.0.0.1", 0), guard=ConnectionGuard(LIMITS),
                                  evt_handlers=[(evt.EVT_C_STORE, on_store)])
    guard.encode_c_store_rsp = spy  # type: ignore[assignment]
    try:
        scu = AE(ae_title="LOOPSCU")
        scu.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", server.server_address[1], ae_title="LOOPSCP")
        assert assoc.is_established
        statuses = []
        for suffix in (".1", ".2"):
            ds = Dataset()
            ds.SOPClassUID = CTImageStorage
            ds.SOPInstanceUID = generate_uid()[:60] + suffix
            ds.file_meta = Dataset()  # type: ignore[assignment]
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            status = assoc.send_c_store(ds)
            statuses.append((ds.SOPInstanceUID, status))
        assoc.release()
    finally:
        guard.encode_c_store_rsp = real  # type: ignore[assignment]
        server.stop(1.0)
    (uid1, ok), (uid2, failed) = statuses
    assert ok.Status == 0x0000
    assert failed.Status == 0xC001 and failed.ErrorComment == "refused for the test"
    assert len(sent) == 1  # only the Success was pre-encoded
    assert uid1.encode() in sent[0] and uid2.encode() not in sent[0]


def test_accept_share_lets_the_receiver_holding_fewest_accept_first() -> None:
    from dicomnode.receive.guard import (
        SHARED_ACCEPT_DEFER_SECONDS,
        SHARED_ACCEPT_TIE_SECONDS,
        AcceptShare,
    )

    counts = [0, 0, 0]
    first, second, third = (AcceptShare(counts, slot) for slot in range(3))
    assert first.wait_before_accept(0) == 0.0  # a tie: the lowest slot first
    assert second.wait_before_accept(0) == SHARED_ACCEPT_TIE_SECONDS
    assert third.wait_before_accept(0) == 2 * SHARED_ACCEPT_TIE_SECONDS
    first.publish(1)
    assert first.wait_before_accept(1) == SHARED_ACCEPT_DEFER_SECONDS  # others hold fewer
    assert second.wait_before_accept(0) == 0.0
    counts[:] = [2, 1, 3]
    assert second.wait_before_accept(1) == 0.0 and counts[1] == 1
    assert third.wait_before_accept(3) == SHARED_ACCEPT_DEFER_SECONDS
    try:
        AcceptShare(counts, 3)
    except ValueError as exc:
        assert "slot 3" in str(exc)
    else:
        raise AssertionError("a slot outside the receivers was accepted")
