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
    assert vocab.special[tiny.tokenizer.eos_token_id]
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
    assert cats[tiny.tokenizer.eos_token_id] == SPECIAL
    assert (cats == BYTE).sum() == 128
    assert cats[tiny.encode(" the")[0]] == NORMAL


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
