"""Model approval: the ``review`` table (one row per job whose rule says ``review:
required``: ``state`` awaiting/approved/rejected, ``decided_by``, ``decided_at``). The
outbox states ``held`` and ``rejected`` need no change (the state column is VARCHAR(16)).

Revision ID: 0009
Revises: 0008
Created: 2026-12-04 19:58:54.758344
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('review',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('job_pk', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum('AWAITING', 'APPROVED', 'REJECTED', name='reviewstate',
                               native_enum=False, length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('decided_at', sa.DateTime(), nullable=True),
    sa.Column('decided_by', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_review_job_pk'), ['job_pk'], unique=True)


def downgrade() -> None:
    with op.batch_alter_table('review', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_review_job_pk'))

    op.drop_table('review')
