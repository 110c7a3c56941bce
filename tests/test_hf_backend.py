"""The hf backend on a tiny GPT-2 built from a config: vocab, scoring, generation."""

from __future__ import annotations

import numpy as np
import pytest

from harness.backend import Capability, GenerateRequest, ScoreRequest
from harness.vocab import BYTE, NORMAL, PADDING, SPECIAL, analyze
from tests.conftest import PLANTED, TINY_ROWS, TINY_VOCAB


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from backends.hf import HFBackend

    return HFBackend(str(tiny_model_dir))


def test_vocab_bytes_flags_and_padding(tiny):
    vocab = tiny.vocab()
    assert len(vocab) == TINY_ROWS
    assert vocab.padding.sum() == TINY_ROWS - TINY_VOCAB
    assert vocab.special[tiny.tokenizer.tok.eos_token_id]
    # byte-level BPE: every one of the 256 bytes has a token, the space is Ġ -> b" "
    singles = {r for r in vocab.raw if len(r) == 1}
    assert len(singles) == 256
    the = tiny.encode(" the")
    assert len(the) == 1 and vocab.raw[the[0]] == b" the" and vocab.text[the[0]] == " the"
    assert vocab.byte_token.sum() == 128  # lone bytes >= 0x80


def test_tokenizer_analysis(tiny):
    vocab = tiny.vocab()
    cats = analyze(vocab, tiny.encode_batch)
    assert (cats == PADDING).sum() == TINY_ROWS - TINY_VOCAB
    assert cats[tiny.tokenizer.tok.eos_token_id] == SPECIAL
    assert (cats == BYTE).sum() == 128
    assert cats[tiny.encode(" the")[0]] == NORMAL


def test_decode_batch_gives_what_transformers_gives(tiny, monkeypatch):
    """The Rust tokenizer decodes directly unless transformers would clean up the text."""
    tok = tiny.tokenizer
    gen = np.random.default_rng(0)
    seqs = [[i] for i in range(len(tok.tok))] + [
        gen.integers(0, len(tok.tok), int(gen.integers(1, 30))).tolist() for _ in range(300)]
    seqs.append(tok.encode("hello , world . it 's"))
    assert tok.decode_batch(seqs) == tok.tok.batch_decode(seqs, skip_special_tokens=False)
    # a tokenizer that cleans up (transformers skips it for BPE unless forced)
    monkeypatch.setattr(tok.tok, "clean_up_tokenization_spaces", True)
    monkeypatch.setattr(tok.tok, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_"
                        "corrupt_output", True, raising=False)
    cleaned = tok.decode_batch(seqs[-1:])
    assert cleaned == tok.tok.batch_decode(seqs[-1:], skip_special_tokens=False)
    assert cleaned == ["hello, world. it's"]


def test_capabilities_and_tied_embeddings(tiny):
    assert Capability.SCORE in tiny.capabilities
    assert tiny.embeddings_tied()
    emb, unemb = tiny.input_embeddings(), tiny.output_embeddings()
    assert emb.shape == unemb.shape == (TINY_ROWS, 32)
    assert emb.dtype == np.float32
    np.testing.assert_array_equal(emb[PLANTED[0]], emb[PLANTED[1]])


def test_score_matches_unbatched_logits(tiny):
    import torch

    seqs = [tiny.encode("The quick brown fox jumps"), tiny.encode("Please repeat")]
    reqs = [ScoreRequest(ids=s, positions=list(range(1, len(s))), targets=s[1:]) for s in seqs]
    batched = tiny.score(reqs)
    for req, res in zip(reqs, batched, strict=True):
        assert res.error is None and len(res.logprobs) == len(req.targets)
        with torch.no_grad():
            logits = tiny.model(torch.tensor([list(req.ids)])).logits[0]
        want = torch.log_softmax(logits, -1)[torch.arange(len(req.ids) - 1),
                                             torch.tensor(req.targets)]
        np.testing.assert_allclose(res.logprobs, want.numpy(), atol=1e-4)


def test_score_bad_item_carries_error_others_succeed(tiny):
    ids = tiny.encode("The quick brown fox")
    res = tiny.score([ScoreRequest(ids, [0], [1]), ScoreRequest(ids, [1], [ids[1]])])
    assert len(res) == 2
    assert res[0].error and not res[0].logprobs
    assert res[1].error is None and len(res[1].logprobs) == 1


def test_batched_generate_equals_one_at_a_time(tiny):
    prompts = [tiny.encode("The quick"), tiny.encode("Input: cat, Output: cat. Input: dog")]
    reqs = [GenerateRequest(p, max_new_tokens=6) for p in prompts]
    batched = tiny.generate(reqs)
    single = [tiny.generate([r])[0] for r in reqs]
    assert [r.ids for r in batched] == [r.ids for r in single]
    assert all(r.error is None for r in batched)
    assert batched[0].text == tiny.decode(batched[0].ids)


def test_fingerprint_is_stable_and_carries_dtype(tiny, tiny_model_dir):
    from backends.hf import HFBackend

    fp = tiny.fingerprint()
    assert fp.source.startswith("folder:") and fp.dtype == "float32"
    assert HFBackend(str(tiny_model_dir)).fingerprint() == fp
    assert HFBackend(str(tiny_model_dir), dtype="bfloat16").fingerprint().key() != fp.key()


# --- the CUDA path's weak spots, checked on the CPU -----------------------------------------


def _oom_above(monkeypatch, backend, method: str, rows: int, arg: int = 1) -> list:
    """Make ``method`` raise CUDA's out-of-memory error on more than ``rows`` items (its
    argument ``arg``); record, per call that goes through, the exception active then."""
    import sys

    import torch

    real = getattr(type(backend), method)
    active = []

    def chunk(self, *args):
        if len(args[arg]) > rows:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        active.append(sys.exc_info()[0])
        return real(self, *args)

    monkeypatch.setattr(type(backend), method, chunk)
    return active


def test_out_of_memory_splits_after_the_failed_call_is_released(tiny, monkeypatch):
    from harness.backend import ProbeRequest

    ids = tiny.encode(" the cat sat on")
    reqs = [ProbeRequest(ids, t, steps=2, prefix=tiny.encode("Repeat:")) for t in range(8)]
    want = [(r.probs, r.ids) for r in tiny.probe(reqs)]
    active = _oom_above(monkeypatch, tiny, "_probe_chunk", 2, arg=1)
    got = tiny.probe(reqs)
    assert all(r.error is None for r in got)
    assert [r.ids for r in got] == [ids for _, ids in want]
    # the same up to float rounding: a BLAS may sum in another order for fewer rows
    np.testing.assert_allclose([r.probs for r in got], [p for p, _ in want], rtol=1e-5)
    # every half ran with no exception alive: the failed call's frames were already gone
    assert len(active) == 4 and active == [None] * 4


def test_score_splits_on_out_of_memory_too(tiny, monkeypatch):
    seqs = [tiny.encode(t) for t in ("The quick brown fox", "Please repeat it", "cat dog")]
    reqs = [ScoreRequest(s, [len(s)], [s[0]]) for s in seqs] * 2
    want = [r.logprobs for r in tiny.score(reqs)]
    active = _oom_above(monkeypatch, tiny, "_score_chunk", 1, arg=1)
    got = tiny.score(reqs)
    assert [r.logprobs for r in got] == want and all(r.error is None for r in got)
    assert active == [None] * len(reqs)


def test_a_chunk_that_fails_on_one_item_fails_only_that_chunk(tiny, monkeypatch):
    from harness.backend import ProbeRequest

    _oom_above(monkeypatch, tiny, "_probe_chunk", 0, arg=1)  # not even one row fits
    got = tiny.probe([ProbeRequest(tiny.encode(" the"), 5)])
    assert got[0].error.startswith("OutOfMemoryError: CUDA out of memory")


def test_chunk_rows_follow_the_cache_bytes_per_token():
    from transformers import GPT2Config, GPTJConfig

    from backends.hf import chunk_rows

    budget = 40 * 2**30
    gpt2 = chunk_rows(GPT2Config(), budget, 2, new_tokens=8, context=300, reads=1,
                      vocab_rows=50257, max_tokens=10**9)
    gptj = chunk_rows(GPTJConfig(), budget, 2, new_tokens=8, context=300, reads=1,
                      vocab_rows=50400, max_tokens=10**9)
    # GPT-J keeps about 12 times GPT-2's key/value bytes per position
    assert 8 <= gpt2 / gptj <= 14
    assert chunk_rows(GPT2Config(), budget / 4, 2, 8, 300, 1, 50257, 10**9) < gpt2
    assert chunk_rows(GPT2Config(), budget, 2, 8, 300, 1, 50257, max_tokens=64) == 8


def test_ids_past_the_embedding_are_errors_not_device_asserts(tiny):
    from harness.backend import ProbeRequest

    ok = tiny.encode(" the cat")
    bad = TINY_ROWS + 3
    probes = tiny.probe([ProbeRequest(ok, 5), ProbeRequest(ok + [bad], 5),
                         ProbeRequest(ok, bad), ProbeRequest(ok, 6, prefix=[-1])])
    assert probes[0].error is None and probes[0].probs
    assert all(f"outside the model's 0..{TINY_ROWS - 1}" in p.error for p in probes[1:])
    scores = tiny.score([ScoreRequest(ok, [1], [bad]), ScoreRequest(ok, [1], [ok[1]])])
    assert "outside" in scores[0].error and scores[1].error is None


def test_projection_is_float32_and_matches_the_model(tiny):
    import torch

    ids = torch.tensor([tiny.encode("The quick brown fox")])
    with torch.inference_mode():
        own = torch.log_softmax(tiny.model(input_ids=ids).logits[0], -1)
        ours = tiny._logprobs(tiny._body(ids)[0][0])
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, own, atol=1e-5, rtol=0)


def test_bf16_model_projects_in_float32(tiny_model_dir):
    import torch

    from backends.hf import HFBackend

    be = HFBackend(str(tiny_model_dir), dtype="bfloat16")
    weight, _ = be._head()
    assert be.model.get_output_embeddings().weight.dtype == torch.bfloat16
    assert weight.dtype == torch.float32
    ids = torch.tensor([be.encode("The quick brown fox")])
    with torch.inference_mode():
        assert be._logprobs(be._body(ids)[0][0]).dtype == torch.float32


def test_load_failures_on_the_device_are_one_line(cli, tiny_model_dir, monkeypatch):
    import torch

    code, _, err = cli("scan", str(tiny_model_dir), "-b", "device=cuda")
    if not torch.cuda.is_available():
        assert code == 2 and "no CUDA GPU" in err and err.strip().count("\n") == 0, err

    def no_room(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 24.00 GiB")

    monkeypatch.setattr(torch.nn.Module, "to", no_room)
    code, _, err = cli("scan", str(tiny_model_dir), "-d", "embedding-centroid")
    assert code == 2, err
    line = " ".join(err.split())
    assert "CUDA out of memory" in line and "GiB of weights in float32" in line
    assert "Traceback" not in err


@pytest.mark.parametrize("rows", [3, 700])
@pytest.mark.parametrize("bias_and_cap", [False, True])
def test_blockwise_read_equals_the_full_softmax(rows, bias_and_cap):
    """Blocks of vocabulary rows (a 49,152-row head) against one log-softmax of
    ``hidden @ weight.T``: a few positions (weight-first, one block) and many (the plain
    product, many blocks), with a bias and Gemma's final soft-capping as well."""
    import types

    import torch

    from backends.hf import HFBackend

    torch.manual_seed(0)
    be = HFBackend.__new__(HFBackend)  # the projection only: no model to load
    weight = torch.randn(49152, 64)
    bias = torch.randn(49152) if bias_and_cap else None
    cap = 30.0 if bias_and_cap else None
    be.torch, be._head32 = torch, (weight, bias)
    be.model = types.SimpleNamespace(config=types.SimpleNamespace(final_logit_softcapping=cap))
    be._rows = lambda: 49152
    hidden = torch.randn(rows, 64) * 2
    targets = torch.randint(0, 49152, (rows,))
    logp, best = be._read(hidden, targets)
    logits = hidden @ weight.T + (0 if bias is None else bias)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    full = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(logp, full[torch.arange(rows), targets], atol=2e-5, rtol=0)
    assert torch.equal(best, full.argmax(dim=1))


def test_a_checkpoint_gives_up_early_or_changes_nothing(tiny):
    from harness.backend import ProbeRequest

    ids = tiny.encode(" the cat sat on the mat and the dog")
    prefix = tiny.encode("Repeat:")
    for shared in (True, False):
        tiny._shared_prefix = shared
        plain = tiny.probe([ProbeRequest(ids, t, 3, prefix) for t in (5, 6)])
        opening = tiny.probe([ProbeRequest(ids[:4], t, 1, prefix) for t in (5, 6)])
        # below the bar at the checkpoint: given up, with the probability read there
        low = tiny.probe([ProbeRequest(ids, t, 3, prefix, checkpoint=4, give_up_below=1.0)
                          for t in (5, 6)])
        for got, want in zip(low, opening, strict=True):
            assert got.gave_up and not got.ids
            np.testing.assert_allclose(got.probs, want.probs, rtol=1e-5)
        # above it: the same answer as without a checkpoint
        high = tiny.probe([ProbeRequest(ids, t, 3, prefix, checkpoint=4, give_up_below=0.0)
                           for t in (5, 6)])
        for got, want in zip(high, plain, strict=True):
            assert not got.gave_up and got.ids == want.ids
            np.testing.assert_allclose(got.probs, want.probs, rtol=1e-5)
    tiny._shared_prefix = True
    (bad,) = tiny.probe([ProbeRequest(ids, 5, 3, prefix, checkpoint=len(ids))])
    assert "checkpoint" in bad.error
