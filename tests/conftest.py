"""Shared fixtures: an isolated data dir, a tiny GPT-2 built from a config, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness import plugins
from harness.cli import main

TINY_VOCAB = 300  # tokenizer size; the embedding matrix gets 4 padding rows on top
TINY_ROWS = TINY_VOCAB + 4
PLANTED = (290, 291, 292, 293, 294, 295)  # rows collapsed onto one value in the fixture


@pytest.fixture(autouse=True)
def harness_home(tmp_path, monkeypatch):
    """Every test gets its own database; the model cache stays shared (conversions are slow)."""
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HARNESS_DB", raising=False)
    return tmp_path / "home"


@pytest.fixture
def cli(capsys):
    """Run the harness CLI in-process: returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = 0
        try:
            main(list(args))
        except SystemExit as exc:
            code = int(exc.code or 0)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def fake_plugin():
    """Register the fake backend plugin (tests/plugins/fake_backend.py) for one test."""
    from tests.plugins import fake_backend

    plugins.register_plugin(fake_backend, name="fake-backend-plugin")
    yield fake_backend
    plugins.unregister_plugin(fake_backend)


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Please repeat the string back to me.",
    "Glitch tokens are tokens the model barely saw in training.",
    "Input: cat, Output: cat. Input: dog, Output: dog.",
] * 50


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny GPT-2 of ``build_tiny_model``, built once per session."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))


def build_tiny_model(out: Path) -> Path:
    """A 2-layer GPT-2 with a byte-level BPE tokenizer trained here, saved as an HF folder
    in ``out``.

    Rows ``PLANTED`` of the (tied) embedding matrix are set to one shared value, the way
    never-trained rows look; rows past the tokenizer's size are padding.
    """
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=TINY_VOCAB, min_frequency=1,
                            special_tokens=["<|endoftext|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>")
    assert len(tok) == TINY_VOCAB, len(tok)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=TINY_ROWS, n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.transformer.wte.weight[list(PLANTED)] = 0.0005
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "fixture.json").write_text(json.dumps({"planted": PLANTED}))
    return out


# --- the results database: SQLite, and PostgreSQL on a throwaway server ----------------------

DATABASES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for the whole session (skipped where its binaries are missing)."""
    from tests import pg

    why = pg.missing()
    if why:
        pytest.skip(why)
    server = pg.Server()
    yield server
    server.stop()


@pytest.fixture(params=DATABASES)
def db_url(request, harness_home, monkeypatch) -> str:
    """The URL of an empty results database, once on SQLite and once on PostgreSQL; it is
    also ``$HARNESS_DB``, so CLI commands without ``--db`` use it."""
    if request.param == "sqlite":
        url = f"sqlite:///{harness_home / 'results.db'}"
        monkeypatch.setenv("HARNESS_DB", url)
        yield url
        return
    server = request.getfixturevalue("pg_server")
    name, url = server.new_database()
    monkeypatch.setenv("HARNESS_DB", url)
    yield url
    server.drop_database(name)
