"""Rule files: validation messages with file, line and column."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.rules.loader import RuleFileError, load_rules
from dicomnode.states import JobPriority


def _problems(tmp_path: Path, text: str) -> str:
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(RuleFileError) as info:
        load_rules(tmp_path)
    return str(info.value)


def test_single_line_statement_errors_point_into_the_yaml_line(tmp_path: Path) -> None:
    text = 'name: a\nselect: "SELECT study WHERE HAS Modality => \'CT\'"\nmodel: m\n'
    msg = _problems(tmp_path, text)
    line = text.splitlines()[1]
    first = msg.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'r.yaml'}:2:")
    column = int(first.split(":")[2])
    caret = msg.splitlines()[2]
    assert msg.splitlines()[1] == line
    assert caret.index("^") == column - 1
    assert line[column - 1:].startswith(">")


def test_keys_values_and_duplicates_are_checked(tmp_path: Path) -> None:
    text = """rules:
  - name: a
    select: SELECT study WHERE HAS Modality = "CT"
    model: m
    outputs: [seg, pdf]
    schedule: "every night"
    colour: red
  - name: a
    select: SELECT study WHERE HAS Modality = "MR"
    model: m
    priority: high
  - select: SELECT study WHERE HAS Modality = "MR"
"""
    msg = _problems(tmp_path, text)
    f = tmp_path / "r.yaml"
    assert f"{f}:7: unknown key 'colour'" in msg
    assert f"{f}:5: outputs must be a non-empty list of seg, rtstruct, measurements" in msg
    assert f"{f}:6: schedule 'every night' is not a cron expression" in msg
    assert (f"{f}:11: priority 'high' is not one of urgent, normal, background (or an "
            "integer: greater than 0 is urgent, 0 normal, less than 0 background)") in msg
    assert f"{f}:12: rule lacks 'name'" in msg


def test_valid_rules_are_ordered_by_priority_and_keep_channel_order(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("""rules:
  - name: low
    select: >-
      SELECT study WHERE series NAMED "B" HAS Modality = "MR"
      ALSO WHERE series NAMED "A" HAS Modality = "CT"
    model: m
  - name: high
    priority: 5
    select: SELECT series WHERE HAS Modality = "CT"
    model: m
    schedule: "0 22 * * *"
""")
    (tmp_path / "b.yaml").write_text(
        "name: again\nselect: 'SELECT study WHERE HAS Modality = \"CT\"'\n"
        "model: m\nenabled: false\n")
    rules = load_rules(tmp_path)
    assert [r.name for r in rules.rules] == ["high", "again", "low"]
    assert rules.get("low").input_names == ("B", "A")
    assert rules.get("high").schedule == "0 22 * * *"
    assert [r.name for r in rules.enabled] == ["high", "low"]
    with pytest.raises(KeyError, match="no rule named 'x'"):
        rules.get("x")


def test_priority_classes_and_the_integers_of_earlier_releases(tmp_path: Path) -> None:
    rule = "  - name: {}\n    select: SELECT study WHERE HAS Modality = 'CT'\n    model: m\n"
    text = "rules:\n" + "".join(
        rule.format(name) + (f"    priority: {value}\n" if value is not None else "")
        for name, value in [("plain", None), ("bulk", "background"), ("stat", "urgent"),
                            ("old-high", 3), ("old-higher", 9), ("old-low", -2),
                            ("old-zero", 0), ("said-normal", "normal")])
    (tmp_path / "r.yaml").write_text(text)
    rules = load_rules(tmp_path)
    classes = {r.name: r.priority for r in rules.rules}
    assert classes == {"plain": JobPriority.NORMAL, "bulk": JobPriority.BACKGROUND,
                       "stat": JobPriority.URGENT, "old-high": JobPriority.URGENT,
                       "old-higher": JobPriority.URGENT, "old-low": JobPriority.BACKGROUND,
                       "old-zero": JobPriority.NORMAL, "said-normal": JobPriority.NORMAL}
    # evaluation: by class, then the old integer (higher first), then name
    assert [r.name for r in rules.rules] == ["old-higher", "old-high", "stat", "old-zero",
                                             "plain", "said-normal", "bulk", "old-low"]


@pytest.mark.parametrize("value", ["Urgent", "high", "1.5", "true", "[urgent]", "''"])
def test_a_bad_priority_is_refused_with_its_line(tmp_path: Path, value: str) -> None:
    msg = _problems(tmp_path, "name: a\nselect: SELECT study WHERE HAS Modality = 'CT'\n"
                              f"model: m\npriority: {value}\n")
    assert f"{tmp_path / 'r.yaml'}:4: priority " in msg
    assert ("is not one of urgent, normal, background (or an integer: greater than 0 is "
            "urgent, 0 normal, less than 0 background)") in msg
