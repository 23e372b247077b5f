"""Job priorities (issue 20): ``job.priority``, the rule's class as its rank (0 urgent,
1 normal, 2 background; jobs of earlier releases read as normal), and the index
``ix_job_claim_order`` (state, priority, id) the claims go through.

Revision ID: 0008
Revises: 0007
Created: 2026-12-04 19:57:56.359468
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('priority', sa.Integer(), server_default='1',
                                      nullable=False))
        batch_op.create_index('ix_job_claim_order', ['state', 'priority', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_index('ix_job_claim_order')
        batch_op.drop_column('priority')
