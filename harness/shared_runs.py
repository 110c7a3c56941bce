"""Several processes on one run: its tokens in blocks that each process claims in turn.

A run is cut into blocks when it is created. Every process that runs the same scan (on
other machines against one PostgreSQL database, or on one machine against one SQLite file)
finds the same run and works its blocks: it claims an open block for a lease, works it, and
stores the block's findings and marks it done in one transaction, so a block is either done
once or not at all. A process renews its leases while it works; a process that dies loses
its claim when the lease runs out (at once when it ran on this machine and its pid is gone),
and another process works the block again. When no block is left to claim, a process waits
for the blocks others hold, and the run is closed once, by whichever process sees the last
block done.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from functools import cache
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from harness import store
from harness.errors import HarnessError

LEASE_S = 60.0  # a claim lasts this long unless renewed; renewed every third of it
POLL_S = 0.25  # while others hold the last blocks, look this often


@cache
def worker_id() -> str:
    """This process's name in claims: ``host:pid:random``."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def cut_blocks(scope: np.ndarray, size: int | None) -> list[tuple[int, int, int]]:
    """``(first_token, last_token, n_tokens)`` of consecutive blocks of ``size`` tokens of the
    sorted ``scope`` (one block when ``size`` is None)."""
    if len(scope) == 0:
        return []
    size = len(scope) if size is None else max(1, int(size))
    return [(int(scope[i]), int(scope[min(i + size, len(scope)) - 1]),
             min(size, len(scope) - i)) for i in range(0, len(scope), size)]


def is_dead(worker: str) -> bool:
    """Whether ``worker`` is a process of this machine that no longer runs (a claim it holds
    can be taken over without waiting for its lease)."""
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or worker == worker_id():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


class RunFailed(HarnessError):
    """Another process sharing the run failed it."""


class _Heartbeat:
    """Renews this process's claims every third of the lease from a thread of its own, so a
    block that takes longer than a lease is not taken over while it is being worked."""

    def __init__(self, engine: Engine, lease_s: float) -> None:
        self.engine, self.lease_s = engine, lease_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="claim-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self.stop.wait(self.lease_s / 3):
            try:
                with self.engine.begin() as conn:
                    store.renew_claims(conn, worker_id(), self.lease_s)
            except Exception:  # a missed beat: the next one, or the lease, covers it
                pass

    def __enter__(self) -> _Heartbeat:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def work_blocks(engine: Engine, run_id: int, scope: np.ndarray,
                work: Callable[[np.ndarray], Iterable[Any]],
                store_batch: Callable[[Any, Any], int],
                progress: Callable[[int, int], None] = lambda stored, mine: None,
                lease_s: float = LEASE_S) -> int:
    """Work the run's blocks until every one is done; return how many tokens this process
    examined.

    ``work(token_ids)`` yields the findings of a block's tokens that have none yet, in
    batches; ``store_batch(conn, batch)`` stores one and returns its size. Each batch is
    stored as it comes, in a transaction that first checks that this process still holds
    the block: a block whose claim was lost meanwhile (the lease ran out and another process
    took it over) is dropped, and its batches are not stored twice. ``progress(stored,
    mine)`` gets the number of the run's findings, whoever stored them, and how many this
    process stored. Interrupted, the process gives its claims back.
    """
    me = worker_id()
    examined = 0
    try:
        with _Heartbeat(engine, lease_s):
            while True:
                with engine.begin() as conn:
                    status, reason = store.run_status(conn, run_id)
                    if status == "failed":
                        raise RunFailed(reason or "another process failed the run")
                    dead = [b for b, w in store.claimed_blocks(conn, run_id) if is_dead(w)]
                    block = store.claim_block(conn, run_id, me, lease_s, dead)
                    counts = store.count_blocks(conn, run_id)
                    progress(store.count_findings(conn, run_id), examined)
                if block is None:
                    if counts["open"] == counts["claimed"] == 0:
                        return examined
                    time.sleep(min(POLL_S, lease_s / 4))
                    continue
                examined += _work_block(engine, block, scope, work, store_batch,
                                        lambda total, n, b=examined: progress(total, b + n))
    except BaseException:
        try:
            with engine.begin() as conn:
                store.release_claims(conn, me)
        except Exception:  # the database is gone too: the leases run out instead
            pass
        raise


def _work_block(engine: Engine, block: store.Block, scope: np.ndarray,
                work: Callable[[np.ndarray], Iterable[Any]],
                store_batch: Callable[[Any, Any], int],
                stored: Callable[[int, int], None]) -> int:
    me = worker_id()
    ids = scope[(scope >= block.first_token) & (scope <= block.last_token)]
    with engine.connect() as conn:
        todo = np.setdiff1d(ids, store.examined_in_range(conn, block.run_id, block.first_token,
                                                         block.last_token))
    started = time.perf_counter()
    n = 0
    for batch in work(todo):
        with engine.begin() as conn:
            if not store.holds_claim(conn, block, me):
                return n
            n += store_batch(conn, batch)
            total = store.count_findings(conn, block.run_id)
        stored(total, n)
    with engine.begin() as conn:
        if store.holds_claim(conn, block, me):
            store.complete_block(conn, block, me, time.perf_counter() - started)
    return n
