"""Who may open an association with the node."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache

from dicomnode.config import PeerConfig

__all__ = [
    "REFUSAL_KINDS",
    "REFUSED_CALLED_AE",
    "REFUSED_CALLING_AE",
    "REFUSED_HOST",
    "REFUSED_OTHER",
    "REFUSED_TOO_MANY",
    "AccessPolicy",
    "EscapeControlCharacters",
    "Refusal",
    "from_host",
    "printable",
    "raw_ae_title_problem",
]

# A-ASSOCIATE-RJ diagnostics (PS3.8 9.3.4), source 1 = service user, result 1 = permanent
CALLING_AE_NOT_RECOGNIZED = 0x03
CALLED_AE_NOT_RECOGNIZED = 0x07

# Why an association was refused, as one of a fixed set of words (metric labels): never
# an AE title or an address.
REFUSED_CALLED_AE = "called_ae_not_recognised"
REFUSED_CALLING_AE = "calling_ae_not_recognised"
REFUSED_HOST = "host_not_allowed"
REFUSED_TOO_MANY = "too_many_associations"  # pynetdicom's maximum_associations
REFUSED_OTHER = "other"
REFUSAL_KINDS = (REFUSED_CALLED_AE, REFUSED_CALLING_AE, REFUSED_HOST, REFUSED_TOO_MANY,
                 REFUSED_OTHER)


@dataclass(frozen=True)
class Refusal:
    """Why an association is refused: a log message, the A-ASSOCIATE-RJ diagnostic and
    the kind of refusal (one of :data:`REFUSAL_KINDS`, without identity)."""

    reason: str
    diagnostic: int
    kind: str = REFUSED_OTHER


_AE_CHARACTERS = frozenset(chr(c) for c in range(0x20, 0x7F)) - {"\\"}


def printable(value: object, limit: int = 64) -> str:
    """A peer-controlled string made safe for one log line: quoted like :func:`repr`, so
    control characters (tab, line breaks, escape) and other non-printable characters
    appear as escapes (``\\t``, ``\\n``, ``\\x1b``) and cannot forge or split log lines;
    cut to ``limit`` characters (marked with ``...``)."""
    text = value if isinstance(value, str) else str(value)
    if len(text) > limit:
        return repr(text[:limit]) + "..."
    return repr(text)


def _valid_ae_title(value: str) -> bool:
    """PS3.5 AE: at most 16 characters of printable ASCII (no control character, no
    backslash), not only spaces."""
    return 0 < len(value) <= 16 and bool(value.strip()) and set(value) <= _AE_CHARACTERS


def raw_ae_title_problem(raw: bytes) -> str | None:
    """Why a 16-byte AE title field of an A-ASSOCIATE-RQ is not a valid AE title, or None.

    Only spaces are non-significant padding (PS3.8 9.3.2; trailing NULs are tolerated
    too): a tab or line break at either end is refused, where pynetdicom would strip it.
    """
    value = raw.lstrip(b" ").rstrip(b" \x00")
    if not value:
        return "empty"
    if any(b < 0x20 or b > 0x7E or b == 0x5C for b in value):
        return "control, non-ASCII or backslash characters"
    return None


class EscapeControlCharacters(logging.Filter):
    """Escapes each record of a logger whose messages may quote peer data (pynetdicom's):
    the message is replaced by its :func:`printable` form (no line break, no control
    character), and an exception by one escaped line (type and message), as its
    traceback would quote the same data."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = f"{message} ({type(exc).__name__}: {exc})"
            record.exc_info = None
            record.exc_text = None
        escaped = printable(message, limit=2000)[1:]
        record.msg = escaped[:-1] if escaped.endswith("'") else escaped
        record.args = None
        return True


@lru_cache(maxsize=256)
def _addresses(host: str) -> frozenset[str]:
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return frozenset({host})
    return frozenset({str(info[4][0]) for info in infos} | {host})


def from_host(address: str, host: str | None) -> bool:
    """Whether a connection from ``address`` comes from a peer's configured ``host`` (its
    name resolved; always true when the peer names no host), as the SCP checks it."""
    return host is None or address in _addresses(host)


class AccessPolicy:
    """Accepts an association only from a configured peer, addressed to this node.

    A peer is recognised by its calling AE title and, when the peer names a
    host, by the association's source address too (host names are resolved).
    """

    def __init__(self, ae_title: str, peers: Mapping[str, PeerConfig]) -> None:
        self.ae_title = ae_title.strip()
        self.peers = dict(peers)

    def check(self, calling_ae_title: str, called_ae_title: str,
              address: str) -> tuple[str | None, Refusal | None]:
        """Returns (peer name, None) to accept, or (None, refusal) to refuse.

        An AE title with a control character, a backslash or any character outside
        printable ASCII is refused before it is compared (PS3.5 AE VR); the refusal's
        reason quotes it escaped (:func:`printable`).
        """
        if not _valid_ae_title(called_ae_title.strip(" ")):
            return None, Refusal(
                f"called AE title {printable(called_ae_title)} is not a valid AE title "
                "(control or non-ASCII characters)", CALLED_AE_NOT_RECOGNIZED,
                REFUSED_CALLED_AE)
        if not _valid_ae_title(calling_ae_title.strip(" ")):
            return None, Refusal(
                f"calling AE title {printable(calling_ae_title)} is not a valid AE title "
                "(control or non-ASCII characters)", CALLING_AE_NOT_RECOGNIZED,
                REFUSED_CALLING_AE)
        calling = calling_ae_title.strip()
        called = called_ae_title.strip()
        if called != self.ae_title:
            return None, Refusal(
                f"called AE title {printable(called)} is not this node's "
                f"({printable(self.ae_title)})", CALLED_AE_NOT_RECOGNIZED, REFUSED_CALLED_AE)
        candidates = [(n, p) for n, p in self.peers.items() if p.ae_title == calling]
        if not candidates:
            return None, Refusal(
                f"calling AE title {printable(calling)} is not a configured peer",
                CALLING_AE_NOT_RECOGNIZED, REFUSED_CALLING_AE)
        for name, peer in candidates:
            if from_host(address, peer.host):
                return name, None
        hosts = ", ".join(sorted({str(p.host) for _, p in candidates}))
        return None, Refusal(
            f"calling AE title {printable(calling)} connected from {printable(address)}, "
            "not from its "
            f"configured host ({hosts})", CALLING_AE_NOT_RECOGNIZED, REFUSED_HOST)
