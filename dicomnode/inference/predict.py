"""Running the model over a prepared tensor: whole input, slices, or sliding windows.

The input tensor is ``(channels, *spatial)`` in the model's axis order.  A 3D
model sees ``(batch, channels, d, h, w)``; a 2D model sees slices along spatial
axis 0 as ``(batch, channels, h, w)``, and a 2.5D model the same with
``context_slices`` neighbours on each side stacked as extra channels (edge
slices repeated at the ends).  With a ``patch_size`` the model runs on
overlapping windows whose outputs are blended (constant or Gaussian weights);
test-time flips average the activated outputs of flipped inputs.  A ``pad`` pads
what the model sees at the end of each spatial axis (after normalisation, before
flips and windows) and crops the scores back.

:func:`predict` yields finished slabs ``(start, stop, scores)`` along spatial
axis 0, ``scores`` being float32 ``(output_channels, stop - start, ...)`` after
the card's activation, so that a slice model on a 600-slice CT never holds all
of its scores at once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from dicomnode.models.card import OutputSpec, PadSpec, PreprocessingSpec

__all__ = ["InferenceError", "activate", "gaussian_weights", "predict", "window_starts"]

FloatArray = npt.NDArray[np.float32]
RunFn = Callable[[FloatArray], FloatArray]


class InferenceError(RuntimeError):
    """The model cannot run on this input (the message says why).

    ``transient``: a later attempt may succeed (an inference server that is down or
    busy); a job then is tried again rather than failed at once.
    """

    transient: bool = False


def activate(raw: FloatArray, activation: str) -> FloatArray:
    """Apply the card's activation over the channel axis (axis 1) of a batch."""
    if activation == "sigmoid":
        out = np.negative(raw, dtype=np.float32)
        np.exp(out, out=out)
        out += 1.0
        np.reciprocal(out, out=out)
        return out
    if activation == "softmax":
        shifted = raw - raw.max(axis=1, keepdims=True)
        np.exp(shifted, out=shifted)
        shifted /= shifted.sum(axis=1, keepdims=True)
        probabilities: FloatArray = shifted.astype(np.float32, copy=False)
        return probabilities
    as_float: FloatArray = np.asarray(raw, dtype=np.float32)
    return as_float


def window_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of windows of ``patch`` covering ``size`` with the given overlap."""
    if size <= patch:
        return [0]
    step = max(1, int(patch * (1.0 - overlap)))
    count = int(np.ceil((size - patch) / step)) + 1
    starts = np.linspace(0, size - patch, count)
    return sorted({round(float(s)) for s in starts})


@lru_cache(maxsize=8)
def gaussian_weights(patch: tuple[int, ...]) -> FloatArray:
    """Importance map for blending: a Gaussian with sigma = patch / 8, peak 1.

    Values are kept above a small floor so that no voxel gets zero weight.
    """
    grids = []
    for n in patch:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        sigma = max(n / 8.0, 1e-6)
        grids.append(np.exp(-(x**2) / (2 * sigma**2)))
    weights = grids[0]
    for g in grids[1:]:
        weights = np.multiply.outer(weights, g)
    weights = weights / weights.max()
    floor = weights[weights > 0].min()
    weights = np.maximum(weights, max(floor, 1e-3))
    result: FloatArray = weights.astype(np.float32)
    result.setflags(write=False)
    return result


def _with_flips(run: RunFn, flips: Sequence[Sequence[int]], activation: str) -> RunFn:
    """Wrap ``run`` to activate its output and average over test-time flips."""

    def wrapped(batch: FloatArray) -> FloatArray:
        total = activate(run(batch), activation)
        for flip in flips:
            axes = tuple(2 + a for a in flip)
            flipped = np.ascontiguousarray(np.flip(batch, axis=axes))
            total += np.flip(activate(run(flipped), activation), axis=axes)
        if flips:
            total /= np.float32(len(flips) + 1)
        return total

    return wrapped


def _all_channels(region: tuple[slice, ...]) -> tuple[slice, ...]:
    """Index every channel of ``region`` in a ``(channels, *spatial)`` array."""
    return (slice(None), *region)


def _sliding(
    sample: FloatArray,
    patch: Sequence[int],
    pre: PreprocessingSpec,
    run: RunFn,
) -> FloatArray:
    """Blend window outputs over one sample ``(channels, *spatial)``."""
    spatial = sample.shape[1:]
    pad = [max(0, p - s) for p, s in zip(patch, spatial, strict=True)]
    if any(pad):
        sample = np.pad(sample, [(0, 0)] + [(0, p) for p in pad], mode="edge")
    padded = sample.shape[1:]
    starts = [window_starts(s, p, pre.overlap) for s, p in zip(padded, patch, strict=True)]
    weights = (
        gaussian_weights(tuple(patch))
        if pre.blending == "gaussian"
        else np.ones(tuple(patch), dtype=np.float32)
    )
    accumulated: FloatArray | None = None
    norm = np.zeros(padded, dtype=np.float32)
    corners = list(itertools.product(*starts))
    for first in range(0, len(corners), pre.batch_size):
        chunk = corners[first : first + pre.batch_size]
        regions = [
            tuple(slice(c, c + p) for c, p in zip(corner, patch, strict=True)) for corner in chunk
        ]
        batch = np.stack([sample[_all_channels(r)] for r in regions]).astype(
            np.float32, copy=False
        )
        scores = run(batch)
        if accumulated is None:
            accumulated = np.zeros((scores.shape[1], *padded), dtype=np.float32)
        for region, score in zip(regions, scores, strict=True):
            accumulated[_all_channels(region)] += score * weights
            norm[region] += weights
    assert accumulated is not None
    accumulated /= norm
    crop = tuple(slice(0, s) for s in spatial)
    return np.ascontiguousarray(accumulated[_all_channels(crop)])


def _pad_end(
    array: FloatArray, pad: PadSpec | None, dims: int
) -> tuple[FloatArray, tuple[Any, ...] | None]:
    """``array`` padded at the end of its last ``dims`` axes as ``pad`` says, and the
    index that crops a result of the same spatial layout back (None: nothing padded)."""
    if pad is None:
        return array, None
    spatial = tuple(int(s) for s in array.shape[-dims:])
    target = pad.padded(spatial)
    if target == spatial:
        return array, None
    widths = [(0, 0)] * (array.ndim - dims) + [
        (0, t - s) for t, s in zip(target, spatial, strict=True)
    ]
    padded: FloatArray = np.pad(array, widths, mode="constant", constant_values=pad.value)
    return padded, (Ellipsis, *(slice(0, s) for s in spatial))


def _check_fixed(shape: Sequence[int | str | None], got: Sequence[int], what: str) -> None:
    for declared, actual in zip(shape, got, strict=True):
        if isinstance(declared, int) and declared > 0 and declared != actual:
            raise InferenceError(
                f"the model expects {what} {list(shape)} but gets {list(got)}: "
                "set preprocessing resize or patch_size in the card to the model's size"
            )


def predict(
    tensor: FloatArray,
    run: RunFn,
    pre: PreprocessingSpec,
    outputs: OutputSpec,
    *,
    input_shape: Sequence[int | str | None] = (),
) -> Iterator[tuple[int, int, FloatArray]]:
    """Run the model over ``tensor`` and yield activated score slabs along axis 0.

    ``run`` maps a float32 batch to the model's raw output; ``input_shape`` is the
    model's declared input shape, checked against what is fed when it is fixed.
    """
    scored = _with_flips(run, pre.tta_flips, outputs.activation)
    batch_size = pre.batch_size
    if input_shape and isinstance(input_shape[0], int) and input_shape[0] > 0:
        batch_size = min(batch_size, int(input_shape[0]))
    pre = pre.model_copy(update={"batch_size": batch_size})
    if pre.dimensionality == "3d":
        spatial = tensor.shape[1:]
        fed, crop = _pad_end(tensor, pre.pad, 3)
        if pre.patch_size is None:
            if input_shape:
                _check_fixed(input_shape[1:], fed.shape, "input")
            scores = scored(np.ascontiguousarray(fed[None]))[0]
        else:
            if input_shape:
                _check_fixed(input_shape[1:], [tensor.shape[0], *pre.patch_size], "patches")
            scores = _sliding(fed, pre.patch_size, pre, scored)
        if crop is not None:
            scores = np.ascontiguousarray(scores[crop])
        yield 0, spatial[0], scores
        return
    depth = tensor.shape[1]
    context = pre.context_slices
    for start in range(0, depth, batch_size):
        stop = min(depth, start + batch_size)
        slices = []
        for z in range(start, stop):
            if context:
                picks = np.clip(np.arange(z - context, z + context + 1), 0, depth - 1)
                # channels: input 0 slices z-k..z+k, then input 1, ...
                slab = tensor[:, picks].reshape(-1, *tensor.shape[2:])
            else:
                slab = tensor[:, z]
            slices.append(slab)
        batch, crop = _pad_end(np.stack(slices).astype(np.float32, copy=False), pre.pad, 2)
        if pre.patch_size is None:
            if input_shape:
                _check_fixed(input_shape[1:], batch.shape[1:], "slices")
            scores = scored(batch)
        else:
            if input_shape:
                _check_fixed(input_shape[1:], [batch.shape[1], *pre.patch_size], "patches")
            scores = np.stack(
                [_sliding(sample, pre.patch_size, pre, scored) for sample in batch]
            )
        if crop is not None:
            scores = scores[crop]
        # (batch, channels, h, w) -> (channels, batch, h, w), a view: copying it would cost
        # as much as a light model's run (0.5 s for 300 x 3 x 512^2 scores)
        yield start, stop, np.moveaxis(scores, 0, 1)
