"""SQLAlchemy models of the results database. Alembic migrations in ``migrations/`` create them.

One row per (run, token) in ``findings``: models are compared with SQL, never by columns.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Model(Base):
    """A loaded model, identified by its fingerprint (weights, dtype, tokenizer)."""

    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(String, nullable=False)
    alias: Mapped[str | None] = mapped_column(String)
    backend: Mapped[str] = mapped_column(String, nullable=False)
    fingerprint: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    tokenizer_hash: Mapped[str] = mapped_column(String, nullable=False, index=True)
    vocab_size: Mapped[int] = mapped_column(Integer, nullable=False)
    meta_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    created_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class Token(Base):
    """One vocabulary entry of a model, with its tokenizer-analysis category."""

    __tablename__ = "tokens"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    raw: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    text: Mapped[str] = mapped_column(String, nullable=False)
    category: Mapped[str] = mapped_column(String, nullable=False)
    attr: Mapped[str | None] = mapped_column(String)  # the backend's token attribute, if any

    __table_args__ = (Index("ix_tokens_raw", "raw"),)


class Run(Base):
    """One detector run over one model."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          nullable=False)
    detector: Mapped[str] = mapped_column(String, nullable=False)
    detector_version: Mapped[str] = mapped_column(String, nullable=False)
    options_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    options_key: Mapped[str] = mapped_column(String, nullable=False)
    harness_version: Mapped[str] = mapped_column(String, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False)  # running|done|failed|skipped
    status_reason: Mapped[str | None] = mapped_column(Text)
    suspicious_when: Mapped[str] = mapped_column(String, nullable=False, default="low")
    started_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    finished_utc: Mapped[datetime | None] = mapped_column(DateTime)
    wall_s: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_runs_model_detector", "model_id", "detector", "status"),)


class FindingRow(Base):
    """A detector's conclusion about one token in one run."""

    __tablename__ = "findings"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"),
                                        primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    score: Mapped[float | None] = mapped_column(Float)
    verdict: Mapped[str] = mapped_column(String, nullable=False)
    evidence_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")

    __table_args__ = (Index("ix_findings_run_verdict", "run_id", "verdict"),)


class RunBlock(Base):
    """A block of a run's tokens (those of the run's scope from ``first_token`` to
    ``last_token``), the unit that processes sharing a run claim: ``open``, ``claimed`` by a
    ``worker`` until ``lease_until`` (seconds since the epoch, by the database's clock), or
    ``done``. ``claims`` counts how often it was claimed (more than once: a worker died)."""

    __tablename__ = "run_blocks"

    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"),
                                        primary_key=True)
    block: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_token: Mapped[int] = mapped_column(Integer, nullable=False)
    last_token: Mapped[int] = mapped_column(Integer, nullable=False)
    n_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False)  # open|claimed|done
    worker: Mapped[str | None] = mapped_column(String)
    lease_until: Mapped[float | None] = mapped_column(Float)
    claims: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    done_by: Mapped[str | None] = mapped_column(String)
    wall_s: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (Index("ix_run_blocks_status", "run_id", "status"),)


class Elicitation(Base):
    """One restart of one prompt elicitation: the discrete prompt found for a target and the
    target's probability after it (measured by a plain forward pass after projection).
    ``session`` groups the restarts of one call; ``run_id`` is set when the ``elicit``
    detector made it."""

    __tablename__ = "elicitations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          nullable=False)
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    session: Mapped[str] = mapped_column(String, nullable=False)
    target_ids: Mapped[str] = mapped_column(Text, nullable=False)  # JSON list
    target_text: Mapped[str] = mapped_column(Text, nullable=False)
    restart: Mapped[int] = mapped_column(Integer, nullable=False)
    seed: Mapped[int] = mapped_column(Integer, nullable=False)
    n_positions: Mapped[int] = mapped_column(Integer, nullable=False)
    steps: Mapped[int] = mapped_column(Integer, nullable=False)
    prompt_ids: Mapped[str] = mapped_column(Text, nullable=False)  # JSON list
    prompt_text: Mapped[str] = mapped_column(Text, nullable=False)
    probability: Mapped[float] = mapped_column(Float, nullable=False)
    wall_s: Mapped[float] = mapped_column(Float, nullable=False)
    options_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    created_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)

    __table_args__ = (Index("ix_elicitations_model_target", "model_id", "target_text"),
                      Index("ix_elicitations_session", "session"))


class Clustering(Base):
    """One k-means of one embedding matrix (``input`` or ``output``) of a model over several
    seeds; ``agreement`` is the mean adjusted Rand index between the seeds' clusterings."""

    __tablename__ = "clusterings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          nullable=False)
    matrix: Mapped[str] = mapped_column(String, nullable=False)
    k: Mapped[int] = mapped_column(Integer, nullable=False)
    seeds_json: Mapped[str] = mapped_column(Text, nullable=False)
    agreement: Mapped[float | None] = mapped_column(Float)
    options_json: Mapped[str] = mapped_column(Text, nullable=False, default="{}")
    wall_s: Mapped[float] = mapped_column(Float, nullable=False)
    created_utc: Mapped[datetime] = mapped_column(DateTime, nullable=False)

    __table_args__ = (Index("ix_clusterings_model", "model_id", "matrix"),)


class TokenCluster(Base):
    """A token's cluster under one seed of a clustering, and its distance to that cluster's
    centroid."""

    __tablename__ = "token_clusters"

    clustering_id: Mapped[int] = mapped_column(
        ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True)
    seed: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster: Mapped[int] = mapped_column(Integer, nullable=False)
    distance: Mapped[float] = mapped_column(Float, nullable=False)


class TokenFacts(Base):
    """The tokenizer-structure facts of one token, computed at the end of a scan for its
    glitch and suspect tokens (``verdict_run_id``: the final verdict they were computed
    for): the longer tokens that contain it, what its text alone encodes to, and its nearest
    neighbours in input-embedding space (JSON; see ``harness.token_structure``)."""

    __tablename__ = "token_facts"

    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"),
                                          primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    verdict_run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"),
                                                nullable=False)
    facts_json: Mapped[str] = mapped_column(Text, nullable=False)
class ClusterCentroid(Base):
    """One cluster under one seed of a clustering: its size, the distance of its centroid to
    the centroid of the whole matrix, and how stable it is across the clustering's seeds
    (the mean, over the other seeds, of its best Jaccard index with a cluster of that seed;
    NULL with one seed)."""

    __tablename__ = "cluster_centroids"

    clustering_id: Mapped[int] = mapped_column(
        ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True)
    seed: Mapped[int] = mapped_column(Integer, primary_key=True)
    cluster: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(Integer, nullable=False)
    centroid_distance: Mapped[float] = mapped_column(Float, nullable=False)
    stability: Mapped[float | None] = mapped_column(Float)


class CentroidDistance(Base):
    """A token's distance to the centroid of the whole matrix a clustering clustered (seed
    000's table of the tokens closest to it)."""

    __tablename__ = "centroid_distances"

    clustering_id: Mapped[int] = mapped_column(
        ForeignKey("clusterings.id", ondelete="CASCADE"), primary_key=True)
    token_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    distance: Mapped[float] = mapped_column(Float, nullable=False)
