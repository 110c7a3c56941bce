"""Prompt elicitation (``harness elicit``, the ``elicit`` detector): on the tiny model for the
plumbing (storage, resume, verdict rule, bad input), on SmolLM2 for what it finds."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from harness.db import open_db
from harness.runner import scan
from tests.dbs import query as rows

TOKENS = [5, 6, 7, 8, 9, 10, 290, 291]


@pytest.fixture(autouse=True, scope="module")
def elicit_plugin():
    """The ``elicit`` detector, where the installed entry points predate it (an editable
    install made before ``detectors.elicit`` existed)."""
    from harness import plugins

    if "elicit" in plugins.registry().detectors:
        yield
        return
    import detectors.elicit as module

    plugins.register_plugin(module, name="elicit-test")
    yield
    plugins.unregister_plugin(module)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from backends.hf import HFBackend

    return HFBackend(str(tiny_model_dir))


# --- the optimiser's parts ------------------------------------------------------------------


def test_projection_and_descent_search_the_allowed_tokens_in_chunks(monkeypatch):
    import torch

    import harness.elicitation as el

    monkeypatch.setattr(el, "SIM_CELLS", 64)  # many vocabulary chunks
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(3000, 16, generator=gen)
    allowed = np.arange(0, 3000, 3)
    cand = el._Candidates(torch, emb, allowed)
    query = torch.randn(2, 4, 16, generator=gen)
    banned = [[], [int(allowed[5])]]
    got = cand.nearest(query, banned).numpy()
    rows_ = emb[allowed] / emb[allowed].norm(dim=1, keepdim=True)
    for b in range(2):
        sims = (query[b] / query[b].norm(dim=1, keepdim=True)) @ rows_.T
        if b == 1:
            sims[:, 5] = -np.inf
        assert got[b].tolist() == allowed[sims.argmax(dim=1).numpy()].tolist()
    down = cand.descents(query, 3, banned).numpy()
    for b in range(2):
        gains = -(query[b] @ emb[allowed].T)
        if b == 1:
            gains[:, 5] = -np.inf
        want = allowed[gains.topk(3, dim=1).indices.numpy()]
        assert (down[b] == want).all()


def test_rows_do_not_depend_on_their_batch(tiny):
    """A row's start is drawn from its seed alone and its steps are its own."""
    from harness.elicitation import ElicitOptions, ElicitRow, elicit, prompt_candidates
    from harness.vocab import analyze

    cand = prompt_candidates(analyze(tiny.vocab(), tiny.encode_batch))
    opts = ElicitOptions(positions=3, steps=4, swaps=4, stop_at=1.0)
    alone = elicit(tiny, [ElicitRow([40], seed=3)], cand, opts)
    batch = elicit(tiny, [ElicitRow([41], seed=1), ElicitRow([40], seed=3)], cand, opts)
    assert alone[0].prompt_ids == batch[1].prompt_ids
    assert alone[0].probability == pytest.approx(batch[1].probability, rel=1e-4)
    assert 40 not in alone[0].prompt_ids and 41 not in batch[0].prompt_ids
    assert set(alone[0].prompt_ids) <= set(cand.tolist())


@pytest.mark.parametrize("target", [[40], [40, 41]])
@pytest.mark.parametrize("cached", [True, False])
def test_swaps_read_from_the_cached_prefix_as_the_whole_prompt_would(tiny, target, cached,
                                                                    monkeypatch):
    """Each one-token change read after the unchanged prompt's keys and values, as its own
    forward pass left them, gives the log-probability of reading the changed prompt whole
    (the hf cache, and the default of ``Differentiable`` that reads the prefix again)."""
    import torch

    import harness.elicitation as el
    from harness.backend import Differentiable
    from harness.elicitation import _Batch

    monkeypatch.setattr(el, "PREFIX_MIN_SEQUENCES", 1)  # these few changes read cached too
    model = tiny.differentiable()
    if not cached:
        model.hidden_and_state = lambda embeds: Differentiable.hidden_and_state(model, embeds)
        model.hidden_after = lambda *a: Differentiable.hidden_after(model, *a)
    for bos in ([], [1]):
        n_pos, n_swaps = 4, 6
        batch = _Batch(torch, model, bos, torch.tensor([target, target]), n_pos)
        gen = torch.Generator().manual_seed(len(bos))
        ids = torch.randint(2, 200, (2, n_pos), generator=gen)
        pos = torch.arange(n_swaps) % n_pos
        tried = ids[:, None, :].repeat(1, n_swaps, 1)
        tried[:, torch.arange(n_swaps), pos] = torch.randint(2, 200, (2, n_swaps), generator=gen)
        rows_ = torch.tensor([1, 0])
        with torch.no_grad():
            _, state = batch.logp_and_state(model.embeddings[ids], rows_)
        got = batch.logp_swaps(ids, tried, pos, rows_, state)
        want = batch.logp_ids(tried.reshape(-1, n_pos), rows_.repeat_interleave(n_swaps))
        assert got.flatten().tolist() == pytest.approx(want.tolist(), abs=1e-4)


# --- harness elicit ---------------------------------------------------------------------------


def test_elicit_stores_every_restart_and_measures_after_projection(cli, tiny_model_dir,
                                                                   db_url, tiny):
    from harness.backend import ScoreRequest

    code, out, err = cli("elicit", str(tiny_model_dir), "the", "--steps", "4",
                         "--positions", "3", "--restarts", "3", "--seed", "7", "--json")
    assert code == 0, err
    got = json.loads(out)
    assert got["target_ids"] == tiny.encode("the") and len(got["target_ids"]) == 2
    assert [r["seed"] for r in got["restarts"]] == [7, 8, 9]
    assert sum(f["count"] for f in got["token_frequencies"]) == 9
    stored = rows(db_url, "SELECT restart, seed, n_positions, steps, prompt_ids, prompt_text, "
                          "probability, target_text, target_ids, run_id FROM elicitations "
                          "WHERE session = ? ORDER BY restart", got["session"])
    assert len(stored) == 3
    for r, s in zip(got["restarts"], stored, strict=True):
        assert s[:4] == (r["restart"], r["seed"], 3, r["steps"])
        ids = json.loads(s[4])
        assert ids == r["prompt_ids"] and len(ids) == 3 and s[5] == tiny.decode(ids)
        assert not set(ids) & set(got["target_ids"])  # the target is not in its prompt
        assert s[7:] == ("the", json.dumps(got["target_ids"]), None)
        # the stored probability is a plain forward pass of the projected prompt
        t = got["target_ids"]
        (res,) = tiny.score([ScoreRequest([*ids, *t], [3, 4], t)])
        assert s[6] == pytest.approx(float(np.exp(sum(res.logprobs))), rel=1e-4)


def test_elicit_prints_the_prompts_and_token_frequencies(cli, tiny_model_dir):
    code, out, err = cli("elicit", str(tiny_model_dir), "the", "--steps", "2",
                         "--positions", "2", "--restarts", "2")
    assert code == 0, err
    flat = " ".join(out.split())
    assert "Prompts that make" in flat and "kept choosing" in flat
    assert "SELECT * FROM elicitations WHERE session" in flat


@pytest.mark.parametrize("args, message", [
    (("",), "the target is empty"),
    (("\ud800",), "cannot encode the target"),
    (("99999", "--ids"), "outside 0..303"),
    (("a,b", "--ids"), "--ids takes comma-separated token ids"),
    (("the", "--positions", "0"), "at least one prompt position"),
    (("the", "--restarts", "0"), "--restarts must be at least 1"),
    (("the", "--positions", "600"), "more than the model's context (512)"),
])
def test_bad_targets_and_options_are_one_line(cli, tiny_model_dir, args, message):
    code, out, err = cli("elicit", str(tiny_model_dir), *args)
    assert code == 2, (out, err)
    assert message in err
    assert "Traceback" not in err and err.strip().count("\n") == 0, err


def test_a_target_the_tokenizer_cannot_give_back_is_one_line(tiny):
    from harness.elicitation import parse_target

    class Lossy:  # a tokenizer that normalises what it encodes, as some do
        def encode(self, text):
            return tiny.encode(text.lower())

        def decode(self, ids):
            return tiny.decode(ids)

    assert parse_target(Lossy(), 304, "the") == tiny.encode("the")
    from harness.errors import HarnessError

    with pytest.raises(HarnessError, match="cannot produce the target 'The'"):
        parse_target(Lossy(), 304, "The")


def test_backend_without_gradients_is_one_line(cli, fake_plugin):
    code, out, err = cli("elicit", "fake-model", "a")
    assert code == 2
    assert "backend 'fake' has no gradients; elicit needs a white-box backend such as hf" \
        in err
    assert err.strip().count("\n") == 0, err


def test_the_detector_is_skipped_on_a_backend_without_gradients(cli, fake_plugin):
    code, out, err = cli("scan", "fake-model", "-d", "elicit", "--tokens", "1,2")
    assert "elicit: skipped: backend 'fake' lacks gradients, score" in out.replace("\n", " ")


# --- the elicit detector ----------------------------------------------------------------------


def test_detector_stores_findings_and_restarts_and_resumes(tiny_model_dir, db_url,
                                                          monkeypatch):
    """Killed after its first committed batch, the run resumes with the rest; every restart
    of every token is a row of ``elicitations`` with the run's id, each stored once."""
    import detectors.elicit as mod

    options = {"elicit": {"batch": 3, "steps": 3, "positions": 3, "swaps": 3,
                          "restarts": 2}}
    real = mod.Elicit.run
    seen: list[list[int]] = []

    def dying(self, ctx, token_ids):
        for batch in real(self, ctx, token_ids):
            seen.append([f.token_id for f in batch])
            if len(seen) == 2 and dying.kill:
                raise KeyboardInterrupt
            yield batch

    dying.kill = True
    monkeypatch.setattr(mod.Elicit, "run", dying)
    engine = open_db(db_url)
    with pytest.raises(KeyboardInterrupt):
        scan(str(tiny_model_dir), engine, ["elicit"], tokens=TOKENS,
             detector_options=options)
    assert rows(db_url, "SELECT count(*) FROM findings") == [(3,)]
    assert rows(db_url, "SELECT count(*) FROM elicitations") == [(6,)]
    dying.kill = False
    first = set(seen[0])
    seen.clear()
    result = scan(str(tiny_model_dir), engine, ["elicit"], tokens=TOKENS,
                  detector_options=options)
    outcome = result.outcomes[0]
    assert outcome.status == "resumed"
    assert not first & {t for b in seen for t in b}
    run_id = outcome.run_id
    assert rows(db_url, "SELECT count(*), count(DISTINCT session) FROM elicitations "
                        "WHERE run_id = ?", run_id) == [(2 * len(TOKENS), len(TOKENS))]
    found = rows(db_url, "SELECT token_id, score, evidence_json FROM findings "
                         "WHERE run_id = ? ORDER BY token_id", run_id)
    assert [t for t, _, _ in found] == TOKENS
    for t, score, evidence in found:
        ev = json.loads(evidence)
        best = rows(db_url, "SELECT max(probability) FROM elicitations WHERE run_id = ? "
                            "AND target_ids = ?", run_id, json.dumps([t]))[0][0]
        assert score == pytest.approx(best) and ev["p"] == pytest.approx(best, rel=1e-3)
        assert len(ev["prompt_ids"]) == 3 and len(ev["restarts_p"]) == 2


@pytest.mark.parametrize("threshold, verdict, final", [("1e-12", "ok", "glitch"),
                                                       ("1.0", "glitch", "suspect")])
def test_final_verdict_rule_and_the_despite_flag(cli, tiny_model_dir, db_url, threshold,
                                                 verdict, final):
    """elicit is not a verifier: it never clears a repeat-probe glitch (the evidence says
    the token was elicited despite it), and its glitch makes a repeat-probe ok suspect."""
    tokens = ",".join(map(str, TOKENS[:4]))
    fix = "-o", "repeat-probe.threshold=1e-12" if verdict == "glitch" else \
        "repeat-probe.threshold=1.0"
    assert cli("scan", str(tiny_model_dir), "-d", "repeat-probe", "--tokens", tokens,
               *fix)[0] == 0
    select = "glitch" if verdict == "ok" else tokens  # the scan's glitch tokens, or ids
    code, out, err = cli("scan", str(tiny_model_dir), "-d", "elicit", "--tokens", select,
                         "-o", f"elicit.threshold={threshold}", "-o", "elicit.steps=2",
                         "-o", "elicit.positions=2")
    assert code == 0, err
    got = rows(db_url, "SELECT token_id, verdict, evidence_json FROM latest_findings "
                       "WHERE detector = 'elicit' ORDER BY token_id")
    assert [t for t, _, _ in got] == TOKENS[:4]
    for _, v, e in got:
        ev = json.loads(e)
        assert v == verdict
        assert ev["repeat-probe"] == ("glitch" if verdict == "ok" else "ok")
        assert ("elicited_despite" in ev) == (verdict == "ok")
    finals = rows(db_url, "SELECT token_id, verdict FROM final_verdicts WHERE token_id IN "
                          f"({tokens}) ORDER BY token_id")
    assert {v for _, v in finals} == {final}


def test_tokens_by_verdict_needs_a_finished_scan(cli, tiny_model_dir):
    code, out, err = cli("scan", str(tiny_model_dir), "-d", "elicit", "--tokens", "glitch")
    assert code == 2
    assert "has no final verdicts stored to take glitch tokens from" in err


# --- SmolLM2 ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2():
    from backends.hf import HFBackend
    from models.aliases import smollm2_gguf

    return HFBackend(smollm2_gguf())


@pytest.fixture(scope="module")
def smollm2_candidates(smollm2):
    from harness.elicitation import prompt_candidates
    from harness.vocab import analyze

    return prompt_candidates(analyze(smollm2.vocab(), smollm2.encode_batch))


@pytest.mark.real_model
def test_smollm2_an_optimised_prompt_makes_paris_probable(smollm2, smollm2_candidates):
    from harness.elicitation import ElicitOptions, ElicitRow, elicit

    paris = smollm2.encode(" Paris")
    assert len(paris) == 1
    found = elicit(smollm2, [ElicitRow(paris, seed=0)], smollm2_candidates,
                   ElicitOptions(positions=8, steps=40, swaps=16, stop_at=0.5))
    assert found[0].probability > 0.5, smollm2.decode(found[0].prompt_ids)
    assert paris[0] not in found[0].prompt_ids


@pytest.mark.real_model
def test_smollm2_a_collapsed_special_token_stays_unspeakable(smollm2, smollm2_candidates):
    """Row 7 (``<gh_stars>``) is one of the rows that never moved from their shared initial
    value: no prompt makes the model say it."""
    from harness.elicitation import ElicitOptions, ElicitRow, elicit

    emb = smollm2.input_embeddings()
    assert np.abs(emb[7] - emb[8]).max() < 5e-3  # collapsed onto one row (up to Q4 noise)
    found = elicit(smollm2, [ElicitRow([7], seed=s) for s in (0, 1)], smollm2_candidates,
                   ElicitOptions(positions=8, steps=20, swaps=16, stop_at=0.02))
    assert max(f.probability for f in found) < 0.01


@pytest.mark.real_model
def test_smollm2_session_is_read_back_by_sql(tmp_path):
    from harness.elicitation import ElicitOptions, run_session

    db = tmp_path / "results.db"
    s = run_session(open_db(f"sqlite:///{db}"), "smollm2", " Paris", restarts=2,
                    options=ElicitOptions(positions=4, steps=3, swaps=4))
    with sqlite3.connect(db) as conn:
        got = conn.execute(
            "SELECT m.alias, e.target_text, e.target_ids, e.restart, e.seed, e.steps, "
            "e.prompt_ids, e.probability, e.wall_s > 0 FROM elicitations e "
            "JOIN models m ON m.id = e.model_id WHERE e.session = ? ORDER BY e.restart",
            (s.session,)).fetchall()
    assert [g[:6] for g in got] == [("smollm2", " Paris", "[7042]", r, r, 3) for r in (0, 1)]
    assert [json.loads(g[6]) for g in got] == [f.prompt_ids for f in s.results]
    assert [g[7] for g in got] == [f.probability for f in s.results]
    assert all(g[8] for g in got)


@pytest.mark.real_model
def test_smollm2_llamacpp_backend_has_no_gradients(cli):
    pytest.importorskip("llama_cpp")
    from models.aliases import smollm2_gguf

    code, out, err = cli("elicit", f"llamacpp:{smollm2_gguf()}", " Paris")
    assert code == 2
    assert "backend 'llamacpp' has no gradients" in err and "Traceback" not in err


def test_report_shows_the_elicitations_of_the_glitch_tokens(cli, tiny_model_dir, db_url,
                                                            tmp_path):
    import html

    tokens = ",".join(map(str, TOKENS[:3]))
    assert cli("scan", str(tiny_model_dir), "-d", "repeat-probe", "--tokens", tokens,
               "-o", "repeat-probe.threshold=1.0")[0] == 0
    page = tmp_path / "r.html"
    assert cli("report", str(tiny_model_dir), "-o", str(page))[0] == 0
    assert "best optimised prompt" not in page.read_text()  # nothing elicited yet
    assert cli("scan", str(tiny_model_dir), "-d", "elicit", "--tokens", "glitch",
               "-o", "elicit.steps=2", "-o", "elicit.positions=2")[0] == 0
    assert cli("elicit", str(tiny_model_dir), "9", "--ids", "--steps", "2",
               "--positions", "2", "--restarts", "1")[0] == 0  # not a glitch token: not shown
    assert cli("report", str(tiny_model_dir), "-o", str(page))[0] == 0
    text = page.read_text()
    assert "best optimised prompt (elicitation)" in text
    assert "3 of them have an optimised prompt" in text
    best = rows(db_url, "SELECT target_ids, prompt_text, prompt_ids FROM elicitations "
                        "WHERE run_id IS NOT NULL ORDER BY id")
    assert len(best) == 3
    for _, prompt, ids in best:
        assert html.escape(repr(prompt), quote=True) in text
        assert "ids " + " ".join(map(str, json.loads(ids))) in text
