"""The operator console: status pages, overlay pictures, the JSON API (``/api/v1``),
/metrics and /healthz; a FastAPI application served by uvicorn in the node's process.

Importing this package imports nothing: the node imports :mod:`dicomnode.web.server` only
when ``web.enabled`` is true.
"""
