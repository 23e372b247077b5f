"""Post-processing: scores -> decided labels on the source grid (one label map for an
argmax decision, one binary mask per structure for thresholds).

Scores on the model grid are brought back onto the source grid (same size,
origin, spacing and direction as the source series) by linear interpolation of
each channel, then decided (threshold or argmax), then cleaned per label as the
card says: small regions dropped, the largest connected regions kept, holes
filled per slice or in 3D.  Masks are numpy bool arrays indexed ``[z, y, x]`` of
the source image.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from dicomnode.inference.preprocess import nonzero_bounds
from dicomnode.models.card import OutputSpec, PostprocessingSpec

__all__ = ["argmax_slab", "argmax_to_source", "clean_mask", "decide_slab", "scores_to_image",
           "to_source"]

FloatArray = npt.NDArray[np.float32]
BoolArray = npt.NDArray[np.bool_]


def scores_to_image(channel: FloatArray, grid: sitk.Image, axes: str) -> sitk.Image:
    """One score channel in the model's axis order as an image on ``grid``."""
    array = np.transpose(channel, (2, 1, 0)) if axes == "xyz" else channel
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(grid)
    return image


def _index_box(
    channel: FloatArray, above: float, grid: sitk.Image, axes: str, source: sitk.Image
) -> tuple[list[int], list[int]] | None:
    """Source index bounds [x, y, z] (start, stop) of where ``channel`` can exceed
    ``above`` after linear interpolation, or None when it nowhere does.

    Linear interpolation never exceeds its neighbours, so the region is the model
    voxels above the value, grown by one voxel, mapped onto the source grid.
    """
    hot = channel > above
    if not hot.any():
        return None
    if axes == "xyz":
        hot = np.transpose(hot, (2, 1, 0))
    (z0, z1), (y0, y1), (x0, x1) = ((first - 1, last + 1) for first, last in nonzero_bounds(hot))
    points = [
        source.TransformPhysicalPointToContinuousIndex(
            grid.TransformContinuousIndexToPhysicalPoint((float(x), float(y), float(z)))
        )
        for x in (x0, x1) for y in (y0, y1) for z in (z0, z1)
    ]
    low = np.floor(np.min(points, axis=0)).astype(int) - 1
    high = np.ceil(np.max(points, axis=0)).astype(int) + 2
    size = np.array(source.GetSize())
    start = np.clip(low, 0, size)
    stop = np.clip(high, 0, size)
    if np.any(stop <= start):
        return None
    return [int(v) for v in start], [int(v) for v in stop]


def _resample_box(
    channel: FloatArray,
    grid: sitk.Image,
    axes: str,
    source: sitk.Image,
    box: tuple[list[int], list[int]],
    default: float,
) -> FloatArray:
    """Interpolate ``channel`` onto the source voxels inside ``box`` ([z, y, x] array)."""
    start, stop = box
    image = scores_to_image(channel, grid, axes)
    origin = source.TransformIndexToPhysicalPoint([int(v) for v in start])
    resampled = sitk.Resample(
        image,
        [b - a for a, b in zip(start, stop, strict=True)],
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        source.GetSpacing(),
        source.GetDirection(),
        default,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(resampled)


def to_source(
    scores: FloatArray,
    grid: sitk.Image,
    axes: str,
    source: sitk.Image,
    outputs: OutputSpec,
) -> dict[int, BoolArray]:
    """Decide labels from model-grid ``scores`` ``(channels, *spatial)`` on ``source``.

    Returns ``{label value: mask}`` with masks indexed [z, y, x] of ``source``.
    Outside the model grid (a cropped region) every voxel is background.  For a
    threshold decision only the source region where a channel can exceed the
    threshold is interpolated.
    """
    shape = tuple(int(v) for v in source.GetSize())[::-1]
    if outputs.decision == "threshold":
        masks = {}
        for label in outputs.labels:
            channel = scores[outputs.channel_of(label)]
            mask = np.zeros(shape, dtype=bool)
            box = _index_box(channel, outputs.threshold, grid, axes, source)
            if box is not None:
                (x0, y0, z0), (x1, y1, z1) = box
                values = _resample_box(channel, grid, axes, source, box, 0.0)
                mask[z0:z1, y0:y1, x0:x1] = values > outputs.threshold
            masks[label.value] = mask
        return masks
    winner = argmax_to_source(scores, grid, axes, source, outputs)
    return {label.value: winner == label.value for label in outputs.labels}


def argmax_to_source(
    scores: FloatArray,
    grid: sitk.Image,
    axes: str,
    source: sitk.Image,
    outputs: OutputSpec,
) -> npt.NDArray[np.uint8]:
    """The argmax channel of model-grid ``scores`` ``(channels, *spatial)`` on ``source``
    ([z, y, x]), each channel interpolated linearly; channels the card's labels do not
    name are background (0). Outside the model grid every voxel is background.
    """
    if outputs.decision != "argmax":
        raise ValueError(f"an argmax of scores needs decision argmax, not {outputs.decision}")
    full_box = ([0, 0, 0], [int(v) for v in source.GetSize()])
    # one channel at a time: keep the running best score and its channel.
    best = _resample_box(scores[0], grid, axes, source, full_box,
                         float(np.finfo(np.float32).max))
    winner = np.zeros(best.shape, dtype=np.uint8 if scores.shape[0] <= 256 else np.uint16)
    for channel in range(1, scores.shape[0]):
        candidate = _resample_box(scores[channel], grid, axes, source, full_box,
                                  float(np.finfo(np.float32).min))
        better = candidate > best
        best[better] = candidate[better]
        winner[better] = channel
        del candidate, better
    return _labelled(winner, outputs)


def _labelled(winner: npt.NDArray[np.integer], outputs: OutputSpec) -> npt.NDArray[np.uint8]:
    """Winning channels as card label values (a label's value is its channel), others 0."""
    lut = np.zeros(max(int(winner.max(initial=0)) + 1, 256), dtype=np.uint8)
    for label in outputs.labels:
        lut[label.value] = label.value
    labelled: npt.NDArray[np.uint8] = lut[winner]
    return labelled


def argmax_slab(scores: FloatArray, outputs: OutputSpec) -> npt.NDArray[np.uint8]:
    """The argmax label map of scores ``(channels, ...)`` already on the source grid."""
    return _labelled(np.argmax(scores, axis=0), outputs)


def decide_slab(scores: FloatArray, outputs: OutputSpec) -> dict[int, BoolArray]:
    """Decide labels directly from scores ``(channels, ...)`` already on the source grid."""
    if outputs.decision == "threshold":
        return {
            label.value: scores[outputs.channel_of(label)] > outputs.threshold
            for label in outputs.labels
        }
    winner = np.argmax(scores, axis=0)
    return {label.value: winner == label.value for label in outputs.labels}


def _fill_holes_2d(mask: BoolArray) -> BoolArray:
    out: BoolArray = mask.copy()
    for z in range(mask.shape[0]):
        if mask[z].any():
            plane = sitk.GetImageFromArray(mask[z].astype(np.uint8))
            filled = sitk.BinaryFillhole(plane, foregroundValue=1)
            out[z] = sitk.GetArrayViewFromImage(filled) > 0
            del filled
    return out


def clean_mask(
    mask: BoolArray, spacing_xyz: tuple[float, float, float], spec: PostprocessingSpec
) -> BoolArray:
    """Clean one structure's mask as ``spec`` says (returns a new or the same array).

    Connected regions are face-connected (6-neighbourhood).  ``spacing_xyz`` is the
    voxel spacing in mm, used to turn ``min_volume_ml`` into voxels.
    """
    if not mask.any():
        return mask
    if spec == PostprocessingSpec():
        return mask
    # Work inside the mask's bounding box grown by one voxel: components and holes are
    # the same there, and a small structure in a large volume costs little.
    region = tuple(
        slice(max(0, first - 1), min(size, last + 2))
        for (first, last), size in zip(nonzero_bounds(mask), mask.shape, strict=True)
    )
    out = np.zeros_like(mask)
    out[region] = _clean(np.ascontiguousarray(mask[region]), spacing_xyz, spec)
    return out


def _clean(
    mask: BoolArray, spacing_xyz: tuple[float, float, float], spec: PostprocessingSpec
) -> BoolArray:
    if spec.min_volume_ml > 0 or spec.largest_components > 0:
        voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
        minimum = int(np.ceil(spec.min_volume_ml / voxel_ml)) if spec.min_volume_ml > 0 else 0
        image = sitk.GetImageFromArray(mask.view(np.uint8))
        regions = sitk.RelabelComponent(
            sitk.ConnectedComponent(image, False),
            minimumObjectSize=minimum,
            sortByObjectSize=True,
        )
        labels = sitk.GetArrayViewFromImage(regions)
        if spec.largest_components == 1:
            mask = labels == 1
        elif spec.largest_components > 0:
            mask = (labels > 0) & (labels <= spec.largest_components)
        else:
            mask = labels > 0
        del regions, labels
    if spec.fill_holes == "volume":
        filled = sitk.BinaryFillhole(
            sitk.GetImageFromArray(mask.view(np.uint8)), fullyConnected=False, foregroundValue=1
        )
        mask = sitk.GetArrayFromImage(filled) > 0
    elif spec.fill_holes == "slice":
        mask = _fill_holes_2d(mask)
    return mask
