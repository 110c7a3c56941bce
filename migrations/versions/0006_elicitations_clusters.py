"""Prompt elicitations and k-means clusterings of the embedding space (the other half of
Rumbelow & Watkins' post).

``elicitations``: one row per restart of one elicitation (``harness elicit``, or the
``elicit`` detector when ``run_id`` is set); ``session`` groups the restarts of one call.
``clusterings``: one k-means of one embedding matrix of a model over several seeds, with the
seeds' agreement; ``token_clusters``: each token's cluster under each seed;
``cluster_centroids``: each cluster's size, distance to the matrix's centroid and stability
across the seeds; ``centroid_distances``: each token's distance to the matrix's centroid.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "elicitations",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"),
                  nullable=True),
        sa.Column("session", sa.String(), nullable=False),
        sa.Column("target_ids", sa.Text(), nullable=False),
        sa.Column("target_text", sa.Text(), nullable=False),
        sa.Column("restart", sa.Integer(), nullable=False),
        sa.Column("seed", sa.Integer(), nullable=False),
        sa.Column("n_positions", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("prompt_ids", sa.Text(), nullable=False),
        sa.Column("prompt_text", sa.Text(), nullable=False),
        sa.Column("probability", sa.Float(), nullable=False),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("options_json", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("created_utc", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_elicitations_model_target", "elicitations",
                    ["model_id", "target_text"])
    op.create_index("ix_elicitations_session", "elicitations", ["session"])
    op.create_table(
        "clusterings",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("model_id", sa.Integer(), sa.ForeignKey("models.id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("matrix", sa.String(), nullable=False),  # input | output
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("seeds_json", sa.Text(), nullable=False),
        sa.Column("agreement", sa.Float(), nullable=True),  # mean pairwise adjusted Rand index
        sa.Column("options_json", sa.Text(), nullable=False, server_default="{}"),
        sa.Column("wall_s", sa.Float(), nullable=False),
        sa.Column("created_utc", sa.DateTime(), nullable=False),
    )
    op.create_index("ix_clusterings_model", "clusterings", ["model_id", "matrix"])
    op.create_table(
        "token_clusters",
        sa.Column("clustering_id", sa.Integer(),
                  sa.ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seed", sa.Integer(), primary_key=True),
        sa.Column("token_id", sa.Integer(), primary_key=True),
        sa.Column("cluster", sa.Integer(), nullable=False),
        sa.Column("distance", sa.Float(), nullable=False),  # to its cluster's centroid
    )
    op.create_table(
        "cluster_centroids",
        sa.Column("clustering_id", sa.Integer(),
                  sa.ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("seed", sa.Integer(), primary_key=True),
        sa.Column("cluster", sa.Integer(), primary_key=True),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("centroid_distance", sa.Float(), nullable=False),  # to the matrix's centroid
        sa.Column("stability", sa.Float(), nullable=True),  # best Jaccard in the other seeds
    )
    op.create_table(
        "centroid_distances",
        sa.Column("clustering_id", sa.Integer(),
                  sa.ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True),
        sa.Column("token_id", sa.Integer(), primary_key=True),
        sa.Column("distance", sa.Float(), nullable=False),  # to the whole matrix's centroid
    )


def downgrade() -> None:
    op.drop_table("centroid_distances")
    op.drop_table("cluster_centroids")
    op.drop_table("token_clusters")
    op.drop_index("ix_clusterings_model", table_name="clusterings")
    op.drop_table("clusterings")
    op.drop_index("ix_elicitations_session", table_name="elicitations")
    op.drop_index("ix_elicitations_model_target", table_name="elicitations")
    op.drop_table("elicitations")
