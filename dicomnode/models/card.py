"""Model cards: what a model package in ``models/NAME/`` declares, validated early.

A package is a folder holding ``card.yaml``, the ONNX file the card names and a
licence file.  :func:`load_card` reads and validates the card and raises
:class:`CardError` with one line per problem, naming the file, the line, the key,
what is wrong and what is allowed, like the node's configuration.  The node and its
workers read cards through :func:`cached_card`: parsed once per process, again only when
``card.yaml``, the ONNX file or the licence files change (size, mtime, inode).

Axes and units used throughout:

* Image axes are SimpleITK's ``x, y, z`` (x along a row, i.e. the column index;
  y along a column, the row index; z the slice index).  A numpy array of an image
  is indexed ``[z, y, x]``.
* Spacings and margins are in mm, ``[x, y, z]``; volumes in mL.
* ``preprocessing.axes`` says how the model's spatial tensor axes map onto the
  image: ``zyx`` (default) feeds the numpy array as is, ``xyz`` transposes it.
  ``patch_size`` is given in the model's spatial axis order.
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dicomnode.config import format_validation_errors, read_yaml_mapping

__all__ = [
    "CARDS",
    "CARD_FILE",
    "RESEARCH_MARK",
    "Card",
    "CardCache",
    "CardError",
    "Code",
    "CropSpec",
    "FileStat",
    "InputSpec",
    "IntensitySpec",
    "LabelSpec",
    "ModelStatus",
    "OutputSpec",
    "PadSpec",
    "PostprocessingSpec",
    "PreprocessingSpec",
    "RuntimeSpec",
    "cached_card",
    "file_stat",
    "load_card",
    "package_dir",
]

CARD_FILE = "card.yaml"
LICENCE_FILES = ("LICENSE", "LICENSE.txt", "LICENCE", "COPYING")

_ORIENTATION = re.compile(r"^(?=.*[LR])(?=.*[AP])(?=.*[SI])[LRAPSI]{3}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
RT_ROI_INTERPRETED_TYPES = (
    "EXTERNAL", "PTV", "CTV", "GTV", "TREATED_VOLUME", "IRRAD_VOLUME", "OAR", "BOLUS",
    "AVOIDANCE", "ORGAN", "MARKER", "REGISTRATION", "ISOCENTER", "CONTRAST_AGENT", "CAVITY",
    "BRACHY_CHANNEL", "BRACHY_ACCESSORY", "BRACHY_SRC_APP", "BRACHY_CHNL_SHLD", "SUPPORT",
    "FIXATION", "DOSE_REGION", "CONTROL", "DOSE_MEASUREMENT",
)  # fmt: skip
"""PS3.3 C.8.8.8.1 defined terms of RT ROI Interpreted Type (3006,00A4)."""
MEASUREMENTS = ("volume_ml", "voxel_count")


class CardError(Exception):
    """A model package that cannot be used; one line per problem."""


class ModelStatus(str, enum.Enum):
    """A model's approval (the card's ``status``), as MONAI Deploy's clinical, research and
    QA workflows distinguish them (docs/model-cards.md, "Model approval").

    * ``clinical``: approved for clinical use at this site; its results may go to any peer.
    * ``research``: its results go only to research peers (``research: true`` or
      ``pseudonymize: true``) and carry :data:`RESEARCH_MARK`.
    * ``qa``: on trial (shadow mode) before approval: like ``research`` (kept in the node,
      reviewable in the console, sent to research peers only, marked), never to a clinical
      peer.

    A card without ``status`` is ``research``: a model is clinical only when someone says so.
    """

    CLINICAL = "clinical"
    RESEARCH = "research"
    QA = "qa"


#: What every result of a model that is not ``clinical`` says (SeriesDescription, the SR's
#: content, the RTSTRUCT's description).
RESEARCH_MARK = "RESEARCH - NOT FOR CLINICAL USE"


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Code(_Spec):
    """A coded concept (PS3.3 Code Sequence Macro): scheme designator, value, meaning."""

    scheme: str = Field(min_length=1, max_length=16)
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)

    @field_validator("scheme")
    @classmethod
    def _scheme(cls, v: str) -> str:
        if v == "SRT":
            raise ValueError("SRT (SNOMED-RT) is retired: use scheme SCT with the SNOMED CT code")
        return v


class InputSpec(_Spec):
    """One input of the model: the name a rule binds a series to, and its modality."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    modality: str = Field(min_length=1, max_length=16, pattern=r"^[A-Z0-9]+$")


class CropSpec(_Spec):
    """Crop the (oriented) image before resampling; the result is pasted back afterwards.

    ``to: body`` keeps the bounding box of the largest connected region above
    ``threshold`` (e.g. -500 HU for a CT body outline); ``to: bbox`` keeps the
    bounding box of every voxel above ``threshold``.  ``margin_mm`` is added on each
    side.
    """

    to: Literal["none", "body", "bbox"] = "none"
    threshold: float = 0.0
    margin_mm: float = Field(0.0, ge=0)


class IntensitySpec(_Spec):
    """Intensity normalisation of each input channel, on the model grid.

    * ``window``: clip to ``window`` = [low, high] (e.g. HU), then scale to [0, 1] when
      ``rescale`` is true.
    * ``zscore``: subtract the mean and divide by the standard deviation (of the
      voxels above ``threshold`` when ``threshold`` is set).
    * ``percentile``: clip to the ``percentiles`` [low, high] (0..100), scale to [0, 1].
    * ``divide_max``: divide by the maximum (e.g. deepbrain's ``img / max``).
    * ``none``: feed the modality values (HU for CT) unchanged.
    """

    method: Literal["none", "window", "zscore", "percentile", "divide_max"] = "none"
    window: tuple[float, float] | None = None
    rescale: bool = False
    percentiles: tuple[float, float] | None = None
    threshold: float | None = None

    @model_validator(mode="after")
    def _consistent(self) -> IntensitySpec:
        if self.method == "window":
            if self.window is None:
                raise ValueError("method window needs window: [low, high]")
            if not self.window[0] < self.window[1]:
                raise ValueError(f"window low must be below high (got {list(self.window)})")
        elif self.window is not None:
            raise ValueError(f"window is only used with method window, not {self.method}")
        if self.method == "percentile":
            if self.percentiles is None:
                raise ValueError("method percentile needs percentiles: [low, high]")
            low, high = self.percentiles
            if not 0 <= low < high <= 100:
                raise ValueError(
                    f"percentiles must satisfy 0 <= low < high <= 100 (got {[low, high]})"
                )
        elif self.percentiles is not None:
            raise ValueError(f"percentiles is only used with method percentile, not {self.method}")
        return self


class PadSpec(_Spec):
    """Padding of the model's input at the end of each spatial axis, removed from the output.

    Each spatial axis (in the model's axis order) is padded after its last voxel up to the
    next multiple of ``multiple`` and at least to ``min_size``, with the constant ``value``
    (in normalised units: the padding follows the intensity normalisation), as HD-BET's
    ``pad_patient_3D`` does for networks whose down-sampling needs sizes divisible by 16.
    Test-time flips see the padded input; the scores are cropped back afterwards.
    """

    multiple: int = Field(1, ge=1, le=1024)
    min_size: tuple[int, ...] | None = None
    value: float = 0.0

    @field_validator("min_size")
    @classmethod
    def _min_size(cls, v: tuple[int, ...] | None) -> tuple[int, ...] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"min_size must be positive voxel counts (got {list(v)})")
        return v

    def padded(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The spatial ``shape`` after padding."""
        sizes = [-(-int(s) // self.multiple) * self.multiple for s in shape]
        if self.min_size is not None:
            sizes = [max(s, m) for s, m in zip(sizes, self.min_size, strict=True)]
        return tuple(sizes)


class PreprocessingSpec(_Spec):
    """How a series becomes the model's input tensor (see the module docstring for axes)."""

    orientation: str | None = None
    spacing: tuple[float, float, float] | None = None
    resize: tuple[int, int, int] | None = None
    antialias: bool = True
    allow_irregular_spacing: bool = False
    crop: CropSpec = CropSpec()
    intensity: IntensitySpec = IntensitySpec()
    dimensionality: Literal["2d", "2.5d", "3d"] = "3d"
    context_slices: int = Field(0, ge=0, le=16)
    axes: Literal["zyx", "xyz"] = "zyx"
    patch_size: tuple[int, ...] | None = None
    overlap: float = Field(0.5, ge=0.0, lt=1.0)
    blending: Literal["constant", "gaussian"] = "gaussian"
    tta_flips: tuple[tuple[int, ...], ...] = ()
    batch_size: int = Field(1, ge=1, le=4096)
    pad: PadSpec | None = None

    @field_validator("orientation")
    @classmethod
    def _orientation(cls, v: str | None) -> str | None:
        if v is not None and not _ORIENTATION.match(v):
            raise ValueError(
                f"{v!r} is not an orientation code: three letters naming the patient direction "
                "each image axis x, y, z points to, one of L/R, A/P, S/I each (e.g. LPS, RAS)"
            )
        return v

    @field_validator("spacing")
    @classmethod
    def _spacing(cls, v: tuple[float, float, float] | None) -> tuple[float, float, float] | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"spacing must be positive mm [x, y, z] (got {list(v)})")
        return v

    @field_validator("resize")
    @classmethod
    def _resize(cls, v: tuple[int, int, int] | None) -> tuple[int, int, int] | None:
        if v is not None and min(v) < 1:
            raise ValueError(f"resize must be positive voxel counts [x, y, z] (got {list(v)})")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> PreprocessingSpec:
        if self.spacing is not None and self.resize is not None:
            raise ValueError("give either spacing or resize, not both")
        spatial = self.spatial_dims
        if self.patch_size is not None:
            if len(self.patch_size) != spatial:
                raise ValueError(
                    f"patch_size needs {spatial} sizes for a {self.dimensionality} model "
                    f"(got {list(self.patch_size)})"
                )
            if min(self.patch_size) < 1:
                raise ValueError(f"patch_size must be positive (got {list(self.patch_size)})")
        if self.pad is not None and self.pad.min_size is not None and (
            len(self.pad.min_size) != spatial
        ):
            raise ValueError(
                f"pad.min_size needs {spatial} sizes for a {self.dimensionality} model "
                f"(got {list(self.pad.min_size)})"
            )
        if self.context_slices and self.dimensionality != "2.5d":
            raise ValueError("context_slices is only used with dimensionality 2.5d")
        if self.dimensionality == "2.5d" and not self.context_slices:
            raise ValueError("dimensionality 2.5d needs context_slices >= 1")
        for flip in self.tta_flips:
            if not flip or any(not 0 <= a < spatial for a in flip) or len(set(flip)) != len(flip):
                raise ValueError(
                    f"each tta_flips entry lists distinct spatial axes 0..{spatial - 1} of the "
                    f"model's input (got {list(flip)})"
                )
        return self

    @property
    def spatial_dims(self) -> int:
        """2 for slice models (2d, 2.5d), 3 for volume models."""
        return 3 if self.dimensionality == "3d" else 2

    @property
    def slices_per_input(self) -> int:
        """Slices each input contributes as channels: the slice and its context (1 unless 2.5d)."""
        return 2 * self.context_slices + 1


class PostprocessingSpec(_Spec):
    """Clean-up of one structure's mask on the source grid.

    ``largest_components`` keeps that many largest connected regions (0 keeps all);
    ``fill_holes`` fills enclosed holes per slice (``slice``, in the source series'
    slice planes) or in 3D (``volume``); ``min_volume_ml`` drops regions smaller
    than that many mL.
    """

    largest_components: int = Field(0, ge=0)
    fill_holes: Literal["none", "slice", "volume"] = "none"
    min_volume_ml: float = Field(0.0, ge=0)


class LabelSpec(_Spec):
    """One structure the model segments."""

    value: int = Field(ge=1, le=255)
    channel: int | None = Field(None, ge=0)
    name: str = Field(min_length=1, max_length=64)
    # other names the structure has in objects sent back (a planning system's naming):
    # the feedback loop compares a received structure of one of these names with it
    aliases: tuple[str, ...] = ()
    rt_roi_interpreted_type: str = "ORGAN"
    color: tuple[int, int, int]
    category: Code
    type: Code
    postprocessing: PostprocessingSpec = PostprocessingSpec()
    # set by an importer when it could not map the label to a code (``models check`` lists it)
    needs_review: bool = False

    @field_validator("color")
    @classmethod
    def _color(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        if not all(0 <= c <= 255 for c in v):
            raise ValueError(f"color is [red, green, blue], each 0..255 (got {list(v)})")
        return v

    @field_validator("rt_roi_interpreted_type")
    @classmethod
    def _interpreted_type(cls, v: str) -> str:
        if v not in RT_ROI_INTERPRETED_TYPES:
            raise ValueError(
                f"{v!r} is not an RT ROI Interpreted Type; allowed: "
                + ", ".join(RT_ROI_INTERPRETED_TYPES)
            )
        return v


class OutputSpec(_Spec):
    """How the model's output becomes structures.

    ``activation`` is applied by the node to the output tensor (``none`` when the
    model already outputs probabilities).  ``decision: threshold`` makes each label
    the voxels whose ``channel`` exceeds ``threshold`` (labels may overlap);
    ``decision: argmax`` gives each voxel the channel with the largest value, and a
    label's ``value`` is its channel (channel 0 is background).
    """

    activation: Literal["none", "sigmoid", "softmax"] = "none"
    decision: Literal["threshold", "argmax"] = "threshold"
    threshold: float = 0.5
    labels: tuple[LabelSpec, ...] = Field(min_length=1)
    # the DICOM SEG type for this model; None leaves it to the configuration (outputs.seg_type)
    seg_type: Literal["binary", "labelmap"] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> OutputSpec:
        values = [label.value for label in self.labels]
        if len(set(values)) != len(values):
            raise ValueError(f"label values must be distinct (got {values})")
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError(f"label names must be distinct (got {names})")
        if self.decision == "threshold":
            missing = [label.name for label in self.labels if label.channel is None]
            if missing:
                raise ValueError(
                    f"decision threshold needs a channel for every label (missing: {missing})"
                )
        else:
            wrong = [
                label.name for label in self.labels if label.channel not in (None, label.value)
            ]
            if wrong:
                raise ValueError(
                    f"with decision argmax a label's channel is its value (wrong: {wrong})"
                )
            if self.activation == "sigmoid":
                raise ValueError("decision argmax goes with activation softmax or none")
        return self

    def channel_of(self, label: LabelSpec) -> int:
        """The output channel holding ``label``'s score."""
        return label.value if label.channel is None else label.channel

    @property
    def channels_needed(self) -> int:
        """The fewest output channels the model must give: the highest label channel + 1."""
        return max(self.channel_of(label) for label in self.labels) + 1


class RuntimeSpec(_Spec):
    """How the model may be run.

    ``fp16``: its outputs were checked in half precision, so TensorRT may build it in fp16
    where the node's ``inference.tensorrt_fp16`` lets it (float32 otherwise).

    ``max_concurrent``: how many of its jobs a node runs at once (e.g. 1 for a model that
    fills a GPU's memory); None: the node decides (``pipeline.model_concurrency``, else 1 for
    a model whose session runs on a GPU, else ``pipeline.workers``; see
    :mod:`dicomnode.jobs.policy`).
    """

    fp16: bool = False
    max_concurrent: int | None = Field(None, ge=1, le=64)


class Card(_Spec):
    """A validated model card (``models/NAME/card.yaml``)."""

    name: str
    version: str = Field(min_length=1, max_length=64)
    description: str = Field(min_length=1)
    intended_use: str = Field(min_length=1)
    license: str = Field(min_length=1)
    authors: tuple[str, ...] = Field(min_length=1)
    source: str = Field(min_length=1)
    rule_based: bool = False
    # approval: only clinical models' results may go to clinical peers (ModelStatus)
    status: ModelStatus = ModelStatus.RESEARCH
    file: str = "model.onnx"
    sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    onnx_input: str | None = None
    onnx_output: str | None = None
    inputs: tuple[InputSpec, ...] = Field(min_length=1)
    preprocessing: PreprocessingSpec = PreprocessingSpec()
    outputs: OutputSpec
    measurements: tuple[Literal["volume_ml", "voxel_count"], ...] = ("volume_ml", "voxel_count")
    runtime: RuntimeSpec = RuntimeSpec()
    # a framework profile (dicomnode.inference.profiles): the framework's own pre-processing,
    # sliding windows and way back, with its parameters; validated by the profile's module
    profile: dict[str, Any] | None = None
    package: Path = Field(Path("."), exclude=True)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(
                f"{v!r} is not a model name: lower-case letters, digits, '.', '_' and '-', "
                "starting with a letter or digit, at most 64 characters"
            )
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Card:
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"input names must be distinct (got {names})")
        if "volume_ml" not in self.measurements:
            raise ValueError("measurements must include volume_ml")
        if self.profile is not None:
            from dicomnode.models.plans import validate

            validate(self)
        return self

    @property
    def clinical(self) -> bool:
        """Whether the model is approved for clinical use (``status: clinical``)."""
        return self.status is ModelStatus.CLINICAL

    @property
    def input_names(self) -> tuple[str, ...]:
        """The names a rule binds series to, in the model's channel order."""
        return tuple(i.name for i in self.inputs)

    @property
    def model_path(self) -> Path:
        """The ONNX file of this package."""
        return self.package / self.file

    @property
    def input_channels(self) -> int:
        """Channels of the model's input tensor: inputs times slices of context."""
        return len(self.inputs) * self.preprocessing.slices_per_input


def package_dir(models_dir: Path, name_or_path: str | Path) -> Path:
    """The package folder for a model name (under ``models_dir``) or a folder path."""
    candidate = Path(name_or_path)
    if candidate.is_dir() and (candidate / CARD_FILE).is_file():
        return candidate.resolve()
    return (Path(models_dir) / str(name_or_path)).resolve()


def file_sha256(path: Path) -> str:
    """The SHA-256 hex digest of ``path``, hashed once per process while unchanged.

    The digest is cached on the resolved path, size, modification time and inode, so
    that each job's :func:`load_card` does not re-read the model; a replaced file (new
    size, mtime or inode) is hashed again.
    """
    resolved = path.resolve()
    stat = resolved.stat()
    return _cached_sha256((str(resolved), stat.st_size, stat.st_mtime_ns, stat.st_ino))


@lru_cache(maxsize=64)
def _cached_sha256(key: tuple[str, int, int, int]) -> str:
    """Hash the file named by ``key`` = (resolved path, st_size, st_mtime_ns, st_ino)."""
    digest = hashlib.sha256()
    with Path(key[0]).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_card(package: str | Path, *, verify_files: bool = True) -> Card:
    """Read and validate ``package/card.yaml``.

    With ``verify_files`` the ONNX file must exist (and match ``sha256`` when the card
    gives one), the package must hold a licence file, and the card's ``name`` must be
    the folder's name.

    Raises:
        CardError: one line per problem, ``file:line: key: message``.
    """
    folder = Path(package)
    card_path = folder / CARD_FILE
    text, data = read_yaml_mapping(card_path, "model card", CardError)
    if "package" in data:
        raise CardError(f"{card_path}: package: not a card key")
    try:
        card = Card.model_validate({**data, "package": folder.resolve()})
    except ValidationError as exc:
        raise CardError(format_validation_errors(str(card_path), text, exc, Card)) from None
    if verify_files:
        problems = _package_problems(card, folder)
        if problems:
            raise CardError("\n".join(f"{card_path}: {p}" for p in problems))
    return card


def _package_problems(card: Card, folder: Path) -> Sequence[str]:
    problems = []
    if card.name != folder.resolve().name:
        problems.append(f"name: {card.name!r} differs from the package folder {folder.name!r}")
    model = folder / card.file
    if not model.is_file():
        problems.append(f"file: {card.file!r} not found in {folder}")
    elif card.sha256 is not None and file_sha256(model) != card.sha256:
        problems.append(f"sha256: {card.file} does not match the card's checksum")
    if not any((folder / name).is_file() for name in LICENCE_FILES):
        problems.append(f"the package holds no licence file (one of: {', '.join(LICENCE_FILES)})")
    return problems


FileStat = tuple[int, int, int] | None
"""(st_mtime_ns, st_size, st_ino) of a file, None when it is missing."""


def file_stat(path: Path) -> FileStat:
    """What says a file changed: (st_mtime_ns, st_size, st_ino); None when missing."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size, stat.st_ino)


@dataclass(frozen=True)
class _CachedCard:
    fingerprint: tuple[FileStat, ...]
    model_file: str | None  # the card's ``file`` (None: the card did not parse)
    card: Card | None
    error: CardError | None


class CardCache:
    """Cards parsed once per process and again only when their files change.

    A card is re-read when ``card.yaml`` changes and, with ``verify_files``, when the ONNX
    file it names or a licence file appears, disappears or changes (size, mtime, inode). A
    card that is not valid raises the same :class:`CardError` as :func:`load_card` each
    time it is asked for, without being parsed again while unchanged. Thread-safe.
    ``parses`` counts the cards read.
    """

    def __init__(self) -> None:
        self._entries: dict[tuple[str, bool], _CachedCard] = {}
        self._lock = threading.Lock()
        self.parses = 0

    @staticmethod
    def _fingerprint(folder: Path, model_file: str | None,
                     verify_files: bool) -> tuple[FileStat, ...]:
        stats = [file_stat(folder / CARD_FILE)]
        if verify_files:
            stats.append(None if model_file is None else file_stat(folder / model_file))
            stats.extend(file_stat(folder / name) for name in LICENCE_FILES)
        return tuple(stats)

    def get(self, package: str | Path, *, verify_files: bool = True) -> Card:
        """The validated card of ``package`` (see :func:`load_card`).

        Raises:
            CardError: as :func:`load_card`.
        """
        folder = Path(package)
        key = (str(folder.resolve()), verify_files)
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or entry.fingerprint != self._fingerprint(
                folder, entry.model_file, verify_files):
            entry = self._parse(folder, key, verify_files)
        if entry.error is not None:
            raise CardError(str(entry.error))
        assert entry.card is not None
        return entry.card

    def _parse(self, folder: Path, key: tuple[str, bool], verify_files: bool) -> _CachedCard:
        before = file_stat(folder / CARD_FILE)
        try:
            card: Card | None = load_card(folder, verify_files=verify_files)
            error = None
        except CardError as exc:
            card, error = None, exc
            if not verify_files or before is None:
                model_file = None
            else:  # a card that parses names its file even when the package is incomplete
                try:
                    model_file = load_card(folder, verify_files=False).file
                except CardError:
                    model_file = None
        if card is not None:
            model_file = card.file
        fingerprint = self._fingerprint(folder, model_file, verify_files)
        if fingerprint[0] != before:  # written while being read: read again next time
            fingerprint = (None, *fingerprint[1:])
        entry = _CachedCard(fingerprint, model_file, card, error)
        with self._lock:
            self.parses += 1
            self._entries[key] = entry
        return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


#: The process's card cache (the node, its workers).
CARDS = CardCache()


def cached_card(package: str | Path, *, verify_files: bool = True) -> Card:
    """:func:`load_card` through the process's :class:`CardCache` (:data:`CARDS`)."""
    return CARDS.get(package, verify_files=verify_files)
