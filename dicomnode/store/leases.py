"""Several nodes on one index: claims with an owner and a lease, and the ``node`` table.

A node (``dicomnode serve`` or ``dicomnode worker``) is named by ``node.id`` (default: the
host name). What it claims (a job, an outbox item) carries its name (``owner``) and the end
of its lease; while it works it renews the lease every ``node.heartbeat_seconds``
(:class:`Heartbeat`). A claim whose lease has ended belongs to nobody: any node takes it
over (a node killed with ``kill -9``, a machine that lost power), never earlier. Lease times
are naive UTC times of the nodes' clocks, which must agree (NTP) to well within
``node.lease_seconds``.

The ``node`` table lists the nodes with their role and last heartbeat
(:func:`register_node`, :func:`beat_node`, :func:`nodes_report`).
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from dicomnode import __version__
from dicomnode.states import NodeRole
from dicomnode.store.db import Index
from dicomnode.store.queries import iso_utc
from dicomnode.store.tables import NodeRecord, utcnow

__all__ = ["NODES_SCHEMA_VERSION", "Heartbeat", "beat_node", "nodes_report", "register_node",
           "stop_node"]

LOG = logging.getLogger("dicomnode.leases")

NODES_SCHEMA_VERSION = 1


class Heartbeat:
    """Calls ``beat`` every ``interval`` seconds in a daemon thread until :meth:`stop`.

    An exception in ``beat`` (the index unreachable for a moment) is logged by its type and
    the next beat comes as usual: a lease lapses only when beats fail for its whole length.

    Raises:
        ValueError: ``interval`` is not positive.
    """

    def __init__(self, interval: float, beat: Callable[[], object], *, name: str) -> None:
        if interval <= 0:
            raise ValueError(f"a heartbeat interval must be > 0 s, not {interval!r}")
        self.interval = interval
        self.beat = beat
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> Heartbeat:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # the next beat tries again
                LOG.warning("%s: heartbeat failed: %s", self._thread.name, type(exc).__name__)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def __enter__(self) -> Heartbeat:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def lease_end(lease_seconds: float, now: dt.datetime | None = None) -> dt.datetime:
    """When a lease taken or renewed at ``now`` (default: the current time) ends."""
    return (now or utcnow()) + dt.timedelta(seconds=lease_seconds)


def register_node(index: Index, node_id: str, role: NodeRole) -> None:
    """Record that node ``node_id`` starts now in ``role`` (a row per node id, kept across
    restarts). A row of the same id that heartbeated within the last minute and names
    another process is reported: two live processes must not share a node id."""
    now = utcnow()
    host, pid = socket.gethostname(), os.getpid()
    for attempt in range(2):
        with index.session() as session:
            row = session.get(NodeRecord, node_id)
            if row is None:
                session.add(NodeRecord(id=node_id, role=role, version=__version__, host=host,
                                       pid=pid, started_at=now, heartbeat_at=now))
            else:
                if (row.stopped_at is None and (row.host, row.pid) != (host, pid)
                        and now - row.heartbeat_at < dt.timedelta(minutes=1)):
                    LOG.warning("node id %s was alive %.0f s ago in another process: each "
                                "process sharing the index needs its own node.id", node_id,
                                (now - row.heartbeat_at).total_seconds())
                row.role, row.version, row.host, row.pid = role, __version__, host, pid
                row.started_at, row.heartbeat_at, row.stopped_at = now, now, None
            try:
                session.commit()
                return
            except IntegrityError:  # registered at the same moment by another process
                if attempt:
                    raise


def beat_node(index: Index, node_id: str) -> None:
    """Record that node ``node_id`` is alive now."""
    with index.session() as session, session.begin():
        session.execute(update(NodeRecord).where(NodeRecord.id == node_id)
                        .values(heartbeat_at=utcnow()))


def stop_node(index: Index, node_id: str) -> None:
    """Record that node ``node_id`` stopped (gracefully)."""
    now = utcnow()
    with index.session() as session, session.begin():
        session.execute(update(NodeRecord).where(NodeRecord.id == node_id)
                        .values(heartbeat_at=now, stopped_at=now))


def nodes_report(index: Index, *, lease_seconds: float,
                 now: dt.datetime | None = None) -> dict[str, Any]:
    """The nodes sharing the index as JSON-ready data: each with its role, release, host,
    process, start and last heartbeat; ``alive`` when it heartbeated within
    ``lease_seconds`` and did not stop."""
    now = now or utcnow()
    with index.session() as session:
        rows = session.scalars(select(NodeRecord).order_by(NodeRecord.id)).all()
        nodes = [{
            "id": row.id,
            "role": NodeRole(row.role).value,
            "version": row.version,
            "host": row.host,
            "pid": row.pid,
            "started_at": iso_utc(row.started_at),
            "heartbeat_at": iso_utc(row.heartbeat_at),
            "seconds_since_heartbeat": round((now - row.heartbeat_at).total_seconds(), 1),
            "stopped_at": iso_utc(row.stopped_at),
            "alive": row.stopped_at is None
            and (now - row.heartbeat_at).total_seconds() <= lease_seconds,
        } for row in rows]
    return {"schema": NODES_SCHEMA_VERSION, "nodes": nodes}
