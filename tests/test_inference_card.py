"""Model cards: validation with precise errors, and the packages shipped in models/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dicomnode.models.card import CardError, load_card

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"


def _card(tmp_path: Path, **changes: object) -> Path:
    """Copy the ct-body card into a fresh package, applying top-level ``changes``."""
    data = yaml.safe_load((MODELS / "ct-body" / "card.yaml").read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    folder = tmp_path / "ct-body"
    folder.mkdir(exist_ok=True)
    (folder / "card.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    (folder / "model.onnx").write_bytes((MODELS / "ct-body" / "model.onnx").read_bytes())
    (folder / "LICENSE").write_text("Apache-2.0\n")
    return folder


@pytest.mark.parametrize("name", ["brain-mr", "ct-body"])
def test_shipped_cards_are_valid(name: str) -> None:
    card = load_card(MODELS / name)
    assert card.name == name
    assert card.model_path.is_file()
    assert all(label.type.scheme == "SCT" for label in card.outputs.labels)


def test_ct_body_says_it_is_rule_based() -> None:
    card = load_card(MODELS / "ct-body")
    assert card.rule_based
    assert "RULE-BASED" in card.description


def test_unknown_key_names_line_and_allowed_keys(tmp_path: Path) -> None:
    folder = _card(tmp_path, colour="red")
    with pytest.raises(CardError) as info:
        load_card(folder)
    text = str(info.value)
    lines = (folder / "card.yaml").read_text().splitlines()
    line = next(i for i, t in enumerate(lines, 1) if t.startswith("colour:"))
    assert f"card.yaml:{line}: colour: unknown key; allowed here:" in text
    assert "preprocessing" in text and "outputs" in text


def test_retired_srt_scheme_is_refused_with_its_position(tmp_path: Path) -> None:
    data = yaml.safe_load((MODELS / "ct-body" / "card.yaml").read_text())
    labels = data["outputs"]["labels"]
    labels[1]["type"]["scheme"] = "SRT"
    folder = _card(tmp_path, outputs=data["outputs"])
    with pytest.raises(CardError) as info:
        load_card(folder)
    assert "outputs.labels.1.type.scheme" in str(info.value)
    assert "retired" in str(info.value)


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("preprocessing", {"dimensionality": "3d", "patch_size": [64, 64]},
         "patch_size needs 3 sizes"),
        ("preprocessing", {"spacing": [1, 1, 1], "resize": [64, 64, 64]},
         "either spacing or resize"),
        ("preprocessing", {"orientation": "LPX"}, "not an orientation code"),
        ("preprocessing", {"orientation": "LRS"}, "not an orientation code"),
        ("preprocessing", {"intensity": {"method": "window"}}, "needs window"),
        ("preprocessing", {"intensity": {"method": "percentile", "percentiles": [99, 1]}},
         "0 <= low < high <= 100"),
        ("preprocessing", {"dimensionality": "2.5d"}, "needs context_slices"),
        ("preprocessing", {"dimensionality": "2d", "tta_flips": [[2]]}, "spatial axes 0..1"),
        ("preprocessing", {"overlap": 1.0}, "less than 1"),
    ],
)
def test_preprocessing_errors(tmp_path: Path, section: str, value: object, message: str) -> None:
    folder = _card(tmp_path, **{section: value})
    with pytest.raises(CardError) as info:
        load_card(folder)
    assert message in str(info.value)
    assert "card.yaml:" in str(info.value)


def test_output_errors(tmp_path: Path) -> None:
    data = yaml.safe_load((MODELS / "ct-body" / "card.yaml").read_text())
    outputs = data["outputs"]
    outputs["labels"][2]["value"] = 1
    with pytest.raises(CardError, match=r"label values must be distinct \(got \[1, 2, 1\]\)"):
        load_card(_card(tmp_path, outputs=outputs))
    outputs["labels"][2]["value"] = 3
    outputs["labels"][0]["color"] = [0, 300, 0]
    with pytest.raises(CardError, match=r"outputs\.labels\.0\.color: .*each 0\.\.255"):
        load_card(_card(tmp_path, outputs=outputs))
    outputs["labels"][0]["color"] = [0, 160, 0]
    outputs["labels"][0]["rt_roi_interpreted_type"] = "BODY"
    with pytest.raises(CardError, match="not an RT ROI Interpreted Type; allowed: EXTERNAL"):
        load_card(_card(tmp_path, outputs=outputs))
    outputs["labels"][0]["rt_roi_interpreted_type"] = "EXTERNAL"
    outputs["decision"] = "argmax"
    with pytest.raises(CardError, match="channel is its value"):
        load_card(_card(tmp_path, outputs=outputs))


def test_package_files_are_checked(tmp_path: Path) -> None:
    folder = _card(tmp_path, sha256="0" * 64)
    (folder / "LICENSE").unlink()
    with pytest.raises(CardError) as info:
        load_card(folder)
    text = str(info.value)
    assert "sha256: model.onnx does not match" in text
    assert "no licence file" in text
    # Without file checks the card itself is fine.
    assert load_card(folder, verify_files=False).name == "ct-body"


def test_name_must_match_folder(tmp_path: Path) -> None:
    folder = _card(tmp_path)
    moved = folder.rename(tmp_path / "other")
    with pytest.raises(CardError, match="differs from the package folder 'other'"):
        load_card(moved)
