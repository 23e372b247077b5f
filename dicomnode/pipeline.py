"""One job, end to end: bound series -> pseudonymized inputs -> model -> result objects ->
one copy fit for each destination -> outbox.

:func:`run_job` runs a job that the caller has claimed (state ``running``); it is what a
worker process executes (:mod:`dicomnode.worker`), and what ``dicomnode run`` and
``dicomnode jobs retry`` execute in their own process. Everything it writes is
deterministic for a job: the pseudonymized headers (keyed), the result objects' UIDs (seeded
by the job's inputs key, model and version) and the outbox items (unique per object and
destination), so a job re-run after a crash leaves no duplicate anywhere.

The bound series are read once and pseudonymized in memory (the pseudonym map recorded in
the index); no pseudonymized copy of them is written. Working
files live under ``storage.path/jobs/<job id>/``: ``results/`` (SEG, RTSTRUCT, SR,
volumes.json: pseudonymous), ``send/<peer>/`` (the copies re-identified for the clinical
peers, one copy for all of them in the folder of the first) and ``overlay.png``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import SimpleITK as sitk
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomnode.boundary import BoundaryError, for_peer, pseudonymize_datasets, pseudonymizer
from dicomnode.config import Config
from dicomnode.deid import DeidKeyError
from dicomnode.inference.card import CardError, load_card
from dicomnode.inference.predict import InferenceError
from dicomnode.inference.preprocess import PreprocessingError
from dicomnode.inference.segment import Segmentation, load_inputs, segment
from dicomnode.inference.volume import VolumeError
from dicomnode.outbox import Outbox
from dicomnode.outputs.overlay import OverlayStructure, render_overlay
from dicomnode.outputs.source import OutputError
from dicomnode.outputs.write import write_results
from dicomnode.rules.loader import load_rules
from dicomnode.store.db import Index
from dicomnode.store.files import write_atomic
from dicomnode.store.pseudonyms import PseudonymMap
from dicomnode.store.tables import Instance, Job, Series

__all__ = ["JobFailure", "JobSummary", "job_dir", "job_overlay", "run_job"]

LOG = logging.getLogger(__name__)
_PIXEL_DATA = 0x7FE00010

#: Errors that a re-run cannot cure: the job fails at once instead of being retried.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    CardError, InferenceError, PreprocessingError, VolumeError, OutputError, BoundaryError,
    DeidKeyError, KeyError,
)


class JobFailure(Exception):
    """A job that cannot run; ``permanent`` when a re-run would fail the same way."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass
class JobSummary:
    """What one run of a job did: seconds per step, objects written, items queued."""

    job_id: int
    timings: dict[str, float] = field(default_factory=dict)
    results: list[dict[str, str]] = field(default_factory=list)
    enqueued: int = 0
    provider: str = ""


def job_dir(config: Config, job_id: int) -> Path:
    """The working folder of a job (no identity in its name)."""
    return config.storage.path / "jobs" / str(job_id)


def job_overlay(config: Config, job_id: int) -> Path:
    """The console's picture of a job's result."""
    return job_dir(config, job_id) / "overlay.png"


class _Clock:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step] = round(self.timings.get(step, 0.0) + now - self.last, 4)
        self.last = now


def _series_files(index: Index, config: Config, series_uid: str) -> list[Path]:
    with index.session() as session:
        paths = session.scalars(
            select(Instance.file_path).join(Series)
            .where(Series.series_instance_uid == series_uid)).all()
    if not paths:
        raise JobFailure(f"series {series_uid[-12:]}... has no stored instance", permanent=True)
    return [config.storage.path / p for p in paths]


def _describe(exc: BaseException, *, ours: bool) -> str:
    """What a job's error says. Messages of dicomnode's own errors never quote values; those
    of other libraries may (pydicom quotes the values it rejects, and a re-identified result
    holds identity), so of them only the type is kept, and an OSError's reason."""
    text = str(exc).strip() if ours else ""
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_job(config: Config, index: Index, job_id: int) -> JobSummary:
    """Run the claimed job ``job_id``; returns what it did.

    Raises:
        JobFailure: the job cannot complete (``permanent`` when a re-run cannot help).
    """
    try:
        return _run(config, index, job_id)
    except JobFailure:
        raise
    except PERMANENT_ERRORS as exc:
        raise JobFailure(_describe(exc, ours=True), permanent=True) from exc
    except Exception as exc:
        raise JobFailure(_describe(exc, ours=False), permanent=False) from exc


def _run(config: Config, index: Index, job_id: int) -> JobSummary:
    summary = JobSummary(job_id)
    clock = _Clock(summary.timings)
    with index.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobFailure(f"no job {job_id}", permanent=True)
        rule_name, model, inputs_key = job.rule_name, job.model, job.inputs_key
        bindings = [(str(n), str(uid)) for n, uid in job.bindings]
    rules = load_rules(config.rules_dir, peers=config.peers, models_dir=config.models_dir)
    destinations = rules.get(rule_name).send_to
    card = load_card(config.models_dir / model)
    names = [name for name, _ in bindings]
    if names != list(card.input_names):
        raise JobFailure(f"rule {rule_name} binds {', '.join(names)} but model {model} takes "
                         f"{', '.join(card.input_names)}", permanent=True)
    work = job_dir(config, job_id)
    pseudonyms = PseudonymMap(index)
    engine = pseudonymizer(config)
    files: dict[str, list[Path]] = {}
    headers: dict[str, list[Dataset]] = {}
    for name, series_uid in bindings:
        # read once and pseudonymized in memory: the model's inputs are never written
        report = pseudonymize_datasets(_series_files(index, config, series_uid), engine,
                                       pseudonyms)
        if report.failed:
            raise JobFailure(f"{len(report.failed)} instance(s) of series {name} could not be "
                             f"pseudonymized: {report.failed[0][1]}", permanent=True)
        files[name] = [path for path, _ in report.datasets]
        headers[name] = [ds for _, ds in report.datasets]
    clock.lap("pseudonymize")
    volumes = load_inputs(card, files, headers)
    for series in headers.values():  # what the result objects need of them is the header
        for ds in series:
            ds.pop(_PIXEL_DATA, None)
    clock.lap("read")
    result = segment(card, [v.image for v in volumes], providers=config.inference.providers,
                     intra_op_threads=config.inference.intra_op_threads)
    summary.provider = result.provider
    summary.timings["model"] = round(result.timings.session_run, 4)
    clock.lap("inference")
    seed = f"{inputs_key}/{card.name}/{card.version}"
    written = write_results(result, volumes[0], headers[names[0]], work / "results",
                            config.outputs, seed=seed, extra={"job": job_id, "rule": rule_name},
                            keep_datasets=True)
    summary.results = [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
                        "file": str(o.path.relative_to(config.storage.path))}
                       for o in written.objects]
    _draw_overlay(result, volumes[0].image, job_overlay(config, job_id), f"job {job_id}")
    del result, volumes, headers
    clock.lap("write")
    outbox = Outbox.from_config(config, index)
    # research peers first: they take the pseudonymous objects, which re-identification
    # for the clinical peers then changes in memory (one copy serves all clinical peers)
    research = [n for n in destinations if config.peers[n].pseudonymize]
    clinical = [n for n in destinations if not config.peers[n].pseudonymize]
    for group, in_memory in ((research, False), (clinical, True)):
        if not group:
            continue
        peer, label = config.peers[group[0]], ", ".join(group)
        paths = [for_peer(o.path, label, peer, pseudonyms=pseudonyms,
                          out_dir=work / "send" / group[0], pseudonymizer=engine,
                          dataset=o.dataset if in_memory else None).path
                 for o in written.objects]
        summary.enqueued += len(outbox.enqueue(paths, group, job_pk=job_id))
    clock.lap("reidentify")
    return summary


def _draw_overlay(result: Segmentation, image: sitk.Image, path: Path, title: str) -> None:
    """The console's picture of the result (no identity in it); a failure only logs."""
    try:
        png = render_overlay(image, [
            OverlayStructure(s.label.name, s.label.color, s.volume_ml, s.mask, s.voxel_count)
            for s in result.structures], title=f"{title}: {result.card.name} "
                                               f"{result.card.version}")
        write_atomic(path, lambda fp: fp.write(png), fsync=False)
    except Exception as exc:  # the job's results do not depend on its picture
        LOG.warning("%s: no overlay picture (%s)", title, type(exc).__name__)


def summary_json(summary: JobSummary) -> dict[str, Any]:
    """The columns a finished job stores."""
    return {"timings": {**summary.timings, "provider": summary.provider},
            "results": summary.results}
