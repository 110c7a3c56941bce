"""Initial schema: models, tokens, runs, findings and the latest-verdict views.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

VIEWS = {
    # The latest finished run of each detector on each model.
    "latest_runs": """
        SELECT r.* FROM runs r
        WHERE r.status = 'done' AND r.id = (
            SELECT max(r2.id) FROM runs r2
            WHERE r2.model_id = r.model_id AND r2.detector = r.detector AND r2.status = 'done')
    """,
    # Every finding of those runs, with the model and the token spelled out.
    "latest_findings": """
        SELECT m.id AS model_id, m.ref AS model_ref, m.alias AS model_alias,
               lr.detector, lr.id AS run_id, f.token_id, t.text, t.raw, t.category,
               f.score, f.verdict, f.evidence_json
        FROM latest_runs lr
        JOIN models m ON m.id = lr.model_id
        JOIN findings f ON f.run_id = lr.id
        JOIN tokens t ON t.model_id = lr.model_id AND t.token_id = f.token_id
    """,
    # One verdict per model and token: the most severe of the latest runs' verdicts.
    "latest_verdicts": """
        SELECT model_id, model_ref, model_alias, token_id, text, raw, category,
               CASE max(CASE verdict WHEN 'glitch' THEN 4 WHEN 'suspect' THEN 3
                                     WHEN 'error' THEN 2 WHEN 'ok' THEN 1 ELSE 0 END)
                    WHEN 4 THEN 'glitch' WHEN 3 THEN 'suspect' WHEN 2 THEN 'error'
                    WHEN 1 THEN 'ok' ELSE 'skipped' END AS verdict,
               sum(verdict IN ('glitch', 'suspect')) AS n_flagged,
               group_concat(CASE WHEN verdict IN ('glitch', 'suspect') THEN detector END)
                   AS flagged_by
        FROM latest_findings
        GROUP BY model_id, token_id
    """,
    "flagged_tokens": """
        SELECT * FROM latest_verdicts WHERE verdict IN ('glitch', 'suspect')
    """,
}

# PostgreSQL has no sum() of booleans and no group_concat, and groups only by what the
# query names: its own text of the view that needs them (the same rows as SQLite's).
POSTGRESQL_VIEWS = {
    "latest_verdicts": """
        SELECT model_id, model_ref, model_alias, token_id, text, raw, category,
               CASE max(CASE verdict WHEN 'glitch' THEN 4 WHEN 'suspect' THEN 3
                                     WHEN 'error' THEN 2 WHEN 'ok' THEN 1 ELSE 0 END)
                    WHEN 4 THEN 'glitch' WHEN 3 THEN 'suspect' WHEN 2 THEN 'error'
                    WHEN 1 THEN 'ok' ELSE 'skipped' END AS verdict,
               sum(CASE WHEN verdict IN ('glitch', 'suspect') THEN 1 ELSE 0 END) AS n_flagged,
               string_agg(CASE WHEN verdict IN ('glitch', 'suspect') THEN detector END, ','
                          ORDER BY detector) AS flagged_by
        FROM latest_findings
        GROUP BY model_id, model_ref, model_alias, token_id, text, raw, category
    """,
}


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("ref", sa.String(), nullable=False),
        sa.Column("alias", sa.String(), nullable=True),
        sa.Column("backend", sa.String(), nullable=False),
        sa.Column("fingerprint", sa.String(), nullable=False, unique=True),
        sa.Column("tokenizer_hash", sa.String(), nullable=False),
        sa.Column("vocab_size", sa.Integer(), nullable=False),
        sa.Column("meta_json", sa.Text(), nullable=False),
        sa.Column("created_utc", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_models_tokenizer_hash", "models", ["tokenizer_hash"])
    op.create_table(
        "tokens",
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("token_id", sa.Integer(), primary_key=True),
        sa.Column("raw", sa.LargeBinary(), nullable=False),
        sa.Column("text", sa.String(), nullable=False),
        sa.Column("category", sa.String(), nullable=False),
    )
    op.create_index("ix_tokens_raw", "tokens", ["raw"])
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("detector", sa.String(), nullable=False),
        sa.Column("detector_version", sa.String(), nullable=False),
        sa.Column("options_json", sa.Text(), nullable=False),
        sa.Column("options_key", sa.String(), nullable=False),
        sa.Column("harness_version", sa.String(), nullable=False),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("status_reason", sa.Text(), nullable=True),
        sa.Column("suspicious_when", sa.String(), nullable=False),
        sa.Column("started_utc", sa.DateTime(), nullable=False),
        sa.Column("finished_utc", sa.DateTime(), nullable=True),
        sa.Column("wall_s", sa.Float(), nullable=True),
    )
    op.create_index("ix_runs_model_detector", "runs", ["model_id", "detector", "status"])
    op.create_table(
        "findings",
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("token_id", sa.Integer(), primary_key=True),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(), nullable=False),
        sa.Column("evidence_json", sa.Text(), nullable=False),
    )
    op.create_index("ix_findings_run_verdict", "findings", ["run_id", "verdict"])
    views = {**VIEWS, **POSTGRESQL_VIEWS} if op.get_bind().dialect.name == "postgresql" \
        else VIEWS
    for name, body in views.items():
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_table("findings")
    op.drop_table("runs")
    op.drop_table("tokens")
    op.drop_table("models")
