"""Write the index's next schema revision from the change in dicomnode/store/tables.py.

    python3 tools/new_migration.py "per-frame geometry"      # writes versions/NNNN_slug.py
    python3 tools/new_migration.py --check                   # exit 1 when one is needed

Alembic's autogenerate (``alembic revision --autogenerate``) without an alembic.ini or a
database: the revisions so far are run on a scratch SQLite file, the models are compared
with it, and the difference is written as ``dicomnode/store/migrations/versions/NNNN_slug.py``
(revision id NNNN, the next number, revising the newest). Read it before committing:
autogenerate misses renames (it sees a drop and an add) and server defaults; a NOT NULL
column added to a table with rows needs ``server_default``; SQLite changes go through
``op.batch_alter_table``. tests/test_schema.py then checks the revisions equal the models.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicomnode.store.schema import MIGRATIONS_DIR, alembic_config, head_revision
from dicomnode.store.tables import Base


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("message", nargs="?", help="what the revision changes (its file name)")
    parser.add_argument("--check", action="store_true",
                        help="only say whether the models differ from the newest revision")
    args = parser.parse_args(argv)
    if not args.check and not args.message:
        parser.error("give the revision's message, or --check")
    with tempfile.TemporaryDirectory(prefix="dicomnode-migration-") as scratch:
        engine = create_engine(f"sqlite:///{Path(scratch) / 'index.sqlite'}")
        with engine.begin() as connection:
            command.upgrade(alembic_config(connection), "head")
        with engine.connect() as connection:
            diff = compare_metadata(
                MigrationContext.configure(connection, opts={"compare_type": True}),
                Base.metadata)
        if args.check:
            for change in diff:
                print(change)
            print(f"{len(diff)} difference(s) between the models and revision "
                  f"{head_revision()}")
            engine.dispose()
            return 1 if diff else 0
        if not diff:
            print(f"the models equal revision {head_revision()}: nothing to write",
                  file=sys.stderr)
            engine.dispose()
            return 1
        rev_id = f"{int(head_revision()) + 1:04d}"
        with engine.begin() as connection:
            script = command.revision(alembic_config(connection), message=args.message,
                                      autogenerate=True, rev_id=rev_id)
        engine.dispose()
    path = getattr(script, "path", None)
    print(f"wrote {path or MIGRATIONS_DIR / 'versions'}: read it, test it "
          "(tests/test_schema.py), commit it with the model change")
    return 0


if __name__ == "__main__":
    sys.exit(main())
