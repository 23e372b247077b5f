"""Pre-processing: source volumes -> the model's input tensor on a model grid.

Steps, in order, as the card's ``preprocessing`` says: resample further inputs onto
the first input's grid (by patient coordinates), reorient, crop, resample to a
target spacing or resize to a fixed size, normalise intensities, and arrange the
spatial axes in the model's order.  All geometry is SimpleITK's: origin, spacing
(mm) and direction in DICOM LPS; numpy arrays are indexed ``[z, y, x]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from dicomnode.models.card import CropSpec, IntensitySpec, PreprocessingSpec

__all__ = ["ModelInput", "PreprocessingError", "nonzero_bounds", "prepare", "same_grid"]

FloatArray = npt.NDArray[np.float32]


class PreprocessingError(ValueError):
    """The inputs cannot be brought to the model's grid (the message says why)."""


@dataclass
class ModelInput:
    """The model's input and the grid it lives on.

    ``tensor`` is float32 ``(channels, *spatial)`` with the spatial axes in the
    model's order; ``axes`` says how they map onto ``grid``'s numpy array: ``zyx``
    (the array itself) or ``xyz`` (its transpose); ``grid`` is an image whose
    size, origin, spacing and direction define the model grid (its pixels are not
    used); ``identity`` is true when the model grid is the source grid itself
    (no reorientation, crop or resampling), so results need no resampling back.
    """

    tensor: FloatArray
    grid: sitk.Image
    identity: bool
    axes: str = "zyx"


def same_grid(a: sitk.Image, b: sitk.Image, *, tolerance: float = 1e-4) -> bool:
    """True when two images share size, origin, spacing and direction."""
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)
    )


def _onto(image: sitk.Image, reference: sitk.Image) -> sitk.Image:
    if same_grid(image, reference):
        return image
    return sitk.Resample(
        image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )


def nonzero_bounds(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """First and last index holding a True voxel along each numpy axis of ``mask``.

    ``mask`` must hold at least one True voxel.
    """
    bounds = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        bounds.append((int(hits[0]), int(hits[-1])))
    return bounds


def _crop_box(
    array: npt.NDArray[np.float32], spacing: Sequence[float], crop: CropSpec
) -> tuple[list[int], list[int]] | None:
    """Index bounds [x, y, z] (start, stop) of the crop, or None for no voxel."""
    mask = array > crop.threshold
    if crop.to == "body" and mask.any():
        components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)))
        largest = sitk.RelabelComponent(components, sortByObjectSize=True)
        mask = sitk.GetArrayViewFromImage(largest) == 1
    if not mask.any():
        return None
    start: list[int] = []
    stop: list[int] = []
    shape_xyz = mask.shape[::-1]
    bounds_xyz = nonzero_bounds(mask)[::-1]
    for axis_xyz, (first, last) in enumerate(bounds_xyz):
        margin = int(np.ceil(crop.margin_mm / spacing[axis_xyz]))
        start.append(max(0, first - margin))
        stop.append(min(shape_xyz[axis_xyz], last + 1 + margin))
    return start, stop


_LETTER_AXES = {"L": (0, 1.0), "R": (0, -1.0), "P": (1, 1.0), "A": (1, -1.0),
                "S": (2, 1.0), "I": (2, -1.0)}


@dataclass(frozen=True)
class _Grid:
    """Size [x, y, z], spacing (mm), origin (LPS mm) and 3 x 3 direction of a grid."""

    size: npt.NDArray[np.float64]
    spacing: npt.NDArray[np.float64]
    origin: npt.NDArray[np.float64]
    direction: npt.NDArray[np.float64]

    @classmethod
    def of(cls, image: sitk.Image) -> _Grid:
        return cls(
            np.array(image.GetSize(), dtype=np.float64),
            np.array(image.GetSpacing(), dtype=np.float64),
            np.array(image.GetOrigin(), dtype=np.float64),
            np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        )


def _oriented(grid: _Grid, code: str) -> tuple[_Grid, list[int]]:
    """The grid with its axes permuted and flipped to point as ``code`` says (like
    ``SimpleITK.DICOMOrient``), and for each new axis the old axis it comes from."""
    order: list[int] = []
    size, spacing = np.empty(3), np.empty(3)
    origin = grid.origin.copy()
    direction = np.empty((3, 3))
    for new_axis, letter in enumerate(code):
        world, sign = _LETTER_AXES[letter]
        old_axis = int(np.argmax(np.abs(grid.direction[world, :])))
        if old_axis in order:
            raise PreprocessingError(f"cannot orient the image to {code}: axes too oblique")
        order.append(old_axis)
        column = grid.direction[:, old_axis]
        if np.sign(column[world]) != sign:
            origin = origin + column * grid.spacing[old_axis] * (grid.size[old_axis] - 1)
            column = -column
        direction[:, new_axis] = column
        size[new_axis] = grid.size[old_axis]
        spacing[new_axis] = grid.spacing[old_axis]
    return _Grid(size, spacing, origin, direction), order


def _target_grid(grid: _Grid, pre: PreprocessingSpec) -> _Grid | None:
    """The resampled grid, or None when neither spacing nor resize asks for one.

    The new grid covers the same extent as the old one (voxel edges aligned), so a
    resize to N voxels maps voxel centres like ``skimage.transform.resize``.
    """
    extent = grid.size * grid.spacing
    if pre.resize is not None:
        new_size = np.array(pre.resize, dtype=np.float64)
        new_spacing = extent / new_size
    elif pre.spacing is not None:
        new_spacing = np.array(pre.spacing, dtype=np.float64)
        new_size = np.maximum(1.0, np.round(extent / new_spacing))
    else:
        return None
    if np.array_equal(new_size, grid.size) and np.allclose(new_spacing, grid.spacing):
        return None
    origin = grid.origin + grid.direction @ ((new_spacing - grid.spacing) / 2.0)
    return _Grid(new_size, new_spacing, origin, grid.direction)


NEGLIGIBLE_SIGMA = 0.27
"""Anti-aliasing sigmas below this many voxels are skipped: the Gaussian's weight one
voxel away, exp(-1 / (2 sigma^2)), is then below 0.1 %."""


def _gaussian_kernel(sigma: float) -> npt.NDArray[np.float32]:
    """Normalised 1D Gaussian, truncated at 4 sigma like ``scipy.ndimage``."""
    radius = max(1, int(4.0 * sigma + 0.5))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    result: npt.NDArray[np.float32] = (kernel / kernel.sum()).astype(np.float32)
    return result


def _smooth(image: sitk.Image, sigma_voxels: npt.NDArray[np.float64]) -> sitk.Image:
    """Gaussian anti-aliasing with ``sigma_voxels`` per image axis [x, y, z].

    A separable sampled Gaussian truncated at 4 sigma, as ``scipy.ndimage`` and
    therefore ``skimage.transform.resize`` use (ITK's DiscreteGaussian uses another
    kernel, which differs for small sigmas); edges repeat the border voxel.
    """
    sigma = np.where(sigma_voxels >= NEGLIGIBLE_SIGMA, sigma_voxels, 0.0)
    if not np.any(sigma > 0):
        return image
    array: npt.NDArray[np.float32] = sitk.GetArrayViewFromImage(image)
    for axis_xyz, s in enumerate(sigma):
        if s <= 0:
            continue
        axis = 2 - axis_xyz
        kernel = _gaussian_kernel(float(s))
        radius = len(kernel) // 2
        pad = [(0, 0)] * 3
        pad[axis] = (radius, radius)
        padded = np.pad(array, pad, mode="edge")
        out = np.zeros_like(array)
        term = np.empty_like(array)
        n = array.shape[axis]
        for k, weight in enumerate(kernel):
            index = [slice(None)] * 3
            index[axis] = slice(k, k + n)
            np.multiply(padded[tuple(index)], weight, out=term)
            out += term
        del padded, term
        array = out
    smoothed = sitk.GetImageFromArray(array)
    smoothed.CopyInformation(image)
    return smoothed


def _reorient_and_resample(images: list[sitk.Image], pre: PreprocessingSpec) -> list[sitk.Image]:
    """Orientation and resampling in one interpolation (or an exact permutation).

    (Resampling straight onto an x/z-swapped grid for ``xyz`` models would save the
    transposed copy, but ITK's resampler then walks memory across the cache and is
    slower than the copy.)
    """
    grid = _Grid.of(images[0])
    order = [0, 1, 2]
    if pre.orientation is not None:
        grid, order = _oriented(grid, pre.orientation)
    target = _target_grid(grid, pre)
    if target is None:
        if order == [0, 1, 2] and np.allclose(grid.direction, _Grid.of(images[0]).direction):
            return images
        return [sitk.DICOMOrient(img, pre.orientation) for img in images]
    if pre.antialias:
        # Like skimage.transform.resize(anti_aliasing=True): sigma = (factor - 1) / 2
        # voxels on each downsampled axis, applied on the source axes.
        factor = target.spacing / grid.spacing
        sigma_new = np.where(factor > 1.0, (factor - 1.0) / 2.0, 0.0)
        sigma_old = np.zeros(3)
        for new_axis, old_axis in enumerate(order):
            sigma_old[old_axis] = sigma_new[new_axis]
        images = [_smooth(img, sigma_old) for img in images]
    return [
        sitk.Resample(
            img,
            [int(v) for v in target.size],
            sitk.Transform(),
            sitk.sitkLinear,
            [float(v) for v in target.origin],
            [float(v) for v in target.spacing],
            [float(v) for v in target.direction.ravel()],
            0.0,
            sitk.sitkFloat32,
        )
        for img in images
    ]


def normalise(array: FloatArray, spec: IntensitySpec) -> FloatArray:
    """Apply the card's intensity normalisation to one channel (returns a new array)."""
    if spec.method == "none":
        return np.asarray(array, dtype=np.float32)
    if spec.method == "window":
        assert spec.window is not None
        low, high = spec.window
        out = np.clip(array, low, high).astype(np.float32)
        if spec.rescale:
            out -= np.float32(low)
            out /= np.float32(high - low)
        return out
    if spec.method == "zscore":
        sample = array if spec.threshold is None else array[array > spec.threshold]
        if sample.size == 0:
            raise PreprocessingError(
                f"z-score normalisation: no voxel above the threshold {spec.threshold}"
            )
        mean = float(sample.mean(dtype=np.float64))
        std = float(sample.std(dtype=np.float64))
        centred: FloatArray = array.astype(np.float32) - np.float32(mean)
        centred /= np.float32(std if std > 0 else 1.0)
        return centred
    if spec.method == "percentile":
        assert spec.percentiles is not None
        low, high = (float(v) for v in np.percentile(array, spec.percentiles))
        out = np.clip(array, low, high).astype(np.float32)
        out -= np.float32(low)
        out /= np.float32(high - low if high > low else 1.0)
        scaled: FloatArray = out
        return scaled
    # divide_max
    peak = float(array.max())
    if peak <= 0:
        raise PreprocessingError("divide-by-maximum normalisation: the image maximum is not > 0")
    divided: FloatArray = (array / np.float32(peak)).astype(np.float32)
    return divided


def prepare(volumes: Sequence[sitk.Image], pre: PreprocessingSpec) -> ModelInput:
    """Turn the source volume(s), one per card input in order, into the model's input.

    Raises:
        PreprocessingError: no volume, or a crop that finds nothing above its threshold.
    """
    if not volumes:
        raise PreprocessingError("no input volume")
    reference = volumes[0]
    images = [reference] + [_onto(v, reference) for v in volumes[1:]]
    if pre.crop.to != "none":
        box = _crop_box(
            sitk.GetArrayViewFromImage(images[0]), images[0].GetSpacing(), pre.crop
        )
        if box is None:
            raise PreprocessingError(
                f"crop to {pre.crop.to}: no voxel above {pre.crop.threshold} in the first input"
            )
        start, stop = box
        if start != [0, 0, 0] or list(stop) != list(images[0].GetSize()):
            images = [img[start[0]:stop[0], start[1]:stop[1], start[2]:stop[2]] for img in images]
    images = _reorient_and_resample(images, pre)
    transpose = pre.axes == "xyz"
    identity = same_grid(images[0], reference) and pre.axes == "zyx"
    channels: list[FloatArray] = []
    for img in images:
        view = sitk.GetArrayViewFromImage(img)
        channel = normalise(view, pre.intensity) if pre.intensity.method != "none" else view
        if transpose:
            channel = np.ascontiguousarray(np.transpose(channel, (2, 1, 0)))
        channels.append(channel)
    if len(channels) == 1:
        tensor = channels[0][None]
    else:
        tensor = np.stack(channels).astype(np.float32, copy=False)
    grid = images[0]
    return ModelInput(
        tensor=tensor, grid=grid, identity=identity, axes="xyz" if transpose else "zyx"
    )
