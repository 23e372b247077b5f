"""Read one DICOM image series into one 3D volume.

Coordinates and units:

* Positions, spacings and directions are in the DICOM patient coordinate system
  (LPS: +x towards the patient's left, +y posterior, +z head) in mm, exactly as in
  ImagePositionPatient / ImageOrientationPatient / PixelSpacing.
* The image is a float32 :class:`SimpleITK.Image`. Its axis ``x`` runs along a row
  (the column index, ImageOrientationPatient[0:3]), ``y`` along a column (the row
  index, ImageOrientationPatient[3:6]) and ``z`` along the slice normal
  ``row x column``, so the direction matrix, whose columns are
  (row cosine, column cosine, normal), is right-handed. Slices are stacked in
  increasing position along that normal. A numpy view of the image is indexed
  ``[z, y, x]``.
* Voxel values are modality values: stored values with the modality LUT applied
  (RescaleSlope/RescaleIntercept, or the Pixel Value Transformation functional group of
  multi-frame images). No VOI LUT, windowing or MONOCHROME1 inversion is applied.

The frames are those of the header model (:class:`dicomnode.dicom.header.ImageHeader`, the
same frames the index judged at ingest) and the geometry rules those of
:mod:`dicomnode.geometry`. Headers are read first (without pixel data); pixel data are
then decoded one file at a time into an image allocated once, so the memory used is about
the float32 volume plus one file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.utils import iter_pixels
from pydicom.uid import UID

from dicomnode.dicom.frames import FrameGeometry, FrameSource
from dicomnode.dicom.header import ImageHeader, Rescale
from dicomnode.geometry import POSITION_TOLERANCE_MM, Frame, GeometryVerdict, assess, planes

__all__ = ["SeriesVolume", "VolumeError", "read_series", "write_nifti"]

_sitk: Any = sitk
"""SimpleITK without its (missing) method annotations, for calls in strictly typed code."""

_PERPENDICULAR_TOLERANCE = 1e-3
"""Largest |cosine| between the row and column directions of ImageOrientationPatient."""
_SNAP_MM = 1e-3
"""A resampled slice this close (mm) to a source slice takes that slice's values as is."""


class VolumeError(ValueError):
    """A series that cannot become one volume; the message says why.

    Messages name files by their position in the list given to :func:`read_series`
    ("file 3 of 108") and never include patient identity.
    """


@dataclass(frozen=True)
class SeriesVolume:
    """One series as one volume, with what is needed to refer back to its source images.

    Attributes:
        image: float32 modality values; origin (mm, LPS) is the centre of the first
            pixel of the first slice, spacing (mm) is (column spacing, row spacing,
            slice spacing) and the direction's columns are the row cosine, the column
            cosine and the slice normal (row x column), all in LPS.
        sop_instance_uids: the source instance of each z index (repeated for the
            frames of a multi-frame instance). For a resampled volume, the source
            slice nearest to that z position.
        frame_numbers: 1-based frame number within that instance for each z index
            (1 for single-frame instances).
        sop_class_uids: the SOP Class UID of that instance for each z index.
        modality: the series' Modality.
        series_instance_uid: the series' SeriesInstanceUID.
        study_instance_uid: the series' StudyInstanceUID.
        frame_of_reference_uid: the series' FrameOfReferenceUID, None when absent.
        geometry: the verdict of :func:`dicomnode.geometry.assess` on the source frames
            (not whole when the volume was resampled).
        resampled: True when slices were interpolated linearly along the normal onto a
            regular grid because the source spacing was irregular or had gaps.
    """

    image: sitk.Image
    sop_instance_uids: tuple[str, ...]
    frame_numbers: tuple[int, ...]
    sop_class_uids: tuple[str, ...]
    modality: str
    series_instance_uid: str
    study_instance_uid: str
    frame_of_reference_uid: str | None
    geometry: GeometryVerdict
    resampled: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.image, sitk.Image):
            raise TypeError(f"image must be a SimpleITK.Image, got {type(self.image).__name__}")
        image: Any = self.image
        if image.GetDimension() != 3:
            raise ValueError(f"image must be 3D, got {image.GetDimension()}D")
        if image.GetPixelID() != sitk.sitkFloat32:
            raise ValueError(f"image must be float32, got {image.GetPixelIDTypeAsString()}")
        depth = int(image.GetSize()[2])
        for name in ("sop_instance_uids", "frame_numbers", "sop_class_uids"):
            count = len(getattr(self, name))
            if count != depth:
                raise ValueError(f"{name} has {count} entries for {depth} slices")
        if any(n < 1 for n in self.frame_numbers):
            raise ValueError("frame_numbers are 1-based")

    def array(self) -> npt.NDArray[np.float32]:
        """A read-only numpy view of the image (no copy), indexed ``[z, y, x]``.

        The view keeps the image alive, so it stays valid when this object is dropped.
        """
        view = _sitk.GetArrayViewFromImage(self.image)
        array: npt.NDArray[np.float32] = np.asarray(_ImageBuffer(self.image, view))
        return array


class _ImageBuffer:
    """Exposes a SimpleITK image's buffer to numpy and keeps the image alive.

    ``SimpleITK.GetArrayViewFromImage`` returns a view that does not reference its image:
    it points to freed memory once the image is collected. An array made from this
    object has it as its base, and so holds the image.
    """

    def __init__(self, image: sitk.Image, view: npt.NDArray[np.float32]) -> None:
        self.image = image
        self.__array_interface__ = view.__array_interface__


# --------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class _FileHeader:
    path: Path
    label: str  # "file 3 of 108"
    transfer_syntax: UID
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str
    frame_of_reference_uid: str | None
    rows: int
    columns: int
    frames: tuple[FrameGeometry, ...]
    rescales: tuple[Rescale, ...]
    dataset: Dataset | None = None  # read by the caller, pixel data decoded from it if held


def _read_header(path: Path, label: str, given: Dataset | None = None) -> _FileHeader:
    """The header of ``path``: read from it, or ``given`` when the caller has read it."""
    ds = given
    if ds is None:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except InvalidDicomError:
            raise VolumeError(f"{label} is not a DICOM file") from None
        except Exception as exc:
            raise VolumeError(
                f"{label} cannot be parsed as DICOM ({type(exc).__name__})") from None
    try:
        header = _header_from(ds, path, label)
        return header if given is None else replace(header, dataset=given)
    except VolumeError:
        raise
    except Exception as exc:  # values are decoded on access: a malformed one fails here
        raise VolumeError(
            f"{label} has an attribute that cannot be decoded ({type(exc).__name__})"
        ) from None


def _header_from(ds: Dataset, path: Path, label: str) -> _FileHeader:
    """The volume reader's view of the header model (:class:`ImageHeader`): refuses what
    it cannot stack, with the model's precise message."""
    image = ImageHeader.from_dataset(ds)
    series_uid, sop_uid = image.series_instance_uid, image.sop_instance_uid
    if series_uid is None or sop_uid is None:
        missing = "SeriesInstanceUID" if series_uid is None else "SOPInstanceUID"
        raise VolumeError(f"{label} lacks {missing}")
    if image.problems:
        problem = image.problems[0]
        where = label if problem.frame is None else f"{label}, frame {problem.frame}"
        raise VolumeError(f"{where}: {problem.message}")
    rows, columns = image.rows, image.columns
    if not rows or not columns:
        raise VolumeError(f"{label} is not an image (no Rows/Columns)")
    if image.samples_per_pixel != 1:
        raise VolumeError(f"{label} has SamplesPerPixel {image.samples_per_pixel}: colour "
                          "images are not supported")
    photometric = image.photometric_interpretation or ""
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise VolumeError(
            f"{label} has PhotometricInterpretation {photometric or '(none)'!r}: "
            "only MONOCHROME1/MONOCHROME2 are supported")
    if image.has_modality_lut_sequence:
        raise VolumeError(
            f"{label} has a Modality LUT Sequence: only RescaleSlope/RescaleIntercept "
            "are supported")
    meta = getattr(ds, "file_meta", None)
    transfer_syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not transfer_syntax:
        raise VolumeError(f"{label} has no TransferSyntaxUID in its file meta information")
    if image.frame_source not in (FrameSource.SINGLE_FRAME, FrameSource.FUNCTIONAL_GROUPS):
        raise VolumeError(
            f"{label} is a multi-frame image of {image.number_of_frames} frames without "
            "functional groups: the frame positions are unknown")
    return _FileHeader(
        path=path,
        label=label,
        transfer_syntax=UID(str(transfer_syntax)),
        sop_instance_uid=sop_uid,
        sop_class_uid=image.sop_class_uid or "",
        series_instance_uid=series_uid,
        study_instance_uid=image.study_instance_uid or "",
        modality=image.modality or "",
        frame_of_reference_uid=image.frame_of_reference_uid,
        rows=rows,
        columns=columns,
        frames=image.frames,
        rescales=image.rescales,
    )


def _check_one_series(headers: Sequence[_FileHeader]) -> None:
    series = {h.series_instance_uid for h in headers}
    if len(series) > 1:
        raise VolumeError(
            f"the {len(headers)} files belong to {len(series)} series "
            "(SeriesInstanceUID differs)")
    instances = {h.sop_instance_uid for h in headers}
    if len(instances) < len(headers):
        raise VolumeError(
            f"{len(headers) - len(instances)} file(s) repeat the SOP Instance UID of "
            "another file")
    references = {h.frame_of_reference_uid for h in headers}
    if len(references) > 1:
        raise VolumeError(f"the files have {len(references)} different FrameOfReferenceUIDs")
    modalities = {h.modality for h in headers}
    if len(modalities) > 1:
        raise VolumeError(
            f"the files have more than one Modality ({', '.join(sorted(modalities))})")


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Plan:
    """Where each source frame goes: ``targets[frame]`` lists (z index, weight)."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    depth: int
    targets: tuple[tuple[tuple[int, float], ...], ...]
    nearest: tuple[int, ...]  # the source frame (global index) for each z
    resampled: bool


def _unit(v: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    result: npt.NDArray[np.float64] = v / np.linalg.norm(v)
    return result


def _plan(frames: Sequence[FrameGeometry], geometry: Sequence[Frame], verdict: GeometryVerdict,
          *, resample_irregular: bool) -> _Plan:
    n = len(frames)
    first = frames[0]
    # No frames, frames without position or orientation, or an orientation that
    # orientation_label() refuses (row and column parallel or zero): nothing to build on.
    if verdict.orientation is None or first.orientation is None or any(
            f.position is None for f in frames):
        raise VolumeError(f"series is not one regular volume: {verdict.reason}")
    iop = np.asarray(first.orientation, dtype=np.float64)
    row, col = _unit(iop[:3]), _unit(iop[3:])
    cosine = float(abs(row @ col))
    if cosine > _PERPENDICULAR_TOLERANCE:
        raise VolumeError(
            "ImageOrientationPatient row and column directions are not perpendicular "
            f"(cosine {cosine:.4f})")
    normal = _unit(np.cross(row, col))
    positions = np.asarray([f.position for f in frames], dtype=np.float64)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along_sorted = along[order]

    if not verdict.whole:
        # Same frames with their positions moved onto a regular 1 mm grid along the normal
        # (and one in-plane offset): whole unless orientation, matrix or pixel spacing
        # differ, which are then the reason.
        in_plane = positions - np.outer(along, normal)
        rank = np.empty(n, dtype=np.int64)
        rank[order] = np.arange(n)
        regular = [Frame(tuple(float(c) for c in in_plane[0] + rank[i] * normal),
                         g.orientation, g.rows, g.columns, g.pixel_spacing)
                   for i, g in enumerate(geometry)]
        shift = float(np.linalg.norm(in_plane - in_plane[0], axis=1).max())
        if not assess(regular).whole:
            raise VolumeError(f"series is not one regular volume: {verdict.reason}")
        if shift > POSITION_TOLERANCE_MM:
            raise VolumeError(
                f"series is not one regular volume: {verdict.reason}; a gantry-tilted or "
                "sheared stack is not supported")
        if float(np.diff(along_sorted).min()) < POSITION_TOLERANCE_MM:
            raise VolumeError(f"series is not one regular volume: {verdict.reason}")
        if not resample_irregular:
            raise VolumeError(
                f"series is not one regular volume: {verdict.reason} (resampling of "
                "irregular slice spacing was not requested)")

    spacing_xy = first.pixel_spacing
    if spacing_xy is None:
        raise VolumeError("series is not one regular volume: PixelSpacing is missing")
    origin = tuple(float(c) for c in positions[order[0]])
    direction = tuple(float(v) for v in np.column_stack([row, col, normal]).ravel())

    if verdict.whole:
        if n == 1:
            dz = first.slice_thickness or 1.0
        else:
            dz = float(along_sorted[-1] - along_sorted[0]) / (n - 1)
        targets: list[tuple[tuple[int, float], ...]] = [()] * n
        for z, i in enumerate(order):
            targets[int(i)] = ((z, 1.0),)
        return _Plan((origin[0], origin[1], origin[2]), (spacing_xy[1], spacing_xy[0], dz),
                     direction, n, tuple(targets), tuple(int(i) for i in order), False)

    # Irregular spacing or gaps: a regular grid from the first to the last slice whose
    # spacing is the median source spacing, adjusted so that the grid ends on the last slice.
    span = float(along_sorted[-1] - along_sorted[0])
    median = float(np.median(np.diff(along_sorted)))
    steps = max(1, round(span / median))
    dz = span / steps
    contributions: list[list[tuple[int, float]]] = [[] for _ in range(n)]
    nearest: list[int] = []
    for z in range(steps + 1):
        t = along_sorted[0] + z * dz
        k = int(np.clip(np.searchsorted(along_sorted, t, side="right") - 1, 0, n - 2))
        lower, upper = float(along_sorted[k]), float(along_sorted[k + 1])
        w = (t - lower) / (upper - lower)
        if (t - lower) <= _SNAP_MM:
            w = 0.0
        elif (upper - t) <= _SNAP_MM:
            w = 1.0
        i_lower, i_upper = int(order[k]), int(order[k + 1])
        if w < 1.0:
            contributions[i_lower].append((z, 1.0 - w))
        if w > 0.0:
            contributions[i_upper].append((z, w))
        nearest.append(i_lower if w <= 0.5 else i_upper)
    return _Plan((origin[0], origin[1], origin[2]), (spacing_xy[1], spacing_xy[0], dz),
                 direction, steps + 1, tuple(tuple(c) for c in contributions),
                 tuple(nearest), True)


# --------------------------------------------------------------------------- pixels


def _decoded_frames(header: _FileHeader) -> Iterator[npt.NDArray[Any]]:
    """The stored values of each frame of one file, in file order (one frame at a time)."""
    if header.dataset is not None and "PixelData" in header.dataset:
        yield from iter_pixels(header.dataset)
    elif header.transfer_syntax.is_deflated:
        # iter_pixels() reads a file's raw bytes and cannot inflate a deflated data set.
        yield from iter_pixels(pydicom.dcmread(header.path))
    else:
        yield from iter_pixels(header.path)


def _fill(image: Any, headers: Sequence[_FileHeader], rescales: Sequence[Rescale],
          plan: _Plan) -> None:
    """Decode file by file and paste each z slice into ``image`` once it is complete."""
    first_frame: list[int] = []
    count = 0
    for h in headers:
        first_frame.append(count)
        count += len(h.frames)
    needed = [0] * plan.depth
    for targets in plan.targets:
        for z, _w in targets:
            needed[z] += 1
    pending: dict[int, npt.NDArray[np.float64]] = {}

    def first_z(f: int) -> int:
        start, stop = first_frame[f], first_frame[f] + len(headers[f].frames)
        return min((z for i in range(start, stop) for z, _ in plan.targets[i]),
                   default=plan.depth)

    for f in sorted(range(len(headers)), key=first_z):
        header = headers[f]
        shape = (header.rows, header.columns)
        decoded = 0
        try:
            for k, stored in enumerate(_decoded_frames(header)):
                if k >= len(header.frames):
                    raise VolumeError(
                        f"{header.label} holds more frames than NumberOfFrames "
                        f"({len(header.frames)})")
                if stored.shape != shape:
                    raise VolumeError(
                        f"{header.label}, frame {k + 1}: pixel data shape {stored.shape} "
                        f"does not match Rows x Columns {shape}")
                rescale = rescales[first_frame[f] + k]
                values = stored.astype(np.float64)
                if rescale.slope != 1.0:
                    values *= rescale.slope
                if rescale.intercept != 0.0:
                    values += rescale.intercept
                for z, w in plan.targets[first_frame[f] + k]:
                    part = values if w == 1.0 else values * w
                    total = pending.pop(z, None)
                    pending[z] = part if total is None else total + part
                    needed[z] -= 1
                    if needed[z] == 0:
                        slice_image = _sitk.GetImageFromArray(
                            pending.pop(z).astype(np.float32, copy=False))
                        image[:, :, z] = slice_image
                decoded += 1
        except VolumeError:
            raise
        except (FileNotFoundError, PermissionError, IsADirectoryError):
            raise
        except Exception as exc:
            raise VolumeError(
                f"{header.label}: pixel data cannot be decoded "
                f"({header.transfer_syntax.name}): {type(exc).__name__}: {exc}") from None
        if decoded != len(header.frames):
            raise VolumeError(
                f"{header.label} holds {decoded} frame(s) of pixel data, expected "
                f"{len(header.frames)}")
    if pending or any(needed):  # pragma: no cover - the plan gives every z its weights
        raise AssertionError("volume slices left incomplete")


# --------------------------------------------------------------------------- public API


def read_series(
    paths: Sequence[str | os.PathLike[str]],
    *,
    resample_irregular: bool = False,
    datasets: Sequence[Dataset] | None = None,
) -> SeriesVolume:
    """Read the files of one image series into one float32 volume (DICOM LPS, mm).

    Headers are read first without pixel data; all files must belong to one series
    (one SeriesInstanceUID, FrameOfReferenceUID and Modality, distinct SOP Instance
    UIDs) and hold single-sample MONOCHROME1/2 images. Each single-frame instance gives
    one frame; a multi-frame instance gives one frame per item of its Per-frame
    Functional Groups (PlanePosition, PlaneOrientation, PixelMeasures and Pixel Value
    Transformation macros, per frame or shared). The frames are judged by
    :func:`dicomnode.geometry.assess` and stacked in increasing position along the
    slice normal (row x column), whatever the order of ``paths``.

    A single slice is allowed; its z spacing is its SliceThickness, or 1.0 mm.

    Args:
        paths: the files of the series, in any order.
        resample_irregular: when the frames agree in orientation, matrix and pixel
            spacing and are stacked straight along the normal, but their spacing along
            the normal is irregular or has gaps, interpolate linearly along the normal
            onto a regular grid from the first to the last slice. Its spacing is the
            median spacing between neighbouring source slices, adjusted so that a whole
            number of steps spans first to last slice. Grid slices within 0.001 mm of
            a source slice take its values unchanged. The result has ``resampled`` set
            and refers each z to the nearest source slice.
        datasets: the datasets of ``paths``, in the same order, already read (e.g.
            pseudonymized in memory): every attribute is taken from them, and the pixel
            data too where they hold it (else it is read from ``paths``).

    Returns:
        The volume and, per z index, its source instance, frame number and SOP class.

    Raises:
        TypeError: ``paths`` is a single path rather than a sequence of paths.
        FileNotFoundError, PermissionError: a file cannot be opened.
        VolumeError: the files are not one series, a file cannot be parsed or decoded,
            the images are colour, or the frames do not form one regular stack (the
            geometry verdict's reason: mixed orientation, matrix or pixel spacing,
            duplicate positions, gantry tilt or in-plane shift, and - unless
            ``resample_irregular`` - gaps or irregular spacing).
    """
    if isinstance(paths, (str, bytes, os.PathLike)):
        raise TypeError("paths must be a sequence of paths, not a single path")
    if len(paths) == 0:
        raise VolumeError("no files given")
    total = len(paths)
    if datasets is not None and len(datasets) != total:
        raise ValueError(f"{len(datasets)} datasets given for {total} files")
    given: Sequence[Dataset | None] = datasets if datasets is not None else [None] * total
    files = [_read_header(Path(p), f"file {i + 1} of {total}", ds)
             for i, (p, ds) in enumerate(zip(paths, given, strict=True))]
    _check_one_series(files)

    frames = [frame for h in files for frame in h.frames]
    owners = [(h, k + 1) for h in files for k in range(len(h.frames))]
    geometry = [plane for h in files for plane in planes(h.frames, h.rows, h.columns)]
    verdict = assess(geometry)
    plan = _plan(frames, geometry, verdict, resample_irregular=resample_irregular)

    columns, rows = files[0].columns, files[0].rows
    image: Any = _sitk.Image([columns, rows, plan.depth], sitk.sitkFloat32)
    image.SetOrigin(plan.origin)
    image.SetSpacing(plan.spacing)
    image.SetDirection(plan.direction)
    _fill(image, files, [r for h in files for r in h.rescales], plan)

    first = files[0]
    return SeriesVolume(
        image=image,
        sop_instance_uids=tuple(owners[i][0].sop_instance_uid for i in plan.nearest),
        frame_numbers=tuple(owners[i][1] for i in plan.nearest),
        sop_class_uids=tuple(owners[i][0].sop_class_uid for i in plan.nearest),
        modality=first.modality,
        series_instance_uid=first.series_instance_uid,
        study_instance_uid=first.study_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        geometry=verdict,
        resampled=plan.resampled,
    )


def write_nifti(image: sitk.Image, path: str | os.PathLike[str]) -> None:
    """Write ``image`` as NIfTI-1 (``.nii`` or ``.nii.gz``).

    SimpleITK converts the LPS geometry of the image into the RAS world coordinates of
    the NIfTI header (qform and sform), so the file shows the same anatomy.

    Raises:
        ValueError: ``path`` does not end in ``.nii`` or ``.nii.gz``.
    """
    name = os.fspath(path)
    if not (name.endswith(".nii") or name.endswith(".nii.gz")):
        raise ValueError(f"a NIfTI file name ends in .nii or .nii.gz, got {Path(name).name!r}")
    _sitk.WriteImage(image, name)
