"""Socket options for the associations pynetdicom opens."""

from __future__ import annotations

import socket
from typing import Any

__all__ = ["set_nodelay"]


def set_nodelay(assoc: Any) -> None:
    """Turn Nagle's algorithm off on an association's socket.

    Without TCP_NODELAY the small PDUs of a DIMSE exchange wait for delayed
    ACKs, which caps a C-STORE stream at a few dozen instances per second.
    """
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
