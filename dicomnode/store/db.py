"""Engine and sessions for the index.

SQLite (the default) runs in WAL mode with ``synchronous=FULL``: a committed
row survives a crash of the process and of the machine. Any other SQLAlchemy
URL (e.g. ``postgresql+psycopg://...``) is used unchanged. The schema is versioned by
Alembic revisions (:mod:`dicomnode.store.schema`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from dicomnode.store.schema import IndexSchemaError, ensure_schema

__all__ = ["Index", "IndexSchemaError", "create_index_engine", "open_index"]


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


def open_index(url: str, *, create: bool = True, upgrade: bool = False) -> Index:
    """Open the index at a SQLAlchemy URL, checking its schema revision.

    For SQLite the parent folder of the database file is created. With ``create`` (the
    default) an empty database gets today's tables (stamped with the newest revision), and
    an index at another revision is refused, or upgraded when ``upgrade`` is set (see
    :mod:`dicomnode.store.schema`); ``create=False`` opens the database as it is.

    Raises:
        IndexSchemaError: the index is newer than this release, or older and ``upgrade``
            is not set.
    """
    engine = create_index_engine(url)
    if create:
        try:
            ensure_schema(engine, upgrade=upgrade)
        except BaseException:
            engine.dispose()
            raise
    return Index(engine)


def create_index_engine(url: str) -> Engine:
    """The engine for the index at ``url`` (SQLite: WAL, ``synchronous=FULL``, the file's
    folder made), schema unchecked."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine
