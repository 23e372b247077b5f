"""Synthetic PHI-laden datasets for the deid tests (and a check that they are what they claim).

Every identity string a test must not find after pseudonymization is in :data:`PHI`; the
dataset puts each of them somewhere a real instance could carry it: top-level attributes,
private blocks, nested sequences, free text.
"""

from __future__ import annotations

from io import BytesIO

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian

KEY = b"test-key-0123456789abcdef"
OTHER_KEY = b"another-key-0123456789abcdef"

STUDY_UID = "1.2.826.0.1.3680043.8.498.1001"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1002"
SOP_UID = "1.2.826.0.1.3680043.8.498.1003"
FOR_UID = "1.2.826.0.1.3680043.8.498.1004"
REF_SOP_UID = "1.2.826.0.1.3680043.8.498.1005"
PIXELS = bytes(range(256)) * 8  # 2048 bytes: 32 x 32 x 16 bit

#: Strings that must not survive pseudonymization in any byte of the written file, in any
#: letter case.
PHI = (
    "Doe^John", "DOE^JOHN", "DOE", "Doe", "John", "Johnathan", "PID-4711-X", "OLDID-0815",
    "ALT-PID-99", "19700101", "1970-01-01", "Elm Street 42", "Springfield", "+1-555-0100",
    "Smith^Alice", "Smith", "Alice", "Jones^Bob", "Jones", "Requester^Carol", "Carol",
    "Operator^Dave", "Dave", "St Mercy General", "Mercy", "Radiology West Wing",
    "ACC-20240315-01", "STUDY-77", "CT-ROOM-3", "SN-998877", "Private Doe Info",
    "PRIVATE-ID-555", "Reader^Eve", "Eve", "Nurse^Frank", "Frank", "Grace", "20240315",
    "Consulting^Grace", "Requested for Doe", "Insurance Plan Hank", "Hank",
)


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = "99LOCAL"
    item.CodeMeaning = meaning
    return item


def make_source(
    study_date: str = "20240315", patient_id: str = "PID-4711-X", sop_uid: str = SOP_UID
) -> Dataset:
    """A CT instance full of identity, with file meta and 16-bit pixel data."""
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.SourceApplicationEntityTitle = "CT-ROOM-3"
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.FrameOfReferenceUID = FOR_UID
    ds.Modality = "CT"
    ds.Manufacturer = "ACME"
    # patient
    ds.PatientName = "Doe^John^Johnathan"
    ds.PatientID = patient_id
    ds.IssuerOfPatientID = "Springfield"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "M"
    ds.PatientAge = "054Y"
    ds.PatientWeight = "81.5"
    ds.PatientAddress = "Elm Street 42, Springfield"
    ds.PatientTelephoneNumbers = "+1-555-0100"
    ds.OtherPatientNames = "DOE^JOHN"
    ds.OtherPatientIDs = "OLDID-0815"
    other = Dataset()
    other.PatientID = "ALT-PID-99"
    other.IssuerOfPatientID = "Springfield"
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.PatientComments = "Patient John Doe, born 1970-01-01"
    # study / series
    ds.StudyDate = study_date
    ds.StudyTime = "101500"
    ds.SeriesDate = study_date
    ds.SeriesTime = "102000"
    ds.AcquisitionDate = study_date
    ds.AcquisitionTime = "102100"
    ds.ContentDate = study_date
    ds.ContentTime = "102200"
    ds.AcquisitionDateTime = study_date + "102100.000000+0100"
    ds.InstanceCreationDate = study_date
    ds.AccessionNumber = "ACC-20240315-01"
    ds.StudyID = "STUDY-77"
    ds.ReferringPhysicianName = "Smith^Alice"
    ds.ConsultingPhysicianName = "Consulting^Grace"
    ds.PerformingPhysicianName = "Jones^Bob"
    ds.RequestingPhysician = "Requester^Carol"
    ds.OperatorsName = "Operator^Dave"
    ds.NameOfPhysiciansReadingStudy = "Reader^Eve"
    ds.InstitutionName = "St Mercy General"
    ds.InstitutionAddress = "Elm Street 42, Springfield"
    ds.InstitutionalDepartmentName = "Radiology West Wing"
    ds.StationName = "CT-ROOM-3"
    ds.DeviceSerialNumber = "SN-998877"
    ds.StudyDescription = "CT THORAX for Doe John"
    ds.SeriesDescription = "AXIAL Smith protocol"
    ds.ProcedureCodeSequence = Sequence([_code("P-1", "Thorax CT requested by Dr Smith")])
    # nested identity
    ref_patient = Dataset()
    ref_patient.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"
    ref_patient.ReferencedSOPInstanceUID = REF_SOP_UID
    ref_patient.PatientName = "Doe^John"
    ds.ReferencedPatientSequence = Sequence([ref_patient])
    request = Dataset()
    request.RequestedProcedureID = "ACC-20240315-01"
    request.RequestedProcedureDescription = "Requested for Doe"
    request.ScheduledProcedureStepID = "STUDY-77"
    request.ScheduledPerformingPhysicianName = "Nurse^Frank"
    request.ScheduledProcedureStepStartDate = study_date
    ds.RequestAttributesSequence = Sequence([request])
    plan = Dataset()
    plan.InsurancePlanIdentification = "Insurance Plan Hank"  # retired, still identity
    ds.PatientInsurancePlanCodeSequence = Sequence([_code("INS", "Insurance Plan Hank")])
    # a reference kept by the profile (X/Z/U*): its UIDs must be remapped
    source = Dataset()
    source.ReferencedSOPClassUID = CTImageStorage
    source.ReferencedSOPInstanceUID = REF_SOP_UID
    ds.SourceImageSequence = Sequence([source])
    # private block with identity
    block = ds.private_block(0x0011, "ACME PRIVATE", create=True)
    block.add_new(0x01, "LO", "Private Doe Info")
    block.add_new(0x02, "SH", "PRIVATE-ID-555")
    nested_private = Dataset()
    nested_private.add_new(0x00290010, "LO", "ACME NESTED")
    nested_private.add_new(0x00291001, "LO", "Doe^John")
    ds.add_new(0x00291010, "SQ", Sequence([nested_private]))
    ds.add_new(0x00290010, "LO", "ACME NESTED")
    # image
    ds.Rows = 32
    ds.Columns = 32
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = PIXELS
    return ds


def to_bytes(ds: Dataset) -> bytes:
    """``ds`` written as a DICOM file."""
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_source_carries_all_phi() -> None:
    """The fixture really contains every PHI string (so their absence later means work)."""
    written = to_bytes(make_source())
    missing = [s for s in PHI if s.encode("latin-1") not in written]
    assert b"DOE^JOHN" in written
    assert missing == []
    assert pydicom.dcmread(BytesIO(written)).PixelData == PIXELS
