"""One model run: source volume(s) -> structures on the source grid, with timings.

:func:`segment` is the whole inference step of the pipeline: pre-processing as
the card says, ONNX Runtime (cached session, configured providers), sliding
windows or slices, activation, decision, resampling back onto the source grid
and per-label clean-up.  The result holds each structure's voxels on the
grid of the first input (same size, origin, spacing and direction), plus the
volumes the card asks to measure.

Structures that cannot overlap (an argmax decision, a framework's label map) are
views of one shared label map ([z, y, x], one byte per voxel) rather than one
boolean volume each: a 118-class model then holds one label map on the source grid,
not 118 masks (9.3 GB for a 300 x 512 x 512 CT). Writers take such a segmentation
plane by plane (:meth:`Structure.plane`) or as the label map itself
(:meth:`Segmentation.shared_label_map`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicomnode.inference.postprocess import (
    argmax_slab,
    argmax_to_source,
    clean_mask,
    decide_slab,
    to_source,
)
from dicomnode.inference.predict import InferenceError, predict
from dicomnode.inference.preprocess import prepare
from dicomnode.inference.runtime import open_card_session
from dicomnode.inference.volume import SeriesVolume, read_series
from dicomnode.models.card import Card, LabelSpec, PostprocessingSpec

__all__ = ["Geometry", "LabelMask", "Segmentation", "Structure", "Timings", "load_inputs",
           "segment", "structures_of_label_map"]

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class Geometry:
    """A grid in DICOM LPS: size [x, y, z] voxels, origin and spacing (mm), direction."""

    size: tuple[int, int, int]
    origin: tuple[float, float, float]
    spacing: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> Geometry:
        return cls(
            tuple(int(v) for v in image.GetSize()),  # type: ignore[arg-type]
            tuple(float(v) for v in image.GetOrigin()),  # type: ignore[arg-type]
            tuple(float(v) for v in image.GetSpacing()),  # type: ignore[arg-type]
            tuple(float(v) for v in image.GetDirection()),
        )

    def image_from(self, array: npt.NDArray[Any]) -> sitk.Image:
        """``array`` (indexed [z, y, x]) as an image on this grid."""
        image = sitk.GetImageFromArray(array)
        image.SetOrigin(self.origin)
        image.SetSpacing(self.spacing)
        image.SetDirection(self.direction)
        return image


class LabelMask:
    """The voxels of one value of a label map, as a read-only boolean volume computed
    only where it is indexed: ``view[z]`` is one plane (``labels[z] == value``), and
    ``numpy.asarray(view)`` the whole boolean volume (one byte per voxel, made on demand).
    """

    __slots__ = ("labels", "value")

    def __init__(self, labels: LabelArray, value: int) -> None:
        if labels.ndim != 3:
            raise ValueError(f"a label map is 3D [z, y, x], got {labels.ndim}D")
        self.labels = labels
        self.value = int(value)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.labels.shape)

    @property
    def ndim(self) -> int:
        return 3

    @property
    def dtype(self) -> np.dtype[np.bool_]:
        return np.dtype(np.bool_)

    def __getitem__(self, index: Any) -> BoolArray:
        return np.asarray(self.labels[index] == self.value)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> npt.NDArray[Any]:
        mask = np.equal(self.labels, self.value)
        return mask if dtype is None else mask.astype(dtype)


@dataclass(frozen=True)
class Structure:
    """One segmented structure: its card entry and its voxels on the source grid.

    ``voxels`` is its own boolean volume ([z, y, x]) or a :class:`LabelMask` of a label
    map shared with the other structures of its segmentation.
    """

    label: LabelSpec
    voxels: BoolArray | LabelMask
    voxel_count: int
    volume_ml: float

    @property
    def mask(self) -> BoolArray:
        """The boolean volume [z, y, x] (made on demand from a shared label map: one
        byte per voxel; writers use :meth:`plane` instead)."""
        return np.asarray(self.voxels, dtype=bool)

    def plane(self, z: int) -> BoolArray:
        """The boolean plane ``z`` [y, x] of the source grid."""
        return np.asarray(self.voxels[z], dtype=bool)

    @property
    def shape(self) -> tuple[int, ...]:
        """The source grid's [z, y, x] size."""
        return tuple(self.voxels.shape)


@dataclass
class Timings:
    """Seconds spent in each step of one run (wall clock)."""

    preprocess: float = 0.0
    session_run: float = 0.0
    postprocess: float = 0.0
    total: float = 0.0


@dataclass
class Segmentation:
    """The outcome of :func:`segment`."""

    card: Card
    geometry: Geometry
    structures: tuple[Structure, ...]
    provider: str
    timings: Timings = field(default_factory=Timings)

    def shared_label_map(self) -> LabelArray | None:
        """The label map ([z, y, x], card label values) every structure is a view of, or
        None when a structure has voxels of its own (overlapping decisions)."""
        if not self.structures:
            return None
        first = self.structures[0].voxels
        if not isinstance(first, LabelMask):
            return None
        for structure in self.structures:
            voxels = structure.voxels
            if not isinstance(voxels, LabelMask) or voxels.labels is not first.labels:
                return None
        return first.labels

    def label_map(self) -> npt.NDArray[np.uint8]:
        """One label value per voxel ([z, y, x]); where structures overlap the later
        label in the card wins (e.g. Bone and Lungs drawn over External)."""
        shared = self.shared_label_map()
        if shared is not None:  # values the card does not list become background
            lut = np.zeros(256, dtype=np.uint8)
            for structure in self.structures:
                lut[structure.label.value] = structure.label.value
            return lut[shared]
        out = np.zeros(self.geometry.size[::-1], dtype=np.uint8)
        for structure in self.structures:
            out[structure.mask] = structure.label.value
        return out

    def label_image(self) -> sitk.Image:
        """:meth:`label_map` as an image on the source grid."""
        return self.geometry.image_from(self.label_map())

    def measurements(self) -> dict[str, Any]:
        """Per-structure measurements as JSON-ready data (volumes in mL)."""
        rows = []
        for s in self.structures:
            row: dict[str, Any] = {"label": s.label.value, "name": s.label.name}
            if "volume_ml" in self.card.measurements:
                row["volume_ml"] = round(s.volume_ml, 3)
            if "voxel_count" in self.card.measurements:
                row["voxel_count"] = s.voxel_count
            rows.append(row)
        return {
            "model": {"name": self.card.name, "version": self.card.version},
            "provider": self.provider,
            "voxel_spacing_mm": list(self.geometry.spacing),
            "grid_size": list(self.geometry.size),
            "structures": rows,
            "overlapping": self.card.outputs.decision == "threshold" and len(rows) > 1,
        }


def structures_of_label_map(labels: Sequence[LabelSpec], label_map: LabelArray,
                             spacing_xyz: tuple[float, float, float]) -> tuple[Structure, ...]:
    """One structure per card label, each a :class:`LabelMask` of ``label_map`` ([z, y, x]
    card label values on the source grid, with ``spacing_xyz`` in mm), cleaned as its
    label's ``postprocessing`` says.

    ``label_map`` is taken over and changed in place by the cleaning: voxels a label's
    cleaning drops become background, holes it fills in background take its value. A
    fill that would cover another label's voxels keeps that structure's cleaned mask as
    its own (structures may then overlap, as with separate masks), and leaves the map as
    it is for that structure.
    """
    if label_map.dtype != np.uint8 or label_map.ndim != 3:
        raise ValueError(f"a label map is 3D uint8 [z, y, x], got {label_map.ndim}D "
                         f"{label_map.dtype}")
    voxel_ml = float(np.prod(spacing_xyz)) / 1000.0
    counts = np.bincount(label_map.reshape(-1), minlength=256)
    structures = []
    for label in labels:
        count = int(counts[label.value])
        voxels: BoolArray | LabelMask = LabelMask(label_map, label.value)
        if count and label.postprocessing != PostprocessingSpec():
            mask = label_map == label.value
            cleaned = clean_mask(mask, spacing_xyz, label.postprocessing)
            added = cleaned & ~mask
            if added.any() and np.any(label_map[added] != 0):
                voxels = cleaned  # a filled hole over another structure: its own mask
            else:
                label_map[mask & ~cleaned] = 0
                label_map[added] = label.value
            count = int(np.count_nonzero(cleaned))
            del mask, cleaned, added
        structures.append(Structure(label, voxels, count, count * voxel_ml))
    return tuple(structures)


def load_inputs(
    card: Card,
    series: Mapping[str, Sequence[str | os.PathLike[str]]],
    datasets: Mapping[str, Sequence[Dataset]] | None = None,
) -> list[SeriesVolume]:
    """Read one series per card input (``{input name: files}``), in the card's order.

    ``datasets`` (``{input name: datasets of its files, in their order}``) gives them
    already read, e.g. pseudonymized in memory; the files are then not read again (see
    :func:`dicomnode.inference.volume.read_series`).

    Raises:
        InferenceError: an input is missing or extra, or a series' modality is not
            the one the card declares.
        VolumeError: a series is not one regular volume.
    """
    names = set(series)
    expected = card.input_names
    if names != set(expected):
        raise InferenceError(
            f"model {card.name} takes inputs {', '.join(expected)}; "
            f"got {', '.join(sorted(names)) or 'none'}"
        )
    volumes = []
    for spec in card.inputs:
        volume = read_series(
            series[spec.name], resample_irregular=card.preprocessing.allow_irregular_spacing,
            datasets=datasets.get(spec.name) if datasets is not None else None,
        )
        if volume.modality != spec.modality:
            raise InferenceError(
                f"input {spec.name} of model {card.name} takes {spec.modality} images; "
                f"the series is {volume.modality or 'of no modality'}"
            )
        volumes.append(volume)
    return volumes


def segment(
    card: Card,
    volumes: Sequence[sitk.Image],
    *,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    intra_op_threads: int = 0,
) -> Segmentation:
    """Run ``card``'s model on ``volumes`` (one image per input, in the card's order).

    Raises:
        InferenceError: the model's input or output does not fit the card.
        PreprocessingError: pre-processing cannot build the model's input.
    """
    if len(volumes) != len(card.inputs):
        raise InferenceError(
            f"model {card.name} takes {len(card.inputs)} input(s), got {len(volumes)}"
        )
    if card.profile is not None:  # the framework's own way (nnU-Net, MONAI)
        from dicomnode.inference.profiles import segment_with_profile

        return segment_with_profile(card, volumes, providers=providers,
                                    intra_op_threads=intra_op_threads)
    started = time.perf_counter()
    timings = Timings()
    session = open_card_session(card, providers=providers, intra_op_threads=intra_op_threads)
    t = time.perf_counter()
    model_input = prepare(volumes, card.preprocessing)
    timings.preprocess = time.perf_counter() - t
    source = volumes[0]
    geometry = Geometry.of(source)
    outputs = card.outputs
    needed = outputs.channels_needed

    def run(batch: FloatArray) -> FloatArray:
        t0 = time.perf_counter()
        with session.lock:
            raw = session.run(batch)
        timings.session_run += time.perf_counter() - t0
        if raw.ndim != batch.ndim or raw.shape[0] != batch.shape[0]:
            raise InferenceError(
                f"model {card.name} returned shape {list(raw.shape)} for a batch of shape "
                f"{list(batch.shape)}: expected (batch, channels, same spatial size)"
            )
        if raw.shape[1] < needed:
            raise InferenceError(
                f"model {card.name} outputs {raw.shape[1]} channel(s) but the card's labels "
                f"use channel {needed - 1}"
            )
        return np.asarray(raw, dtype=np.float32)

    slabs = predict(
        model_input.tensor,
        run,
        card.preprocessing,
        outputs,
        input_shape=session.input_shape,
    )
    spacing = geometry.spacing
    structures: tuple[Structure, ...]
    if outputs.decision == "argmax":  # disjoint: one shared label map
        if model_input.identity:
            winner = np.zeros(geometry.size[::-1], dtype=np.uint8)
            for start, stop, scores in slabs:
                winner[start:stop] = argmax_slab(scores, outputs)
            t = time.perf_counter()
        else:
            full = _gather(slabs, model_input.tensor.shape[1:])
            t = time.perf_counter()
            winner = argmax_to_source(full, model_input.grid, model_input.axes, source, outputs)
            del full
        del model_input
        structures = structures_of_label_map(outputs.labels, winner, spacing)
    else:
        masks: dict[int, BoolArray]
        if model_input.identity:
            masks = {
                label.value: np.zeros(geometry.size[::-1], dtype=bool)
                for label in outputs.labels
            }
            for start, stop, scores in slabs:
                for value, decided in decide_slab(scores, outputs).items():
                    masks[value][start:stop] = decided
            t = time.perf_counter()
        else:
            full = _gather(slabs, model_input.tensor.shape[1:])
            t = time.perf_counter()
            masks = to_source(full, model_input.grid, model_input.axes, source, outputs)
            del full
        del model_input
        voxel_ml = float(np.prod(spacing)) / 1000.0
        cleaned = []
        for label in outputs.labels:
            mask = clean_mask(masks.pop(label.value), spacing, label.postprocessing)
            count = int(np.count_nonzero(mask))
            cleaned.append(Structure(label, mask, count, count * voxel_ml))
        structures = tuple(cleaned)
    timings.postprocess = time.perf_counter() - t
    timings.total = time.perf_counter() - started
    return Segmentation(card, geometry, structures, session.provider, timings)


def _gather(slabs: Iterable[tuple[int, int, FloatArray]],
            spatial: tuple[int, ...]) -> FloatArray:
    """The slabs' scores as one array (channels, *spatial) on the model grid."""
    full: FloatArray | None = None
    for start, stop, scores in slabs:
        if full is None:
            full = np.zeros((scores.shape[0], *spatial), dtype=np.float32)
        full[:, start:stop] = scores
    if full is None:
        raise InferenceError("the model produced no scores")
    return full
