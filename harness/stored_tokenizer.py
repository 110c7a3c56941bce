"""The tokenizer of a scanned model, rebuilt from what the database stores about it (its
backend, reference and metadata), without loading its weights."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy.engine import Engine

from harness import store
from harness.errors import HarnessError
from harness.plugins import registry
from harness.tokenizers import Tokenizer


def stored_model_tokenizer(engine: Engine, model_id: int) -> Tokenizer:
    """The tokenizer of the stored model ``model_id``, through its backend's
    ``offline_tokenizer``; checked against the stored vocabulary (which may hold padding
    rows past the tokenizer's size)."""
    with engine.connect() as conn:
        ref, backend, meta = store.model_source(conn, model_id)
        alias = store.model_by_id(conn, model_id).alias
        n_stored = len(store.token_categories(conn, model_id))
    reg = registry()
    if backend not in reg.backends:
        raise HarnessError(f"{ref!r} was scanned with backend {backend!r}, which no installed "
                           f"plugin registers (known: {', '.join(sorted(reg.backends))})")
    target = ref.split(":", 1)[1] if ref.startswith(f"{backend}:") else ref
    if alias in reg.models and target.startswith(("/", "~", ".")) and \
            not Path(target).expanduser().exists():
        # scanned elsewhere (another checkout, a CI clone): the alias's file here
        target = reg.models[alias].resolve_target()
    tok = reg.backends[backend].offline_tokenizer(target, meta)
    n = tok.n_tokens()
    if n > n_stored:
        tok.close()
        raise HarnessError(f"the tokenizer of {ref!r} has {n:,} tokens, the stored scan "
                           f"{n_stored:,}: the model's files changed since the scan")
    return tok
