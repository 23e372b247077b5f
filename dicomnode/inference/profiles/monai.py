"""The MONAI profile: a MONAI bundle's inference pipeline, run as MONAI runs it.

A card with ``profile: {framework: monai, ...}`` (written by ``dicomnode models import
monai-bundle``) lists the bundle's pre-processing, its sliding-window inferer and its
post-processing, in the bundle's order, with MONAI's parameters. They are reimplemented here
with numpy, SciPy and ONNX Runtime so that the labels are the labels MONAI gives on the same
image:

* the array MONAI's ``LoadImage`` + ``EnsureChannelFirst`` read from a NIfTI of the series is
  the SimpleITK array transposed to ``[x, y, z]`` with the affine in RAS (NIfTI's convention:
  DICOM LPS with x and y negated); every spatial step below works on that array and affine;
* ``Orientation`` (axcodes; flips and transposes), ``Spacing`` (pixdim; MONAI's output grid,
  :func:`compute_shape_offset`, keeps the first voxel's corner; interpolation bilinear or
  nearest, as ``grid_sample`` does in index space, computed in float64, padding border or
  zeros), ``ScaleIntensityRange``, ``NormalizeIntensity``, ``CropForeground`` (margin,
  allow_smaller, k_divisible; a box beyond the image is padded with zeros), ``SpatialPad``;
* the ``SlidingWindowInferer``: short axes padded on both sides (``diff // 2`` before), the
  window starts of ``dense_patch_slices`` with ``int(roi * (1 - overlap))`` steps, the
  importance map of ``compute_importance_map`` (constant or gaussian with ``sigma_scale``,
  clamped at its minimum or 1e-3), float32 accumulation;
* ``Activations`` (softmax, sigmoid), ``Invert`` (MONAI's ``Invertd``: the spatial steps undone
  in reverse order, a crop by zero padding, a resampling with the recorded or nearest mode),
  ``AsDiscrete`` (argmax, threshold ``>=``), ``KeepLargestConnectedComponent``.

Profile keys (all written by the importer; see :func:`validate`)::

    framework: monai
    monai_version: "1.6.1"          # the version the package was checked against
    preprocessing: [{transform: Orientation, axcodes: RAS}, {transform: Spacing, ...}, ...]
    inferer: {roi_size: [..], overlap: 0.25, mode: gaussian, sigma_scale: 0.125,
              sw_batch_size: 1, padding_mode: constant, cval: 0.0}
    postprocessing: [{transform: Activations, softmax: true}, {transform: Invert, ...}, ...]
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage

from dicomnode.models.plans import _AXCODES, POSTPROCESSING, PREPROCESSING
from dicomnode.models.plans import validate_monai as validate

if TYPE_CHECKING:
    from dicomnode.inference.segment import Segmentation
    from dicomnode.models.card import Card

__all__ = ["POSTPROCESSING", "PREPROCESSING", "MonaiRun", "facts", "importance_map",
           "run_profile", "segment", "source_array", "validate", "window_starts"]

FloatArray = npt.NDArray[np.float32]
Array = npt.NDArray[Any]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def facts(card: Card) -> list[str]:
    """Lines for ``models check``: the MONAI version the package was checked against, the
    agreement figures of ``check_report.json`` and the labels still needing review."""
    import json

    profile = card.profile or {}
    lines = [f"framework MONAI {profile.get('monai_version', '?')}"]
    report_path = card.package / "check_report.json"
    if report_path.is_file():
        try:
            report = json.loads(report_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return [*lines, f"check_report.json unreadable: {exc}"]
        dice = ", ".join(f"{k} {v:.4f}" for k, v in report.get("dice", {}).items())
        lines.append(
            f"checked against MONAI {report.get('monai')} / torch {report.get('torch')}: "
            f"{100 * report.get('voxel_agreement', 0):.3f} % voxels agree, Dice {dice}, "
            f"probabilities within {report.get('max_probability_diff')}")
    else:
        lines.append("no check_report.json: the package was not checked against MONAI")
    review = profile.get("needs_review")
    if review:
        lines.append(f"needs review (no SNOMED CT code known): {', '.join(review)}")
    return lines


# ---------------------------------------------------------------------------------------
# the image as MONAI reads it, and the spatial steps with their inverses


def source_array(image: sitk.Image) -> tuple[FloatArray, Array]:
    """``image`` as MONAI's LoadImage + EnsureChannelFirst give it from a NIfTI of it: a
    float32 array ``[channel, x, y, z]`` and the 4x4 voxel-to-RAS affine (mm)."""
    array = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)[None]
    direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
    affine[:3, 3] = image.GetOrigin()
    return np.ascontiguousarray(array), _LPS_TO_RAS @ affine


def _io_orientation(affine: Array) -> list[tuple[int, int]]:
    """For each array axis: (world axis 0..2 of RAS, +1 or -1), as nibabel's io_orientation
    gives it for a (nearly) axis-aligned affine."""
    rzs = affine[:3, :3]
    zooms = np.sqrt((rzs ** 2).sum(axis=0))
    u, _, vt = np.linalg.svd(rzs / zooms)
    r = u @ vt  # the closest orthogonal matrix
    out: list[tuple[int, int]] = []
    taken: set[int] = set()
    for j in np.argsort(-np.abs(r).max(axis=0)):  # most certain axes first, as nibabel
        column = np.abs(r[:, j]).copy()
        column[list(taken)] = -1
        w = int(np.argmax(column))
        taken.add(w)
        out.append((int(j), w))
    result = [(0, 1)] * 3
    for j, w in out:
        result[j] = (w, 1 if r[w, j] >= 0 else -1)
    return result


@dataclass
class _Op:
    """One applied spatial step, with what its inverse needs."""

    kind: str  # orientation | spacing | crop
    shape: tuple[int, ...]  # spatial shape before the step
    affine: Array  # affine before the step
    params: dict[str, Any] = field(default_factory=dict)


def _orientation(data: Array, affine: Array, axcodes: str) -> tuple[Array, Array, _Op]:
    src = _io_orientation(affine)
    shape = data.shape[1:]
    perm: list[int] = []
    flips: list[bool] = []
    new = np.eye(4)
    translation = affine[:3, 3].copy()
    for k, code in enumerate(axcodes):
        world, sign = _AXCODES[code]
        j = next(j for j, (w, _) in enumerate(src) if w == world)
        flip = src[j][1] != sign
        perm.append(j)
        flips.append(flip)
        new[:3, k] = affine[:3, j] * (-1 if flip else 1)
        if flip:
            translation += affine[:3, j] * (shape[j] - 1)
    new[:3, 3] = translation
    out = data
    flip_axes = [1 + perm[k] for k in range(3) if flips[k]]
    if flip_axes:
        out = np.flip(out, axis=tuple(flip_axes))
    out = np.ascontiguousarray(out.transpose(0, *[p + 1 for p in perm]))
    op = _Op("orientation", tuple(shape), affine, {"perm": perm, "flips": flips})
    return out, new, op


def _undo_orientation(data: Array, op: _Op) -> Array:
    perm, flips = op.params["perm"], op.params["flips"]
    inverse = np.argsort(perm)
    out = data.transpose(0, *[int(i) + 1 for i in inverse])
    flip_axes = [1 + perm[k] for k in range(3) if flips[k]]
    if flip_axes:
        out = np.flip(out, axis=tuple(flip_axes))
    return np.ascontiguousarray(out)


def spacing_grid(shape: Sequence[int], affine: Array,
                 pixdim: Sequence[float]) -> tuple[tuple[int, ...], Array]:
    """MONAI ``Spacing``'s output shape and affine (``zoom_affine`` without diagonal, then
    ``compute_shape_offset`` with scale_extent false: the corner voxel that is smallest in
    the new grid keeps its position)."""
    rzs = affine[:3, :3]
    zs = np.linalg.cholesky(rzs.T @ rzs).T  # zoom_affine without diagonal, as MONAI does
    rotation = rzs @ np.linalg.inv(zs)
    new = np.eye(4)
    new[:3, :3] = rotation @ np.diag(np.sign(np.diag(zs)) * np.abs(np.asarray(pixdim, float)))
    corners = np.asarray(np.meshgrid(*[(0.0, n - 1.0) for n in shape],
                                     indexing="ij")).reshape(3, -1)
    corners = np.concatenate((corners, np.ones_like(corners[:1])))
    corners_out = np.linalg.solve(new, affine) @ corners
    all_dist = corners_out[:-1].copy()
    corners_world = affine @ corners
    out_shape = np.round(np.ptp(corners_out[:-1] / corners_out[-1], axis=1) + 1.0)
    offset = None
    for i in range(corners.shape[1]):
        min_corner = np.min(all_dist - all_dist[:, i:i + 1], 1)
        if np.allclose(min_corner, 0.0, rtol=1e-3):
            offset = corners_world[:-1, i]
            break
    if offset is None:
        size = np.asarray(shape, dtype=float)
        offset = (affine[:3, :3] @ (size / 2.0) + affine[:3, 3]
                  - new[:3, :3] @ (out_shape / 2.0))
    new[:3, 3] = offset
    return tuple(int(v) for v in out_shape), new


def _axis_weights(coords: Array, n: int, mode: str,
                  padding: str) -> tuple[Array, Array, Array, Array]:
    """Per output position along one axis: two source indices, their weights (zero weight
    for an index outside the image with zeros padding)."""
    if padding == "border":
        coords = np.clip(coords, 0.0, n - 1.0)
    if mode == "nearest":
        i0 = np.rint(coords).astype(np.int64)  # grid_sample: nearbyint, half to even
        w0 = np.ones_like(coords)
        i1, w1 = i0, np.zeros_like(coords)
    else:
        i0 = np.floor(coords).astype(np.int64)
        i1 = i0 + 1
        w1 = coords - i0
        w0 = 1.0 - w1
    inside0 = (i0 >= 0) & (i0 < n)
    inside1 = (i1 >= 0) & (i1 < n)
    w0 = np.where(inside0, w0, 0.0)
    w1 = np.where(inside1, w1, 0.0)
    return np.clip(i0, 0, n - 1), np.clip(i1, 0, n - 1), w0, w1


def _torch_linspace(n: int) -> Array:
    """``torch.linspace(-1, 1, n)`` as torch computes it (from both ends), times
    ``(n - 1) / n`` as ``affine_grid`` does without align_corners."""
    if n == 1:
        values = np.zeros(1)
    else:
        step = 2.0 / (n - 1)
        i = np.arange(n, dtype=np.float64)
        values = np.where(i < n // 2, -1.0 + step * i, 1.0 - step * (n - 1 - i))
    return np.asarray(values * (n - 1) / n)


def _grid_sample_coordinates(xform: Array, src_shape: Sequence[int],
                             dst_shape: Sequence[int]) -> Array:
    """Source index coordinates ``(3, N)`` of each destination voxel, computed the way MONAI's
    ``AffineTransform`` (normalised theta, ``affine_grid``, then ``grid_sample``'s
    unnormalising) computes them, so that ties in nearest interpolation fall the same way."""
    def normalise(size: Sequence[int]) -> Array:
        shape = np.asarray(size, dtype=np.float64)
        norm = np.diag(np.append(2.0 / shape, 1.0))
        norm[:-1, -1] = 1.0 / shape - 1.0
        return norm

    theta = normalise(src_shape) @ xform @ np.linalg.inv(normalise(dst_shape))
    bases = [_torch_linspace(int(n)) for n in dst_shape]
    grid = np.meshgrid(*bases, indexing="ij")
    coords = np.empty((3, int(np.prod(dst_shape))), dtype=np.float64)
    for a in range(3):  # summed x (last axis) first, as affine_grid's (x, y, z, 1) @ theta.T
        g = grid[2] * theta[a, 2] + grid[1] * theta[a, 1] + grid[0] * theta[a, 0] + theta[a, 3]
        coords[a] = (((g + 1.0) * src_shape[a] - 1.0) / 2.0).reshape(-1)
    return coords


def resample(data: Array, src_affine: Array, dst_affine: Array, shape: Sequence[int],
             mode: str, padding: str) -> FloatArray:
    """``data`` ``[channel, *spatial]`` on ``src_affine`` resampled onto ``shape`` voxels of
    ``dst_affine`` as MONAI's ``SpatialResample`` does (grid_sample in index space, float64;
    ``mode`` bilinear or nearest, ``padding`` border or zeros). Returns float32."""
    xform = np.linalg.solve(src_affine, dst_affine)  # destination index -> source index
    linear = xform[:3, :3]
    src_shape = data.shape[1:]
    if np.allclose(linear - np.diag(np.diag(linear)), 0.0, atol=1e-9):
        out: Array = data.astype(np.float64)
        for axis in range(3):
            coords = linear[axis, axis] * np.arange(shape[axis]) + xform[axis, 3]
            i0, i1, w0, w1 = _axis_weights(coords, src_shape[axis], mode, padding)
            view = [1] * 4
            view[axis + 1] = -1
            first = np.take(out, i0, axis=axis + 1)
            first *= w0.reshape(view)
            second = np.take(out, i1, axis=axis + 1)
            second *= w1.reshape(view)
            first += second
            del second
            out = first
        return out.astype(np.float32)
    coords = _grid_sample_coordinates(xform, src_shape, shape)
    if padding == "border":
        coords = np.clip(coords, 0.0, (np.asarray(src_shape) - 1.0)[:, None])
    if mode == "nearest":
        coords = np.rint(coords)
    channels = [ndimage.map_coordinates(c.astype(np.float64), coords,
                                        order=0 if mode == "nearest" else 1,
                                        mode="constant" if padding == "zeros" else "nearest",
                                        cval=0.0).reshape(tuple(shape)) for c in data]
    return np.stack(channels).astype(np.float32)


def _crop_pad(data: Array, start: Sequence[int], end: Sequence[int], value: float) -> Array:
    """``data[:, start:end]`` per spatial axis, padded with ``value`` beyond the image."""
    shape = data.shape[1:]
    inner = tuple(slice(max(s, 0), min(e, n)) for s, e, n in zip(start, end, shape, strict=True))
    index = (slice(None), *inner)
    out = data[index]
    pad = [(0, 0)] + [(max(-s, 0), max(e - n, 0)) for s, e, n in zip(start, end, shape,
                                                                        strict=True)]
    if any(p != (0, 0) for p in pad):
        out = np.pad(out, pad, mode="constant", constant_values=value)
    return np.ascontiguousarray(out)


def _translate(affine: Array, start: Sequence[int]) -> Array:
    new = affine.copy()
    new[:3, 3] = affine[:3, :3] @ np.asarray(start, dtype=np.float64) + affine[:3, 3]
    return np.asarray(new, dtype=np.float64)


# ---------------------------------------------------------------------------------------
# intensity steps


def _scale_intensity_range(data: Array, p: Mapping[str, Any]) -> Array:
    a_min, a_max = float(p["a_min"]), float(p["a_max"])
    b_min, b_max = p.get("b_min"), p.get("b_max")
    out = data.astype(np.float32)
    if a_max - a_min == 0.0:
        out = out - np.float32(a_min)
        return np.asarray(out if b_min is None else out + np.float32(b_min))
    out = (out - np.float32(a_min)) / np.float32(a_max - a_min)
    if b_min is not None and b_max is not None:
        out = out * np.float32(float(b_max) - float(b_min)) + np.float32(b_min)
        if p.get("clip", False):
            out = np.clip(out, np.float32(b_min), np.float32(b_max))
    return np.asarray(out, dtype=np.float32)


def _normalize_intensity(data: Array, p: Mapping[str, Any]) -> Array:
    out = data.astype(np.float32).copy()
    groups = [out[c:c + 1] for c in range(out.shape[0])] if p.get("channel_wise") else [out]
    for group in groups:
        mask = group != 0 if p.get("nonzero") else np.ones(group.shape, dtype=bool)
        if not mask.any():
            continue
        values = group[mask].astype(np.float64)
        mean, std = float(values.mean()), float(values.std())
        group[mask] = ((group[mask] - np.float32(mean)) /
                       np.float32(std if std != 0.0 else 1.0))
    return np.asarray(out)


# ---------------------------------------------------------------------------------------
# the sliding-window inferer


def importance_map(roi: Sequence[int], mode: str, sigma_scale: float | Sequence[float]
                   ) -> FloatArray:
    """``compute_importance_map``: ones, or the product of 1-D Gaussians centred at
    ``(n - 1) / 2`` with sigma ``n * sigma_scale``, clamped below at max(min, 1e-3)."""
    if mode == "constant":
        weights = np.ones(tuple(roi), dtype=np.float32)
    else:
        scales = (list(sigma_scale) if isinstance(sigma_scale, Sequence)
                  else [sigma_scale] * len(roi))
        weights = np.ones((), dtype=np.float32)
        for n, s in zip(roi, scales, strict=True):
            x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)[:n]
            denominator = np.float32(-2 * (n * s) ** 2)
            g = np.exp(x ** 2 / denominator).astype(np.float32)
            weights = np.multiply.outer(weights, g).astype(np.float32)
    floor = max(float(weights.min()), 1e-3)
    return np.asarray(np.maximum(weights, np.float32(floor)), dtype=np.float32)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """The window starts of ``dense_patch_slices`` along one axis of ``size >= roi``."""
    interval = roi if roi == size else max(int(roi * (1 - overlap)), 1)
    num = math.ceil(float(size) / interval)
    count = next((d for d in range(num) if d * interval + roi >= size), None)
    scan = count + 1 if count is not None else 1
    return [i * interval - max(i * interval + roi - size, 0) for i in range(scan)]


def sliding_window(image: FloatArray, run: Callable[[FloatArray], FloatArray],
                   p: Mapping[str, Any]) -> FloatArray:
    """``sliding_window_inference`` on ``image`` ``[channel, *spatial]``; returns the blended
    model output ``[out channels, *spatial]`` (float32)."""
    roi_in = [int(v) for v in p["roi_size"]]
    shape = image.shape[1:]
    roi = [s if r <= 0 else r for r, s in zip(roi_in, shape, strict=True)]
    overlap = p.get("overlap", 0.25)
    overlaps = list(overlap) if isinstance(overlap, list) else [float(overlap)] * 3
    before = [max(r - s, 0) // 2 for r, s in zip(roi, shape, strict=True)]
    after = [max(r - s, 0) - b for r, s, b in zip(roi, shape, before, strict=True)]
    padded = image
    if any(before) or any(after):
        padded = np.pad(image, [(0, 0), *zip(before, after, strict=True)], mode="constant",
                        constant_values=float(p.get("cval", 0.0)))
    size = padded.shape[1:]
    starts = [window_starts(n, r, o) for n, r, o in zip(size, roi, overlaps, strict=True)]
    windows = [tuple(w) for w in np.stack(np.meshgrid(*starts, indexing="ij"))
               .reshape(3, -1).T.tolist()]
    weights = importance_map(roi, str(p.get("mode", "constant")), p.get("sigma_scale", 0.125))
    batch = int(p.get("sw_batch_size", 1))
    output: FloatArray | None = None
    count = np.zeros(size, dtype=np.float32)
    for w in windows:
        count[w[0]:w[0] + roi[0], w[1]:w[1] + roi[1], w[2]:w[2] + roi[2]] += weights
    for first in range(0, len(windows), batch):
        group = windows[first:first + batch]
        tensor = np.stack([padded[:, a:a + roi[0], b:b + roi[1], c:c + roi[2]]
                           for a, b, c in group]).astype(np.float32)
        scores = run(np.ascontiguousarray(tensor))
        if output is None:
            output = np.zeros((scores.shape[1], *size), dtype=np.float32)
        for (a, b, c), score in zip(group, scores, strict=True):
            output[:, a:a + roi[0], b:b + roi[1], c:c + roi[2]] += score * weights
    assert output is not None
    output /= count
    inner = tuple(slice(b, b + s) for b, s in zip(before, shape, strict=True))
    index = (slice(None), *inner)
    return np.ascontiguousarray(output[index])


# ---------------------------------------------------------------------------------------
# post-processing steps


def _activations(data: Array, p: Mapping[str, Any]) -> FloatArray:
    scores = data.astype(np.float32)
    if p.get("softmax"):
        shifted = scores - scores.max(axis=0, keepdims=True)
        e = np.exp(shifted)
        return np.asarray(e / e.sum(axis=0, keepdims=True), dtype=np.float32)
    return (1.0 / (1.0 + np.exp(-scores))).astype(np.float32)


def _as_discrete(data: Array, p: Mapping[str, Any]) -> Array:
    if p.get("argmax"):
        return np.asarray(np.argmax(data, axis=0)[None], dtype=np.float32)
    return (data >= float(p["threshold"])).astype(np.float32)


def _structure(connectivity: int | None) -> Array:
    rank = 3 if connectivity is None else int(connectivity)
    return np.asarray(ndimage.generate_binary_structure(3, rank))


def _largest(mask: Array, connectivity: int | None, keep: int) -> Array:
    features, count = ndimage.label(mask, structure=_structure(connectivity))
    if count <= keep:
        return mask.astype(bool)
    sizes = np.bincount(features.reshape(-1))
    sizes[0] = 0
    lookup = np.zeros(sizes.shape[0], dtype=bool)
    lookup[np.argsort(sizes)[::-1][:keep]] = True
    result: Array = lookup[features]
    return result


def _keep_largest(data: Array, p: Mapping[str, Any]) -> Array:
    out = data.copy()
    onehot = p.get("is_onehot")
    onehot = out.shape[0] > 1 if onehot is None else bool(onehot)
    labels = p.get("applied_labels")
    if labels is None:
        if onehot:
            labels = [c for c in range(1, out.shape[0]) if out[c].any()]
        else:
            labels = [int(v) for v in np.unique(out) if v != 0]
    connectivity, keep = p.get("connectivity"), int(p.get("num_components", 1))
    if p.get("independent", True):
        for value in labels:
            foreground = out[value] > 0 if onehot else out[0] == value
            removed = foreground & ~_largest(foreground, connectivity, keep)
            if onehot:
                out[value][removed] = 0
            else:
                out[0][removed] = 0
        return np.asarray(out)
    if onehot:
        foreground = (out[list(labels)] == 1).any(0)
    else:
        foreground = np.isin(out[0], labels)
    removed = foreground & ~_largest(foreground, connectivity, keep)
    if onehot:
        for value in labels:
            out[value][removed] = 0
    else:
        out[0][removed] = 0
    return np.asarray(out)


# ---------------------------------------------------------------------------------------
# the whole pipeline


@dataclass
class MonaiRun:
    """One run of the pipeline: the labels on the source grid (``[x, y, z]`` as MONAI's array
    of the source image) and, for checks, the model-grid data as the step before ``Invert``
    left it (probabilities after ``Activations``), with the model grid's affine (RAS)."""

    labels: Array
    model_grid: FloatArray | None
    model_affine: Array
    preprocess_s: float = 0.0
    session_s: float = 0.0
    postprocess_s: float = 0.0


def _invert(data: Array, ops: Sequence[_Op], nearest: bool) -> Array:
    out = data
    for op in reversed(ops):
        if op.kind == "crop":
            start, end = op.params["start"], op.params["end"]
            # the crop's inverse: cut what was padded beyond the image, pad back with zeros
            shape = op.shape
            inner_start = [max(s, 0) for s in start]
            inner_end = [min(e, n) for e, n in zip(end, shape, strict=True)]
            cut = tuple(slice(i - s, i - s + (j - i)) for s, i, j in
                        zip(start, inner_start, inner_end, strict=True))
            index = (slice(None), *cut)
            out = out[index]
            pad = [(0, 0)] + [(i, n - j) for i, j, n in zip(inner_start, inner_end, shape,
                                                              strict=True)]
            out = np.pad(out, pad, mode="constant", constant_values=0)
        elif op.kind == "spacing":
            mode = "nearest" if nearest else op.params["mode"]
            out = resample(out, op.params["affine_after"], op.affine, op.shape, mode,
                           op.params["padding"])
        elif op.kind == "orientation":
            out = _undo_orientation(out, op)
    return out


#: channels inverted at a time when Invert is followed by an argmax (each is float64 on the
#: source grid while it is resampled)
INVERT_CHANNELS = 1


def _invert_argmax(data: Array, ops: Sequence[_Op], nearest: bool) -> Array:
    """``argmax(invert(data))`` over the channels, a few channels at a time."""
    best: Array | None = None
    labels: Array | None = None
    for first in range(0, data.shape[0], INVERT_CHANNELS):
        chunk = _invert(data[first:first + INVERT_CHANNELS], ops, nearest)
        for offset, channel in enumerate(chunk):
            if best is None or labels is None:
                best, labels = channel.copy(), np.zeros(channel.shape, dtype=np.float32)
                continue
            better = channel > best
            best[better] = channel[better]
            labels[better] = first + offset
    assert labels is not None
    return labels[None]


def run_profile(profile: Mapping[str, Any], image: sitk.Image,
                run: Callable[[FloatArray], FloatArray], *,
                keep_model_grid: bool = False) -> MonaiRun:
    """The bundle's pipeline (``profile``) on ``image`` with ``run`` as the network.

    ``keep_model_grid`` keeps a copy of the model-grid data as ``Invert`` receives it (for
    the import's check). ``Invert`` directly followed by ``AsDiscrete`` argmax is done
    :data:`INVERT_CHANNELS` channels at a time with a running maximum, so that the source
    grid never holds all channels' probabilities (the same labels: the first channel wins
    ties, as in ``torch.argmax``).
    """
    t0 = time.perf_counter()
    data, affine = source_array(image)
    ops: list[_Op] = []
    for step in profile.get("preprocessing", []):
        name = step["transform"]
        if name == "Orientation":
            data, affine, op = _orientation(data, affine, str(step["axcodes"]))
            ops.append(op)
        elif name == "Spacing":
            shape, new = spacing_grid(data.shape[1:], affine, step["pixdim"])
            mode, padding = step.get("mode", "bilinear"), step.get("padding_mode", "border")
            op = _Op("spacing", tuple(data.shape[1:]), affine,
                     {"affine_after": new, "mode": mode, "padding": padding})
            data = resample(data, affine, new, shape, mode, padding)
            affine = new
            ops.append(op)
        elif name == "ScaleIntensityRange":
            data = _scale_intensity_range(data, step)
        elif name == "NormalizeIntensity":
            data = _normalize_intensity(data, step)
        elif name in ("CropForeground", "SpatialPad"):
            shape = data.shape[1:]
            if name == "CropForeground":
                start, end = _foreground_box(data, step)
            else:
                target = [max(int(t), n) if int(t) > 0 else n
                          for t, n in zip(step["spatial_size"], shape, strict=True)]
                first = ([(t - n) // 2 for t, n in zip(target, shape, strict=True)]
                         if step.get("method", "symmetric") == "symmetric" else [0, 0, 0])
                start = [-f for f in first]
                end = [s + t for s, t in zip(start, target, strict=True)]
            ops.append(_Op("crop", tuple(shape), affine, {"start": start, "end": end}))
            data = _crop_pad(data, start, end, float(step.get("value", 0.0)))
            affine = _translate(affine, start)
    model_affine = affine
    t1 = time.perf_counter()
    data = sliding_window(data.astype(np.float32), run, profile["inferer"])
    t2 = time.perf_counter()
    model_grid: FloatArray | None = None
    inverted = False
    steps = list(profile.get("postprocessing", []))
    skip_next = False
    for index, step in enumerate(steps):
        name = step["transform"]
        if skip_next:
            skip_next = False
            continue
        if name == "Activations":
            data = _activations(data, step)
        elif name == "Invert":
            if not inverted and keep_model_grid:
                model_grid = data.astype(np.float32)
            following = steps[index + 1] if index + 1 < len(steps) else {}
            nearest = bool(step.get("nearest", True))
            if (following.get("transform") == "AsDiscrete" and following.get("argmax")
                    and data.shape[0] > 1):
                data = _invert_argmax(data, ops, nearest)
                skip_next = True
            else:
                data = _invert(data, ops, nearest)
            inverted = True
        elif name == "AsDiscrete":
            data = _as_discrete(data, step)
        elif name == "KeepLargestConnectedComponent":
            data = _keep_largest(data, step)
    if not inverted:  # the labels go back onto the source grid all the same
        if keep_model_grid:
            model_grid = data.astype(np.float32)
        data = _invert(data, ops, True)
    labels = np.rint(data[0]).astype(np.int64)
    t3 = time.perf_counter()
    return MonaiRun(labels, model_grid, model_affine, t1 - t0, t2 - t1, t3 - t2)


def _foreground_box(data: Array, p: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """``CropForeground``'s box: voxels above ``threshold`` in any channel, ``margin`` more
    on each side (clamped to the image with allow_smaller), grown to ``k_divisible``."""
    selected = (data > float(p.get("threshold", 0.0))).any(0)
    margin = p.get("margin", 0)
    margins = list(margin) if isinstance(margin, list) else [int(margin)] * 3
    if not selected.any():
        raise ValueError("CropForeground: no foreground in the image (nothing above "
                         f"{p.get('threshold', 0.0)})")
    start, end = [], []
    for axis in range(3):
        others = tuple(a for a in range(3) if a != axis)
        where = np.nonzero(np.any(selected, axis=others))[0]
        lo, hi = int(where[0]) - margins[axis], int(where[-1]) + margins[axis] + 1
        if p.get("allow_smaller", False):
            lo, hi = max(lo, 0), min(hi, selected.shape[axis])
        start.append(lo)
        end.append(hi)
    k = p.get("k_divisible", 1)
    ks = list(k) if isinstance(k, list) else [int(k)] * 3
    for axis in range(3):
        size = end[axis] - start[axis]
        wanted = int(math.ceil(size / ks[axis]) * ks[axis]) if ks[axis] > 0 else size
        start[axis] -= (wanted - size) // 2
        end[axis] = start[axis] + wanted
    return start, end


def segment(card: Card, volumes: Sequence[sitk.Image], *, providers: Sequence[str],
            intra_op_threads: int) -> Segmentation:
    """Run ``card``'s MONAI pipeline on ``volumes`` (one image); structures on its grid."""
    from dicomnode.inference.runtime import open_card_session
    from dicomnode.inference.segment import (
        Geometry,
        Segmentation,
        Timings,
        structures_of_label_map,
    )

    started = time.perf_counter()
    session = open_card_session(card, providers=providers, intra_op_threads=intra_op_threads)

    def run(batch: FloatArray) -> FloatArray:
        with session.lock:
            return np.asarray(session.run(batch), dtype=np.float32)

    assert card.profile is not None
    result = run_profile(card.profile, volumes[0], run)
    geometry = Geometry.of(volumes[0])
    raw = result.labels.transpose(2, 1, 0)  # values a card cannot name are background
    label_zyx = np.ascontiguousarray(np.where((raw > 0) & (raw <= 255), raw, 0), dtype=np.uint8)
    t = time.perf_counter()
    structures = structures_of_label_map(card.outputs.labels, label_zyx, geometry.spacing)
    timings = Timings(preprocess=result.preprocess_s, session_run=result.session_s,
                      postprocess=result.postprocess_s + time.perf_counter() - t,
                      total=time.perf_counter() - started)
    return Segmentation(card, geometry, structures, session.provider, timings)
