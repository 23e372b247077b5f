"""Hostile and broken peers on the network side: connections that send nothing or trickle,
oversized PDUs, a flooded console, a stop with abandoned connections, kill -9 during
start-up. Real `dicomnode serve` processes, real sockets on loopback (other peers connect
from 127.0.0.x source addresses), a bounded number of connections and bounded times."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import NodeFactory, RunningNode, write_model_card
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.receive.guard import ConnectionGuard, GuardLimits, start_guarded_server

# an A-ASSOCIATE-RQ header (type 0x01) declaring a 200-byte body; bytes trickle after it
_RQ_HEADER = b"\x01\x00" + (200).to_bytes(4, "big")


def _connect(port: int, source: str, *, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                    source_address=(source, 0))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether the node closes ``sock`` within ``timeout`` seconds (data it sends, such
    as an A-ABORT, is read and skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for process {pid}")


def _echo_ae(aet: str = "TESTSCU") -> AE:
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    ae.acse_timeout = 5
    ae.network_timeout = 10
    return ae


def _associate(ae: AE, port: int, source: str = "127.0.0.1") -> Association:
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE", bind_address=(source, 0))


def _echo_seconds(assoc: Association) -> float:
    start = time.monotonic()
    status = assoc.send_c_echo()
    elapsed = time.monotonic() - start
    assert status is not None and int(status.Status) == 0
    return elapsed


class _Trickler(threading.Thread):
    """Sends one byte of an A-ASSOCIATE-RQ header to each socket every ``period`` s."""

    def __init__(self, socks: list[socket.socket], period: float) -> None:
        super().__init__(daemon=True)
        self.socks = socks
        self.period = period
        self.stop = threading.Event()

    def run(self) -> None:
        data = _RQ_HEADER + b"\x00" * 200
        sent = 0
        while not self.stop.wait(self.period) and sent < len(data):
            for sock in self.socks:
                try:
                    sock.send(data[sent:sent + 1])
                except OSError:
                    pass
            sent += 1


@contextmanager
def _closing(socks: list[socket.socket]) -> Iterator[list[socket.socket]]:
    try:
        yield socks
    finally:
        for sock in socks:
            sock.close()


# ------------------------------------------------------------------ before association


@pytest.mark.slow
def test_idle_trickling_and_malformed_connections_block_no_peer(
        node_factory: NodeFactory) -> None:
    """50 connections that send nothing, trickle a byte now and then, or send a truncated
    A-ASSOCIATE-RQ: a configured peer still associates and its C-ECHO answers within 1 s,
    and the node closes all 50 once the request timeout has passed."""
    node = node_factory(node={"association_request_timeout_seconds": 2.0})
    ae = _echo_ae()
    before = _associate(ae, node.port)  # an association opened before the flood
    assert before.is_established
    junk: list[socket.socket] = []
    with _closing(junk):
        for i in range(50):  # 5 connections from each of 10 other loopback addresses
            junk.append(_connect(node.port, f"127.0.0.{2 + i // 5}"))
        idle, trickling, malformed = junk[:20], junk[20:35], junk[35:]
        for sock in malformed:  # 193 bytes of a request declaring 4,096
            sock.sendall(b"\x01\x00" + (4096).to_bytes(4, "big") + b"\x00\x01" + b"\x00" * 185)
        trickler = _Trickler(trickling, 0.5)
        trickler.start()
        time.sleep(0.5)  # every connection accepted by the node

        assert _echo_seconds(before) < 1.0
        start = time.monotonic()
        during = _associate(ae, node.port)
        assert during.is_established, "a configured peer must associate during the flood"
        assert _echo_seconds(during) < 1.0
        assert time.monotonic() - start < 2.0
        during.release()

        # all 50 are closed by the node once the 2 s request timeout has passed
        open_after = [s for s in idle + trickling + malformed if not _closed_by_peer(s, 4.0)]
        trickler.stop.set()
        assert not open_after, f"{len(open_after)} of 50 connections still open"
    assert _echo_seconds(before) < 1.0
    before.release()
    log = node.log()
    assert "connection(s) closed: " in log
    assert "no association accepted within 2 s" in log or "no data for 2 s inside a PDU" in log


@pytest.mark.slow
def test_connections_beyond_the_pending_limits_are_closed_at_once(
        node_factory: NodeFactory) -> None:
    node = node_factory(node={"maximum_pending_connections": 5,
                              "maximum_pending_connections_per_address": 3,
                              "association_request_timeout_seconds": 10.0})
    socks: list[socket.socket] = []
    with _closing(socks):
        socks += [_connect(node.port, "127.0.0.3") for _ in range(3)]
        time.sleep(0.3)
        fourth = _connect(node.port, "127.0.0.3")  # over the per-address limit
        socks.append(fourth)
        assert _closed_by_peer(fourth, 1.0), "a 4th pending connection from one address"
        socks += [_connect(node.port, "127.0.0.4") for _ in range(2)]
        time.sleep(0.3)
        sixth = _connect(node.port, "127.0.0.5")  # over the total limit
        socks.append(sixth)
        assert _closed_by_peer(sixth, 1.0), "a 6th pending connection in all"
        for sock in socks[:3] + socks[4:6]:  # the first five stay open (10 s timeout)
            assert not _closed_by_peer(sock, 0.2)
        # a configured peer is refused at the TCP level too while the limit is reached ...
        for sock in socks[:3] + socks[4:6]:
            sock.close()
        time.sleep(0.6)  # ... but not once those connections are gone
        assoc = _associate(_echo_ae(), node.port)
        assert assoc.is_established
        assoc.release()
    assert "closed at once, over the limits on connections not yet associated" in node.log()


def test_associations_are_limited_per_address_and_in_all(node_factory: NodeFactory) -> None:
    node = node_factory(node={"maximum_associations": 3, "maximum_associations_per_address": 2},
                        peers={"anyscu": {"ae_title": "ANYSCU"}})
    testscu, anyscu = _echo_ae("TESTSCU"), _echo_ae("ANYSCU")
    first, second = _associate(testscu, node.port), _associate(testscu, node.port)
    assert first.is_established and second.is_established
    start = time.monotonic()
    third = _associate(testscu, node.port)
    assert third.is_rejected, "a 3rd association from one address"
    assert time.monotonic() - start < 1.0
    rj = third.acceptor.primitive
    assert rj is not None
    assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    other = _associate(anyscu, node.port, "127.0.0.2")
    assert other.is_established
    fourth = _associate(anyscu, node.port, "127.0.0.3")
    assert fourth.is_rejected, "a 4th association in all"
    first.release()
    again = _associate(testscu, node.port)  # the released slot is free at once
    assert again.is_established
    for assoc in (second, other, again):
        assert _echo_seconds(assoc) < 1.0
        assoc.release()
    log = node.log()
    assert "open from this address" in log and "already 3 association(s) open" in log


# ------------------------------------------------------------------ PDU lengths


def _stream(sock: socket.socket, header: bytes, total: int) -> int:
    """Send ``header`` then zeros, up to ``total`` bytes; returns how many were sent
    before the node closed the connection (``total`` when it never did)."""
    chunk = b"\x00" * 65536
    sent = 0
    sock.settimeout(10)
    try:
        sock.sendall(header)
        while sent < total:
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError):
        return sent
    return total


def test_a_4_gb_pdu_before_association_is_refused_without_reading_it(
        node_factory: NodeFactory) -> None:
    node = node_factory()
    assert node.proc is not None
    rss_before = _rss_bytes(node.proc.pid)
    total = 64 * 1024 * 1024
    with _closing([_connect(node.port, "127.0.0.2")]) as (sock,):
        start = time.monotonic()
        sent = _stream(sock, b"\x01\x00\xff\xff\xff\xff", total)
        elapsed = time.monotonic() - start
        growth = _rss_bytes(node.proc.pid) - rss_before  # while the peer is still connected
    assert sent < total, "the node read 64 MiB of a PDU declaring 4 GB"
    assert elapsed < 5.0
    assert growth < 20 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MiB"
    assert "declared 4294967295 bytes, more than the 262144 allowed before association" \
        in node.log()
    assoc = _associate(_echo_ae(), node.port)  # the node keeps serving
    assert _echo_seconds(assoc) < 1.0
    assoc.release()


@pytest.mark.slow
def test_a_pdu_longer_than_the_announced_maximum_aborts_the_association(
        node_factory: NodeFactory) -> None:
    node = node_factory(node={"maximum_pdu_size": 16384})
    assert node.proc is not None
    ae = _echo_ae()
    rss_before = _rss_bytes(node.proc.pid)
    total = 64 * 1024 * 1024
    for declared in (0xFFFFFFFF, 16385):
        assoc = _associate(ae, node.port)
        assert assoc.is_established
        assert assoc.acceptor.maximum_length == 16384
        raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        assert raw is not None
        # a P-DATA-TF header declaring more than the node announced, then its "body"
        sent = _stream(raw, b"\x04\x00" + declared.to_bytes(4, "big"), total)
        growth = _rss_bytes(node.proc.pid) - rss_before
        assert growth < 20 * 1024 * 1024, f"RSS grew by {growth / 2**20:.0f} MiB"
        assert sent < total, f"the node read 64 MiB of a PDU declaring {declared} bytes"
        deadline = time.monotonic() + 5
        while assoc.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not assoc.is_established
    # the first is logged at once (the next ones are summarised every 10 s)
    assert "declared 4294967295 bytes, more than the 16384 allowed once associated" in node.log()
    # a sender that keeps to the announced maximum is served
    ok = _associate(ae, node.port)
    assert _echo_seconds(ok) < 1.0
    ok.release()


@pytest.mark.slow
def test_a_peer_stalled_inside_a_pdu_is_cut_off_after_the_network_timeout(
        node_factory: NodeFactory) -> None:
    node = node_factory(node={"network_timeout_seconds": 2.0})
    assoc = _associate(_echo_ae(), node.port)
    assert assoc.is_established
    raw = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    assert raw is not None
    raw.sendall(b"\x04\x00" + (1000).to_bytes(4, "big") + b"\x00" * 10)  # then nothing
    deadline = time.monotonic() + 6
    while assoc.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not assoc.is_alive(), "the node still holds an association stalled mid-PDU"
    again = _associate(_echo_ae(), node.port)
    assert _echo_seconds(again) < 1.0
    again.release()


# ------------------------------------------------------------------ console


def _start_with(node: RunningNode, *, env: dict[str, str] | None = None,
                nofile: int | None = None, wait: bool = True) -> subprocess.Popen[bytes]:
    """Start ``node`` like RunningNode.start, with an environment or a lower fd limit."""

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    log = node.log_path.open("ab")
    node.proc = subprocess.Popen(
        [sys.executable, "-m", "dicomnode", "serve", "--config", str(node.config_path)],
        stdout=log, stderr=subprocess.STDOUT, cwd=node.config_path.parent,
        env=env, preexec_fn=limit)
    if wait:
        deadline = time.monotonic() + 30
        while "listening as" not in node.log():
            assert node.proc.poll() is None, node.log()
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.05)
    return node.proc


@pytest.mark.slow
def test_a_flooded_console_starves_neither_dicom_nor_itself(node_factory: NodeFactory) -> None:
    """With 128 file descriptors, 150 idle console connections: C-ECHO still answers,
    the console answers 503 beyond its limit, and idle connections are closed."""
    node = node_factory(start=False, web={"port": 0, "maximum_connections": 8,
                                          "request_timeout_seconds": 1.0})
    proc = _start_with(node, nofile=128)
    base = node.console_url()
    host, port = base.removeprefix("http://").rsplit(":", 1)
    in_use = len(os.listdir(f"/proc/{proc.pid}/fd"))
    assert in_use < 60, f"the node already uses {in_use} file descriptors"
    flood: list[socket.socket] = []
    with _closing(flood):
        for _ in range(150):
            try:
                flood.append(socket.create_connection((host, int(port)), timeout=5))
            except OSError:
                break
        time.sleep(0.5)
        assoc = _associate(_echo_ae(), node.port)
        assert assoc.is_established, "DICOM receiving starved by console connections"
        assert _echo_seconds(assoc) < 1.0
        assoc.release()
        assert len(os.listdir(f"/proc/{proc.pid}/fd")) < in_use + 40
        refused = [s for s in flood[8:] if _closed_by_peer(s, 0.5)]
        assert len(refused) >= 100, "connections beyond the console's limit are closed at once"
        # the 8 it serves are idle: closed after the 1 s request timeout
        assert all(_closed_by_peer(s, 3.0) for s in flood[:8])
    with urllib.request.urlopen(f"{base}/healthz", timeout=5) as reply:
        assert reply.status == 200
    assert "console: closed at once" in node.log()


# ------------------------------------------------------------------ stopping


@pytest.mark.slow
def test_sigterm_with_abandoned_connections_exits_within_the_grace_time(
        node_factory: NodeFactory) -> None:
    grace = 2.0
    node = node_factory(node={"shutdown_grace_seconds": grace,
                              "association_request_timeout_seconds": 30.0})
    ae = _echo_ae()
    idle = [_associate(ae, node.port) for _ in range(3)]  # associated, then nothing
    stalled = _associate(ae, node.port)  # associated, stalled inside a PDU
    raw = stalled.dul.socket.socket if stalled.dul.socket is not None else None
    assert raw is not None
    raw.sendall(b"\x04\x00" + (100_000).to_bytes(4, "big") + b"\x00" * 100)
    junk: list[socket.socket] = []
    with _closing(junk):
        for i in range(10):  # connections that never send a request
            junk.append(_connect(node.port, f"127.0.0.{2 + i // 5}"))
        for _ in range(4):  # truncated requests
            sock = _connect(node.port, "127.0.0.9")
            sock.sendall(_RQ_HEADER + b"\x00" * 20)
            junk.append(sock)
        time.sleep(0.5)
        assert all(a.is_established for a in idle)
        assert node.proc is not None
        start = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        try:
            node.proc.wait(grace + 15)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the node did not exit within {grace + 15} s of SIGTERM")
        elapsed = time.monotonic() - start
        node.proc = None
    assert elapsed < grace + 4.0, f"stop took {elapsed:.1f} s with a grace time of {grace} s"
    assert "aborting 4 association(s) still open after 2 s" in node.log()
    for assoc in [*idle, stalled]:
        assoc.abort()


# ------------------------------------------------------------------ worker processes


def _tagged(tag: str) -> list[int]:
    """Processes whose environment holds ``tag`` (the node's children inherit it)."""
    found = []
    needle = f"DICOMNODE_TEST_TAG={tag}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.2, 0.7, 1.5])
def test_kill_9_during_start_up_leaves_no_worker(node_factory: NodeFactory, tmp_path: Path,
                                                 delay: float) -> None:
    """kill -9 of `dicomnode serve` while its worker processes spawn and load: none is
    left running a few seconds later."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "main.yaml").write_text(
        "rules:\n  - name: ct\n    select: SELECT study WHERE series NAMED \"ct\" HAS "
        "Modality = \"CT\"\n    model: body\n")
    write_model_card(tmp_path / "models" / "body", [("ct", "CT")])
    node = node_factory(start=False, rules_dir=str(rules), models_dir=str(tmp_path / "models"),
                        pipeline={"workers": 2})
    tag = uuid.uuid4().hex
    proc = _start_with(node, env={**os.environ, "DICOMNODE_TEST_TAG": tag})
    try:
        time.sleep(delay)
        children = [pid for pid in _tagged(tag) if pid != proc.pid]
        proc.kill()
        proc.wait(10)
        node.proc = None
        deadline = time.monotonic() + 6.0
        while (left := _tagged(tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, (f"{len(left)} process(es) of the killed node still run "
                          f"({len(children)} child process(es) before the kill)")
    finally:
        for pid in _tagged(tag):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass



# ------------------------------------------------------------------ TLS (the guard alone)


@pytest.mark.slow
def test_a_silent_tls_peer_stalls_no_other_and_associations_outlive_the_deadline(
        tmp_path: Path) -> None:
    """pynetdicom's server runs the TLS handshake in its accept loop, without a timeout:
    one peer that connects and sends nothing stalls every other. The guarded server runs
    it in the connection's thread, within the request deadline. An association nobody
    else admitted is admitted by the guard (it is not cut at the deadline)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    ae = AE(ae_title="TLSSCP")
    ae.add_supported_context(Verification)
    limits = GuardLimits(association_request_timeout_seconds=1.5, network_timeout_seconds=10,
                         maximum_pending_connections=8, maximum_pending_connections_per_address=4,
                         maximum_associations=4, maximum_associations_per_address=4,
                         maximum_pdu_length=16384)
    server = start_guarded_server(ae, ("127.0.0.1", 0), guard=ConnectionGuard(limits),
                                  evt_handlers=[], ssl_context=server_ctx)
    port = int(server.server_address[1])
    try:
        with _closing([_connect(port, "127.0.0.2")]) as (silent,):
            time.sleep(0.2)
            start = time.monotonic()
            assoc = _echo_ae("TLSSCU").associate("127.0.0.1", port, ae_title="TLSSCP",
                                                 tls_args=(client_ctx, "127.0.0.1"))
            assert assoc.is_established, "a silent TLS peer stalled the accept loop"
            assert _echo_seconds(assoc) < 1.0
            assert time.monotonic() - start < 2.0
            assert _closed_by_peer(silent, 3.0), "the silent peer outlived the deadline"
            time.sleep(1.0)  # past the association's own request deadline
            assert _echo_seconds(assoc) < 1.0
            assoc.release()
    finally:
        server.stop(0)
