"""Write the result objects of one model run into a folder, each file complete or absent.

``seg.dcm`` (DICOM SEG), ``rtstruct.dcm`` (RT Structure Set), ``sr.dcm`` (TID 1500
measurement report) as the configuration asks, and ``volumes.json`` always. Each
file is written to a temporary name, fsynced and renamed, so a crash never leaves
a partial object for the outbox to send. File names carry no patient identity.
The RTSTRUCT is built in a thread beside the SEG (OpenCV's tracing and numpy's work on
one run while the other holds the interpreter). Each object is encoded once; a caller
that keeps the objects gets their bytes too, to make the copies for peers from.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.config import OutputsConfig
from dicomnode.inference.segment import Segmentation
from dicomnode.inference.volume import SeriesVolume
from dicomnode.outputs.measurements import build_sr
from dicomnode.outputs.rtstruct import NoContourError, build_rtstruct
from dicomnode.outputs.seg import build_seg
from dicomnode.outputs.source import source_series
from dicomnode.store.files import write_atomic

__all__ = ["ResultObject", "Results", "default_seed", "write_results"]


@dataclass(frozen=True)
class ResultObject:
    """One DICOM object written: ``kind`` is SEG, RTSTRUCT or SR."""

    kind: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    dataset: Dataset | None = field(default=None, repr=False, compare=False)
    """The object as written, kept in memory when :func:`write_results` is asked to."""
    encoded: bytes | None = field(default=None, repr=False, compare=False)
    """The file's bytes, kept with ``dataset``: a copy for a peer that differs only in
    header values is made from them (:func:`dicomnode.boundary.for_peer`)."""


@dataclass(frozen=True)
class Results:
    """What :func:`write_results` wrote."""

    objects: tuple[ResultObject, ...]
    volumes: Path
    rtstruct_omitted: tuple[str, ...] = ()
    """Structures left out of the RTSTRUCT because the model found them empty (no contour;
    ``outputs.rtstruct_empty_structures: omit``), in card order; all of them when no
    RTSTRUCT was written for want of any contour."""

    def by_kind(self, kind: str) -> ResultObject:
        for obj in self.objects:
            if obj.kind == kind:
                return obj
        raise KeyError(kind)


def default_seed(segmentation: Segmentation, volume: SeriesVolume) -> str:
    """The UID seed of a run: source series, model and version (a re-run gives the same UIDs)."""
    card = segmentation.card
    return f"{volume.series_instance_uid}/{card.name}/{card.version}"


def _save(ds: Dataset, path: Path, kind: str, keep: bool) -> ResultObject:
    """Encode ``ds`` once and write it; with ``keep``, the object keeps the dataset and
    the bytes (the copies for peers are made from them instead of encoding it again)."""
    if not keep:
        write_atomic(path, lambda fp: ds.save_as(fp, enforce_file_format=True))
        return ResultObject(kind, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                            str(ds.SeriesInstanceUID))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    encoded = buffer.getvalue()
    write_atomic(path, lambda fp: fp.write(encoded))
    return ResultObject(kind, path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                        str(ds.SeriesInstanceUID), ds, encoded)


def write_results(
    segmentation: Segmentation,
    volume: SeriesVolume,
    paths: Sequence[str | os.PathLike[str] | Dataset],
    out_dir: str | os.PathLike[str],
    options: OutputsConfig | None = None,
    *,
    seed: str | None = None,
    extra: dict[str, Any] | None = None,
    keep_datasets: bool = False,
    result_number: int = 1,
) -> Results:
    """Write the result objects of ``segmentation`` on ``volume`` (read from ``paths``).

    Args:
        segmentation: the run's structures on the grid of ``volume``.
        volume: the first input series (the grid of the masks).
        paths: the files ``volume`` was read from, or their headers (datasets).
        out_dir: the folder to write into (created).
        options: which objects to write (default: SEG and RTSTRUCT).
        seed: what the objects' UIDs derive from (default: :func:`default_seed`).
        extra: more keys for ``volumes.json``.
        keep_datasets: keep each object's dataset and bytes in its :class:`ResultObject`
            (for a caller that goes on with them, e.g. to re-identify without reading back).
        result_number: which result of its job this is, the job's version (each object's
            SeriesDescription says it).

    Raises:
        OutputError: an object cannot be built from this segmentation and source.
    """
    options = options or OutputsConfig()
    seed = seed or default_seed(segmentation, volume)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = source_series(volume, paths)
    objects = []
    seg_ds = None
    omitted: list[str] = []
    rtstruct_note = None

    def write_rtstruct() -> ResultObject | None:
        nonlocal omitted, rtstruct_note
        names = [s.label.name for s in segmentation.structures]
        try:
            rt_ds = build_rtstruct(segmentation, source, seed=seed, result_number=result_number,
                                   empty_structures=options.rtstruct_empty_structures)
        except NoContourError:
            omitted, rtstruct_note = names, "not written: no structure has a contour"
            return None
        kept = {str(roi.ROIName) for roi in rt_ds.StructureSetROISequence}
        omitted = [n for n in names if n not in kept]
        return _save(rt_ds, out / "rtstruct.dcm", "RTSTRUCT", keep_datasets)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtstruct") as pool:
        # the RTSTRUCT is built beside the SEG: its tracing (OpenCV) and the SEG's checks
        # and bit packing (numpy) run while the other holds the interpreter
        rtstruct = pool.submit(write_rtstruct) if options.rtstruct else None
        if options.seg:
            seg_type = segmentation.card.outputs.seg_type or options.seg_type
            seg_ds = build_seg(segmentation, source, seg_type=seg_type, seed=seed,
                               omit_empty_frames=options.seg_omit_empty_frames,
                               result_number=result_number)
            objects.append(_save(seg_ds, out / "seg.dcm", "SEG", keep_datasets))
        if rtstruct is not None:
            written = rtstruct.result()
            if written is not None:
                objects.append(written)
    if options.sr and seg_ds is not None:
        objects.append(_save(build_sr(segmentation, seg_ds, source, seed=seed,
                                      result_number=result_number),
                             out / "sr.dcm", "SR", keep_datasets))
    del seg_ds
    report = segmentation.measurements()
    report["objects"] = [
        {"kind": o.kind, "file": o.path.name, "sop_class_uid": o.sop_class_uid,
         "sop_instance_uid": o.sop_instance_uid} for o in objects]
    if options.rtstruct:
        # structures the model found empty, left out of rtstruct.dcm (rt-utils and several
        # planning systems fail on an ROI without contours)
        report["rtstruct_omitted"] = omitted
        if rtstruct_note:
            report["rtstruct"] = rtstruct_note
    if extra:
        report.update(extra)
    volumes = out / "volumes.json"
    text = (json.dumps(report, indent=2) + "\n").encode("utf-8")
    write_atomic(volumes, lambda fp: fp.write(text))
    return Results(tuple(objects), volumes, tuple(omitted))
