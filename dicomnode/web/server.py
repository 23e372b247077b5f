"""The operator console: a small HTTP server in the node's process (standard library).

Routes:

* ``GET /``: studies, jobs (with overlay pictures) and the outbox; ``GET /studies/ID``:
  series with geometry verdicts and how each rule evaluates on the study;
* ``GET /jobs/ID/overlay.png``: the picture the job's worker drew;
* ``GET /api/studies``, ``/api/jobs``, ``/api/outbox``: the JSON of the commands;
* ``POST /api/jobs/ID/retry``, ``POST /api/outbox/ID/resend``: the only actions (they need
  the header ``X-Dicomnode: 1``, which a page of another site cannot send);
* ``GET /metrics`` (Prometheus text format), ``GET /healthz`` (never needs the token).

Access: bound to a loopback address, anyone on the machine may read the pages, without
patient identity; bound elsewhere, every route but ``/healthz`` needs the token. A request
carrying the token (``Authorization: Bearer TOKEN``, or the cookie ``dicomnode_token`` that
the login form, ``POST /login``, sets) is authenticated and sees identity. The token never
travels in a URL: a request with ``?token=`` is refused (400), and nothing logs it.

Defences: a request whose ``Host`` is not localhost, a loopback address, ``web.host`` or
one of ``web.allowed_hosts`` is refused (421; DNS rebinding); after
``web.max_token_failures`` wrong tokens within ``web.lockout_seconds`` a client address is
answered 429 until that time has passed; every answer carries a Content-Security-Policy
(script and style only from ``/static/``), ``X-Frame-Options: DENY``,
``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: no-referrer``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from sqlalchemy import select, text

from dicomnode.config import Config, ConfigError
from dicomnode.jobs.files import job_overlay
from dicomnode.jobs.queue import jobs_report, reset
from dicomnode.rules.explain import explain_study
from dicomnode.rules.loader import RuleSet
from dicomnode.rules.trigger import Firing
from dicomnode.send.outbox import Outbox, OutboxError, outbox_report
from dicomnode.store.db import Index
from dicomnode.store.queries import studies_report
from dicomnode.store.tables import Patient, Study
from dicomnode.web import pages
from dicomnode.web.httpd import BoundedHTTPServer

__all__ = ["ConsoleServer", "console_token", "is_loopback"]

LOG = logging.getLogger(__name__)
_COOKIE = "dicomnode_token"

MetricsSource = Callable[[], tuple[bytes, str]]


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


RunNow = Callable[[int, str], list[Firing]]


class ConsoleServer:
    """Serves the console on ``web.host:web.port`` in daemon threads."""

    def __init__(self, config: Config, index: Index, outbox: Outbox, rules: RuleSet | None,
                 metrics: MetricsSource, *, run_now: RunNow | None = None) -> None:
        self.run_now = run_now  # an operator's "run now" of a rule on a study
        self.config = config
        self.index = index
        self.outbox = outbox
        self.rules = rules
        self.metrics = metrics
        self.token = console_token(config)
        self.open_reading = is_loopback(config.web.host)
        self.allowed_hosts = {"localhost", "127.0.0.1", "::1", config.web.host.lower(),
                              *(h.lower() for h in config.web.allowed_hosts)}
        self._failures: dict[str, deque[float]] = {}
        self._failures_lock = threading.Lock()
        self._httpd: BoundedHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        web = self.config.web
        # timeout: each read and write of a connection (an idle one is closed after it)
        handler = type("Handler", (_Handler,), {"console": self,
                                                "timeout": web.request_timeout_seconds})
        try:
            self._httpd = BoundedHTTPServer((web.host, web.port), handler,
                                            maximum_connections=web.maximum_connections)
        except OSError as exc:
            raise ConfigError(f"web: cannot serve the console on {web.host}:{web.port}: "
                              f"{exc.strerror} (set web.port, or web.enabled: false)") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="console",
                                        daemon=True)
        self._thread.start()
        LOG.info("console at http://%s:%d/%s", self.config.web.host, self.port,
                 "" if self.token is None else " (token required for identity)")

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    # ------------------------------------------------------------ data

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

    def overlays(self) -> set[int]:
        root = self.config.storage.path / "jobs"
        if not root.is_dir():
            return set()
        return {int(p.parent.name) for p in root.glob("*/overlay.png") if p.parent.name.isdigit()}

    def overlay_path(self, job_id: int) -> Path:
        return job_overlay(self.config, job_id)

    def patients(self, study_id: int | None = None) -> dict[int, str]:
        """Per study key, its patient as "name (ID)"; of one study when ``study_id`` is given."""
        query = select(Study.id, Patient.patient_name, Patient.patient_id).join(Patient)
        if study_id is not None:
            query = query.where(Study.id == study_id)
        with self.index.session() as session:
            rows = session.execute(query).all()
        return {sid: f"{name or ''} ({pid})" for sid, name, pid in rows}

    def healthy(self) -> bool:
        with self.index.session() as session:
            session.execute(text("SELECT 1"))
        return True


_JOB_RETRY = re.compile(r"^/api/jobs/(\d+)/retry$")
_RUN_NOW = re.compile(r"^/api/studies/(\d+)/rules/([A-Za-z0-9._-]{1,64})/run$")
_ITEM_RESEND = re.compile(r"^/api/outbox/(\d+)/resend$")
_OVERLAY = re.compile(r"^/jobs/(\d+)/overlay\.png$")
_STUDY = re.compile(r"^/studies/(\d+)$")
_STATIC = {"/static/console.js": (pages.SCRIPT.encode(), "text/javascript; charset=utf-8"),
           "/static/console.css": (pages.STYLE.encode(), "text/css; charset=utf-8")}
_SECURITY_HEADERS = {
    "Content-Security-Policy": pages.CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class _Handler(BaseHTTPRequestHandler):
    console: ConsoleServer
    server_version = "dicomnode"
    _cookie: str | None = None  # Set-Cookie value after a login

    def log_message(self, format: str, *args: Any) -> None:
        # never the request line: its query could carry anything; paths hold index keys
        LOG.debug("console: %s %s: %s", self.command, _path_of(getattr(self, "path", "")),
                  _escape(format % args))

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        LOG.debug("console: %s %s -> %s", self.command, _path_of(self.path), code)

    # ------------------------------------------------------------ plumbing

    def _client(self) -> str:
        return str(self.client_address[0])

    def _token(self) -> str | None:
        """The token presented in the Authorization header or the cookie."""
        header = self.headers.get("Authorization", "")
        if header.startswith("Bearer "):
            return header[7:].strip()
        cookie = SimpleCookie()
        try:
            cookie.load(self.headers.get("Cookie", ""))
        except Exception:
            return None
        if _COOKIE in cookie:
            return cookie[_COOKIE].value
        return None

    def _guard(self) -> bool:
        """Host header, token in the URL, lockout: False when the request was answered."""
        if not self.console.host_allowed(self.headers.get("Host")):
            self._text(HTTPStatus.MISDIRECTED_REQUEST,
                       "this console does not answer to that host name (web.allowed_hosts)")
            return False
        if "token" in parse_qs(urlsplit(self.path).query):
            self._text(HTTPStatus.BAD_REQUEST, "the token never goes in a URL: log in at "
                       "/login or send Authorization: Bearer TOKEN")
            return False
        if self.console.locked_out(self._client()):
            self._text(HTTPStatus.TOO_MANY_REQUESTS,
                       "too many wrong tokens from this address; try again later")
            return False
        return True

    def _send(self, status: int, body: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, data: Any, status: int = 200) -> None:
        self._send(status, (json.dumps(data, indent=2) + "\n").encode(), "application/json")

    def _text(self, status: int, message: str) -> None:
        self._send(status, (message + "\n").encode(), "text/plain; charset=utf-8")

    def _access(self) -> bool | None:
        """Authenticated (True), open reading (False), or refused (None, answered)."""
        presented = self._token()
        console = self.console
        if console.authenticated(presented):
            return True
        if presented is not None:
            console.failed(self._client())
            self._text(HTTPStatus.UNAUTHORIZED, "wrong token")
            return None
        if console.open_reading:
            return False
        self._send(HTTPStatus.UNAUTHORIZED, b"token required\n", "text/plain; charset=utf-8",
                   {"WWW-Authenticate": 'Bearer realm="dicomnode"'})
        return None

    # ------------------------------------------------------------ routes

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        console = self.console
        try:
            if path == "/healthz":
                self._json({"status": "ok" if console.healthy() else "error"})
                return
            if not self._guard():
                return
            if path in _STATIC:
                self._send(200, *_STATIC[path])
                return
            if path == "/login":
                self._send(200, pages.login_page(), "text/html; charset=utf-8")
                return
            self._cookie = None
            auth = self._access()
            if auth is None:
                return
            self._route(path, auth)
        except Exception as exc:
            LOG.warning("console: %s failed: %s", path, type(exc).__name__)
            self._text(HTTPStatus.INTERNAL_SERVER_ERROR, f"error: {type(exc).__name__}")

    def _html(self, body: bytes) -> None:
        headers = {"Set-Cookie": self._cookie} if self._cookie else None
        self._send(200, body, "text/html; charset=utf-8", headers)

    def _route(self, path: str, auth: bool) -> None:
        console = self.console
        if path == "/":
            studies = studies_report(console.index)
            self._html(pages.dashboard(
                studies if auth else pages.redact_studies(studies),
                jobs_report(console.index) if auth else pages.redact_jobs(
                    jobs_report(console.index)),
                outbox_report(console.index) if auth else pages.redact_outbox(
                    outbox_report(console.index)),
                overlays=console.overlays(), patients=console.patients() if auth else None,
                authenticated=auth))
        elif match := _STUDY.match(path):
            self._study(int(match.group(1)), auth)
        elif match := _OVERLAY.match(path):
            file = console.overlay_path(int(match.group(1)))
            if not file.is_file():
                self._text(HTTPStatus.NOT_FOUND, "no overlay for this job")
            else:
                self._send(200, file.read_bytes(), "image/png")
        elif path == "/api/studies":
            report = studies_report(console.index)
            self._json(report if auth else pages.redact_studies(report))
        elif path == "/api/jobs":
            report = jobs_report(console.index)
            self._json(report if auth else pages.redact_jobs(report))
        elif path == "/api/outbox":
            report = outbox_report(console.index)
            self._json(report if auth else pages.redact_outbox(report))
        elif path == "/metrics":
            body, content_type = console.metrics()
            self._send(200, body, content_type)
        else:
            self._text(HTTPStatus.NOT_FOUND, "not found")

    def _study(self, study_id: int, auth: bool) -> None:
        console = self.console
        with console.index.session() as session:
            study = session.get(Study, study_id)
            uid = None if study is None else study.study_instance_uid
        if uid is None:
            self._text(HTTPStatus.NOT_FOUND, "no such study")
            return
        report = studies_report(console.index, study_uid=uid)
        (data,) = report["studies"]
        rules = list(console.rules.rules) if console.rules is not None else []
        explanation = explain_study(console.index, console.config.storage.path, study_id, rules)
        if not auth:
            data = pages.redact_studies(report)["studies"][0]
            # verdicts only: the compared values may quote descriptions that hold names
            explanation = "\n".join(line for line in explanation.splitlines()
                                    if line.startswith("rule "))
        patient = console.patients(study_id).get(study_id) if auth else None
        runnable = [r.name for r in rules if r.enabled] if console.run_now is not None else []
        self._html(pages.study_page(data, explanation, patient=patient, authenticated=auth,
                                    rules=runnable))

    def _login(self) -> None:
        """``POST /login`` with the form field ``token``: sets the cookie, back to ``/``."""
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= 4096:
            self._text(HTTPStatus.BAD_REQUEST, "a login form is small")
            return
        form = parse_qs(self.rfile.read(length).decode("utf-8", "replace"))
        presented = (form.get("token") or [""])[0].strip()
        if not self.console.authenticated(presented):
            self.console.failed(self._client())
            self._send(HTTPStatus.UNAUTHORIZED, pages.login_page("wrong token"),
                       "text/html; charset=utf-8")
            return
        LOG.info("console: login from %s", self._client())
        self._send(HTTPStatus.SEE_OTHER, b"", "text/plain; charset=utf-8", {
            "Location": "/",
            "Set-Cookie": f"{_COOKIE}={presented}; HttpOnly; SameSite=Strict; Path=/"})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        console = self.console
        self._cookie = None
        if not self._guard():
            return
        if path == "/login":
            self._login()
            return
        auth = self._access()
        if auth is None:
            return
        if console.token is not None and not auth:
            self._text(HTTPStatus.UNAUTHORIZED, "actions need the token")
            return
        if self.headers.get("X-Dicomnode") != "1":
            self._text(HTTPStatus.FORBIDDEN, "actions need the header X-Dicomnode: 1")
            return
        if match := _JOB_RETRY.match(path):
            job_id = int(match.group(1))
            if reset(console.index, job_id):
                LOG.info("console: job %d queued again by an operator", job_id)
                self._text(200, f"job {job_id} queued again")
            else:
                self._text(HTTPStatus.CONFLICT, f"job {job_id} does not exist or is running")
        elif (match := _RUN_NOW.match(path)) and console.run_now is not None:
            study_id, rule = int(match.group(1)), match.group(2)
            try:
                firings = console.run_now(study_id, rule)
            except KeyError:
                self._text(HTTPStatus.NOT_FOUND, f"no rule named {rule}")
                return
            jobs = [f.job_id or f.existing_job for f in firings
                    if f.job_id is not None or f.existing_job is not None]
            LOG.info("console: rule %s run now on study %d by an operator", rule, study_id)
            if jobs:
                self._text(200, f"rule {rule}: job {', '.join(map(str, jobs))} queued")
            else:
                reasons = "; ".join(f.reason for f in firings) or "no match"
                self._text(HTTPStatus.CONFLICT, f"rule {rule} does not fire: {reasons}")
        elif match := _ITEM_RESEND.match(path):
            item_id = int(match.group(1))
            try:
                console.outbox.resend(item_id)
            except OutboxError as exc:
                self._text(HTTPStatus.CONFLICT, str(exc))
                return
            LOG.info("console: outbox item %d queued again by an operator", item_id)
            self._text(200, f"item {item_id} queued again")
        else:
            self._text(HTTPStatus.NOT_FOUND, "not found")


def _path_of(target: str) -> str:
    """The path of a request target, without its query, escaped for a log line."""
    return _escape(urlsplit(target).path)


def _escape(text: str) -> str:
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")[:300]
