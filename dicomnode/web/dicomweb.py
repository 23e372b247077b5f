"""DICOMweb (PS3.18) in the console's application: the routes live under ``/dicomweb``,
behind the same Host check, lockout and security headers as the rest.

Served:

* ``POST /dicomweb/studies`` and ``POST /dicomweb/studies/{study}``: STOW-RS (PS3.18
  10.5), ``multipart/related; type="application/dicom"``, through the same entry point as
  the C-STORE SCP (the receive stage's ingest), so that a stored instance is validated,
  durable, indexed and counted towards completion whichever way it came
  (:mod:`dicomnode.web.stow`). Always authenticated, even on a loopback console: the
  console's token (``Authorization: Bearer``) or a peer's ``dicomweb.receive_auth``
  (bearer or HTTP Basic), from the peer's ``host`` when it names one. A wrong credential
  counts towards the console's lockout. The answer is ``application/dicom+json``.

Room for the rest (every other path answers 404):

* ``GET /dicomweb/studies``, ``.../series``, ``.../instances``: QIDO-RS, from the index
  (:mod:`dicomnode.store.queries`); identity only with the token, as in ``/api/v1``;
* ``GET /dicomweb/studies/{study}/series/{series}/instances/{instance}``: WADO-RS, from the
  instance files (:mod:`dicomnode.store.files`).

Routes are added to :data:`router`; :func:`dicomnode.web.app.create_app` includes it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.concurrency import run_in_threadpool

from dicomnode.net.access import printable
from dicomnode.web.stow import (
    DICOM_JSON,
    MultipartError,
    MultipartParser,
    StowReceiver,
    multipart_boundary,
    store_response,
)

__all__ = ["PREFIX", "router"]

LOG = logging.getLogger("dicomnode.web.stow")

PREFIX = "/dicomweb"

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])

_UID_CHARACTERS = frozenset("0123456789.")


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(text + "\n", status, headers=headers)


async def _stow(request: Request, study_uid: str | None) -> Response:
    console: Any = request.app.state.console
    receiver: StowReceiver | None = getattr(console, "stow", None)
    if receiver is None:
        return _plain(503, "STOW-RS is not served by this console")
    client = _client(request)
    # in a worker thread: it reads the secret files and may resolve a peer's host name
    sender, refusal = await run_in_threadpool(
        receiver.credentials.identify, request.headers.get("authorization"), client)
    if sender is None:
        if refusal == 401:
            if request.headers.get("authorization"):
                console.failed(client)
            return _plain(401, "STOW-RS needs the console's token or a peer's credential "
                               "(peers.NAME.dicomweb.receive_auth)",
                          {"WWW-Authenticate": 'Bearer realm="dicomnode", Basic '
                                               'realm="dicomnode"'})
        return _plain(403, "this credential is not accepted from this address")
    if study_uid is not None and (not 0 < len(study_uid) <= 64
                                  or not set(study_uid) <= _UID_CHARACTERS):
        return _plain(400, "the study in the URL is not a UID")
    boundary, why = multipart_boundary(request.headers.get("content-type"))
    if boundary is None:
        LOG.warning("STOW-RS from %s: refused Content-Type %s", printable(client),
                    printable(request.headers.get("content-type", ""), 200))
        return _plain(415, why)
    stow = receiver.request(sender, study_uid)
    parser = MultipartParser(boundary, stow.on_part, stow.on_data, stow.on_end)
    try:
        try:
            async for chunk in request.stream():
                parser.feed(chunk)
                if stow.finished:  # durable before the next bytes are read
                    await run_in_threadpool(stow.ingest_finished)
            parser.close()
        except MultipartError as exc:
            LOG.warning("STOW-RS from %s: bad request: %s", printable(client), exc)
            return _plain(400, f"not a multipart/related body: {exc}")
        if stow.finished:
            await run_in_threadpool(stow.ingest_finished)
        if not stow.outcomes:
            return _plain(400, "the request holds no part")
        status, body = store_response(stow.outcomes)
        return JSONResponse(body, status, media_type=DICOM_JSON)
    finally:
        receiver.finish(stow)


@router.post("/studies", include_in_schema=False)
async def store_instances(request: Request) -> Response:
    """STOW-RS: store the instances of the request (any study)."""
    return await _stow(request, None)


@router.post("/studies/{study}", include_in_schema=False)
async def store_study_instances(request: Request, study: str) -> Response:
    """STOW-RS: store the instances of the request, all of one study (others fail 0xA901)."""
    return await _stow(request, study)
