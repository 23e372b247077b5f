"""DICOM TLS: DCMTK's storescu sends to the node over TLS (accepted with a certificate the
node's CA signed, refused without one or with a self-signed one), and results go back over
TLS (the outbox, `dicomnode echo` and `dicomnode send` to a pynetdicom SCP that requires a
client certificate). A throwaway CA and certificates are made with `cryptography`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DCMTK, NodeFactory, free_port, storescu
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from orthanc import OrthancServer, requires_orthanc
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import load_config
from dicomnode.net.tls import TlsError, server_context
from dicomnode.send.outbox import Outbox
from dicomnode.store.db import open_index

pytestmark = pytest.mark.skipif(not (DCMTK / "storescu").exists(),
                                reason="DCMTK's storescu is needed (apt-get install dcmtk)")


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(folder: Path, stem: str, key: ec.EllipticCurvePrivateKey,
           cert: x509.Certificate) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{stem}.key", folder / f"{stem}.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey,
                 issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None, *,
                 ca: bool = False) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    issuer_name, issuer_key = issuer or (_name(subject), key)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: tuple[Path, Path]  # key, certificate
    client: tuple[Path, Path]
    self_signed: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("dicomnode test CA", ca_key, None, ca=True)
    _, ca = _write(folder, "ca", ca_key, ca_cert)
    issued = {}
    for stem in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        issued[stem] = _write(folder, stem, key,
                              _certificate(f"{stem}.test", key, (ca_cert.subject, ca_key)))
    rogue = ec.generate_private_key(ec.SECP256R1())
    self_signed = _write(folder, "rogue", rogue, _certificate("rogue.test", rogue, None))
    return Pki(ca, issued["server"], issued["client"], self_signed)


def _node_tls(pki: Pki) -> dict[str, Any]:
    return {"certificate": str(pki.server[1]), "private_key": str(pki.server[0]),
            "ca_bundle": str(pki.ca), "require_client_certificate": True}


def _storescu_tls(port: int, file: Path, key: Path | None, cert: Path | None,
                  ca: Path) -> int:
    tls = ("+tls", str(key), str(cert)) if key is not None else ("+tla",)
    return storescu(port, file, extra=(*tls, "+cf", str(ca))).returncode


@pytest.mark.slow
def test_storescu_over_tls_needs_a_certificate_the_ca_signed(
        node_factory: NodeFactory, pki: Pki, small_ct: list[Path]) -> None:
    node = node_factory(node={"tls": _node_tls(pki)})
    assert "DICOM TLS" in node.log()
    assert _storescu_tls(node.port, small_ct[0], *pki.client, pki.ca) == 0
    # refused: a self-signed certificate, no certificate, no TLS at all
    assert _storescu_tls(node.port, small_ct[1], *pki.self_signed, pki.ca) != 0
    assert _storescu_tls(node.port, small_ct[2], None, None, pki.ca) != 0
    assert storescu(node.port, small_ct[3]).returncode != 0
    # and the node still serves a good peer after them
    assert _storescu_tls(node.port, small_ct[4], *pki.client, pki.ca) == 0
    studies = node.wait_for(lambda s: len(s) == 1 and s[0]["instance_count"] == 2)
    assert studies[0]["instance_count"] == 2


def test_a_silent_connection_does_not_hold_up_the_tls_handshakes(
        node_factory: NodeFactory, pki: Pki, small_ct: list[Path]) -> None:
    import socket

    node = node_factory(node={"tls": _node_tls(pki)})
    with socket.create_connection(("127.0.0.1", node.port)):  # connects, says nothing
        started = time.monotonic()
        assert _storescu_tls(node.port, small_ct[0], *pki.client, pki.ca) == 0
        assert time.monotonic() - started < 10  # not after the silent one's 60 s timeout


class TlsSCP:
    """A pynetdicom Storage SCP over TLS that requires a client certificate of the CA."""

    def __init__(self, pki: Pki) -> None:
        self.port = free_port()
        self.received: list[str] = []
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(pki.server[1], pki.server[0])
        context.load_verify_locations(cafile=str(pki.ca))
        context.verify_mode = ssl.CERT_REQUIRED
        ae = AE(ae_title="TLSPACS")
        ae.supported_contexts = StoragePresentationContexts
        ae.add_supported_context(Verification)
        server = ae.start_server(("127.0.0.1", self.port), block=False, ssl_context=context,
                                 evt_handlers=[(evt.EVT_C_STORE, self._store)])
        assert server is not None
        self.server = server

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def tls_scp(pki: Pki) -> Iterator[TlsSCP]:
    scp = TlsSCP(pki)
    yield scp
    scp.close()


def _config(tmp_path: Path, peers: dict[str, Any]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({"storage": {"path": "store"}, "peers": peers,
                                    "outbox": {"timeout_seconds": 5}}))
    return path


def test_results_go_back_over_tls(tmp_path: Path, pki: Pki, tls_scp: TlsSCP,
                                  small_ct: list[Path]) -> None:
    peer = {"ae_title": "TLSPACS", "host": "localhost", "port": tls_scp.port}
    tls = {"ca_bundle": str(pki.ca), "certificate": str(pki.client[1]),
           "private_key": str(pki.client[0])}
    config = load_config(_config(tmp_path, {
        "pacs": {**peer, "tls": tls},
        "plain": peer,  # no TLS: the SCP's handshake fails
        "untrusted": {**peer, "tls": {**tls, "ca_bundle": str(pki.self_signed[1])}},
        "nocert": {**peer, "tls": {"ca_bundle": str(pki.ca)}},
    }))
    index = open_index(config.db_url)
    try:
        outbox = Outbox.from_config(config, index)
        outbox.enqueue(small_ct[:3], ["pacs"])
        report = outbox.deliver_due()
        assert report.sent == 3, report
        outbox.enqueue(small_ct[3:4], ["plain", "untrusted", "nocert"])
        report = outbox.deliver_due()
        assert report.sent == 0 and report.retrying == 3, report
        assert "over TLS" in (report.destinations["untrusted"].error or "")
    finally:
        index.dispose()
    assert len(tls_scp.received) == 3


def test_echo_and_send_over_tls(tmp_path: Path, pki: Pki, tls_scp: TlsSCP,
                                small_ct: list[Path]) -> None:
    import subprocess
    import sys

    tls = {"ca_bundle": str(pki.ca), "certificate": str(pki.client[1]),
           "private_key": str(pki.client[0]), "server_hostname": "localhost"}
    config = _config(tmp_path, {"pacs": {"ae_title": "TLSPACS", "host": "127.0.0.1",
                                         "port": tls_scp.port, "tls": tls}})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "dicomnode", *args, "--config",
                               str(config)], capture_output=True, text=True, timeout=120)

    echo = cli("echo", "pacs")
    assert echo.returncode == 0 and "Success" in echo.stdout, echo.stderr
    sent = cli("send", str(small_ct[0]), str(small_ct[1]), "--to", "pacs")
    assert sent.returncode == 0, sent.stderr
    assert len(tls_scp.received) == 2


def test_tls_configuration_errors_name_the_file(tmp_path: Path, pki: Pki) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("node: {tls: {certificate: missing.pem, private_key: k.key,"
                    " require_client_certificate: true}}\n")
    with pytest.raises(Exception, match="needs ca_bundle"):
        load_config(path)
    path.write_text("node: {tls: {certificate: missing.pem, private_key: k.key}}\n")
    config = load_config(path)
    assert config.node.tls is not None
    assert config.node.tls.certificate == tmp_path / "missing.pem"
    with pytest.raises(TlsError, match=r"node\.tls\.certificate: certificate .*missing\.pem"):
        server_context(config.node.tls)
    path.write_text(f"node: {{tls: {{certificate: {pki.server[1]}, "
                    f"private_key: {pki.client[0]}}}}}\n")
    config = load_config(path)
    assert config.node.tls is not None
    with pytest.raises(TlsError, match="cannot be used together"):
        server_context(config.node.tls)


@pytest.mark.slow
@requires_orthanc
def test_orthanc_over_dicom_tls_both_ways(node_factory: NodeFactory, tmp_path: Path, pki: Pki,
                                          small_ct: list[Path]) -> None:
    """Orthanc 1.10's DICOM TLS against the node: a push with a certificate the CA signed
    is stored, one with a self-signed certificate is refused; results go back over TLS."""
    node = node_factory(node={"tls": _node_tls(pki)},
                        peers={"orthanc": {"ae_title": "ORTHANC", "host": "127.0.0.1"}})
    target = {"AET": "DICOMNODE", "Host": "127.0.0.1", "Port": node.port, "UseDicomTls": True}

    def orthanc(folder: str, key: Path, cert: Path) -> OrthancServer:
        return OrthancServer(tmp_path / folder, config={
            "DicomTlsEnabled": True, "DicomTlsCertificate": str(cert),
            "DicomTlsPrivateKey": str(key), "DicomTlsTrustedCertificates": str(pki.ca),
            "DicomTlsRemoteCertificateRequired": True,
            "DicomModalities": {"dicomnode": target}})

    with orthanc("rogue", *pki.self_signed) as rogue:
        ids = [rogue.upload(p)["ID"] for p in small_ct[5:7]]
        with pytest.raises(Exception):  # noqa: B017 - Orthanc answers its job's failure
            rogue.push("dicomnode", ids, timeout=60)
    with orthanc("trusted", *pki.client) as trusted:
        ids = [trusted.upload(p)["ID"] for p in small_ct[:3]]
        trusted.push("dicomnode", ids, timeout=60)
        node.wait_for(lambda s: len(s) == 1 and s[0]["instance_count"] == 3)
        assert "CERTIFICATE_VERIFY_FAILED" in node.log()  # the rogue's handshake, refused
        # and back: the node's SCU to Orthanc over TLS, with the node's client certificate
        config = load_config(_config(tmp_path / "back", {"orthanc": {
            **trusted.peer(), "tls": {"ca_bundle": str(pki.ca),
                                      "certificate": str(pki.client[1]),
                                      "private_key": str(pki.client[0])}}}))
        index = open_index(config.db_url)
        try:
            outbox = Outbox.from_config(config, index)
            outbox.enqueue(small_ct[3:5], ["orthanc"])
            assert outbox.deliver_due().sent == 2
        finally:
            index.dispose()
        assert len(trusted.sop_instance_uids()) == 5
