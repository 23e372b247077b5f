"""Receiving in several processes (``node.receive_processes``): one GIL per association.

pynetdicom decodes PDUs and DIMSE messages in Python, so one process receives on one CPU
core at most, whatever the number of associations. With ``node.receive_processes: N``
(N > 1) the node's process binds and listens on the SCP port itself, then starts N
receiver processes (spawned, like the job workers) that share that listening socket (a
pre-fork: each accepts connections from it; the one holding the fewest takes the next,
see :class:`dicomnode.receive.guard.AcceptShare`) and
run the same Storage SCP (:class:`dicomnode.receive.scp.StorageSCP`) with the same store
and the same acknowledgement contract. What stays in the node's process: start-up
recovery, completion, rules, jobs, the outbox, the console.

How the index stays consistent:

* each receiver process has its own index writer (:mod:`dicomnode.receive.indexer`):
  one writer per process, so at most N writers; SQLite serialises them (WAL, one writer
  at a time, each waiting up to its busy timeout), and each writes a batch per
  transaction, so they rarely wait. Two receivers creating the same new series (or
  study, or patient) at once: the second one's batch fails on the UNIQUE key, and is
  retried at once instance by instance, which then finds the row the first one made.
  Cached series keys are checked on every use, whoever changed the rows;
* a re-send of an instance is found by its file already being in the store (the same
  path in every process) or its row in the index; an instance sent to two receivers at
  the same moment is stored once (the last rename wins) and indexed once (the UNIQUE key
  on SOPInstanceUID; the second write is retried and updates the row: "replaced");
* which associations deliver to which studies (what completion waits for) is reported to
  the node's process over a queue (:class:`ForwardedActivity`): a receiver writes an
  association's rows before it reports its end, and the queue keeps each process's
  order, so the node never sees an association end before its studies were touched.
  Refused associations are counted there too (the console's metrics).

Limits: ``node.maximum_associations`` and the per-address limits are enforced by each
receiver process for its own connections (so N times the configured value at most). A
receiver ends with the node (it watches its parent, as job workers do) and stops
gracefully on SIGTERM within ``node.shutdown_grace_seconds``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

from dicomnode.completion import AssociationActivity
from dicomnode.config import Config

__all__ = ["ForwardedActivity", "ReceiverProcesses", "run_receiver"]

LOG = logging.getLogger(__name__)

#: How long the node waits for its receiver processes to start listening (seconds).
START_SECONDS = 60.0
#: How often a receiver process checks that the node is still its parent (seconds).
PARENT_WATCH_SECONDS = 0.2
#: After the grace time, how long a receiver process gets to end before it is killed.
STOP_MARGIN_SECONDS = 10.0


class ForwardedActivity(AssociationActivity):
    """A receiver process's association activity, reported to the node's process."""

    def __init__(self, events: Any) -> None:
        super().__init__()
        self._events = events
        self._pid = os.getpid()

    def touch(self, association: Hashable, study_pk: int) -> None:
        self._events.put(("touch", (self._pid, association), study_pk))

    def close(self, association: Hashable) -> None:
        self._events.put(("close", (self._pid, association), None))


def listening_socket(host: str, port: int) -> socket.socket:
    """The SCP's listening socket, bound and listening, non-blocking (shared by the
    receiver processes: those that lose the race for a connection return at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


class ReceiverProcesses:
    """The node's side: the listening socket, the receiver processes, their reports.

    Args:
        config: the node's configuration (``node.receive_processes`` > 1).
        activity: where the receivers' association activity goes.
        on_refused: called with the kind of each association a receiver refused.
    """

    def __init__(self, config: Config, activity: AssociationActivity,
                 on_refused: Callable[[str], None] | None = None) -> None:
        if config.node.receive_processes < 2:
            raise ValueError("ReceiverProcesses needs node.receive_processes >= 2")
        self.config = config
        self.activity = activity
        self.on_refused = on_refused
        self._context = multiprocessing.get_context("spawn")
        self._events: Any = self._context.Queue()
        self._processes: list[Any] = []
        self._socket: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._ready = 0  # receiver processes listening
        self._ready_changed = threading.Condition()

    @property
    def port(self) -> int:
        if self._socket is None:
            return self.config.node.port
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        """Bind the port (an error here stops the start), then start the receivers and
        return once every one of them listens."""
        node = self.config.node
        self._socket = listening_socket(node.host, node.port)
        self._reader = threading.Thread(target=self._read_events, name="receiver-events",
                                        daemon=True)
        self._reader.start()
        data = self.config.model_dump(mode="json")
        counts = self._context.Array("i", node.receive_processes, lock=False)
        for number in range(node.receive_processes):
            process = self._context.Process(
                target=run_receiver, name=f"dicomnode-receiver-{number + 1}",
                args=(os.getpid(), data, self._socket, self._events, counts, number),
                daemon=False)
            process.start()
            self._processes.append(process)
        with self._ready_changed:
            if not self._ready_changed.wait_for(
                    lambda: self._ready >= len(self._processes), START_SECONDS):
                self.stop(0)
                raise RuntimeError(f"{len(self._processes) - self._ready} receiver process(es) "
                                   f"did not start listening within {START_SECONDS:g} s")
        LOG.info("listening as %s on %s:%d in %d receiver processes", node.ae_title,
                 node.host, self.port, len(self._processes))

    def stop(self, grace_seconds: float) -> None:
        """Stop the receivers (SIGTERM: each stops as the in-process SCP does), close the
        socket; returns within ``grace_seconds`` plus :data:`STOP_MARGIN_SECONDS`."""
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self._processes:
            process.join(grace_seconds + STOP_MARGIN_SECONDS)
            if process.is_alive():
                LOG.warning("%s did not stop: killed", process.name)
                process.kill()
                process.join(5)
        self._processes.clear()
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self._events.put(None)
        if self._reader is not None:
            self._reader.join(5)
            self._reader = None

    def _read_events(self) -> None:
        while True:
            try:
                event = self._events.get()
            except (EOFError, OSError):
                return
            if event is None:
                return
            kind, key, value = event
            try:
                if kind == "touch":
                    self.activity.touch(key, int(value))
                elif kind == "close":
                    self.activity.close(key)
                elif kind == "refused" and self.on_refused is not None:
                    self.on_refused(str(value))
                elif kind == "ready":
                    with self._ready_changed:
                        self._ready += 1
                        self._ready_changed.notify_all()
            except Exception as exc:  # a listener must not stop the reports
                LOG.error("receiver report failed: %s", type(exc).__name__)


def _watch_parent(parent: int) -> None:
    """End this process at once when the node (``parent``) is gone (killed -9): an orphan
    receiver would keep the port and acknowledge instances nobody completes."""
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def run_receiver(parent: int, config_data: dict[str, Any], sock: socket.socket,
                 events: Any, counts: Any, slot: int) -> None:
    """A receiver process: the Storage SCP on the shared socket until SIGTERM; ``counts``
    and ``slot`` say how many connections each receiver holds (:class:`AcceptShare`)."""
    _watch_parent(parent)
    from dicomnode.logs import setup_logging
    from dicomnode.net.access import AccessPolicy
    from dicomnode.receive.guard import AcceptShare
    from dicomnode.receive.ingest import InstanceStore
    from dicomnode.receive.scp import StorageSCP
    from dicomnode.store.db import open_index
    from dicomnode.store.files import InstanceFiles

    config = Config.model_validate(config_data)
    setup_logging(config.logging.level)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the node stops its receivers itself
    files = InstanceFiles(config.storage.path, fsync=config.storage.fsync)
    index = open_index(config.db_url, create=False)
    store = InstanceStore(files, index, min_free_bytes=config.storage.min_free_bytes,
                          max_inflated_bytes=config.storage.max_inflated_bytes)
    scp = StorageSCP(config.node, store, AccessPolicy(config.node.ae_title, config.peers),
                     ForwardedActivity(events),
                     on_refused=lambda kind: events.put(("refused", None, kind)))
    scp.start(listen_socket=sock, accept_share=AcceptShare(counts, slot))
    events.put(("ready", None, os.getpid()))
    try:
        while not stop.wait(1.0):
            pass
    finally:
        scp.stop(config.node.shutdown_grace_seconds)
        index.dispose()
        events.close()
        events.join_thread()
