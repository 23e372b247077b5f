"""Several nodes on one index: the claim of a running job (``job.owner``,
``job.lease_expires_at``, ``job.heartbeat_at``) and of an outbox item being sent
(``outbox_item.owner``, ``outbox_item.heartbeat_at``; the claim's end stays
``next_attempt_at``), and the ``node`` table (``dicomnode status``). Jobs left running by an
earlier release have no lease: they count as expired, so any node takes them over.

Revision ID: 0007
Revises: 0006
Created: 2026-12-04 17:52:42.497147
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('node',
    sa.Column('id', sa.String(length=128), nullable=False),
    sa.Column('role', sa.Enum('SERVE', 'WORKER', name='noderole', native_enum=False,
                              length=16), nullable=False),
    sa.Column('version', sa.String(length=32), nullable=False),
    sa.Column('host', sa.String(length=255), nullable=False),
    sa.Column('pid', sa.Integer(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.Column('stopped_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('lease_expires_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))

    with op.batch_alter_table('outbox_item', schema=None) as batch_op:
        batch_op.add_column(sa.Column('owner', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('outbox_item', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('owner')

    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
        batch_op.drop_column('lease_expires_at')
        batch_op.drop_column('owner')

    op.drop_table('node')
