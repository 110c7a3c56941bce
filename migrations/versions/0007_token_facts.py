"""Tokenizer-structure facts of glitch and suspect tokens (issue 14).

``token_facts``: one row per model and token, written at the end of a scan: the longer
vocabulary tokens that contain the token, what its text alone encodes to, and its nearest
neighbours in input-embedding space, as JSON.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "token_facts",
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("token_id", sa.Integer(), primary_key=True),
        sa.Column("verdict_run_id", sa.Integer(),
                  sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("facts_json", sa.Text(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("token_facts")
