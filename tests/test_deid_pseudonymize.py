"""Pseudonymizer: no identity left in any byte, UIDs consistent, dates shifted, record."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID, ImplicitVRLittleEndian
from test_deid_data import (
    FOR_UID,
    KEY,
    OTHER_KEY,
    PHI,
    PIXELS,
    REF_SOP_UID,
    SERIES_UID,
    SOP_UID,
    STUDY_UID,
    make_source,
    to_bytes,
)

from dicomnode.deid import ProfileOptions, PseudonymizationError, Pseudonymizer, UIDMapper

BASIC = ProfileOptions(False, False, False)
MODIFIED_DATES = ProfileOptions(True, False, False)
ALL_THREE = ProfileOptions(True, True, True)
DEVICE = ProfileOptions(True, True, True, retain_device_identity=True)
ORIGINAL_UIDS = {STUDY_UID, SERIES_UID, SOP_UID, FOR_UID, REF_SOP_UID}


def _leaks(written: bytes, allowed: tuple[str, ...] = ()) -> list[str]:
    lowered = written.lower()
    return [s for s in PHI if s not in allowed and s.lower().encode("latin-1") in lowered]


def _elements(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _elements(item)


@pytest.mark.parametrize("options", [BASIC, MODIFIED_DATES, ALL_THREE])
def test_no_phi_in_any_byte_and_pixels_untouched(options: ProfileOptions) -> None:
    ds = make_source()
    Pseudonymizer(KEY, options).apply(ds)
    written = to_bytes(ds)
    assert _leaks(written) == []
    for uid in ORIGINAL_UIDS:
        assert uid.encode() not in written
    back = pydicom.dcmread(BytesIO(written))
    assert back.PixelData == PIXELS
    assert not any(elem.tag.is_private for elem in _elements(back))
    assert back.PatientIdentityRemoved == "YES"


def test_instance_read_from_an_implicit_vr_file() -> None:
    source = make_source()
    source.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    source.preamble = b"Doe^John".ljust(128, b"\x00")  # a preamble may carry anything
    ds = pydicom.dcmread(BytesIO(to_bytes(source)))
    assert ds.preamble is not None and ds.preamble.startswith(b"Doe^John")
    assert ds[0x00111001].VR in ("UN", "LO")
    record = Pseudonymizer(KEY, ALL_THREE).apply(ds)
    written = to_bytes(ds)
    assert _leaks(written) == []
    assert pydicom.dcmread(BytesIO(written)).PixelData == PIXELS
    assert record.sop_instance_uid == (SOP_UID, ds.file_meta.MediaStorageSOPInstanceUID)
    assert ds.preamble == b"\x00" * 128


def test_retained_device_identity_is_the_only_difference() -> None:
    ds = make_source()
    Pseudonymizer(KEY, DEVICE).apply(ds)
    assert ds.DeviceSerialNumber == "SN-998877"
    assert ds.StationName == "CT-ROOM-3"
    assert _leaks(to_bytes(ds), allowed=("SN-998877", "CT-ROOM-3")) == []


def test_basic_profile_actions() -> None:
    ds = make_source()
    Pseudonymizer(KEY, BASIC).apply(ds)
    for keyword in ("PatientAddress", "PatientTelephoneNumbers", "OtherPatientIDsSequence",
                    "PerformingPhysicianName", "RequestingPhysician", "InstitutionAddress",
                    "InstitutionalDepartmentName", "StudyDescription", "SeriesDescription",
                    "ReferencedPatientSequence", "RequestAttributesSequence", "PatientAge",
                    "PatientWeight", "PatientComments", "IssuerOfPatientID"):
        assert keyword not in ds, keyword
    for keyword in ("AccessionNumber", "StudyID", "ReferringPhysicianName", "StudyDate",
                    "PatientBirthDate", "PatientSex"):
        assert ds[keyword].is_empty, keyword
    assert ds.InstitutionName == "ANONYMIZED"  # X/Z/D: dummy
    assert ds.ContentDate == "19000101"  # Z/D: dummy
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.Modality == "CT" and ds.Manufacturer == "ACME"  # not in the table: kept
    # not in the table, but a local code (99LOCAL): a site's free text, removed without
    # the Clean Descriptors Option
    assert len(ds.ProcedureCodeSequence) == 0


def test_options_keep_characteristics_and_clean_descriptors() -> None:
    ds = make_source()
    Pseudonymizer(KEY, ALL_THREE).apply(ds)
    assert (ds.PatientSex, ds.PatientAge, ds.PatientWeight) == ("M", "054Y", 81.5)
    assert ds.StudyDescription == "CT THORAX for"
    assert ds.SeriesDescription == "AXIAL protocol"
    assert ds.PatientComments == "Patient, born"
    # a local code is a descriptor: kept, known identity removed from its meaning
    assert ds.ProcedureCodeSequence[0].CodeMeaning == "Thorax CT requested by Dr"
    request = ds.RequestAttributesSequence[0]
    assert request.RequestedProcedureDescription == "Requested for"
    assert "ScheduledPerformingPhysicianName" not in request
    assert "RequestedProcedureID" not in request
    assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
    assert [i.CodeValue for i in ds.DeidentificationMethodCodeSequence] == [
        "113100", "113107", "113108", "113105"]
    assert ds.DeidentificationMethod[0] == "dicomnode PS3.15 2026d"


def test_uids_remapped_everywhere_and_consistently() -> None:
    mapper = UIDMapper(KEY)
    first, second = make_source(), make_source(sop_uid="1.2.826.0.1.3680043.8.498.2000")
    record1 = Pseudonymizer(KEY, BASIC).apply(first)
    record2 = Pseudonymizer(KEY, ALL_THREE).apply(second)
    assert first.StudyInstanceUID == second.StudyInstanceUID == mapper.pseudonymize(STUDY_UID)
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    assert first.FrameOfReferenceUID == mapper.pseudonymize(FOR_UID)
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.file_meta.MediaStorageSOPInstanceUID == first.SOPInstanceUID
    assert "SourceApplicationEntityTitle" not in first.file_meta
    ref = first.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert ref == second.SourceImageSequence[0].ReferencedSOPInstanceUID
    assert ref == mapper.pseudonymize(REF_SOP_UID)
    for ds in (first, second):
        for elem in _elements(ds):
            if elem.VR == "UI" and "ClassUID" not in elem.keyword:
                assert elem.value.startswith("2.25.") and UID(elem.value).is_valid
                assert len(elem.value) <= 64
    assert record1.study_instance_uid == (STUDY_UID, first.StudyInstanceUID)
    assert record1.series_instance_uid == (SERIES_UID, first.SeriesInstanceUID)
    assert record1.sop_instance_uid == (SOP_UID, first.SOPInstanceUID)
    assert record1.frame_of_reference_uid == (FOR_UID, first.FrameOfReferenceUID)
    assert record1.uid_map[REF_SOP_UID] == ref
    assert record1.uid_map[STUDY_UID] == record2.uid_map[STUDY_UID]


def test_patient_pseudonyms_and_record() -> None:
    ds = make_source()
    record = Pseudonymizer(KEY, BASIC).apply(ds)
    mapper = UIDMapper(KEY)
    assert ds.PatientID == mapper.pseudonym("PID-4711-X", "PatientID")
    assert ds.PatientID == record.pseudonymous_patient_id
    assert str(ds.PatientName) == record.pseudonymous_patient_name
    assert record.original_patient_id == "PID-4711-X"
    assert record.original_patient_name == "Doe^John^Johnathan"
    assert record.date_offset_days is None
    study = record.patient_study
    assert study["PatientBirthDate"] == "19700101"
    assert study["PatientSex"] == "M"
    assert study["AccessionNumber"] == "ACC-20240315-01"
    assert study["IssuerOfPatientID"] == "Springfield"
    assert study["ReferringPhysicianName"] == "Smith^Alice"
    assert study["StudyDescription"] == "CT THORAX for Doe John"
    assert study["PatientIdentityRemoved"] is None
    assert json.loads(json.dumps(record.to_json_dict())) == record.to_json_dict()
    assert "Doe" not in repr(record) and "PID-4711" not in repr(record)
    other = make_source()
    other_record = Pseudonymizer(OTHER_KEY, BASIC).apply(other)
    assert other.PatientID != ds.PatientID
    assert other.PatientName != ds.PatientName
    assert other.StudyInstanceUID != ds.StudyInstanceUID
    assert other_record.original_patient_id == record.original_patient_id


def test_modified_dates_shift_consistently() -> None:
    early, late = make_source("20240101"), make_source("20240315", sop_uid="1.2.3.4.5")
    record = Pseudonymizer(KEY, MODIFIED_DATES).apply(early)
    Pseudonymizer(KEY, MODIFIED_DATES).apply(late)
    offset = record.date_offset_days
    assert offset == UIDMapper(KEY).date_offset_days("PID-4711-X")
    assert offset is not None and -3650 <= offset <= -365

    def day(value: str) -> dt.date:
        return dt.datetime.strptime(value[:8], "%Y%m%d").date()

    assert day(early.StudyDate) == dt.date(2024, 1, 1) + dt.timedelta(days=offset)
    assert (day(late.StudyDate) - day(early.StudyDate)).days == 74  # interval preserved
    for ds in (early, late):
        dates = {day(e.value) for e in _elements(ds) if e.VR in ("DA", "DT") and e.value}
        assert dates == {day(ds.StudyDate)}  # every date moved with the study date
        assert ds.AcquisitionDateTime.endswith("102100.000000+0100")
        assert ds.StudyTime == "101500"  # times kept: whole days shifted
    assert early.PatientBirthDate == ""  # birth date is Z even with the option
    other = make_source("20240101", patient_id="SOMEONE-ELSE")
    other_offset = Pseudonymizer(KEY, MODIFIED_DATES).apply(other).date_offset_days
    assert other_offset is not None and other_offset != offset  # per patient
    assert day(other.StudyDate) == dt.date(2024, 1, 1) + dt.timedelta(days=other_offset)


def test_safe_private_retained_only_when_listed() -> None:
    options = ProfileOptions(False, False, False, retain_safe_private=True,
                             safe_private=frozenset({(0x0011, "ACME PRIVATE", 0x02)}))
    ds = make_source()
    Pseudonymizer(KEY, options).apply(ds)
    private = {e.tag: e.value for e in ds if e.tag.is_private}
    assert private == {0x00110010: "ACME PRIVATE", 0x00111002: "PRIVATE-ID-555"}


def test_fallback_and_errors() -> None:
    ds = make_source(patient_id="")
    record = Pseudonymizer(KEY, BASIC).apply(ds)
    assert ds.PatientID.startswith("DN")
    assert record.original_patient_id == ""
    no_study = make_source()
    del no_study.StudyInstanceUID
    with pytest.raises(PseudonymizationError, match="no StudyInstanceUID"):
        Pseudonymizer(KEY, BASIC).apply(no_study)
    with pytest.raises(ValueError, match="at least 16"):
        Pseudonymizer(b"short", BASIC)
    with pytest.raises(TypeError, match="ProfileOptions"):
        Pseudonymizer(KEY, None)  # type: ignore[arg-type]


_CHILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_deid_data import KEY, make_source
from dicomnode.deid import Pseudonymizer, ProfileOptions
ds = make_source()
record = Pseudonymizer(KEY, ProfileOptions(True, True, True)).apply(ds)
print(json.dumps(record.to_json_dict(), sort_keys=True))
"""


def test_deterministic_across_processes() -> None:
    ds = make_source()
    record = Pseudonymizer(KEY, ALL_THREE).apply(ds)
    tests_dir = str(Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", _CHILD, tests_dir], check=True,
                         capture_output=True, text=True, timeout=60).stdout
    assert json.loads(out) == json.loads(json.dumps(record.to_json_dict(), sort_keys=True))
