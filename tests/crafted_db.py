"""A results database written through ``harness.store`` as a scan would leave it, with the
final verdicts a test chooses: for commands that read stored scans (check, export, show)
without running one."""

from __future__ import annotations

import json

from sqlalchemy.engine import Engine

from harness import store
from harness.verdicts import FINAL, GLITCH, OK, SUSPECT
from harness.vocab import Vocab


def store_scan(engine: Engine, ref: str, vocab: Vocab,
               verdicts: dict[int, tuple[str, float]], alias: str | None = None,
               static: dict[int, str] | None = None) -> tuple[int, int]:
    """Store model ``ref`` (``BACKEND:TARGET``) with ``vocab``, a finished ``repeat-probe``
    run over the tokens of ``verdicts`` (id to verdict and repeat probability), optionally a
    static ``embedding-centroid`` run over every token (``static``: id to verdict, others
    ok), and the final verdict of every token; (model id, verdict run id)."""
    backend, _, _ = ref.partition(":")
    with engine.begin() as conn:
        model_id = store.insert_model(conn, ref=ref, alias=alias, backend=backend,
                                      fingerprint=f"crafted:{ref}",
                                      tokenizer_hash=vocab.tokenizer_hash(),
                                      vocab_size=len(vocab), meta={})
        cats = ["special" if s else "normal" for s in vocab.special.tolist()]
        store.insert_tokens(conn, model_id, vocab.raw, vocab.text, cats, [None] * len(vocab))
        base = {"model_id": model_id, "detector_version": "1", "harness_version": "test",
                "suspicious_when": "low", "options_key": "k", "status": "done",
                "finished": True, "wall_s": 0.0}
        flagged_by: dict[int, list[str]] = {}
        if static is not None:
            run = store.insert_run(conn, detector="embedding-centroid", options={}, **base)
            store.insert_findings(conn, run, [
                (t, float(t), static.get(t, OK), "{}") for t in range(len(vocab))])
            for t, v in static.items():
                if v != OK:
                    flagged_by.setdefault(t, []).append("embedding-centroid")
        probe = store.insert_run(conn, detector="repeat-probe", options={}, **base)
        store.insert_findings(conn, probe, [
            (t, p, v, json.dumps({"p": {"repeats": p}, "completion": {"repeats": "x"}}))
            for t, (v, p) in sorted(verdicts.items())])
        for t, (v, _) in verdicts.items():
            if v == GLITCH:
                flagged_by.setdefault(t, []).append("repeat-probe")
        final = store.insert_run(conn, detector=FINAL, options={}, **base)
        rows = []
        for t in range(len(vocab)):
            if t in verdicts:
                v, p = verdicts[t]
            else:
                v, p = (SUSPECT if static and static.get(t, OK) != OK else OK), None
            rows.append((t, p, v, json.dumps({"flagged_by": sorted(flagged_by.get(t, []))})))
        store.insert_findings(conn, final, rows)
    return model_id, final
