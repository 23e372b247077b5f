"""nnU-Net v2's inference, reimplemented on ONNX Runtime, numpy, SciPy and SimpleITK.

What :class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor` does with a plan
(nnU-Net 2.x), step by step, in the same arithmetic:

1. The image array as nnU-Net's ``SimpleITKIO`` reads it (``GetArrayFromImage``: ``[z, y, x]``,
   spacing reversed), float32, channels first; ``transpose_forward``.
2. Crop to the bounding box of the nonzero voxels of any channel (holes filled).
3. Normalisation per channel *before* resampling: ``CTNormalization`` (clip to the dataset's
   0.5 / 99.5 percentiles, subtract the foreground mean, divide by its std),
   ``ZScoreNormalization`` (inside the nonzero mask when ``use_mask_for_norm``, the outside
   kept as is), ``NoNormalization``, ``RescaleTo01Normalization``, ``RGBTo01Normalization``.
4. Resampling onto the plan's spacing, on nnU-Net's shape-based grid
   (``round(old_spacing / new_spacing * old_shape)``): ``skimage.transform.resize`` semantics
   (``scipy.ndimage.zoom`` with ``grid_mode``, edge mode, clipped to the input range), order 3;
   for anisotropic data (max/min spacing > 3) in-plane per slice and nearest (order 0) along
   the low-resolution axis.
5. Symmetric zero padding of axes shorter than the patch; windows at
   ``compute_steps_for_sliding_window`` (``tile_step_size``, 0.5 by default); each window's
   logits averaged over the mirrorings the trainer allows (in nnU-Net's order, float32),
   weighted by ``compute_gaussian`` (sigma = patch / 8, peak at ``patch // 2``, scaled to 10,
   float16, zeros raised to the smallest nonzero value) and accumulated in float16 as nnU-Net
   does; divided by the summed weights; folds added and averaged in float16.
6. Logits resampled back onto the cropped source grid (order 1; separate-z order 0 for
   anisotropic data), float16, then the argmax (labels) or ``sigmoid > 0.5`` in
   ``regions_class_order`` (region-based models); the crop and transpose undone.
7. nnU-Net's ``postprocessing.pkl|json`` when the model folder had one: keep the largest
   26-connected component of each listed label or region.

Memory is bounded for models with many classes: the windows are run in bands along the first
(model) axis, every fold at once, and each band of rows that no later window touches is
resampled back and decided before the next; the scores of a band are float16
``(folds + 1) x classes x patch[0] x rows x columns`` (plus one window's float32 scores and a
row at a time on the way back), and nothing the size of the whole model grid times the classes
is held. Resampling back is exact for separate-z (nnU-Net's own per-slice calls); for 3d order
1 it is done separably (first axis, then the plane), which may round a float16 logit one unit
in the last place differently. One case is not streamed: a series whose low-resolution axis is
not the model's first axis (a sagittal acquisition for an axial model) is resampled back as a
whole, as nnU-Net does, holding the float16 scores of the whole grid.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage as ndi

from dicomnode.models.plans import (  # the plan is part of this profile
    NnunetPlan,
    Normalization,
    Resampling,
    plan_of,
)
from dicomnode.models.plans import validate_nnunet as validate

if TYPE_CHECKING:
    from dicomnode.inference.runtime import ModelSession
    from dicomnode.inference.segment import Segmentation
    from dicomnode.models.card import Card

__all__ = ["NnunetPlan", "model_grid_logits", "plan_of", "predict_label_map", "segment",
           "validate"]

Float32 = npt.NDArray[np.float32]
Float16 = npt.NDArray[np.float16]


# --------------------------------------------------------------------------- resampling


def _resize(image: npt.NDArray[np.float64], shape: Sequence[int], order: int,
            clip: bool = True) -> npt.NDArray[np.float64]:
    """``skimage.transform.resize(image, shape, order, mode='edge', anti_aliasing=False)`` on
    float64 (what nnU-Net calls)."""
    factors = np.divide(image.shape, shape)
    out: npt.NDArray[np.float64] = ndi.zoom(image, [1 / f for f in factors], order=order,
                                            mode="nearest", cval=0, grid_mode=True)
    if clip:
        np.clip(out, image.min(), image.max(), out=out)
    return out


def _separate_z(plan: NnunetPlan, resampling: Resampling, current: Sequence[float],
                new: Sequence[float]) -> tuple[bool, int | None]:
    """``determine_do_sep_z_and_axis``."""

    def lowres(spacing: Sequence[float]) -> list[int]:
        s = np.asarray(spacing, dtype=float)
        return [int(a) for a in np.where(max(s) / s == 1)[0]]

    def aniso(spacing: Sequence[float]) -> bool:
        return bool(np.max(spacing) / np.min(spacing) > plan.anisotropy_threshold)

    axes: list[int] | None
    if resampling.force_separate_z is not None:
        separate = resampling.force_separate_z
        axes = lowres(current) if separate else None
    elif aniso(current):
        separate, axes = True, lowres(current)
    elif aniso(new):
        separate, axes = True, lowres(new)
    else:
        separate, axes = False, None
    if axes is not None and len(axes) != 1:
        return False, None
    return separate, (axes[0] if axes else None)


def _nearest_index(n_in: int, n_out: int) -> npt.NDArray[np.intp]:
    """The source index of each output index of nnU-Net's order-0 ``map_coordinates`` step
    (``align_corners=False`` coordinates, nearest mode)."""
    scale = float(n_in) / n_out
    coords = scale * (np.arange(n_out, dtype=np.float64) + 0.5) - 0.5
    picked = ndi.map_coordinates(np.arange(n_in, dtype=np.float64), coords[None], order=0,
                                 mode="nearest")
    return np.asarray(np.rint(picked), dtype=np.intp)


def _linear_weights(n_in: int, n_out: int) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp],
                                                    npt.NDArray[np.float64]]:
    """Order-1 ``zoom(grid_mode=True, mode='nearest')`` along one axis: for each output index
    the two source indices and the weight of the second."""
    coords = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    low = np.floor(coords)
    weight = coords - low
    i0 = np.clip(low.astype(np.intp), 0, n_in - 1)
    i1 = np.clip(low.astype(np.intp) + 1, 0, n_in - 1)
    return i0, i1, weight


def _resample_data(plan: NnunetPlan, data: Any, new_shape: Sequence[int],
                   current: Sequence[float], new: Sequence[float],
                   res: Resampling | None = None) -> Any:
    """``resample_data_or_seg_to_shape`` of the image (float32 in and out), or with ``res``
    the probabilities' settings of the logits (float16 in and out)."""
    res = res or plan.resampling_data
    shape = np.array(data.shape[1:])
    target = np.array(new_shape)
    if np.all(shape == target):
        return data
    separate, axis = _separate_z(plan, res, current, new)
    out = np.zeros((data.shape[0], *target), dtype=data.dtype)
    for c in range(data.shape[0]):
        channel = data[c].astype(np.float64)
        if not separate:
            out[c] = _resize(channel, [int(v) for v in target], res.order)
            continue
        assert axis is not None
        plane = [int(v) for i, v in enumerate(target) if i != axis]
        tmp_shape = target.copy()
        tmp_shape[axis] = shape[axis]
        here = np.zeros(tmp_shape)
        for k in range(shape[axis]):
            index: tuple[Any, ...] = tuple(k if i == axis else slice(None) for i in range(3))
            here[index] = _resize(channel[index], plane, res.order)
        if shape[axis] == target[axis]:
            out[c] = here
        elif res.order_z == 0:
            pick = _nearest_index(int(shape[axis]), int(target[axis]))
            out[c] = np.take(here, pick, axis=axis)
        else:  # nnU-Net's map_coordinates with order_z (rare): same call
            grids = np.mgrid[tuple(slice(0, int(n)) for n in target)].astype(np.float64)
            scale = float(here.shape[axis]) / target[axis]
            grids[axis] = scale * (grids[axis] + 0.5) - 0.5
            out[c] = ndi.map_coordinates(here, grids, order=res.order_z, mode="nearest")
    return out


# --------------------------------------------------------------------------- preprocessing


def _fill_holes(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    return np.asarray(ndi.binary_fill_holes(mask), dtype=bool)


def _bbox(mask: npt.NDArray[np.bool_]) -> list[list[int]]:
    """``acvl_utils`` ``get_bbox_from_mask``: half-open, the whole array when empty."""
    box = []
    for axis in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != axis)
        hits = np.flatnonzero(mask.any(axis=other))
        box.append([int(hits[0]), int(hits[-1]) + 1] if hits.size else [0, mask.shape[axis]])
    return box


def _normalize(image: Float32, norm: Normalization, nonzero: npt.NDArray[np.bool_]) -> Float32:
    """nnU-Net's normalisation classes' ``run`` (float32, same operations)."""
    eps = 1e-8
    image = image.astype(np.float32, copy=False)
    if norm.scheme == "CTNormalization":
        np.clip(image, norm.percentile_00_5, norm.percentile_99_5, out=image)
        image -= norm.mean
        image /= max(norm.std, eps)
    elif norm.scheme == "ZScoreNormalization":
        if norm.use_mask_for_norm:
            mean = image[nonzero].mean()
            std = image[nonzero].std()
            image[nonzero] = (image[nonzero] - mean) / (max(std, eps))
        else:
            mean = image.mean()
            std = image.std()
            image -= mean
            image /= max(std, eps)
    elif norm.scheme == "RescaleTo01Normalization":
        image -= image.min()
        image /= np.clip(image.max(), a_min=eps, a_max=None)
    elif norm.scheme == "RGBTo01Normalization":
        image /= 255.0
    return image


@dataclass
class Prepared:
    """The model-grid input and what is needed to go back."""

    data: Float32  # [C, *model grid], float32
    shape_before_cropping: tuple[int, ...]
    bbox: list[list[int]]
    shape_after_cropping: tuple[int, ...]
    spacing: tuple[float, ...]  # source spacing, transposed


def oriented(plan: NnunetPlan, volumes: Sequence[sitk.Image]) -> list[sitk.Image]:
    """The volumes as the network was trained to see them: reoriented to ``plan.orientation``
    (e.g. RAS for TotalSegmentator, which feeds nnU-Net canonical NIfTI), else as they are."""
    if plan.orientation is None:
        return list(volumes)
    return [sitk.DICOMOrient(v, plan.orientation) for v in volumes]


def prepare(plan: NnunetPlan, volumes: Sequence[sitk.Image]) -> Prepared:
    """Steps 1-4 of the module docstring."""
    volumes = oriented(plan, volumes)
    arrays = [sitk.GetArrayFromImage(v) for v in volumes]
    data = np.stack(arrays).astype(np.float32)
    spacing = [float(s) for s in volumes[0].GetSpacing()[::-1]]
    data = data.transpose([0, *[i + 1 for i in plan.transpose_forward]])
    spacing_t = tuple(spacing[i] for i in plan.transpose_forward)
    before = tuple(int(s) for s in data.shape[1:])
    nonzero = data[0] != 0
    for c in range(1, data.shape[0]):
        nonzero |= data[c] != 0
    nonzero = _fill_holes(nonzero)
    box = _bbox(nonzero)
    slicer = tuple(slice(a, b) for a, b in box)
    data = np.ascontiguousarray(data[:, slicer[0], slicer[1], slicer[2]])
    nonzero = nonzero[slicer]
    after = tuple(int(s) for s in data.shape[1:])
    new_shape = [round(i / j * k) for i, j, k in zip(spacing_t, plan.spacing, after,
                                                           strict=True)]
    for c, norm in enumerate(plan.normalization):
        data[c] = _normalize(data[c], norm, nonzero)
    data = _resample_data(plan, data, new_shape, spacing_t, plan.spacing)
    return Prepared(data, before, box, after, spacing_t)


# --------------------------------------------------------------------------- sliding window


def compute_gaussian(tile: Sequence[int], sigma_scale: float = 1.0 / 8,
                     value_scaling_factor: float = 10.0) -> Float16:
    """nnU-Net's ``compute_gaussian`` (float16, as its predictor uses it)."""
    tmp = np.zeros(tile)
    tmp[tuple(i // 2 for i in tile)] = 1
    gaussian = ndi.gaussian_filter(tmp, [i * sigma_scale for i in tile], 0, mode="constant",
                                   cval=0)
    gaussian /= np.max(gaussian) / value_scaling_factor
    half: Float16 = gaussian.astype(np.float16)
    zero = half == 0
    if zero.any():
        half[zero] = half[~zero].min()
    return half


def compute_steps(image: Sequence[int], tile: Sequence[int], step: float) -> list[list[int]]:
    """nnU-Net's ``compute_steps_for_sliding_window``."""
    target = [i * step for i in tile]
    num = [int(np.ceil((i - k) / j)) + 1 for i, j, k in zip(image, target, tile, strict=True)]
    steps = []
    for dim in range(len(tile)):
        highest = image[dim] - tile[dim]
        actual = highest / (num[dim] - 1) if num[dim] > 1 else 99999999999
        steps.append([int(np.round(actual * i)) for i in range(num[dim])])
    return steps


def _mirror_combinations(axes: tuple[int, ...] | None) -> list[tuple[int, ...]]:
    if not axes:
        return []
    shifted = [a + 2 for a in axes]
    return [c for i in range(len(shifted)) for c in itertools.combinations(shifted, i + 1)]


@dataclass
class _Counters:
    session_run: float = 0.0
    windows: int = 0


#: mirrored copies of a window run as one batch while the batch's scores stay below this
BATCH_BYTES = 256 * 1024 * 1024


def _predict_window(sessions: Sequence[ModelSession], window: Float32,
                    combos: list[tuple[int, ...]], heads: int,
                    counters: _Counters) -> list[Float32]:
    """Each fold's mirrored-averaged logits for one window ``(1, C, *patch)``, summed in
    nnU-Net's order (the plain window, then each flip combination) in float32."""
    variants = [window, *[np.flip(window, axes) for axes in combos]]
    together = heads * window[0, 0].size * 4 * len(variants) <= BATCH_BYTES
    results = []
    for session in sessions:

        def run(batch: Float32, session: ModelSession = session) -> Float32:
            t = time.perf_counter()
            with session.lock:
                out = np.asarray(session.run(np.ascontiguousarray(batch, dtype=np.float32)),
                                 dtype=np.float32)
            counters.session_run += time.perf_counter() - t
            return out

        outs: Sequence[Float32] = (run(np.concatenate(variants)) if together
                                   else [run(v)[0] for v in variants])  # type: ignore[assignment]
        prediction = outs[0]  # ours to change (ONNX Runtime hands out a fresh array)
        if not prediction.flags.writeable:
            prediction = prediction.copy()
        for i, axes in enumerate(combos, start=1):
            prediction += np.flip(outs[i], tuple(a - 1 for a in axes))
        del outs
        if combos:
            prediction /= np.float32(len(combos) + 1)
        results.append(prediction)
    counters.windows += 1
    return results


def _bands(plan: NnunetPlan, sessions: Sequence[ModelSession], data: Float32,
           counters: _Counters) -> Iterator[tuple[int, Float16]]:
    """The fold-averaged float16 logits on the model grid, in bands of rows along the first
    axis: ``(first row, logits [heads, rows, *plane])``, padding removed."""
    patch = plan.patch_size
    shape = np.array(data.shape[1:])
    padded_shape = np.maximum(shape, patch)
    diff = padded_shape - shape
    below = diff // 2
    above = diff // 2 + diff % 2
    if diff.any():
        data = np.pad(data, [(0, 0), *zip(below.tolist(), above.tolist(), strict=True)],
                      mode="constant", constant_values=0)
    steps = compute_steps([int(v) for v in padded_shape], patch, plan.tile_step_size)
    gaussian = (compute_gaussian(patch) if plan.use_gaussian
                else np.ones(patch, dtype=np.float16))
    weights32 = gaussian.astype(np.float32)  # the same values, without a cast per window
    combos = _mirror_combinations(plan.mirror_axes)
    heads = plan.num_heads
    plane = [int(v) for v in padded_shape[1:]]
    nfolds = len(sessions)
    band_rows = patch[0]
    keep = (slice(int(below[1]), int(padded_shape[1] - above[1])),
            slice(int(below[2]), int(padded_shape[2] - above[2])))
    z_lo, z_hi = int(below[0]), int(padded_shape[0] - above[0])
    origin = 0  # padded row of the accumulators' row 0
    accs = [np.zeros((heads, band_rows, *plane), dtype=np.float16) for _ in range(nfolds)]
    counts = np.zeros((band_rows, *plane), dtype=np.float16)

    def emit(stop: int) -> Iterator[tuple[int, Float16]]:
        """Rows [origin, stop) (padded) are final: divide, average the folds, unpad; one
        row at a time, so that no slab of all classes is held twice."""
        for row in range(max(origin, z_lo), min(stop, z_hi)):
            r = row - origin
            total: Float16 | None = None
            for acc in accs:
                logits = np.divide(acc[:, r], counts[r], dtype=np.float16)
                total = logits if total is None else np.add(total, logits, dtype=np.float16)
            assert total is not None
            if nfolds > 1:
                total = np.divide(total, np.float16(nfolds), dtype=np.float16)
            if np.isinf(total).any():
                raise RuntimeError("infinite logits (float16 overflow), as nnU-Net would refuse")
            yield row - z_lo, total[:, None, keep[0], keep[1]]

    for i, sx in enumerate(steps[0]):
        if sx > origin:  # rows before sx are final: emit them, shift the accumulators
            yield from emit(sx)
            shift = sx - origin
            for acc in accs:
                acc[:, :-shift] = acc[:, shift:].copy() if shift < band_rows else 0
                acc[:, max(band_rows - shift, 0):] = 0
            counts[:-shift] = counts[shift:].copy() if shift < band_rows else 0
            counts[max(band_rows - shift, 0):] = 0
            origin = sx
        for sy in steps[1]:
            for sz in steps[2]:
                window = data[None, :, sx:sx + patch[0], sy:sy + patch[1], sz:sz + patch[2]]
                predictions = _predict_window(sessions, window, combos, heads, counters)
                region = (slice(None), slice(sx - origin, sx - origin + patch[0]),
                          slice(sy, sy + patch[1]), slice(sz, sz + patch[2]))
                for acc, prediction in zip(accs, predictions, strict=True):
                    if plan.use_gaussian:
                        prediction *= weights32
                    np.add(acc[region], prediction, out=acc[region], casting="unsafe")
                counts[region[1:]] += gaussian
        if i == len(steps[0]) - 1:
            yield from emit(origin + band_rows)


# --------------------------------------------------------------------------- way back


class _BackResampler:
    """Streams model-grid rows (first axis) into the cropped source grid, one output row at a
    time, as ``resample_data_or_seg_to_shape`` with the probabilities' settings would
    (float16 out)."""

    def __init__(self, plan: NnunetPlan, model_shape: Sequence[int],
                 source_shape: Sequence[int], source_spacing: Sequence[float]) -> None:
        res = plan.resampling_probabilities
        self.order = res.order
        self.model_shape = [int(v) for v in model_shape]
        self.source_shape = [int(v) for v in source_shape]
        self.identity = self.model_shape == self.source_shape
        separate, axis = _separate_z(plan, res, plan.spacing, source_spacing)
        if separate and axis != 0:
            raise ValueError(  # predict_label_map then resamples the whole grid at once
                "the low-resolution axis is not the first: no streaming")
        self.separate = separate
        n_in, n_out = self.model_shape[0], self.source_shape[0]
        self.nearest: npt.NDArray[np.intp] | None = None
        self.linear: tuple[Any, Any, Any] | None = None
        if n_in != n_out:
            if separate and res.order_z == 0:
                self.nearest = _nearest_index(n_in, n_out)
            elif separate:
                self.linear = _linear_weights(n_in, n_out)
            elif self.order == 1:
                self.linear = _linear_weights(n_in, n_out)
            else:
                raise ValueError("the nnunet profile resamples probabilities with order 1 "
                                 f"(or separate-z); the plan asks order {self.order}")
        elif not separate and self.order != 1 and not self.identity:
            raise ValueError("the nnunet profile resamples probabilities with order 1 "
                             f"(or separate-z); the plan asks order {self.order}")
        self.rows: dict[int, Float16] = {}
        self.plane_cache: dict[int, Float16] = {}
        self.next_out = 0

    def _plane(self, row: npt.NDArray[Any]) -> Float16:
        """In-plane resize of one row ``[heads, y, x]`` (float64 in), float16 out."""
        if list(row.shape[1:]) == self.source_shape[1:]:
            return row.astype(np.float16)
        out = np.empty((row.shape[0], *self.source_shape[1:]), dtype=np.float16)
        for c in range(row.shape[0]):
            out[c] = _resize(np.asarray(row[c], dtype=np.float64), self.source_shape[1:],
                             self.order, clip=self.separate)
        return out

    def _needed(self, k: int) -> tuple[int, ...]:
        if self.nearest is not None:
            return (int(self.nearest[k]),)
        if self.linear is not None:
            return (int(self.linear[0][k]), int(self.linear[1][k]))
        return (k,)

    def feed(self, first: int, rows: Float16) -> Iterator[tuple[int, Float16]]:
        """Take model rows ``first..``; yield ``(output row, logits [heads, y, x])`` for every
        output row that can now be computed."""
        for i in range(rows.shape[1]):  # copies: the band they come from can go
            self.rows[first + i] = np.ascontiguousarray(rows[:, i])
        have = first + rows.shape[1]
        while self.next_out < self.source_shape[0]:
            k = self.next_out
            needed = self._needed(k)
            if max(needed) >= have:
                break
            if self.identity:
                out = self.rows[k]
            elif self.nearest is not None:
                j = needed[0]
                if j not in self.plane_cache:
                    self.plane_cache = {j: self._plane(self.rows[j].astype(np.float64))}
                out = self.plane_cache[j]
            elif self.linear is not None:
                i0, i1 = needed
                w = float(self.linear[2][k])
                if self.separate:  # in-plane first, then linear between the planes
                    a = self._plane(self.rows[i0].astype(np.float64)).astype(np.float64)
                    b = self._plane(self.rows[i1].astype(np.float64)).astype(np.float64)
                    out = ((1 - w) * a + w * b).astype(np.float16)
                else:
                    blended = ((1 - w) * self.rows[i0].astype(np.float64)
                               + w * self.rows[i1].astype(np.float64))
                    out = self._plane(blended)
            else:
                out = self._plane(self.rows[k].astype(np.float64))
            yield k, out
            self.next_out += 1
            if self.next_out < self.source_shape[0]:
                low = min(self._needed(self.next_out))
                for j in [j for j in self.rows if j < low]:
                    del self.rows[j]


def _decide(plan: NnunetPlan, logits: Float16) -> npt.NDArray[np.uint8]:
    """One row's labels: argmax, or sigmoid > 0.5 in ``regions_class_order``."""
    if plan.regions_class_order is None:
        return np.asarray(logits.argmax(0), dtype=np.uint8)
    probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float32)))
    out = np.zeros(logits.shape[1:], dtype=np.uint8)
    for i, value in enumerate(plan.regions_class_order):
        out[probabilities[i] > 0.5] = value
    return out


def _largest_component(labels: npt.NDArray[np.uint8], plan: NnunetPlan,
                       targets: tuple[Any, ...]) -> None:
    """nnU-Net's ``remove_all_but_largest_component_from_segmentation`` (in place)."""
    mask = np.zeros(labels.shape, dtype=bool)
    for target in targets:
        if isinstance(target, list | tuple):  # a region: the union of its labels
            mask |= np.isin(labels, [int(v) for v in target])
        else:
            mask |= labels == int(target)
    components, n = ndi.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return
    sizes = np.bincount(components.ravel())[1:]
    keep = np.flatnonzero(sizes == sizes.max()) + 1
    labels[mask & ~np.isin(components, keep)] = 0


def _sessions(card: Card, plan: NnunetPlan, providers: Sequence[str],
              intra_op_threads: int) -> list[ModelSession]:
    from dicomnode.inference.runtime import open_session, window_shape

    return [open_session(card.package / name, providers=providers, input_name=card.onnx_input,
                         output_name=card.onnx_output, intra_op_threads=intra_op_threads,
                         label=f"{card.name} {card.version} {name}",
                         window=window_shape(card), fp16=card.runtime.fp16)
            for name in plan.files]


def model_grid_logits(card: Card, volumes: Sequence[sitk.Image], *,
                      providers: Sequence[str] = ("CPUExecutionProvider",),
                      intra_op_threads: int = 0) -> Float16:
    """The fold-averaged float16 logits on the model grid (after cropping and resampling,
    padding removed), as ``nnUNetPredictor.predict_logits_from_preprocessed_data`` returns
    them: for checks on small volumes (the whole grid times the classes is held)."""
    assert card.profile is not None
    plan = plan_of(card.profile)
    prepared = prepare(plan, volumes)
    sessions = _sessions(card, plan, providers, intra_op_threads)
    parts = [rows for _, rows in _bands(plan, sessions, prepared.data, _Counters())]
    return np.concatenate(parts, axis=1)


def predict_label_map(card: Card, volumes: Sequence[sitk.Image], *,
                      providers: Sequence[str] = ("CPUExecutionProvider",),
                      intra_op_threads: int = 0,
                      ) -> tuple[npt.NDArray[np.uint8], dict[str, float], str]:
    """nnU-Net's label map of ``volumes`` ([z, y, x] of the first volume), the seconds spent
    (``preprocess``, ``session_run``, ``total``; ``windows`` run) and the provider that ran."""
    started = time.perf_counter()
    assert card.profile is not None
    plan = plan_of(card.profile)
    sessions = _sessions(card, plan, providers, intra_op_threads)
    prepared = prepare(plan, volumes)
    preprocess = time.perf_counter() - started
    counters = _Counters()
    cropped = np.zeros(prepared.shape_after_cropping, dtype=np.uint8)
    try:
        back: _BackResampler | None = _BackResampler(
            plan, prepared.data.shape[1:], prepared.shape_after_cropping, prepared.spacing)
    except ValueError:  # low-resolution axis not first: the whole grid at once, as nnU-Net
        back = None
    if back is not None:
        for first, rows in _bands(plan, sessions, prepared.data, counters):
            for k, logits in back.feed(first, rows):
                cropped[k] = _decide(plan, logits)
    else:
        grid = np.concatenate([rows for _, rows in _bands(plan, sessions, prepared.data,
                                                          counters)], axis=1)
        grid = _resample_data(plan, grid, prepared.shape_after_cropping, plan.spacing,
                              prepared.spacing, plan.resampling_probabilities)
        for k in range(grid.shape[1]):
            cropped[k] = _decide(plan, grid[:, k])
        del grid
    del prepared.data
    labels = np.zeros(prepared.shape_before_cropping, dtype=np.uint8)
    labels[tuple(slice(a, b) for a, b in prepared.bbox)] = cropped
    labels = np.ascontiguousarray(labels.transpose(plan.transpose_backward))
    if plan.orientation is not None:  # back onto the series' own grid
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(oriented(plan, volumes[:1])[0])
        code = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(
            volumes[0].GetDirection())
        labels = sitk.GetArrayFromImage(sitk.DICOMOrient(image, code))
    for targets in plan.postprocessing:
        _largest_component(labels, plan, targets)
    timings = {"preprocess": preprocess, "session_run": counters.session_run,
               "windows": float(counters.windows), "total": time.perf_counter() - started}
    return labels, timings, sessions[0].provider


def segment(card: Card, volumes: Sequence[sitk.Image], *,
            providers: Sequence[str] = ("CPUExecutionProvider",),
            intra_op_threads: int = 0) -> Segmentation:
    """Run ``card``'s imported nnU-Net model as nnU-Net does (see the module docstring); one
    structure per card label: the voxels nnU-Net labels with its value."""
    from dicomnode.inference.predict import InferenceError
    from dicomnode.inference.segment import (
        Geometry,
        Segmentation,
        Timings,
        structures_of_label_map,
    )

    t0 = time.perf_counter()
    try:
        labels, seconds, provider = predict_label_map(
            card, volumes, providers=providers, intra_op_threads=intra_op_threads)
    except (ValueError, RuntimeError) as exc:  # onnxruntime's errors are RuntimeErrors
        raise InferenceError(f"model {card.name} (nnU-Net profile): {exc}") from exc
    t = time.perf_counter()
    geometry = Geometry.of(volumes[0])
    structures = structures_of_label_map(card.outputs.labels, labels, geometry.spacing)
    timings = Timings(preprocess=seconds["preprocess"], session_run=seconds["session_run"],
                      postprocess=time.perf_counter() - t, total=time.perf_counter() - t0)
    return Segmentation(card, geometry, structures, provider, timings)
