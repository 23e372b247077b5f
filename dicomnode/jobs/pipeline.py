"""One job, end to end: bound series -> pseudonymized inputs -> model -> result objects ->
one copy fit for each destination -> outbox.

:func:`run_job` runs a job that the caller has claimed (state ``running``); it is what a
worker process executes (:mod:`dicomnode.jobs.runner`), and what ``dicomnode run`` and
``dicomnode jobs retry`` execute in their own process. Everything it writes is
deterministic for a job: the pseudonymized headers (keyed), the result objects' UIDs (seeded
by the job's inputs key, its version, the model and the model's version) and the outbox
items (unique per object and destination), so a job re-run after a crash writes the same
objects again. A newer version of a job (its input series changed) writes new UIDs, and
withdraws what the earlier versions sent with an IHE IOCM rejection note
(``outputs.reject_superseded``); their items not sent yet are cancelled.

The job carries its rule's decisions, recorded when it was created: the model, the bound
series, ``outputs`` (which objects) and ``send_to`` (where they go).

Model approval, checked again here whatever the rules said when they loaded: the results of
a model whose card is not ``status: clinical`` are never queued for a clinical peer (each
such peer is left out, logged and recorded as the audit event ``job.send_refused``), and
they say ``RESEARCH - NOT FOR CLINICAL USE`` (:func:`dicomnode.outputs.algorithm.marked`).
A rule with ``review: required`` (as loaded when the results are queued; a rule no longer
there counts as one) has its results queued ``held`` until a console user decides
(:mod:`dicomnode.jobs.review`).

The bound series are read once and pseudonymized in memory (the pseudonym map recorded in
the index); no pseudonymized copy of them is written. Working
files live under ``storage.path/jobs/<job id>/``: ``results/`` (SEG, RTSTRUCT, SR,
volumes.json: pseudonymous), ``send/<peer>/`` (the copies re-identified for the clinical
peers, one copy for all of them in the folder of the first) and ``overlay.png``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from sqlalchemy import select, update

from dicomnode.boundary import BoundaryError, for_peer, pseudonymize_datasets, pseudonymizer
from dicomnode.config import Config
from dicomnode.deid import DeidKeyError
from dicomnode.inference.predict import InferenceError
from dicomnode.inference.preprocess import PreprocessingError
from dicomnode.inference.runtime import configure_from
from dicomnode.inference.segment import Segmentation, load_inputs, segment
from dicomnode.inference.volume import VolumeError
from dicomnode.jobs.feedback import record_job_input
from dicomnode.jobs.files import job_dir, job_overlay
from dicomnode.jobs.review import hold
from dicomnode.models.card import Card, CardError, cached_card, file_sha256
from dicomnode.outputs.algorithm import marked
from dicomnode.outputs.overlay import OverlayStructure, render_overlay
from dicomnode.outputs.rejection import build_rejection_note, write_rejection_note
from dicomnode.outputs.source import OutputError
from dicomnode.outputs.write import ResultObject, write_results
from dicomnode.rules.loader import RuleFileError, rule_source
from dicomnode.send.outbox import Outbox
from dicomnode.store import audit
from dicomnode.store.db import Index
from dicomnode.store.files import write_atomic
from dicomnode.store.pseudonyms import PseudonymMap
from dicomnode.store.queries import series_files
from dicomnode.store.tables import Job, JobState

__all__ = ["JobFailure", "JobSummary", "run_job", "warm_up_outputs"]

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
    results: list[dict[str, Any]] = field(default_factory=list)
    enqueued: int = 0
    provider: str = ""


class _Clock:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings = timings
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.timings[step] = round(self.timings.get(step, 0.0) + now - self.last, 4)
        self.last = now


def _series_files(index: Index, config: Config, series_uid: str) -> list[Path]:
    paths = series_files(index, config.storage.path, series_uid)
    if not paths:
        raise JobFailure(f"series {series_uid[-12:]}... has no stored instance", permanent=True)
    return paths


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
        # (an inference server that is down is no fault of the job: tried again)
        raise JobFailure(_describe(exc, ours=True),
                         permanent=not getattr(exc, "transient", False)) from exc
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
        version, kinds = job.version or 1, job.outputs
        bindings = [(str(n), str(uid)) for n, uid in job.bindings]
        send_to = job.send_to
    if send_to is None:  # a job created before jobs recorded their rule's decisions
        rules = rule_source(config.rules_dir, peers=config.peers,
                            models_dir=config.models_dir).load()
        send_to = list(rules.get(rule_name).send_to)
    destinations = [str(name) for name in send_to]
    unknown = [name for name in destinations if name not in config.peers]
    if unknown:
        raise JobFailure(f"job {job_id} sends to {', '.join(unknown)}, which is no longer a "
                         "configured peer", permanent=True)
    card = cached_card(config.models_dir / model)
    _audit(index, audit.EventKind.JOB_STARTED, job_id, model=card.name,
           model_version=card.version, digest=model_digest(card))
    destinations = _approved_destinations(index, config, job_id, card, destinations)
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
    _audit(index, audit.EventKind.PSEUDONYMIZED, job_id, series=len(files),
           instances=sum(len(paths) for paths in files.values()))
    clock.lap("pseudonymize")
    volumes = load_inputs(card, files, headers)
    # the input drift the model's feedback page shows (cheap: a subsample, one header)
    record_job_input(index, job_id, card, headers[names[0]][0], volumes[0])
    for series in headers.values():  # what the result objects need of them is the header
        for ds in series:
            ds.pop(_PIXEL_DATA, None)
    clock.lap("read")
    configure_from(config)
    result = segment(card, [v.image for v in volumes], providers=config.inference.providers,
                     intra_op_threads=config.inference.intra_op_threads)
    summary.provider = result.provider
    summary.timings["model"] = round(result.timings.session_run, 4)
    clock.lap("inference")
    # version 1 keeps the seed of the releases before versions, so its UIDs stay the same
    seed = (f"{inputs_key}/{card.name}/{card.version}" if version == 1
            else f"{inputs_key}/v{version}/{card.name}/{card.version}")
    written = write_results(result, volumes[0], headers[names[0]], work / "results",
                            config.outputs.for_rule(kinds), seed=seed,
                            extra={"job": job_id, "rule": rule_name, "version": version},
                            keep_datasets=True, result_number=version)
    summary.results = [{"kind": o.kind, "sop_instance_uid": o.sop_instance_uid,
                        "file": str(o.path.relative_to(config.storage.path)),
                        # structures the model found empty, left out of the RTSTRUCT
                        **({"omitted": list(written.rtstruct_omitted)}
                           if o.kind == "RTSTRUCT" and written.rtstruct_omitted else {})}
                       for o in written.objects]
    objects: list[tuple[Path, Dataset | None, bytes | None]] = [
        (o.path, o.dataset, o.encoded) for o in written.objects]
    _draw_overlay(result, volumes[0].image, job_overlay(config, job_id), f"job {job_id}")
    del result, volumes, headers
    newer = _newer_version(index, job_id)
    superseded = _superseded(index, config, job_id) if version > 1 and newer is None else {}
    if superseded and config.outputs.reject_superseded:
        note = _write_rejection_note(superseded, work / "results", seed=seed, card=card,
                                     version=version)
        if note is not None:
            objects.append((note.path, None, None))
            summary.results.append({"kind": note.kind, "sop_instance_uid": note.sop_instance_uid,
                                    "file": str(note.path.relative_to(config.storage.path))})
    clock.lap("write")
    outbox = Outbox.from_config(config, index)
    if newer is not None:  # created while this one ran: its results are the ones to send
        LOG.info("job %d: not sending its results, job %d is a newer version", job_id, newer)
        destinations = []
    if superseded:  # what the earlier versions have not sent yet, they never will
        cancelled = outbox.cancel_jobs(list(superseded), reason=f"superseded by job {job_id}")
        if cancelled:
            LOG.info("job %d: %d unsent item(s) of earlier versions cancelled", job_id,
                     cancelled)
    held = bool(destinations) and _review_required(config, rule_name)
    # pseudonymized peers first: they take the pseudonymous objects, which re-identification
    # for the others then changes in memory (one copy serves all of them)
    research = [n for n in destinations if config.peers[n].pseudonymize]
    clinical = [n for n in destinations if not config.peers[n].pseudonymize]
    for group, in_memory in ((research, False), (clinical, True)):
        if not group:
            continue
        peer, label = config.peers[group[0]], ", ".join(group)
        paths = [for_peer(path, label, peer, pseudonyms=pseudonyms,
                          out_dir=work / "send" / group[0], pseudonymizer=engine,
                          dataset=dataset if in_memory else None,
                          encoded=encoded if in_memory else None).path
                 for path, dataset, encoded in objects]
        summary.enqueued += len(outbox.enqueue(paths, group, job_pk=job_id, held=held))
    if held:
        hold(index, job_id)
    if superseded:
        _mark_withdrawn(index, list(superseded), job_id)
    clock.lap("reidentify")
    return summary


def _approved_destinations(index: Index, config: Config, job_id: int, card: Card,
                           destinations: list[str]) -> list[str]:
    """``destinations`` without the clinical peers when the model is not clinical (the
    card may have changed since the rules loaded); each peer left out is logged and
    recorded (``job.send_refused``)."""
    if card.clinical:
        return destinations
    refused = [n for n in destinations if not config.peers[n].is_research]
    for name in refused:
        reason = (f"model {card.name} is {card.status.value}, not clinical: its results go "
                  "to research peers only")
        LOG.error("job %d: results not queued for clinical peer %s: %s", job_id, name, reason)
        _audit(index, audit.EventKind.SEND_REFUSED, job_id, peer=name, reason=reason)
    return [n for n in destinations if n not in refused]


def _review_required(config: Config, rule_name: str) -> bool:
    """Whether the job's rule says ``review: required`` (as loaded now); a rule that is no
    longer there, or rules that never loaded, hold the results (the safe side)."""
    try:
        rules = rule_source(config.rules_dir, peers=config.peers,
                            models_dir=config.models_dir).current()
        return rules.get(rule_name).review_required
    except (RuleFileError, KeyError):
        LOG.warning("rule %s is not loaded: its job's results are held for review",
                    rule_name)
        return True


def model_digest(card: Card) -> str | None:
    """The SHA-256 of the model's ONNX file: the card's checksum when it states one (the
    card's loading checked the file against it), else the file's (hashed once per
    process); None for a package without a file (a rule-based model)."""
    if card.sha256 is not None:
        return card.sha256
    return file_sha256(card.model_path) if card.model_path.is_file() else None


def _audit(index: Index, kind: audit.EventKind, job_id: int, **details: Any) -> None:
    with index.session() as session, session.begin():
        audit.record(session, kind, job_id=job_id, **details)


def _newer_version(index: Index, job_id: int) -> int | None:
    with index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return session.scalars(select(Job.id).where(
            Job.rule_name == job.rule_name, Job.inputs_key == job.inputs_key,
            Job.version > job.version)).first()


def _superseded(index: Index, config: Config, job_id: int) -> dict[int, list[Path]]:
    """The result files of the earlier versions of a job that no later version withdrew
    yet (or that this job withdrew already, when it runs again): job id -> files."""
    with index.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        earlier = session.scalars(select(Job).where(
            Job.rule_name == job.rule_name, Job.inputs_key == job.inputs_key,
            Job.version < job.version, Job.state == JobState.DONE,
            (Job.withdrawn_by.is_(None)) | (Job.withdrawn_by == job_id))
            .order_by(Job.version)).all()
        found: dict[int, list[Path]] = {}
        for old in earlier:
            files = [config.storage.path / r["file"] for r in old.results or []
                     if r.get("kind") != "KO"]
            found[old.id] = [f for f in files if f.is_file()]
            if len(found[old.id]) < len(files):
                LOG.warning("job %d: %d result file(s) of job %d are gone (retention?); the "
                            "rejection note leaves them out", job_id,
                            len(files) - len(found[old.id]), old.id)
    return found


def _write_rejection_note(superseded: dict[int, list[Path]], out_dir: Path, *, seed: str,
                          card: Card, version: int) -> ResultObject | None:
    """The IOCM rejection note withdrawing the earlier versions' objects, written next to
    this version's results (pseudonymous, like them); None when nothing is left to reject."""
    rejected = [pydicom.dcmread(path, stop_before_pixels=True)
                for paths in superseded.values() for path in paths]
    if not rejected:
        return None
    note = build_rejection_note(
        rejected, seed=f"{seed}/rejection", card=card,
        series_description=marked(f"Rejected: {card.name} v{card.version} results before "
                                  f"result {version}", card))
    return write_rejection_note(note, out_dir / "rejection.dcm")


def _mark_withdrawn(index: Index, job_ids: Sequence[int], by: int) -> None:
    with index.session() as session, session.begin():
        session.execute(update(Job).where(Job.id.in_(list(job_ids)))
                        .values(withdrawn_by=by))
        for old in job_ids:
            audit.record(session, audit.EventKind.REJECTED, job_id=old, by_job=by)


def _draw_overlay(result: Segmentation, image: sitk.Image, path: Path, title: str) -> None:
    """The console's picture of the result (no identity in it); a failure only logs."""
    try:
        png = render_overlay(image, [
            OverlayStructure(s.label.name, s.label.color, s.volume_ml, s.voxels, s.voxel_count)
            for s in result.structures], title=f"{title}: {result.card.name} "
                                               f"{result.card.version}")
        write_atomic(path, lambda fp: fp.write(png), fsync=False)
    except Exception as exc:  # the job's results do not depend on its picture
        LOG.warning("%s: no overlay picture (%s)", title, type(exc).__name__)


def warm_up_outputs() -> None:
    """Load highdicom's tables of the standard (about 0.3 s of JSON, read when it builds its
    first SEG) in a worker process before its first job; a failure only logs."""
    try:
        from highdicom import _standard_utils as standard

        standard.get_sop_class_iod_map()
        standard.get_iod_module_map()
        standard.get_module_attribute_map()
    except Exception as exc:  # only a first job's speed depends on it
        LOG.warning("highdicom's tables not loaded ahead of the first job: %s",
                    type(exc).__name__)


def summary_json(summary: JobSummary) -> dict[str, Any]:
    """The columns a finished job stores."""
    return {"timings": {**summary.timings, "provider": summary.provider},
            "results": summary.results}
