"""The operator console's server: the ASGI application of :mod:`dicomnode.web.app`, served
by uvicorn in a thread of the node's process.

:class:`ConsoleServer` holds what the application needs (index, outbox, rules, the token,
the lockout counts) and runs one ``uvicorn.Server`` on its own event loop in the thread
``console``: no signal handlers (the node's main thread owns SIGTERM and SIGINT), no
access log (a request line could carry anything), the node's logging left as it is.

Bounds: at most ``web.maximum_connections`` connections are open at a time; one beyond is
answered ``503 Service Unavailable`` and closed at once (:class:`_BoundedH11`), and
uvicorn's ``limit_concurrency`` stays above that as a second bound. A connection that has
not sent a whole request within ``web.request_timeout_seconds`` (of being made, or of its
last answer) is closed, however slowly it trickles bytes; uvicorn's keep-alive timeout,
the same number of seconds rounded up, closes idle ones too. ``stop()`` closes the listener
and the idle connections, waits at most ``web.request_timeout_seconds`` for requests in
progress, then ends them.

Importing this module imports uvicorn, not FastAPI; :meth:`ConsoleServer.start` builds
the application. The node imports it only when ``web.enabled`` is true.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from dicomnode.completion import AssociationActivity
from dicomnode.config import Config, ConfigError
from dicomnode.receive.ingest import InstanceStore
from dicomnode.rules.loader import RuleSet
from dicomnode.rules.trigger import Firing
from dicomnode.send.outbox import Outbox
from dicomnode.store.db import Index
from dicomnode.web.api import job_overlay_path
from dicomnode.web.stow import StowCredentials, StowReceiver

__all__ = ["ConsoleServer", "MetricsSource", "RunNow", "console_token", "is_loopback"]

LOG = logging.getLogger(__name__)

MetricsSource = Callable[[], tuple[bytes, str]]
RunNow = Callable[[int, str], list[Firing]]

_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
         b"Content-Length: 12\r\nConnection: close\r\nRetry-After: 1\r\n\r\nbusy, retry\n")
#: Connections closed at once are logged at most this often (seconds).
REFUSAL_LOG_SECONDS = 10.0
#: How long ``start()`` waits for uvicorn to serve (seconds).
START_TIMEOUT_SECONDS = 10.0


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def console_token(config: Config) -> str | None:
    """The console token (``web.token_file``, else ``$web.token_env``), or None.

    Raises:
        ConfigError: the token file cannot be read, or the console is bound to a
            non-loopback address without a token.
    """
    web = config.web
    token: str | None = None
    if web.token_file is not None:
        try:
            token = web.token_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"web.token_file {web.token_file}: cannot read it: "
                              f"{exc.strerror}") from None
    else:
        token = (os.environ.get(web.token_env) or "").strip() or None
    if token is not None and len(token) < 16:
        raise ConfigError("the console token must have at least 16 characters")
    if token is None and not is_loopback(web.host):
        raise ConfigError(f"web.host {web.host} is not a loopback address: the console then "
                          f"needs a token (web.token_file or ${web.token_env})")
    return token


class _Refusals:
    """Counts connections closed at once, logged at most every REFUSAL_LOG_SECONDS."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.count = 0
        self._logged = -REFUSAL_LOG_SECONDS

    def refused(self) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self._logged >= REFUSAL_LOG_SECONDS:
            self._logged = now
            LOG.warning("console: closed at once, %d connection(s) so far beyond the limit "
                        "of %d open connections", self.count, self.maximum)


class _BoundedH11(H11Protocol):
    """uvicorn's h11 protocol, with the connection limit applied when a connection is made
    (uvicorn's own limit answers 503 only once a request has arrived, keeping idle
    connections beyond it open) and a deadline for each request's arrival: a connection
    whose next request has not arrived whole within ``request_seconds`` (of the connection
    being made, or of the last answer) is closed, however slowly it trickles bytes."""

    refusals: _Refusals
    request_seconds: float
    _deadline: asyncio.TimerHandle | None = None
    _answered: object = None  # the request cycle last answered (None: none yet)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        if len(self.connections) >= self.refusals.maximum:
            try:
                transport.write(_BUSY)
            finally:
                transport.close()
            self.refusals.refused()
            return
        super().connection_made(transport)
        self._arm()

    def _arm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._answered = self.cycle
        self._deadline = self.loop.call_later(self.request_seconds, self._no_request)

    def _no_request(self) -> None:
        if self.cycle is self._answered and not self.transport.is_closing():
            self.transport.close()  # no whole request since: a stalled or idle peer

    def on_response_complete(self) -> None:
        self._arm()  # before uvicorn starts a pipelined request's cycle
        super().on_response_complete()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:  # refused in connection_made
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self.transport is None:  # refused in connection_made: never counted
            return
        super().connection_lost(exc)


class ConsoleServer:
    """Serves the console on ``web.host:web.port`` (uvicorn, in the thread ``console``).

    Args:
        config: the node's configuration (``web`` section, ``storage.path``, ``models_dir``).
        index: the node's index.
        outbox: the node's outbox (the "resend" action).
        rules: the loaded rules, or None.
        metrics: returns the body and content type of ``/metrics``.
        run_now: an operator's "run now" of a rule on a study (None: no such action).
        store: the node's instance store, where STOW-RS (``POST /dicomweb/studies``) stores
            (None: STOW-RS is not served, answered 503).
        activity: the node's association activity: an open STOW-RS request counts as an
            open association for completion (needed with ``store``).
        providers: the provider each model runs on in the node's workers, as their warm-up
            found (the queue's estimates apply the same per-model limits as the claims).

    Raises:
        ConfigError: no token where one is needed, or an unreadable token file.
    """

    def __init__(self, config: Config, index: Index, outbox: Outbox, rules: RuleSet | None,
                 metrics: MetricsSource, *, run_now: RunNow | None = None,
                 store: InstanceStore | None = None,
                 activity: AssociationActivity | None = None,
                 providers: Mapping[str, str] | None = None) -> None:
        if (store is None) != (activity is None):
            raise ValueError("store and activity go together (STOW-RS)")
        self.run_now = run_now
        self.providers = providers
        self.config = config
        self.index = index
        self.outbox = outbox
        self.rules = rules
        self.metrics = metrics
        self.token = console_token(config)
        self.stow: StowReceiver | None = None
        if store is not None and activity is not None:
            self.stow = StowReceiver(store, activity,
                                     StowCredentials(config.peers, self.token))
        self.open_reading = is_loopback(config.web.host)
        self.allowed_hosts = {"localhost", "127.0.0.1", "::1", config.web.host.lower(),
                              *(h.lower() for h in config.web.allowed_hosts)}
        self._failures: dict[str, deque[float]] = {}
        self._failures_lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None  # bound, not yet served
        self._port = 0

    @property
    def port(self) -> int:
        """The port served (the one picked when ``web.port`` is 0)."""
        return self._port

    # ------------------------------------------------------------ serving

    def _listen(self) -> socket.socket:
        web = self.config.web
        try:
            family, kind, proto, _, address = socket.getaddrinfo(
                web.host, web.port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            raise ConfigError(f"web: cannot serve the console on {web.host}:{web.port}: "
                              f"{exc.strerror or exc}") from None
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(128)
        except OSError as exc:
            sock.close()
            raise ConfigError(f"web: cannot serve the console on {web.host}:{web.port}: "
                              f"{exc.strerror} (set web.port, or web.enabled: false)") from None
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        """:meth:`bind`, then :meth:`serve`."""
        self.bind()
        self.serve()

    def bind(self) -> None:
        """Bind and listen on the console's port (a port in use raises ConfigError here);
        connections wait in the backlog until :meth:`serve`.

        Raises:
            ConfigError: the address cannot be bound.
        """
        if self._socket is None:
            self._socket = self._listen()
            self._port = int(self._socket.getsockname()[1])

    def serve(self) -> None:
        """Build the application and serve the bound port in the thread ``console`` (the node
        calls it once its SCP listens: FastAPI's import then delays no C-STORE).

        Raises:
            ConfigError: the address cannot be bound.
            RuntimeError: uvicorn did not start within START_TIMEOUT_SECONDS.
        """
        from dicomnode.web.app import create_app  # FastAPI: only when the console is on

        self.bind()
        sock, self._socket = self._socket, None
        assert sock is not None
        web = self.config.web
        seconds = web.request_timeout_seconds
        protocol = type("BoundedH11", (_BoundedH11,), {
            "refusals": _Refusals(web.maximum_connections), "request_seconds": seconds})
        server = uvicorn.Server(uvicorn.Config(
            create_app(self), http=protocol, ws="none", lifespan="off", interface="asgi3",
            log_config=None, access_log=False, server_header=False, proxy_headers=False,
            limit_concurrency=web.maximum_connections + 1,  # second bound (see the docstring)
            timeout_keep_alive=max(1, math.ceil(seconds)),
            timeout_graceful_shutdown=max(1, math.ceil(seconds))))
        self._server = server
        self._thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                                        name="console", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("the console's server did not start")
            time.sleep(0.01)
        LOG.info("console at http://%s:%d/%s", web.host, self.port,
                 "" if self.token is None else " (token required for identity)")

    def stop(self) -> None:
        """Stop serving: at most ``web.request_timeout_seconds`` for requests in progress."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if self._socket is not None:  # bound, never served
            self._socket.close()
            self._socket = None
        if server is None or thread is None:
            return
        server.should_exit = True
        thread.join(self.config.web.request_timeout_seconds + 5)
        if thread.is_alive():
            server.force_exit = True
            thread.join(5)
            if thread.is_alive():
                LOG.warning("console: its server did not stop in time")

    # ------------------------------------------------------------ access

    def authenticated(self, presented: str | None) -> bool:
        return (self.token is not None and presented is not None
                and hmac.compare_digest(presented.encode(), self.token.encode()))

    def locked_out(self, client: str) -> bool:
        """Whether ``client`` gave ``web.max_token_failures`` wrong tokens in the window."""
        window = self.config.web.lockout_seconds
        with self._failures_lock:
            failures = self._failures.get(client)
            if not failures:
                return False
            while failures and failures[0] < time.monotonic() - window:
                failures.popleft()
            return len(failures) >= self.config.web.max_token_failures

    def failed(self, client: str) -> None:
        """Count a wrong token from ``client``."""
        with self._failures_lock:
            if len(self._failures) > 10_000:  # bounded: forget the oldest addresses
                self._failures.pop(next(iter(self._failures)))
            failures = self._failures.setdefault(
                client, deque(maxlen=self.config.web.max_token_failures))
            failures.append(time.monotonic())
        LOG.warning("console: wrong token from %s", client)

    def host_allowed(self, header: str | None) -> bool:
        """Whether a request's Host header names this console (DNS rebinding)."""
        if not header:
            return False
        host = header.strip().lower()
        if host.startswith("["):  # [::1]:8080
            host = host[1:host.find("]")] if "]" in host else host
        elif host.count(":") == 1:
            host = host.rsplit(":", 1)[0]
        return host in self.allowed_hosts

    # ------------------------------------------------------------ data

    def overlays(self) -> set[int]:
        """Keys of the jobs that have an overlay picture."""
        root = self.config.storage.path / "jobs"
        if not root.is_dir():
            return set()
        return {int(p.parent.name) for p in root.glob("*/overlay.png") if p.parent.name.isdigit()}

    def overlay_path(self, job_id: int) -> Path:
        return job_overlay_path(self.config.storage.path, job_id)

    def runnable_rules(self) -> list[str]:
        """The rules an operator may run now (none without a ``run_now``)."""
        if self.run_now is None or self.rules is None:
            return []
        return [r.name for r in self.rules.rules if r.enabled]

    def healthy(self) -> bool:
        from sqlalchemy import text

        with self.index.session() as session:
            session.execute(text("SELECT 1"))
        return True
