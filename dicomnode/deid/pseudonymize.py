"""Pseudonymize a dataset in place by PS3.15 Annex E Table E.1-1, keyed and reversibly.

Per element, at every nesting level (see :mod:`dicomnode.deid.profile` for how the table
and options give one action):

* ``X`` remove; ``Z`` empty; ``D`` dummy value (a sequence: every value in it replaced by a
  dummy, UIDs remapped); ``K`` keep (a sequence is processed item by item);
* ``U`` replace the UID(s) by :meth:`UIDMapper.pseudonymize` (the same input always gives the
  same output, so references between instances stay consistent); a sequence is processed;
* ``C`` clean: dates (DA, DT) shifted by the patient's keyed offset, times kept, text
  scrubbed of known identity (:mod:`dicomnode.deid.redact`), binary values removed, a
  sequence processed;
* not in the table: sequences processed, person names (PN) emptied, free text scrubbed,
  dates shifted when the modified-dates option is on, values of unknown VR (UN) removed,
  everything else kept;
* without the Clean Descriptors Option, code items of a local coding scheme (designator
  ``99...``, ``L`` or ``LOCAL``: their meanings are a site's free text, e.g. local
  procedure codes) are removed from every sequence; standard codes (DCM, SCT, LN...) stay;
* private attributes removed (unless listed as safe under the Retain Safe Private Option),
  and so are group lengths (gggg,0000), retired and wrong once values change.

PatientID and PatientName, wherever they occur, become keyed pseudonyms. Pixel data and the
other image attributes are not touched. The file meta MediaStorageSOPInstanceUID follows
SOPInstanceUID; its source / sending / receiving AE titles and private information are
removed; a file preamble is zeroed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag, Tag

from dicomnode.deid.profile import EDITION, Action, ActionTable, ProfileOptions
from dicomnode.deid.record import PseudonymizationRecord, capture_patient_study
from dicomnode.deid.redact import Redactor, collect_identity
from dicomnode.deid.uids import UIDMapper
from dicomnode.deid.values import (
    BINARY_VRS,
    TEXT_VRS,
    dummy_value,
    empty_value,
    shift_date,
    shift_datetime,
)

__all__ = ["PseudonymizationError", "Pseudonymizer"]

_PATIENT_ID: Final[BaseTag] = Tag("PatientID")
_PATIENT_NAME: Final[BaseTag] = Tag("PatientName")
_META_REMOVED: Final[tuple[str, ...]] = (
    "SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation",
)


#: UIDs under this root are defined by DICOM itself (PS3.6 Annex A), never by a site.
_STANDARD_UID_ROOT = "1.2.840.10008."


class PseudonymizationError(Exception):
    """A dataset that cannot be pseudonymized (no value of it is in the message)."""


@dataclass
class _Run:
    """State of one :meth:`Pseudonymizer.apply` call."""

    offset: int
    shift_dates: bool
    redactor: Redactor
    patient_id: str
    pseudo_patient_id: str
    patient_name: str
    pseudo_patient_name: str
    uid_map: dict[str, str] = field(default_factory=dict)


def _values(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple, MultiValue)):
        return list(value)
    return [value]


def _local_code(item: Dataset) -> bool:
    """Whether ``item`` is a code of a local (private) coding scheme (PS3.3 8.2)."""
    scheme = str(item.get("CodingSchemeDesignator", "") or "").strip().upper()
    return scheme.startswith("99") or scheme in ("L", "LOCAL")


def _set_values(elem: DataElement, values: list[Any]) -> None:
    elem.value = values[0] if len(values) == 1 else values


class Pseudonymizer:
    """Apply the Basic Profile with ``options``, keyed by ``key`` (at least 16 bytes)."""

    def __init__(self, key: bytes, options: ProfileOptions) -> None:
        if not isinstance(options, ProfileOptions):
            raise TypeError("options must be a ProfileOptions")
        self._mapper = UIDMapper(key)
        self._options = options
        self._table = ActionTable(options)

    def __repr__(self) -> str:
        return f"Pseudonymizer(key=<hidden>, options={self._options!r})"

    @property
    def options(self) -> ProfileOptions:
        """The profile options in force."""
        return self._options

    def apply(self, ds: Dataset) -> PseudonymizationRecord:
        """Pseudonymize ``ds`` in place; return what re-identification needs."""
        if not isinstance(ds, Dataset):
            raise TypeError("apply() needs a pydicom Dataset")
        study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
        if not study_uid:
            raise PseudonymizationError("the dataset has no StudyInstanceUID")
        patient_id = str(ds.get("PatientID", "") or "").strip()
        patient_name = str(ds.get("PatientName", "") or "")
        # an instance without PatientID is its study's own patient, never everybody's
        basis = patient_id or f"\x00study\x00{study_uid}"
        patient_study = capture_patient_study(ds)
        originals = {k: str(ds.get(k, "") or "") for k in
                     ("SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")}
        run = _Run(
            offset=self._mapper.date_offset_days(basis),
            shift_dates=self._options.retain_longitudinal_temporal_modified_dates,
            redactor=collect_identity(ds, self._table),
            patient_id=patient_id,
            pseudo_patient_id=self._mapper.pseudonym(basis, "PatientID"),
            patient_name=patient_name,
            # a family name only: the caret says so (PS3.5 6.2.1.2), viewers and highdicom
            # otherwise take one component for an unstructured name
            pseudo_patient_name=self._mapper.pseudonym(basis, "PatientName") + "^",
        )
        self._process(ds, run)
        ds.PatientID = run.pseudo_patient_id
        ds.PatientName = run.pseudo_patient_name
        self._mark(ds)
        self._file_meta(ds, run)

        def pair(original: str) -> tuple[str, str]:
            return (original, run.uid_map.get(original, original))

        frame_of_reference = originals["FrameOfReferenceUID"]
        return PseudonymizationRecord(
            original_patient_id=patient_id,
            pseudonymous_patient_id=run.pseudo_patient_id,
            original_patient_name=patient_name,
            pseudonymous_patient_name=run.pseudo_patient_name,
            date_offset_days=run.offset if run.shift_dates else None,
            study_instance_uid=pair(study_uid),
            series_instance_uid=pair(originals["SeriesInstanceUID"]),
            sop_instance_uid=pair(originals["SOPInstanceUID"]),
            frame_of_reference_uid=pair(frame_of_reference) if frame_of_reference else None,
            uid_map=dict(run.uid_map),
            patient_study=patient_study,
        )

    # -- walking -------------------------------------------------------------------------

    def _process(self, ds: Dataset, run: _Run) -> None:
        self._private(ds)
        for tag in list(ds.keys()):
            if tag.element == 0x0000:  # group length (retired): wrong once values change
                del ds[tag]
                continue
            elem = ds[tag]
            if tag == _PATIENT_ID:
                self._pseudonym(elem, run.patient_id, run.pseudo_patient_id, "PatientID")
                continue
            if tag == _PATIENT_NAME:
                self._pseudonym(elem, run.patient_name, run.pseudo_patient_name, "PatientName")
                continue
            action = self._table.action_for(tag, elem.VR)
            if action is None:
                self._unlisted(ds, elem, run)
            else:
                self._act(ds, elem, action, run)

    def _items(self, elem: DataElement, run: _Run) -> None:
        items = elem.value or ()
        if not self._options.clean_descriptors and any(_local_code(i) for i in items):
            elem.value = Sequence([i for i in items if not _local_code(i)])
        for item in elem.value or ():
            self._process(item, run)

    def _act(self, ds: Dataset, elem: DataElement, action: Action, run: _Run) -> None:
        vr = elem.VR
        if action == "X":
            del ds[elem.tag]
        elif action == "Z":
            elem.value = Sequence() if vr == "SQ" else empty_value(vr)
        elif action == "D":
            self._dummy(elem, run)
        elif action == "U":
            if vr == "UI":
                self._remap(elem, run)
            elif vr == "SQ":
                self._items(elem, run)
            else:
                elem.value = empty_value(vr)
        elif vr == "SQ":  # K or C
            self._items(elem, run)
        elif action == "C":
            self._clean(ds, elem, run)

    def _unlisted(self, ds: Dataset, elem: DataElement, run: _Run) -> None:
        vr = elem.VR
        if vr == "SQ":
            self._items(elem, run)
        elif vr == "PN":
            elem.value = empty_value(vr)
        elif vr == "UN":
            del ds[elem.tag]
        elif vr in TEXT_VRS:
            self._scrub(elem, run)
        elif vr in ("DA", "DT") and run.shift_dates:
            self._shift(elem, run)

    def _clean(self, ds: Dataset, elem: DataElement, run: _Run) -> None:
        vr = elem.VR
        if vr in ("DA", "DT"):
            if run.shift_dates:
                self._shift(elem, run)
        elif vr in TEXT_VRS or vr == "AE":
            self._scrub(elem, run)
        elif vr in BINARY_VRS:
            del ds[elem.tag]
        # TM and everything else: kept (dates move by whole days, times stay valid)

    # -- values --------------------------------------------------------------------------

    def _private(self, ds: Dataset) -> None:
        private = [tag for tag in ds.keys() if tag.is_private]
        if not private:
            return
        keep: set[BaseTag] = set()
        safe = self._options.safe_private
        if self._table.private_action != "X" and safe:
            for tag in private:
                if tag.element <= 0xFF:
                    continue
                creator_tag = Tag(tag.group, tag.element >> 8)
                creator = ds.get(creator_tag)
                name = str(creator.value).strip() if creator is not None else ""
                if (tag.group, name, tag.element & 0xFF) in safe:
                    keep.update((tag, creator_tag))
        for tag in private:
            if tag not in keep:
                del ds[tag]

    def _pseudonym(self, elem: DataElement, original: str, pseudo: str, kind: str) -> None:
        value = str(elem.value or "").strip()
        if not value:
            return
        elem.value = pseudo if value == original.strip() else self._mapper.pseudonym(value, kind)

    def _remap(self, elem: DataElement, run: _Run) -> None:
        new: list[Any] = []
        for uid in _values(elem.value):
            text = str(uid).strip()
            if text.startswith(_STANDARD_UID_ROOT):
                # a UID the standard defines (a SOP class in a reference, a transfer syntax,
                # a coding scheme) identifies nothing; remapping it breaks the reference
                new.append(text)
            elif text:
                mapped = run.uid_map.get(text)
                if mapped is None:
                    mapped = run.uid_map[text] = self._mapper.pseudonymize(text)
                new.append(mapped)
            else:
                new.append(text)
        if new:
            _set_values(elem, new)

    def _shift(self, elem: DataElement, run: _Run) -> None:
        shift = shift_date if elem.VR == "DA" else shift_datetime
        new: list[str] = []
        for value in _values(elem.value):
            try:
                new.append(shift(str(value), run.offset) if str(value).strip() else "")
            except ValueError:
                new.append("")  # an unreadable date is not kept
        if new:
            _set_values(elem, new)

    def _scrub(self, elem: DataElement, run: _Run) -> None:
        values = _values(elem.value)
        if values and all(isinstance(v, str) for v in values):
            _set_values(elem, [run.redactor.scrub(v) for v in values])

    def _dummy(self, elem: DataElement, run: _Run) -> None:
        vr = elem.VR
        if vr == "UI":
            self._remap(elem, run)
        elif vr == "SQ":
            for item in elem.value or ():
                self._dummy_dataset(item, run)
        else:
            elem.value = dummy_value(vr)

    def _dummy_dataset(self, ds: Dataset, run: _Run) -> None:
        for tag in list(ds.keys()):
            elem = ds[tag]
            if tag.is_private:
                del ds[tag]
            elif elem.VR in ("SQ", "UI"):
                self._dummy(elem, run)
            elif elem.VR in ("PN", "DA", "DT", "TM", "AE", "UR") or elem.VR in TEXT_VRS:
                elem.value = dummy_value(elem.VR)

    # -- markers and file meta -----------------------------------------------------------

    def _mark(self, ds: Dataset) -> None:
        codes = self._options.method_codes()
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = [f"dicomnode PS3.15 {EDITION}", *(m for _c, m in codes)]
        items = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            items.append(item)
        ds.DeidentificationMethodCodeSequence = Sequence(items)
        ds.LongitudinalTemporalInformationModified = (
            "MODIFIED" if self._options.retain_longitudinal_temporal_modified_dates
            else "REMOVED"
        )

    def _file_meta(self, ds: Dataset, run: _Run) -> None:
        preamble = getattr(ds, "preamble", None)
        if preamble:
            ds.preamble = b"\x00" * 128
        meta = getattr(ds, "file_meta", None)
        if not meta:
            return
        for keyword in _META_REMOVED:
            if keyword in meta:
                del meta[keyword]
        if "MediaStorageSOPInstanceUID" in meta:
            self._remap(meta["MediaStorageSOPInstanceUID"], run)
