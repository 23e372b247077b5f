"""IHE IOCM rejection notes: Key Object Selection Documents that withdraw superseded results.

When a newer version of a job's results has been sent, the objects of the earlier version
(SEG, RTSTRUCT, SR) are withdrawn the way IHE Radiology's Imaging Object Change Management
profile (IOCM, RAD TF-1 42 / RAD TF-3 4.66 "Reject Note") specifies: a Key Object Selection
Document (KOS, SOP class 1.2.840.10008.5.1.4.1.1.88.59) in the same study, whose document
title is a rejection code of CID 7010 (e.g. (113001, DCM, "Rejected for Quality Reasons")),
referencing every rejected instance in its content tree (TID 2010, one IMAGE or COMPOSITE
item per instance) and in the Current Requested Procedure Evidence Sequence (by study,
series, SOP class and instance). Archives that implement IOCM (e.g. dcm4chee) hide the
rejected objects; others store the note beside them.

The note is a new series (Modality KO) of the rejected objects' study with their patient
and study attributes; its Series and SOP Instance UIDs derive from a seed as those of the
other results do (:func:`dicomnode.outputs.source.result_uid`), so building the note again
for the same superseded version gives the same UIDs and a destination keeps no duplicate.
Error messages name items by position, never by a value taken from them.
"""

from __future__ import annotations

import copy
import datetime as dt
import enum
import os
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode import __version__
from dicomnode.models.card import Card
from dicomnode.outputs.algorithm import software_versions
from dicomnode.outputs.source import object_identity, result_uid
from dicomnode.outputs.write import ResultObject
from dicomnode.store.files import write_atomic

__all__ = ["REJECTION_SERIES_NUMBER", "KeyObjectSelectionDocumentStorage", "RejectionReason",
           "build_rejection_note", "write_rejection_note"]

KeyObjectSelectionDocumentStorage = "1.2.840.10008.5.1.4.1.1.88.59"
REJECTION_SERIES_NUMBER = 9904
"""Series Number of rejection notes (SEG 9901, RTSTRUCT 9902, SR 9903)."""


class RejectionReason(enum.Enum):
    """The document titles of CID 7010 that IOCM defines for rejection notes.

    Each value is the code (pydicom's ``codes.DCM``, so value and meaning are the
    standard's). A superseded result is :attr:`QUALITY`.
    """

    QUALITY = codes.DCM.RejectedForQualityReasons  # (113001, DCM)
    PATIENT_SAFETY = codes.DCM.RejectedForPatientSafetyReasons  # (113037, DCM)
    INCORRECT_MODALITY_WORKLIST = codes.DCM.IncorrectModalityWorklistEntry  # (113038, DCM)
    DATA_RETENTION_EXPIRED = codes.DCM.DataRetentionPolicyExpired  # (113039, DCM)

    @property
    def code(self) -> Code:
        """The coded document title."""
        value: Code = self.value
        return value


# Patient, Clinical Trial Subject, General Study and Patient Study attributes copied from the
# first rejected object when it has them (the Type 2 ones are always written, empty if absent)
_PATIENT_STUDY_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex",
                        "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
                        "AccessionNumber")
_PATIENT_STUDY_OPTIONAL = (
    "SpecificCharacterSet", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthTime", "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup",
    "PatientComments", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "ClinicalTrialSiteID", "ClinicalTrialSiteName", "ClinicalTrialSubjectID",
    "ClinicalTrialSubjectReadingID",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "ReferencedStudySequence", "ProcedureCodeSequence",
    "AdmittingDiagnosesDescription", "PatientAge", "PatientSize", "PatientWeight",
    "Occupation", "AdditionalPatientHistory", "PatientSexNeutered",
    "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
)
_NEEDED = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_DESCRIPTION = ("Superseded results of dicomnode: a newer result series of this study "
                "replaces them")


def _uid(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def _check(rejected: Sequence[Dataset]) -> None:
    """Raise ValueError unless ``rejected`` are distinct objects of one study and patient."""
    if isinstance(rejected, Dataset) or not isinstance(rejected, Sequence):
        raise TypeError("rejected must be a sequence of pydicom Datasets (one per object)")
    if len(rejected) == 0:
        raise ValueError("a rejection note needs at least one object to reject: none given")
    first_of_uid: dict[str, int] = {}
    for number, ds in enumerate(rejected, start=1):
        if not isinstance(ds, Dataset):
            raise TypeError(f"rejected object {number} is a {type(ds).__name__}, "
                            "not a pydicom Dataset")
        missing = [k for k in _NEEDED if not _uid(ds, k)]
        if missing:
            raise ValueError(f"rejected object {number} has no {', '.join(missing)}: it "
                             "cannot be referenced")
        sop = _uid(ds, "SOPInstanceUID")
        if sop in first_of_uid:
            raise ValueError(f"rejected objects {first_of_uid[sop]} and {number} have the same "
                             "SOP Instance UID: each object is rejected once")
        first_of_uid[sop] = number
    studies = list(dict.fromkeys(_uid(ds, "StudyInstanceUID") for ds in rejected))
    if len(studies) > 1:
        other = next(n for n, ds in enumerate(rejected, start=1)
                     if _uid(ds, "StudyInstanceUID") != studies[0])
        raise ValueError(f"the rejected objects belong to {len(studies)} studies (object 1 "
                         f"and object {other} differ): a rejection note covers one study")
    patients = list(dict.fromkeys(str(ds.get("PatientID", "") or "") for ds in rejected))
    if len(patients) > 1:
        other = next(n for n, ds in enumerate(rejected, start=1)
                     if str(ds.get("PatientID", "") or "") != patients[0])
        raise ValueError(f"the rejected objects of one study carry {len(patients)} Patient IDs "
                         f"(object 1 and object {other} differ)")


def _reference(ds: Dataset) -> Dataset:
    """What the note needs of one rejected object: its place in the hierarchy, and whether
    it is an image (IMAGE content item) or not (COMPOSITE)."""
    ref = Dataset()
    for keyword in _NEEDED:
        setattr(ref, keyword, _uid(ds, keyword))
    if "Rows" in ds and "Columns" in ds:  # an image IOD (SEG): highdicom makes it IMAGE
        ref.Rows, ref.Columns = ds.Rows, ds.Columns
    return ref


def _copy_patient_study(target: Dataset, source: Dataset) -> None:
    """Copies, never the source's elements themselves: changing the note (re-identifying
    it) must leave the rejected objects' datasets as they are."""
    for keyword in _PATIENT_STUDY_TYPE2:
        elem = source.data_element(keyword) if keyword in source else None
        if elem is not None:
            target[elem.tag] = copy.deepcopy(elem)
        else:
            setattr(target, keyword, "")
    for keyword in _PATIENT_STUDY_OPTIONAL:
        if keyword in source:
            elem = source.data_element(keyword)
            if elem is not None:
                target[elem.tag] = copy.deepcopy(elem)


def build_rejection_note(
    rejected: Sequence[Dataset],
    *,
    seed: str,
    series_description: str,
    series_number: int = REJECTION_SERIES_NUMBER,
    reason: RejectionReason = RejectionReason.QUALITY,
    card: Card | None = None,
    description: str | None = _DESCRIPTION,
    now: dt.datetime | None = None,
) -> hd.ko.KeyObjectSelectionDocument:
    """An IOCM rejection note (Key Object Selection Document) withdrawing ``rejected``.

    Args:
        rejected: the superseded objects of one study (SEG, RTSTRUCT, SR: any SOP class),
            whole or read up to their pixel data. The patient and study attributes are
            copied from the first.
        seed: what the note's Series and SOP Instance UIDs derive from (e.g. the job's key
            and the superseded version); the same seed gives the same UIDs.
        series_description: the note's Series Description (LO: cut to 64 characters).
        series_number: the note's Series Number (positive).
        reason: the document title (CID 7010); :attr:`RejectionReason.QUALITY` for results
            superseded by a newer version.
        card: the model whose results are rejected: Manufacturer Model Name and Software
            Versions then name it as the results do; without it they name dicomnode only.
        description: the Key Object Description (TEXT, 113012) of the note; None for none.
        now: the Content Date and Time written (default: the current local time).

    Raises:
        ValueError: ``rejected`` is empty, holds an object twice (by SOP Instance UID),
            spans several studies or patients, or an object lacks a UID it is referenced
            by; ``seed`` is empty; ``series_number`` is not positive.
        TypeError: ``rejected`` is not a sequence of datasets.
    """
    _check(rejected)
    if not seed:
        raise ValueError("the seed of a rejection note's UIDs must not be empty")
    if series_number < 1:
        raise ValueError(f"series_number must be positive, not {series_number}")
    now = now or dt.datetime.now()
    references = [_reference(ds) for ds in rejected]
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid("device", "dicomnode"), name="dicomnode"))
    content = hd.ko.KeyObjectSelection(
        document_title=reason.code,
        referenced_objects=references,
        observer_device_context=observer,
        description=description[:1024] if description else None,
    )
    identity = object_identity(seed, "KO", series_number)
    first = rejected[0]
    note = hd.ko.KeyObjectSelectionDocument(
        # patient identity is copied below, as it is: highdicom would check (and log) it
        evidence=[_with_blank_patient(references[0]), *references[1:]],
        content=content,
        **identity,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        manufacturer_model_name=(card.name if card else "dicomnode")[:64],
        software_versions=(software_versions(card) if card else f"dicomnode {__version__}"),
        device_serial_number="0",
        series_description=series_description[:64] or "rejection note",
        content_date=now.date(),
        content_time=now.time().replace(microsecond=0),
        series_date=now.date(),
        series_time=now.time().replace(microsecond=0),
    )
    _copy_patient_study(note, first)
    return note


def _with_blank_patient(ref: Dataset) -> Dataset:
    """``ref`` with empty patient and study values for highdicom's constructor (which
    validates and logs the patient's name): the real ones are copied afterwards."""
    blank = copy.deepcopy(ref)
    for keyword in _PATIENT_STUDY_TYPE2:
        setattr(blank, keyword, None)
    return blank


def write_rejection_note(note: Dataset, path: str | os.PathLike[str]) -> ResultObject:
    """Write ``note`` to ``path`` atomically (temporary name, fsync, rename).

    Returns the written object as :func:`dicomnode.outputs.write.write_results` describes
    its results, with kind ``KO``. ``path`` must carry no patient identity (e.g.
    ``rejection-2.dcm`` in the job's folder).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, lambda fp: note.save_as(fp, enforce_file_format=True))
    return ResultObject("KO", target, str(note.SOPClassUID), str(note.SOPInstanceUID),
                        str(note.SeriesInstanceUID))
