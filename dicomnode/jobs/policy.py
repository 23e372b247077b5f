"""What a node's claims may take now, from its configuration, and the queue as an operator
sees it: in claim order, with an estimate of when each job starts.

* **Background hours** (``pipeline.background_hours``, the node's local time, e.g.
  ``22:00-06:00`` wrapping midnight): inside them background jobs are claimed like the
  others (after urgent and normal ones); outside them only while no urgent or normal job is
  pending (see :mod:`dicomnode.jobs.queue`). null: at any time.
* **Per-model limits** (:func:`model_limit`): how many jobs of one model a node runs at
  once: ``pipeline.model_concurrency[model]``, else the card's ``runtime.max_concurrent``,
  else, with ``inference.backend: onnxruntime``, 1 for a model that runs on a GPU (one
  model's sessions fill one GPU) and no limit but ``pipeline.workers`` for one on the CPU.
  Where a model runs is what the workers' warm-up found (the provider its session chose,
  :attr:`dicomnode.jobs.runner.JobRunner.providers`); before that, or for a model not warmed
  up, a GPU is assumed when ``inference.providers`` lists a GPU provider. Counted per node
  (the claiming ``node.id``): each node has its own GPU.
* **One GPU model at a time** (``pipeline.gpu_jobs``, default 1): the jobs of every model
  that runs on the GPU count together against it, so two GPU models do not share (and
  overfill) one GPU's memory; CPU models run beside them up to ``pipeline.workers``.

The clock is a parameter everywhere (``now``): tests give the time instead of waiting for it.
This module imports nothing of the models' stack (the card is read by
:mod:`dicomnode.models.card`, light).
"""

from __future__ import annotations

import datetime as dt
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from sqlalchemy import select

from dicomnode.config import Config, InferenceBackend
from dicomnode.jobs.queue import ClaimPolicy
from dicomnode.models.card import CardError, cached_card
from dicomnode.states import JobPriority
from dicomnode.store.db import Index
from dicomnode.store.queries import iso_utc
from dicomnode.store.tables import Job, JobState, utcnow

__all__ = ["DEFAULT_JOB_SECONDS", "GPU_GROUP", "QUEUE_LIMIT", "background_open", "claim_policy",
           "local_now", "model_group", "model_limit", "queue_report", "runs_on_gpu"]

#: The duration assumed for a model no job of which finished yet (s).
DEFAULT_JOB_SECONDS = 60.0

#: The most queued jobs :func:`queue_report` lists and estimates.
QUEUE_LIMIT = 500

#: How many of a model's latest finished jobs its mean duration is taken from.
_RECENT = 20

_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

#: The group of the models whose jobs run on the GPU (``pipeline.gpu_jobs``).
GPU_GROUP = "gpu"


def local_now() -> dt.datetime:
    """The node's local time, naive (the clock of ``pipeline.background_hours``)."""
    return dt.datetime.now()


def background_open(config: Config, now: dt.datetime) -> bool:
    """Whether ``now`` (local time) is inside ``pipeline.background_hours`` (always, when
    none are configured). The start is included, the end excluded."""
    window = config.pipeline.background_window
    if window is None:
        return True
    start, end = window
    time = now.time()
    if start < end:
        return start <= time < end
    return time >= start or time < end  # wraps midnight


def model_limit(config: Config, model: str,
                providers: Mapping[str, str] | None = None) -> int | None:
    """The most jobs of ``model`` this node runs at once; None: only ``pipeline.workers``
    bounds them. ``providers``: the provider each model's session runs on, where known (the
    workers' warm-up). See the module's description for the order of the settings."""
    configured = config.pipeline.model_concurrency.get(model)
    if configured is not None:
        return configured
    try:
        card_limit = cached_card(config.models_dir / model, verify_files=False) \
            .runtime.max_concurrent
    except CardError:
        card_limit = None  # the job reports the card's problem when it runs
    if card_limit is not None:
        return card_limit
    return 1 if runs_on_gpu(config, model, providers) else None


def runs_on_gpu(config: Config, model: str, providers: Mapping[str, str] | None = None) -> bool:
    """Whether ``model``'s jobs run on this node's GPU: with ``inference.backend:
    onnxruntime``, when the provider its session chose in the workers' warm-up is a GPU
    one (before that: when ``inference.providers`` lists one). A Triton backend queues the
    requests of its GPU itself: False."""
    if config.inference.backend is not InferenceBackend.ONNXRUNTIME:
        return False
    known = (providers or {}).get(model)
    return (known in _GPU_PROVIDERS if known is not None
            else any(p in _GPU_PROVIDERS for p in config.inference.providers))


def model_group(config: Config, model: str,
                providers: Mapping[str, str] | None = None) -> str | None:
    """``"gpu"`` for a model whose jobs run on the GPU (:func:`runs_on_gpu`), else None:
    ``pipeline.gpu_jobs`` limits the jobs of that group together."""
    return GPU_GROUP if runs_on_gpu(config, model, providers) else None


def claim_policy(config: Config, now: dt.datetime,
                 providers: Mapping[str, str] | None = None) -> ClaimPolicy:
    """What this node's claims may take at ``now`` (local time); ``providers`` as for
    :func:`model_limit`."""
    gpu_jobs = config.pipeline.gpu_jobs
    return ClaimPolicy(background_open=background_open(config, now),
                       model_limit=partial(model_limit, config, providers=providers),
                       model_group=partial(model_group, config, providers=providers),
                       group_limits={} if gpu_jobs is None else {GPU_GROUP: gpu_jobs})


@dataclass
class _Queued:
    id: int
    model: str
    priority: JobPriority


def _mean_seconds(index: Index) -> dict[str, float]:
    """Each model's mean run time (s) over its latest finished (done) jobs."""
    seconds: dict[str, list[float]] = defaultdict(list)
    with index.session() as session:
        rows = session.execute(
            select(Job.model, Job.started_at, Job.finished_at)
            .where(Job.state == JobState.DONE, Job.started_at.is_not(None),
                   Job.finished_at.is_not(None))
            .order_by(Job.id.desc()).limit(50 * _RECENT)).all()
    for model, started, finished in rows:
        if len(seconds[model]) < _RECENT and started is not None and finished is not None:
            seconds[model].append(max(0.0, (finished - started).total_seconds()))
    return {model: sum(values) / len(values) for model, values in seconds.items()}


def _simulate(queued: list[_Queued], running: list[tuple[dt.datetime, str]], workers: int,
              policy: ClaimPolicy, duration: Callable[[str], float],
              now: dt.datetime) -> dict[int, dt.datetime]:
    """When each queued job starts if this node's workers take the queue as the claims do
    under ``policy`` (claim order, model and group limits, background held while others
    wait)."""
    group_limits = policy.group_limits
    starts: dict[int, dt.datetime] = {}
    if workers <= 0:
        return starts
    ends = sorted(running)
    free = max(0, workers - len(ends))
    waiting = list(queued)
    time = now
    limits: dict[str, int | None] = {}
    while waiting:
        counts = Counter(model for _, model in ends)
        in_group = Counter(g for _, model in ends if (g := policy.model_group(model)) is not None)
        hold = not policy.background_open and any(
            j.priority is not JobPriority.BACKGROUND for j in waiting)
        for job in list(waiting):
            if free <= 0:
                break
            if hold and job.priority is JobPriority.BACKGROUND:
                continue
            if job.model not in limits:
                limits[job.model] = policy.model_limit(job.model)
            limit = limits[job.model]
            if limit is not None and counts[job.model] >= limit:
                continue
            group = policy.model_group(job.model)
            if group is not None and group in group_limits \
                    and in_group[group] >= group_limits[group]:
                continue
            starts[job.id] = time
            waiting.remove(job)
            free -= 1
            counts[job.model] += 1
            if group is not None:
                in_group[group] += 1
            ends.append((time + dt.timedelta(seconds=duration(job.model)), job.model))
        if not waiting or not ends:
            break
        ends.sort()
        end, _ = ends.pop(0)
        time = max(time, end)
        free += 1
    return starts


def queue_report(index: Index, config: Config, *, now: dt.datetime | None = None,
                 local: dt.datetime | None = None,
                 providers: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The jobs running and waiting, in claim order, as JSON-ready data: each with its
    priority and, for a pending one, ``expected_start``: an estimate from each model's mean
    run time (its latest finished jobs; :data:`DEFAULT_JOB_SECONDS` without any) and this
    node's free workers, as if they alone took the queue (other nodes make it sooner; a job
    that ran past its mean is taken to end now).

    Args:
        now: the current time, naive UTC (default: now).
        local: the node's local time, for ``pipeline.background_hours`` (default: now).
        providers: where each model runs, as for :func:`model_limit`.
    """
    now = now or utcnow()
    local = local or local_now()
    means = _mean_seconds(index)
    fallback = (sum(means.values()) / len(means)) if means else DEFAULT_JOB_SECONDS

    def duration(model: str) -> float:
        return means.get(model, fallback)

    with index.session() as session:
        running_jobs = session.scalars(
            select(Job).where(Job.state == JobState.RUNNING).order_by(Job.started_at, Job.id)
        ).all()
        pending_jobs = session.scalars(
            select(Job).where(Job.state == JobState.PENDING)
            .order_by(Job.priority, Job.id).limit(QUEUE_LIMIT)).all()
        mine = [(max(now, (job.started_at or now) + dt.timedelta(seconds=duration(job.model))),
                 job.model) for job in running_jobs if job.owner == config.node.node_id]
        policy = claim_policy(config, local, providers)
        starts = _simulate([_Queued(j.id, j.model, JobPriority.of_rank(j.priority))
                            for j in pending_jobs], mine, config.pipeline.workers, policy,
                           duration, now)

        def row(position: int | None, job: Job) -> dict[str, Any]:
            start = starts.get(job.id)
            return {
                "position": position, "id": job.id, "rule": job.rule_name, "model": job.model,
                "priority": JobPriority.of_rank(job.priority).value, "state": job.state.value,
                "study": job.study_pk, "attempts": job.attempts,
                "created_at": iso_utc(job.created_at), "started_at": iso_utc(job.started_at),
                "expected_start": iso_utc(start),
                "expected_in_seconds": (None if start is None
                                        else round((start - now).total_seconds(), 1)),
                "mean_seconds": round(duration(job.model), 1),
            }

        rows = ([row(None, job) for job in running_jobs]
                + [row(n, job) for n, job in enumerate(pending_jobs, start=1)])
    return {"schema": 1, "estimate": True, "at": iso_utc(now),
            "workers": config.pipeline.workers,
            "background_hours": config.pipeline.background_hours,
            "background_open": policy.background_open,
            "mean_seconds": {model: round(s, 1) for model, s in sorted(means.items())},
            "jobs": rows}
