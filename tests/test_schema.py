"""Schema revisions of the index (Alembic): a new index at the newest revision, the previous
release's index upgraded by `dicomnode db upgrade` with its rows kept, older and newer indexes
refused, and the migrations' newest revision equal to the models (on real SQLite files)."""

from __future__ import annotations

import itertools
import os
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, select, text

from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.node import Node
from dicomnode.store.db import IndexSchemaError, open_index
from dicomnode.store.schema import (
    MIGRATIONS_DIR,
    SchemaState,
    alembic_config,
    head_revision,
    schema_status,
)
from dicomnode.store.tables import Base, Instance, Job, OutboxItem, Patient, Series, Study

PREVIOUS_RELEASE = Path(__file__).parent / "data" / "index-before-migrations.sql"

ROWS = """
INSERT INTO patient VALUES (1, 'P1', '', 'Doe^J', '19700101', 'O');
INSERT INTO study VALUES (1, '1.2.3', 1, '20260101', '120000', 'A1', 'S1', 'brain',
    'COMPLETE', '2026-01-01 12:00:00', '2026-01-01 12:00:05', '2026-01-01 12:00:10', 0);
INSERT INTO series VALUES (1, '1.2.3.4', 1, 'MR', 't1', 3, 'HEAD', '1.2.9', '2026-01-01 12:00:05',
    0, 1, NULL, 2, 1.0, 'AXIAL');
INSERT INTO instance VALUES (1, '1.2.3.4.5', 1, '1.2.840.10008.5.1.4.1.1.4', '1.2.840.10008.1.2.1',
    1, '["ORIGINAL"]', 8, 8, '[1.0, 1.0]', 1.0, '[0, 0, 0]', '[1, 0, 0, 0, 1, 0]', '1.2.9', 1,
    NULL, 'STORESCU', '2026-01-01 12:00:01', 'instances/a.dcm', 1234, 1);
INSERT INTO job VALUES (1, 'brain', 'm', 1, 'k', '[["t1", "1.2.3.4"]]', NULL, 'complete', 'DONE',
    '2026-01-01 12:00:11', '2026-01-01 12:00:12', '2026-01-01 12:00:20', 1, NULL, NULL, '[]');
INSERT INTO outbox_item VALUES (1, '1.2.3.9', '1.2.840.10008.5.1.4.1.1.66.4', 'results/seg.dcm',
    'pacs', 'SENT', 1, '2026-01-01 12:00:21', 0, NULL, '2026-01-01 12:00:20',
    '2026-01-01 12:00:22', 1);
"""


def _previous_release_index(path: Path) -> str:
    """An index file exactly as the release before migrations left it, with rows."""
    with sqlite3.connect(path) as connection:
        connection.executescript(PREVIOUS_RELEASE.read_text() + ROWS)
    connection.close()
    return f"sqlite:///{path}"


def _config_file(tmp_path: Path, **storage: object) -> Path:
    path = tmp_path / "dicomnode.yaml"
    path.write_text(yaml.safe_dump({"storage": {"path": "store", "min_free_bytes": 0,
                                                **storage},
                                    "web": {"enabled": False}}))
    return path


def _revision(path: Path) -> list[str]:
    with sqlite3.connect(path) as connection:
        return [r[0] for r in connection.execute("SELECT version_num FROM alembic_version")]


def _dump(path: Path) -> list[str]:
    """The database's schema and rows as SQL."""
    with sqlite3.connect(path) as connection:
        return list(connection.iterdump())


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as connection:
        return {r[0] for r in connection.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}


def test_a_new_index_is_created_at_the_newest_revision(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path)
    assert main(["db", "current", "-c", str(config)]) == 0
    assert "no index yet" in capsys.readouterr().out
    index = open_index(load_config(config).db_url)
    index.dispose()
    path = tmp_path / "store" / "index.sqlite"
    assert _revision(path) == [head_revision()]
    assert set(Base.metadata.tables) < _tables(path)
    assert main(["db", "current", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"revision: {head_revision()}  (newest known: {head_revision()})  up to date" in out
    assert main(["db", "upgrade", "-c", str(config)]) == 0
    assert f"already at the newest revision {head_revision()}" in capsys.readouterr().out


def test_the_previous_release_index_is_upgraded_with_its_rows_kept(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path)
    path = tmp_path / "store" / "index.sqlite"
    path.parent.mkdir()
    url = _previous_release_index(path)
    assert main(["db", "current", "-c", str(config)]) == 1
    assert "revision: 0001  (newest known: " in capsys.readouterr().out
    assert main(["db", "upgrade", "-c", str(config)]) == 0
    assert (f"index upgraded from revision 0001 (made before schema migrations) to "
            f"{head_revision()}") in capsys.readouterr().out
    assert _revision(path) == [head_revision()]
    index = open_index(url)
    try:
        with index.session() as session:
            job = session.get(Job, 1)
            assert job is not None and job.version == 1 and job.content_key is None
            assert job.bindings == [["t1", "1.2.3.4"]] and job.state.value == "done"
            patient = session.get(Patient, 1)
            assert patient is not None and patient.patient_name == "Doe^J"
            study = session.get(Study, 1)
            assert study is not None and study.study_instance_uid == "1.2.3"
            series = session.get(Series, 1)
            assert series is not None and series.stated_size is None
            instance = session.get(Instance, 1)
            assert instance is not None and instance.pixel_spacing == [1.0, 1.0]
            item = session.get(OutboxItem, 1)
            assert item is not None and item.job_pk == 1
            # the unique index is (rule, inputs, version) now: a second version fits
            session.add(Job(rule_name="brain", model="m", study_pk=1, inputs_key="k",
                            bindings=[], trigger="complete", version=2))
            session.commit()
            assert len(session.scalars(select(Job)).all()) == 2
    finally:
        index.dispose()
    with sqlite3.connect(path) as connection:
        indexes = {r[1] for r in connection.execute("PRAGMA index_list('job')")}
    assert "ux_job_rule_inputs" not in indexes and "ux_job_rule_inputs_version" in indexes
    assert main(["db", "current", "-c", str(config)]) == 0


def test_an_older_index_is_refused_unless_told_to_upgrade(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "store" / "index.sqlite"
    path.parent.mkdir()
    url = _previous_release_index(path)
    before = _dump(path)
    with pytest.raises(IndexSchemaError) as raised:
        open_index(url)
    message = str(raised.value)
    assert "made before schema migrations (its tables match revision 0001)" in message
    assert f"needs revision {head_revision()}" in message
    assert "`dicomnode db upgrade`" in message and "storage.upgrade_index: true" in message
    assert _dump(path) == before and "alembic_version" not in _tables(path)  # untouched
    # every command that opens the index says so
    config = _config_file(tmp_path)
    assert main(["studies", "-c", str(config)]) == 2
    assert "index error: the index sqlite:///" in capsys.readouterr().err
    # told to: the configuration key upgrades it when the index is opened
    config = _config_file(tmp_path, upgrade_index=True)
    assert main(["studies", "-c", str(config)]) == 0
    assert _revision(path) == [head_revision()]


def test_the_node_upgrades_an_older_index_only_when_told_to(tmp_path: Path) -> None:
    path = tmp_path / "store" / "index.sqlite"
    path.parent.mkdir()
    _previous_release_index(path)
    config = load_config(_config_file(tmp_path))
    with pytest.raises(IndexSchemaError, match="`dicomnode serve --upgrade-index`"):
        Node(config)
    told = config.model_copy(update={
        "storage": config.storage.model_copy(update={"upgrade_index": True})})
    node = Node(told)
    node.index.dispose()
    assert _revision(path) == [head_revision()]


def _serve(config: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode", "serve", "--config", str(config),
                           *extra], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})


def test_serve_refuses_an_index_newer_than_itself(tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    index = open_index(load_config(config).db_url)
    index.dispose()
    path = tmp_path / "store" / "index.sqlite"
    with sqlite3.connect(path) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '9999'")
    connection.close()
    result = _serve(config, "--upgrade-index")  # upgrading never goes backwards
    assert result.returncode == 2, result.stderr
    assert re.search(r"index error: the index sqlite:///\S+index.sqlite is at schema revision "
                     rf"9999, which this dicomnode does not know \(its newest is "
                     rf"{head_revision()}\): a newer release made or upgraded it", result.stderr)
    assert "Traceback" not in result.stderr
    assert _revision(path) == ["9999"]
    assert main(["db", "upgrade", "-c", str(config)]) == 2
    assert schema_status(create_engine(f"sqlite:///{path}")).state is SchemaState.NEWER


def test_serve_refuses_an_older_index_without_the_upgrade_option(tmp_path: Path) -> None:
    config = _config_file(tmp_path)
    path = tmp_path / "store" / "index.sqlite"
    path.parent.mkdir()
    _previous_release_index(path)
    result = _serve(config)
    assert result.returncode == 2, result.stderr
    assert "this dicomnode needs revision" in result.stderr
    assert "run `dicomnode db upgrade`" in result.stderr
    assert "alembic_version" not in _tables(path)


def test_an_index_of_the_release_without_migrations_is_recognised(tmp_path: Path) -> None:
    """The release before this one added revision 0002's columns at open, with no
    alembic_version: such an index is recognised as 0002 by its columns and stamped."""
    path = tmp_path / "index.sqlite"
    engine = create_engine(f"sqlite:///{path}")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0002")
        connection.execute(text("DROP TABLE alembic_version"))
    status = schema_status(engine)
    engine.dispose()
    assert status.state is SchemaState.UNVERSIONED and status.revision == "0002"
    open_index(f"sqlite:///{path}", upgrade=True).dispose()
    assert _revision(path) == [head_revision()]


def test_the_migrations_newest_revision_matches_the_models(tmp_path: Path) -> None:
    """Every revision from an empty database gives exactly the tables of
    dicomnode/store/tables.py: a model change without its revision fails here (write one
    with tools/new_migration.py)."""
    engine = create_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert context.get_current_revision() == head_revision()
        assert compare_metadata(context, Base.metadata) == []
        assert set(inspect(connection).get_table_names()) == {*Base.metadata.tables,
                                                              "alembic_version"}
    # and back down to the baseline and up again, on the same file
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0001")
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "head")
    with engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    engine.dispose()


def test_revisions_are_one_line_named_by_their_ids() -> None:
    """head_revision() (which open_index reads without Alembic) is Alembic's head."""
    script = ScriptDirectory.from_config(alembic_config())
    assert script.get_heads() == [head_revision()]
    files = sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("[0-9]*.py"))
    revisions = list(reversed(list(script.walk_revisions())))
    assert [f"{r.revision}_" for r in revisions] == [name[:5] for name in files]
    for earlier, later in itertools.pairwise(revisions):
        assert later.down_revision == earlier.revision


def test_the_developer_tool_finds_no_missing_revision() -> None:
    result = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "tools" /
                                                 "new_migration.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"0 difference(s) between the models and revision {head_revision()}" in result.stdout


def test_looking_at_a_missing_index_makes_nothing(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = _config_file(tmp_path)
    assert main(["db", "status", "-c", str(config)]) == 0
    assert "no index yet" in capsys.readouterr().out
    assert not (tmp_path / "store").exists()
