"""The console's HTTP server: the standard library's threading server, with a limit.

``ThreadingHTTPServer`` serves every connection in its own thread for as long as the
peer keeps it open: a thousand idle connections take a thousand threads and file
descriptors, and with them the descriptors the DICOM side needs. Here, at most
``maximum_connections`` are served at a time; one beyond is answered
``503 Service Unavailable`` and closed at once, without a thread. Each read and write of
a served connection times out after ``request_timeout_seconds`` (the handler's
``timeout``), which ends idle connections.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Any

__all__ = ["BoundedHTTPServer"]

LOG = logging.getLogger(__name__)

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 12\r\nConnection: close\r\nRetry-After: 1\r\n\r\nbusy, retry\n")
#: Connections closed at once are logged at most this often (seconds).
REFUSAL_LOG_SECONDS = 10.0


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server that serves at most ``maximum_connections`` at a time.

    Raises:
        ValueError: ``maximum_connections`` is not positive.
    """

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], handler: Any, *,
                 maximum_connections: int) -> None:
        if maximum_connections < 1:
            raise ValueError(
                f"maximum_connections must be positive, not {maximum_connections!r}")
        self.maximum_connections = maximum_connections
        self._slots = threading.BoundedSemaphore(maximum_connections)
        self._refused = 0
        self._logged = -REFUSAL_LOG_SECONDS
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._refuse(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def _refuse(self, request: socket.socket) -> None:
        try:
            request.setblocking(False)
            request.send(_BUSY)
        except OSError:
            pass
        self.shutdown_request(request)
        self._refused += 1
        now = time.monotonic()
        if now - self._logged >= REFUSAL_LOG_SECONDS:
            self._logged = now
            LOG.warning("console: closed at once, %d connection(s) so far beyond the limit "
                        "of %d open connections", self._refused, self.maximum_connections)
