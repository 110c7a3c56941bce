"""Several processes on one scan: blocks claimed once, a dead process's block taken over,
the findings those of a one-process scan. Each scan is a real `harness` process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from harness import store
from harness.db import open_db
from harness.shared_runs import cut_blocks, is_dead, worker_id
from tests import dbs
from tests.test_reliability import findings

ROOT = Path(__file__).resolve().parent.parent
# the harness with the probe-logging backend of tests/plugins/probe_log.py registered
HARNESS = [sys.executable, "-c", "from harness import plugins; "
           "from tests.plugins import probe_log; "
           "plugins.register_plugin(probe_log, name='probe-log-plugin'); "
           "from harness.cli import main; main()"]


def harness(*args: str, home: Path, log: Path, delay: float) -> subprocess.Popen:
    env = {**os.environ, "HARNESS_HOME": str(home), "PROBE_LOG": str(log),
           "PROBE_DELAY": str(delay)}
    return subprocess.Popen([*HARNESS, *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def probes(log: Path) -> dict[tuple[int, str], set[int]]:
    """Per (token, prompt), the pids of the processes that probed it."""
    seen: dict[tuple[int, str], set[int]] = defaultdict(set)
    for line in log.read_text().splitlines():
        pid, token, prompt = line.split()
        seen[int(token), prompt].add(int(pid))
    return seen


def second_database(db_url: str, request) -> str:
    if db_url.startswith("sqlite"):
        return db_url.replace("results.db", "one-process.db")
    server = request.getfixturevalue("pg_server")
    name, url = server.new_database()
    request.addfinalizer(lambda: server.drop_database(name))
    return url


def test_three_processes_share_a_scan_and_one_dies(tiny_model_dir, tmp_path, db_url, request):
    """The default scan of the tiny model in three processes at once, repeat-probe in blocks
    of 8 tokens; one process is killed with SIGKILL while it holds a block. The other two
    finish the scan; the findings equal a one-process scan's exactly; no (token, prompt) was
    probed by two processes except in the dead process's unfinished block; one final
    verdict."""
    args = ["scan", str(tiny_model_dir), "--backend", "probe-log", "-o",
            "repeat-probe.batch=8"]
    log = tmp_path / "probes.log"
    procs = [harness(*args, "--db", db_url, home=tmp_path / f"h{i}", log=log, delay=0.2)
             for i in range(3)]
    request.addfinalizer(lambda: [p.kill() for p in procs if p.poll() is None])
    victim = procs[0]
    claimed_by_victim = f"{socket.gethostname()}:{victim.pid}:%"
    deadline = time.monotonic() + 300
    killed_in: list[tuple] = []
    while time.monotonic() < deadline and victim.poll() is None and not killed_in:
        try:
            done = dbs.query(db_url, "SELECT count(*) FROM run_blocks b JOIN runs r ON "
                             "r.id = b.run_id WHERE r.detector = 'repeat-probe' AND "
                             "b.status = 'done'")[0][0]
            held = dbs.query(db_url, "SELECT b.run_id, b.block FROM run_blocks b JOIN runs r "
                             "ON r.id = b.run_id WHERE r.detector = 'repeat-probe' AND "
                             "b.status = 'claimed' AND b.worker LIKE ?", claimed_by_victim)
        except Exception:  # tables not created yet
            done, held = 0, []
        if done >= 3 and held and (victim.poll() is None):
            os.kill(victim.pid, signal.SIGKILL)
            killed_in = held
        time.sleep(0.05)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL, victim.stderr.read()
    outs = [p.communicate(timeout=600) for p in procs[1:]]
    for p, (_, err) in zip(procs[1:], outs, strict=True):
        assert p.returncode == 0, err
    workers = dbs.query(db_url, "SELECT DISTINCT done_by FROM run_blocks b JOIN runs r ON "
                        "r.id = b.run_id WHERE r.detector = 'repeat-probe'")
    assert len(workers) >= 2  # the work was shared

    # every run done, each once; the dead process's block claimed twice, no other block
    runs = dbs.query(db_url, "SELECT detector, status FROM runs ORDER BY id")
    assert sorted(d for d, _ in runs) == ["embedding-centroid", "repeat-probe",
                                          "repeat-screen", "unembedding-cosine", "verdict"]
    assert {s for _, s in runs} == {"done"}
    blocks = dbs.query(db_url, "SELECT b.run_id, b.block, b.claims, b.first_token, "
                       "b.last_token, b.status FROM run_blocks b JOIN runs r ON "
                       "r.id = b.run_id WHERE r.detector = 'repeat-probe' ORDER BY b.block")
    assert len(blocks) > 6 and {b[5] for b in blocks} == {"done"}
    twice = [(r, b) for r, b, claims, *_ in blocks if claims > 1]
    assert twice == killed_in
    assert all(claims == 1 for r, b, claims, *_ in blocks if (r, b) not in killed_in)

    # no (token, prompt) probed by two processes, except in the dead process's block
    (run_id, block) = killed_in[0]
    first, last = next((f, t) for r, b, _, f, t, _ in blocks if (r, b) == (run_id, block))
    for (token, _), pids in probes(log).items():
        if len(pids) > 1:
            assert first <= token <= last and victim.pid in pids, (token, pids)

    # the findings of one process alone
    alone = second_database(db_url, request)
    one = harness(*args, "--db", alone, home=tmp_path / "h-one", log=tmp_path / "one.log",
                  delay=0)
    _, err = one.communicate(timeout=600)
    assert one.returncode == 0, err
    assert findings(db_url) == findings(alone)
    assert len(findings(db_url)["repeat-probe"]) >= 24


def run_in_blocks(engine, n_tokens: int, size: int) -> int:
    """A running run of a stored model over ``n_tokens`` tokens, cut into blocks of ``size``."""
    with engine.begin() as conn:
        model = store.insert_model(conn, ref="m", alias=None, backend="b", fingerprint="f",
                                   tokenizer_hash="h", vocab_size=n_tokens, meta={})
        run_id = store.insert_run(conn, model_id=model, detector="d", detector_version="1",
                                  harness_version="0", suspicious_when="low", options={},
                                  options_key="k", status="running")
        store.insert_blocks(conn, run_id, cut_blocks(np.arange(n_tokens), size))
    return run_id


def test_a_lost_lease_is_taken_over_and_the_late_worker_stores_nothing(db_url):
    """A claim whose lease ran out goes to the next process; the process that lost it can
    no longer store into the block or close it."""
    engine = open_db(db_url)
    run_id = run_in_blocks(engine, 10, 4)
    with engine.begin() as conn:  # the middle block first (see claim_order)
        elsewhere = store.claim_block(conn, run_id, "elsewhere:1:x", lease_s=0.5)
    assert (elsewhere.first_token, elsewhere.last_token, elsewhere.n_tokens) == (4, 7, 4)
    with engine.begin() as conn:  # held: the next open block instead
        assert store.claim_block(conn, run_id, worker_id(), lease_s=30).block == 0
    time.sleep(0.7)
    with engine.begin() as conn:
        taken = store.claim_block(conn, run_id, worker_id(), lease_s=30)
        assert taken.block == 1
        assert not store.holds_claim(conn, elsewhere, "elsewhere:1:x")
        assert store.holds_claim(conn, taken, worker_id())
    assert dbs.query(db_url, "SELECT block, claims, status FROM run_blocks ORDER BY block") == \
        [(0, 1, "claimed"), (1, 2, "claimed"), (2, 0, "open")]
    with engine.begin() as conn:
        store.release_claims(conn, worker_id())
    assert dbs.query(db_url, "SELECT status FROM run_blocks ORDER BY block") == \
        [("open",), ("open",), ("open",)]
    engine.dispose()


def test_blocks_are_claimed_spread_over_the_run(db_url):
    """Claims start in the middle of the run and jump about 0.618 of it each time, so the
    first blocks (the scan's estimate) sample every part of the vocabulary; the database's
    order is ``claim_order``'s, and every block is claimed once."""
    assert store.claim_order(10) == [5, 2, 7, 4, 9, 1, 6, 3, 8, 0]
    for n in (1, 2, 3, 29, 128, 1024):
        order = store.claim_order(n)
        assert sorted(order) == list(range(n)) and order[0] == n // 2
        for k in range(2, min(n, 64) + 1):  # after k claims, no unclaimed stretch > 2.5 n/k
            gaps = np.diff(np.sort([-1, n, *order[:k]]))
            assert gaps.max() <= 2.5 * n / k, (n, k)
    engine = open_db(db_url)
    run_id = run_in_blocks(engine, 50, 4)
    claimed = []
    while True:
        with engine.begin() as conn:
            block = store.claim_block(conn, run_id, worker_id(), lease_s=30)
        if block is None:
            break
        claimed.append(block.block)
    assert claimed == store.claim_order(13)
    engine.dispose()


def test_blocks_and_dead_workers():
    assert cut_blocks(np.array([3, 5, 9, 10, 11]), 2) == [(3, 5, 2), (9, 10, 2), (11, 11, 1)]
    assert cut_blocks(np.array([3, 5, 9]), None) == [(3, 9, 3)]
    assert cut_blocks(np.array([], dtype=int), 4) == []
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    host = socket.gethostname()
    assert is_dead(f"{host}:{dead}:abc")
    assert not is_dead(f"{host}:{os.getpid()}:abc")  # alive
    assert not is_dead(worker_id())
    assert not is_dead(f"another-{host}:{dead}:abc")  # another machine: its lease decides
