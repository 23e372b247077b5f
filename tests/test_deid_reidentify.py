"""reidentify(): a SEG/RTSTRUCT-like result from pseudonymized inputs gets its identity back."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from io import BytesIO

import pytest
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SegmentationStorage,
    generate_uid,
)
from test_deid_data import FOR_UID, KEY, REF_SOP_UID, SERIES_UID, SOP_UID, STUDY_UID, make_source

from dicomnode.deid import (
    ProfileOptions,
    PseudonymizationRecord,
    Pseudonymizer,
    ReidentificationError,
    reidentify,
    reidentify_encoded,
)

OPTIONS = ProfileOptions(True, True, True)
SECOND_SOP_UID = "1.2.826.0.1.3680043.8.498.1006"


def _ui_elements(ds: Dataset, path: str = "") -> Iterator[tuple[str, DataElement]]:
    for elem in ds:
        where = f"{path}/{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from _ui_elements(item, f"{where}[{i}]")
        elif elem.VR == "UI":
            yield where, elem


def _item(**values: object) -> Dataset:
    item = Dataset()
    for keyword, value in values.items():
        setattr(item, keyword, value)
    return item


def _pseudonymized_sources() -> tuple[list[Dataset], list[PseudonymizationRecord]]:
    sources = [make_source(), make_source(sop_uid=SECOND_SOP_UID)]
    records = [Pseudonymizer(KEY, OPTIONS).apply(ds) for ds in sources]
    return sources, records


def _result(source: Dataset, second: Dataset) -> Dataset:
    """A SEG with RTSTRUCT-style references, made from pseudonymized ``source``/``second``."""
    seg = Dataset()
    seg.SOPClassUID = SegmentationStorage
    seg.SOPInstanceUID = generate_uid()
    seg.SeriesInstanceUID = generate_uid()
    seg.StudyInstanceUID = source.StudyInstanceUID
    seg.FrameOfReferenceUID = source.FrameOfReferenceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                    "PatientIdentityRemoved", "DeidentificationMethod",
                    "DeidentificationMethodCodeSequence", "StudyDate", "StudyTime",
                    "AccessionNumber", "StudyID", "ReferringPhysicianName",
                    "LongitudinalTemporalInformationModified"):
        seg[keyword] = source[keyword]
    refs = [_item(ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=ds.SOPInstanceUID)
            for ds in (source, second)]
    seg.ReferencedSeriesSequence = Sequence([_item(
        SeriesInstanceUID=source.SeriesInstanceUID, ReferencedInstanceSequence=Sequence(refs))])
    derivation = _item(SourceImageSequence=Sequence([_item(
        ReferencedSOPClassUID=CTImageStorage, ReferencedSOPInstanceUID=source.SOPInstanceUID,
        ReferencedFrameNumber=1)]))
    frame = _item(DerivationImageSequence=Sequence([derivation]))
    seg.SharedFunctionalGroupsSequence = Sequence([frame])
    seg.PerFrameFunctionalGroupsSequence = Sequence([
        _item(DerivationImageSequence=Sequence([_item(SourceImageSequence=Sequence([_item(
            ReferencedSOPClassUID=CTImageStorage,
            ReferencedSOPInstanceUID=second.SOPInstanceUID)]))]))])
    seg.SourceImageSequence = Sequence([_item(
        ReferencedSOPClassUID=CTImageStorage,
        ReferencedSOPInstanceUID=source.SourceImageSequence[0].ReferencedSOPInstanceUID)])
    contour_images = Sequence([_item(ReferencedSOPClassUID=CTImageStorage,
                                     ReferencedSOPInstanceUID=ds.SOPInstanceUID)
                               for ds in (source, second)])
    rt_series = _item(SeriesInstanceUID=source.SeriesInstanceUID,
                      ContourImageSequence=contour_images)
    rt_study = _item(ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
                     ReferencedSOPInstanceUID=source.StudyInstanceUID,
                     RTReferencedSeriesSequence=Sequence([rt_series]))
    relationship = _item(RelatedFrameOfReferenceUID=source.FrameOfReferenceUID,
                         FrameOfReferenceTransformationComment="identity")
    seg.ReferencedFrameOfReferenceSequence = Sequence([_item(
        FrameOfReferenceUID=source.FrameOfReferenceUID,
        RTReferencedStudySequence=Sequence([rt_study]),
        FrameOfReferenceRelationshipSequence=Sequence([relationship]))])
    seg.StructureSetROISequence = Sequence([_item(
        ROINumber=1, ReferencedFrameOfReferenceUID=source.FrameOfReferenceUID)])
    seg.ReferencedStudySequence = Sequence([_item(
        ReferencedSOPClassUID="1.2.840.10008.3.1.2.3.1",
        ReferencedSOPInstanceUID=source.StudyInstanceUID)])
    return seg


def _union(records: list[PseudonymizationRecord]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for record in records:
        merged.update(record.inverse_uid_map())
    return merged


def test_every_referenced_uid_is_mapped_back() -> None:
    sources, records = _pseudonymized_sources()
    seg = _result(*sources)
    own = {seg.SOPInstanceUID, seg.SeriesInstanceUID}
    class_uids = {SegmentationStorage, CTImageStorage, "1.2.840.10008.3.1.2.3.1"}
    pseudo = set(_union(records))
    before = list(_ui_elements(seg))
    assert sum(1 for _p, e in before if e.value in pseudo) >= 15
    # the lead stores the record as JSON: use what comes back from it
    stored = json.loads(json.dumps(records[0].to_json_dict()))
    reidentify(seg, _union(records), stored["patient_study"])
    originals = {STUDY_UID, SERIES_UID, SOP_UID, SECOND_SOP_UID, FOR_UID, REF_SOP_UID}
    for path, elem in _ui_elements(seg):
        assert elem.value in originals | own | class_uids, path
        assert elem.value not in pseudo, path
    assert seg.SOPInstanceUID in own and seg.SeriesInstanceUID in own  # untouched
    assert seg.StudyInstanceUID == STUDY_UID
    assert seg.FrameOfReferenceUID == FOR_UID
    refs = seg.ReferencedSeriesSequence[0]
    assert refs.SeriesInstanceUID == SERIES_UID
    assert [r.ReferencedSOPInstanceUID for r in refs.ReferencedInstanceSequence] == [
        SOP_UID, SECOND_SOP_UID]
    frame = seg.ReferencedFrameOfReferenceSequence[0]
    assert frame.FrameOfReferenceRelationshipSequence[0].RelatedFrameOfReferenceUID == FOR_UID
    assert frame.RTReferencedStudySequence[0].ReferencedSOPInstanceUID == STUDY_UID
    assert seg.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == FOR_UID
    assert seg.SourceImageSequence[0].ReferencedSOPInstanceUID == REF_SOP_UID


def test_patient_and_study_modules_restored() -> None:
    sources, records = _pseudonymized_sources()
    seg = _result(*sources)
    reidentify(seg, _union(records), records[0].patient_study)
    assert str(seg.PatientName) == "Doe^John^Johnathan"
    assert seg.PatientID == "PID-4711-X"
    assert seg.IssuerOfPatientID == "Springfield"
    assert seg.PatientBirthDate == "19700101"
    assert seg.StudyDate == "20240315" and seg.StudyTime == "101500"
    assert seg.AccessionNumber == "ACC-20240315-01"
    assert seg.StudyID == "STUDY-77"
    assert str(seg.ReferringPhysicianName) == "Smith^Alice"
    assert seg.StudyDescription == "CT THORAX for Doe John"
    assert seg.OtherPatientIDsSequence[0].PatientID == "ALT-PID-99"
    assert seg.PatientWeight == 81.5
    for marker in ("PatientIdentityRemoved", "DeidentificationMethod",
                   "DeidentificationMethodCodeSequence",
                   "LongitudinalTemporalInformationModified"):
        assert marker not in seg, marker


def test_unknown_study_is_refused() -> None:
    sources, records = _pseudonymized_sources()
    seg = _result(*sources)
    seg.StudyInstanceUID = generate_uid()
    with pytest.raises(ReidentificationError, match="not a known pseudonymous study UID"):
        reidentify(seg, _union(records), records[0].patient_study)
    del seg.StudyInstanceUID
    with pytest.raises(ReidentificationError, match="no StudyInstanceUID"):
        reidentify(seg, _union(records), records[0].patient_study)
    seg = _result(*sources)
    with pytest.raises(ReidentificationError, match="no original PatientID"):
        reidentify(seg, _union(records), {})
    with pytest.raises(ReidentificationError, match="malformed"):
        reidentify(seg, _union(records), {"PatientID": "X", "NotAKeyword": "Doe"})
    assert seg.StudyInstanceUID != STUDY_UID  # nothing changed by a refused call


def _encoded(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _with_every_length_form(seg: Dataset) -> Dataset:
    """The result with sequences and items of defined and undefined length, a multi-valued
    UID, a non-ASCII character set and pixel data (a long-VR element after the headers)."""
    seg.SpecificCharacterSet = "ISO_IR 192"
    seg.ContentDescription = "Résultat"
    seg["ReferencedSeriesSequence"].is_undefined_length = True
    seg.ReferencedSeriesSequence[0].is_undefined_length_sequence_item = True
    seg.PerFrameFunctionalGroupsSequence[0].is_undefined_length_sequence_item = True
    seg.RelatedGeneralSOPClassUID = [CTImageStorage, seg.FrameOfReferenceUID]
    seg.PixelData = bytes(range(256)) * 8
    seg["PixelData"].VR = "OB"
    return seg


def test_the_encoded_file_is_reidentified_byte_for_byte_as_the_dataset() -> None:
    sources, records = _pseudonymized_sources()
    seg = _with_every_length_form(_result(*sources))
    encoded = _encoded(seg)
    stored = json.loads(json.dumps(records[0].to_json_dict()))
    spliced = reidentify_encoded(encoded, _union(records), stored["patient_study"])
    reidentify(seg, _union(records), stored["patient_study"])
    buffer = BytesIO()
    seg.save_as(buffer, enforce_file_format=True)
    assert spliced is not None and spliced != encoded
    assert spliced == buffer.getvalue()
    assert bytes(STUDY_UID, "ascii") in spliced and b"PID-4711-X" in spliced
    for pseudonymous in _union(records):
        assert pseudonymous.encode("ascii") not in spliced


def test_an_encoding_the_splicer_does_not_take_is_left_to_the_dataset() -> None:
    sources, records = _pseudonymized_sources()
    implicit = _encoded(_result(*sources), ImplicitVRLittleEndian)
    assert reidentify_encoded(implicit, _union(records), records[0].patient_study) is None
    seg = _result(*sources)
    seg.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    seg["PixelData"].VR = "OB"
    seg["PixelData"].is_undefined_length = True
    compressed = _encoded(seg, JPEGBaseline8Bit)
    assert reidentify_encoded(compressed, _union(records), records[0].patient_study) is None
    assert reidentify_encoded(b"not a DICOM file", _union(records), {}) is None


def test_an_encoded_result_of_an_unknown_study_is_refused() -> None:
    sources, records = _pseudonymized_sources()
    seg = _result(*sources)
    seg.StudyInstanceUID = generate_uid()
    encoded = _encoded(seg)
    with pytest.raises(ReidentificationError, match="not a known pseudonymous study UID"):
        reidentify_encoded(encoded, _union(records), records[0].patient_study)
    good = _encoded(_result(*sources))
    with pytest.raises(ReidentificationError, match="no original PatientID"):
        reidentify_encoded(good, _union(records), {})
    assert copy.copy(good) == good
