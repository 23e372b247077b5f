"""The operator console as an ASGI application (FastAPI), served by :mod:`dicomnode.web.server`.

Routes:

* ``GET /``: studies, the queue, jobs (with overlay pictures) and the outbox; ``GET /studies/ID``:
  series with geometry verdicts and how each rule evaluates on the study;
  ``GET /jobs/ID/overlay.png``: the picture the job's worker drew;
  ``GET /models/NAME/feedback``: how clinicians' corrections compare with a model's results
  (:mod:`dicomnode.web.feedback`);
* ``GET /api/v1/studies``, ``/api/v1/studies/ID``, ``/api/v1/jobs``, ``/api/v1/queue``
  (running and waiting jobs in claim order, with estimated starts), ``/api/v1/outbox``,
  ``/api/v1/models``, ``/api/v1/rules``, ``/api/v1/models/NAME/feedback``: the JSON the
  pages are built from
  (:mod:`dicomnode.web.api`), described by ``GET /api/v1/openapi.json``;
* ``GET /reviews`` and ``GET /api/v1/reviews``: the jobs whose results are held for review
  (``review: required``), without identity;
* ``POST /api/v1/jobs/ID/retry``, ``POST /api/v1/outbox/ID/resend``,
  ``POST /api/v1/studies/ID/rules/NAME/run``, ``POST /api/v1/jobs/ID/approve`` and
  ``POST /api/v1/jobs/ID/reject`` (JSON body ``{"user": NAME}``: who decides, recorded with
  the decision): the only actions (they need the header ``X-Dicomnode: 1``, which a page of
  another site cannot send, and the token when one is configured);
* ``GET /metrics`` (Prometheus text format), ``GET /healthz`` (never needs the token);
* ``/dicomweb``: room for DICOMweb (:mod:`dicomnode.web.dicomweb`).

Access: bound to a loopback address, anyone on the machine may read the pages and the JSON,
without patient identity; bound elsewhere, every route but ``/healthz`` needs the token. A
request carrying the token (``Authorization: Bearer TOKEN``, or the cookie
``dicomnode_token`` that the login form, ``POST /login``, sets) is authenticated and sees
identity. The token never travels in a URL: a request with ``?token=`` is refused (400),
and nothing logs it.

Defences (:class:`_Guard`, around every route): a request whose ``Host`` is not localhost,
a loopback address, ``web.host`` or one of ``web.allowed_hosts`` is refused (421; DNS
rebinding); after ``web.max_token_failures`` wrong tokens within ``web.lockout_seconds`` a
client address is answered 429 until that time has passed; every answer carries a
Content-Security-Policy (script and style only from ``/static/``), ``X-Frame-Options: DENY``,
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: no-referrer`` and
``Cache-Control: no-store``. Request lines are logged (DEBUG) by path only, escaped.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any
from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi import Path as PathParameter
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from sqlalchemy import select
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.types import Message as AsgiMessage

from dicomnode import __version__
from dicomnode.jobs.policy import queue_report
from dicomnode.jobs.queue import jobs_report, reset
from dicomnode.jobs.review import ReviewError, decide, reviews_report
from dicomnode.rules.explain import explain_study
from dicomnode.send.outbox import OutboxError, outbox_report
from dicomnode.store import audit
from dicomnode.store.queries import studies_report
from dicomnode.store.tables import Job as JobRow
from dicomnode.store.tables import Study
from dicomnode.web import api, feedback, pages
from dicomnode.web.dicomweb import router as dicomweb_router

__all__ = ["COOKIE", "SECURITY_HEADERS", "create_app"]

LOG = logging.getLogger("dicomnode.web.server")
COOKIE = "dicomnode_token"
#: The largest login form read (bytes).
LOGIN_FORM_BYTES = 4096

SECURITY_HEADERS = {
    "Content-Security-Policy": pages.CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_HTML = "text/html; charset=utf-8"
_STATIC = {"/static/console.js": (pages.SCRIPT, "text/javascript; charset=utf-8"),
           "/static/console.css": (pages.STYLE, "text/css; charset=utf-8")}


def _escape(text: str) -> str:
    return text.encode("unicode_escape", "backslashreplace").decode("ascii")[:300]


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class _Guard:
    """Host header, token in the URL, lockout; security headers on every answer; the
    request's path (never its query) in the DEBUG log; an unexpected error answered 500
    without its message."""

    def __init__(self, app: ASGIApp, console: Any) -> None:
        self.app = app
        self.console = console

    def _refusal(self, scope: Scope) -> tuple[int, str] | None:
        if scope["path"] == "/healthz":
            return None
        if not self.console.host_allowed(Headers(scope=scope).get("host")):
            return 421, "this console does not answer to that host name (web.allowed_hosts)"
        if "token" in parse_qs(scope.get("query_string", b"").decode("latin-1")):
            return 400, ("the token never goes in a URL: log in at /login or send "
                         "Authorization: Bearer TOKEN")
        if self.console.locked_out(_client(scope)):
            return 429, "too many wrong tokens from this address; try again later"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 0

        async def secured(message: AsgiMessage) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                for key, value in SECURITY_HEADERS.items():
                    headers[key] = value
            await send(message)

        path = scope["path"]
        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await PlainTextResponse(refusal[1] + "\n", refusal[0])(scope, receive, secured)
            else:
                await self.app(scope, receive, secured)
        except Exception as exc:
            LOG.warning("console: %s failed: %s", _escape(path), type(exc).__name__)
            if status == 0:
                await PlainTextResponse(f"error: {type(exc).__name__}\n", 500)(
                    scope, receive, secured)
        finally:
            LOG.debug("console: %s %s -> %s", scope.get("method"), _escape(path), status)


# ---------------------------------------------------------------- access


def _presented(request: Request) -> str | None:
    """The token presented in the Authorization header or the cookie (never the URL)."""
    header = request.headers.get("authorization", "")
    if header.startswith("Bearer "):
        return header[7:].strip()
    return request.cookies.get(COOKIE)


def access(request: Request) -> bool:
    """Authenticated (True) or open reading (False); raises 401 otherwise."""
    console = request.app.state.console
    presented = _presented(request)
    if console.authenticated(presented):
        return True
    if presented is not None:
        console.failed(_client(request.scope))
        raise HTTPException(401, "wrong token")
    if console.open_reading:
        return False
    raise HTTPException(401, "token required",
                        headers={"WWW-Authenticate": 'Bearer realm="dicomnode"'})


Auth = Annotated[bool, Depends(access)]
ModelName = Annotated[str, PathParameter(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]


def action(request: Request, auth: Auth) -> None:
    """An action: the token when one is configured, and the header ``X-Dicomnode: 1``."""
    if request.app.state.console.token is not None and not auth:
        raise HTTPException(401, "actions need the token")
    if request.headers.get("x-dicomnode") != "1":
        raise HTTPException(403, "actions need the header X-Dicomnode: 1")


# ---------------------------------------------------------------- data (allow-listed views)


def studies_data(console: Any, auth: bool) -> dict[str, Any]:
    view = api.studies_view(studies_report(console.index),
                            identity=api.patient_of(console.index) if auth else None)
    return api.StudyList.model_validate(view).model_dump(exclude_unset=True)


def study_data(console: Any, study_id: int, auth: bool) -> dict[str, Any] | None:
    with console.index.session() as session:
        uid = session.scalar(select(Study.study_instance_uid).where(Study.id == study_id))
    if uid is None:
        return None
    identity = api.patient_of(console.index, [study_id]) if auth else None
    views = api.studies_view(studies_report(console.index, study_uid=uid),
                             identity=identity)["studies"]
    if not views:  # deleted meanwhile
        return None
    rules = list(console.rules.rules) if console.rules is not None else []
    explanation = explain_study(console.index, console.config.storage.path, study_id, rules)
    if not auth:  # verdicts only: the compared values may quote descriptions that hold names
        explanation = "\n".join(line for line in explanation.splitlines()
                                if line.startswith("rule "))
    detail = {**views[0], "explanation": explanation,
              "runnable_rules": console.runnable_rules(),
              "events": events_data(console, auth, study_id=study_id)["events"]}
    return api.StudyDetail.model_validate(detail).model_dump(exclude_unset=True)


def events_data(console: Any, auth: bool, *, study_id: int | None = None,
                job_id: int | None = None) -> dict[str, Any]:
    """The audit events of a study (and its jobs) or of a job, oldest first."""
    with console.index.session() as session:
        rows = (audit.study_events(session, study_id) if study_id is not None
                else audit.job_events(session, int(job_id or 0)))
        events = [audit.event_json(e) for e in rows]
    view = api.events_view(events, authenticated=auth)
    return api.EventList.model_validate(view).model_dump(exclude_unset=True)


def jobs_data(console: Any, auth: bool) -> dict[str, Any]:
    view = api.jobs_view(jobs_report(console.index), authenticated=auth,
                         overlays=console.overlays())
    return api.JobList.model_validate(view).model_dump(exclude_unset=True)


def queue_data(console: Any) -> dict[str, Any]:
    view = api.queue_view(queue_report(console.index, console.config,
                                       providers=getattr(console, "providers", None)))
    return api.QueueList.model_validate(view).model_dump(exclude_unset=True)


def reviews_data(console: Any) -> dict[str, Any]:
    """The jobs whose results await a review (no identity: keys, names, times)."""
    view = api.reviews_view(reviews_report(console.index))
    return api.ReviewList.model_validate(view).model_dump(exclude_unset=True)


def outbox_data(console: Any, auth: bool) -> dict[str, Any]:
    view = api.outbox_view(outbox_report(console.index, root=console.config.storage.path),
                           authenticated=auth)
    return api.OutboxList.model_validate(view).model_dump(exclude_unset=True)


# ---------------------------------------------------------------- the application


def _error(request: Request, exc: Exception) -> Response:
    """HTTP errors: JSON ``{"detail": ...}`` under /api, plain text elsewhere."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith(api.API_PREFIX):
        return JSONResponse({"detail": exc.detail}, exc.status_code, headers=exc.headers)
    return PlainTextResponse(f"{exc.detail}\n", exc.status_code, headers=exc.headers)


def create_app(console: Any) -> FastAPI:
    """The console's application over a :class:`dicomnode.web.server.ConsoleServer`."""
    from starlette.exceptions import HTTPException as StarletteHTTPException

    app = FastAPI(title="dicomnode console", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url=None,  # served below, behind the access check
                  description="The operator console's JSON API. Identity fields (patient "
                              "names, identifiers, UIDs, dates, descriptions) are present "
                              "only for requests that carry the console's token.")
    app.state.console = console
    app.add_exception_handler(StarletteHTTPException, _error)
    app.add_middleware(_Guard, console=console)
    app.include_router(_pages())
    app.include_router(_api_v1(), prefix=api.API_PREFIX)
    app.include_router(dicomweb_router)
    return app


def _pages() -> APIRouter:
    router = APIRouter()

    @router.api_route("/healthz", methods=["GET", "HEAD"], tags=["health"])
    def healthz(request: Request) -> dict[str, str]:
        """Whether the index answers (never needs the token)."""
        return {"status": "ok" if request.app.state.console.healthy() else "error"}

    @router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    def dashboard(request: Request, auth: Auth) -> HTMLResponse:
        console = request.app.state.console
        return HTMLResponse(pages.dashboard(
            studies_data(console, auth), jobs_data(console, auth), outbox_data(console, auth),
            authenticated=auth, queue=queue_data(console)), media_type=_HTML)

    @router.api_route("/studies/{study_id:int}", methods=["GET", "HEAD"],
                      include_in_schema=False)
    def study(request: Request, study_id: int, auth: Auth) -> HTMLResponse:
        data = study_data(request.app.state.console, study_id, auth)
        if data is None:
            raise HTTPException(404, "no such study")
        return HTMLResponse(pages.study_page(data, authenticated=auth), media_type=_HTML)

    @router.get("/jobs/{job_id:int}/overlay.png", include_in_schema=False)
    def overlay(request: Request, job_id: int, auth: Auth) -> Response:
        file = request.app.state.console.overlay_path(job_id)
        if not file.is_file():
            raise HTTPException(404, "no overlay for this job")
        return Response(file.read_bytes(), media_type="image/png")

    @router.api_route("/models/{model}/feedback", methods=["GET", "HEAD"],
                      include_in_schema=False)
    def model_feedback(request: Request, model: ModelName, auth: Auth) -> HTMLResponse:
        view = feedback.feedback_view(request.app.state.console.index, model,
                                      authenticated=auth)
        return HTMLResponse(pages.page(f"{model}: feedback", feedback.feedback_page(view),
                                       authenticated=auth), media_type=_HTML)

    @router.api_route("/reviews", methods=["GET", "HEAD"], include_in_schema=False)
    def reviews_page(request: Request, auth: Auth) -> HTMLResponse:
        return HTMLResponse(pages.reviews_page(reviews_data(request.app.state.console),
                                               authenticated=auth), media_type=_HTML)

    @router.get("/metrics", include_in_schema=False)
    def metrics(request: Request, auth: Auth) -> Response:
        body, content_type = request.app.state.console.metrics()
        return Response(body, headers={"Content-Type": content_type})

    @router.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        text, content_type = _STATIC.get(f"/static/{name}", (None, ""))
        if text is None:
            raise HTTPException(404, "not found")
        return Response(text.encode(), headers={"Content-Type": content_type})

    @router.get("/login", include_in_schema=False)
    def login_form() -> HTMLResponse:
        return HTMLResponse(pages.login_page(), media_type=_HTML)

    @router.post("/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        """The form field ``token``: sets the cookie, back to ``/``."""
        console = request.app.state.console
        form = b""
        async for chunk in request.stream():
            form += chunk
            if len(form) > LOGIN_FORM_BYTES:
                return PlainTextResponse("a login form is small\n", 400)
        fields = parse_qs(form.decode("utf-8", "replace"))
        presented = (fields.get("token") or [""])[0].strip()
        if not console.authenticated(presented):
            console.failed(_client(request.scope))
            return HTMLResponse(pages.login_page("wrong token"), 401, media_type=_HTML)
        LOG.info("console: login from %s", _client(request.scope))
        reply = Response(status_code=303, headers={"Location": "/"})
        reply.set_cookie(COOKIE, presented, httponly=True, samesite="strict", path="/")
        return reply

    return router


def _api_v1() -> APIRouter:
    router = APIRouter(tags=["console"])
    listing: dict[str, Any] = {"response_model_exclude_unset": True}

    @router.get("/openapi.json", include_in_schema=False)
    def openapi(request: Request, auth: Auth) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/studies", response_model=api.StudyList, **listing)
    def studies(request: Request, auth: Auth) -> dict[str, Any]:
        """Studies with their series and geometry verdicts."""
        return studies_data(request.app.state.console, auth)

    @router.get("/studies/{study_id:int}", response_model=api.StudyDetail,
                responses={404: {"model": api.Message}}, **listing)
    def study(request: Request, study_id: int, auth: Auth) -> dict[str, Any]:
        """One study, with how each rule evaluates on it."""
        data = study_data(request.app.state.console, study_id, auth)
        if data is None:
            raise HTTPException(404, "no such study")
        return data

    @router.get("/studies/{study_id:int}/events", response_model=api.EventList,
                responses={404: {"model": api.Message}}, **listing)
    def study_events(request: Request, study_id: int, auth: Auth) -> dict[str, Any]:
        """The study's audit trail: its events and those of its jobs, oldest first."""
        console = request.app.state.console
        with console.index.session() as session:
            if session.get(Study, study_id) is None:
                raise HTTPException(404, "no such study")
        return events_data(console, auth, study_id=study_id)

    @router.get("/jobs/{job_id:int}/events", response_model=api.EventList,
                responses={404: {"model": api.Message}}, **listing)
    def job_events(request: Request, job_id: int, auth: Auth) -> dict[str, Any]:
        """The job's audit trail, oldest first."""
        console = request.app.state.console
        with console.index.session() as session:
            if session.get(JobRow, job_id) is None:
                raise HTTPException(404, "no such job")
        return events_data(console, auth, job_id=job_id)

    @router.get("/jobs", response_model=api.JobList, **listing)
    def jobs(request: Request, auth: Auth) -> dict[str, Any]:
        """Every job, newest first."""
        return jobs_data(request.app.state.console, auth)

    @router.get("/queue", response_model=api.QueueList, **listing)
    def queue(request: Request, auth: Auth) -> dict[str, Any]:
        """Running jobs, then waiting ones in claim order (urgent, normal, background;
        oldest first), each waiting one with an estimate of when it starts."""
        return queue_data(request.app.state.console)

    @router.get("/outbox", response_model=api.OutboxList, **listing)
    def outbox(request: Request, auth: Auth) -> dict[str, Any]:
        """The outbox: counts per state and every item."""
        return outbox_data(request.app.state.console, auth)

    @router.get("/reviews", response_model=api.ReviewList, **listing)
    def reviews(request: Request, auth: Auth) -> dict[str, Any]:
        """The jobs whose results are held until a user approves or rejects them
        (``review: required``), oldest first."""
        return reviews_data(request.app.state.console)

    @router.get("/models", response_model=api.ModelList, **listing)
    def models(request: Request, auth: Auth) -> dict[str, Any]:
        """The model packages in ``models_dir`` and the rules that use each."""
        console = request.app.state.console
        rules = console.rules.rules if console.rules is not None else ()
        return api.models_view(console.config.models_dir, rules)

    @router.get("/models/{model}/feedback", response_model=feedback.FeedbackView, **listing)
    def model_feedback(request: Request, model: ModelName, auth: Auth) -> dict[str, Any]:
        """The clinicians' corrections of a model's results: per structure Dice, HD95, mean
        surface distance and volume change, and the inputs of the jobs they answer."""
        return feedback.feedback_view(request.app.state.console.index, model,
                                      authenticated=auth)

    @router.get("/rules", response_model=api.RuleList, **listing)
    def rules(request: Request, auth: Auth) -> dict[str, Any]:
        """The loaded rules, in evaluation order."""
        console = request.app.state.console
        return api.rules_view(console.rules.rules if console.rules is not None else ())

    actions: dict[str, Any] = {
        "response_model": api.Message, "dependencies": [Depends(action)],
        "responses": {401: {"model": api.Message}, 403: {"model": api.Message},
                      404: {"model": api.Message}, 409: {"model": api.Message}}}

    @router.post("/jobs/{job_id:int}/retry", **actions)
    def retry(request: Request, job_id: int) -> dict[str, str]:
        """Queue a job again (not a running one), with no attempt counted."""
        if not reset(request.app.state.console.index, job_id):
            raise HTTPException(409, f"job {job_id} does not exist or is running")
        LOG.info("console: job %d queued again by an operator", job_id)
        return {"detail": f"job {job_id} queued again"}

    @router.post("/outbox/{item_id:int}/resend", **actions)
    def resend(request: Request, item_id: int) -> dict[str, str]:
        """Queue an outbox item again (not a pending or sending one)."""
        try:
            request.app.state.console.outbox.resend(item_id)
        except OutboxError as exc:
            raise HTTPException(409, str(exc)) from None
        LOG.info("console: outbox item %d queued again by an operator", item_id)
        return {"detail": f"item {item_id} queued again"}

    def _decide(request: Request, job_id: int, body: api.ReviewDecision,
                approve: bool) -> dict[str, str]:
        console = request.app.state.console
        try:
            decision = decide(console.index, console.outbox, job_id, approve=approve,
                              user=body.user)
        except ReviewError as exc:
            raise HTTPException(409, str(exc)) from None
        LOG.info("console: job %d's results %s by %s from %s", job_id, decision.state.value,
                 _escape(decision.user), _client(request.scope))
        return {"detail": f"job {job_id}: results {decision.state.value} by {decision.user} "
                          f"({decision.items} item(s))"}

    @router.post("/jobs/{job_id:int}/approve", **actions)
    def approve(request: Request, job_id: int, body: api.ReviewDecision) -> dict[str, str]:
        """Approve a job's held results: they are sent as usual; the user is recorded."""
        return _decide(request, job_id, body, True)

    @router.post("/jobs/{job_id:int}/reject", **actions)
    def reject(request: Request, job_id: int, body: api.ReviewDecision) -> dict[str, str]:
        """Reject a job's held results: they are never sent; the user is recorded."""
        return _decide(request, job_id, body, False)

    @router.post("/studies/{study_id:int}/rules/{rule}/run", **actions)
    def run_now(request: Request, study_id: int,
                rule: Annotated[str, PathParameter(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
                ) -> dict[str, str]:
        """Run a rule on a study now: settle its series and fire without waiting."""
        run = request.app.state.console.run_now
        if run is None:
            raise HTTPException(404, "this console runs no rule")
        try:
            firings = run(study_id, rule)
        except KeyError:
            raise HTTPException(404, f"no rule named {rule}") from None
        jobs = [f.job_id or f.existing_job for f in firings
                if f.job_id is not None or f.existing_job is not None]
        LOG.info("console: rule %s run now on study %d by an operator", rule, study_id)
        if not jobs:
            reasons = "; ".join(f.reason for f in firings) or "no match"
            raise HTTPException(409, f"rule {rule} does not fire: {reasons}")
        return {"detail": f"rule {rule}: job {', '.join(map(str, jobs))} queued"}

    return router
