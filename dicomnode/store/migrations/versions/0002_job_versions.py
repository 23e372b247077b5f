"""Job versions and stated series sizes.

Revision ID: 0002
Revises: 0001

Jobs are versions of a rule's firing (``version``, ``content_key``, ...; the unique index on
(rule, inputs) becomes (rule, inputs, version)); series record the size their instances state
and instances what they state about it. The release before migrations added these columns at
open when missing, so an index made before migrations may hold some of them: each is added
only when missing.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _columns() -> dict[str, list[sa.Column[object]]]:
    return {
        "series": [
            sa.Column("stated_size", sa.Integer(), nullable=True),
            sa.Column("settled_by_size", sa.Boolean(), nullable=True),
        ],
        "instance": [
            sa.Column("size_hints", sa.JSON(), nullable=True),
        ],
        "job": [
            # every job of an earlier release is its rule's first version
            sa.Column("version", sa.Integer(), nullable=False, server_default="1"),
            sa.Column("content_key", sa.String(length=64), nullable=True),
            sa.Column("instance_count", sa.Integer(), nullable=True),
            sa.Column("changes", sa.Text(), nullable=True),
            sa.Column("outputs", sa.JSON(), nullable=True),
            sa.Column("send_to", sa.JSON(), nullable=True),
            sa.Column("withdrawn_by", sa.Integer(), nullable=True),
        ],
    }


def upgrade() -> None:
    inspector = sa.inspect(op.get_bind())
    for table, columns in _columns().items():
        present = {c["name"] for c in inspector.get_columns(table)}
        with op.batch_alter_table(table) as batch:
            for column in columns:
                if column.name not in present:
                    batch.add_column(column)
    indexes = {ix["name"] for ix in inspector.get_indexes("job")}
    with op.batch_alter_table("job") as batch:
        if "ux_job_rule_inputs" in indexes:
            batch.drop_index("ux_job_rule_inputs")
        if "ux_job_rule_inputs_version" not in indexes:
            batch.create_index("ux_job_rule_inputs_version",
                               ["rule_name", "inputs_key", "version"], unique=True)


def downgrade() -> None:
    """Back to 0001; fails (unique index) where a rule fired more than one version."""
    with op.batch_alter_table("job") as batch:
        batch.drop_index("ux_job_rule_inputs_version")
        batch.create_index("ux_job_rule_inputs", ["rule_name", "inputs_key"], unique=True)
    for table, columns in _columns().items():
        with op.batch_alter_table(table) as batch:
            for column in reversed(columns):
                batch.drop_column(column.name)
