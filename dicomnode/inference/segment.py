"""One model run: source volume(s) -> structures on the source grid, with timings.

:func:`segment` is the whole inference step of the pipeline: pre-processing as
the card says, ONNX Runtime (cached session, configured providers), sliding
windows or slices, activation, decision, resampling back onto the source grid
and per-label clean-up.  The result holds one boolean mask per structure on the
grid of the first input (same size, origin, spacing and direction), plus the
volumes the card asks to measure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from pydicom.dataset import Dataset

from dicomnode.inference.card import Card, LabelSpec
from dicomnode.inference.postprocess import clean_mask, decide_slab, to_source
from dicomnode.inference.predict import InferenceError, predict
from dicomnode.inference.preprocess import prepare
from dicomnode.inference.runtime import open_card_session
from dicomnode.inference.volume import SeriesVolume, read_series

__all__ = ["Geometry", "Segmentation", "Structure", "Timings", "load_inputs", "segment"]

BoolArray = npt.NDArray[np.bool_]
FloatArray = npt.NDArray[np.float32]


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


@dataclass(frozen=True)
class Structure:
    """One segmented structure: its card entry and its mask on the source grid."""

    label: LabelSpec
    mask: BoolArray
    voxel_count: int
    volume_ml: float


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

    def label_map(self) -> npt.NDArray[np.uint8]:
        """One label value per voxel ([z, y, x]); where structures overlap the later
        label in the card wins (e.g. Bone and Lungs drawn over External)."""
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

    masks: dict[int, BoolArray]
    slabs = predict(
        model_input.tensor,
        run,
        card.preprocessing,
        outputs,
        input_shape=session.input_shape,
    )
    if model_input.identity:
        masks = {
            label.value: np.zeros(geometry.size[::-1], dtype=bool) for label in outputs.labels
        }
        for start, stop, scores in slabs:
            for value, decided in decide_slab(scores, outputs).items():
                masks[value][start:stop] = decided
        t = time.perf_counter()
    else:
        spatial = model_input.tensor.shape[1:]
        full: FloatArray | None = None
        for start, stop, scores in slabs:
            if full is None:
                full = np.zeros((scores.shape[0], *spatial), dtype=np.float32)
            full[:, start:stop] = scores
        assert full is not None
        t = time.perf_counter()
        masks = to_source(full, model_input.grid, model_input.axes, source, outputs)
        del full
    del model_input
    spacing = geometry.spacing
    voxel_ml = float(np.prod(spacing)) / 1000.0
    structures = []
    for label in outputs.labels:
        mask = clean_mask(masks.pop(label.value), spacing, label.postprocessing)
        count = int(np.count_nonzero(mask))
        structures.append(Structure(label, mask, count, count * voxel_ml))
    timings.postprocess = time.perf_counter() - t
    timings.total = time.perf_counter() - started
    return Segmentation(card, geometry, tuple(structures), session.provider, timings)
