"""Rule files and model cards are parsed once per process and again only when they change:
an edit is seen without a restart, an invalid edit gives the same error as a fresh load (and
a running node keeps its last valid rules), and unchanged files are not parsed again."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_model_card

import dicomnode.models.card as card_module
import dicomnode.rules.loader as loader_module
from dicomnode.config import load_config
from dicomnode.models.card import CardCache, CardError, load_card
from dicomnode.node import Node
from dicomnode.rules.loader import RuleFileError, RuleSource, load_rules

RULE = """name: {name}
select: SELECT study WHERE series NAMED "{series}" HAS Modality = "CT"
model: m
priority: {priority}
wait_seconds: {wait}
"""


def _rule(folder: Path, file: str = "a.yaml", *, name: str = "first", series: str = "ct",
          priority: int = 0, wait: float = 30) -> Path:
    path = folder / file
    path.write_text(RULE.format(name=name, series=series, priority=priority, wait=wait))
    _touch(path)
    return path


def _touch(path: Path) -> None:
    """Move the file's mtime on by a second, as a later edit would (coarse file systems)."""
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def _count(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count the calls of ``module.name`` (the real function still runs)."""
    calls = [0]
    real = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    rules, models = tmp_path / "rules", tmp_path / "models"
    rules.mkdir()
    write_model_card(models / "m", [("ct", "CT")])
    return rules, models


def test_unchanged_rule_files_are_not_parsed_again(
        folders: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    rules_dir, models_dir = folders
    _rule(rules_dir)
    parsed = _count(monkeypatch, loader_module, "load_rules")
    cards = _count(monkeypatch, card_module, "load_card")
    source = RuleSource(rules_dir, peers={}, models_dir=models_dir)
    first = source.load()
    for _ in range(5):
        assert source.load() is first and source.current() is first
    assert parsed[0] == 1 and source.parses == 1
    assert cards[0] == 1  # the model's card, read once for its inputs


def test_an_edited_added_or_removed_rule_file_is_seen_without_a_restart(
        folders: tuple[Path, Path]) -> None:
    rules_dir, models_dir = folders
    path = _rule(rules_dir)
    source = RuleSource(rules_dir, peers={}, models_dir=models_dir)
    assert source.load().get("first").order == 0
    _rule(rules_dir, priority=7)
    assert source.load().get("first").order == 7
    _rule(rules_dir, "b.yml", name="second")
    assert [r.name for r in source.load().rules] == ["first", "second"]
    path.unlink()
    assert [r.name for r in source.load().rules] == ["second"]
    assert source.parses == 4


def test_an_invalid_edit_reports_the_same_error_and_the_node_keeps_its_rules(
        folders: tuple[Path, Path], caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    rules_dir, models_dir = folders
    path = _rule(rules_dir)
    source = RuleSource(rules_dir, peers={}, models_dir=models_dir)
    valid = source.current()
    path.write_text(RULE.format(name="first", series="ct", priority="high", wait=30))
    _touch(path)
    with pytest.raises(RuleFileError) as fresh:
        load_rules(rules_dir, peers={}, models_dir=models_dir)
    expected = str(fresh.value)
    assert f"{path}:4: priority 'high' is not one of urgent, normal, background" in expected
    parsed = _count(monkeypatch, loader_module, "load_rules")
    for _ in range(2):  # the same error each time, parsed once
        with pytest.raises(RuleFileError) as cached:
            source.load()
        assert str(cached.value) == expected
    assert parsed[0] == 1
    with caplog.at_level(logging.ERROR, logger="dicomnode.rules.loader"):
        assert source.current() is valid and source.current() is valid
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # once per edit, not once per use
    assert "keeps the 1 rule(s) it loaded last" in errors[0].getMessage()
    assert expected in errors[0].getMessage()
    assert parsed[0] == 1
    caplog.clear()
    _rule(rules_dir, priority=3)
    with caplog.at_level(logging.INFO, logger="dicomnode.rules.loader"):
        assert source.current().get("first").order == 3
    assert "rule files fixed: 1 rule(s) loaded" in caplog.text


def test_rules_invalid_from_the_start_raise(folders: tuple[Path, Path]) -> None:
    rules_dir, models_dir = folders
    (rules_dir / "a.yaml").write_text("name: [\n")
    source = RuleSource(rules_dir, peers={}, models_dir=models_dir)
    for method in (source.load, source.current):
        with pytest.raises(RuleFileError, match="not valid YAML"):
            method()


def test_a_changed_model_card_is_seen_by_the_rules(folders: tuple[Path, Path]) -> None:
    rules_dir, models_dir = folders
    _rule(rules_dir)
    source = RuleSource(rules_dir, peers={}, models_dir=models_dir)
    source.load()
    card = write_model_card(models_dir / "m", [("pet", "PT")])
    _touch(card)
    with pytest.raises(RuleFileError, match="binds series ct but model 'm' takes inputs pet"):
        source.load()
    (models_dir / "m2").mkdir()  # a new package folder is looked at too
    with pytest.raises(RuleFileError):
        source.load()
    assert source.parses == 3


def _package(folder: Path) -> Path:
    card = write_model_card(folder, [("ct", "CT")])
    (folder / "model.onnx").write_bytes(b"not really onnx")
    (folder / "LICENSE").write_text("Apache-2.0\n")
    return card


def test_model_cards_are_parsed_once_and_again_when_they_change(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "m"
    card_file = _package(package)
    cache = CardCache()
    parsed = _count(monkeypatch, card_module, "load_card")
    first = cache.get(package)
    assert all(cache.get(package) is first for _ in range(5))
    assert parsed[0] == 1 and cache.parses == 1
    # an edited card
    card_file.write_text(card_file.read_text().replace("version: 0.0.1", "version: 0.0.2"))
    _touch(card_file)
    assert cache.get(package).version == "0.0.2"
    # the ONNX file replaced: a checksum the card gives is checked again
    digest = hashlib.sha256(b"not really onnx").hexdigest()
    card_file.write_text(card_file.read_text() + f"sha256: {digest}\n")
    _touch(card_file)
    assert cache.get(package).sha256 == digest
    (package / "model.onnx").write_bytes(b"another model")
    with pytest.raises(CardError) as cached:
        cache.get(package)
    with pytest.raises(CardError) as fresh:
        load_card(package)
    assert str(cached.value) == str(fresh.value)
    assert "sha256: model.onnx does not match the card's checksum" in str(cached.value)
    calls = parsed[0]
    with pytest.raises(CardError):
        cache.get(package)  # unchanged and still invalid: not parsed again
    assert parsed[0] == calls
    # the licence removed
    (package / "model.onnx").write_bytes(b"not really onnx")
    assert cache.get(package).sha256 == digest
    (package / "LICENSE").unlink()
    with pytest.raises(CardError, match="the package holds no licence file"):
        cache.get(package)


def test_an_invalid_card_edit_gives_the_card_error(tmp_path: Path) -> None:
    package = tmp_path / "m"
    card_file = _package(package)
    cache = CardCache()
    cache.get(package)
    card_file.write_text(card_file.read_text().replace("version: 0.0.1", "version: [1]"))
    _touch(card_file)
    with pytest.raises(CardError) as cached:
        cache.get(package)
    with pytest.raises(CardError) as fresh:
        load_card(package)
    assert str(cached.value) == str(fresh.value) and "version" in str(cached.value)


def test_the_node_uses_edited_rules_and_keeps_the_last_valid_ones(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rules_dir, models_dir = tmp_path / "rules", tmp_path / "models"
    rules_dir.mkdir()
    write_model_card(models_dir / "m", [("ct", "CT")])
    path = _rule(rules_dir, wait=30)
    config_path = tmp_path / "dicomnode.yaml"
    config_path.write_text(yaml.safe_dump({
        "storage": {"path": "store", "min_free_bytes": 0}, "web": {"enabled": False},
        "rules_dir": "rules", "models_dir": "models"}))
    node = Node(load_config(config_path))
    try:
        assert [w.total_seconds() for w in node.completion.waits] == [30.0]
        _rule(rules_dir, wait=45, priority=2)
        rules = node.fresh_rules()
        assert rules.get("first").order == 2
        assert node.rules is rules and node.trigger.rules is rules
        assert [w.total_seconds() for w in node.completion.waits] == [45.0]
        path.write_text("name: first\nselect: SELECT nothing\nmodel: m\n")
        _touch(path)
        with caplog.at_level(logging.ERROR):
            assert node.fresh_rules() is rules  # the last valid rules
            node._check_rules()  # the periodic check: logs nothing new
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and f"{path}:2:" in errors[0]
        assert node.trigger.rules is rules
    finally:
        node.index.dispose()


def test_a_rule_given_or_relieved_of_a_schedule_is_rescheduled(tmp_path: Path) -> None:
    rules_dir, models_dir = tmp_path / "rules", tmp_path / "models"
    rules_dir.mkdir()
    write_model_card(models_dir / "m", [("ct", "CT")])
    path = _rule(rules_dir)
    config_path = tmp_path / "dicomnode.yaml"
    config_path.write_text(yaml.safe_dump({
        "storage": {"path": "store", "min_free_bytes": 0}, "web": {"enabled": False},
        "rules_dir": "rules", "models_dir": "models"}))
    node = Node(load_config(config_path))
    node.scheduler.start()
    try:
        assert node.scheduler.get_job("rule:first") is None
        path.write_text(path.read_text() + 'schedule: "0 22 * * *"\n')
        _touch(path)
        node.fresh_rules()
        job = node.scheduler.get_job("rule:first")
        assert job is not None and "hour='22'" in str(job.trigger)
        assert node.completion.waits == []  # a scheduled rule waits for no quiet time
        _rule(rules_dir)
        node.fresh_rules()
        assert node.scheduler.get_job("rule:first") is None
    finally:
        node.scheduler.shutdown(wait=False)
        node.index.dispose()
