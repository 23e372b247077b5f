"""Value-level semantics of the comparison operators.

All functions are total: they never raise on odd values, they return
``(result, note)`` where ``note`` explains a false result that is not a plain
mismatch (a missing attribute, a non-numeric value, ...).

Values are compared after stripping DICOM padding (spaces and NUL) at both ends.

* ``=`` : every value equals the literal. Equality is exact string equality; a bare
  number literal (``SeriesNumber = 5``) also equals values that read as the same
  number (``"05"``, ``"5.0"``); a quoted literal is compared as a string only.
* ``containing``: a case-insensitive substring test: at least one value contains the
  literal's text, compared after Unicode case folding (``SeriesDescription containing
  "t1"`` holds for ``"T1 MPRAGE sag"`` and ``"sT1W_3D"``; ``ImageType containing
  "ORIGINAL"`` holds for ``ORIGINAL\\PRIMARY\\AXIAL``). A number literal is matched as its
  text. Unlike ``=``, which needs *every* value to equal the literal exactly, one
  containing value is enough; ``regexp`` is the case-sensitive, anchored-or-not
  alternative.
* ``regexp``: ``re.search`` finds the pattern in at least one value (unanchored,
  case-sensitive).
* ``<``, ``>``, ``<=``, ``>=``, ``approx``: every value reads as a plain decimal
  number and compares with the literal (``approx``: within ``1e-4``). One
  non-numeric value makes the comparison false, with a note.

Between two series fields (``A@F op B@F`` in CHECK): ``=`` holds when both have
the same number of values and they are pairwise equal (exactly, or as numbers when
both read as numbers); ``containing`` holds when every value on the right is one of
the values on the left; numeric operators need the same number of values and hold
pairwise.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence

from .nodes import APPROX_TOLERANCE, Literal, Operator, quote

__all__ = ["as_number", "compare_fields", "compare_literal", "strip_padding"]

_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?", re.ASCII)

_NUMERIC: dict[Operator, Callable[[float, float], bool]] = {
    Operator.LT: operator.lt,
    Operator.GT: operator.gt,
    Operator.LE: operator.le,
    Operator.GE: operator.ge,
    Operator.APPROX: lambda a, b: abs(a - b) <= APPROX_TOLERANCE,
}

Outcome = tuple[bool, str | None]


def as_number(text: str) -> float | None:
    """``text`` (padding stripped) as a number, if it is a plain decimal number.

    ``nan``, ``inf``, hexadecimal and digit separators do not count as numbers.
    """
    text = strip_padding(text)
    if not _NUMBER.fullmatch(text):
        return None
    number = float(text)
    return number if math.isfinite(number) else None


def strip_padding(value: str) -> str:
    """``value`` without DICOM padding (spaces and NUL) at either end."""
    return value.strip(" \x00")


def _equals_literal(value: str, literal: Literal) -> bool:
    if value == literal.text:
        return True
    if literal.quoted or literal.number is None:
        return False
    number = as_number(value)
    return number is not None and number == literal.number


def _equals_value(left: str, right: str) -> bool:
    if left == right:
        return True
    a, b = as_number(left), as_number(right)
    return a is not None and b is not None and a == b


def _numbers(values: Sequence[str]) -> tuple[list[float] | None, str | None]:
    numbers: list[float] = []
    for value in values:
        number = as_number(value)
        if number is None:
            return None, f"non-numeric value {quote(value)}"
        numbers.append(number)
    return numbers, None


def compare_literal(
    op: Operator,
    values: Sequence[str] | None,
    literal: Literal,
    pattern: re.Pattern[str] | None = None,
) -> Outcome:
    """Compare a field's values with a literal (see the module doc)."""
    if not values:
        return False, "attribute missing"
    stripped = [strip_padding(v) for v in values]
    if op is Operator.EQ:
        return all(_equals_literal(v, literal) for v in stripped), None
    if op is Operator.CONTAINING:
        needle = literal.text.casefold()
        return any(needle in v.casefold() for v in stripped), None
    if op is Operator.REGEXP:
        regex = pattern if pattern is not None else re.compile(literal.text)
        return any(regex.search(v) is not None for v in stripped), None
    if literal.number is None:
        return False, f"{quote(literal.text)} is not a number"
    numbers, note = _numbers(stripped)
    if numbers is None:
        return False, note
    compare = _NUMERIC[op]
    return all(compare(n, literal.number) for n in numbers), None


def compare_fields(
    op: Operator, left: Sequence[str] | None, right: Sequence[str] | None
) -> Outcome:
    """Compare two fields' values (CHECK ``A@F op B@F``; see the module doc)."""
    if not left or not right:
        side = "both" if not left and not right else ("left" if not left else "right")
        return False, f"attribute missing ({side})"
    lhs = [strip_padding(v) for v in left]
    rhs = [strip_padding(v) for v in right]
    if op is Operator.CONTAINING:
        return all(any(_equals_value(a, b) for a in lhs) for b in rhs), None
    if op is Operator.REGEXP:
        return False, "regexp needs a literal pattern"
    if len(lhs) != len(rhs):
        return False, f"different numbers of values ({len(lhs)} vs {len(rhs)})"
    if op is Operator.EQ:
        return all(_equals_value(a, b) for a, b in zip(lhs, rhs, strict=True)), None
    a_numbers, note = _numbers(lhs)
    if a_numbers is None:
        return False, note
    b_numbers, note = _numbers(rhs)
    if b_numbers is None:
        return False, note
    compare = _NUMERIC[op]
    return all(compare(a, b) for a, b in zip(a_numbers, b_numbers, strict=True)), None
