"""Jobs in worker processes: claim, run, finish; never in the SCP's threads.

States (``job.state``)::

    pending --claim--> running --done----------------------------> done
                          |-----failure, permanent or last attempt-> failed
                          '-----failure, attempts left-------------> pending

A claim is one conditional UPDATE (``pending`` -> ``running``, attempts + 1), so two
processes (the node and ``dicomnode jobs retry``) never run the same job at once. The
node's :class:`JobRunner` hands claimed jobs to a pool of spawned worker processes
(``pipeline.workers``); each worker keeps its ONNX Runtime sessions cached between jobs.
A worker that dies (a crashing model) fails its job's attempt, not the node. At start,
jobs left ``running`` by a crash go back to ``pending``: their re-run writes the same
objects (see :mod:`dicomnode.pipeline`).
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
from typing import Any, cast

from sqlalchemy import CursorResult, select, update

from dicomnode import parentwatch
from dicomnode.config import Config
from dicomnode.inference.card import cached_card
from dicomnode.inference.runtime import configure_from, open_card_session
from dicomnode.logs import setup_logging
from dicomnode.pipeline import JobFailure, run_job, summary_json
from dicomnode.rules.loader import rule_source
from dicomnode.store.db import Index, open_index
from dicomnode.store.queries import format_timings, iso_utc
from dicomnode.store.tables import Job, JobState, utcnow

__all__ = ["JobRunner", "claim", "finish", "jobs_report", "reset", "run_claimed"]

LOG = logging.getLogger(__name__)

Outcome = dict[str, Any]


def claim(index: Index, job_id: int) -> bool:
    """Mark a pending job running (attempts + 1); False when it is not pending."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.PENDING)
            .values(state=JobState.RUNNING, attempts=Job.attempts + 1, started_at=utcnow(),
                    finished_at=None)))
        return result.rowcount == 1


def reset(index: Index, job_id: int) -> bool:
    """Make a job pending again with no attempt counted (an operator's retry)."""
    with index.session() as session, session.begin():
        result = cast(CursorResult[Any], session.execute(
            update(Job).where(Job.id == job_id, Job.state != JobState.RUNNING)
            .values(state=JobState.PENDING, attempts=0, error=None)))
        return result.rowcount == 1


def finish(index: Index, job_id: int, outcome: Outcome, max_attempts: int) -> JobState:
    """Record a run's outcome: done, failed, or pending again for another attempt."""
    with index.session() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            return JobState.FAILED
        job.finished_at = utcnow()
        if outcome["ok"]:
            job.state = JobState.DONE
            job.error = None
            job.timings = outcome["timings"]
            job.results = outcome["results"]
        else:
            job.error = str(outcome["error"])[:2000]
            last = outcome["permanent"] or job.attempts >= max_attempts
            job.state = JobState.FAILED if last else JobState.PENDING
        state = job.state
    if outcome["ok"]:
        LOG.info("job %d done (%s)", job_id, format_timings(outcome["timings"]))
    else:
        LOG.warning("job %d %s: %s", job_id,
                    "failed" if state is JobState.FAILED else "will be tried again",
                    outcome["error"])
    return state


def run_claimed(config: Config, index: Index, job_id: int) -> Outcome:
    """Run a claimed job in this process; the outcome :func:`finish` records."""
    try:
        summary = run_job(config, index, job_id)
    except JobFailure as exc:
        return {"ok": False, "error": str(exc), "permanent": exc.permanent}
    return {"ok": True, "enqueued": summary.enqueued, **summary_json(summary)}


# ---------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}


def init_worker_process(config_data: dict[str, Any]) -> None:
    """Set a worker process up (called by :func:`dicomnode.parentwatch.init_worker`, which
    first ties the worker's life to the node's)."""
    config = Config.model_validate(config_data)
    setup_logging(config.logging.level)
    _WORKER["config"] = config
    _WORKER["index"] = open_index(config.db_url)


def _work(job_id: int) -> Outcome:
    return run_claimed(_WORKER["config"], _WORKER["index"], job_id)


def _warm_up() -> int:
    """Open the ONNX Runtime session of every model a rule names, so that a worker's first
    job does not wait for it (sessions are cached per process); returns how many."""
    config: Config = _WORKER["config"]
    configure_from(config)
    rules = rule_source(config.rules_dir, peers=config.peers, models_dir=config.models_dir).load()
    opened = 0
    for model in sorted({rule.model for rule in rules.enabled}):
        try:
            open_card_session(cached_card(config.models_dir / model),
                              providers=config.inference.providers,
                              intra_op_threads=config.inference.intra_op_threads)
            opened += 1
        except Exception as exc:  # the job that needs it reports the error properly
            LOG.warning("model %s not loaded ahead of its first job: %s", model,
                        type(exc).__name__)
    return opened


class JobRunner:
    """Hands pending jobs to worker processes and records how they end."""

    def __init__(self, config: Config, index: Index, *,
                 on_done: Callable[[], object] | None = None) -> None:
        self.config = config
        self.index = index
        self.on_done = on_done  # called after a job finished successfully
        self._pool: ProcessPoolExecutor | None = None
        self._running: dict[int, Future[Outcome]] = {}
        self._lock = threading.Lock()
        self._stopping = False

    def recover(self) -> int:
        """Return jobs a crash left ``running`` to ``pending`` (their attempt is counted)."""
        with self.index.session() as session, session.begin():
            result = cast(CursorResult[Any], session.execute(
                update(Job).where(Job.state == JobState.RUNNING)
                .values(state=JobState.PENDING)))
            count = int(result.rowcount)
        if count:
            LOG.info("%d job(s) interrupted by a stop or crash will run again", count)
        return count

    def start(self) -> None:
        """Start the worker processes now and load the rules' models in them, so that the
        first job does not wait for a process to spawn and a model to load."""
        with self._lock:
            if self._stopping:
                return
            pool = self._pool_now()
            for _ in range(self.config.pipeline.workers):
                pool.submit(_warm_up)

    def _pool_now(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.config.pipeline.workers,
                mp_context=multiprocessing.get_context("spawn"),
                # a module that imports nothing heavy: the worker checks its parent first
                initializer=parentwatch.init_worker,
                initargs=(os.getpid(), self.config.model_dump(mode="json")))
        return self._pool

    def dispatch(self) -> list[int]:
        """Claim pending jobs up to the free workers and start them; returns their ids."""
        with self._lock:
            if self._stopping:
                return []
            free = self.config.pipeline.workers - len(self._running)
            if free <= 0:
                return []
            with self.index.session() as session:
                candidates = session.scalars(
                    select(Job.id).where(Job.state == JobState.PENDING)
                    .order_by(Job.id).limit(free)).all()
            started = []
            for job_id in candidates:
                if not claim(self.index, job_id):
                    continue
                future = self._pool_now().submit(_work, job_id)
                self._running[job_id] = future
                started.append(job_id)
                LOG.info("job %d started", job_id)
        for job_id in started:
            self._running[job_id].add_done_callback(partial(self._done, job_id))
        return started

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
        state = finish(self.index, job_id, outcome, self.config.pipeline.max_attempts)
        if state is JobState.DONE and self.on_done is not None:
            try:
                self.on_done()
            except Exception as exc:  # the scheduler's next tick does it anyway
                LOG.warning("after job %d: %s", job_id, type(exc).__name__)

    def busy(self) -> int:
        with self._lock:
            return len(self._running)

    def stop(self) -> None:
        """Stop the workers; jobs still running go back to pending for the next start."""
        with self._lock:
            self._stopping = True
            pool, self._pool = self._pool, None
            running = list(self._running)
        if pool is not None:
            processes = list(getattr(pool, "_processes", {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for process in processes:  # a model may run for minutes: do not wait for it
                process.terminate()
            for process in processes:
                process.join(10)
        if running:
            with self.index.session() as session, session.begin():
                session.execute(update(Job).where(Job.id.in_(running),
                                                  Job.state == JobState.RUNNING)
                                .values(state=JobState.PENDING, attempts=Job.attempts - 1))
            LOG.info("%d running job(s) stopped; they run again at the next start",
                     len(running))


def _seconds(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def jobs_report(index: Index, *, state: str | None = None) -> dict[str, Any]:
    """Every job (newest first) as JSON-ready data (docs/jobs-json.md)."""
    with index.session() as session:
        query = select(Job).order_by(Job.id.desc())
        if state is not None:
            query = query.where(Job.state == JobState(state))
        jobs = session.scalars(query).all()
        rows = [{
            "id": job.id,
            "rule": job.rule_name,
            "model": job.model,
            "study": job.study_pk,
            "inputs": [name for name, _ in job.bindings],
            "trigger": job.trigger,
            "version": job.version or 1,
            "changes": job.changes,
            "instances": job.instance_count,
            "withdrawn_by": job.withdrawn_by,
            "state": job.state.value,
            "attempts": job.attempts,
            "created_at": iso_utc(job.created_at),
            "started_at": iso_utc(job.started_at),
            "finished_at": iso_utc(job.finished_at),
            "seconds": _seconds(job.started_at, job.finished_at),
            "timings": job.timings,
            "results": job.results or [],
            "error": job.error,
        } for job in jobs]
    return {"schema": 1, "jobs": rows}
