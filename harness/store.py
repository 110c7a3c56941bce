"""Every read and write of the results: named functions over SQLAlchemy Core, one text for
SQLite and PostgreSQL.

The rest of the code calls these functions and never writes SQL. Each function takes an open
``Connection``; the caller decides the transaction (``engine.begin()`` to write,
``engine.connect()`` to read). Where the two databases differ (``ON CONFLICT DO NOTHING``,
the text PostgreSQL cannot hold) the switch is here and nowhere else.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import BigInteger, and_, cast, delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from harness.schema import (
    CentroidDistance,
    ClusterCentroid,
    Clustering,
    FindingRow,
    Model,
    Run,
    RunBlock,
    Token,
    TokenCluster,
    TokenFacts,
)
from harness.verdicts import FINAL, FLAGGED, GLITCH

MODELS = Model.__table__
TOKENS = Token.__table__
RUNS = Run.__table__
FINDINGS = FindingRow.__table__
BLOCKS = RunBlock.__table__
FACTS = TokenFacts.__table__

INSERT_BATCH = 20_000  # rows per executemany: bounds the memory of one call
RUNS_LOCK = 0x6C17C5  # PostgreSQL advisory lock class of finding-or-creating a model's runs
NUL_STANDIN = "\u2400"  # ␀: PostgreSQL text cannot hold U+0000 (raw bytes keep the truth)


def now() -> datetime:
    """The current UTC time, naive (both databases store it without a zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _is_postgres(conn: Connection) -> bool:
    return conn.dialect.name == "postgresql"


def _insert_ignoring_duplicates(conn: Connection, table: Any) -> Any:
    """``INSERT ... ON CONFLICT DO NOTHING`` in the connection's dialect."""
    dialect = postgresql if _is_postgres(conn) else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


def _text_for(conn: Connection, value: str) -> str:
    return value.replace("\x00", NUL_STANDIN) if _is_postgres(conn) and "\x00" in value \
        else value


def _executemany(conn: Connection, stmt: Any, rows: list[dict[str, Any]]) -> None:
    for i in range(0, len(rows), INSERT_BATCH):
        conn.execute(stmt, rows[i:i + INSERT_BATCH])


def _bulk_insert(conn: Connection, table: Any, rows: list[tuple],
                 ignore_duplicates: bool) -> None:
    """Insert ``rows`` (tuples in the table's column order): ``COPY`` on PostgreSQL, where
    one ``INSERT`` per row costs a round trip each (several times slower even pipelined);
    an ``executemany`` elsewhere. With ``ignore_duplicates`` a row whose key is stored
    already is dropped (PostgreSQL: copied to a scratch table first, then inserted from it
    with ``ON CONFLICT DO NOTHING``)."""
    if not rows:
        return
    if not _is_postgres(conn):
        # The driver's own executemany, in the connection's transaction: SQLAlchemy's turns
        # each tuple into a dict and back (49,152 findings: 0.63 s against 0.22 s).
        cols = ", ".join(c.name for c in table.columns)
        marks = ", ".join("?" * len(table.columns))
        conflict = " ON CONFLICT DO NOTHING" if ignore_duplicates else ""
        if not conn.in_transaction():  # the rows go in the caller's transaction, never alone
            conn.begin()
        cursor = conn.connection.driver_connection.cursor()
        try:
            for i in range(0, len(rows), INSERT_BATCH):
                cursor.executemany(f"INSERT INTO {table.name} ({cols}) VALUES ({marks})"
                                   f"{conflict}", rows[i:i + INSERT_BATCH])
        finally:
            cursor.close()
        return
    import psycopg

    if ignore_duplicates:
        try:  # duplicates are rare (a resumed batch): straight in, unless one is there
            with conn.begin_nested():
                _copy(conn, table.name, table, rows)
            return
        except psycopg.errors.UniqueViolation:
            pass
    else:
        _copy(conn, table.name, table, rows)
        return
    cols = ", ".join(c.name for c in table.columns)
    scratch = f"{table.name}_incoming"
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(f"CREATE TEMP TABLE {scratch} (LIKE {table.name}) ON COMMIT DROP")
    _copy(conn, scratch, table, rows)
    with conn.connection.driver_connection.cursor() as cur:
        cur.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM {scratch} "
                    "ON CONFLICT DO NOTHING")
        cur.execute(f"DROP TABLE {scratch}")


def _fetch_all(conn: Connection, query: Any) -> list[tuple]:
    """All rows of ``query``; on SQLite straight from the driver's cursor (a run's 49,152
    findings: 0.04 s against 0.16 s through SQLAlchemy's result rows)."""
    if _is_postgres(conn):
        return list(conn.execute(query).all())
    compiled = query.compile(dialect=conn.dialect)
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    cursor = conn.connection.driver_connection.cursor()
    try:
        return cursor.execute(str(compiled), params).fetchall()
    finally:
        cursor.close()


def _copy(conn: Connection, target: str, table: Any, rows: list[tuple]) -> None:
    """``COPY`` ``rows`` into the table ``target`` (``table``'s columns) on PostgreSQL."""
    cols = ", ".join(c.name for c in table.columns)
    with conn.connection.driver_connection.cursor() as cur, \
            cur.copy(f"COPY {target} ({cols}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


# --- models and tokens ----------------------------------------------------------------------


@dataclass
class StoredModel:
    """One row of ``models``."""

    id: int
    ref: str
    alias: str | None
    backend: str
    fingerprint: str
    tokenizer_hash: str
    vocab_size: int
    created_utc: datetime | None

    @property
    def label(self) -> str:
        """The name shown for the model: its alias, else its reference."""
        return self.alias or self.ref


def model_id_by_fingerprint(conn: Connection, fingerprint: str) -> int | None:
    """The id of the model stored with ``fingerprint``, or None."""
    return conn.execute(select(MODELS.c.id).where(MODELS.c.fingerprint == fingerprint)
                        ).scalar()


def insert_model(conn: Connection, *, ref: str, alias: str | None, backend: str,
                 fingerprint: str, tokenizer_hash: str, vocab_size: int,
                 meta: dict[str, Any]) -> int:
    """Store a model and return its id; a model with the same fingerprint that another
    process stored first is kept, and its id returned."""
    conn.execute(_insert_ignoring_duplicates(conn, MODELS).values(
        ref=ref, alias=alias, backend=backend, fingerprint=fingerprint,
        tokenizer_hash=tokenizer_hash, vocab_size=vocab_size,
        meta_json=json.dumps(meta, default=str), created_utc=now()))
    model_id = model_id_by_fingerprint(conn, fingerprint)
    assert model_id is not None
    return model_id


def set_model_alias(conn: Connection, model_id: int, alias: str | None) -> None:
    """Give the model ``alias`` (None keeps the alias it has)."""
    if alias is not None:
        conn.execute(update(MODELS).where(MODELS.c.id == model_id).values(alias=alias))


def model_by_id(conn: Connection, model_id: int) -> StoredModel:
    """The stored model ``model_id``."""
    row = conn.execute(select(MODELS.c.id, MODELS.c.ref, MODELS.c.alias, MODELS.c.backend,
                              MODELS.c.fingerprint, MODELS.c.tokenizer_hash,
                              MODELS.c.vocab_size, MODELS.c.created_utc)
                       .where(MODELS.c.id == model_id)).one()
    return StoredModel(*row)


def find_model(conn: Connection, name: str) -> tuple[int, str] | None:
    """(id, label) of the stored model whose alias, reference or fingerprint is ``name``;
    of several, the one scanned last (None when there is none)."""
    last_run = func.max(RUNS.c.id)
    row = conn.execute(
        select(MODELS.c.id, MODELS.c.alias, MODELS.c.ref)
        .select_from(MODELS.outerjoin(RUNS, RUNS.c.model_id == MODELS.c.id))
        .where((MODELS.c.alias == name) | (MODELS.c.ref == name)
               | (MODELS.c.fingerprint == name))
        .group_by(MODELS.c.id, MODELS.c.alias, MODELS.c.ref)
        # PostgreSQL sorts NULL first in a descending order, SQLite last: say it
        .order_by(last_run.desc().nulls_last(), MODELS.c.id.desc()).limit(1)).first()
    return None if row is None else (int(row.id), row.alias or row.ref)


def model_labels(conn: Connection) -> dict[int, str]:
    """Every stored model's label (alias, else reference), by id."""
    return {int(i): a or r for i, a, r in conn.execute(
        select(MODELS.c.id, MODELS.c.alias, MODELS.c.ref))}


def token_categories(conn: Connection, model_id: int) -> list[str]:
    """The tokenizer-analysis category of each stored token of the model, by token id."""
    return list(conn.execute(select(TOKENS.c.category).where(TOKENS.c.model_id == model_id)
                             .order_by(TOKENS.c.token_id)).scalars())


def delete_tokens(conn: Connection, model_id: int) -> None:
    """Remove the model's stored tokens (an incomplete vocabulary, about to be stored again)."""
    conn.execute(delete(TOKENS).where(TOKENS.c.model_id == model_id))


def insert_tokens(conn: Connection, model_id: int, raw: Sequence[bytes], text: Sequence[str],
                  categories: Sequence[str], attrs: Sequence[str | None]) -> None:
    """Store the model's vocabulary, token ids ``0..len(raw)-1``. On PostgreSQL a NUL
    character in a token's text is stored as ␀ (``raw`` keeps the exact bytes)."""
    rows = [(model_id, i, bytes(r), _text_for(conn, t), c, a)
            for i, (r, t, c, a) in enumerate(zip(raw, text, categories, attrs, strict=True))]
    _bulk_insert(conn, TOKENS, rows, ignore_duplicates=False)


def token_texts(conn: Connection, model_id: int) -> list[tuple[int, str, str]]:
    """(token id, text, category) of every stored token of the model, by id."""
    return [tuple(r) for r in conn.execute(
        select(TOKENS.c.token_id, TOKENS.c.text, TOKENS.c.category)
        .where(TOKENS.c.model_id == model_id).order_by(TOKENS.c.token_id))]


def token_bytes(conn: Connection, model_id: int) -> list[tuple[bytes, str]]:
    """(raw bytes, text) of every stored token of the model, by id."""
    return [(bytes(r), t) for r, t in conn.execute(
        select(TOKENS.c.raw, TOKENS.c.text).where(TOKENS.c.model_id == model_id)
        .order_by(TOKENS.c.token_id))]


# --- runs -----------------------------------------------------------------------------------


@dataclass
class StoredRun:
    """The parts of a ``runs`` row that readers of results use."""

    id: int
    detector: str
    suspicious_when: str
    options_json: str
    finished_utc: datetime | None
    wall_s: float | None


def insert_run(conn: Connection, *, model_id: int, detector: str, detector_version: str,
               harness_version: str, suspicious_when: str, options: dict[str, Any],
               options_key: str, status: str, status_reason: str | None = None,
               finished: bool = False, wall_s: float | None = None) -> int:
    """Start (or, with ``finished``, record a finished) run; return its id."""
    started = now()
    return int(conn.execute(insert(RUNS).values(
        model_id=model_id, detector=detector, detector_version=detector_version,
        harness_version=harness_version, suspicious_when=suspicious_when,
        options_json=json.dumps(options, default=str), options_key=options_key,
        status=status, status_reason=status_reason, started_utc=started,
        finished_utc=started if finished else None, wall_s=wall_s)).inserted_primary_key[0])


def finish_run(conn: Connection, run_id: int, status: str, reason: str | None,
               wall_s: float) -> bool:
    """Close a ``running`` run as ``done`` or ``failed``; False when it was not running
    (another process sharing it closed it first)."""
    return conn.execute(update(RUNS).where(RUNS.c.id == run_id, RUNS.c.status == "running")
                        .values(status=status, status_reason=reason, finished_utc=now(),
                                wall_s=wall_s)).rowcount == 1


def run_status(conn: Connection, run_id: int) -> tuple[str, str | None]:
    """(status, reason) of a run."""
    row = conn.execute(select(RUNS.c.status, RUNS.c.status_reason)
                       .where(RUNS.c.id == run_id)).one()
    return row.status, row.status_reason


def lock_runs(conn: Connection, model_id: int) -> None:
    """Hold the model's run lock until the transaction ends, so that processes starting
    the same scan at once find or create each run exactly once. PostgreSQL: an advisory
    lock; SQLite: every transaction already holds the write lock (``BEGIN IMMEDIATE``)."""
    if _is_postgres(conn):
        conn.execute(select(func.pg_advisory_xact_lock(RUNS_LOCK, int(model_id))))


def reopen_run(conn: Connection, run_id: int) -> None:
    """Mark a run ``running`` again (it is being resumed or retried)."""
    conn.execute(update(RUNS).where(RUNS.c.id == run_id).values(status="running",
                                                                 finished_utc=None))


def latest_matching_run(conn: Connection, *, model_id: int, detector: str,
                        detector_version: str, options_key: str,
                        statuses: Sequence[str]) -> tuple[int, str] | None:
    """(id, status) of the newest run of the detector with these options and a status in
    ``statuses``, or None."""
    row = conn.execute(select(RUNS.c.id, RUNS.c.status).where(
        RUNS.c.model_id == model_id, RUNS.c.detector == detector,
        RUNS.c.detector_version == detector_version, RUNS.c.options_key == options_key,
        RUNS.c.status.in_(list(statuses))).order_by(RUNS.c.id.desc()).limit(1)).first()
    return None if row is None else (int(row.id), row.status)


def done_runs(conn: Connection, model_id: int) -> list[tuple[int, str, datetime]]:
    """(id, detector, finished) of every finished detector run on the model, oldest first
    (the final verdict's own runs excluded)."""
    return [(int(i), d, f) for i, d, f in conn.execute(
        select(RUNS.c.id, RUNS.c.detector, RUNS.c.finished_utc).where(
            RUNS.c.model_id == model_id, RUNS.c.status == "done", RUNS.c.detector != FINAL)
        .order_by(RUNS.c.id))]


def latest_done_runs(conn: Connection, model_id: int) -> list[StoredRun]:
    """The latest finished run of each detector on the model (the ``latest_runs`` view),
    the final verdict's included, oldest first."""
    newest = (select(func.max(RUNS.c.id)).where(RUNS.c.status == "done",
                                                RUNS.c.model_id == model_id)
              .group_by(RUNS.c.detector))
    rows = conn.execute(select(RUNS.c.id, RUNS.c.detector, RUNS.c.suspicious_when,
                               RUNS.c.options_json, RUNS.c.finished_utc, RUNS.c.wall_s)
                        .where(RUNS.c.id.in_(newest)).order_by(RUNS.c.id))
    return [StoredRun(int(r.id), r.detector, r.suspicious_when or "low", r.options_json,
                      r.finished_utc, r.wall_s) for r in rows]


def latest_verdict_run(conn: Connection, model_id: int) -> int | None:
    """The id of the model's latest finished final-verdict run, or None."""
    run_id = conn.execute(select(func.max(RUNS.c.id)).where(
        RUNS.c.model_id == model_id, RUNS.c.detector == FINAL, RUNS.c.status == "done")
    ).scalar()
    return None if run_id is None else int(run_id)


def suspicious_when(conn: Connection, run_id: int) -> str:
    """Which end of the run's scores is glitchy: ``low`` or ``high``."""
    return conn.execute(select(RUNS.c.suspicious_when).where(RUNS.c.id == run_id)
                        ).scalar_one() or "low"


# --- findings -------------------------------------------------------------------------------


def insert_findings(conn: Connection, run_id: int,
                    rows: Iterable[tuple[int, float | None, str, str]]) -> None:
    """Store findings ``(token_id, score, verdict, evidence_json)`` of a run; a token that
    already has a finding in the run keeps it (a resumed batch is not stored twice)."""
    values = [(run_id, int(t), s, v, e) for t, s, v, e in rows]
    _bulk_insert(conn, FINDINGS, values, ignore_duplicates=True)


def delete_findings(conn: Connection, run_id: int, verdict: str) -> None:
    """Remove the run's findings with ``verdict`` (failed tokens, about to be retried)."""
    conn.execute(delete(FINDINGS).where(FINDINGS.c.run_id == run_id,
                                        FINDINGS.c.verdict == verdict))


def count_findings(conn: Connection, run_id: int, verdict: str | None = None) -> int:
    """How many findings the run has (with ``verdict``, only those)."""
    q = select(func.count()).select_from(FINDINGS).where(FINDINGS.c.run_id == run_id)
    if verdict is not None:
        q = q.where(FINDINGS.c.verdict == verdict)
    return int(conn.execute(q).scalar_one())


def verdict_counts(conn: Connection, run_id: int) -> dict[str, int]:
    """How many of the run's findings carry each verdict."""
    return {v: int(n) for v, n in conn.execute(
        select(FINDINGS.c.verdict, func.count()).where(FINDINGS.c.run_id == run_id)
        .group_by(FINDINGS.c.verdict))}


def examined_token_ids(conn: Connection, run_id: int) -> np.ndarray:
    """The ids of the tokens the run has a finding for, sorted."""
    ids = conn.execute(select(FINDINGS.c.token_id).where(FINDINGS.c.run_id == run_id)
                       .order_by(FINDINGS.c.token_id)).scalars().all()
    return np.asarray(ids, dtype=np.int64)


def token_ids_with_verdict(conn: Connection, run_ids: Sequence[int],
                           verdicts: Sequence[str]) -> np.ndarray:
    """The ids of the tokens any of ``run_ids`` gave one of ``verdicts``, sorted."""
    if not run_ids:
        return np.zeros(0, dtype=np.int64)
    ids = conn.execute(select(FINDINGS.c.token_id).distinct().where(
        FINDINGS.c.run_id.in_([int(r) for r in run_ids]),
        FINDINGS.c.verdict.in_(list(verdicts)))).scalars().all()
    return np.array(sorted(ids), dtype=np.int64)


def most_suspicious_token_ids(conn: Connection, run_id: int, k: int,
                              flagged_only: bool = False) -> list[int]:
    """The run's ``k`` most suspicious tokens by score (the glitchy end first, ties by id);
    with ``flagged_only`` among its flagged tokens, unscored ones last."""
    low = suspicious_when(conn, run_id) == "low"
    order = FINDINGS.c.score.asc() if low else FINDINGS.c.score.desc()
    q = select(FINDINGS.c.token_id).where(FINDINGS.c.run_id == run_id)
    q = q.where(FINDINGS.c.verdict.in_(FLAGGED)) if flagged_only else \
        q.where(FINDINGS.c.score.is_not(None))
    return [int(t) for t in conn.execute(
        q.order_by(order.nulls_last(), FINDINGS.c.token_id).limit(k)).scalars()]


def run_findings(conn: Connection, run_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's findings as arrays ordered by token id: ids, scores (NaN where none) and
    verdicts."""
    rows = _fetch_all(conn, select(FINDINGS.c.token_id, FINDINGS.c.score, FINDINGS.c.verdict)
                      .where(FINDINGS.c.run_id == run_id).order_by(FINDINGS.c.token_id))
    if not rows:
        return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0, dtype=object)
    ids, scores, verdicts = zip(*rows, strict=True)
    return (np.array(ids, dtype=np.int64), np.array(scores, dtype=float),  # None: NaN
            np.array(verdicts, dtype=object))


def run_arrays(conn: Connection, run_id: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A run's scores (NaN where none) and verdicts ("" where no finding), indexed by token
    id over ``size`` tokens."""
    ids, sc, vd = run_findings(conn, run_id)
    scores = np.full(size, np.nan)
    verdicts = np.full(size, "", dtype=object)
    scores[ids], verdicts[ids] = sc, vd
    return scores, verdicts


def glitch_tokens(conn: Connection, model_id: int, run_id: int) -> list[tuple[int, bytes, str]]:
    """(token id, raw bytes, text) of the tokens a final-verdict run calls ``glitch``."""
    rows = conn.execute(
        select(FINDINGS.c.token_id, TOKENS.c.raw, TOKENS.c.text)
        .join(TOKENS, and_(TOKENS.c.model_id == model_id,
                           TOKENS.c.token_id == FINDINGS.c.token_id))
        .where(FINDINGS.c.run_id == run_id, FINDINGS.c.verdict == GLITCH)
        .order_by(FINDINGS.c.token_id))
    return [(int(t), bytes(r), x) for t, r, x in rows]


@dataclass
class TokenFindings:
    """One token's findings in a set of runs, gathered: the rows of the report's tables."""

    token_id: int
    text: str
    raw: bytes
    category: str
    min_score: float | None
    verdicts: list[str]  # distinct, sorted
    n_findings: int
    evidence_json: str  # the greatest of the findings' evidence texts


def findings_by_token(conn: Connection, model_id: int, run_ids: Sequence[int],
                      verdicts: Sequence[str]) -> list[TokenFindings]:
    """Per token, the findings of ``run_ids`` whose verdict is in ``verdicts``, with the
    token spelled out, by token id."""
    rows = conn.execute(
        select(FINDINGS.c.token_id, TOKENS.c.text, TOKENS.c.raw, TOKENS.c.category,
               FINDINGS.c.score, FINDINGS.c.verdict, FINDINGS.c.evidence_json)
        .join(TOKENS, and_(TOKENS.c.model_id == model_id,
                           TOKENS.c.token_id == FINDINGS.c.token_id))
        .where(FINDINGS.c.run_id.in_([int(r) for r in run_ids]),
               FINDINGS.c.verdict.in_(list(verdicts)))
        .order_by(FINDINGS.c.token_id))
    out: dict[int, TokenFindings] = {}
    for t, text, raw, category, score, verdict, evidence in rows:
        got = out.get(t)
        if got is None:
            out[t] = TokenFindings(int(t), text, bytes(raw), category, score, [verdict], 1,
                                   evidence)
            continue
        got.n_findings += 1
        if score is not None and (got.min_score is None or score < got.min_score):
            got.min_score = score
        if verdict not in got.verdicts:
            got.verdicts = sorted([*got.verdicts, verdict])
        got.evidence_json = max(got.evidence_json, evidence)
    return list(out.values())


def latest_evidence(conn: Connection, run_ids: Sequence[int], token_ids: Sequence[int]
                    ) -> dict[int, str]:
    """Per token, the evidence text of its finding in the latest of ``run_ids`` that has
    one."""
    found: dict[int, str] = {}
    runs = [int(r) for r in run_ids]
    ids = [int(t) for t in token_ids]
    for i in range(0, len(ids), 500):
        for t, evidence in conn.execute(
                select(FINDINGS.c.token_id, FINDINGS.c.evidence_json)
                .where(FINDINGS.c.run_id.in_(runs), FINDINGS.c.token_id.in_(ids[i:i + 500]))
                .order_by(FINDINGS.c.run_id)):
            found[int(t)] = evidence
    return found


def final_verdict_rows(conn: Connection, model_id: int, run_id: int
                       ) -> list[tuple[int, str, str, float | None]]:
    """(token id, text, verdict, score) of every finding of a final-verdict run."""
    return [(int(t), x, v, s) for t, x, v, s in conn.execute(
        select(FINDINGS.c.token_id, TOKENS.c.text, FINDINGS.c.verdict, FINDINGS.c.score)
        .join(TOKENS, and_(TOKENS.c.model_id == model_id,
                           TOKENS.c.token_id == FINDINGS.c.token_id))
        .where(FINDINGS.c.run_id == run_id))]


# --- blocks: the units of a run that several processes share --------------------------------


@dataclass
class Block:
    """One block of a run: the run's tokens from ``first_token`` to ``last_token``."""

    run_id: int
    block: int
    first_token: int
    last_token: int
    n_tokens: int


def database_clock(conn: Connection) -> float:
    """The database server's time in seconds since the epoch: leases are compared with one
    clock, whichever machine a process runs on."""
    if _is_postgres(conn):
        return float(conn.execute(select(func.extract("epoch", func.clock_timestamp())))
                     .scalar_one())
    return float(conn.execute(select((func.julianday("now") - 2440587.5) * 86400.0))
                 .scalar_one())


def insert_blocks(conn: Connection, run_id: int,
                  bounds: Sequence[tuple[int, int, int]]) -> None:
    """Cut a run into blocks ``(first_token, last_token, n_tokens)``, all open."""
    conn.execute(insert(BLOCKS), [
        {"run_id": run_id, "block": i, "first_token": int(a), "last_token": int(b),
         "n_tokens": int(n), "status": "open", "claims": 0}
        for i, (a, b, n) in enumerate(bounds)])


def count_blocks(conn: Connection, run_id: int) -> dict[str, int]:
    """How many of the run's blocks are ``open``, ``claimed`` and ``done``."""
    counts = {"open": 0, "claimed": 0, "done": 0}
    counts.update({s: int(n) for s, n in conn.execute(
        select(BLOCKS.c.status, func.count()).where(BLOCKS.c.run_id == run_id)
        .group_by(BLOCKS.c.status))})
    return counts


def claimed_blocks(conn: Connection, run_id: int) -> list[tuple[int, str]]:
    """(block, worker) of the run's claimed blocks."""
    return [(int(b), w) for b, w in conn.execute(
        select(BLOCKS.c.block, BLOCKS.c.worker).where(
            BLOCKS.c.run_id == run_id, BLOCKS.c.status == "claimed"))]


# Blocks are claimed in a spread order, from the middle of the run, each next one about
# 0.618 of the run away: a block's cost grows with its token ids (later ids hold more of the
# tokens the screen leaves and the glitch tokens), so the first blocks' rate, which the scan's
# estimate comes from, is the whole run's, and an interrupted run has a sample of every part.
_SPREAD_MOD = 1 << 20
_SPREAD_STEP = 648_057  # odd (a permutation of the residues), about _SPREAD_MOD / 1.618


def claim_order(n_blocks: int) -> list[int]:
    """The order in which the blocks of a run of ``n_blocks`` blocks are claimed."""
    return sorted(range(n_blocks), key=lambda b: (_spread_key(b, n_blocks), b))


def _spread_key(block: Any, n_blocks: int) -> Any:
    """``block``'s place in ``claim_order``: a number or a SQL expression, by the same
    integer arithmetic (64-bit, as PostgreSQL's ``integer`` would overflow)."""
    return ((block + (_SPREAD_MOD - n_blocks // 2)) * _SPREAD_STEP) % _SPREAD_MOD


def claim_block(conn: Connection, run_id: int, worker: str, lease_s: float,
                also: Sequence[int] = ()) -> Block | None:
    """Claim the run's next open block in ``claim_order``, or one whose lease has run out,
    or one of ``also`` (claims the caller knows to be dead), for ``worker`` until ``lease_s``
    seconds from now; None when every block is done or held. Rows another transaction is
    claiming are skipped, not waited for (PostgreSQL: ``FOR UPDATE SKIP LOCKED``; SQLite:
    one writer at a time)."""
    clock = database_clock(conn)
    takeable = (BLOCKS.c.status == "open") | (
        (BLOCKS.c.status == "claimed") & ((BLOCKS.c.lease_until < clock)
                                          | BLOCKS.c.block.in_([int(b) for b in also])))
    n_blocks = conn.execute(select(func.count()).where(BLOCKS.c.run_id == run_id)).scalar_one()
    order = _spread_key(cast(BLOCKS.c.block, BigInteger), int(n_blocks))
    row = conn.execute(
        select(BLOCKS.c.block, BLOCKS.c.first_token, BLOCKS.c.last_token, BLOCKS.c.n_tokens)
        .where(BLOCKS.c.run_id == run_id, takeable).order_by(order, BLOCKS.c.block).limit(1)
        .with_for_update(skip_locked=True)).first()
    if row is None:
        return None
    taken = conn.execute(update(BLOCKS).where(
        BLOCKS.c.run_id == run_id, BLOCKS.c.block == row.block, takeable).values(
        status="claimed", worker=worker, lease_until=clock + lease_s,
        claims=BLOCKS.c.claims + 1)).rowcount
    return Block(run_id, int(row.block), int(row.first_token), int(row.last_token),
                 int(row.n_tokens)) if taken == 1 else None


def renew_claims(conn: Connection, worker: str, lease_s: float) -> int:
    """Extend every claim ``worker`` holds to ``lease_s`` seconds from now; how many."""
    clock = database_clock(conn)
    return conn.execute(update(BLOCKS).where(
        BLOCKS.c.worker == worker, BLOCKS.c.status == "claimed").values(
        lease_until=clock + lease_s)).rowcount


def holds_claim(conn: Connection, block: Block, worker: str) -> bool:
    """Whether ``worker`` still holds ``block`` (its lease may have run out and another
    process taken it over)."""
    row = conn.execute(select(BLOCKS.c.status, BLOCKS.c.worker).where(
        BLOCKS.c.run_id == block.run_id, BLOCKS.c.block == block.block)
        .with_for_update()).one()
    return row.status == "claimed" and row.worker == worker


def complete_block(conn: Connection, block: Block, worker: str, wall_s: float) -> None:
    """Mark a block ``worker`` holds (see ``holds_claim``) done."""
    conn.execute(update(BLOCKS).where(
        BLOCKS.c.run_id == block.run_id, BLOCKS.c.block == block.block).values(
        status="done", worker=None, lease_until=None, done_by=worker, wall_s=wall_s))


def release_claims(conn: Connection, worker: str) -> None:
    """Give back every block ``worker`` holds (it is stopping): they are open again."""
    conn.execute(update(BLOCKS).where(
        BLOCKS.c.worker == worker, BLOCKS.c.status == "claimed").values(
        status="open", worker=None, lease_until=None))


def reopen_blocks_with(conn: Connection, run_id: int, verdict: str) -> int:
    """Open again the finished blocks that hold a finding of the run with ``verdict`` (failed
    tokens, about to be retried); how many."""
    has = select(FINDINGS.c.token_id).where(
        FINDINGS.c.run_id == run_id, FINDINGS.c.verdict == verdict,
        FINDINGS.c.token_id.between(BLOCKS.c.first_token, BLOCKS.c.last_token)).exists()
    return conn.execute(update(BLOCKS).where(BLOCKS.c.run_id == run_id, has).values(
        status="open", worker=None, lease_until=None)).rowcount


def examined_in_range(conn: Connection, run_id: int, first: int, last: int) -> np.ndarray:
    """The ids of the tokens from ``first`` to ``last`` the run has a finding for, sorted."""
    ids = conn.execute(select(FINDINGS.c.token_id).where(
        FINDINGS.c.run_id == run_id, FINDINGS.c.token_id.between(first, last))
        .order_by(FINDINGS.c.token_id)).scalars().all()
    return np.asarray(ids, dtype=np.int64)


# --- putting results to work: check, export, show, token facts (issue 14) -------------------


def model_source(conn: Connection, model_id: int) -> tuple[str, str, dict[str, Any]]:
    """(reference, backend, metadata) of a stored model: what rebuilds its tokenizer."""
    row = conn.execute(select(MODELS.c.ref, MODELS.c.backend, MODELS.c.meta_json)
                       .where(MODELS.c.id == model_id)).one()
    return row.ref, row.backend, json.loads(row.meta_json or "{}")


@dataclass
class VerdictToken:
    """One token with its final verdict: id, exact bytes, text, category, verdict, the
    verifier's score (the repeat probability) and the verdict's evidence."""

    token_id: int
    raw: bytes
    text: str
    category: str
    verdict: str
    score: float | None
    evidence_json: str


def tokens_with_final_verdict(conn: Connection, model_id: int, run_id: int,
                              verdicts: Sequence[str]) -> list[VerdictToken]:
    """The tokens whose final verdict (of the ``verdict`` run ``run_id``) is one of
    ``verdicts``, by token id."""
    rows = conn.execute(
        select(FINDINGS.c.token_id, TOKENS.c.raw, TOKENS.c.text, TOKENS.c.category,
               FINDINGS.c.verdict, FINDINGS.c.score, FINDINGS.c.evidence_json)
        .join(TOKENS, and_(TOKENS.c.model_id == model_id,
                           TOKENS.c.token_id == FINDINGS.c.token_id))
        .where(FINDINGS.c.run_id == run_id, FINDINGS.c.verdict.in_(list(verdicts)))
        .order_by(FINDINGS.c.token_id))
    return [VerdictToken(int(t), bytes(r), x, c, v, s, e) for t, r, x, c, v, s, e in rows]


def token_row(conn: Connection, model_id: int, token_id: int
              ) -> tuple[bytes, str, str, str | None] | None:
    """(raw bytes, text, category, attribute) of one stored token, or None."""
    row = conn.execute(select(TOKENS.c.raw, TOKENS.c.text, TOKENS.c.category, TOKENS.c.attr)
                       .where(TOKENS.c.model_id == model_id,
                              TOKENS.c.token_id == token_id)).first()
    return None if row is None else (bytes(row.raw), row.text, row.category, row.attr)


def token_ids_by_text(conn: Connection, model_id: int, text: str) -> list[int]:
    """The ids of the model's tokens whose text is ``text``."""
    return [int(t) for t in conn.execute(
        select(TOKENS.c.token_id).where(TOKENS.c.model_id == model_id,
                                        TOKENS.c.text == _text_for(conn, text))
        .order_by(TOKENS.c.token_id)).scalars()]


@dataclass
class TokenFinding:
    """One finding of one token in one run, with the run it belongs to."""

    run_id: int
    detector: str
    status: str
    finished_utc: datetime | None
    score: float | None
    verdict: str
    evidence_json: str


def findings_of_token(conn: Connection, model_id: int, token_id: int) -> list[TokenFinding]:
    """Every finding of one token in every run on the model, oldest run first."""
    rows = conn.execute(
        select(RUNS.c.id, RUNS.c.detector, RUNS.c.status, RUNS.c.finished_utc,
               FINDINGS.c.score, FINDINGS.c.verdict, FINDINGS.c.evidence_json)
        .join(FINDINGS, FINDINGS.c.run_id == RUNS.c.id)
        .where(RUNS.c.model_id == model_id, FINDINGS.c.token_id == token_id)
        .order_by(RUNS.c.id))
    return [TokenFinding(int(r), d, st, f, s, v, e) for r, d, st, f, s, v, e in rows]


def replace_token_facts(conn: Connection, model_id: int, verdict_run_id: int,
                        facts: dict[int, str]) -> None:
    """Store the model's token facts (JSON texts by token id) for a final-verdict run, in
    place of those stored before."""
    conn.execute(delete(FACTS).where(FACTS.c.model_id == model_id))
    rows = [(model_id, int(t), verdict_run_id, f) for t, f in sorted(facts.items())]
    _bulk_insert(conn, FACTS, rows, ignore_duplicates=False)


def token_facts(conn: Connection, model_id: int, token_ids: Sequence[int] | None = None
                ) -> dict[int, str]:
    """The stored facts (JSON text) of the model's tokens, of ``token_ids`` or of all."""
    q = select(FACTS.c.token_id, FACTS.c.facts_json).where(FACTS.c.model_id == model_id)
    if token_ids is None:
        return {int(t): f for t, f in conn.execute(q)}
    found: dict[int, str] = {}
    ids = [int(t) for t in token_ids]
    for i in range(0, len(ids), 500):
        found.update({int(t): f for t, f in conn.execute(
            q.where(FACTS.c.token_id.in_(ids[i:i + 500])))})
    return found


def facts_verdict_run(conn: Connection, model_id: int) -> int | None:
    """The final-verdict run the model's stored token facts were computed for, or None."""
    run_id = conn.execute(select(func.max(FACTS.c.verdict_run_id))
                          .where(FACTS.c.model_id == model_id)).scalar()
    return None if run_id is None else int(run_id)
# --- clusterings: k-means of the embedding matrices (harness clusters) ----------------------

CLUSTERINGS = Clustering.__table__
TOKEN_CLUSTERS = TokenCluster.__table__
CLUSTER_CENTROIDS = ClusterCentroid.__table__
CENTROID_DISTANCES = CentroidDistance.__table__


@dataclass
class StoredClustering:
    """One row of ``clusterings``, its JSON decoded."""

    id: int
    model_id: int
    matrix: str
    k: int
    seeds: list[int]
    agreement: float | None
    options: dict[str, Any]
    wall_s: float
    created_utc: datetime | None


def insert_clustering(conn: Connection, *, model_id: int, matrix: str, k: int,
                      seeds: Sequence[int], agreement: float | None, options: dict[str, Any],
                      wall_s: float) -> int:
    """Store one clustering of one matrix of a model (its rows go in with
    ``insert_token_clusters`` and the others); return its id."""
    return int(conn.execute(insert(CLUSTERINGS).values(
        model_id=model_id, matrix=matrix, k=int(k), seeds_json=json.dumps([int(s) for s in seeds]),
        agreement=None if agreement is None else float(agreement),
        options_json=json.dumps(options, default=str), wall_s=float(wall_s),
        created_utc=now())).inserted_primary_key[0])


def insert_token_clusters(conn: Connection, clustering_id: int, seed: int,
                          token_ids: np.ndarray, clusters: np.ndarray,
                          distances: np.ndarray) -> None:
    """Store each token's cluster under one seed and its distance to that cluster's
    centroid (three arrays of one length)."""
    n = len(token_ids)
    rows = list(zip([int(clustering_id)] * n, [int(seed)] * n, np.asarray(token_ids).tolist(),
                    np.asarray(clusters).tolist(), np.asarray(distances, dtype=float).tolist(),
                    strict=True))
    _bulk_insert(conn, TOKEN_CLUSTERS, rows, ignore_duplicates=False)


def insert_cluster_centroids(conn: Connection, clustering_id: int, seed: int,
                             sizes: np.ndarray, centroid_distances: np.ndarray,
                             stability: np.ndarray | None) -> None:
    """Store each cluster of one seed: its size, its centroid's distance to the centroid of
    the whole matrix, and its stability across the seeds (None: one seed only)."""
    k = len(sizes)
    stab = [None] * k if stability is None else \
        [None if not np.isfinite(v) else float(v) for v in np.asarray(stability).tolist()]
    rows = list(zip([int(clustering_id)] * k, [int(seed)] * k, range(k),
                    np.asarray(sizes).tolist(),
                    np.asarray(centroid_distances, dtype=float).tolist(), stab, strict=True))
    _bulk_insert(conn, CLUSTER_CENTROIDS, rows, ignore_duplicates=False)


def insert_centroid_distances(conn: Connection, clustering_id: int, token_ids: np.ndarray,
                              distances: np.ndarray) -> None:
    """Store each token's distance to the centroid of the whole matrix."""
    n = len(token_ids)
    rows = list(zip([int(clustering_id)] * n, np.asarray(token_ids).tolist(),
                    np.asarray(distances, dtype=float).tolist(), strict=True))
    _bulk_insert(conn, CENTROID_DISTANCES, rows, ignore_duplicates=False)


def _clustering(row: Any) -> StoredClustering:
    try:
        options = json.loads(row.options_json or "{}")
    except json.JSONDecodeError:
        options = {}
    return StoredClustering(int(row.id), int(row.model_id), row.matrix, int(row.k),
                            [int(s) for s in json.loads(row.seeds_json or "[]")],
                            None if row.agreement is None else float(row.agreement),
                            options if isinstance(options, dict) else {},
                            float(row.wall_s), row.created_utc)


def latest_clusterings(conn: Connection, model_id: int) -> list[StoredClustering]:
    """The model's latest clustering of each matrix (``input`` first, then ``output``)."""
    newest = (select(func.max(CLUSTERINGS.c.id)).where(CLUSTERINGS.c.model_id == model_id)
              .group_by(CLUSTERINGS.c.matrix))
    rows = conn.execute(select(CLUSTERINGS).where(CLUSTERINGS.c.id.in_(newest))
                        .order_by(CLUSTERINGS.c.matrix, CLUSTERINGS.c.id))
    return [_clustering(r) for r in rows]


def clustering_by_id(conn: Connection, clustering_id: int) -> StoredClustering:
    """The stored clustering ``clustering_id``."""
    return _clustering(conn.execute(select(CLUSTERINGS).where(
        CLUSTERINGS.c.id == clustering_id)).one())


@dataclass
class StoredCluster:
    """One cluster of one seed of a clustering, with the final verdicts of its tokens."""

    cluster: int
    size: int
    centroid_distance: float
    stability: float | None
    verdicts: dict[str, int]  # final verdict -> how many of its tokens (none: not scanned)


def cluster_rows(conn: Connection, clustering_id: int, seed: int,
                 verdict_run: int | None) -> list[StoredCluster]:
    """Every cluster of the seed, by cluster number, with how many of its tokens carry each
    final verdict of ``verdict_run`` (a final-verdict run; None: no counts)."""
    counts: dict[int, dict[str, int]] = {}
    if verdict_run is not None:
        q = (select(TOKEN_CLUSTERS.c.cluster, FINDINGS.c.verdict, func.count())
             .select_from(TOKEN_CLUSTERS.join(FINDINGS, and_(
                 FINDINGS.c.run_id == verdict_run,
                 FINDINGS.c.token_id == TOKEN_CLUSTERS.c.token_id)))
             .where(TOKEN_CLUSTERS.c.clustering_id == clustering_id,
                    TOKEN_CLUSTERS.c.seed == seed)
             .group_by(TOKEN_CLUSTERS.c.cluster, FINDINGS.c.verdict))
        for cluster, verdict, n in conn.execute(q):
            counts.setdefault(int(cluster), {})[verdict] = int(n)
    rows = conn.execute(
        select(CLUSTER_CENTROIDS.c.cluster, CLUSTER_CENTROIDS.c.size,
               CLUSTER_CENTROIDS.c.centroid_distance, CLUSTER_CENTROIDS.c.stability)
        .where(CLUSTER_CENTROIDS.c.clustering_id == clustering_id,
               CLUSTER_CENTROIDS.c.seed == seed).order_by(CLUSTER_CENTROIDS.c.cluster))
    return [StoredCluster(int(c), int(n), float(d), None if s is None else float(s),
                          counts.get(int(c), {})) for c, n, d, s in rows]


def cluster_members(conn: Connection, model_id: int, clustering_id: int, seed: int,
                    clusters: Sequence[int], per_cluster: int
                    ) -> dict[int, list[tuple[int, str, bytes]]]:
    """Per cluster of ``clusters``, its ``per_cluster`` tokens nearest its centroid
    ``(token id, text, raw)``, nearest first."""
    if not clusters or per_cluster <= 0:
        return {}
    rank = func.row_number().over(partition_by=TOKEN_CLUSTERS.c.cluster,
                                  order_by=(TOKEN_CLUSTERS.c.distance,
                                            TOKEN_CLUSTERS.c.token_id)).label("rank")
    ranked = (select(TOKEN_CLUSTERS.c.cluster, TOKEN_CLUSTERS.c.token_id,
                     TOKEN_CLUSTERS.c.distance, rank)
              .where(TOKEN_CLUSTERS.c.clustering_id == clustering_id,
                     TOKEN_CLUSTERS.c.seed == seed,
                     TOKEN_CLUSTERS.c.cluster.in_([int(c) for c in clusters]))
              .subquery())
    rows = conn.execute(
        select(ranked.c.cluster, ranked.c.token_id, TOKENS.c.text, TOKENS.c.raw)
        .join(TOKENS, and_(TOKENS.c.model_id == model_id,
                           TOKENS.c.token_id == ranked.c.token_id))
        .where(ranked.c.rank <= per_cluster)
        .order_by(ranked.c.cluster, ranked.c.rank))
    out: dict[int, list[tuple[int, str, bytes]]] = {}
    for c, t, text, raw in rows:
        out.setdefault(int(c), []).append((int(t), text, bytes(raw)))
    return out


def cluster_tokens_with_verdict(conn: Connection, model_id: int, clustering_id: int,
                                seed: int, cluster: int, verdict_run: int,
                                verdicts: Sequence[str]) -> list[tuple[int, str, bytes, str]]:
    """``(token id, text, raw, verdict)`` of the cluster's tokens whose final verdict (in
    ``verdict_run``) is one of ``verdicts``, nearest the centroid first."""
    rows = conn.execute(
        select(TOKEN_CLUSTERS.c.token_id, TOKENS.c.text, TOKENS.c.raw, FINDINGS.c.verdict)
        .select_from(TOKEN_CLUSTERS
                     .join(FINDINGS, and_(FINDINGS.c.run_id == verdict_run,
                                          FINDINGS.c.token_id == TOKEN_CLUSTERS.c.token_id))
                     .join(TOKENS, and_(TOKENS.c.model_id == model_id,
                                        TOKENS.c.token_id == TOKEN_CLUSTERS.c.token_id)))
        .where(TOKEN_CLUSTERS.c.clustering_id == clustering_id,
               TOKEN_CLUSTERS.c.seed == seed, TOKEN_CLUSTERS.c.cluster == cluster,
               FINDINGS.c.verdict.in_(list(verdicts)))
        .order_by(TOKEN_CLUSTERS.c.distance, TOKEN_CLUSTERS.c.token_id))
    return [(int(t), x, bytes(r), v) for t, x, r, v in rows]


@dataclass
class CentroidNeighbour:
    """A token near the centroid of the whole matrix (Rumbelow & Watkins' table)."""

    token_id: int
    text: str
    raw: bytes
    distance: float
    cluster: int | None  # its cluster under the seed asked for
    verdict: str | None  # its final verdict (None: no verdict run, or no finding)


def closest_to_centroid(conn: Connection, model_id: int, clustering_id: int, seed: int,
                        n: int, verdict_run: int | None) -> list[CentroidNeighbour]:
    """The ``n`` tokens closest to the centroid of the matrix the clustering clustered,
    closest first, with their cluster under ``seed`` and their final verdict."""
    verdict = FINDINGS.c.verdict if verdict_run is not None else None
    cols = [CENTROID_DISTANCES.c.token_id, TOKENS.c.text, TOKENS.c.raw,
            CENTROID_DISTANCES.c.distance, TOKEN_CLUSTERS.c.cluster]
    src = (CENTROID_DISTANCES
           .join(TOKENS, and_(TOKENS.c.model_id == model_id,
                              TOKENS.c.token_id == CENTROID_DISTANCES.c.token_id))
           .outerjoin(TOKEN_CLUSTERS, and_(
               TOKEN_CLUSTERS.c.clustering_id == CENTROID_DISTANCES.c.clustering_id,
               TOKEN_CLUSTERS.c.seed == seed,
               TOKEN_CLUSTERS.c.token_id == CENTROID_DISTANCES.c.token_id)))
    if verdict is not None:
        cols.append(verdict)
        src = src.outerjoin(FINDINGS, and_(FINDINGS.c.run_id == verdict_run,
                                           FINDINGS.c.token_id == CENTROID_DISTANCES.c.token_id))
    rows = conn.execute(select(*cols).select_from(src)
                        .where(CENTROID_DISTANCES.c.clustering_id == clustering_id)
                        .order_by(CENTROID_DISTANCES.c.distance, CENTROID_DISTANCES.c.token_id)
                        .limit(n))
    return [CentroidNeighbour(int(r[0]), r[1], bytes(r[2]), float(r[3]),
                              None if r[4] is None else int(r[4]),
                              r[5] if verdict is not None else None) for r in rows]


# --- elicitations: prompts optimised to make a model say a target (issue 13) -----------------

from harness.schema import Elicitation  # noqa: E402  (this section's own table)

ELICITATIONS = Elicitation.__table__


@dataclass
class StoredElicitation:
    """One row of ``elicitations``: one restart of one elicitation."""

    id: int
    model_id: int
    run_id: int | None
    session: str
    target_ids: list[int]
    target_text: str
    restart: int
    seed: int
    n_positions: int
    steps: int
    prompt_ids: list[int]
    prompt_text: str
    probability: float
    wall_s: float
    options: dict[str, Any]
    created_utc: datetime | None


def insert_elicitations(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    """Store elicitation restarts: dicts with ``model_id``, ``run_id`` (None for ``harness
    elicit``), ``session``, ``target_ids`` and ``prompt_ids`` (lists), ``target_text``,
    ``prompt_text``, ``restart``, ``seed``, ``n_positions``, ``steps``, ``probability``,
    ``wall_s`` and ``options`` (a dict). A run's rows for a target it stored before (a
    batch worked again after its claim was lost) replace those."""
    if not rows:
        return
    redo = {(r["run_id"], json.dumps([int(t) for t in r["target_ids"]]))
            for r in rows if r.get("run_id") is not None}
    for run_id, target in redo:
        conn.execute(delete(ELICITATIONS).where(ELICITATIONS.c.run_id == run_id,
                                                ELICITATIONS.c.target_ids == target))
    created = now()
    _executemany(conn, insert(ELICITATIONS), [{
        "model_id": int(r["model_id"]), "run_id": r.get("run_id"), "session": r["session"],
        "target_ids": json.dumps([int(t) for t in r["target_ids"]]),
        "target_text": _text_for(conn, r["target_text"]), "restart": int(r["restart"]),
        "seed": int(r["seed"]), "n_positions": int(r["n_positions"]),
        "steps": int(r["steps"]), "prompt_ids": json.dumps([int(t) for t in r["prompt_ids"]]),
        "prompt_text": _text_for(conn, r["prompt_text"]),
        "probability": float(r["probability"]), "wall_s": float(r["wall_s"]),
        "options_json": json.dumps(r.get("options") or {}, default=str),
        "created_utc": created} for r in rows])


def _stored_elicitation(row: Any) -> StoredElicitation:
    try:
        options = json.loads(row.options_json or "{}")
    except json.JSONDecodeError:
        options = {}
    return StoredElicitation(
        int(row.id), int(row.model_id), None if row.run_id is None else int(row.run_id),
        row.session, json.loads(row.target_ids), row.target_text, int(row.restart),
        int(row.seed), int(row.n_positions), int(row.steps), json.loads(row.prompt_ids),
        row.prompt_text, float(row.probability), float(row.wall_s), options, row.created_utc)


def session_elicitations(conn: Connection, session: str) -> list[StoredElicitation]:
    """The restarts of one elicitation session, by restart."""
    return [_stored_elicitation(r) for r in conn.execute(
        select(ELICITATIONS).where(ELICITATIONS.c.session == session)
        .order_by(ELICITATIONS.c.restart, ELICITATIONS.c.id))]


def best_token_elicitations(conn: Connection, model_id: int, token_ids: Sequence[int]
                            ) -> dict[int, StoredElicitation]:
    """Per token, the most probable stored elicitation of that token alone on the model
    (by ``harness elicit`` or the ``elicit`` detector; the latest of equals)."""
    wanted = {json.dumps([int(t)]): int(t) for t in token_ids}
    found: dict[int, StoredElicitation] = {}
    keys = list(wanted)
    for i in range(0, len(keys), 500):
        for row in conn.execute(
                select(ELICITATIONS).where(ELICITATIONS.c.model_id == model_id,
                                           ELICITATIONS.c.target_ids.in_(keys[i:i + 500]))
                .order_by(ELICITATIONS.c.id)):
            t = wanted[row.target_ids]
            if t not in found or row.probability >= found[t].probability:
                found[t] = _stored_elicitation(row)
    return found
