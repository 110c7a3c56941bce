"""Scans that survive being killed, and several scans writing one database at once; each
scan is a real `harness` process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import exc as sa_exc

from tests import dbs

HARNESS = [sys.executable, "-c", "from harness.cli import main; main()"]


def harness(*args: str, home: Path) -> subprocess.Popen:
    env = {**os.environ, "HARNESS_HOME": str(home)}
    return subprocess.Popen([*HARNESS, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def query(db: Path | str, sql: str, *params) -> list[tuple]:
    return dbs.query(db, sql, *params)


def findings(db: Path) -> dict[str, list[tuple]]:
    """Every finished run's findings, by detector (the verdict run's evidence names runs by
    id, which differ between databases, so it is compared without evidence)."""
    out = {}
    for run_id, det in query(db, "SELECT id, detector FROM runs WHERE status = 'done'"):
        cols = "token_id, verdict, score" + (", evidence_json" if det != "verdict" else "")
        out[det] = query(db, f"SELECT {cols} FROM findings WHERE run_id = ? ORDER BY token_id",
                         run_id)
    return out


@pytest.mark.real_model
def test_sigkill_mid_detector_resumes_to_the_same_findings(tmp_path):
    """SmolLM2, repeat-probe and repeated-sequence on 40 tokens: kill -9 once two batches
    of repeat-probe are committed, scan again, and compare with an uninterrupted scan."""
    tokens = ",".join(str(t) for t in [5, 7, 260, 36743, 43858, 45175]
                      + list(range(1000, 49_000, 1412)))
    args = ["scan", "smollm2", "--tokens", tokens, "-d", "repeat-probe,repeated-sequence",
            "-o", "repeat-probe.batch=8"]
    killed, clean = tmp_path / "killed.db", tmp_path / "clean.db"

    proc = harness(*args, "--db", str(killed), home=tmp_path / "h1")
    deadline = time.monotonic() + 240
    committed = 0
    while time.monotonic() < deadline and proc.poll() is None:
        if killed.exists():
            try:
                committed = query(killed, "SELECT count(*) FROM findings f JOIN runs r ON "
                                          "r.id = f.run_id WHERE r.detector = 'repeat-probe'"
                                  )[0][0]
            except sa_exc.OperationalError:  # tables not created yet
                committed = 0
        if committed >= 16:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.1)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    total = len(tokens.split(","))
    assert 16 <= committed < total
    assert query(killed, "SELECT status FROM runs WHERE detector = 'repeat-probe'") == \
        [("running",)]

    again = harness(*args, "--db", str(killed), home=tmp_path / "h1")
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err
    assert "repeat-probe:" in out
    fresh = harness(*args, "--db", str(clean), home=tmp_path / "h2")
    _, err = fresh.communicate(timeout=600)
    assert fresh.returncode == 0, err

    resumed, uninterrupted = findings(killed), findings(clean)
    assert set(resumed) == {"repeat-probe", "repeated-sequence", "verdict"}
    assert resumed == uninterrupted
    assert len(resumed["repeat-probe"]) == total
    assert query(killed, "SELECT count(*) FROM runs WHERE detector = 'repeat-probe'") == [(1,)]


def test_two_scans_write_one_database_at_once(tiny_model_dir, tmp_path, db_url):
    """Same model and detectors in two processes started together: both finish, the model is
    stored once, every run is complete."""
    db = db_url
    args = ["scan", str(tiny_model_dir), "--db", str(db), "--candidates", "10"]
    procs = [harness(*args, home=tmp_path / f"h{i}") for i in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    assert query(db, "SELECT count(*) FROM models") == [(1,)]
    runs = query(db, "SELECT id, detector, status FROM runs")
    assert {s for _, _, s in runs} == {"done"}
    n_tokens = query(db, "SELECT count(*) FROM tokens")[0][0]
    for run_id, det, _ in runs:
        (count,) = query(db, "SELECT count(*) FROM findings WHERE run_id = ?", run_id)[0]
        if det in ("embedding-centroid", "unembedding-cosine", "verdict"):
            assert count == n_tokens, det
        else:
            assert 10 <= count < n_tokens, det
