"""A PNG picture of a finished segmentation: three orthogonal views with the structures.

:func:`render_overlay` draws, side by side, an axial, a coronal and a sagittal view of
the source volume through the centre of the largest structure, with each structure as
a semi-transparent fill and a one-pixel opaque outline in its colour, and below them a
legend (colour swatch, name, volume in mL). It is a pure function of its arguments: no
files, no database, no patient identity other than what the caller puts in ``title``.

Coordinates and conventions:

* The source ``image`` is a 3D :class:`SimpleITK.Image` in DICOM LPS (mm): +x towards
  the patient's left, +y posterior, +z head; its numpy view is indexed ``[z, y, x]``
  (as produced by :func:`dicomnode.inference.volume.read_series`). Its slices may be
  axial, sagittal, coronal or oblique and its spacing anisotropic: the views are
  sampled in patient space through the image's origin, spacing and direction, so any
  orientation gives the same picture of the same anatomy.
* Each mask is indexed ``[z, y, x]`` on the image's grid (same shape as its numpy view).
* Views (radiological convention, as a PACS shows them):

  =========  ====================  ================  ============================
  view       plane                 picture right     picture down
  =========  ====================  ================  ============================
  axial      z = const (LPS)       patient left, +x  posterior, +y (anterior up)
  coronal    y = const             patient left, +x  inferior, -z (superior up)
  sagittal   x = const             posterior, +y     inferior, -z (superior up)
  =========  ====================  ================  ============================

  So the patient's right is on the left of the axial and coronal views, and anterior
  is on the left of the sagittal view. Letters at the edges of each view say so.
* The three planes pass through the centroid of the largest structure (most nonzero
  voxels; the first of equals), computed exactly; when every mask is empty, through
  the centre of the volume. The same anatomy stored in another index order (e.g.
  after ``SimpleITK.DICOMOrient``) gives the same bytes.
* Each view is a ``size`` x ``size`` square of isotropic display pixels (the same mm
  in both directions, so anatomy is not squashed by anisotropic voxels). It shows the
  whole extent of the volume along its two in-plane patient axes (the axis-aligned
  bounding box of the voxel corners), centred and scaled so that the longer of the
  two fits; display pixels outside the volume are black. Grey values are interpolated
  linearly between voxel centres; masks are sampled at the nearest voxel, and the
  outline is drawn on the display grid (mask pixels with a 4-neighbour outside it).

Grey levels (a documented choice), decided on a strided subsample of the voxels
(about a million values), so deterministically and quickly:

* CT-like volumes (minimum below -500, i.e. values look like Hounsfield units) use a
  fixed wide window, level -100 HU and width 1200 HU (-700 .. +500 HU): lung
  parenchyma shows dark grey with vessels, fat and soft tissue stay distinct, and bone
  is near white, so External, Lungs and Bone contours can all be judged on one
  picture.
* Other volumes (MR, PET, ...) use their 1st to 99th percentile.

Cost: only the three 2D planes are sampled (no reoriented or resampled copy of the
volume is made, and boolean masks are read in place); a 512 x 512 x 300 CT with three
structures renders in about 0.15 s on one core, mostly spent counting mask voxels (skipped
for structures that give their ``voxel_count``) and locating the largest structure's
centroid (one pass over its mask), then sampling.
Output is deterministic: the same input gives the same bytes (with the same Pillow
build: the text is drawn with Pillow's default font).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "CT_WINDOW",
    "VIEWS",
    "Box",
    "OverlayLayout",
    "OverlayStructure",
    "VoxelMask",
    "overlay_layout",
    "render_overlay",
]

_sitk: Any = sitk
"""SimpleITK without its (missing) method annotations, for calls in strictly typed code."""

Color = tuple[int, int, int]
FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]
BoolArray = npt.NDArray[np.bool_]

VIEWS: tuple[str, str, str] = ("axial", "coronal", "sagittal")
"""The views from left to right in the picture."""

CT_WINDOW: tuple[float, float] = (-700.0, 500.0)
"""Grey range (HU) of CT-like volumes: level -100, width 1200."""

CT_MINIMUM_BELOW = -500.0
"""A volume whose minimum is below this looks like CT (Hounsfield units)."""

FILL_ALPHA = 0.35
"""Opacity of a structure's fill; its outline is opaque."""

_WINDOW_TARGET = 1_000_000
"""About this many voxels (a strided subsample) decide the grey window."""

# Picture layout, pixels.
_MARGIN = 8
_GAP = 8
_TITLE_H = 22
_CAPTION_H = 16
_ROW_H = 18
_SWATCH = 12
_FONT_SIZE = 12
_MIN_SIZE = 32
_MAX_SIZE = 2048

_BACKGROUND: Color = (24, 24, 24)
_TEXT: Color = (230, 230, 230)
_DIM_TEXT: Color = (170, 170, 170)

# Per view: (patient axis, sign) to the picture's right, then downwards, then the
# patient axis held constant. Axes are LPS: 0 = x (left), 1 = y (posterior), 2 = z (head).
_VIEW_AXES: dict[str, tuple[tuple[int, int], tuple[int, int], int]] = {
    "axial": ((0, +1), (1, +1), 2),
    "coronal": ((0, +1), (2, -1), 1),
    "sagittal": ((1, +1), (2, -1), 0),
}
# Edge letters per view: (top, bottom, left, right).
_VIEW_LETTERS: dict[str, tuple[str, str, str, str]] = {
    "axial": ("A", "P", "R", "L"),
    "coronal": ("S", "I", "R", "L"),
    "sagittal": ("S", "I", "A", "P"),
}


class VoxelMask(Protocol):
    """A 3D ``[z, y, x]`` mask read where it is indexed: a numpy array, or a view such as
    :class:`dicomnode.inference.segment.LabelMask` that makes only the planes asked for."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    @property
    def ndim(self) -> int: ...

    def __getitem__(self, index: Any, /) -> Any: ...


@dataclass(frozen=True)
class OverlayStructure:
    """One structure to draw.

    Attributes:
        name: shown in the legend (a structure name, never patient identity).
        color: (red, green, blue), each 0..255.
        volume_ml: shown in the legend with one decimal ("n/a" when not finite).
        mask: indexed ``[z, y, x]`` on the source image's grid; nonzero = inside.
            Usually boolean; any numeric dtype is read as ``!= 0``. Not copied; only the
            planes drawn are read (and the largest structure whole, for its centroid).
        voxel_count: the number of nonzero voxels of ``mask`` when the caller already
            knows it (it picks the largest structure); None has :func:`render_overlay`
            count them.
    """

    name: str
    color: Color
    volume_ml: float
    mask: VoxelMask
    voxel_count: int | None = None

    def __post_init__(self) -> None:
        if len(self.color) != 3 or not all(
                isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in self.color):
            raise ValueError(f"color is (red, green, blue), each 0..255; got {self.color!r}")
        if self.mask.ndim != 3:
            raise ValueError(f"mask must be 3D [z, y, x], got {self.mask.ndim}D")
        red, green, blue = (int(c) for c in self.color)
        object.__setattr__(self, "color", (red, green, blue))


@dataclass(frozen=True)
class Box:
    """A rectangle of the picture in pixels: columns ``left .. left + width - 1``,
    rows ``top .. top + height - 1`` (row 0 at the top)."""

    left: int
    top: int
    width: int
    height: int

    @property
    def right(self) -> int:
        """One past the last column."""
        return self.left + self.width

    @property
    def bottom(self) -> int:
        """One past the last row."""
        return self.top + self.height


@dataclass(frozen=True)
class OverlayLayout:
    """Where things are in the picture :func:`render_overlay` draws.

    Attributes:
        width, height: picture size in pixels.
        panels: the axial, coronal and sagittal views (see :data:`VIEWS`), each
            ``size`` x ``size``.
        swatches: the legend's colour swatch of each structure, in the given order.
    """

    width: int
    height: int
    panels: tuple[Box, Box, Box]
    swatches: tuple[Box, ...]


def overlay_layout(count: int, *, title: str = "", size: int = 256) -> OverlayLayout:
    """The layout of a picture of ``count`` structures (title row only when ``title``).

    From the top: the title (when given), a caption row, the three views in a row,
    then the legend, three entries per row, each entry under one view's column.

    Raises:
        ValueError: ``size`` is outside 32..2048 or ``count`` is negative.
    """
    if not _MIN_SIZE <= size <= _MAX_SIZE:
        raise ValueError(f"size must be {_MIN_SIZE}..{_MAX_SIZE} pixels, got {size}")
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    width = 2 * _MARGIN + 3 * size + 2 * _GAP
    top = _MARGIN + (_TITLE_H if title else 0) + _CAPTION_H
    panels = tuple(Box(_MARGIN + i * (size + _GAP), top, size, size) for i in range(3))
    legend_top = top + size + _GAP
    swatches = []
    for i in range(count):
        row, column = divmod(i, 3)
        y = legend_top + row * _ROW_H + (_ROW_H - _SWATCH) // 2
        swatches.append(Box(_MARGIN + column * (size + _GAP), y, _SWATCH, _SWATCH))
    rows = max(1, math.ceil(count / 3))
    height = legend_top + rows * _ROW_H + _MARGIN
    return OverlayLayout(width, height, (panels[0], panels[1], panels[2]), tuple(swatches))


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class _Grid:
    """The image grid: index (x, y, z) -> LPS point ``origin + matrix @ index``."""

    shape_xyz: tuple[int, int, int]
    origin: FloatArray
    matrix: FloatArray  # direction @ diag(spacing)
    inverse: FloatArray

    @classmethod
    def of(cls, image: Any) -> _Grid:
        if image.GetDimension() != 3:
            raise ValueError(f"image must be 3D, got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise ValueError("image must hold one value per voxel")
        size = tuple(int(v) for v in image.GetSize())
        origin = np.array(image.GetOrigin(), dtype=np.float64)
        spacing = np.array(image.GetSpacing(), dtype=np.float64)
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        matrix = direction * spacing[np.newaxis, :]
        inverse: FloatArray = np.linalg.inv(matrix).astype(np.float64)
        return cls((size[0], size[1], size[2]), origin, matrix, inverse)

    def bounds(self) -> tuple[FloatArray, FloatArray]:
        """The LPS bounding box (low, high) of the voxel corners."""
        n = np.array(self.shape_xyz, dtype=np.float64)
        corners = np.array([[i, j, k] for i in (0, 1) for j in (0, 1) for k in (0, 1)],
                           dtype=np.float64) * n - 0.5
        points = self.origin + corners @ self.matrix.T
        low: FloatArray = points.min(axis=0)
        high: FloatArray = points.max(axis=0)
        return low, high

    def point(self, index_xyz: FloatArray) -> FloatArray:
        """The LPS point of a continuous (x, y, z) index."""
        result: FloatArray = self.origin + self.matrix @ index_xyz
        return result


def _subsample(shape: tuple[int, ...], target: int) -> int:
    """The stride along every axis that leaves about ``target`` voxels of ``shape``."""
    ratio = math.prod(shape) / target
    return max(1, math.ceil(math.pow(ratio, 1 / 3)))


def _centroid(mask: npt.NDArray[Any]) -> FloatArray | None:
    """The exact mean (x, y, z) index of the nonzero voxels of a ``[z, y, x]`` mask;
    None when it is empty.

    Computed from its marginal sums, one slice at a time along its outermost axis in
    memory (no full-size temporaries for a boolean mask, whatever its layout), so that
    the same anatomy stored in another index order gives the same point.
    """
    ones = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
    order = sorted(range(3), key=lambda axis: -abs(ones.strides[axis]))
    view = ones.transpose(order)
    n0, n1, n2 = view.shape
    outer = np.zeros(n0, dtype=np.int64)
    middle = np.zeros(n1, dtype=np.int64)
    inner = np.zeros(n2, dtype=np.int64)
    # The count along one line of a slice fits 16 bits (fast sums) when it is short.
    line_type_1 = np.uint16 if n2 < 2**16 else np.int64
    line_type_2 = np.uint16 if n1 < 2**16 else np.int64
    for k in range(n0):
        plane = view[k]
        lines = plane.sum(axis=1, dtype=line_type_1)
        count = int(lines.sum(dtype=np.int64))
        if count:
            outer[k] = count
            middle += lines
            inner += plane.sum(axis=0, dtype=line_type_2)
    total = float(outer.sum())
    if total == 0:
        return None
    sums = dict(zip(order, (outer, middle, inner), strict=True))  # by [z, y, x] axis

    def mean(counts: npt.NDArray[np.int64]) -> float:
        return float(np.dot(np.arange(counts.size, dtype=np.float64), counts)) / total

    return np.array([mean(sums[2]), mean(sums[1]), mean(sums[0])], dtype=np.float64)


def _view_index(grid: _Grid, view: str, centre: FloatArray, size: int) -> FloatArray:
    """Continuous (x, y, z) image indices, shape (3, size * size), of the display pixel
    centres of ``view`` (row-major: picture row by picture row, left to right)."""
    (axis_u, sign_u), (axis_v, sign_v), fixed = _VIEW_AXES[view]
    low, high = grid.bounds()
    middle = (low + high) / 2
    extent = max(high[axis_u] - low[axis_u], high[axis_v] - low[axis_v])
    step = extent / size  # mm per display pixel, the same in both directions
    offsets = (np.arange(size, dtype=np.float64) + 0.5 - size / 2) * step
    anchor = middle.copy()  # the LPS point at the middle of the view
    anchor[fixed] = centre[fixed]
    base = grid.inverse @ (anchor - grid.origin)  # (3,)
    across = grid.inverse[:, axis_u] * sign_u  # index change per mm to the right
    down = grid.inverse[:, axis_v] * sign_v  # index change per mm downwards
    index = (base[:, np.newaxis, np.newaxis]
             + down[:, np.newaxis, np.newaxis] * offsets[np.newaxis, :, np.newaxis]
             + across[:, np.newaxis, np.newaxis] * offsets[np.newaxis, np.newaxis, :])
    result: FloatArray = index.reshape(3, size * size)
    return result


def _inside(index: FloatArray, shape_xyz: tuple[int, int, int]) -> BoolArray:
    """Indices within the voxels (within half a voxel of the outer voxel centres)."""
    n = np.array(shape_xyz, dtype=np.float64)[:, np.newaxis]
    inside: BoolArray = np.all((index >= -0.5) & (index <= n - 0.5), axis=0)
    return inside


def _sample_linear(volume: npt.NDArray[Any], index: FloatArray) -> FloatArray:
    """Trilinear values of ``volume`` ([z, y, x]) at continuous (x, y, z) ``index``
    (shape (3, N)), clamped to the outer voxel centres."""
    nz, ny, nx = volume.shape
    flat = volume.reshape(-1) if volume.flags.c_contiguous else None
    lows: list[IntArray] = []
    highs: list[IntArray] = []
    fractions: list[FloatArray] = []
    for axis, n in enumerate((nx, ny, nz)):
        k = np.clip(index[axis], 0.0, n - 1.0)
        low = np.minimum(np.floor(k).astype(np.intp), max(n - 2, 0))
        lows.append(low)
        highs.append(np.minimum(low + 1, n - 1))
        fractions.append(k - low)
    result = np.zeros(index.shape[1], dtype=np.float64)
    for cz in (0, 1):
        wz = fractions[2] if cz else 1.0 - fractions[2]
        z = highs[2] if cz else lows[2]
        for cy in (0, 1):
            wyz = wz * (fractions[1] if cy else 1.0 - fractions[1])
            y = highs[1] if cy else lows[1]
            row = (z * ny + y) * nx
            for cx in (0, 1):
                wx = fractions[0] if cx else 1.0 - fractions[0]
                x = highs[0] if cx else lows[0]
                values = np.take(flat, row + x) if flat is not None else volume[z, y, x]
                result += wyz * wx * values
    return result


def _nearest(index: FloatArray, shape_xyz: tuple[int, int, int]) -> tuple[IntArray, ...]:
    """Nearest voxel (z, y, x) index arrays for continuous (x, y, z) ``index``."""
    out = []
    for axis, n in enumerate(shape_xyz):
        out.append(np.clip(np.floor(index[axis] + 0.5), 0, n - 1).astype(np.intp))
    return out[2], out[1], out[0]


def _window(volume: npt.NDArray[Any]) -> tuple[float, float]:
    """The grey range (low, high) from a strided subsample of about a million voxels:
    :data:`CT_WINDOW` when its minimum looks like HU, else its 1st to 99th percentile."""
    stride = _subsample(volume.shape, _WINDOW_TARGET)
    sample = np.asarray(volume[::stride, ::stride, ::stride], dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    if float(sample.min()) < CT_MINIMUM_BELOW:
        return CT_WINDOW
    low, high = (float(v) for v in np.percentile(sample, [1.0, 99.0]))
    if not high > low:
        high = low + 1.0
    return low, high


def _outline(mask: BoolArray) -> BoolArray:
    """Pixels of a 2D ``mask`` with a 4-neighbour outside it (or beyond the picture)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = (padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2]
                & padded[1:-1, 2:])
    edge: BoolArray = mask & ~interior
    return edge


# --------------------------------------------------------------------------- drawing


_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


def _font(size: int) -> _Font:
    """Pillow's default font: its FreeType face at ``size`` pixels, else its bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow without FreeType: bitmap font
        return ImageFont.load_default()


def _fit(draw: ImageDraw.ImageDraw, text: str, font: _Font, width: float) -> str:
    """``text`` cut (with an ellipsis) to at most ``width`` pixels."""
    text = text[:300]  # far more than fits: bounds the measuring below
    if draw.textlength(text, font=font) <= width:
        return text
    ellipsis = "\u2026" if isinstance(font, ImageFont.FreeTypeFont) else "..."
    while text and draw.textlength(text + ellipsis, font=font) > width:
        text = text[:-1]
    return text + ellipsis if text else ""


def _put(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font: _Font, *,
         fill: Color, anchor: str = "lt", outline: bool = False) -> None:
    """Draw ``text`` with its box placed at ``xy`` as ``anchor`` says: horizontal ``l``,
    ``m`` or ``r`` then vertical ``t``, ``m`` or ``b`` (from its bounding box, so any
    Pillow font works). ``outline`` adds a thin black edge (FreeType fonts only)."""
    stroke = 1 if outline and isinstance(font, ImageFont.FreeTypeFont) else 0
    left, _top, right, _bottom = draw.textbbox((0, 0), text, font=font, stroke_width=stroke)
    # Vertical placement from a reference with ascender and descender, so that texts
    # placed on one line share a baseline.
    _left, top, _right, bottom = draw.textbbox((0, 0), "Ag", font=font, stroke_width=stroke)
    x = xy[0] - {"l": left, "m": (left + right) / 2, "r": right}[anchor[0]]
    y = xy[1] - {"t": top, "m": (top + bottom) / 2, "b": bottom}[anchor[1]]
    draw.text((round(x), round(y)), text, fill=fill, font=font, stroke_width=stroke,
              stroke_fill=(0, 0, 0))


def _label(structure: OverlayStructure) -> str:
    volume = structure.volume_ml
    amount = f"{volume:.1f} mL" if math.isfinite(volume) else "n/a"
    return f"{structure.name}  {amount}"


def render_overlay(
    image: sitk.Image,
    structures: Sequence[OverlayStructure],
    *,
    title: str = "",
    size: int = 256,
) -> bytes:
    """A PNG (RGB, 8 bits) of ``structures`` over three orthogonal views of ``image``.

    Args:
        image: the source volume, one value per voxel (float32 modality values from
            :func:`dicomnode.inference.volume.read_series`; any scalar type works), in
            DICOM LPS with any direction and spacing; see the module docstring.
        structures: drawn in this order (later fills and outlines over earlier ones),
            listed in the legend in this order. Masks are ``[z, y, x]`` on the image's
            grid; empty masks are fine (listed, nothing drawn).
        title: drawn at the top when not empty (the caller keeps patient identity out).
        size: the side of each square view, in pixels (32..2048).

    Returns:
        The PNG bytes; the picture is laid out as :func:`overlay_layout` says.

    Raises:
        ValueError: the image is not a 3D scalar image, a mask's shape is not the
            image's ``[z, y, x]`` shape, or ``size`` is out of range.
    """
    layout = overlay_layout(len(structures), title=title, size=size)
    grid = _Grid.of(image)
    volume: npt.NDArray[Any] = _sitk.GetArrayViewFromImage(image)
    for s in structures:
        if s.mask.shape != volume.shape:
            raise ValueError(
                f"mask of {s.name!r} has shape {s.mask.shape}, the image [z, y, x] is "
                f"{volume.shape}")

    # The planes' common point: the centroid of the largest structure, else the middle.
    counts = [int(np.count_nonzero(np.asarray(s.mask))) if s.voxel_count is None else s.voxel_count
              for s in structures]
    middle = (np.array(grid.shape_xyz, dtype=np.float64) - 1.0) / 2
    found = (_centroid(np.asarray(structures[counts.index(max(counts))].mask)) if any(counts)
             else None)
    centre = grid.point(middle if found is None else found)
    low, high = _window(volume)

    canvas = np.empty((layout.height, layout.width, 3), dtype=np.uint8)
    canvas[:] = _BACKGROUND
    colors = [np.array(s.color, dtype=np.float64) for s in structures]
    for view, box in zip(VIEWS, layout.panels, strict=True):
        index = _view_index(grid, view, centre, size)
        inside = _inside(index, grid.shape_xyz)
        values = np.nan_to_num(_sample_linear(volume, index), nan=low)
        grey = np.clip((values - low) / (high - low), 0.0, 1.0) * 255.0
        grey[~inside] = 0.0
        rgb = np.repeat(grey.reshape(size, size, 1), 3, axis=2)
        nearest = _nearest(index, grid.shape_xyz)
        masks: list[BoolArray | None] = []
        for s, color in zip(structures, colors, strict=True):
            plane = ((np.asarray(s.mask[nearest]) != 0) & inside).reshape(size, size)
            if not plane.any():
                masks.append(None)
                continue
            rgb[plane] = rgb[plane] * (1.0 - FILL_ALPHA) + color * FILL_ALPHA
            masks.append(plane)
        for plane, color in zip(masks, colors, strict=True):
            if plane is not None:
                rgb[_outline(plane)] = color
        canvas[box.top:box.bottom, box.left:box.right] = np.floor(rgb + 0.5).astype(np.uint8)

    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = _font(_FONT_SIZE)
    if title:
        _put(draw, (_MARGIN, _MARGIN + _TITLE_H / 2 - 2),
             _fit(draw, title, font, layout.width - 2 * _MARGIN), font, fill=_TEXT,
             anchor="lm")
    for view, box in zip(VIEWS, layout.panels, strict=True):
        _put(draw, (box.left, box.top - _CAPTION_H / 2 - 1), view.capitalize(), font,
             fill=_TEXT, anchor="lm")
        top, bottom, left, right = _VIEW_LETTERS[view]
        middle_x, middle_y = box.left + box.width / 2, box.top + box.height / 2
        for text, xy, anchor in (
                (top, (middle_x, box.top + 3), "mt"),
                (bottom, (middle_x, box.bottom - 3), "mb"),
                (left, (box.left + 3, middle_y), "lm"),
                (right, (box.right - 3, middle_y), "rm")):
            _put(draw, xy, text, font, fill=_DIM_TEXT, anchor=anchor, outline=True)
    for s, swatch in zip(structures, layout.swatches, strict=True):
        draw.rectangle((swatch.left, swatch.top, swatch.right - 1, swatch.bottom - 1),
                       fill=s.color)
        x = swatch.right + 6
        _put(draw, (x, swatch.top + _SWATCH / 2),
             _fit(draw, _label(s), font, size - (x - swatch.left)), font, fill=_TEXT,
             anchor="lm")
    if not structures:
        box = layout.panels[0]
        _put(draw, (box.left, box.bottom + _GAP + _ROW_H / 2), "no structures", font,
             fill=_DIM_TEXT, anchor="lm")

    out = BytesIO()
    picture.save(out, format="PNG", optimize=False)
    return out.getvalue()
