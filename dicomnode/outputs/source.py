"""The source series a result refers to: its headers and, per source frame, the mask plane.

A result object (SEG, RTSTRUCT, SR) copies the patient and study of its source
images and references each image it was derived from. :func:`source_series`
reads the headers of the source files (without pixel data) and pairs every
source frame with the z index of the segmentation grid that holds its mask.
For a volume read as it was (not resampled) that is one z index per frame; for
a volume resampled onto a regular grid it is the grid plane nearest to the frame.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.dataset import Dataset

from dicomnode.inference.volume import SeriesVolume

__all__ = ["OutputError", "SourceFrame", "SourceSeries", "check_plane_shape", "object_identity",
           "result_uid", "source_series"]


class OutputError(ValueError):
    """A result object cannot be written from this segmentation and source."""


@dataclass(frozen=True)
class SourceFrame:
    """One source frame and the plane of the segmentation grid that holds its mask.

    ``z`` indexes the mask's first axis ([z, y, x]); ``frame_number`` is 1-based
    within the instance (1 for single-frame images).
    """

    z: int
    sop_instance_uid: str
    sop_class_uid: str
    frame_number: int


@dataclass(frozen=True)
class SourceSeries:
    """Headers of the source instances and their frames in the order results list them.

    ``headers`` holds one dataset (no pixel data) per source instance, in the order
    of ``frames``: increasing z for single-frame series, frame number for one
    multi-frame instance.
    """

    headers: tuple[Dataset, ...]
    frames: tuple[SourceFrame, ...]
    multiframe: bool
    _by_uid: dict[str, Dataset] = field(init=False, repr=False, compare=False)

    @property
    def first(self) -> Dataset:
        """The header that patient, study and frame of reference are copied from."""
        return self.headers[0]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_by_uid", {str(ds.SOPInstanceUID): ds for ds in self.headers})

    def header(self, sop_instance_uid: str) -> Dataset:
        """The header of one source instance (KeyError if it is not one)."""
        return self._by_uid[sop_instance_uid]


def _planes(volume: SeriesVolume) -> dict[tuple[str, int], int]:
    """Per (instance, frame), the z index holding its mask."""
    found: dict[tuple[str, int], list[int]] = {}
    for z, key in enumerate(zip(volume.sop_instance_uids, volume.frame_numbers, strict=True)):
        found.setdefault(key, []).append(z)
    # a resampled volume refers each plane to its nearest source frame: of the planes
    # that refer to a frame, the middle one is the nearest to it
    return {key: zs[len(zs) // 2] for key, zs in found.items()}


def source_series(volume: SeriesVolume,
                  paths: Sequence[str | os.PathLike[str] | Dataset]) -> SourceSeries:
    """Read the headers of ``paths`` (the files ``volume`` was read from) for result objects.

    An item of ``paths`` that is a dataset is taken as that file's header, already read.

    Raises:
        OutputError: a file of the volume is missing from ``paths``, or the series
            has several multi-frame instances (a SEG can reference only one).
    """
    wanted = set(volume.sop_instance_uids)
    headers: dict[str, Dataset] = {}
    for path in paths:
        ds = (path if isinstance(path, Dataset)
              else pydicom.dcmread(path, stop_before_pixels=True))
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in wanted:
            headers[uid] = ds
    missing = wanted - set(headers)
    if missing:
        raise OutputError(f"{len(missing)} source instance(s) of the series are not among the "
                          "files given")
    planes = _planes(volume)
    classes = dict(zip(volume.sop_instance_uids, volume.sop_class_uids, strict=True))
    multiframe = any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in headers.values())
    if multiframe and len(headers) > 1:
        raise OutputError(f"the series has {len(headers)} instances, some multi-frame: results "
                          "can reference one multi-frame instance or single-frame images only")
    if multiframe:
        keys = sorted(planes, key=lambda k: k[1])
    else:
        keys = sorted(planes, key=lambda k: planes[k])
    frames = tuple(SourceFrame(planes[k], k[0], classes[k[0]], k[1]) for k in keys)
    order = list(dict.fromkeys(f.sop_instance_uid for f in frames))
    return SourceSeries(tuple(headers[u] for u in order), frames, multiframe)


def check_plane_shape(source: SourceSeries, shape: Sequence[int]) -> None:
    """Check that masks of ``shape`` ([z, y, x]) have the source images' rows and columns.

    Raises:
        OutputError: the masks' planes are not Rows x Columns of ``source.first``.
    """
    first = source.first
    if (int(first.Rows), int(first.Columns)) != tuple(shape[1:]):
        raise OutputError(
            f"the masks are {shape[1]}x{shape[2]} pixels but the source images are "
            f"{first.Rows}x{first.Columns}")


def result_uid(*parts: str) -> str:
    """A UID derived from ``parts`` (e.g. source series, model, version and object kind).

    The same parts always give the same ``2.25.`` UID, so a re-run of a job writes
    objects with the same SOP Instance UIDs and a destination keeps no duplicates.
    """
    if not parts or any(not p for p in parts):
        raise ValueError("result_uid needs non-empty parts")
    digest = hashlib.sha256("\x00".join(("dicomnode", *parts)).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))  # PS3.5 B.2, UUID-derived form


def object_identity(seed: str, kind: str, series_number: int) -> dict[str, Any]:
    """The new series and instance of a result object, as highdicom constructors take them."""
    return {
        "series_instance_uid": result_uid(seed, kind, "series"),
        "series_number": series_number,
        "sop_instance_uid": result_uid(seed, kind, "instance"),
        "instance_number": 1,
        "manufacturer": "dicomnode",
    }
