"""The job runner in the node's process: hands claimed jobs to worker processes and records
how they end; never in the SCP's threads.

The :class:`JobRunner` keeps a pool of spawned worker processes (``pipeline.workers``); each
keeps its ONNX Runtime sessions cached between jobs (:mod:`dicomnode.jobs.child`). A worker
that dies (a crashing model) fails its job's attempt, not the node. This module imports
nothing of the models: the node's process stays small.

Several nodes may share the index: the runner claims jobs as ``node.id`` with a lease of
``node.lease_seconds``, renews the leases of its running jobs every
``node.heartbeat_seconds`` (:class:`~dicomnode.store.leases.Heartbeat`), and takes over only
jobs whose lease ended (:meth:`JobRunner.recover`). With ``pipeline.workers: 0`` it runs no
jobs (a receive-only node; ``dicomnode worker`` nodes run them).

Each claim takes jobs in claim order as :func:`dicomnode.jobs.policy.claim_policy` allows at
that moment: urgent before normal before background, background only inside
``pipeline.background_hours`` or when nothing else is pending, and no more jobs of a model
at once than its limit on this node.
"""

from __future__ import annotations

import datetime as dt
import logging
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from functools import partial

from dicomnode.config import Config
from dicomnode.jobs import child, feedbackqueue, parentwatch
from dicomnode.jobs.policy import claim_policy, local_now
from dicomnode.jobs.queue import Outcome, claim_next, finish, recover, renew, requeue
from dicomnode.store.db import Index
from dicomnode.store.leases import Heartbeat
from dicomnode.store.tables import JobState

__all__ = ["JobRunner"]

LOG = logging.getLogger("dicomnode.jobs")


class JobRunner:
    """Hands pending jobs to worker processes and records how they end.

    ``clock`` gives the node's local time (naive) for ``pipeline.background_hours``; tests
    give their own.
    """

    def __init__(self, config: Config, index: Index, *,
                 on_done: Callable[[], object] | None = None,
                 clock: Callable[[], dt.datetime] = local_now) -> None:
        self.config = config
        self.index = index
        self.on_done = on_done  # called after a job finished successfully
        self.clock = clock
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[int, Future[Outcome]] = {}
        self._comparing: dict[int, Future[str]] = {}  # feedback objects being compared
        self._lock = threading.Lock()
        self._stopping = False
        self.owner = config.node.node_id
        self._heartbeat: Heartbeat | None = None
        # the provider each model runs on in the workers (their warm-up): per-model limits
        self.providers: dict[str, str] = {}

    def recover(self, *, at_start: bool = False) -> int:
        """Return to ``pending`` the running jobs whose lease ended (their node is gone),
        and at start those this node (``node.id``) left running; their attempt is counted.
        Jobs a live node renews are left to it. At start, feedback objects left being compared
        go back to pending too."""
        if at_start:
            feedbackqueue.recover(self.index)
        return recover(self.index, owner=self.owner if at_start else None)

    def renew(self) -> list[int]:
        """Renew the leases of this runner's running jobs (the heartbeat); returns those
        another node took over meanwhile."""
        with self._lock:
            running = list(self._running)
        return renew(self.index, running, owner=self.owner,
                     lease_seconds=self.config.node.lease_seconds)

    def start(self) -> None:
        """Start the worker processes now and load the rules' models in them, so that the
        first job does not wait for a process to spawn and a model to load."""
        with self._lock:
            if self._stopping or self.config.pipeline.workers == 0:
                return
            pool = self._pool_now()
            warming = [pool.submit(child.warm_up)
                       for _ in range(self.config.pipeline.workers)]
            self._start_heartbeat()
        for future in warming:
            future.add_done_callback(self._warmed)

    def _warmed(self, future: Future[dict[str, str]]) -> None:
        """Record the provider each model runs on, as a worker's warm-up found it."""
        try:
            self.providers.update(future.result())
        except Exception:  # a worker that could not warm up: its first job reports why
            pass

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = Heartbeat(self.config.node.heartbeat_seconds, self.renew,
                                        name="jobs-heartbeat").start()

    def _pool_now(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.config.pipeline.workers,
                mp_context=multiprocessing.get_context("spawn"),
                # a module that imports nothing heavy: the worker checks its parent first
                initializer=parentwatch.init_worker,
                initargs=(os.getpid(), self.config.model_dump(mode="json")))
        return self._pool

    def _free_workers(self) -> int:
        """Worker processes running neither a job nor a comparison (call under the lock)."""
        return self.config.pipeline.workers - len(self._running) - len(self._comparing)

    def dispatch(self) -> list[int]:
        """Claim pending jobs up to the free workers and start them; returns their ids."""
        with self._lock:
            if self._stopping:
                return []
            free = self._free_workers()
            if free <= 0:
                return []
            started = []
            for job_id in claim_next(self.index, free, owner=self.owner,
                                     lease_seconds=self.config.node.lease_seconds,
                                     policy=claim_policy(self.config, self.clock(),
                                                         providers=self.providers)):
                self._start_heartbeat()
                future = self._pool_now().submit(child.work, job_id)
                self._running[job_id] = future
                started.append(job_id)
                LOG.info("job %d started", job_id)
        for job_id in started:
            self._running[job_id].add_done_callback(partial(self._done, job_id))
        return started

    def dispatch_feedback(self) -> list[int]:
        """Claim pending feedback objects up to the workers left free by jobs (jobs go
        first) and compare them in worker processes; returns their ids."""
        with self._lock:
            if self._stopping:
                return []
            free = self._free_workers()
            if free <= 0:
                return []
            started = []
            for feedback_pk in feedbackqueue.pending(self.index, free):
                if not feedbackqueue.claim(self.index, feedback_pk):
                    continue
                self._comparing[feedback_pk] = self._pool_now().submit(child.compare,
                                                                       feedback_pk)
                started.append(feedback_pk)
        for feedback_pk in started:
            self._comparing[feedback_pk].add_done_callback(
                partial(self._compared, feedback_pk))
        return started

    def _compared(self, feedback_pk: int, future: Future[str]) -> None:
        with self._lock:
            self._comparing.pop(feedback_pk, None)
            if self._stopping:
                return  # left running: recovered at the next start
        try:
            future.result()
        except Exception as exc:  # the worker died: the comparison is not tried again
            feedbackqueue.finish(self.index, feedback_pk, feedbackqueue.FeedbackState.FAILED,
                                 f"the worker process comparing it ended: "
                                 f"{type(exc).__name__}")
            with self._lock:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _done(self, job_id: int, future: Future[Outcome]) -> None:
        with self._lock:
            self._running.pop(job_id, None)
            if self._stopping:
                return  # left running: recover() makes it pending at the next start
        try:
            outcome = future.result()
        except Exception as exc:  # the worker process died (BrokenProcessPool) or similar
            outcome = {"ok": False, "permanent": False,
                       "error": f"the worker process running it ended: {type(exc).__name__}"}
            with self._lock:
                pool, self._pool = self._pool, None
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        state = finish(self.index, job_id, outcome, self.config.pipeline.max_attempts,
                       owner=self.owner)
        if state is JobState.DONE and self.on_done is not None:
            try:
                self.on_done()
            except Exception as exc:  # the scheduler's next tick does it anyway
                LOG.warning("after job %d: %s", job_id, type(exc).__name__)

    def busy(self) -> int:
        with self._lock:
            return len(self._running) + len(self._comparing)

    def stop(self) -> None:
        """Stop the workers; jobs still running go back to pending for the next start."""
        with self._lock:
            self._stopping = True
            pool, self._pool = self._pool, None
            running = list(self._running)
            heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.stop()
        if pool is not None:
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:  # a model may run for minutes: do not wait for it
                process.terminate()
            for process in processes:
                process.join(10)
        if running:
            requeue(self.index, running, owner=self.owner)
            LOG.info("%d running job(s) stopped; they run again at the next start",
                     len(running))
