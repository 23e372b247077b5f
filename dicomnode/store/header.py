"""Read what the index needs from a received instance, without its pixel data.

Positions (ImagePositionPatient) and orientations (ImageOrientationPatient)
are in the DICOM patient coordinate system (LPS, mm). Multi-frame images
(enhanced CT/MR/PET and similar) give one position per frame, read from the
Per-frame or Shared Functional Groups.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag

__all__ = ["HeaderError", "InstanceHeader", "read_header"]

#: What an instance may state about the size of its series (see
#: :func:`dicomnode.completion.stated_size`): index key <- DICOM keyword.
_SIZE_HINTS = (
    ("AcquisitionNumber", "acquisition"),
    ("ImagesInAcquisition", "images_in_acquisition"),
    ("NumberOfSlices", "number_of_slices"),
    ("NumberOfTimeSlices", "number_of_time_slices"),
    ("NumberOfTemporalPositions", "temporal_positions"),
    ("TemporalPositionIdentifier", "temporal_position"),
    ("ConcatenationUID", "concatenation_uid"),
    ("InConcatenationTotalNumber", "concatenation_total"),
)

_KEYWORDS = (
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "Modality", "SeriesDescription", "SeriesNumber", "BodyPartExamined",
    "FrameOfReferenceUID", "InstanceNumber", "ImageType", "Rows", "Columns",
    "PixelSpacing", "SliceThickness", "ImagePositionPatient", "ImageOrientationPatient",
    "NumberOfFrames", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
    *(keyword for keyword, _ in _SIZE_HINTS),
    "GridFrameOffsetVector",
)
_TAGS = [Tag(k) for k in _KEYWORDS]


class HeaderError(Exception):
    """A received dataset that cannot be indexed; ``status`` is the C-STORE failure code."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class InstanceHeader:
    """The indexed attributes of one instance (strings stripped, numbers parsed)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    patient: dict[str, str | None] = field(default_factory=dict)
    study: dict[str, str | None] = field(default_factory=dict)
    series: dict[str, Any] = field(default_factory=dict)
    instance: dict[str, Any] = field(default_factory=dict)


def _text(ds: Dataset, keyword: str, limit: int | None = 64) -> str | None:
    """A descriptive text value, stripped and cut to ``limit`` characters (None: whole);
    identifiers go through :func:`_uid` or :func:`_identifier`, which never cut."""
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    text = str(value).strip().rstrip("\x00")
    if not text:
        return None
    return text if limit is None else text[:limit]


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STATUS_MISSING_UID = 0xC002
STATUS_INVALID_IDENTIFIER = 0xC003
#: identifiers the index keeps: refused when longer than their VR allows (never truncated,
#: which would merge different patients, studies or series)
_IDENTIFIER_LIMITS = {"PatientID": 64, "IssuerOfPatientID": 64, "AccessionNumber": 16,
                      "StudyID": 16, "FrameOfReferenceUID": 64}


def _uid(ds: Dataset, keyword: str) -> str:
    """A UID the index keys on: whole, at most 64 characters of digits and dots.

    Raises:
        HeaderError: 0xC003 when it is longer than 64 characters or not a valid UID.
    """
    text = _text(ds, keyword, limit=None) or ""
    if len(text) > 64:
        raise HeaderError(f"{keyword} is longer than 64 characters",
                          STATUS_INVALID_IDENTIFIER)
    if not _UID.match(text):
        raise HeaderError(f"{keyword} is not a valid UID (digits and dots)",
                          STATUS_INVALID_IDENTIFIER)
    return text


def _identifier(ds: Dataset, keyword: str) -> str | None:
    """An identifier the index keeps, refused (0xC003) rather than truncated."""
    text = _text(ds, keyword, limit=None)
    limit = _IDENTIFIER_LIMITS[keyword]
    if text is not None and len(text) > limit:
        raise HeaderError(f"{keyword} is longer than {limit} characters",
                          STATUS_INVALID_IDENTIFIER)
    return text


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else int(value)
    except Exception:
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else float(value)
    except Exception:
        return None


def _floats(ds: Dataset, keyword: str, count: int) -> list[float] | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        values = [float(v) for v in (value if isinstance(value, Sequence) else [value])]
    except Exception:
        return None
    return values if len(values) == count else None


def _strings(ds: Dataset, keyword: str) -> list[str] | None:
    try:
        value = ds.get(keyword)
    except Exception:
        return None
    if value is None or value == "":
        return None
    if isinstance(value, str):
        return [value.strip()]
    return [str(v).strip() for v in value]


def first_item(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    if not seq:
        return None
    item: Dataset = seq[0]
    return item


def _frame_geometry(ds: Dataset) -> tuple[list[list[float]] | None, dict[str, Any]]:
    """Per-frame positions and the shared orientation/spacing of a multi-frame image."""
    shared = first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    extra: dict[str, Any] = {}
    orientation = _floats(first_item(shared, "PlaneOrientationSequence") or Dataset(),
                          "ImageOrientationPatient", 6)
    measures = first_item(shared, "PixelMeasuresSequence")
    if measures is not None:
        extra["pixel_spacing"] = _floats(measures, "PixelSpacing", 2)
        extra["slice_thickness"] = _float(measures, "SliceThickness")
    positions: list[list[float]] = []
    shared_orientation = orientation is not None
    if per_frame:
        for frame in per_frame:
            pos = _floats(first_item(frame, "PlanePositionSequence") or Dataset(),
                          "ImagePositionPatient", 3)
            own = None if shared_orientation else _floats(
                first_item(frame, "PlaneOrientationSequence") or Dataset(),
                "ImageOrientationPatient", 6)
            if orientation is None:
                orientation = own
            if measures is None and "pixel_spacing" not in extra:
                pm = first_item(frame, "PixelMeasuresSequence")
                if pm is not None:
                    extra["pixel_spacing"] = _floats(pm, "PixelSpacing", 2)
                    extra["slice_thickness"] = _float(pm, "SliceThickness")
            if pos is None:
                return None, extra
            # a frame with its own orientation keeps it: position + orientation (9 numbers)
            positions.append(pos + own if own is not None and own != orientation else pos)
    extra["image_orientation_patient"] = orientation
    return (positions or None), extra


def _size_hints(ds: Dataset) -> dict[str, Any] | None:
    """What the instance states about its series' size (numbers, a concatenation UID)."""
    hints: dict[str, Any] = {}
    for keyword, key in _SIZE_HINTS:
        value = _text(ds, keyword) if keyword == "ConcatenationUID" else _int(ds, keyword)
        if value is not None:
            hints[key] = value
    return hints or None


def _grid_positions(ds: Dataset, frames: int) -> list[list[float]] | None:
    """Frame positions of an RT Dose grid (PS3.3 C.8.8.3.2): GridFrameOffsetVector gives
    each frame's offset along the normal of ImageOrientationPatient, relative to
    ImagePositionPatient when its first value is 0, otherwise (axial grids only) the
    frames' z coordinates. None when the vector does not give one offset per frame."""
    offsets = _floats(ds, "GridFrameOffsetVector", frames)
    origin = _floats(ds, "ImagePositionPatient", 3)
    iop = _floats(ds, "ImageOrientationPatient", 6)
    if offsets is None or origin is None or iop is None:
        return None
    row, col = iop[:3], iop[3:]
    normal = [row[1] * col[2] - row[2] * col[1], row[2] * col[0] - row[0] * col[2],
              row[0] * col[1] - row[1] * col[0]]
    length = sum(c * c for c in normal) ** 0.5
    if length < 1e-6:
        return None
    normal = [c / length for c in normal]
    if offsets[0] != 0.0:
        if [round(v, 6) for v in iop] != [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]:
            return None
        base = sum(o * n for o, n in zip(origin, normal, strict=True))
        offsets = [z - base for z in offsets]
    return [[o + d * n for o, n in zip(origin, normal, strict=True)] for d in offsets]


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of a stored DICOM file (pixel data is not read).

    Raises:
        HeaderError: status 0xC001 when the dataset cannot be parsed, 0xC002
            when Study, Series or SOP Instance UID is missing, 0xC003 when one of them
            (or SOPClassUID, FrameOfReferenceUID) is not a valid UID of at most 64
            characters, or PatientID, IssuerOfPatientID, AccessionNumber or StudyID is
            longer than its VR allows.
    """
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        # force decoding of the values now, so a malformed element fails here
        for elem in ds.iterall():
            _ = elem.value
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:
        raise HeaderError(f"dataset cannot be parsed: {type(exc).__name__}", 0xC001) from None

    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                           "SOPClassUID") if not _text(ds, k)]
    if missing:
        raise HeaderError(f"dataset lacks {', '.join(missing)}", STATUS_MISSING_UID)
    uids = {k: _uid(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                     "SOPInstanceUID", "SOPClassUID")}
    identifiers = {k: _identifier(ds, k) for k in _IDENTIFIER_LIMITS}

    number_of_frames = _int(ds, "NumberOfFrames") or 1
    instance: dict[str, Any] = {
        "instance_number": _int(ds, "InstanceNumber"),
        "image_type": _strings(ds, "ImageType"),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "pixel_spacing": _floats(ds, "PixelSpacing", 2),
        "slice_thickness": _float(ds, "SliceThickness"),
        "image_position_patient": _floats(ds, "ImagePositionPatient", 3),
        "image_orientation_patient": _floats(ds, "ImageOrientationPatient", 6),
        "frame_of_reference_uid": identifiers["FrameOfReferenceUID"],
        "number_of_frames": number_of_frames,
        "frame_positions": None,
        "size_hints": _size_hints(ds),
    }
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        positions, extra = _frame_geometry(ds)
        instance["frame_positions"] = positions
        for key, value in extra.items():
            if instance.get(key) is None:
                instance[key] = value
    elif number_of_frames > 1 and "GridFrameOffsetVector" in ds:
        instance["frame_positions"] = _grid_positions(ds, number_of_frames)
    return InstanceHeader(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        transfer_syntax_uid=transfer_syntax,
        patient={
            "patient_id": identifiers["PatientID"] or "",
            "issuer_of_patient_id": identifiers["IssuerOfPatientID"] or "",
            "patient_name": _text(ds, "PatientName", 324),
            "patient_birth_date": _text(ds, "PatientBirthDate", 8),
            "patient_sex": _text(ds, "PatientSex", 16),
        },
        study={
            "study_date": _text(ds, "StudyDate", 8),
            "study_time": _text(ds, "StudyTime", 16),
            "accession_number": identifiers["AccessionNumber"],
            "study_id": identifiers["StudyID"],
            "study_description": _text(ds, "StudyDescription"),
        },
        series={
            "modality": _text(ds, "Modality", 16),
            "series_description": _text(ds, "SeriesDescription"),
            "series_number": _int(ds, "SeriesNumber"),
            "body_part_examined": _text(ds, "BodyPartExamined", 16),
            "frame_of_reference_uid": identifiers["FrameOfReferenceUID"],
        },
        instance=instance,
    )
