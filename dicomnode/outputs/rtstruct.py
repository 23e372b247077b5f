"""RT Structure Set (RTSTRUCT) objects from a segmentation, written with pydicom.

Each structure's mask becomes planar contours, slice by slice, in the patient
coordinate system (LPS, mm): the iso-line at 0.5 of the binary slice (the polygon
marching squares draws, through the middle of each pixel edge between inside and
outside), so that a pixel is inside the polygons exactly when its centre is inside the
mask. The lines are traced with OpenCV's border following (C++, about 1 ms a 512x512
slice; scikit-image's marching squares assembles its lines in Python, 4-5 ms) on a grid
of twice the resolution that holds pixel centres, edge midpoints and corners, keeping
the edge midpoints. Pixels touching only by a corner are one region (8-connected): one
polygon that passes between them. Every closed line is its own CLOSED_PLANAR contour:
several islands give several contours, and a hole gives a contour inside its island
(the convention treatment planning systems read with the even-odd rule).
Each contour references the image of its slice. ROI names, colours and RT ROI
Interpreted Types come from the model card; the Structure Set ROI items say
ROI Generation Algorithm AUTOMATIC with the model's identification.

DS values are written with at most 16 characters, rounded to 0.1 micrometre (far below
the 0.01 mm that matters for contours), formatted by numpy for the whole contour at once.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from typing import Literal

import cv2
import numpy as np
import numpy.typing as npt
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from dicomnode.inference.segment import Geometry, Segmentation, Structure
from dicomnode.models.card import Code as CardCode
from dicomnode.outputs.algorithm import (
    algorithm_identification,
    algorithm_identity,
    content_label,
    contributing_equipment,
    description,
    marked,
    result_description,
    software_versions,
)
from dicomnode.outputs.source import (
    OutputError,
    SourceFrame,
    SourceSeries,
    check_plane_shape,
    result_uid,
)

__all__ = ["RTSTRUCT_SERIES_NUMBER", "EmptyStructures", "NoContourError", "RTStructureSetStorage",
           "build_rtstruct", "slice_contours"]

RTStructureSetStorage = "1.2.840.10008.5.1.4.1.1.481.3"
EmptyStructures = Literal["omit", "keep"]
"""What an RT Structure Set does with a structure the model found empty."""
RTSTRUCT_SERIES_NUMBER = 9902
_STUDY_COMPONENT = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (as TPS expect)
_CONTOUR_DATA = Tag(0x3006, 0x0050)

# patient and study attributes copied from the source (Type 2 ones are always written)
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                        "AccessionNumber")
_PATIENT_STUDY_OPTIONAL = ("SpecificCharacterSet", "IssuerOfPatientID", "OtherPatientIDsSequence",
                           "PatientAge", "PatientSize", "PatientWeight", "StudyDescription",
                           "PatientIdentityRemoved", "DeidentificationMethod",
                           "DeidentificationMethodCodeSequence")


class NoContourError(OutputError):
    """No structure has a contour and empty structures are left out: no RTSTRUCT to write."""


def slice_contours(mask: npt.NDArray[np.bool_]) -> list[npt.NDArray[np.float64]]:
    """Closed contours of one binary slice as (row, column) pixel coordinates.

    Each contour is an ``(n, 2)`` array (n >= 3) without the closing repeat of its
    first point and without points that lie on a straight run between their
    neighbours; coordinates are in pixels with (0, 0) the centre of the first pixel.
    Every vertex is the midpoint of a pixel edge between an inside and an outside pixel.
    """
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return []
    cols = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows[0]), int(cols[0])
    crop = mask[r0:int(rows[-1]) + 1, c0:int(cols[-1]) + 1]
    # node (2i + 1, 2j + 1) is the centre of pixel (i, j) of the crop padded by one (so
    # every line closes), (2i + 1, 2j) the middle of its left edge, (2i, 2j) its upper
    # left corner; a node is inside when a pixel it touches is inside
    height, width = crop.shape[0] + 2, crop.shape[1] + 2
    nodes = np.zeros((2 * height + 1, 2 * width + 1), dtype=np.uint8)
    nodes[3:-3:2, 3:-3:2] = crop
    nodes = cv2.dilate(nodes, _SQUARE)
    lines, _hierarchy = cv2.findContours(nodes, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    offset = np.array([r0 - 1.5, c0 - 1.5])
    out = []
    for line in lines:
        rc = line[:, 0, ::-1]  # OpenCV gives (x, y)
        midpoints = rc[(rc[:, 0] + rc[:, 1]) % 2 == 1]  # one coordinate odd: an edge
        polygon = _corners(midpoints / 2.0 + offset)
        if len(polygon) >= 3:
            out.append(polygon)
    return out


_SQUARE = np.ones((3, 3), dtype=np.uint8)


def _corners(line: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The closed polygon ``line`` without its points that lie on a straight run."""
    before = line - np.roll(line, 1, axis=0)
    after = np.roll(line, -1, axis=0) - line
    turn = before[:, 0] * after[:, 1] - before[:, 1] * after[:, 0]
    return line[np.abs(turn) > 1e-9]


def _contour_data(points: npt.NDArray[np.float64]) -> RawDataElement:
    """Contour Data (3006,0050) already encoded: pydicom would build one DSfloat per value,
    seconds for the hundreds of thousands of values of a body outline."""
    text = ds_bytes(points.reshape(-1))
    if len(text) % 2:
        text += b" "
    return RawDataElement(_CONTOUR_DATA, "DS", len(text), text, 0, False, True)


_DECIMALS = 4


def ds_bytes(values: npt.NDArray[np.float64]) -> bytes:
    """``values`` as one DS value of multiplicity ``len(values)``: backslash-separated
    decimal strings of at most 15 characters, rounded to 4 decimals, without trailing
    zeros (``-12.5``, ``0``, ``3.0001``).

    Raises:
        OutputError: a value is not finite or is 1e9 or more in magnitude.
    """
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.size == 0:
        return b""
    if not np.all(np.isfinite(values)) or float(np.abs(values).max()) >= 1e9:
        raise OutputError("a contour coordinate is not finite or is beyond 1e9 mm")
    scaled = np.rint(values * 10**_DECIMALS).astype(np.int64)
    magnitude = np.abs(scaled)
    whole = (magnitude // 10**_DECIMALS).astype(np.int32)
    fraction = (magnitude % 10**_DECIMALS).astype(np.int32)
    digits = len(str(int(whole.max())))  # sign, digits, point, decimals, backslash:
    chars = np.empty((values.size, digits + _DECIMALS + 3), dtype=np.uint8)
    keep = np.empty(chars.shape, dtype=bool)
    chars[:, 0], keep[:, 0] = ord("-"), scaled < 0
    rest, place = whole.copy(), 1
    for column in range(digits, 0, -1):  # units first; leading zeros dropped, units kept
        chars[:, column] = ord("0") + rest % 10
        keep[:, column] = (whole >= place) | (place == 1)
        rest //= 10
        place *= 10
    point = digits + 1
    chars[:, point], keep[:, point] = ord("."), fraction != 0
    rest = fraction.copy()
    nonzero_after = np.zeros(values.size, dtype=bool)
    for column in range(point + _DECIMALS, point, -1):  # last decimal first
        digit = rest % 10
        nonzero_after |= digit != 0
        chars[:, column], keep[:, column] = ord("0") + digit, nonzero_after
        rest //= 10
    chars[:, -1], keep[:, -1] = ord("\\"), True
    keep[-1, -1] = False
    return chars[keep].tobytes()


def _image_ref(frame: SourceFrame, multiframe: bool) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = frame.sop_class_uid
    item.ReferencedSOPInstanceUID = frame.sop_instance_uid
    if multiframe:
        item.ReferencedFrameNumber = frame.frame_number
    return item


def _to_patient(geometry: Geometry, frame: SourceFrame,
                source: SourceSeries) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The map (row, column) -> LPS (mm) of a source frame: ``origin + [r, c] @ axes``.

    The origin is the frame's own ImagePositionPatient for single-frame images (the
    contour lies on the image it references even when the masks were computed on a
    resampled grid) and the grid plane's for multi-frame ones.
    """
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(3, 3)
    sx, sy, sz = geometry.spacing
    if source.multiframe:
        origin = np.asarray(geometry.origin) + frame.z * sz * direction[:, 2]
    else:
        header = source.header(frame.sop_instance_uid)
        origin = np.asarray([float(v) for v in header.ImagePositionPatient])
    axes = np.stack([sy * direction[:, 1], sx * direction[:, 0]])  # row step, column step
    return origin, axes


def _contours(structure: Structure, geometry: Geometry, source: SourceSeries) -> Iterator[Dataset]:
    number = 0
    for frame in source.frames:
        plane = structure.plane(frame.z)
        if not plane.any():
            continue
        origin, axes = _to_patient(geometry, frame, source)
        for line in slice_contours(plane):
            number += 1
            points = origin + line @ axes
            item = Dataset()
            item.ContourImageSequence = Sequence([_image_ref(frame, source.multiframe)])
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(points)
            item.ContourNumber = number
            item[_CONTOUR_DATA] = _contour_data(points)
            # written as it is encoded (pydicom re-parses raw elements of datasets whose
            # original encoding differs from the file's)
            item.set_original_encoding(False, True, item._character_set)
            yield item


def _copy_patient_study(target: Dataset, source: Dataset) -> None:
    for keyword in _PATIENT_STUDY_TYPE2:
        setattr(target, keyword, source.get(keyword, ""))
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if keyword in source:
            setattr(target, keyword, source.data_element(keyword).value)  # type: ignore[union-attr]
    target.StudyInstanceUID = source.StudyInstanceUID


def _code_item(code: CardCode) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme
    item.CodeMeaning = code.meaning
    return item


def build_rtstruct(
    segmentation: Segmentation,
    source: SourceSeries,
    *,
    seed: str,
    series_number: int = RTSTRUCT_SERIES_NUMBER,
    now: dt.datetime | None = None,
    result_number: int = 1,
    empty_structures: EmptyStructures = "omit",
) -> Dataset:
    """An RT Structure Set of ``segmentation`` on the images of ``source``.

    Args:
        segmentation: the structures on the grid of ``source`` (masks [z, y, x]).
        source: the source headers and, per source frame, its plane of the masks.
        seed: what makes the object's UIDs; the same seed gives the same UIDs.
        series_number: the RTSTRUCT series' number.
        now: the creation time written (default: the current local time).
        result_number: which result of its job this is (its SeriesDescription says it).
        empty_structures: ``omit`` leaves out the structures without a contour (no voxel
            on a source image: rt-utils and several planning systems fail on an ROI
            without contours); ``keep`` writes their ROI without a Contour Sequence.
            ROI Numbers are the SEG's segment numbers (card order) either way.

    Raises:
        NoContourError: ``omit`` and no structure has a contour.
        OutputError: the source has no Frame of Reference, or the masks do not match
            the source images.
    """
    if empty_structures not in ("omit", "keep"):
        raise ValueError(f"empty_structures is omit or keep, not {empty_structures!r}")
    card = segmentation.card
    first = source.first
    frame_of_reference = str(first.get("FrameOfReferenceUID", ""))
    if not frame_of_reference:
        raise OutputError("the source images have no FrameOfReferenceUID: contours in patient "
                          "coordinates cannot be tied to them")
    check_plane_shape(source, segmentation.geometry.size[::-1])
    now = now or dt.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    sop_instance_uid = result_uid(seed, "RTSTRUCT", "instance")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(RTStructureSetStorage)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    _copy_patient_study(ds, first)
    ds.SOPClassUID = RTStructureSetStorage
    ds.SOPInstanceUID = sop_instance_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # RT Series and General Equipment
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = result_uid(seed, "RTSTRUCT", "series")
    ds.SeriesNumber = series_number
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.SeriesDescription = result_description("RTSTRUCT", card, result_number)
    ds.OperatorsName = ""
    ds.Manufacturer = "dicomnode"
    # Frame of Reference
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "")
    ds.ManufacturerModelName = card.name[:64]
    ds.SoftwareVersions = software_versions(card)
    identity = algorithm_identity(card)
    ds.ContributingEquipmentSequence = Sequence([contributing_equipment(identity)])
    # Structure Set
    ds.StructureSetLabel = content_label(card)
    ds.StructureSetName = card.name[:64]
    ds.StructureSetDescription = marked(description(card), card, 1024)
    ds.InstanceNumber = 1
    ds.StructureSetDate, ds.StructureSetTime = date, time

    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = Sequence(
        [_image_ref(f, source.multiframe) for f in source.frames])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_COMPONENT
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = Sequence([series_ref])
    for_ref = Dataset()
    for_ref.FrameOfReferenceUID = frame_of_reference
    for_ref.RTReferencedStudySequence = Sequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = Sequence([for_ref])

    rois, contours, observations = [], [], []
    for number, structure in enumerate(segmentation.structures, start=1):
        label = structure.label
        items = list(_contours(structure, segmentation.geometry, source))
        if not items and empty_structures == "omit":
            continue  # ROI numbers stay the SEG's segment numbers: this one is skipped
        roi = Dataset()
        roi.ROINumber = number
        roi.ReferencedFrameOfReferenceUID = frame_of_reference
        roi.ROIName = label.name
        roi.ROIGenerationAlgorithm = "AUTOMATIC"
        roi.ROIGenerationDescription = description(card)
        roi.ROIDerivationAlgorithmIdentificationSequence = algorithm_identification(
            card, identity)
        rois.append(roi)

        roi_contour = Dataset()
        roi_contour.ROIDisplayColor = list(label.color)
        roi_contour.ReferencedROINumber = number
        if items:
            roi_contour.ContourSequence = Sequence(items)
        contours.append(roi_contour)

        observation = Dataset()
        observation.ObservationNumber = number
        observation.ReferencedROINumber = number
        observation.RTROIInterpretedType = label.rt_roi_interpreted_type
        observation.ROIInterpreter = ""
        observation.RTROIIdentificationCodeSequence = Sequence([_code_item(label.type)])
        observations.append(observation)
    if not rois:
        raise NoContourError(f"model {card.name}: no structure has a contour, and empty "
                             "structures are left out: there is no RT Structure Set to write")
    ds.StructureSetROISequence = Sequence(rois)
    ds.ROIContourSequence = Sequence(contours)
    ds.RTROIObservationsSequence = Sequence(observations)
    return ds
