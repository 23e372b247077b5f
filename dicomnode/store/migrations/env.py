"""Alembic's environment for the index: migrations run on the connection that
:mod:`dicomnode.store.schema` passes in ``config.attributes["connection"]``.

SQLite changes tables in batch mode (``render_as_batch``): a table is copied where SQLite's
``ALTER TABLE`` cannot make the change. Offline (``--sql``) mode is not supported.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from dicomnode.store.tables import Base

config = context.config
connection = config.attributes.get("connection")
if context.is_offline_mode() or not isinstance(connection, Connection):
    raise RuntimeError("the index's migrations run on a connection given by "
                       "dicomnode.store.schema (`dicomnode db upgrade`), not offline")
context.configure(connection=connection, target_metadata=Base.metadata,
                  render_as_batch=True, compare_type=True)
with context.begin_transaction():
    context.run_migrations()
