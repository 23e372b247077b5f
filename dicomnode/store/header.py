"""Read what the index needs from a received instance, without its pixel data.

The image attributes and the geometry of every frame come from the one header model,
:class:`dicomnode.dicom.header.ImageHeader`; this module validates the identifiers the
index keys on (refusing with a C-STORE status) and turns the model into index rows.
Positions (ImagePositionPatient) and orientations (ImageOrientationPatient) are in the
DICOM patient coordinate system (LPS, mm). Multi-frame images keep one position per frame
(``frame_positions``) and, where frames differ in orientation or pixel spacing, those per
frame (``frame_geometry``; see :func:`dicomnode.dicom.frames.frames_to_index`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pydicom
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from dicomnode.dicom.header import ImageHeader
from dicomnode.dicom.header import text as header_text
from dicomnode.dicom.rawvalues import Unsupported, read_values
from dicomnode.dicom.status import Status

__all__ = ["HeaderError", "InstanceHeader", "read_header", "read_header_pydicom"]

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
    value = header_text(ds, keyword)
    return value if value is None or limit is None else value[:limit]


_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
STATUS_MISSING_UID = Status.CANNOT_UNDERSTAND_MISSING_UID
STATUS_INVALID_IDENTIFIER = Status.CANNOT_UNDERSTAND_INVALID_UID
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


def _listed(values: Sequence[float] | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _size_hints(ds: Dataset) -> dict[str, Any] | None:
    """What the instance states about its series' size (numbers, a concatenation UID)."""
    hints: dict[str, Any] = {}
    for keyword, key in _SIZE_HINTS:
        value = _text(ds, keyword) if keyword == "ConcatenationUID" else _int(ds, keyword)
        if value is not None:
            hints[key] = value
    return hints or None


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of a stored DICOM file (pixel data is not read).

    Common instances are read by :func:`dicomnode.dicom.rawvalues.read_values` (no pydicom
    Dataset is built); anything it does not read for certain by
    :func:`read_header_pydicom`. Both give the same header (tests/test_header_readers.py
    compares them on every file of the test corpus and of pydicom's test files).

    Raises:
        HeaderError: status 0xC001 when the dataset cannot be parsed, 0xC002
            when Study, Series or SOP Instance UID is missing, 0xC003 when one of them
            (or SOPClassUID, FrameOfReferenceUID) is not a valid UID of at most 64
            characters, or PatientID, IssuerOfPatientID, AccessionNumber or StudyID is
            longer than its VR allows.
    """
    try:
        values = read_values(path, _KEYWORDS)
    except (Unsupported, OSError):
        return read_header_pydicom(path)
    return _header(cast(Dataset, values), values.transfer_syntax_uid)


def read_header_pydicom(path: Path) -> InstanceHeader:
    """:func:`read_header` with pydicom for every file (the reference reader)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
        # force decoding of the values now, so a malformed element fails here
        for elem in ds.iterall():
            _ = elem.value
        transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
    except Exception as exc:
        raise HeaderError(f"dataset cannot be parsed: {type(exc).__name__}",
                          Status.CANNOT_UNDERSTAND_PARSE) from None
    return _header(ds, transfer_syntax)


def _header(ds: Dataset, transfer_syntax: str) -> InstanceHeader:
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                           "SOPClassUID") if not _text(ds, k)]
    if missing:
        raise HeaderError(f"dataset lacks {', '.join(missing)}", STATUS_MISSING_UID)
    uids = {k: _uid(ds, k) for k in ("StudyInstanceUID", "SeriesInstanceUID",
                                     "SOPInstanceUID", "SOPClassUID")}
    identifiers = {k: _identifier(ds, k) for k in _IDENTIFIER_LIMITS}

    try:
        image = ImageHeader.from_dataset(ds)
    except Exception as exc:  # pragma: no cover - the model keeps unreadable values as None
        raise HeaderError(f"dataset cannot be parsed: {type(exc).__name__}",
                          Status.CANNOT_UNDERSTAND_PARSE) from None
    frame_positions, frame_geometry = image.index_frames()
    instance: dict[str, Any] = {
        "instance_number": _int(ds, "InstanceNumber"),
        "image_type": _strings(ds, "ImageType"),
        "rows": image.rows,
        "columns": image.columns,
        "pixel_spacing": _listed(image.spacing),
        "slice_thickness": image.thickness,
        "image_position_patient": _listed(image.image_position_patient),
        "image_orientation_patient": _listed(image.orientation),
        "frame_of_reference_uid": identifiers["FrameOfReferenceUID"],
        "number_of_frames": image.number_of_frames,
        "frame_positions": frame_positions,
        "frame_geometry": frame_geometry,
        "size_hints": _size_hints(ds),
    }
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
