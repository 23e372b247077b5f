"""Received structures back onto a source grid: RTSTRUCT contours rasterized, SEG segments
read with highdicom; the inverse of :mod:`dicomnode.outputs.rtstruct` and
:mod:`dicomnode.outputs.seg`, for comparing an edited object with dicomnode's result.

**RTSTRUCT.** Each CLOSED_PLANAR contour's points (LPS, mm) are mapped to the grid's
continuous voxel indices; the contour belongs to the slice its points lie on (within half
a slice spacing, else it is left out and counted). A voxel is inside a structure when its
*centre* is inside the structure's contours of its slice by the even-odd rule: the contours
of one ROI on one slice are taken together, so a contour inside another is a hole (the
convention :mod:`dicomnode.outputs.rtstruct` writes and treatment planning systems read).
For the polygons dicomnode traces (through the middle of pixel edges) this gives back the
traced mask exactly. The fill is a scanline parity count, vectorized per slice (numpy only).

**SEG.** Each segment becomes a volume with highdicom (``Segmentation.get_volume``), whose
voxel centres are mapped onto the grid (nearest voxel; voxels outside the grid are left
out). Fractional segments are thresholded at 0.5.

Structures are returned by name (ROIName, SegmentLabel) as boolean arrays ``[z, y, x]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset

__all__ = ["RTSTRUCT_CLASS", "SEG_CLASS", "ContourError", "Grid", "ReceivedStructures",
           "contour_points", "label_map", "rasterize_rtstruct", "read_seg",
           "received_structures"]

Mask = npt.NDArray[np.bool_]
RTSTRUCT_CLASS = "1.2.840.10008.5.1.4.1.1.481.3"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


class ContourError(ValueError):
    """A received object whose structures cannot be placed on the grid (message without
    values from the object)."""


@dataclass(frozen=True)
class Grid:
    """A voxel grid in LPS: ``origin`` the centre of voxel (0, 0, 0) (mm); ``spacing``
    (x, y, z) in mm; ``direction`` the 3x3 matrix whose columns are the x, y and z axes;
    ``size`` (x, y, z) voxels."""

    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]
    size: tuple[int, int, int]

    def __post_init__(self) -> None:
        if len(self.direction) != 9:
            raise ValueError("direction is a 3x3 matrix (9 numbers)")
        if min(self.spacing) <= 0 or min(self.size) <= 0:
            raise ValueError("spacing and size must be positive")

    @classmethod
    def of_image(cls, image: sitk.Image) -> Grid:
        o, s, d, z = image.GetOrigin(), image.GetSpacing(), image.GetDirection(), image.GetSize()
        return cls((float(o[0]), float(o[1]), float(o[2])),
                   (float(s[0]), float(s[1]), float(s[2])),
                   tuple(float(v) for v in d), (int(z[0]), int(z[1]), int(z[2])))

    @property
    def shape(self) -> tuple[int, int, int]:
        """The numpy shape of a mask on this grid, ``(z, y, x)``."""
        return self.size[2], self.size[1], self.size[0]

    @property
    def voxel_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def _axes(self) -> npt.NDArray[np.float64]:
        return np.asarray(self.direction, dtype=np.float64).reshape(3, 3) * np.asarray(
            self.spacing, dtype=np.float64)

    def to_index(self, points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """LPS points ``(n, 3)`` -> continuous voxel indices ``(n, 3)`` as (x, y, z)."""
        offset = np.asarray(points, dtype=np.float64) - np.asarray(self.origin)
        solved: npt.NDArray[np.float64] = np.linalg.solve(self._axes(), offset.T).T
        return solved

    def to_image(self, mask: npt.NDArray[np.generic]) -> sitk.Image:
        """``mask`` ``[z, y, x]`` as a SimpleITK image with this grid's geometry."""
        image = sitk.GetImageFromArray(mask)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


@dataclass
class ReceivedStructures:
    """The structures of one received object on a grid, by name, and what was left out."""

    masks: dict[str, Mask] = field(default_factory=dict)
    contours_off_grid: int = 0  # contours not on a slice of the grid
    voxels_off_grid: int = 0  # SEG voxels outside the grid


def _scanline_fill(polygons: list[npt.NDArray[np.float64]], rows: int, columns: int) -> Mask:
    """Pixels whose centre is inside ``polygons`` (each ``(n, 2)`` as (x, y) in pixel
    indices) by the even-odd rule over all of them."""
    counts = np.zeros((rows, columns + 1), dtype=np.int32)
    for polygon in polygons:
        x0, y0 = polygon[:, 0], polygon[:, 1]
        x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
        low, high = np.minimum(y0, y1), np.maximum(y0, y1)
        start = np.clip(np.ceil(low), 0, rows).astype(np.int64)  # rows y with low <= y < high
        end = np.clip(np.ceil(high), 0, rows).astype(np.int64)
        n = np.maximum(end - start, 0)
        total = int(n.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(len(n)), n)
        r = np.repeat(start, n) + (np.arange(total) - np.repeat(np.cumsum(n) - n, n))
        slope = (x1 - x0)[edge] / (y1 - y0)[edge]  # no horizontal edge has n > 0
        x = x0[edge] + (r - y0[edge]) * slope
        col = np.clip(np.ceil(x), 0, columns).astype(np.int64)  # centres right of the crossing
        np.add.at(counts, (r, col), 1)
    inside: Mask = (np.cumsum(counts, axis=1)[:, :columns] % 2) == 1
    return inside


_CONTOUR_DATA = 0x30060050


def contour_points(contour: Dataset) -> npt.NDArray[np.float64]:
    """A contour item's Contour Data as floats, parsed from the raw bytes when the element
    was not converted yet (pydicom makes one DSfloat per value: seconds for a body outline).

    Raises:
        ContourError: a value is not a number.
    """
    element = contour.get_item(_CONTOUR_DATA)
    if element is None:
        return np.zeros(0, dtype=np.float64)
    raw = element.value
    try:
        if isinstance(raw, bytes):
            text = raw.decode("ascii").strip(" \x00")
            return np.asarray(text.split("\\") if text else [], dtype=np.float64)
        return np.asarray([float(v) for v in contour.ContourData], dtype=np.float64)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ContourError("a contour's data holds a value that is not a number") from exc


def rasterize_rtstruct(ds: Dataset, grid: Grid) -> ReceivedStructures:
    """The ROIs of RT Structure Set ``ds`` as masks on ``grid`` (ROIs without a closed
    planar contour on the grid are present and empty).

    Raises:
        ContourError: the object has no Structure Set ROI Sequence, or a contour's data is
            not a list of 3D points.
    """
    if "StructureSetROISequence" not in ds:
        raise ContourError("the RT Structure Set has no Structure Set ROI Sequence")
    names = {int(roi.ROINumber): str(roi.get("ROIName", "") or "").strip()
             for roi in ds.StructureSetROISequence}
    out = ReceivedStructures()
    depth, rows, columns = grid.shape
    for roi_contour in ds.get("ROIContourSequence", []):
        number = int(roi_contour.ReferencedROINumber)
        name = names.get(number)
        if not name:
            continue
        per_slice: dict[int, list[npt.NDArray[np.float64]]] = {}
        for contour in roi_contour.get("ContourSequence", []):
            if str(contour.get("ContourGeometricType", "")) != "CLOSED_PLANAR":
                continue
            values = contour_points(contour)
            if values.size < 9 or values.size % 3:
                raise ContourError(f"ROI {number}: a contour's data is not a list of at least "
                                   "three 3D points")
            index = grid.to_index(values.reshape(-1, 3))
            z = float(np.mean(index[:, 2]))
            k = math.floor(z + 0.5)
            if not 0 <= k < depth or np.max(np.abs(index[:, 2] - k)) > 0.5:
                out.contours_off_grid += 1
                continue
            per_slice.setdefault(k, []).append(index[:, :2])
        mask = np.zeros(grid.shape, dtype=bool)
        for k, polygons in per_slice.items():
            mask[k] = _scanline_fill(polygons, rows, columns)
        if name in out.masks:  # the same name twice: their union
            out.masks[name] |= mask
        else:
            out.masks[name] = mask
    for name in names.values():  # ROIs without contours: present, empty
        if name and name not in out.masks:
            out.masks[name] = np.zeros(grid.shape, dtype=bool)
    return out


def read_seg(ds: Dataset, grid: Grid) -> ReceivedStructures:
    """The segments of DICOM SEG ``ds`` as masks on ``grid``, by SegmentLabel.

    Raises:
        ContourError: highdicom cannot make a regular volume of a segment.
    """
    import highdicom as hd

    try:
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
    except Exception as exc:
        raise ContourError(f"the SEG cannot be read ({type(exc).__name__})") from exc
    out = ReceivedStructures()
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        name = str(item.get("SegmentLabel", "") or "").strip()
        if not name:
            continue
        mask = out.masks.setdefault(name, np.zeros(grid.shape, dtype=bool))
        try:
            volume = seg.get_volume(segment_numbers=[number])
        except Exception as exc:
            raise ContourError(f"segment {number} is not a regular volume "
                               f"({type(exc).__name__})") from exc
        array = np.asarray(volume.array)
        if array.ndim == 4:
            array = array[..., 0]
        if array.dtype.kind == "f":
            array = array >= 0.5
        found = np.argwhere(array != 0)  # (slice, row, column) indices of the volume
        if found.size == 0:
            continue
        homogeneous = np.c_[found.astype(np.float64), np.ones(len(found))]
        points = (np.asarray(volume.affine, dtype=np.float64) @ homogeneous.T).T[:, :3]
        index = np.floor(grid.to_index(points) + 0.5).astype(np.int64)  # (x, y, z)
        inside = ((index >= 0) & (index < np.asarray(grid.size))).all(axis=1)
        out.voxels_off_grid += int((~inside).sum())
        index = index[inside]
        mask[index[:, 2], index[:, 1], index[:, 0]] = True
    return out


def received_structures(ds: Dataset, grid: Grid) -> ReceivedStructures:
    """The structures of a received RTSTRUCT or SEG on ``grid``.

    Raises:
        ContourError: ``ds`` is neither, or cannot be placed on the grid.
    """
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class == RTSTRUCT_CLASS:
        return rasterize_rtstruct(ds, grid)
    if sop_class == SEG_CLASS:
        return read_seg(ds, grid)
    raise ContourError("the object is neither an RT Structure Set nor a Segmentation")


def label_map(masks: Mapping[str, Mask], labels: Mapping[str, int], shape: tuple[int, ...]
              ) -> npt.NDArray[np.uint8]:
    """One label map of ``masks`` (name -> value in ``labels``; later names win overlaps)."""
    out = np.zeros(shape, dtype=np.uint8)
    for name, mask in masks.items():
        if name in labels:
            out[mask] = labels[name]
    return out
