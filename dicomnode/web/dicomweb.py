"""Room for DICOMweb (PS3.18) in the console's application: the routes live under
``/dicomweb``, behind the same Host check, token, lockout and security headers as the rest.

Nothing is served here yet (every path answers 404). The intended layout:

* ``GET /dicomweb/studies``, ``.../series``, ``.../instances``: QIDO-RS, from the index
  (:mod:`dicomnode.store.queries`); identity only with the token, as in ``/api/v1``;
* ``GET /dicomweb/studies/{study}/series/{series}/instances/{instance}``: WADO-RS, from the
  instance files (:mod:`dicomnode.store.files`);
* ``POST /dicomweb/studies``: STOW-RS, through the same entry point as the C-STORE SCP (the
  receive stage's ingest), so that a stored instance is validated, indexed and counted
  towards completion whichever way it came.

Routes are added to :data:`router`; :func:`dicomnode.web.app.create_app` includes it.
"""

from __future__ import annotations

from fastapi import APIRouter

__all__ = ["PREFIX", "router"]

PREFIX = "/dicomweb"

router = APIRouter(prefix=PREFIX, tags=["DICOMweb"])
