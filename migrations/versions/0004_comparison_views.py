"""Views that compare models: shared_tokens (token pairs of two models, aligned by id for a
shared tokenizer, else by raw bytes) and verdict_pairs (their final verdicts side by side).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

VIEWS = {
    # Every ordered pair of models and the tokens they share. Same tokenizer hash: by id;
    # otherwise by raw bytes (padding rows have none and are left out).
    "shared_tokens": """
        SELECT a.id AS model_a, coalesce(a.alias, a.ref) AS name_a,
               b.id AS model_b, coalesce(b.alias, b.ref) AS name_b,
               'id' AS aligned_by, ta.token_id AS token_a, tb.token_id AS token_b,
               ta.raw, ta.text AS text_a, tb.text AS text_b
        FROM models a JOIN models b ON a.id <> b.id AND a.tokenizer_hash = b.tokenizer_hash
        JOIN tokens ta ON ta.model_id = a.id
        JOIN tokens tb ON tb.model_id = b.id AND tb.token_id = ta.token_id
        UNION ALL
        SELECT a.id, coalesce(a.alias, a.ref), b.id, coalesce(b.alias, b.ref),
               'raw bytes', ta.token_id, tb.token_id, ta.raw, ta.text, tb.text
        FROM models a JOIN models b ON a.id <> b.id AND a.tokenizer_hash <> b.tokenizer_hash
        JOIN tokens ta ON ta.model_id = a.id AND length(ta.raw) > 0
        JOIN tokens tb ON tb.model_id = b.id AND tb.raw = ta.raw
    """,
    # The final verdicts of two models on each token they share.
    "verdict_pairs": """
        SELECT s.name_a, s.name_b, s.aligned_by, s.token_a, s.token_b, s.raw, s.text_a,
               s.text_b, va.verdict AS verdict_a, vb.verdict AS verdict_b,
               va.repeat_prob AS repeat_prob_a, vb.repeat_prob AS repeat_prob_b,
               s.model_a, s.model_b
        FROM shared_tokens s
        JOIN final_verdicts va ON va.model_id = s.model_a AND va.token_id = s.token_a
        JOIN final_verdicts vb ON vb.model_id = s.model_b AND vb.token_id = s.token_b
    """,
}


def upgrade() -> None:
    for name, body in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
