"""Profile options and the PS3.15 Table E.1-1 action lookup.

The rows come from :mod:`dicomnode.deid._table_e1_1`, generated from the standard's data by
``tools/deid_table.py`` (see its ``PROVENANCE`` for edition and source). An attribute's action
is the Basic Profile action, overridden by the column of every enabled option that names the
attribute. Where two enabled options name the same attribute with different actions (e.g.
Date of Last Calibration: Retain Device Identity ``K``, Retain Longitudinal Modified Dates
``C``), the more protective ``C`` wins.

Compound actions need the IOD's attribute type, which is not at hand; they are resolved by VR
so that a Type 1 attribute stays present and nothing identifying survives:

* ``X/Z/U*`` (Referenced / Source Image Sequence): ``U``, the sequence is kept and every UID
  in it replaced, its other attributes processed by the table like any others;
* a sequence: ``Z`` (empty sequence) where allowed, else ``X``, else ``D``;
* anything else: ``D`` (dummy value) where allowed, else ``Z``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, Literal

from pydicom.tag import BaseTag

from dicomnode.deid._table_e1_1 import OPTION_COLUMNS, PROVENANCE, ROWS

__all__ = [
    "CID7050",
    "EDITION",
    "Action",
    "ActionTable",
    "ProfileOptions",
    "SafePrivateAttribute",
]

EDITION: Final[str] = PROVENANCE["edition"]

Action = Literal["D", "Z", "X", "K", "C", "U"]

#: PS3.16 CID 7050 De-identification Method codes (scheme DCM) used here.
CID7050: Final[Mapping[str, tuple[str, str]]] = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_longitudinal_modified_dates": (
        "113107", "Retain Longitudinal Temporal Information Modified Dates Option",
    ),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_safe_private": ("113111", "Retain Safe Private Option"),
}

#: A private attribute known to be safe: (group, private creator, element byte 0x00-0xFF).
SafePrivateAttribute = tuple[int, str, int]


@dataclass(frozen=True)
class ProfileOptions:
    """Which PS3.15 options extend the Basic Application Level Confidentiality Profile.

    ``safe_private`` lists the private attributes the Retain Safe Private Option keeps (the
    standard leaves the list to the implementation); it must be given exactly when
    ``retain_safe_private`` is set.
    """

    retain_longitudinal_temporal_modified_dates: bool
    retain_patient_characteristics: bool
    clean_descriptors: bool
    retain_device_identity: bool = False
    retain_safe_private: bool = False
    safe_private: frozenset[SafePrivateAttribute] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        for name in ("retain_longitudinal_temporal_modified_dates",
                     "retain_patient_characteristics", "clean_descriptors",
                     "retain_device_identity", "retain_safe_private"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"ProfileOptions.{name} must be a bool")
        if not isinstance(self.safe_private, frozenset):
            raise TypeError("ProfileOptions.safe_private must be a frozenset")
        if self.retain_safe_private and not self.safe_private:
            raise ValueError("retain_safe_private needs a non-empty safe_private list")
        if self.safe_private and not self.retain_safe_private:
            raise ValueError("safe_private is given but retain_safe_private is off")
        for entry in self.safe_private:
            if not (isinstance(entry, tuple) and len(entry) == 3
                    and isinstance(entry[0], int) and entry[0] % 2 == 1
                    and 0x0009 <= entry[0] <= 0xFFFF
                    and isinstance(entry[1], str) and entry[1].strip()
                    and isinstance(entry[2], int) and 0 <= entry[2] <= 0xFF):
                raise ValueError(
                    "safe_private entries must be (odd group 0x0009-0xFFFF, private creator, "
                    f"element byte 0x00-0xFF); got {entry!r}"
                )

    def table_columns(self) -> tuple[str, ...]:
        """The Table E.1-1 option columns these options enable."""
        enabled = {
            "retain_longitudinal_modified_dates": self.retain_longitudinal_temporal_modified_dates,
            "retain_patient_characteristics": self.retain_patient_characteristics,
            "clean_descriptors": self.clean_descriptors,
            "retain_device_identity": self.retain_device_identity,
            "retain_safe_private": self.retain_safe_private,
        }
        return tuple(column for column, on in enabled.items() if on)

    def method_codes(self) -> tuple[tuple[str, str], ...]:
        """CID 7050 (code value, code meaning) pairs: the profile, then each enabled option."""
        return (CID7050["basic"], *(CID7050[c] for c in self.table_columns()))


def _resolve_compound(action: str, vr: str) -> Action:
    parts = action.split("/")
    if len(parts) == 1:
        if action not in ("D", "Z", "X", "K", "C", "U"):
            raise ValueError(f"unknown Table E.1-1 action {action!r}")
        return action  # type: ignore[return-value]
    if "U*" in parts:
        return "U" if vr in ("SQ", "UI") else "Z"
    if vr == "SQ":
        return "Z" if "Z" in parts else "X" if "X" in parts else "D"
    return "D" if "D" in parts else "Z"


class ActionTable:
    """Table E.1-1 with the columns of ``options`` applied; ask it with :meth:`action_for`."""

    def __init__(self, options: ProfileOptions) -> None:
        if not isinstance(options, ProfileOptions):
            raise TypeError("options must be a ProfileOptions")
        columns = options.table_columns()
        unknown = set(columns) - set(OPTION_COLUMNS)
        if unknown:
            raise ValueError(f"options not in Table E.1-1: {sorted(unknown)}")
        self._exact: dict[int, str] = {}
        self._repeating: dict[str, str] = {}
        self.private_action = "X"
        for tag, basic, option_actions, _name, _retired in ROWS:
            chosen = [option_actions[c] for c in columns if c in option_actions]
            action = ("C" if "C" in chosen else "K") if chosen else basic
            if tag == "PRIVATE":
                self.private_action = action
            elif "X" in tag:
                self._repeating[tag] = action
            else:
                self._exact[int(tag, 16)] = action

    def raw_action(self, tag: int | BaseTag) -> str | None:
        """The (possibly compound) action for ``tag``, or None when the table omits it.

        Private tags are not looked up here: see :attr:`private_action`.
        """
        tag = int(tag)
        found = self._exact.get(tag)
        if found is not None:
            return found
        group, element = tag >> 16, tag & 0xFFFF
        if group % 2 == 0 and 0x5000 <= group <= 0x501E:
            return self._repeating.get("50XXXXXX")
        if group % 2 == 0 and 0x6000 <= group <= 0x601E:
            return self._repeating.get(f"60XX{element:04X}")
        return None

    def action_for(self, tag: int | BaseTag, vr: str) -> Action | None:
        """The single action for an element with ``tag`` and ``vr``, or None if not listed."""
        raw = self.raw_action(tag)
        return None if raw is None else _resolve_compound(raw, vr)
