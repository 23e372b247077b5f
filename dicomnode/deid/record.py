"""What re-identification needs, captured while pseudonymizing one instance.

:class:`PseudonymizationRecord` holds patient identity: it must be stored only where
identity may be stored (the node's index), never logged. Its ``repr`` shows no identity.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

__all__ = [
    "PATIENT_STUDY_KEYWORDS",
    "PseudonymizationRecord",
    "capture_patient_study",
    "element_from_json",
]

#: Attributes of the Patient, General Study and Patient Study modules (plus the
#: de-identification markers) whose original values are kept for re-identification.
PATIENT_STUDY_KEYWORDS: Final[tuple[str, ...]] = (
    # Patient module
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime", "PatientSex",
    "OtherPatientIDsSequence", "OtherPatientNames", "PatientComments",
    "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    # General Study module
    "StudyDate", "StudyTime", "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianName", "StudyID",
    "AccessionNumber", "IssuerOfAccessionNumberSequence", "StudyDescription",
    "PhysiciansOfRecord", "NameOfPhysiciansReadingStudy", "RequestingService",
    "ProcedureCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    # Patient Study module
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight",
    "Occupation", "AdditionalPatientHistory", "EthnicGroup", "PatientSexNeutered",
    "SmokingStatus", "PregnancyStatus", "MedicalAlerts", "Allergies",
    # set by pseudonymization, restored (or removed) by re-identification
    "LongitudinalTemporalInformationModified",
)


def _scalar(value: Any) -> Any:
    if type(value) in (int, float):
        return value
    if isinstance(value, (bytes, bytearray)):
        raise ValueError("binary values are not captured")
    return str(value)  # text, PersonName, and DSfloat / IS with their original text


def element_to_json(elem: DataElement) -> Any:
    """A JSON-serialisable form of ``elem``'s value.

    Text and numbers become strings (numbers with their original text) or ints, multiple
    values a list, a sequence a list of DICOM JSON model datasets (PS3.18 F.2).
    """
    if elem.VR == "SQ":
        return [item.to_json_dict() for item in elem.value]
    value = elem.value
    if value is None or value == "":
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return [_scalar(v) for v in value]
    return _scalar(value)


def element_from_json(keyword: str, value: Any) -> DataElement:
    """The data element ``keyword`` with a value made by :func:`element_to_json`."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(f"unknown DICOM keyword {keyword!r}")
    vr = dictionary_VR(tag)
    if vr == "SQ":
        if not isinstance(value, list):
            raise ValueError(f"{keyword}: a sequence must be a list of JSON datasets")
        return DataElement(tag, vr, Sequence([Dataset.from_json(item) for item in value]))
    if isinstance(value, (dict, bool)):
        raise ValueError(f"{keyword}: unexpected JSON value type {type(value).__name__}")
    return DataElement(tag, vr, value)


def capture_patient_study(ds: Dataset) -> dict[str, Any]:
    """Original values of :data:`PATIENT_STUDY_KEYWORDS` (None: absent) at the top level."""
    captured: dict[str, Any] = {}
    for keyword in PATIENT_STUDY_KEYWORDS:
        captured[keyword] = element_to_json(ds[keyword]) if keyword in ds else None
    return captured


@dataclass(frozen=True, repr=False)
class PseudonymizationRecord:
    """Original and pseudonymous identity of one pseudonymized instance.

    ``*_uid`` fields are (original, pseudonymous) pairs; ``frame_of_reference_uid`` is None
    when the instance has none. ``uid_map`` maps every original UID replaced anywhere in
    the instance (file meta and nested sequences included) to its pseudonym;
    ``patient_study`` maps each of :data:`PATIENT_STUDY_KEYWORDS` to its original
    JSON-serialisable value, or None when the attribute was absent. ``date_offset_days`` is
    the shift applied to dates, or None when dates were not shifted.
    """

    original_patient_id: str
    pseudonymous_patient_id: str
    original_patient_name: str
    pseudonymous_patient_name: str
    date_offset_days: int | None
    study_instance_uid: tuple[str, str]
    series_instance_uid: tuple[str, str]
    sop_instance_uid: tuple[str, str]
    frame_of_reference_uid: tuple[str, str] | None
    uid_map: Mapping[str, str]
    patient_study: Mapping[str, Any]

    def __repr__(self) -> str:
        return (
            f"PseudonymizationRecord(pseudonymous_patient_id={self.pseudonymous_patient_id!r}, "
            f"pseudonymous_study_uid={self.study_instance_uid[1]!r}, "
            f"uids={len(self.uid_map)}, <identity hidden>)"
        )

    def inverse_uid_map(self) -> dict[str, str]:
        """Pseudonymous UID -> original UID, as :func:`reidentify` takes it."""
        return {pseudo: original for original, pseudo in self.uid_map.items()}

    def to_json_dict(self) -> dict[str, Any]:
        """Everything in the record as JSON-serialisable values."""
        return {
            "original_patient_id": self.original_patient_id,
            "pseudonymous_patient_id": self.pseudonymous_patient_id,
            "original_patient_name": self.original_patient_name,
            "pseudonymous_patient_name": self.pseudonymous_patient_name,
            "date_offset_days": self.date_offset_days,
            "study_instance_uid": list(self.study_instance_uid),
            "series_instance_uid": list(self.series_instance_uid),
            "sop_instance_uid": list(self.sop_instance_uid),
            "frame_of_reference_uid": (None if self.frame_of_reference_uid is None
                                       else list(self.frame_of_reference_uid)),
            "uid_map": dict(self.uid_map),
            "patient_study": dict(self.patient_study),
        }
