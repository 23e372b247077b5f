"""The feedback loop, worker side: a received RTSTRUCT or SEG against dicomnode's result.

A planning system or viewer sends back an edited structure set (or segmentation) of a study
the node contoured. Results go to clinical peers re-identified, so the edited object arrives
in the original study (its StudyInstanceUID); :mod:`dicomnode.jobs.feedbackqueue` queues it
and the job runner hands it to a worker process, which runs :func:`compare_feedback`:

1. **Which job.** The finished, not withdrawn jobs of the study, newest first. An object
   whose SOP Instance UID is one the job wrote is dicomnode's own result sent back unchanged
   (skipped, ``matched_by = own``). Otherwise the job is the one whose result the object
   references (any UID in its sequences is a SOP Instance or Series Instance UID of the
   job's SEG or RTSTRUCT: ``matched_by = reference``), else the newest whose input series
   the object references (``series``). No such job: skipped, with the reason.
2. **The grid.** The job's first input series as received (``inference.volume``); both
   objects are placed on it (:mod:`dicomnode.outputs.contours`: RTSTRUCT contours
   rasterized by the even-odd rule, SEG read with highdicom).
3. **The reference** is the node's own result re-read from the job's folder: the object of
   the same kind when the job wrote one (contours against contours), else the other.
4. **Structures** are matched by name: the card label's name, case and spaces ignored, or
   one of the label's ``aliases``. A structure of the result that the received object
   lacks, or has empty, is ``deleted`` (Dice 0, no distances); one the result has empty
   and the received object not is ``added``; one empty in both is left out. Per structure
   :func:`dicomnode.outputs.agreement.agreement` gives Dice, HD95, mean surface distance and
   the volumes; they are stored with the model's name and version (``feedback_structure``).

:func:`record_job_input` is the input-drift record of a job (called by the pipeline);
:func:`export_model` is ``dicomnode qa export``.

Nothing here logs or stores a value of the received object other than its structure names
(the names a clinician gave the structures; shown escaped in the console).
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomnode.config import Config
from dicomnode.inference.volume import SeriesVolume, read_series, write_nifti
from dicomnode.jobs.feedbackqueue import FeedbackState, finish
from dicomnode.models.card import Card, CardError, cached_card
from dicomnode.outputs.agreement import agreement
from dicomnode.outputs.contours import ContourError, Grid, label_map, received_structures
from dicomnode.store.db import Index
from dicomnode.store.queries import series_files
from dicomnode.store.tables import (
    FeedbackObject,
    FeedbackStructure,
    Instance,
    Job,
    JobInput,
    JobState,
)

__all__ = ["ExportReport", "compare_feedback", "export_model", "record_job_input"]

LOG = logging.getLogger("dicomnode.feedback")
_UI = "UI"


class FeedbackError(Exception):
    """A comparison that cannot be made; the message holds no value of the objects."""


@dataclass(frozen=True)
class _Match:
    job_id: int
    model: str
    bindings: list[tuple[str, str]]
    results: list[dict[str, str]]
    matched_by: str


def _vr(element: Any) -> str | None:
    vr = element.VR
    if vr:
        return str(vr)
    try:
        return str(dictionary_VR(element.tag))
    except KeyError:  # a private or unknown element: not a reference
        return None


def _uids_in(ds: Dataset) -> set[str]:
    """Every UID value inside the sequences of ``ds`` (the object's references). Elements
    are looked at as read (raw): Contour Data is not converted here."""
    found: set[str] = set()

    def walk(item: Dataset, nested: bool) -> None:
        for element in item.elements():
            vr = _vr(element)
            if vr == "SQ":
                for child in item[element.tag].value:
                    walk(child, True)
            elif vr == _UI and nested and element.value:
                value = element.value
                text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
                if isinstance(text, str):
                    found.update(v.strip(" \x00") for v in text.split("\\"))
                else:
                    found.update(str(v) for v in text)

    walk(ds, False)
    return found


def _result_files(config: Config, results: Sequence[dict[str, str]]) -> dict[str, Path]:
    return {r["kind"]: config.storage.path / r["file"] for r in results
            if r.get("kind") in ("SEG", "RTSTRUCT")}


def _result_uids(config: Config, results: Sequence[dict[str, str]]) -> tuple[set[str], set[str]]:
    """The job's SEG/RTSTRUCT SOP Instance UIDs, and those and their series UIDs."""
    own = {r["sop_instance_uid"] for r in results if r.get("kind") in ("SEG", "RTSTRUCT")}
    referable = set(own)
    for path in _result_files(config, results).values():
        if path.is_file():
            header = pydicom.dcmread(path, stop_before_pixels=True,
                                     specific_tags=["SeriesInstanceUID"])
            referable.add(str(header.get("SeriesInstanceUID", "")))
    return own, referable


def _find_job(config: Config, index: Index, study_pk: int, ds: Dataset) -> _Match | str:
    """The job ``ds`` answers, or why there is none."""
    with index.session() as session:
        jobs = session.scalars(select(Job).where(
            Job.study_pk == study_pk, Job.state == JobState.DONE, Job.withdrawn_by.is_(None))
            .order_by(Job.id.desc())).all()
        candidates = [(j.id, j.model, [(str(n), str(u)) for n, u in j.bindings],
                       list(j.results or [])) for j in jobs]
    if not candidates:
        return "the study has no finished job"
    sop = str(ds.get("SOPInstanceUID", ""))
    referenced = _uids_in(ds)
    by_series = None
    for job_id, model, bindings, results in candidates:
        if not _result_files(config, results):
            continue
        own, referable = _result_uids(config, results)
        if sop in own:
            return _Match(job_id, model, bindings, results, "own")
        if referenced & referable:
            return _Match(job_id, model, bindings, results, "reference")
        if by_series is None and referenced & {uid for _, uid in bindings}:
            by_series = _Match(job_id, model, bindings, results, "series")
    if by_series is not None:
        return by_series
    return "it references neither a result of this study's jobs nor their input series"


def _normal(name: str) -> str:
    return re.sub(r"[\s_-]+", " ", name).strip().casefold()


def _received_name(card_label: Any, received: dict[str, Any]) -> str | None:
    """The name in ``received`` that stands for ``card_label`` (its name or an alias)."""
    wanted = {_normal(card_label.name), *(_normal(a) for a in card_label.aliases)}
    exact = [n for n in received if n == card_label.name]
    if exact:
        return exact[0]
    for name in received:
        if _normal(name) in wanted:
            return name
    return None


def _series_files(index: Index, config: Config, series_uid: str) -> list[Path]:
    paths = series_files(index, config.storage.path, series_uid)
    if not paths:
        raise FeedbackError("the job's input series has no stored instance (retention?)")
    return paths


def _source_volume(index: Index, config: Config, series_uid: str, card: Card) -> SeriesVolume:
    return read_series(_series_files(index, config, series_uid),
                       resample_irregular=card.preprocessing.allow_irregular_spacing)


def _model_version(config: Config, match: _Match, card: Card) -> str:
    """The model version the job ran (its volumes.json), else the card's now."""
    for r in match.results:
        path = config.storage.path / r["file"]
        volumes = path.parent / "volumes.json"
        if volumes.is_file():
            try:
                return str(json.loads(volumes.read_text())["model"]["version"])
            except (ValueError, KeyError, TypeError):
                break
    return card.version


def compare_feedback(config: Config, index: Index, feedback_pk: int) -> FeedbackState:
    """Compare the claimed received object ``feedback_pk`` with its job's result and record
    the figures; returns the state recorded (never raises for a bad object: it is
    ``failed`` with the reason)."""
    found: dict[str, Any] = {}  # the job and model, once known
    try:
        return _compare(config, index, feedback_pk, found)
    except (FeedbackError, ContourError, CardError) as exc:
        reason = str(exc)
    except Exception as exc:  # other libraries' messages may quote values: the type only
        reason = f"{type(exc).__name__}"
    LOG.warning("feedback %d: comparison failed: %s", feedback_pk, reason)
    finish(index, feedback_pk, FeedbackState.FAILED, reason, **found)
    return FeedbackState.FAILED


def _compare(config: Config, index: Index, feedback_pk: int,
             found: dict[str, Any]) -> FeedbackState:
    with index.session() as session:
        row = session.get(FeedbackObject, feedback_pk)
        if row is None:
            raise FeedbackError(f"no feedback object {feedback_pk}")
        instance = session.get(Instance, row.instance_pk)
        if instance is None:
            raise FeedbackError("the received object is no longer stored")
        path, study_pk = config.storage.path / instance.file_path, row.study_pk
    ds = pydicom.dcmread(path)
    match = _find_job(config, index, study_pk, ds)
    if isinstance(match, str):
        finish(index, feedback_pk, FeedbackState.SKIPPED, match)
        LOG.info("feedback %d: skipped (%s)", feedback_pk, match)
        return FeedbackState.SKIPPED
    card = cached_card(config.models_dir / match.model)
    version = _model_version(config, match, card)
    found.update(job_pk=match.job_id, model=match.model, model_version=version,
                 matched_by=match.matched_by)
    if match.matched_by == "own":
        reason = f"dicomnode's own result of job {match.job_id}, sent back unchanged"
        finish(index, feedback_pk, FeedbackState.SKIPPED, reason, **found)
        LOG.info("feedback %d: skipped (%s)", feedback_pk, reason)
        return FeedbackState.SKIPPED
    volume = _source_volume(index, config, match.bindings[0][1], card)
    grid = Grid.of_image(volume.image)
    del volume
    files = _result_files(config, match.results)
    kind = str(row.kind)
    ours_path = files.get(kind) or next(iter(files.values()))
    if not ours_path.is_file():
        raise FeedbackError(f"job {match.job_id}'s result is no longer in its folder")
    ours = received_structures(pydicom.dcmread(ours_path), grid)
    theirs = received_structures(ds, grid)
    spacing_zyx = (grid.spacing[2], grid.spacing[1], grid.spacing[0])
    rows: list[FeedbackStructure] = []
    empty = np.zeros(grid.shape, dtype=bool)
    for label in card.outputs.labels:
        mine = ours.masks.get(label.name)
        if mine is None:
            continue
        name = _received_name(label, theirs.masks)
        edited = theirs.masks[name] if name is not None else empty
        if not mine.any() and not edited.any():
            continue  # absent from both: nothing to compare
        figures = agreement(mine, edited, spacing_zyx)
        outcome = ("deleted" if not edited.any() else "added" if not mine.any()
                   else "compared")
        rows.append(FeedbackStructure(
            feedback_pk=feedback_pk, model=match.model, model_version=version,
            structure=label.name, received_name=name[:64] if name else None,
            outcome=outcome, dice=round(figures.dice, 6),
            hd95_mm=None if figures.hd95_mm is None else round(figures.hd95_mm, 4),
            msd_mm=None if figures.msd_mm is None else round(figures.msd_mm, 4),
            volume_ours_ml=round(figures.volume_ours_ml, 4),
            volume_received_ml=round(figures.volume_received_ml, 4),
            volume_change_ml=round(figures.volume_change_ml, 4)))
    if not rows:
        finish(index, feedback_pk, FeedbackState.SKIPPED,
               f"job {match.job_id}'s result has no structure to compare", **found)
        return FeedbackState.SKIPPED
    with index.session() as session, session.begin():
        for old in session.scalars(select(FeedbackStructure).where(
                FeedbackStructure.feedback_pk == feedback_pk)).all():
            session.delete(old)  # a comparison run again replaces its figures
        session.add_all(rows)
    note = None
    if theirs.contours_off_grid or theirs.voxels_off_grid:
        note = (f"{theirs.contours_off_grid} contour(s) and {theirs.voxels_off_grid} voxel(s) "
                "of the received object are off the source grid")
    finish(index, feedback_pk, FeedbackState.DONE, note, **found)
    LOG.info("feedback %d: job %d (%s %s), %d structure(s) compared", feedback_pk,
             match.job_id, match.model, version, len(rows))
    return FeedbackState.DONE


# ----------------------------------------------------------------------------- input drift


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def record_job_input(index: Index, job_id: int, card: Card, header: Dataset,
                     volume: SeriesVolume) -> None:
    """Record what the job's first input was like: modality, manufacturer, slice thickness,
    kVp and intensity percentiles (1, 50, 99) of a subsample of the volume (every 4th voxel
    along each axis: milliseconds). A failure only logs: the job does not depend on it."""
    try:
        array = volume.array()[::4, ::4, ::4]
        p01, p50, p99 = (float(v) for v in np.percentile(array, [1, 50, 99]))
        manufacturer = str(header.get("Manufacturer", "") or "")[:64] or None
        values = {"model": card.name, "model_version": card.version,
                  "modality": volume.modality[:16] or None, "manufacturer": manufacturer,
                  "slice_thickness_mm": _number(header.get("SliceThickness")),
                  "kvp": _number(header.get("KVP")), "intensity_p01": round(p01, 3),
                  "intensity_p50": round(p50, 3), "intensity_p99": round(p99, 3)}
        with index.session() as session, session.begin():
            row = session.get(JobInput, job_id)
            if row is None:
                session.add(JobInput(job_pk=job_id, **values))
            else:
                for key, value in values.items():
                    setattr(row, key, value)
    except Exception as exc:
        LOG.warning("job %d: input statistics not recorded (%s)", job_id, type(exc).__name__)


# ----------------------------------------------------------------------------- QA export


@dataclass(frozen=True)
class ExportReport:
    """What :func:`export_model` wrote."""

    cases: int
    manifest: Path
    skipped: int


def _compared(index: Index, model: str) -> Iterator[tuple[int, int, str, str]]:
    """(feedback id, job id, model version, kind) of the model's compared objects."""
    with index.session() as session:
        rows = session.execute(
            select(FeedbackObject.id, FeedbackObject.job_pk, FeedbackObject.model_version,
                   FeedbackObject.kind)
            .where(FeedbackObject.model == model,
                   FeedbackObject.state == FeedbackState.DONE.value)
            .order_by(FeedbackObject.id)).all()
    for feedback_pk, job_pk, version, kind in rows:
        if job_pk is not None:
            yield int(feedback_pk), int(job_pk), str(version), str(kind)


def export_model(config: Config, index: Index, model: str, out_dir: Path) -> ExportReport:
    """Write image + corrected mask pairs (NIfTI) of every compared object of ``model`` into
    ``out_dir`` with ``manifest.json`` and ``manifest.csv``, for retraining.

    Pseudonymous by construction: files are named ``case-NNNN_image.nii.gz`` and
    ``case-NNNN_mask.nii.gz`` (NNNN a running number); NIfTI holds geometry and voxels
    only; the manifest holds the model, its version, the index keys of the job and of the
    comparison, the label values and names, spacing and the figures: no UID, name, date
    or other value of the studies. The image is the job's first input as received (modality
    values, e.g. HU); the mask is the received (corrected) structures as one label map with
    the card's label values.

    Raises:
        FeedbackError: ``out_dir`` exists and is not empty.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FeedbackError(f"{out_dir} is not empty: the export writes into a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    card = cached_card(config.models_dir / model)
    labels = {label.name: label.value for label in card.outputs.labels}
    cases: list[dict[str, Any]] = []
    skipped = 0
    for feedback_pk, job_pk, version, _kind in _compared(index, model):
        with index.session() as session:
            row = session.get(FeedbackObject, feedback_pk)
            job = session.get(Job, job_pk)
            instance = session.get(Instance, row.instance_pk) if row is not None else None
            if row is None or job is None or instance is None:
                skipped += 1
                continue
            path = config.storage.path / instance.file_path
            source_uid = str(job.bindings[0][1])
            structures = session.scalars(select(FeedbackStructure).where(
                FeedbackStructure.feedback_pk == feedback_pk)
                .order_by(FeedbackStructure.id)).all()
            figures = [{"structure": s.structure, "outcome": s.outcome, "dice": s.dice,
                        "hd95_mm": s.hd95_mm, "msd_mm": s.msd_mm,
                        "volume_change_ml": s.volume_change_ml} for s in structures]
            names = {s.structure: s.received_name for s in structures}
        try:
            volume = _source_volume(index, config, source_uid, card)
        except Exception as exc:
            LOG.warning("qa export: feedback %d left out (%s)", feedback_pk,
                        type(exc).__name__)
            skipped += 1
            continue
        grid = Grid.of_image(volume.image)
        theirs = received_structures(pydicom.dcmread(path), grid)
        masks = {ours: theirs.masks[received] for ours, received in names.items()
                 if received is not None and received in theirs.masks}
        case = f"case-{len(cases) + 1:04d}"
        write_nifti(volume.image, out_dir / f"{case}_image.nii.gz")
        write_nifti(grid.to_image(label_map(masks, labels, grid.shape)),
                    out_dir / f"{case}_mask.nii.gz")
        cases.append({"case": case, "image": f"{case}_image.nii.gz",
                      "mask": f"{case}_mask.nii.gz", "model": model, "model_version": version,
                      "job": job_pk, "feedback": feedback_pk,
                      "modality": volume.modality, "spacing_mm": list(grid.spacing),
                      "size": list(grid.size), "structures": figures})
        del volume
    manifest = out_dir / "manifest.json"
    manifest.write_text(json.dumps({
        "model": model, "labels": [{"value": v, "name": n} for n, v in labels.items()],
        "pseudonymous": True, "cases": cases}, indent=2) + "\n")
    with (out_dir / "manifest.csv").open("w", newline="") as fp:
        writer = csv.writer(fp)
        writer.writerow(["case", "image", "mask", "model", "model_version", "job", "feedback",
                         "structure", "outcome", "dice", "hd95_mm", "msd_mm",
                         "volume_change_ml"])
        for c in cases:
            for s in c["structures"]:
                writer.writerow([c["case"], c["image"], c["mask"], model, c["model_version"],
                                 c["job"], c["feedback"], s["structure"], s["outcome"],
                                 s["dice"], s["hd95_mm"], s["msd_mm"], s["volume_change_ml"]])
    return ExportReport(len(cases), manifest, skipped)
