"""The index's schema revisions (Alembic ignores this file)."""
