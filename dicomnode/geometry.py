"""Geometry verdicts: is a series one whole, regular stack of slices?

All coordinates are in the DICOM patient coordinate system (LPS) in mm.
A frame is one 2D image plane: a single-frame instance, or one frame of a
multi-frame instance. A series is *whole* when its frames share one
orientation, one matrix size and one pixel spacing, are stacked along the
slice normal (no in-plane shift, so no gantry tilt), and their positions
along the normal lie on one regular grid with no gaps and no duplicates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from dicomnode.dicom.frames import FrameGeometry

__all__ = [
    "ORIENTATION_COSINE_THRESHOLD",
    "Frame",
    "GeometryVerdict",
    "assess",
    "orientation_label",
    "planes",
]

ORIENTATION_TOLERANCE = 1e-3
"""Largest difference between direction cosines that still counts as the same orientation."""
POSITION_TOLERANCE_MM = 0.05
"""Largest in-plane shift between slices, and the closest two distinct slices may be (mm)."""
ORIENTATION_COSINE_THRESHOLD = 0.9
"""Smallest |cosine| between the slice normal and a patient axis for a named orientation
(about 25.8 degrees of tilt); more tilted slices are OBLIQUE."""
SPACING_TOLERANCE = 0.05
"""Largest deviation from a whole multiple of the slice spacing, as a fraction of it."""


@dataclass(frozen=True)
class Frame:
    """One image plane: position of its first pixel and its direction cosines (LPS, mm)."""

    position: Sequence[float] | None
    orientation: Sequence[float] | None
    rows: int | None
    columns: int | None
    pixel_spacing: Sequence[float] | None = None


def planes(frames: Iterable[FrameGeometry], rows: int | None,
           columns: int | None) -> list[Frame]:
    """The :class:`Frame` of each frame of one instance (its matrix is ``rows`` x
    ``columns``), as the header model (:mod:`dicomnode.dicom`) placed it."""
    return [Frame(f.position, f.orientation, rows, columns, f.pixel_spacing) for f in frames]


@dataclass(frozen=True)
class GeometryVerdict:
    """The outcome of :func:`assess`.

    ``slice_spacing`` is the distance between neighbouring slices along the
    normal in mm (None for fewer than two slices or an irregular stack).
    """

    whole: bool
    reason: str
    frames: int
    slice_spacing: float | None = None
    orientation: str | None = None


def orientation_label(iop: Sequence[float]) -> str:
    """Label a slice orientation from ImageOrientationPatient.

    The slice normal is row x column (normalised). The label names the patient axis
    the normal is closest to, ``SAGITTAL`` for x, ``CORONAL`` for y and ``AXIAL``
    for z, provided the absolute cosine with that axis is at least
    :data:`ORIENTATION_COSINE_THRESHOLD` (0.9, about 25.8 degrees); otherwise
    ``OBLIQUE``.

    Raises:
        ValueError: If ``iop`` does not hold six finite numbers, or if the row and
            column directions are (nearly) parallel or zero.
    """
    try:
        numbers = [float(v) for v in iop]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"ImageOrientationPatient must hold numbers: {exc}") from None
    if len(numbers) != 6:
        raise ValueError(f"ImageOrientationPatient has 6 values, got {len(numbers)}")
    if not all(math.isfinite(v) for v in numbers):
        raise ValueError(f"ImageOrientationPatient values must be finite, got {numbers}")
    rx, ry, rz, cx, cy, cz = numbers
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(c * c for c in normal))
    scale = math.sqrt(rx * rx + ry * ry + rz * rz) * math.sqrt(cx * cx + cy * cy + cz * cz)
    if scale == 0.0 or length / scale < 1e-6:
        raise ValueError(
            f"ImageOrientationPatient row and column directions are parallel or zero: {numbers}"
        )
    cosines = [abs(c) / length for c in normal]
    axis = max(range(3), key=lambda i: cosines[i])
    if cosines[axis] < ORIENTATION_COSINE_THRESHOLD:
        return "OBLIQUE"
    return ("SAGITTAL", "CORONAL", "AXIAL")[axis]


def _where(position: np.ndarray, label: str, along: float) -> str:
    axis = {"SAGITTAL": 0, "CORONAL": 1, "AXIAL": 2}.get(label)
    if axis is None:
        return f"{along:.1f} mm along the normal"
    return f"{'xyz'[axis]}={position[axis]:.1f} mm"


def assess(frames: Sequence[Frame]) -> GeometryVerdict:
    """Decide whether ``frames`` form one whole regular stack, and say why not."""
    n = len(frames)
    if n == 0:
        return GeometryVerdict(False, "no image frames", 0)
    no_geometry = sum(1 for f in frames if f.position is None or f.orientation is None)
    if no_geometry:
        return GeometryVerdict(
            False, f"{no_geometry} of {n} frames lack ImagePositionPatient or "
            "ImageOrientationPatient", n)
    orientations = np.array([f.orientation for f in frames], dtype=float)
    try:
        label = orientation_label(orientations[0])
    except ValueError as exc:
        return GeometryVerdict(False, str(exc), n)
    if np.abs(orientations - orientations[0]).max() > ORIENTATION_TOLERANCE:
        return GeometryVerdict(False, "frames have more than one orientation", n,
                               orientation=label)
    sizes = sorted({(f.rows, f.columns) for f in frames}, key=str)
    if len(sizes) > 1:
        listed = ", ".join(f"{r}x{c}" for r, c in sizes[:4])
        return GeometryVerdict(False, f"frames have more than one matrix size ({listed})", n,
                               orientation=label)
    spacings = {tuple(round(float(v), 4) for v in f.pixel_spacing) for f in frames
                if f.pixel_spacing is not None}
    if len(spacings) > 1:
        return GeometryVerdict(False, "frames have more than one pixel spacing", n,
                               orientation=label)
    if n == 1:
        return GeometryVerdict(True, "single slice", 1, orientation=label)

    row, col = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.array([f.position for f in frames], dtype=float)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    positions, along = positions[order], along[order]

    in_plane = positions - np.outer(along, normal)
    shift = float(np.linalg.norm(in_plane - in_plane[0], axis=1).max())
    if shift > POSITION_TOLERANCE_MM:
        return GeometryVerdict(
            False, f"slices are not stacked along the normal (in-plane shift up to "
            f"{shift:.2f} mm: gantry tilt or shifted slices)", n, orientation=label)

    diffs = np.diff(along)
    duplicates = np.flatnonzero(diffs < POSITION_TOLERANCE_MM)
    if duplicates.size:
        i = int(duplicates[0])
        return GeometryVerdict(
            False, f"{duplicates.size} duplicate slice position(s), first at "
            f"{_where(positions[i], label, along[i])}", n, orientation=label)

    spacing = float(np.median(diffs))
    steps = diffs / spacing
    whole_steps = np.rint(steps)
    irregular = np.flatnonzero(np.abs(steps - whole_steps) > SPACING_TOLERANCE)
    if irregular.size:
        i = int(irregular[0])
        return GeometryVerdict(
            False, f"irregular slice spacing: {diffs[i]:.2f} mm where {spacing:.2f} mm is "
            f"usual, after {_where(positions[i], label, along[i])}", n, orientation=label)
    gaps = np.flatnonzero(whole_steps > 1)
    if gaps.size:
        parts = []
        for i in gaps[:3]:
            missing = int(whole_steps[i]) - 1
            first_missing = positions[i] + normal * spacing
            parts.append(f"gap of {missing} slice{'s' if missing > 1 else ''} at "
                         f"{_where(first_missing, label, along[i] + spacing)}")
        more = f" and {gaps.size - 3} more" if gaps.size > 3 else ""
        return GeometryVerdict(False, "; ".join(parts) + more, n, spacing, label)
    return GeometryVerdict(True, f"{n} slices, {spacing:.3g} mm apart", n, spacing, label)
