"""Blocks of a run's tokens that several processes share: each process claims an open block
(or one whose claim's lease ran out), works it, and marks it done.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "run_blocks",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("block", sa.Integer(), primary_key=True),
        sa.Column("first_token", sa.Integer(), nullable=False),
        sa.Column("last_token", sa.Integer(), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("worker", sa.String(), nullable=True),
        sa.Column("lease_until", sa.Float(), nullable=True),
        sa.Column("claims", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("done_by", sa.String(), nullable=True),
        sa.Column("wall_s", sa.Float(), nullable=True),
    )
    op.create_index("ix_run_blocks_status", "run_blocks", ["run_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_run_blocks_status", table_name="run_blocks")
    op.drop_table("run_blocks")
