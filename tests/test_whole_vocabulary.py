"""The whole-vocabulary pipeline on the real models: the screen, the scouts, the shared-prefix
attention, float32 projection of a bf16 model, and the final verdict over every run."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from harness.backend import ProbeRequest
from harness.db import open_db
from harness.detector import ScanContext
from harness.probe_sets import plan_probe_set
from harness.runner import scan

pytestmark = pytest.mark.real_model

# SmolLM2 tokens whose exact verify-3 verdict is known (the reference of benchmarks/fidelity.py)
GLITCH = [0, 5, 190, 3420, 36743, 43858]  # <|endoftext|>, <file_sep>, \x00, ..., MetaInfoClass
SOLELY = 9127  # a glitch token (0.0014 at most in verify-3) the word-pair list gives 0.11
APEAKE = 27685  # a glitch token (0.0070 at most) the word-pair list gives 0.036, its likeliest
ORDINARY = list(range(1000, 1040))  # common merges
NEAR = {3420: "glitch", 3944: "glitch", 2065: "ok", 752: "ok",  # max p 0.0029 .. 0.0173
        32608: "glitch"}  # 0.00927 in float32; 0.01001 in bf16 on an H200


def rows(db, sql, *params):
    with sqlite3.connect(db) as conn:
        return conn.execute(sql, params).fetchall()


@pytest.fixture(scope="module")
def smollm2():
    from backends.hf import HFBackend
    from models.aliases import smollm2_gguf

    return HFBackend(smollm2_gguf())


def run(detector, backend, ids):
    ctx = ScanContext(backend=backend, vocab=backend.vocab(), categories=np.array([]))
    detector.prepare(ctx)
    return {f.token_id: f for batch in detector.run(ctx, np.asarray(ids)) for f in batch}


def test_screen_settles_ordinary_tokens_and_passes_glitch_tokens_on(smollm2):
    from detectors.repeat_screen import RepeatScreen

    found = run(RepeatScreen(), smollm2, GLITCH + ORDINARY)
    assert all(found[t].verdict == "suspect" for t in GLITCH), {t: found[t] for t in GLITCH}
    settled = [t for t in ORDINARY if found[t].verdict == "ok"]
    assert len(settled) >= 0.9 * len(ORDINARY)
    assert all(found[t].score >= 0.02 for t in settled)
    assert all(found[t].evidence["repeated_in"] in ("pair-list", "repeats-6", "input-output-2")
               for t in settled)


def test_the_screen_passes_on_a_token_the_model_answers_with_another_word(smollm2):
    """` solely` reads above the threshold in the word-pair list, but the model's likeliest
    answer there is `only`: the screen does not settle it."""
    from detectors.repeat_screen import RepeatScreen

    found = run(RepeatScreen(), smollm2, [SOLELY])[SOLELY]
    assert found.verdict == "suspect"
    assert found.evidence["p"]["pair-list"] >= 0.02
    assert found.evidence["said"]["pair-list"] == "only"
    assert run(RepeatScreen(greedy_spells=False), smollm2, [SOLELY])[SOLELY].verdict == "ok"


def test_the_first_prompt_settles_only_well_above_the_threshold(smollm2):
    """`apeake` is the model's likeliest answer in the word-pair list, at 0.036: above the
    screen's threshold, below the first prompt's. It goes on, and the later prompts leave it
    for verification, which finds it a glitch token."""
    from detectors.repeat_probe import RepeatProbe
    from detectors.repeat_screen import RepeatScreen

    found = run(RepeatScreen(), smollm2, [APEAKE] + ORDINARY)
    assert 0.02 <= found[APEAKE].evidence["p"]["pair-list"] < 0.05
    assert found[APEAKE].verdict == "suspect", found[APEAKE]
    assert all(found[t].evidence["p"]["pair-list"] >= 0.05 for t in ORDINARY
               if found[t].evidence.get("repeated_in") == "pair-list")
    loose = run(RepeatScreen(first_threshold=0.02), smollm2, [APEAKE])[APEAKE]
    assert loose.verdict == "ok" and loose.evidence["repeated_in"] == "pair-list"
    assert run(RepeatProbe(), smollm2, [APEAKE])[APEAKE].verdict == "glitch"


@pytest.mark.parametrize("probes", ["screen", "verify-3"])
def test_shared_prefix_attention_gives_what_the_plain_cache_gives(smollm2, probes):
    from probes import SCREEN, VERIFY_3

    assert smollm2._shared_prefix
    plans = plan_probe_set({"screen": SCREEN, "verify-3": VERIFY_3}[probes], smollm2.encode,
                           smollm2.bos_ids())
    for plan in plans[:2]:
        reqs = [ProbeRequest(plan.tail_for(t), t, 3, plan.prefix) for t in (5, 1000, 3420)]
        shared = smollm2.probe(reqs)
        smollm2._shared_prefix = False
        try:
            plain = smollm2.probe(reqs)
        finally:
            smollm2._shared_prefix = True
        for a, b in zip(shared, plain, strict=True):
            assert a.ids == b.ids
            np.testing.assert_allclose(a.probs, b.probs, rtol=1e-3, atol=1e-7)


def test_bf16_verdicts_equal_float32_near_the_threshold():
    """Tokens within a factor of two to four of 0.01: bf16 weights, float32 projection."""
    from backends.hf import HFBackend
    from detectors.repeat_probe import RepeatProbe
    from models.aliases import smollm2_gguf

    verdicts = {}
    for dtype in ("float32", "bfloat16"):
        be = HFBackend(smollm2_gguf(), dtype=dtype)
        found = run(RepeatProbe(), be, list(NEAR))
        verdicts[dtype] = {t: f.verdict for t, f in found.items()}
        be.close()
    assert verdicts["float32"] == NEAR
    assert verdicts["bfloat16"] == NEAR


def test_bf16_probes_near_the_threshold_run_again_in_float32(monkeypatch):
    """Probes of a bf16 model that end within ``NEAR_THRESHOLD`` of their threshold carry
    the float32 model's results; the others keep the bf16 model's own."""
    import backends.hf as hf
    from models.aliases import smollm2_gguf
    from probes import VERIFY_3

    be = hf.HFBackend(smollm2_gguf(), dtype="bfloat16")
    assert "run again in float32" in be.describe()["near_threshold"]
    plans = plan_probe_set(VERIFY_3, be.encode, be.bos_ids())
    reqs = [ProbeRequest(p.tail_for(t), t, 3, p.prefix, 0.01) for p in plans
            for t in [*NEAR, GLITCH[0], *ORDINARY[:3]]]
    monkeypatch.setattr(hf, "NEAR_THRESHOLD", 1.0)  # nothing near: the bf16 model alone
    own = be.probe(reqs)
    assert be._float32 is None
    monkeypatch.setattr(hf, "NEAR_THRESHOLD", 2.0)
    got = be.probe(reqs)
    twin = be.float32_twin()
    assert twin is not None and twin.dtype_name == "float32"
    exact = twin.probe(reqs)
    near = [0.005 <= r.max_prob < 0.02 for r in own]
    assert 0 < sum(near) < len(reqs)
    for is_near, g, o, e in zip(near, got, own, exact, strict=True):  # float32 sums depend
        assert g.probs == pytest.approx(e.probs if is_near else o.probs, rel=1e-4)  # on batch
    assert any(o.probs != pytest.approx(e.probs, rel=1e-3)
               for is_near, o, e in zip(near, own, exact, strict=True)
               if not is_near)  # elsewhere the bf16 model's own numbers
    be.close()


def test_an_extra_detector_run_keeps_the_verified_glitch_tokens(tmp_path):
    db = tmp_path / "r.db"
    engine = open_db(f"sqlite:///{db}")
    tokens = GLITCH[:3] + ORDINARY[:5]
    scan("smollm2", engine, tokens=tokens)
    glitch = rows(db, "SELECT token_id FROM glitch_tokens ORDER BY token_id")
    assert glitch == [(t,) for t in GLITCH[:3]]
    scan("smollm2", engine, ["repeated-sequence"], tokens=ORDINARY[:10])
    assert rows(db, "SELECT token_id FROM glitch_tokens ORDER BY token_id") == glitch
    (opts,) = rows(db, "SELECT options_json FROM runs WHERE detector = 'verdict' "
                       "ORDER BY id DESC LIMIT 1")[0]
    assert "repeated-sequence" in json.loads(opts)["runs"]


@pytest.fixture(scope="module")
def gemma():
    from backends.hf import HFBackend
    from models.aliases import gemma3_270m_gguf

    return HFBackend(gemma3_270m_gguf())


def test_scouts_skip_the_long_prompts_for_unused_tokens_only(gemma):
    """Gemma 3's <unusedN> tokens leave the long prompts after their scouts; the verdicts of
    glitch and ordinary tokens are those of the exact cascade."""
    from detectors.repeat_probe import RepeatProbe

    unused = [t for t, text in enumerate(gemma.vocab().text) if text.startswith("<unused")]
    assert len(unused) > 6000
    unused = unused[600::600]  # <unused0> (id 6) is no glitch token: Gemma repeats it
    ordinary = [gemma.encode(w)[0] for w in (" house", " river", " quick", "ing", " Paris")]
    fast = run(RepeatProbe(), gemma, unused + ordinary)
    exact = run(RepeatProbe(scout_below=0), gemma, unused + ordinary)
    assert {t: f.verdict for t, f in fast.items()} == {t: f.verdict for t, f in exact.items()}
    assert all(fast[t].verdict == "glitch" for t in unused)
    scouted = [t for t in unused if "scout" in fast[t].evidence]
    assert len(scouted) >= len(unused) // 2
    for t in scouted:
        assert set(fast[t].evidence["scout"]) <= {"repeats", "input-output"}
        assert all(p < 1e-5 for p in fast[t].evidence["scout"].values())
        assert not set(fast[t].evidence["scout"]) & set(fast[t].evidence["p"])
    assert all(fast[t].verdict == "ok" and "scout" not in fast[t].evidence for t in ordinary)


def test_the_screen_asks_a_hopeless_token_no_more_prompts(gemma):
    """A never-trained row reads far below ``hopeless_below`` in the first screen prompt and
    is asked no other; it stays suspect, as when every prompt is asked."""
    from detectors.repeat_screen import RepeatScreen

    unused = [t for t, text in enumerate(gemma.vocab().text) if text.startswith("<unused")]
    unused = unused[1000::1000]
    short = run(RepeatScreen(), gemma, unused)
    every = run(RepeatScreen(hopeless_below=0), gemma, unused)
    for t in unused:
        assert short[t].verdict == every[t].verdict == "suspect"
        assert list(short[t].evidence["p"]) == ["pair-list"]
        assert short[t].evidence["p"]["pair-list"] < 1e-5
        assert list(every[t].evidence["p"]) == ["pair-list", "repeats-6", "input-output-2"]


def test_a_fresh_gguf_conversion_prints_nothing_of_its_own(tmp_path, monkeypatch, capfd):
    """transformers' conversion bar and warnings stay out of the scan's output."""
    from harness.cli import main

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "home"))
    main(["scan", "smollm2", "-d", "embedding-centroid"])  # returns: exit status 0
    out, err = capfd.readouterr()
    assert (tmp_path / "cache" / "hf-from-gguf").is_dir()
    for noise in ("Converting", "de-quantizing", "Warning", "warn", "it/s"):
        assert noise not in err and noise not in out, err


def test_a_gguf_conversion_stores_tied_embeddings_under_the_input_name(tmp_path, monkeypatch):
    """transformers loads a tied pair from the input embedding's name: a cache that keeps only
    the head's name has it fill the embedding with random numbers at every load first (seen
    here as a load that moves torch's random generator). A conversion cached that way by an
    earlier version is rewritten once, on load."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from backends.hf import HFBackend
    from models.aliases import smollm2_gguf

    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))

    def stored(file):
        with safe_open(str(file), "pt") as f:
            return set(f.keys())

    def draws_random_numbers(folder):
        torch.manual_seed(0)
        want = torch.rand(4)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_pretrained(str(folder))
        return not torch.equal(torch.rand(4), want)

    first = HFBackend(smollm2_gguf())
    file = next((tmp_path / "cache" / "hf-from-gguf").glob("*/model.safetensors"))
    assert "model.embed_tokens.weight" in stored(file)
    assert "lm_head.weight" not in stored(file)
    assert not draws_random_numbers(file.parent)
    emb = first.input_embeddings()

    old = load_file(str(file))
    old["lm_head.weight"] = old.pop("model.embed_tokens.weight")
    save_file(old, str(file), metadata={"format": "pt"})
    assert draws_random_numbers(file.parent)

    again = HFBackend(smollm2_gguf())
    assert again.embeddings_tied()
    np.testing.assert_array_equal(again.input_embeddings(), emb)
    assert stored(file) == set(old) - {"lm_head.weight"} | {"model.embed_tokens.weight"}
    assert not draws_random_numbers(file.parent)
    assert not list(file.parent.glob(".tmp-*"))
