"""What a worker process runs: set up once, warm the models up, run claimed jobs.

Only this module (and what it imports inside its functions: :mod:`dicomnode.jobs.pipeline`,
``inference/``, ``outputs/``) runs the models; its top-level imports are light, because the
node's process imports it to hand its functions to the pool.
"""

from __future__ import annotations

import logging
from typing import Any

from dicomnode.config import Config
from dicomnode.jobs.queue import Outcome
from dicomnode.logs import setup_logging
from dicomnode.store.db import Index, open_index

__all__ = ["compare", "init_worker_process", "run_claimed", "warm_up", "work"]

LOG = logging.getLogger("dicomnode.jobs")


def run_claimed(config: Config, index: Index, job_id: int) -> Outcome:
    """Run a claimed job in this process; the outcome :func:`dicomnode.jobs.queue.finish`
    records."""
    from dicomnode.jobs.pipeline import JobFailure, run_job, summary_json

    try:
        summary = run_job(config, index, job_id)
    except JobFailure as exc:
        return {"ok": False, "error": str(exc), "permanent": exc.permanent}
    return {"ok": True, "enqueued": summary.enqueued, **summary_json(summary)}


_WORKER: dict[str, Any] = {}


def init_worker_process(config_data: dict[str, Any]) -> None:
    """Set a worker process up (called by :func:`dicomnode.jobs.parentwatch.init_worker`, which
    first ties the worker's life to the node's)."""
    config = Config.model_validate(config_data)
    setup_logging(config.logging.level)
    _WORKER["config"] = config
    _WORKER["index"] = open_index(config.db_url)


def work(job_id: int) -> Outcome:
    """Run claimed job ``job_id`` in this worker process."""
    return run_claimed(_WORKER["config"], _WORKER["index"], job_id)


def compare(feedback_pk: int) -> str:
    """Compare claimed received object ``feedback_pk`` with its job's result in this worker
    process (:mod:`dicomnode.jobs.feedback`); returns the state it recorded."""
    from dicomnode.jobs.feedback import compare_feedback

    return compare_feedback(_WORKER["config"], _WORKER["index"], feedback_pk).value


def warm_up() -> dict[str, str]:
    """Open the ONNX Runtime session of every model a rule names, so that a worker's first
    job does not wait for it (sessions are cached per process); returns the provider each
    opened model runs on (the node's per-model limits use it: a model on the CPU is not
    held to one job at a time)."""
    from dicomnode.inference.runtime import configure_from, open_card_session
    from dicomnode.models.card import cached_card
    from dicomnode.rules.loader import rule_source

    config: Config = _WORKER["config"]
    configure_from(config)
    rules = rule_source(config.rules_dir, peers=config.peers, models_dir=config.models_dir).load()
    opened: dict[str, str] = {}
    for model in sorted({rule.model for rule in rules.enabled}):
        try:
            session = open_card_session(cached_card(config.models_dir / model),
                                        providers=config.inference.providers,
                                        intra_op_threads=config.inference.intra_op_threads)
            opened[model] = str(session.provider)
        except Exception as exc:  # the job that needs it reports the error properly
            LOG.warning("model %s not loaded ahead of its first job: %s", model,
                        type(exc).__name__)
    _warm_up_outputs()
    return opened


def _warm_up_outputs() -> None:
    from dicomnode.jobs.pipeline import warm_up_outputs

    warm_up_outputs()
