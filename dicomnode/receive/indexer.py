"""The index writer: one background thread that writes the rows of received instances.

A received instance is acknowledged (C-STORE Success) once the instance itself is
durable: its file fsynced in its final place and its folder entry fsynced
(:meth:`dicomnode.receive.ingest.InstanceStore.receive`). Its index row follows from
this writer, which takes the instances queued since its last pass and writes them in one
transaction (one SQLite commit per batch instead of one per instance):

* for a series whose keys it has cached (series and study primary keys, checked on
  every use), with SQLAlchemy Core statements: one ``INSERT`` of every new row, one
  ``UPDATE`` of each series (geometry dirty, last received, missing descriptive values)
  and of each study (last received, re-opened when it was complete);
* otherwise (the first instance of a series, an instance already indexed under another
  path) with the ORM, exactly as a synchronous ingest would.

A batch waits at most :data:`BATCH_SECONDS` after its first instance, so readers of the
index see a row within about that much (plus the commit) after Success.
:meth:`IndexWriter.flush` waits until everything queued so far is written (the SCP calls
it when a peer asks to release its association, so a released association's instances
are all indexed).

When a batch cannot be written (the database is locked, full or gone), it is rolled
back and its instances are written one by one; an instance that fails
:data:`MAX_ATTEMPTS` times (over about :data:`RETRY_SECONDS` each) is given up: it is
durable in the store, and :func:`dicomnode.receive.recovery.recover_orphans` indexes it
at the next start. While the writer holds instances it failed to write,
:attr:`IndexWriter.failing` is true and the SCP refuses new instances with 0xA701
(index unavailable) rather than acknowledge more than it can index.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

if TYPE_CHECKING:
    from dicomnode.receive.ingest import IngestResult, InstanceStore, Pending

__all__ = ["BATCH_SECONDS", "MAX_ATTEMPTS", "MAX_BATCH", "IndexWriter"]

LOG = logging.getLogger(__name__)

#: Longest a queued instance waits for the rest of its batch (seconds).
BATCH_SECONDS = 0.05
#: Most instances written in one transaction.
MAX_BATCH = 256
#: Times the writer tries one instance before leaving it to recovery at the next start.
MAX_ATTEMPTS = 5
#: Wait between two tries of a failed instance (seconds).
RETRY_SECONDS = 0.5

OnIndexed = Callable[["IngestResult"], None]


@dataclass(eq=False)
class _Flush:
    """A marker in the queue: set once everything queued before it is written."""

    done: threading.Event = field(default_factory=threading.Event)


class IndexWriter:
    """The single writer of received instances' index rows (module docstring).

    Args:
        store: whose index the rows go to (:meth:`InstanceStore.write_batch` writes).
    """

    def __init__(self, store: InstanceStore) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[Pending | _Flush | None] = queue.SimpleQueue()
        self._retry: list[Pending] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.written = 0
        self.given_up = 0

    @property
    def failing(self) -> bool:
        """Whether instances wait for another try after their write failed."""
        return bool(self._retry)

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="index-writer",
                                                daemon=True)
                self._thread.start()

    def put(self, item: Pending) -> None:
        """Queue the row of an instance already durable in the store."""
        self.start()
        self._queue.put(item)

    def flush(self, timeout: float | None = 30.0) -> bool:
        """Wait until every instance queued before this call is written (or given up);
        False when ``timeout`` (seconds) passed first."""
        thread = self._thread
        if thread is None or not thread.is_alive():
            return True
        marker = _Flush()
        self._queue.put(marker)
        return marker.done.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """Write what is queued, then end the thread."""
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(timeout)
        self._thread = None

    # ------------------------------------------------------------------------ the thread

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch: list[Pending] = []
            markers: list[_Flush] = []
            timeout = RETRY_SECONDS if self._retry else None
            try:
                first = self._queue.get(timeout=timeout)
            except queue.Empty:  # a retry is due
                self._write([])
                continue
            stopping = first is None
            if isinstance(first, _Flush):
                markers.append(first)
            elif first is not None:
                batch.append(first)
                deadline = time.monotonic() + BATCH_SECONDS
                while len(batch) < MAX_BATCH:
                    left = deadline - time.monotonic()
                    try:
                        item = self._queue.get(timeout=left) if left > 0 else \
                            self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                    if isinstance(item, _Flush):
                        markers.append(item)
                        break
                    batch.append(item)
            # whatever else is queued now joins this pass (a flush waits for no timer)
            while not stopping and len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                elif isinstance(item, _Flush):
                    markers.append(item)
                else:
                    batch.append(item)
            self._write(batch)
            if markers and self._retry:  # a flush waits for the retries too
                self._retry_all(final=stopping)
            for marker in markers:
                marker.done.set()
        self._retry_all(final=True)

    def _write(self, batch: list[Pending]) -> None:
        retry, self._retry = self._retry, []
        if batch:
            try:
                results = self._store.write_batch(batch)
            except SQLAlchemyError as exc:
                LOG.error("index write of %d instance(s) failed (%s): writing them one by one",
                          len(batch), type(exc).__name__)
                retry.extend(batch)
            else:
                self._done(batch, results)
        for item in retry:
            self._one(item)

    def _one(self, item: Pending) -> None:
        try:
            results = self._store.write_batch([item])
        except SQLAlchemyError as exc:
            item.attempts += 1
            if item.attempts >= MAX_ATTEMPTS:
                LOG.error("index write failed %d times (%s): the instance is stored and is "
                          "indexed at the next start", item.attempts, type(exc).__name__)
                self.given_up += 1
                self._store.forget(item)
            else:
                self._retry.append(item)
            return
        self._done([item], results)

    def _retry_all(self, *, final: bool) -> None:
        while self._retry:
            time.sleep(RETRY_SECONDS)
            pending, self._retry = self._retry, []
            for item in pending:
                if final:
                    item.attempts = max(item.attempts, MAX_ATTEMPTS - 1)
                self._one(item)

    def _done(self, batch: list[Pending], results: list[IngestResult]) -> None:
        self.written += len(batch)
        for item, result in zip(batch, results, strict=True):
            self._store.forget(item)
            if item.on_indexed is not None:
                try:
                    item.on_indexed(result)
                except Exception as exc:  # a listener must not stop the writer
                    LOG.error("index listener failed: %s", type(exc).__name__)
