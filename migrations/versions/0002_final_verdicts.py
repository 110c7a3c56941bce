"""Views over the final per-token verdict of a scan: final_verdicts and glitch_tokens.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

VIEWS = {
    # One verdict per model and token: the latest finished run of the 'verdict' pseudo-detector.
    "final_verdicts": """
        SELECT model_id, model_ref, model_alias, run_id, token_id, text, raw, category,
               verdict, score AS repeat_prob, json_extract(evidence_json, '$.flagged_by')
                   AS flagged_by
        FROM latest_findings WHERE detector = 'verdict'
    """,
    "glitch_tokens": """
        SELECT * FROM final_verdicts WHERE verdict = 'glitch'
    """,
}

# PostgreSQL has no json_extract: its own text (the same JSON text of the list).
POSTGRESQL_VIEWS = {
    "final_verdicts": """
        SELECT model_id, model_ref, model_alias, run_id, token_id, text, raw, category,
               verdict, score AS repeat_prob, CAST(evidence_json AS json) ->> 'flagged_by'
                   AS flagged_by
        FROM latest_findings WHERE detector = 'verdict'
    """,
}


def upgrade() -> None:
    views = {**VIEWS, **POSTGRESQL_VIEWS} if op.get_bind().dialect.name == "postgresql" \
        else VIEWS
    for name, body in views.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
