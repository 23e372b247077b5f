"""Give a result made from pseudonymized inputs (SEG, RTSTRUCT...) its original identity.

The result keeps its own new UIDs (its SOP Instance UID, Series Instance UID): only UIDs the
map knows are replaced. A result whose StudyInstanceUID the map does not know must never
reach a clinical peer, so it raises :class:`ReidentificationError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from dicomnode.deid.record import element_from_json

__all__ = ["ReidentificationError", "reidentify"]


class ReidentificationError(Exception):
    """A result that cannot be given back its original identity (no value in the message)."""


def _map_element(elem: DataElement, uid_map: Mapping[str, str]) -> None:
    value = elem.value
    if isinstance(value, (list, tuple, MultiValue)):
        mapped = [uid_map.get(str(v).strip(), v) for v in value]
        if mapped != list(value):
            elem.value = mapped
    elif value:
        original = uid_map.get(str(value).strip())
        if original is not None:
            elem.value = original


def _map_uids(ds: Dataset, uid_map: Mapping[str, str]) -> None:
    """Replace every UID of ``ds`` and its nested sequences that ``uid_map`` knows."""
    stack = [ds]
    while stack:
        current = stack.pop()
        for tag in list(current.keys()):
            raw = current.get_item(tag)
            # only sequences and UIDs matter: other elements read from a file stay raw
            # (an RTSTRUCT's Contour Data would otherwise be parsed value by value)
            if raw is not None and raw.VR not in (None, "SQ", "UI", "UN"):
                continue
            elem = current[tag]
            if elem.VR == "SQ":
                stack.extend(item for item in elem.value if isinstance(item, Dataset))
            elif elem.VR == "UI":
                _map_element(elem, uid_map)


def reidentify(ds: Dataset, uid_map: Mapping[str, str],
               patient_study: Mapping[str, Any]) -> None:
    """Restore ``ds`` in place: map UIDs back and restore the patient and study modules.

    ``uid_map`` maps pseudonymous UIDs to original ones (see
    ``PseudonymizationRecord.inverse_uid_map``; for a study made of many instances, the union
    of their maps). ``patient_study`` is ``PseudonymizationRecord.patient_study``: each
    attribute is set to its original value, or removed when it was originally absent (so
    the de-identification markers disappear unless the original carried them).
    """
    if not isinstance(ds, Dataset):
        raise TypeError("reidentify() needs a pydicom Dataset")
    if not isinstance(uid_map, Mapping) or not isinstance(patient_study, Mapping):
        raise TypeError("uid_map and patient_study must be mappings")
    study_uid = str(ds.get("StudyInstanceUID", "") or "").strip()
    if not study_uid:
        raise ReidentificationError("the result has no StudyInstanceUID")
    if study_uid not in uid_map:
        raise ReidentificationError(
            "the result's StudyInstanceUID is not a known pseudonymous study UID; it must "
            "not be sent to a clinical peer"
        )
    if "PatientID" not in patient_study:
        raise ReidentificationError("patient_study has no original PatientID")
    try:
        restored = [(keyword, None if value is None else element_from_json(keyword, value))
                    for keyword, value in patient_study.items()]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # the exception text may quote identity: name only its type
        raise ReidentificationError(
            f"patient_study is malformed ({type(exc).__name__})"
        ) from None
    _map_uids(ds, uid_map)
    meta = getattr(ds, "file_meta", None)
    if meta:
        _map_uids(meta, uid_map)
    for keyword, elem in restored:
        if elem is None:
            if keyword in ds:
                del ds[keyword]
        else:
            ds[elem.tag] = elem
