"""The llamacpp backend on the real GGUF files: vocabulary with llama.cpp's token attributes,
embeddings read with the gguf package, the batched paths against one-sequence ones, broken
files, and agreement with the hf backend on the same GGUF."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from harness.backend import Backend, GenerateRequest, ProbeRequest, ScoreRequest
from harness.db import open_db
from harness.probe_sets import plan_prompt
from harness.runner import scan

pytestmark = pytest.mark.real_model

SMOLLM2_CONTROL = set(range(17))  # <|endoftext|>, <|im_start|>, ... <empty_output>


@pytest.fixture(scope="module")
def smollm2():
    from backends.llamacpp import LlamaCppBackend
    from models.aliases import smollm2_gguf

    backend = LlamaCppBackend(smollm2_gguf(), threads=2)
    yield backend
    backend.close()


def test_vocab_carries_llama_cpp_token_attributes(smollm2):
    vocab = smollm2.vocab()
    assert len(vocab) == 49152
    control = {i for i, a in enumerate(vocab.attributes) if a == "control"}
    assert control == SMOLLM2_CONTROL
    assert vocab.text[1] == "<|im_start|>" and vocab.special[1]
    assert vocab.raw[260] == b" the" and vocab.attributes[260] == "normal"
    assert not vocab.special[260]


def test_gemma_unused_tokens_and_bos():
    from backends.llamacpp import GGUFTokenizer
    from models.aliases import gemma3_270m_gguf

    tok = GGUFTokenizer(gemma3_270m_gguf())
    vocab = tok.vocab()
    unused = [i for i, a in enumerate(vocab.attributes) if a == "unused"]
    assert len(unused) == 6242
    assert all(vocab.text[i].startswith("<unused") for i in unused)
    assert sum(a == "byte" for a in vocab.attributes) == 256
    # with and without special tokens: BOS (id 2) only when asked for
    assert tok.encode("Hello", add_special_tokens=True) == [2] + tok.encode("Hello")
    assert tok.bos_ids() == [2]
    assert tok.decode(tok.encode("Hello world")) == "Hello world"
    tok.close()


def test_encode_decode_round_trip_and_special_tokens(smollm2):
    text = "The capital of France is Paris."
    ids = smollm2.encode(text)
    assert smollm2.decode(ids) == text
    assert smollm2.bos_ids() == []  # SmolLM2 adds no BOS
    assert smollm2.encode("<|im_start|>user") [0] == 1  # special tokens are parsed
    assert smollm2.decode_batch([[1], [260]]) == ["<|im_start|>", " the"]


def test_embeddings_read_from_the_file_match_the_hf_backend(smollm2):
    from backends.hf import HFBackend
    from models.aliases import smollm2_gguf

    emb = smollm2.input_embeddings()
    assert emb.shape == (49152, 576) and emb.dtype == np.float32
    assert smollm2.embeddings_tied()
    assert smollm2.output_embeddings() is emb
    hf = HFBackend(smollm2_gguf())
    np.testing.assert_allclose(emb, hf.input_embeddings(), rtol=0, atol=1e-6)
    hf.close()


def test_batched_probe_matches_one_sequence_at_a_time(smollm2):
    """Prefix shared through sequence copies, many sequences per decode and early exit give
    what the generic generate + score path gives on each whole prompt."""
    plan = plan_prompt("Please repeat the string '{token}' back to me.\n\n\"{repeat}", "t",
                       smollm2.encode)
    tokens = [260, 1000, 2000, 3000, 43858, 5, 36743, 190, 12345, 40000]
    fast = smollm2.probe([ProbeRequest(plan.tail_for(t), t, 3, plan.prefix) for t in tokens])
    slow = Backend.probe(smollm2, [ProbeRequest(plan.full_ids(t), t, 3) for t in tokens])
    for t, f, s in zip(tokens, fast, slow, strict=True):
        assert f.error is None and s.error is None
        assert f.ids == s.ids, t
        # llama.cpp's quantised matrix products are not batch-invariant: a sequence decoded
        # among others gets slightly different numbers (up to ~0.3 nats at p ~ 1e-3 here)
        np.testing.assert_allclose(np.log(np.maximum(f.probs, 1e-7)),
                                   np.log(np.maximum(s.probs, 1e-7)), rtol=0, atol=0.5)
        assert (max(f.probs) >= 0.01) == (max(s.probs) >= 0.01), t
    # one request at a time, the shared prefix changes nothing at all
    for t in tokens[:3]:
        (shared,) = smollm2.probe([ProbeRequest(plan.tail_for(t), t, 2, plan.prefix)])
        (whole,) = smollm2.probe([ProbeRequest(plan.full_ids(t), t, 2)])
        assert shared.ids == whole.ids
        np.testing.assert_allclose(shared.probs, whole.probs, rtol=1e-3, atol=1e-7)


def test_score_and_generate_batch_equal_single(smollm2):
    prompts = [smollm2.encode(t) for t in ("The capital of France is", "One, two, three,",
                                           "def add(a, b):\n    return", "Hello")]
    reqs = [ScoreRequest(p, list(range(1, len(p) + 1)), p[1:] + [260]) for p in prompts]
    batched = smollm2.score(reqs)
    for req, b in zip(reqs, batched, strict=True):
        (single,) = smollm2.score([req])
        np.testing.assert_allclose(b.logprobs, single.logprobs, rtol=0, atol=0.5)
    gens = smollm2.generate([GenerateRequest(p, 6) for p in prompts])
    assert gens[0].text.startswith(" Paris")
    for p, g in zip(prompts, gens, strict=True):
        (single,) = smollm2.generate([GenerateRequest(p, 6)])
        assert g.ids == single.ids
    bad = smollm2.score([ScoreRequest([1, 2], [5], [3])])
    assert bad[0].error and "outside" in bad[0].error


@pytest.mark.parametrize("cut, message", [
    (3_000_000, "not within the file bounds"),
    (200, "failed to read"),
])
def test_truncated_gguf_is_one_line(cli, tmp_path, cut, message):
    from models.aliases import smollm2_gguf

    broken = tmp_path / "broken.gguf"
    with open(smollm2_gguf(), "rb") as fh:
        broken.write_bytes(fh.read(cut))
    code, out, err = cli("scan", str(broken), "--backend", "llamacpp")
    assert code == 2
    assert err.strip().startswith("error:") and message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_corrupt_header_is_one_line(cli, tmp_path):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    code, _, err = cli("scan", f"llamacpp:{garbage}")
    assert code == 2 and "cannot load" in err and len(err.strip().splitlines()) == 1


def test_hf_and_llamacpp_agree_on_smollm2(tmp_path):
    """Same GGUF: the same static indicators on every token, and repeat-probe verdicts that
    agree on a sample of candidates and ordinary tokens."""
    db = tmp_path / "both.db"
    engine = open_db(f"sqlite:///{db}")
    rng = np.random.default_rng(0)
    sample = sorted({5, 7, 36743, 43858, 45175, 48047, 260, 1000, 2000, 3000}
                    | set(rng.choice(np.arange(17, 49152), 20, replace=False).tolist()))
    runs = {}
    for backend in ("hf", "llamacpp"):
        result = scan("smollm2", engine, ["embedding-centroid", "unembedding-cosine",
                                          "repeat-probe"], backend=backend, tokens=sample)
        assert [o.status for o in result.outcomes] == ["done"] * 3
        runs[backend] = {o.detector: o.run_id for o in result.outcomes}
    with sqlite3.connect(db) as conn:
        def column(backend, detector, what):
            return np.array([r[0] for r in conn.execute(
                f"SELECT {what} FROM findings WHERE run_id = ? ORDER BY token_id",
                (runs[backend][detector],))])

        for det in ("embedding-centroid", "unembedding-cosine"):
            hf, lc = column("hf", det, "score"), column("llamacpp", det, "score")
            assert len(hf) == len(lc) == 49152
            np.testing.assert_allclose(hf.astype(float), lc.astype(float), rtol=1e-4,
                                       atol=1e-5)
            assert (column("hf", det, "verdict") == column("llamacpp", det, "verdict")).all()
        hf = column("hf", "repeat-probe", "verdict")
        lc = column("llamacpp", "repeat-probe", "verdict")
    assert len(hf) == len(sample)
    agree = (hf == lc).mean()
    assert agree >= 0.9, list(zip(sample, hf, lc, strict=True))
    assert set(hf) >= {"ok", "glitch"}


@pytest.mark.parametrize("probes", ["verify-3", "repeat-12", "n-shot"])
def test_every_probe_set_runs_through_llamacpp(smollm2, probes):
    from detectors.repeat_probe import RepeatProbe
    from harness.detector import ScanContext

    det = RepeatProbe(probes=probes)
    ctx = ScanContext(backend=smollm2, vocab=smollm2.vocab(), categories=np.array([]))
    det.prepare(ctx)
    found = {f.token_id: f for batch in det.run(ctx, np.array([1000, 43858])) for f in batch}
    assert found[43858].verdict == "glitch", found[43858].evidence
    assert found[1000].verdict == "ok", found[1000].evidence  # "()"
    assert set(found[43858].evidence["p"]) == {p.label for p in det.plans}


@pytest.fixture(scope="module")
def untied_gguf(tmp_path_factory):
    """SmolLM2's GGUF with an output matrix of its own (the negated input embeddings, f16),
    written with the gguf package the way its gguf_new_metadata script copies a file."""
    import gguf
    from gguf.quants import dequantize

    from models.aliases import smollm2_gguf

    reader = gguf.GGUFReader(smollm2_gguf())
    out = tmp_path_factory.mktemp("untied") / "smollm2-untied.gguf"
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    head = (-dequantize(embd.data, embd.tensor_type)).astype(np.float16)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.add_tensor_info("output.weight", head.shape, head.dtype, head.nbytes,
                           gguf.GGMLQuantizationType.F16)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.write_tensor_data(head)
    writer.close()
    return out


def test_untied_output_matrix_is_read_from_its_own_tensor(untied_gguf, smollm2):
    from backends.llamacpp import LlamaCppBackend

    untied = LlamaCppBackend(str(untied_gguf), threads=2)
    try:
        assert not untied.embeddings_tied()
        emb, head = untied.input_embeddings(), untied.output_embeddings()
        np.testing.assert_array_equal(emb, smollm2.input_embeddings())
        np.testing.assert_allclose(head, -emb, rtol=1e-3, atol=1e-4)
        # llama.cpp really uses it: the negated head turns the greedy choice upside down
        prompt = smollm2.encode("The capital of France is")
        (tied,) = smollm2.generate([GenerateRequest(prompt, 2)])
        (flipped,) = untied.generate([GenerateRequest(prompt, 2)])
        assert tied.ids != flipped.ids
    finally:
        untied.close()


def test_a_checkpoint_gives_up_early_or_changes_nothing_in_llamacpp(smollm2):
    from harness.backend import ProbeRequest
    from harness.probe_sets import plan_probe_set
    from probes import VERIFY_3

    repeats = plan_probe_set(VERIFY_3, smollm2.encode, smollm2.bos_ids())[1]
    assert repeats.label == "repeats" and repeats.checkpoint == 16
    tokens = [43858, 1000]  # a glitch token, then " ()"... an ordinary one
    req = [ProbeRequest(repeats.tail_for(t), t, 3, repeats.prefix, checkpoint=16,
                        give_up_below=1e-3) for t in tokens]
    got = smollm2.probe(req)
    alone = smollm2.probe([ProbeRequest(repeats.tail_for(t)[:16], t, 1, repeats.prefix)
                           for t in tokens])
    plain = smollm2.probe([ProbeRequest(repeats.tail_for(t), t, 3, repeats.prefix)
                           for t in tokens])
    assert got[0].gave_up and not got[1].gave_up
    assert abs(np.log(got[0].probs[0]) - np.log(alone[0].probs[0])) < 0.5
    assert got[1].ids == plain[1].ids
