"""Engine and sessions for the index.

SQLite (the default) runs in WAL mode with ``synchronous=FULL``: a committed
row survives a crash of the process and of the machine. Any other SQLAlchemy
URL (e.g. ``postgresql+psycopg://...``) is used unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.tables import Base

__all__ = ["Index", "open_index"]


class Index:
    """The index database: an engine plus a session factory."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions: sessionmaker[Session] = sessionmaker(engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def open_index(url: str, *, create: bool = True) -> Index:
    """Open (and by default create) the index at a SQLAlchemy URL.

    For SQLite the parent folder of the database file is created.
    """
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    if create:
        Base.metadata.create_all(engine)
        _add_new_columns(engine)
    return Index(engine)


#: Indexes of earlier releases that a newer one replaced.
_DROPPED_INDEXES = {"job": ("ux_job_rule_inputs",)}


def _add_new_columns(engine: Engine) -> None:
    """Bring an index made by an earlier release up to the current tables: add the columns
    it lacks (nullable, or with their scalar default) and drop replaced indexes."""
    inspector = inspect(engine)
    with engine.begin() as connection:
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in inspector.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = getattr(column.default, "arg", None)
                clause = (f" DEFAULT {int(default)}" if isinstance(default, (bool, int))
                          else "")
                connection.execute(text(
                    f'ALTER TABLE "{table.name}" ADD COLUMN "{column.name}" {kind}{clause}'))
            existing = {ix["name"] for ix in inspector.get_indexes(table.name)}
            for name in _DROPPED_INDEXES.get(table.name, ()):
                if name in existing:
                    connection.execute(text(f'DROP INDEX "{name}"'))
            for index in table.indexes:
                if index.name not in existing:
                    index.create(connection)
