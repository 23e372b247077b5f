"""Remove known identity from free text that the profile keeps or cleans.

Table E.1-1 keeps attributes it does not list (e.g. Code Meaning inside Procedure Code
Sequence) and the Clean Descriptors Option keeps descriptions "cleaned" of identity. Neither
can be judged without understanding the text; what *can* be done reliably is to remove every
identity value the same dataset states elsewhere: person names (each name component), the
values of attributes the profile removes or replaces, and dates of those in common notations.
:func:`collect_identity` gathers them before any change; :meth:`Redactor.scrub` removes them.
A name that appears only inside free text cannot be found this way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from dicomnode.deid.profile import ActionTable
from dicomnode.deid.values import TEXT_VRS

__all__ = ["Redactor", "collect_identity"]

_MIN_NAME_TOKEN: Final[int] = 2
_MIN_VALUE: Final[int] = 3
_NAME_SPLIT: Final[re.Pattern[str]] = re.compile(r"[\s,.\-'()]+")
_SPACES: Final[re.Pattern[str]] = re.compile(r"\s{2,}")
_SPACE_BEFORE_PUNCTUATION: Final[re.Pattern[str]] = re.compile(r"\s+(?=[,;:.])")


def _date_notations(value: str) -> list[str]:
    if not re.fullmatch(r"\d{8}", value):
        return []
    y, m, d = value[:4], value[4:6], value[6:]
    return [value, f"{y}-{m}-{d}", f"{y}.{m}.{d}", f"{y}/{m}/{d}", f"{d}.{m}.{y}",
            f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}-{m}-{y}"]


class Redactor:
    """Remove the given names, values and dates from text, case-insensitively."""

    def __init__(self, name_tokens: Iterable[str], values: Iterable[str],
                 dates: Iterable[str]) -> None:
        words = {t for t in name_tokens if len(t) >= _MIN_NAME_TOKEN}
        words |= {v for v in values if len(v) >= _MIN_VALUE}
        patterns = []
        for word in sorted(words, key=len, reverse=True):
            left = r"(?<!\w)" if re.match(r"\w", word) else ""
            right = r"(?!\w)" if re.search(r"\w$", word) else ""
            patterns.append(left + re.escape(word) + right)
        notations = {n for d in dates for n in _date_notations(d)}
        patterns += [r"(?<!\d)" + re.escape(n) + r"(?!\d)"
                     for n in sorted(notations, key=len, reverse=True)]
        self._pattern = re.compile("|".join(patterns), re.IGNORECASE) if patterns else None

    def __repr__(self) -> str:
        return "Redactor(<identity hidden>)"

    def scrub(self, text: str) -> str:
        """``text`` without any known identity value (whitespace left tidy)."""
        if self._pattern is None or not text:
            return text
        cleaned = self._pattern.sub("", text)
        if cleaned == text:
            return text
        cleaned = _SPACE_BEFORE_PUNCTUATION.sub("", _SPACES.sub(" ", cleaned))
        return cleaned.strip(" ,;:^-")


def _name_tokens(value: object) -> list[str]:
    name = value if isinstance(value, PersonName) else PersonName(str(value))
    tokens: list[str] = []
    for group in str(name).split("="):
        # family, given, middle; prefix and suffix ("Dr", "Jr") are not identifying alone
        for component in group.split("^")[:3]:
            tokens.extend(t for t in _NAME_SPLIT.split(component) if t)
    return tokens


def _values(raw: object) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, (list, tuple, MultiValue)):
        return [str(v).strip() for v in raw if v is not None]
    return [str(raw).strip()]


def collect_identity(ds: Dataset, table: ActionTable) -> Redactor:
    """Gather identity stated anywhere in ``ds`` (all nesting levels) into a Redactor.

    Collected: every person name (PN); every date (DA, and the date of a DT) that is not
    kept as it is (``K``), since removed and shifted dates must not survive in text; the
    text values of attributes whose action under ``table`` is to remove or replace them
    (X, Z, D). Private attributes are not read: they are removed, and their short codes
    would over-redact.
    """
    names: list[str] = []
    values: list[str] = []
    dates: list[str] = []
    stack = [ds]
    while stack:
        current = stack.pop()
        for elem in current:
            if elem.tag.is_private:
                continue
            vr = elem.VR
            if vr == "SQ":
                stack.extend(item for item in elem.value if isinstance(item, Dataset))
                continue
            if vr == "PN":
                for v in _values(elem.value):
                    names.extend(_name_tokens(v))
                continue
            action = table.action_for(elem.tag, vr)
            if vr in ("DA", "DT") and action != "K":
                dates.extend(v[:8] for v in _values(elem.value))
            elif vr in TEXT_VRS and action in ("X", "Z", "D"):
                values.extend(_values(elem.value))
    return Redactor(names, values, dates)
