"""A cheap read of a few top-level values of a common Part-10 file, without pydicom.

Reading the ~40 values the index needs with ``pydicom.dcmread`` (``specific_tags``), then
decoding them, costs about 0.8 ms per instance, most of it pydicom's general machinery.
:func:`read_values` walks the top-level data elements of the file itself and returns the
values of the requested keywords in the form pydicom gives them *for the way the
header model and the index use them* (``get(keyword)`` and ``keyword in values``):

* text (AE, AS, CS, DA, DT, LO, PN, SH, TM, UI, ...): one ``str`` (trailing NUL padding
  and surrounding spaces removed) or, for ``ImageType``, a list of them when multi-valued;
* IS: ``int``; DS: ``float`` or a list of ``float`` when multi-valued; US: ``int``;
* an empty value: ``""``.

It answers only where that is certain to be the same as pydicom's; anything else raises
:class:`Unsupported` and the caller reads the file with pydicom instead:

* transfer syntaxes other than implicit VR little endian and the explicit VR little
  endian ones (native, JPEG family, RLE, ...): big endian and deflated files;
* a requested value that is a sequence (the functional groups of enhanced multi-frame
  images), that holds bytes outside printable ASCII (so the Specific Character Set does
  not matter), a backslash where one value is expected, a NUL that is not trailing
  padding, or a number that is not plainly written (pydicom decides what it means);
* an element of undefined length before the last requested one (a sequence to be
  walked), tags out of order, a value running past the end of the file.
"""

from __future__ import annotations

import functools
import math
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

__all__ = ["RawValues", "Unsupported", "read_values"]

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
#: explicit VR little endian encodings of the dataset (the pixel data may be compressed)
_EXPLICIT_PREFIXES = ("1.2.840.10008.1.2.4.", "1.2.840.10008.1.2.5")
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "LO", "LT", "PN", "SH", "ST", "TM",
                       "UC", "UI", "UR", "UT"})
_PIXEL_DATA = 0x7FE00010
_UNDEFINED = 0xFFFFFFFF
_HEAD = 8192  # bytes read at a time: the headers of common instances fit in one read
_NOT_PRINTABLE = re.compile(rb"[^\x20-\x7e]")
_DS = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_IS = re.compile(r"^[+-]?\d+$")
#: keywords whose multi-valued text is a list (the rest must be single-valued)
_MULTI_TEXT = frozenset({"ImageType"})


class Unsupported(Exception):
    """The file is not one :func:`read_values` reads for certain: read it with pydicom."""


class RawValues:
    """The requested values found (``get`` and ``in`` as on a pydicom Dataset)."""

    def __init__(self, values: dict[str, Any], transfer_syntax_uid: str) -> None:
        self._values = values
        self.transfer_syntax_uid = transfer_syntax_uid

    def get(self, keyword: str, default: Any = None) -> Any:
        return self._values.get(keyword, default)

    def __contains__(self, keyword: object) -> bool:
        return keyword in self._values


def _text(raw: bytes, keyword: str, *, multi: bool) -> str | list[str]:
    if _NOT_PRINTABLE.search(raw.rstrip(b"\x00")):
        raise Unsupported(f"{keyword}: not printable ASCII")
    text = raw.rstrip(b"\x00").decode("ascii")
    if "\\" in text:
        if not multi:
            raise Unsupported(f"{keyword}: multi-valued")
        return [part.strip() for part in text.split("\\")]
    return text.strip()


def _number(raw: bytes, keyword: str, vr: str) -> Any:
    text = _text(raw, keyword, multi=True)
    parts = text if isinstance(text, list) else [text]
    if parts == [""]:
        return ""
    pattern = _DS if vr == "DS" else _IS
    if not all(pattern.match(p) for p in parts):
        raise Unsupported(f"{keyword}: not a plain {vr}")
    if vr == "IS":
        if len(parts) != 1:
            raise Unsupported(f"{keyword}: multi-valued")
        return int(parts[0])
    numbers = [float(p) for p in parts]
    if not all(math.isfinite(n) for n in numbers):
        raise Unsupported(f"{keyword}: not finite")
    return numbers if isinstance(text, list) else numbers[0]


def _us(raw: bytes, keyword: str) -> Any:
    if len(raw) == 0:
        return ""
    if len(raw) != 2:
        raise Unsupported(f"{keyword}: not one US value")
    return struct.unpack("<H", raw)[0]


@functools.lru_cache(maxsize=16)
def _wanted(keywords: tuple[str, ...]) -> dict[int, tuple[str, str]]:
    """Tag -> (keyword, dictionary VR) of ``keywords`` (looked up once per set of keywords;
    callers do not change the dict)."""
    wanted: dict[int, tuple[str, str]] = {}
    for keyword in keywords:
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise ValueError(f"unknown keyword {keyword!r}")
        wanted[tag] = (keyword, dictionary_VR(tag))
    return wanted


def read_values(path: Path, keywords: Iterable[str]) -> RawValues:
    """The values of ``keywords`` (top-level attributes) of the Part-10 file at ``path``.

    Raises:
        Unsupported: see the module docstring; read the file with pydicom instead.
        OSError: the file cannot be read.
    """
    wanted = _wanted(tuple(keywords))
    last = max(wanted)
    with open(path, "rb") as fp:
        reader = _Reader(fp)
        head = reader.bytes(0, 132)
        if head[128:132] != b"DICM":
            raise Unsupported("no Part-10 preamble")
        syntax, pos = _meta(reader)
        if syntax == _IMPLICIT_LE:
            implicit = True
        elif syntax == _EXPLICIT_LE or syntax.startswith(_EXPLICIT_PREFIXES):
            implicit = False
        else:
            raise Unsupported(f"transfer syntax {syntax}")
        values: dict[str, Any] = {}
        previous = -1
        while True:
            head = reader.bytes(pos, 8, exact=False)
            if len(head) < 8:
                if head:
                    raise Unsupported("a truncated element")
                break  # the end of the dataset
            group, element = struct.unpack_from("<HH", head)
            tag = group << 16 | element
            if tag <= previous:
                raise Unsupported("tags out of order")
            previous = tag
            if tag > last or tag >= _PIXEL_DATA:
                break
            vr = b""
            if implicit:
                (length,) = struct.unpack_from("<I", head, 4)
                start = pos + 8
            else:
                vr = head[4:6]
                length, start = _explicit_length(reader, head, pos)
            if length == _UNDEFINED:
                raise Unsupported("an element of undefined length")
            entry = wanted.get(tag)
            if entry is not None:
                keyword, dict_vr = entry
                if not implicit and vr.decode("latin-1") != dict_vr:
                    raise Unsupported(f"{keyword}: VR {vr!r} is not {dict_vr}")
                raw = reader.bytes(start, length)
                if dict_vr in ("DS", "IS"):
                    values[keyword] = _number(raw, keyword, dict_vr)
                elif dict_vr == "US":
                    values[keyword] = _us(raw, keyword)
                elif dict_vr in _TEXT_VRS:
                    values[keyword] = "" if not raw else _text(
                        raw, keyword, multi=keyword in _MULTI_TEXT)
                else:
                    raise Unsupported(f"{keyword}: VR {dict_vr}")
            pos = start + length
    return RawValues(values, syntax)


class _Reader:
    """Bytes of a file by absolute position, read in blocks of at least :data:`_HEAD`."""

    def __init__(self, fp: Any) -> None:
        self._fp = fp
        self._base = 0
        self._buffer = b""

    def bytes(self, pos: int, size: int, *, exact: bool = True) -> bytes:
        end = pos + size
        if pos < self._base or end > self._base + len(self._buffer):
            self._fp.seek(pos)
            self._base = pos
            self._buffer = self._fp.read(max(size, _HEAD))
        chunk = self._buffer[pos - self._base:end - self._base]
        if exact and len(chunk) != size:
            raise Unsupported("an element past the end of the file")
        return chunk


def _explicit_length(reader: _Reader, head: bytes, pos: int) -> tuple[int, int]:
    """The value length of the Explicit VR Little Endian element at ``pos`` (``head``: its
    first 8 bytes) and where its value starts."""
    if head[4:6] in _LONG_VRS:  # 2 reserved bytes, then a 4-byte length
        (length,) = struct.unpack_from("<I", reader.bytes(pos + 8, 4))
        return length, pos + 12
    (length,) = struct.unpack_from("<H", head, 6)
    return length, pos + 8


def _meta(reader: _Reader) -> tuple[str, int]:
    """The transfer syntax and where the dataset starts, from the File Meta Information
    (explicit VR little endian, group 0002)."""
    pos = 132
    syntax = None
    while True:
        head = reader.bytes(pos, 8, exact=False)
        if len(head) < 8:
            raise Unsupported("no dataset after the File Meta Information")
        group, element = struct.unpack_from("<HH", head)
        if group != 0x0002:
            break
        length, start = _explicit_length(reader, head, pos)
        if length == _UNDEFINED:
            raise Unsupported("File Meta Information of undefined length")
        if element == 0x0010:
            syntax = reader.bytes(start, length).rstrip(b"\x00 ").decode("ascii", "replace")
        pos = start + length
    if not syntax:
        raise Unsupported("no transfer syntax")
    return syntax, pos
