"""Give a result made from pseudonymized inputs (SEG, RTSTRUCT...) its original identity.

The result keeps its own new UIDs (its SOP Instance UID, Series Instance UID): only UIDs the
map knows are replaced. A result whose StudyInstanceUID the map does not know must never
reach a clinical peer, so it raises :class:`ReidentificationError`.

:func:`reidentify` changes a dataset in memory; :func:`reidentify_encoded` makes the
re-identified file from the bytes of the pseudonymous one (a result is encoded once: the
re-identified copy differs only in UID values and the patient and study attributes, so it
is spliced from the same bytes instead of being encoded again element by element). Both give
the same file, byte for byte, as :func:`reidentify` followed by pydicom's ``save_as``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any

from pydicom.charset import convert_encodings
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from dicomnode.deid.record import element_from_json

__all__ = ["ReidentificationError", "reidentify", "reidentify_encoded"]


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


def _restored(study_uid: str, uid_map: Mapping[str, str], patient_study: Mapping[str, Any]
              ) -> list[tuple[str, DataElement | None]]:
    """The checks both re-identifications make, and the patient and study elements to put
    back (None: remove)."""
    if not isinstance(uid_map, Mapping) or not isinstance(patient_study, Mapping):
        raise TypeError("uid_map and patient_study must be mappings")
    study_uid = study_uid.strip()
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
        return [(keyword, None if value is None else element_from_json(keyword, value))
                for keyword, value in patient_study.items()]
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # the exception text may quote identity: name only its type
        raise ReidentificationError(
            f"patient_study is malformed ({type(exc).__name__})"
        ) from None


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
    restored = _restored(str(ds.get("StudyInstanceUID", "") or ""), uid_map, patient_study)
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


# ---------------------------------------------------------------- on the encoded file

_PREAMBLE = 132  # 128 bytes and "DICM"
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR",
                       b"UT", b"SV", b"UV"})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_STUDY_INSTANCE_UID = 0x0020000D
_SPECIFIC_CHARACTER_SET = 0x00080005
_GROUP_LENGTH_2 = 0x00020000
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _Unsupported(Exception):
    """An encoding this splicer does not take; the caller re-identifies the dataset."""


def _header(tag: int, vr: bytes, length: int) -> bytes:
    head = _TAG.pack(tag >> 16, tag & 0xFFFF) + vr
    return head + (b"\0\0" + _U32.pack(length) if vr in _LONG_VRS else _U16.pack(length))


class _Splicer:
    """Walks an Explicit VR Little Endian data set and copies it with the UIDs of
    ``uid_map`` replaced, recomputing the lengths that change (defined-length sequences
    and items); everything else is copied as it is."""

    def __init__(self, data: bytes, uid_map: Mapping[str, str]) -> None:
        self.data = memoryview(data)
        self.uid_map = uid_map

    def element(self, pos: int) -> tuple[int, bytes, int, int]:
        """(tag, VR, value length, header length) of the element at ``pos``."""
        data = self.data
        if pos + 8 > len(data):
            raise _Unsupported("truncated")
        group, number = _TAG.unpack_from(data, pos)
        if group == 0xFFFE:  # an item or a delimiter: no VR
            return (group << 16) | number, b"", _U32.unpack_from(data, pos + 4)[0], 8
        vr = bytes(data[pos + 4:pos + 6])
        if vr in _LONG_VRS:
            return (group << 16) | number, vr, _U32.unpack_from(data, pos + 8)[0], 12
        if not vr.isalpha() or not vr.isupper():
            raise _Unsupported("not explicit VR")
        return (group << 16) | number, vr, _U16.unpack_from(data, pos + 6)[0], 8

    def uid(self, value: bytes) -> bytes | None:
        """The value with the mapped UIDs, or None when none of its UIDs is mapped."""
        text = value.decode("ascii").rstrip("\0 ")
        parts = text.split("\\")
        mapped = [self.uid_map.get(p.strip(), p) for p in parts]
        if mapped == parts:
            return None
        out = "\\".join(mapped).encode("ascii")
        return out + b"\0" if len(out) % 2 else out

    def dataset(self, pos: int, end: int | None, out: list[bytes | memoryview]) -> int:
        """Copy the elements from ``pos`` to ``end`` (None: up to and with the item
        delimitation item) into ``out``; returns the position after them."""
        data = self.data
        start = pos
        while end is None or pos < end:
            tag, vr, length, head = self.element(pos)
            if tag == _ITEM_END and end is None:
                pos += 8
                out.append(data[start:pos])
                return pos
            if not vr:
                raise _Unsupported("an item or delimiter among elements")
            if vr == b"SQ":
                out.append(data[start:pos])
                pos = self.sequence(pos, tag, length, out)
                start = pos
                continue
            if length == _UNDEFINED or vr == b"UN":
                raise _Unsupported("encapsulated or unknown value")
            value_end = pos + head + length
            if vr == b"UI":
                mapped = self.uid(bytes(data[pos + head:value_end]))
                if mapped is not None:
                    out.append(data[start:pos])
                    out.append(_header(tag, vr, len(mapped)) + mapped)
                    start = value_end
            pos = value_end
        if end is not None and pos != end:
            raise _Unsupported("an item's length does not match its elements")
        out.append(data[start:pos])
        return pos

    def sequence(self, pos: int, tag: int, length: int, out: list[bytes | memoryview]) -> int:
        """Copy the sequence element at ``pos``; returns the position after it."""
        data = self.data
        pos += 12
        end = None if length == _UNDEFINED else pos + length
        body: list[bytes | memoryview] = []
        while end is None or pos < end:
            group, number = _TAG.unpack_from(data, pos)
            item_tag = (group << 16) | number
            item_length = _U32.unpack_from(data, pos + 4)[0]
            if item_tag == _SEQUENCE_END and end is None:
                pos += 8
                break
            if item_tag != _ITEM:
                raise _Unsupported("not an item")
            items: list[bytes | memoryview] = []
            pos = self.dataset(pos + 8, None if item_length == _UNDEFINED
                               else pos + 8 + item_length, items)
            size = sum(len(c) for c in items)
            body.append(_TAG.pack(0xFFFE, 0xE000) + _U32.pack(
                _UNDEFINED if item_length == _UNDEFINED else size))
            body.extend(items)
        if end is not None and pos != end:
            raise _Unsupported("a sequence's length does not match its items")
        size = sum(len(c) for c in body)
        out.append(_header(tag, b"SQ", _UNDEFINED if length == _UNDEFINED else size))
        out.extend(body)
        if length == _UNDEFINED:
            out.append(_TAG.pack(0xFFFE, 0xE0DD) + _U32.pack(0))
        return pos


def reidentify_encoded(data: bytes, uid_map: Mapping[str, str],
                       patient_study: Mapping[str, Any]) -> bytes | None:
    """The re-identified file made from ``data``, the bytes of a pseudonymous DICOM file
    (preamble, file meta, data set), without decoding its data set.

    Gives what :func:`reidentify` and pydicom's ``save_as`` give for the same object, byte
    for byte, for a file in Explicit VR Little Endian with no encapsulated or UN element (the
    result objects the node writes); for any other file it returns None and the caller
    re-identifies the dataset. Raises as :func:`reidentify` does.
    """
    splicer = _Splicer(data, uid_map)
    try:
        if bytes(data[128:_PREAMBLE]) != b"DICM":
            return None
        # the file meta information: its UIDs mapped, its group length recomputed
        pos = _PREAMBLE
        meta: list[bytes | memoryview] = []
        while pos < len(data):
            tag, vr, length, head = splicer.element(pos)
            if tag >> 16 != 0x0002:
                break
            if tag == 0x00020010 and (bytes(data[pos + head:pos + head + length])
                                      .rstrip(b"\0 ").decode("ascii")
                                      != ExplicitVRLittleEndian):
                return None
            if tag != _GROUP_LENGTH_2:
                splicer.dataset(pos, pos + head + length, meta)
            pos += head + length
        body: dict[int, list[bytes | memoryview]] = {}
        values: dict[int, bytes] = {}
        while pos < len(data):
            tag, vr, length, head = splicer.element(pos)
            if tag in (_STUDY_INSTANCE_UID, _SPECIFIC_CHARACTER_SET):
                values[tag] = bytes(data[pos + head:pos + head + length])
            chunks: list[bytes | memoryview] = []
            if vr == b"SQ":
                pos = splicer.sequence(pos, tag, length, chunks)
            else:
                end = pos + head + (0 if length == _UNDEFINED else length)
                pos = splicer.dataset(pos, end, chunks)
            body[tag] = chunks
    except _Unsupported:
        return None
    except (struct.error, UnicodeDecodeError):
        return None
    study_uid = values.get(_STUDY_INSTANCE_UID, b"").decode("ascii", "replace").rstrip("\0 ")
    restored = _restored(study_uid, uid_map, patient_study)
    charset = values.get(_SPECIFIC_CHARACTER_SET, b"").decode("ascii", "replace").strip()
    encodings = convert_encodings([c.strip() for c in charset.split("\\")] if charset
                                  else None)
    for _keyword, elem in restored:
        if elem is None:
            body.pop(int(_tag_of(_keyword)), None)
        else:
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_data_element(fp, elem, encodings)
            body[int(elem.tag)] = [fp.getvalue()]
    meta_bytes = b"".join(meta)
    out: list[bytes | memoryview] = [bytes(data[:_PREAMBLE]), _header(_GROUP_LENGTH_2, b"UL", 4),
           _U32.pack(len(meta_bytes)), meta_bytes]
    for tag in sorted(body):
        out.extend(body[tag])
    return b"".join(out)


def _tag_of(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:  # element_from_json refused it already
        raise ReidentificationError("patient_study is malformed (KeyError)")
    return int(tag)
