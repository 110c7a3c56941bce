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
