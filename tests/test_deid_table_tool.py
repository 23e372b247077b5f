"""tools/deid_table.py turns a (synthetic) source JSON into a valid data module."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "deid_table.py"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("deid_table", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _source(rules: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "source": {
            "edition": "2026d",
            "table": "Annex E, Table E.1-1 (Application Level Confidentiality Profile)",
            "url": "https://example.invalid/part15.xml",
            "sha256_of_source_xml": "0" * 64,
            "generated": "2026-09-24",
            "attribution": "Derived from the DICOM Standard (c) NEMA.",
        },
        "option_keys": ["clean_descriptors", "retain_device_identity",
                        "retain_longitudinal_full_dates", "retain_longitudinal_modified_dates"],
        "rules": rules,
    }


def test_generates_an_importable_module(tmp_path: Path) -> None:
    tool = _tool()
    source = tmp_path / "ps315.json"
    source.write_text(json.dumps(_source([
        {"tag": "00080050", "name": "Accession Number", "retired": False, "basic": "Z",
         "options": {}},
        {"tag": "0018700C", "name": "Date of Last Detector Calibration", "retired": False,
         "basic": "X/D", "options": {"retain_device_identity": "K",
                                     "retain_longitudinal_full_dates": "K",
                                     "retain_longitudinal_modified_dates": "C"}},
        {"tag": "60xx3000", "name": "Overlay Data", "retired": False, "basic": "X",
         "options": {}},
    ])))
    out = tmp_path / "table.py"
    assert tool.main([str(source), "-o", str(out)]) == 0
    namespace: dict[str, Any] = {}
    exec(compile(out.read_text(), str(out), "exec"), namespace)
    assert namespace["PROVENANCE"]["edition"] == "2026d"
    assert [row[0] for row in namespace["ROWS"]] == ["00080050", "0018700C", "60XX3000"]
    assert namespace["ROWS"][1][2]["retain_longitudinal_modified_dates"] == "C"
    assert max(len(line) for line in out.read_text().splitlines()) <= 100


def test_rejects_unknown_actions(tmp_path: Path) -> None:
    source = tmp_path / "ps315.json"
    source.write_text(json.dumps(_source([
        {"tag": "00080050", "name": "Accession Number", "retired": False, "basic": "Q",
         "options": {}},
    ])))
    with pytest.raises(SystemExit, match="unknown action"):
        _tool().main([str(source), "-o", str(tmp_path / "table.py")])
