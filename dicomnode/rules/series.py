"""The neutral view of a series that rules are evaluated over.

The engine never touches a database or files: it reads series through the
:class:`SeriesView` protocol, which the index implements. :class:`DictSeries` is a
small in-memory implementation for tests and for checking rules against files.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicomnode.dicom.frames import FrameGeometry
from dicomnode.dicom.header import ImageHeader
from dicomnode.geometry import ORIENTATION_COSINE_THRESHOLD, orientation_label

from .fields import ORIENTATIONS, canonical_field

__all__ = [
    "ORIENTATION_COSINE_THRESHOLD",
    "DictSeries",
    "SeriesView",
    "orientation_label",
    "split_values",
]

_SKIPPED_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_SINGLE_TEXT_VRS = frozenset({"LT", "ST", "UT", "UR"})  # single-valued, backslash allowed


@runtime_checkable
class SeriesView(Protocol):
    """What the rule engine needs to know about one series.

    Implementations may use plain attributes or properties.
    """

    @property
    def key(self) -> str:
        """Stable identifier of the series (e.g. its SeriesInstanceUID)."""

    def values(self, field: str) -> list[str] | None:
        """All values of an attribute, as strings, or ``None`` if absent.

        ``field`` is a canonical field name (see :mod:`dicomnode.rules.fields`): a
        DICOM keyword, or ``"(GGGG,EEEE)"`` for tags without a keyword. A
        multi-valued attribute gives one string per value (``ORIGINAL\\PRIMARY``
        gives ``["ORIGINAL", "PRIMARY"]``). Padding need not be stripped.
        """

    @property
    def num_images(self) -> int:
        """Number of images (instances) in the series."""

    @property
    def orientation(self) -> str | None:
        """``AXIAL``, ``SAGITTAL``, ``CORONAL``, ``OBLIQUE`` or ``None`` if unknown."""

    @property
    def slice_spacing(self) -> float | None:
        """Distance between adjacent slices in mm, ``None`` if unknown."""

    @property
    def is_volume(self) -> bool | None:
        """Whether the series' geometry verdict is a whole volume, ``None`` if unknown."""

    @property
    def series_number(self) -> int | None:
        """SeriesNumber, ``None`` if absent."""


def split_values(value: object, *, name: str = "value") -> tuple[str, ...] | None:
    """Turn an attribute value into its string values (``None`` means absent).

    A string is split on the DICOM value separator ``\\``; numbers become their
    decimal text; lists and tuples (and pydicom's MultiValue) give one entry per item;
    other objects whose ``str`` is meaningful (pydicom's PersonName, UID, DSfloat,
    IS) are converted with ``str``. An empty list, like ``None``, means absent.

    Raises:
        TypeError: For bytes, booleans, nested sequences, datasets and mappings.
    """
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(value.split("\\"))
    if isinstance(value, (list, tuple, MultiValue)):
        if not value:
            return None
        out: list[str] = []
        for item in value:
            if isinstance(item, (list, tuple, MultiValue)):
                raise TypeError(f"{name}: nested sequences are not attribute values")
            out.append(_scalar_text(item, name))
        return tuple(out)
    return (_scalar_text(value, name),)


def _scalar_text(item: object, name: str) -> str:
    if isinstance(item, bool):
        raise TypeError(f"{name}: booleans are not DICOM attribute values")
    if isinstance(item, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name}: binary values are not supported")
    if isinstance(item, (str, int, float, Decimal, PersonName)):
        return str(item)
    raise TypeError(f"{name}: {type(item).__name__} is not an attribute value")


@dataclass(frozen=True, eq=False)
class DictSeries:
    """An in-memory :class:`SeriesView` built from a mapping of attributes.

    Args:
        key: The series' stable identifier (non-empty).
        attributes: Attribute name (DICOM keyword or tag such as ``"(0008,103E)"``)
            to value(s); see :func:`split_values` for accepted values.
        num_images: Number of images (default 1).
        orientation: ``AXIAL``/``SAGITTAL``/``CORONAL``/``OBLIQUE``; when ``None``
            and ``attributes`` has a valid ImageOrientationPatient, it is derived
            with :func:`orientation_label`.
        slice_spacing: Slice spacing in mm (finite, not negative) or ``None``.
        is_volume: The geometry verdict, or ``None`` if unknown.
        series_number: When ``None``, taken from ``attributes["SeriesNumber"]`` if
            that is an integer.

    Raises:
        TypeError, ValueError: On an invalid argument, with the argument named.
    """

    key: str
    attributes: Mapping[str, Any] = field(default_factory=dict)
    num_images: int = 1
    orientation: str | None = None
    slice_spacing: float | None = None
    is_volume: bool | None = None
    series_number: int | None = None
    _values: dict[str, tuple[str, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not self.key:
            raise ValueError(f"key must be a non-empty string, got {self.key!r}")
        if not isinstance(self.attributes, Mapping):
            raise TypeError(f"attributes must be a mapping, got {type(self.attributes).__name__}")
        if isinstance(self.num_images, bool) or not isinstance(self.num_images, int):
            raise TypeError(f"num_images must be an int, got {self.num_images!r}")
        if self.num_images < 0:
            raise ValueError(f"num_images must not be negative, got {self.num_images}")
        if self.is_volume is not None and not isinstance(self.is_volume, bool):
            raise TypeError(f"is_volume must be a bool or None, got {self.is_volume!r}")
        if self.slice_spacing is not None:
            if isinstance(self.slice_spacing, bool) or not isinstance(
                self.slice_spacing, (int, float)
            ):
                raise TypeError(f"slice_spacing must be a number, got {self.slice_spacing!r}")
            if not math.isfinite(self.slice_spacing) or self.slice_spacing < 0:
                raise ValueError(
                    f"slice_spacing must be finite and not negative, got {self.slice_spacing}"
                )
        values: dict[str, tuple[str, ...]] = {}
        for name, value in self.attributes.items():
            if not isinstance(name, str):
                raise TypeError(f"attribute names must be strings, got {name!r}")
            resolved = canonical_field(name)
            if resolved is None or resolved[2]:
                raise ValueError(
                    f"attribute {name!r} is neither a DICOM keyword nor a (gggg,eeee) tag"
                )
            split = split_values(value, name=name)
            if split is not None:
                values[resolved[0]] = split
        object.__setattr__(self, "_values", values)
        self._init_series_number()
        self._init_orientation()

    def _init_series_number(self) -> None:
        if self.series_number is None:
            number = self._values.get("SeriesNumber")
            if number and len(number) == 1:
                try:
                    object.__setattr__(self, "series_number", int(number[0].strip()))
                except ValueError:
                    pass
        elif isinstance(self.series_number, bool) or not isinstance(self.series_number, int):
            raise TypeError(f"series_number must be an int or None, got {self.series_number!r}")

    def _init_orientation(self) -> None:
        if self.orientation is None:
            iop = self._values.get("ImageOrientationPatient")
            if iop is not None:
                try:
                    object.__setattr__(self, "orientation", orientation_label(iop))  # type: ignore[arg-type]
                except ValueError:
                    pass
        elif self.orientation not in ORIENTATIONS:
            raise ValueError(
                f"orientation must be one of {', '.join(ORIENTATIONS)} or None, "
                f"got {self.orientation!r}"
            )

    def values(self, field: str) -> list[str] | None:
        """All values of ``field`` (a keyword or tag), ``None`` if absent."""
        resolved = canonical_field(field)
        found = self._values.get(resolved[0] if resolved else field)
        return None if found is None else list(found)

    @classmethod
    def from_datasets(cls, datasets: Sequence[Any], *, key: str | None = None) -> DictSeries:
        """Build a series from the pydicom datasets of its instances.

        Attributes come from the first dataset (in InstanceNumber order); sequences
        and binary elements are skipped. ``num_images`` is the number of datasets,
        ``orientation`` the label of the first frame's ImageOrientationPatient, and
        ``slice_spacing`` the median distance between distinct frame positions along
        its normal (frames as :class:`dicomnode.dicom.header.ImageHeader` places them,
        per frame for enhanced multi-frame images). ``is_volume`` is left ``None``: the
        geometry verdict belongs to the index.

        Raises:
            ValueError: If ``datasets`` is empty, or no ``key`` is given and the first
                dataset has no SeriesInstanceUID.
        """
        if not datasets:
            raise ValueError("from_datasets needs at least one dataset")
        ordered = sorted(datasets, key=_instance_number)
        first = ordered[0]
        attributes: dict[str, Any] = {}
        for element in first:
            if element.VR in _SKIPPED_VRS or element.value is None or element.tag.is_private:
                continue
            name = element.keyword or f"({element.tag.group:04X},{element.tag.element:04X})"
            value = element.value
            if element.VR in _SINGLE_TEXT_VRS:
                value = [str(value)]  # may contain backslashes: never split
            try:
                split_values(value)
            except TypeError:
                continue
            attributes[name] = value
        if key is None:
            uid = getattr(first, "SeriesInstanceUID", None)
            if not uid:
                raise ValueError("the first dataset has no SeriesInstanceUID; pass key=")
            key = str(uid)
        frames = _frames(ordered)
        return cls(
            key=key,
            attributes=attributes,
            num_images=len(ordered),
            orientation=_orientation(frames),
            slice_spacing=_slice_spacing(frames),
        )


def _instance_number(dataset: Any) -> int:
    try:
        return int(getattr(dataset, "InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def _frames(datasets: Sequence[Any]) -> list[FrameGeometry]:
    """Every frame of ``datasets`` (single- and multi-frame), as the header model places
    them; none when a dataset is not a pydicom dataset or cannot be parsed."""
    try:
        return [f for ds in datasets for f in ImageHeader.from_dataset(ds).frames]
    except Exception:  # a header the model cannot read gives no derived geometry
        return []


def _orientation(frames: Sequence[FrameGeometry]) -> str | None:
    if not frames or frames[0].orientation is None:
        return None
    try:
        return orientation_label(frames[0].orientation)
    except ValueError:
        return None


def _slice_spacing(frames: Sequence[FrameGeometry]) -> float | None:
    """The median distance (mm) between distinct frame positions along the first frame's
    normal."""
    if not frames or frames[0].orientation is None:
        return None
    rx, ry, rz, cx, cy, cz = frames[0].orientation
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    if any(f.position is None for f in frames):
        return None
    distances = {round(sum(p * n for p, n in zip(f.position or (), normal, strict=True)), 4)
                 for f in frames}
    positions = sorted(distances)
    if len(positions) < 2:
        return None
    spacing = statistics.median(b - a for a, b in itertools.pairwise(positions))
    return float(spacing) if math.isfinite(spacing) else None
