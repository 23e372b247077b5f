"""One DICOM header model: what the index, the rules and inference read from an image.

:meth:`ImageHeader.from_dataset` parses a dataset read without pixel data once: the
identifying UIDs, the image pixel description, and the geometry and rescale of every
frame (see :mod:`dicomnode.dicom.frames` for units and coordinates). One rule places
every frame, whoever asks:

* a single-frame image has one frame: its own ImagePositionPatient,
  ImageOrientationPatient, PixelSpacing and SliceThickness;
* an enhanced multi-frame image has one frame per item of its Per-frame Functional
  Groups (or NumberOfFrames frames when it has only Shared ones); each frame's Plane
  Position, Plane Orientation, Pixel Measures and Pixel Value Transformation macro is the
  per-frame item's, else the shared item's, else the top-level attribute;
* an RT Dose grid is placed by GridFrameOffsetVector;
* any other multi-frame image has NumberOfFrames frames without a position.

A value that cannot be read (wrong count, not numbers, not finite, a non-positive pixel
spacing) is left ``None`` and listed in :attr:`ImageHeader.problems` with a precise
message, so the index can keep a damaged image (its geometry verdict then says what is
missing) while the volume reader refuses it with that message.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.dicom.frames import FrameGeometry, FrameSource, frames_to_index, grid_positions

__all__ = ["HeaderProblem", "ImageHeader", "Rescale", "first_item", "text"]


@dataclass(frozen=True)
class HeaderProblem:
    """A value of the header that could not be read; ``frame`` is 1-based, None for the
    instance itself."""

    message: str
    frame: int | None = None

    def __str__(self) -> str:
        return self.message if self.frame is None else f"frame {self.frame}: {self.message}"


@dataclass(frozen=True)
class Rescale:
    """The modality LUT of a frame: modality value = stored value * slope + intercept."""

    slope: float = 1.0
    intercept: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.slope) and math.isfinite(self.intercept)):
            raise ValueError(f"rescale must be finite, got {self.slope}, {self.intercept}")


def text(ds: Dataset, keyword: str) -> str | None:
    """A text value stripped of padding (spaces, NUL), None when absent or empty."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    stripped = str(value).strip().rstrip("\x00")
    return stripped or None


def first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    """The first item of sequence ``keyword`` of ``ds``; None when absent or empty."""
    if ds is None:
        return None
    seq = ds.get(keyword)
    if not seq:
        return None
    item: Dataset = seq[0]
    return item


class _Reader:
    """Reads numbers, collecting problems instead of raising."""

    def __init__(self) -> None:
        self.problems: list[HeaderProblem] = []

    def numbers(self, ds: Dataset | None, keyword: str, count: int,
                frame: int | None = None) -> tuple[float, ...] | None:
        if ds is None:
            return None
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        items = (list(value) if isinstance(value, Sequence) and not isinstance(value, str)
                 else [value])
        try:
            numbers = tuple(float(v) for v in items)
        except (TypeError, ValueError):
            self.problems.append(HeaderProblem(f"{keyword} must hold numbers", frame))
            return None
        if len(numbers) != count:
            self.problems.append(HeaderProblem(
                f"{keyword} has {len(numbers)} values, expected {count}", frame))
            return None
        if not all(math.isfinite(v) for v in numbers):
            self.problems.append(HeaderProblem(f"{keyword} values must be finite", frame))
            return None
        return numbers

    def count(self, ds: Dataset, keyword: str) -> int | None:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        try:
            number = int(value)
        except (TypeError, ValueError):
            self.problems.append(HeaderProblem(f"{keyword} must be an integer"))
            return None
        if number < 0:
            self.problems.append(HeaderProblem(f"{keyword} must not be negative, got {number}"))
            return None
        return number

    def frame(self, frame: int | None, *, position: Dataset | None, orientation: Dataset | None,
              measures: Dataset | None) -> FrameGeometry:
        pos = self.numbers(position, "ImagePositionPatient", 3, frame)
        iop = self.numbers(orientation, "ImageOrientationPatient", 6, frame)
        spacing = self.numbers(measures, "PixelSpacing", 2, frame)
        if spacing is not None and min(spacing) <= 0:
            self.problems.append(HeaderProblem(
                f"PixelSpacing must be positive, got {list(spacing)}", frame))
            spacing = None
        thickness = self.numbers(measures, "SliceThickness", 1, frame)
        return FrameGeometry(
            position=(pos[0], pos[1], pos[2]) if pos is not None else None,
            orientation=(iop[0], iop[1], iop[2], iop[3], iop[4], iop[5])
            if iop is not None else None,
            pixel_spacing=(spacing[0], spacing[1]) if spacing is not None else None,
            slice_thickness=thickness[0] if thickness is not None and thickness[0] > 0
            else None,
        )

    def rescale(self, ds: Dataset | None, frame: int | None) -> Rescale:
        slope = self.numbers(ds, "RescaleSlope", 1, frame)
        intercept = self.numbers(ds, "RescaleIntercept", 1, frame)
        return Rescale(slope[0] if slope is not None else 1.0,
                       intercept[0] if intercept is not None else 0.0)


@dataclass(frozen=True)
class ImageHeader:
    """The parsed header of one instance (see the module docstring for the frame rule).

    Attributes:
        sop_class_uid, sop_instance_uid, series_instance_uid, study_instance_uid,
        frame_of_reference_uid, modality: stripped texts, None when absent (the index
            validates UIDs itself and refuses what it cannot key on).
        rows, columns: the matrix size (pixels), None when absent or unreadable.
        number_of_frames: NumberOfFrames, 1 when absent.
        samples_per_pixel: SamplesPerPixel, 1 when absent.
        photometric_interpretation: PhotometricInterpretation, None when absent.
        has_modality_lut_sequence: whether a Modality LUT Sequence replaces the rescale.
        image_position_patient, image_orientation_patient, pixel_spacing,
        slice_thickness: the top-level values (mm, LPS), None when absent; for an
            enhanced multi-frame image usually None: see ``frames``.
        frames: one :class:`FrameGeometry` per frame, in file order.
        rescales: one :class:`Rescale` per frame, in file order.
        frame_source: where ``frames`` came from.
        problems: values that could not be read (left None above), in reading order.
    """

    sop_class_uid: str | None
    sop_instance_uid: str | None
    series_instance_uid: str | None
    study_instance_uid: str | None
    frame_of_reference_uid: str | None
    modality: str | None
    rows: int | None
    columns: int | None
    number_of_frames: int
    samples_per_pixel: int
    photometric_interpretation: str | None
    has_modality_lut_sequence: bool
    image_position_patient: tuple[float, float, float] | None
    image_orientation_patient: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None
    slice_thickness: float | None
    frames: tuple[FrameGeometry, ...]
    rescales: tuple[Rescale, ...]
    frame_source: FrameSource
    problems: tuple[HeaderProblem, ...] = ()

    def __post_init__(self) -> None:
        if self.number_of_frames < 1:
            raise ValueError(f"number_of_frames must be at least 1, got {self.number_of_frames}")
        if not self.frames:
            raise ValueError("an image header has at least one frame")
        if len(self.rescales) != len(self.frames):
            raise ValueError(f"{len(self.rescales)} rescales for {len(self.frames)} frames")
        if self.frame_source is FrameSource.SINGLE_FRAME and len(self.frames) != 1:
            raise ValueError(f"a single-frame image has 1 frame, got {len(self.frames)}")

    @property
    def orientation(self) -> tuple[float, ...] | None:
        """The instance's orientation: the top-level value, else its first frame's."""
        return self.image_orientation_patient or self.frames[0].orientation

    @property
    def spacing(self) -> tuple[float, float] | None:
        """The instance's pixel spacing (mm): the top-level value, else its first frame's."""
        return self.pixel_spacing or self.frames[0].pixel_spacing

    @property
    def thickness(self) -> float | None:
        """The instance's slice thickness (mm): the top-level value, else its first frame's."""
        return self.slice_thickness or self.frames[0].slice_thickness

    def index_frames(self) -> tuple[list[list[float] | None] | None, dict[str, Any] | None]:
        """The index columns ``frame_positions`` and ``frame_geometry`` (see
        :func:`dicomnode.dicom.frames.frames_to_index`)."""
        return frames_to_index(self.frames, self.frame_source, orientation=self.orientation,
                               pixel_spacing=self.spacing)

    @classmethod
    def from_dataset(cls, ds: Dataset) -> ImageHeader:
        """Parse ``ds`` (read with or without pixel data; the pixel data are not touched).

        Values are decoded on access: a malformed element raises what pydicom raises
        when its value is read (callers that must not fail decode the dataset first).
        """
        read = _Reader()
        rows, columns = read.count(ds, "Rows"), read.count(ds, "Columns")
        number_of_frames = read.count(ds, "NumberOfFrames") or 1
        samples = read.count(ds, "SamplesPerPixel")
        top = read.frame(None, position=ds, orientation=ds, measures=ds)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence")
        shared = first_item(ds, "SharedFunctionalGroupsSequence")
        frames: list[FrameGeometry] = []
        rescales: list[Rescale] = []
        if per_frame is not None or shared is not None:
            source = FrameSource.FUNCTIONAL_GROUPS
            # Without Per-frame Functional Groups every macro is shared by all frames.
            items = (list(per_frame) if per_frame is not None
                     else [Dataset() for _ in range(number_of_frames)])
            if len(items) != number_of_frames:
                read.problems.append(HeaderProblem(
                    f"{len(items)} Per-frame Functional Groups items for NumberOfFrames "
                    f"{number_of_frames}"))
            for k, item in enumerate(items or [Dataset()]):

                def group(keyword: str, item: Dataset = item) -> Dataset:
                    return first_item(item, keyword) or first_item(shared, keyword) or ds

                frames.append(read.frame(
                    k + 1, position=group("PlanePositionSequence"),
                    orientation=group("PlaneOrientationSequence"),
                    measures=group("PixelMeasuresSequence")))
                rescales.append(read.rescale(group("PixelValueTransformationSequence"), k + 1))
        elif number_of_frames > 1:
            offsets = (read.numbers(ds, "GridFrameOffsetVector", number_of_frames)
                       if "GridFrameOffsetVector" in ds else None)
            placed = (grid_positions(top.position, top.orientation, offsets)
                      if offsets is not None and top.position is not None
                      and top.orientation is not None else None)
            source = FrameSource.DOSE_GRID if placed is not None else FrameSource.UNPOSITIONED
            rescale = read.rescale(ds, None)
            for k in range(number_of_frames):
                frames.append(FrameGeometry(
                    position=placed[k] if placed is not None else None,
                    orientation=top.orientation, pixel_spacing=top.pixel_spacing,
                    slice_thickness=top.slice_thickness))
                rescales.append(rescale)
        else:
            source = FrameSource.SINGLE_FRAME
            frames.append(top)
            rescales.append(read.rescale(ds, None))
        return cls(
            sop_class_uid=text(ds, "SOPClassUID"),
            sop_instance_uid=text(ds, "SOPInstanceUID"),
            series_instance_uid=text(ds, "SeriesInstanceUID"),
            study_instance_uid=text(ds, "StudyInstanceUID"),
            frame_of_reference_uid=text(ds, "FrameOfReferenceUID"),
            modality=text(ds, "Modality"),
            rows=rows,
            columns=columns,
            number_of_frames=number_of_frames,
            samples_per_pixel=1 if samples is None else samples,
            photometric_interpretation=text(ds, "PhotometricInterpretation"),
            has_modality_lut_sequence="ModalityLUTSequence" in ds,
            image_position_patient=top.position,
            image_orientation_patient=top.orientation,
            pixel_spacing=top.pixel_spacing,
            slice_thickness=top.slice_thickness,
            frames=tuple(frames),
            rescales=tuple(rescales),
            frame_source=source,
            problems=tuple(read.problems),
        )
