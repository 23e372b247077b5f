"""Replacement values by VR: empty (``Z``), dummy (``D``) and shifted dates (``C``)."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any, Final

from pydicom.dataelem import empty_value_for_VR

__all__ = [
    "BINARY_VRS",
    "TEXT_VRS",
    "dummy_value",
    "empty_value",
    "shift_date",
    "shift_datetime",
]

#: Free-text VRs whose surviving values are scrubbed of known identity.
TEXT_VRS: Final[frozenset[str]] = frozenset({"LO", "SH", "ST", "LT", "UT", "UC"})
BINARY_VRS: Final[frozenset[str]] = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "UN", "OB or OW", "US or OW"}
)

_DUMMY: Final[dict[str, Any]] = {
    "AE": "ANONYMIZED",
    "AS": "000Y",
    "CS": "ANONYMIZED",
    "DA": "19000101",
    "DT": "19000101000000",
    "TM": "000000",
    "LO": "ANONYMIZED",
    "LT": "ANONYMIZED",
    "PN": "ANONYMIZED",
    "SH": "ANONYMIZED",
    "ST": "ANONYMIZED",
    "UC": "ANONYMIZED",
    "UT": "ANONYMIZED",
    "UR": "urn:dicomnode:anonymized",
    "DS": "0",
    "IS": "0",
    "FL": 0.0,
    "FD": 0.0,
    "SL": 0,
    "SS": 0,
    "SV": 0,
    "UL": 0,
    "US": 0,
    "UV": 0,
}
_DT_RE: Final[re.Pattern[str]] = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(.*)$")


def empty_value(vr: str) -> Any:
    """The zero-length value pydicom writes for ``vr``."""
    return empty_value_for_VR(vr)


def dummy_value(vr: str) -> Any:
    """A non-empty value valid for ``vr`` that carries no information.

    Binary VRs get two zero bytes; AT gets tag (0000,0000). ``SQ`` and ``UI`` are handled by
    the caller (recursive dummy, UID remapping) and raise ``ValueError`` here.
    """
    vr = vr.split(" or ")[0]  # an ambiguous VR ("US or SS") not resolved: take the first
    if vr in _DUMMY:
        return _DUMMY[vr]
    if vr in BINARY_VRS:
        return b"\x00\x00"
    if vr == "AT":
        return 0
    raise ValueError(f"no dummy value for VR {vr!r}")


def shift_date(value: str, days: int) -> str:
    """Shift a DA value (``YYYYMMDD``) by ``days``; raise ValueError if it is not one."""
    text = value.strip()
    if not re.fullmatch(r"\d{8}", text):
        raise ValueError("not a DA value")
    try:
        date = dt.datetime.strptime(text, "%Y%m%d").date() + dt.timedelta(days=days)
    except OverflowError:
        raise ValueError("shifted DA out of range") from None
    return f"{date.year:04d}{date.month:02d}{date.day:02d}"


def shift_datetime(value: str, days: int) -> str:
    """Shift the date part of a DT value by ``days``, keeping its precision, time and offset.

    A DT given to the year or month only is shifted from the first day of that period and
    written back with the same precision. Raise ValueError if it is not a DT value.
    """
    match = _DT_RE.fullmatch(value.strip())
    if match is None:
        raise ValueError("not a DT value")
    year, month, day, rest = match.groups()
    if day is not None and month is None:
        raise ValueError("not a DT value")
    try:
        date = dt.date(int(year), int(month or 1), int(day or 1)) + dt.timedelta(days=days)
    except OverflowError:
        raise ValueError("shifted DT out of range") from None
    shifted = f"{date.year:04d}"
    if month is not None:
        shifted += f"{date.month:02d}"
    if day is not None:
        shifted += f"{date.day:02d}"
    if rest and not re.fullmatch(r"\d{2,6}(\.\d{1,6})?([+-]\d{4})?|[+-]\d{4}", rest):
        raise ValueError("not a DT value")
    return shifted + rest
