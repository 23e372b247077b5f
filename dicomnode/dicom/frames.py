"""Per-frame geometry of DICOM images: one plane per frame, and its place in the index.

All positions and orientations are in the DICOM patient coordinate system (LPS, mm):
``position`` is ImagePositionPatient (centre of the first pixel), ``orientation`` is
ImageOrientationPatient (row cosine, then column cosine), ``pixel_spacing`` is
PixelSpacing (row spacing, column spacing; mm) and ``slice_thickness`` is SliceThickness
(mm). A frame is one 2D image plane: a single-frame instance, or one frame of a
multi-frame instance.

Only pydicom-free arithmetic lives here (numpy at most): the receiving process imports it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FrameGeometry",
    "FrameSource",
    "frames_from_index",
    "frames_to_index",
    "grid_positions",
]


class FrameSource(str, enum.Enum):
    """Where the per-frame geometry of an instance came from."""

    SINGLE_FRAME = "single_frame"
    """One frame: the instance's own ImagePositionPatient, ImageOrientationPatient, ..."""
    FUNCTIONAL_GROUPS = "functional_groups"
    """Enhanced multi-frame: Plane Position, Plane Orientation and Pixel Measures macros of
    the Per-frame Functional Groups, else the Shared ones, else the top-level attribute."""
    DOSE_GRID = "dose_grid"
    """RT Dose: positions from GridFrameOffsetVector along the normal (PS3.3 C.8.8.3.2)."""
    UNPOSITIONED = "unpositioned"
    """Multi-frame without per-frame positions (cine, a grid that cannot be placed)."""


def _numbers(name: str, value: Sequence[float] | None, count: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must hold numbers, got {value!r}") from None
    if len(numbers) != count:
        raise ValueError(f"{name} has {len(numbers)} values, expected {count}")
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"{name} values must be finite, got {list(numbers)}")
    return numbers


@dataclass(frozen=True)
class FrameGeometry:
    """The plane of one frame (LPS, mm); ``None`` where the dataset does not say.

    Raises:
        ValueError: a value has the wrong number of numbers (3 for ``position``, 6 for
            ``orientation``, 2 for ``pixel_spacing``), is not finite, or a spacing or
            thickness is not positive.
    """

    position: tuple[float, float, float] | None = None
    orientation: tuple[float, float, float, float, float, float] | None = None
    pixel_spacing: tuple[float, float] | None = None
    slice_thickness: float | None = None

    def __post_init__(self) -> None:
        for name, count in (("position", 3), ("orientation", 6), ("pixel_spacing", 2)):
            object.__setattr__(self, name, _numbers(name, getattr(self, name), count))
        if self.pixel_spacing is not None and min(self.pixel_spacing) <= 0:
            raise ValueError(f"pixel_spacing must be positive, got {list(self.pixel_spacing)}")
        if self.slice_thickness is not None:
            thickness = float(self.slice_thickness)
            if not math.isfinite(thickness) or thickness <= 0:
                raise ValueError(f"slice_thickness must be positive, got {thickness}")
            object.__setattr__(self, "slice_thickness", thickness)


def _normal(iop: Sequence[float]) -> tuple[float, float, float] | None:
    row, col = iop[:3], iop[3:]
    normal = (row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
              row[0] * col[1] - row[1] * col[0])
    length = math.sqrt(sum(c * c for c in normal))
    if not math.isfinite(length) or length < 1e-6:
        return None
    return (normal[0] / length, normal[1] / length, normal[2] / length)


def grid_positions(origin: Sequence[float], iop: Sequence[float],
                   offsets: Sequence[float]) -> list[tuple[float, float, float]] | None:
    """Frame positions of an RT Dose grid (PS3.3 C.8.8.3.2).

    GridFrameOffsetVector (``offsets``, mm) gives each frame's offset along the normal of
    ImageOrientationPatient (``iop``), relative to ImagePositionPatient (``origin``) when
    its first value is 0, otherwise (axial grids only) the frames' z coordinates. None when
    the grid cannot be placed (parallel cosines, absolute offsets on a non-axial grid).
    """
    normal = _normal(iop)
    if normal is None:
        return None
    values = [float(v) for v in offsets]
    if values and values[0] != 0.0:
        if [round(float(v), 6) for v in iop] != [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]:
            return None
        base = sum(o * n for o, n in zip(origin, normal, strict=True))
        values = [z - base for z in values]
    positions = [(origin[0] + d * normal[0], origin[1] + d * normal[1],
                  origin[2] + d * normal[2]) for d in values]
    if not all(math.isfinite(c) for p in positions for c in p):
        return None
    return positions


# --------------------------------------------------------------------------- index form


def _listed(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def frames_to_index(frames: Sequence[FrameGeometry], source: FrameSource, *,
                    orientation: Sequence[float] | None,
                    pixel_spacing: Sequence[float] | None,
                    ) -> tuple[list[list[float] | None] | None, dict[str, Any] | None]:
    """The index columns ``frame_positions`` and ``frame_geometry`` of a multi-frame image.

    ``frame_positions`` holds one ``[x, y, z]`` (mm) per frame, ``None`` for a frame
    without a position; it is ``None`` for single-frame and unpositioned images, whose
    instance columns say all. ``frame_geometry`` is ``None`` unless some frame's
    orientation or pixel spacing differs from the instance's ``orientation`` and
    ``pixel_spacing`` columns; then it holds ``{"orientations": [[6 numbers] or None per
    frame]}`` and/or ``{"pixel_spacings": [[2 numbers] or None per frame]}``, only for the
    attribute that varies. Single-frame instances need neither.
    """
    if source in (FrameSource.SINGLE_FRAME, FrameSource.UNPOSITIONED):
        positions = None
    else:
        positions = [_listed(f.position) for f in frames]
    extra: dict[str, Any] = {}
    own = None if orientation is None else tuple(float(v) for v in orientation)
    if any(f.orientation != own for f in frames):
        extra["orientations"] = [_listed(f.orientation) for f in frames]
    spacing = None if pixel_spacing is None else tuple(float(v) for v in pixel_spacing)
    if any(f.pixel_spacing != spacing for f in frames):
        extra["pixel_spacings"] = [_listed(f.pixel_spacing) for f in frames]
    return positions, (extra or None)


def _per_frame(values: Any, name: str, count: int) -> list[Any]:
    if not isinstance(values, list) or len(values) != count:
        raise ValueError(f"frame_geometry {name} must list {count} frames")
    return values


def frames_from_index(*, number_of_frames: int | None,
                      position: Sequence[float] | None,
                      orientation: Sequence[float] | None,
                      pixel_spacing: Sequence[float] | None,
                      frame_positions: Sequence[Sequence[float] | None] | None,
                      frame_geometry: dict[str, Any] | None) -> tuple[FrameGeometry, ...]:
    """The frames of one indexed instance, as :func:`frames_to_index` stored them.

    Rows written by earlier releases are read too: their ``frame_positions`` entries of
    9 numbers are a position followed by that frame's own orientation.

    Raises:
        ValueError: the columns do not describe valid frames (see :class:`FrameGeometry`).
    """
    if frame_positions:
        count = len(frame_positions)
        positions: list[Sequence[float] | None] = []
        orientations: list[Sequence[float] | None] = []
        for pos in frame_positions:
            positions.append(None if pos is None else pos[:3])
            orientations.append(pos[3:] if pos is not None and len(pos) == 9 else orientation)
    else:
        count = max(number_of_frames or 1, 1)
        positions = [position if count == 1 else None] * count
        orientations = [orientation] * count
    spacings: list[Sequence[float] | None] = [pixel_spacing] * count
    if frame_geometry:
        if "orientations" in frame_geometry:
            orientations = _per_frame(frame_geometry["orientations"], "orientations", count)
        if "pixel_spacings" in frame_geometry:
            spacings = _per_frame(frame_geometry["pixel_spacings"], "pixel_spacings", count)
    return tuple(
        FrameGeometry(position=_tuple3(p), orientation=_tuple6(o), pixel_spacing=_tuple2(s))
        for p, o, s in zip(positions, orientations, spacings, strict=True))


def _tuple3(v: Sequence[float] | None) -> tuple[float, float, float] | None:
    return None if v is None else tuple(v)  # type: ignore[return-value]  # checked in FrameGeometry


def _tuple6(v: Sequence[float] | None) -> tuple[float, float, float, float, float, float] | None:
    return None if v is None else tuple(v)  # type: ignore[return-value]  # checked in FrameGeometry


def _tuple2(v: Sequence[float] | None) -> tuple[float, float] | None:
    return None if v is None else tuple(v)  # type: ignore[return-value]  # checked in FrameGeometry
