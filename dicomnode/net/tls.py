"""DICOM TLS (PS3.15 Annex B.1, the BCP 195 profiles): SSL contexts for the SCP and the SCU.

* :func:`server_context` for the node's SCP (``node.tls``): its certificate and key, the CAs
  whose client certificates it accepts, and whether a client must present one. The TLS
  handshake runs in the association's own thread, bounded by the network timeout, not in
  the thread that accepts connections: a client that connects and stays silent cannot
  hold up the others.
* :func:`client_tls_args` for the SCU (``peers.NAME.tls``): pynetdicom's ``tls_args``
  ``(context, server_hostname)``; the peer's certificate is verified against the CA bundle
  (or the system's trust store) and the host name.

Both use TLS 1.2 or later with Python's default (BCP 195 compatible) cipher suites.
Errors name the files and what is wrong with them, never their contents.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from dicomnode.config import ConfigError, PeerConfig, PeerTlsConfig, TlsConfig

__all__ = ["TlsError", "client_tls_args", "server_context"]


class TlsError(ConfigError):
    """A certificate, key or CA bundle that cannot be used."""


class _DeferredHandshakeContext(ssl.SSLContext):
    """A server context whose sockets do their handshake on first use, in the thread that
    reads them (pynetdicom wraps accepted sockets in its accept loop), within
    ``handshake_timeout`` seconds per blocking operation."""

    handshake_timeout: float | None = None

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        kwargs["do_handshake_on_connect"] = False
        if self.handshake_timeout is not None:
            sock.settimeout(self.handshake_timeout)
        return super().wrap_socket(sock, *args, **kwargs)


def _check_file(path: Path, what: str, key: str) -> None:
    if not path.is_file():
        raise TlsError(f"{key}: {what} {path} does not exist or is not a file")


def _load_chain(context: ssl.SSLContext, certificate: Path, private_key: Path,
                key: str) -> None:
    _check_file(certificate, "certificate", f"{key}.certificate")
    _check_file(private_key, "private key", f"{key}.private_key")
    try:
        context.load_cert_chain(certificate, private_key)
    except ssl.SSLError as exc:
        raise TlsError(f"{key}: certificate {certificate} and private key {private_key} "
                       f"cannot be used together ({exc.reason or 'not PEM, or not a pair'})"
                       ) from None
    except OSError as exc:
        raise TlsError(f"{key}: cannot read {certificate} or {private_key}: "
                       f"{exc.strerror}") from None


def _load_ca(context: ssl.SSLContext, ca_bundle: Path, key: str) -> None:
    _check_file(ca_bundle, "CA bundle", f"{key}.ca_bundle")
    try:
        context.load_verify_locations(cafile=str(ca_bundle))
    except (ssl.SSLError, OSError) as exc:
        raise TlsError(f"{key}.ca_bundle: {ca_bundle} holds no usable PEM certificate "
                       f"({type(exc).__name__})") from None


def server_context(tls: TlsConfig, *, handshake_timeout: float | None = None
                   ) -> ssl.SSLContext:
    """The SSL context of the node's SCP.

    Clients must present a certificate signed by a CA of ``ca_bundle`` when
    ``require_client_certificate`` is set; otherwise a certificate they present is
    verified against ``ca_bundle`` when one is given, and none is asked for without it.

    Raises:
        TlsError: a file is missing, unreadable, not PEM, or the key does not match.
    """
    context = _DeferredHandshakeContext(ssl.PROTOCOL_TLS_SERVER)
    context.handshake_timeout = handshake_timeout
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, tls.certificate, tls.private_key, "node.tls")
    if tls.ca_bundle is not None:
        _load_ca(context, tls.ca_bundle, "node.tls")
        context.verify_mode = (ssl.CERT_REQUIRED if tls.require_client_certificate
                               else ssl.CERT_OPTIONAL)
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def client_tls_args(peer: PeerConfig, name: str) -> tuple[ssl.SSLContext, str] | None:
    """pynetdicom's ``tls_args`` for associating with ``peer``, or None without ``tls``.

    Raises:
        TlsError: a file is missing, unreadable, not PEM, or the key does not match.
    """
    tls: PeerTlsConfig | None = peer.tls
    if tls is None:
        return None
    key = f"peers.{name}.tls"
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.ca_bundle is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # only these CAs, not the system's
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        _load_ca(context, tls.ca_bundle, key)
    if tls.certificate is not None and tls.private_key is not None:
        _load_chain(context, tls.certificate, tls.private_key, key)
    hostname = tls.server_hostname or peer.host or ""
    return context, hostname
