"""Alembic environment of the index: ``env.py`` and one file per schema revision in
``versions/`` (``NNNN_slug.py``, revision id ``NNNN``, each revising the one before).

Run through :mod:`dicomnode.store.schema` (``dicomnode db upgrade``), which configures Alembic
in code: no ``alembic.ini`` is needed. ``tools/new_migration.py`` writes the next revision.
"""
