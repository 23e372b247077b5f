"""Per-frame geometry of multi-frame instances: ``instance.frame_geometry`` (JSON, NULL for
single-frame and regular enhanced images; see dicomnode.dicom.frames.frames_to_index).

Revision ID: 0003
Revises: 0002
Created: 2026-12-04 17:39:01.572296
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.add_column(sa.Column("frame_geometry", sa.JSON(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table("instance", schema=None) as batch_op:
        batch_op.drop_column("frame_geometry")

