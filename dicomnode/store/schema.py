"""Schema revisions of the index (Alembic): which revision an index is at, a new index made
at the newest revision, an older one upgraded only when asked.

The revisions are ``dicomnode/store/migrations/versions/NNNN_slug.py`` (revision id ``NNNN``,
each revising the one before: one straight line), shipped with the package; Alembic is
configured here in code, no ``alembic.ini`` is read. An index records its revision in the
``alembic_version`` table. Opening an index (:func:`dicomnode.store.db.open_index`):

- no tables: they are created from the models and stamped with the newest revision;
- at the newest revision: used as it is (one ``SELECT``; Alembic is not even imported);
- older: refused with :class:`IndexSchemaError` unless ``upgrade`` is set
  (``storage.upgrade_index``, ``dicomnode serve --upgrade-index``, ``dicomnode db upgrade``);
- newer (a revision this release does not know): always refused;
- made before migrations (tables but no ``alembic_version``): recognised by its columns
  (:data:`_UNVERSIONED_MARKERS`), stamped when it already has today's columns, otherwise
  older (upgraded from the baseline, whose first revisions keep what is already there).
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import (
    Column,
    Connection,
    Engine,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    inspect,
    text,
)

from dicomnode.store.tables import Base

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig

__all__ = [
    "MIGRATIONS_DIR",
    "IndexSchemaError",
    "SchemaState",
    "SchemaStatus",
    "alembic_config",
    "ensure_schema",
    "head_revision",
    "schema_status",
    "upgrade_schema",
]

#: The Alembic environment (env.py, versions/), a folder of the installed package.
MIGRATIONS_DIR = Path(__file__).with_name("migrations")
VERSION_TABLE = "alembic_version"
_REVISION_FILE = re.compile(r"^(\d{4})_\w+\.py$")

#: An index made before migrations is at the newest of these revisions whose columns it
#: has all of (``_add_new_columns`` of that release added them at open); else at the
#: baseline ``0001``.
_UNVERSIONED_MARKERS: dict[str, dict[str, frozenset[str]]] = {
    "0002": {
        "series": frozenset({"stated_size", "settled_by_size"}),
        "instance": frozenset({"size_hints"}),
        "job": frozenset({"version", "content_key", "instance_count", "changes", "outputs",
                          "send_to", "withdrawn_by"}),
    },
}


class IndexSchemaError(Exception):
    """The index's schema is not the one this release uses, and was not (or could not be)
    brought to it. The message says what to do."""


class SchemaState(str, enum.Enum):
    """Where an index's schema stands against this release's newest revision."""

    EMPTY = "empty"  # no tables yet: created at the newest revision when opened
    CURRENT = "current"  # at the newest revision
    OLDER = "older"  # an earlier revision: `dicomnode db upgrade`
    NEWER = "newer"  # a revision this release does not know: made by a newer release
    UNVERSIONED = "unversioned"  # made before migrations (recognised by its columns)


@dataclass(frozen=True)
class SchemaStatus:
    """An index's revision and the newest one this release knows.

    ``revision`` is what ``alembic_version`` holds; for an index made before migrations, the
    revision its columns match; None for an empty database.
    """

    revision: str | None
    head: str
    state: SchemaState

    @property
    def needs_upgrade(self) -> bool:
        return self.state is SchemaState.OLDER or (
            self.state is SchemaState.UNVERSIONED and self.revision != self.head)


@lru_cache(maxsize=1)
def _revisions() -> tuple[str, ...]:
    """The revision ids of this release, oldest first (from the file names)."""
    ids = sorted(m.group(1) for p in (MIGRATIONS_DIR / "versions").iterdir()
                 if (m := _REVISION_FILE.match(p.name)))
    if not ids:
        raise IndexSchemaError(f"no schema revisions in {MIGRATIONS_DIR / 'versions'}: "
                               "the installed package is incomplete")
    return tuple(ids)


def head_revision() -> str:
    """The newest schema revision this release knows."""
    return _revisions()[-1]


def _where(engine: Engine) -> str:
    return engine.url.render_as_string(hide_password=True)


def _status(connection: Connection) -> SchemaStatus:
    head = head_revision()
    inspector = inspect(connection)
    tables = set(inspector.get_table_names())
    if VERSION_TABLE in tables:
        # (the same revision twice: two processes created the index at once)
        rows = sorted({str(r[0]) for r in connection.execute(
            text(f"SELECT version_num FROM {VERSION_TABLE}"))})
        if len(rows) > 1:
            raise IndexSchemaError(
                f"the index records {len(rows)} schema revisions ({', '.join(sorted(rows))}); "
                "dicomnode's revisions are one straight line: this is not an index it made")
        if rows:
            revision = rows[0]
            state = (SchemaState.CURRENT if revision == head else
                     SchemaState.OLDER if revision in _revisions() else SchemaState.NEWER)
            return SchemaStatus(revision, head, state)
        tables.discard(VERSION_TABLE)  # stamped with nothing: judged by its tables
    if not tables & set(Base.metadata.tables):
        return SchemaStatus(None, head, SchemaState.EMPTY)
    revision = _revisions()[0]
    for candidate, markers in _UNVERSIONED_MARKERS.items():
        if all(table in tables and columns <= {c["name"] for c in inspector.get_columns(table)}
               for table, columns in markers.items()):
            revision = max(revision, candidate)
    return SchemaStatus(revision, head, SchemaState.UNVERSIONED)


def schema_status(engine: Engine) -> SchemaStatus:
    """The revision of the index at ``engine`` and the newest one this release knows."""
    with engine.connect() as connection:
        return _status(connection)


def alembic_config(connection: Connection | None = None) -> AlembicConfig:
    """Alembic's configuration for the index's migrations, made in code (no alembic.ini);
    ``env.py`` runs the migrations on ``connection``."""
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _stamp(connection: Connection, revision: str) -> None:
    from alembic import command

    command.stamp(alembic_config(connection), revision)


def _create(connection: Connection) -> None:
    """A new index: today's tables, stamped with the newest revision.

    The stamp is the ``alembic_version`` table as Alembic makes it, written here without
    importing Alembic (10 MB and 0.2 s a fresh ``serve`` would otherwise spend on it)."""
    Base.metadata.create_all(connection)
    version = Table(VERSION_TABLE, MetaData(),
                    Column("version_num", String(32), nullable=False),
                    PrimaryKeyConstraint("version_num", name=f"{VERSION_TABLE}_pkc"))
    version.create(connection)
    connection.execute(version.insert().values(version_num=head_revision()))


def upgrade_schema(engine: Engine) -> tuple[SchemaStatus, SchemaStatus]:
    """Bring the index to the newest revision (create it when empty); (before, after).

    Raises:
        IndexSchemaError: the index is newer than this release.
    """
    with engine.begin() as connection:
        before = _status(connection)
        if before.state is SchemaState.NEWER:
            raise IndexSchemaError(_newer_message(engine, before))
        if before.state is SchemaState.EMPTY:
            _create(connection)
        elif before.state is SchemaState.UNVERSIONED and before.revision == before.head:
            _stamp(connection, before.head)
        elif before.state is not SchemaState.CURRENT:
            # an index made before migrations runs from the start: its first revisions keep
            # the tables and columns it has
            from alembic import command

            command.upgrade(alembic_config(connection), "head")
        after = _status(connection)
    return before, after


def _newer_message(engine: Engine, status: SchemaStatus) -> str:
    return (f"the index {_where(engine)} is at schema revision {status.revision}, which this "
            f"dicomnode does not know (its newest is {status.head}): a newer release made or "
            "upgraded it. Run that release, or restore the index's backup from before the "
            "upgrade; an older release never changes a newer index.")


def _older_message(engine: Engine, status: SchemaStatus) -> str:
    made = (f"was made before schema migrations (its tables match revision {status.revision})"
            if status.state is SchemaState.UNVERSIONED
            else f"is at schema revision {status.revision}")
    return (f"the index {_where(engine)} {made}; this dicomnode needs revision {status.head}. "
            "Back the index up, then run `dicomnode db upgrade`, or let the node upgrade it at "
            "start: `storage.upgrade_index: true` in the configuration or "
            "`dicomnode serve --upgrade-index`.")


def ensure_schema(engine: Engine, *, upgrade: bool = False) -> SchemaStatus:
    """Make sure the index at ``engine`` has this release's schema, as :mod:`this module
    <dicomnode.store.schema>` describes; returns its status afterwards.

    Raises:
        IndexSchemaError: the index is newer than this release, or older and ``upgrade``
            is not set; the message names the revisions and what to do.
    """
    with engine.connect() as connection:
        # the common case first: one SELECT, no Alembic
        if inspect(connection).has_table(VERSION_TABLE):
            rows = {str(r[0]) for r in connection.execute(
                text(f"SELECT version_num FROM {VERSION_TABLE}"))}
            if rows == {head_revision()}:
                return SchemaStatus(head_revision(), head_revision(), SchemaState.CURRENT)
        status = _status(connection)
    if status.state is SchemaState.CURRENT:
        return status
    if status.state is SchemaState.NEWER:
        raise IndexSchemaError(_newer_message(engine, status))
    if status.needs_upgrade and not upgrade:
        raise IndexSchemaError(_older_message(engine, status))
    return upgrade_schema(engine)[1]
