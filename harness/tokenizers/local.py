"""A model's tokenizer from local files alone, no weights: what backends answer
``Backend.offline_tokenizer`` with (``harness check`` needs only the tokenizer)."""

from __future__ import annotations

from pathlib import Path

from harness.errors import HarnessError, ModelLoadError
from harness.tokenizers import Tokenizer


def local_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer ``spec`` names: ``tiktoken:ENCODING``, a ``.gguf`` file (llama.cpp's
    tokenizer of it, the reference for the format; transformers' conversion of it where
    llama-cpp-python is missing), a Hugging Face model or tokenizer folder, a
    ``tokenizer.json`` file, or a hub id already in the local Hugging Face cache."""
    if spec.startswith("tiktoken:"):
        from harness.tokenizers.tiktoken import tiktoken_tokenizer

        return tiktoken_tokenizer(spec.partition(":")[2])
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        return _gguf_tokenizer(path)
    from harness.tokenizers.hf import HFTokenizer

    if path.is_dir() or path.suffix == ".json" and path.is_file():
        return HFTokenizer.load(path)
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelLoadError(f"{spec} is neither a .gguf file, a tokenizer folder nor a "
                             "tokenizer.json file")
    return HFTokenizer.load_cached(spec)


def _gguf_tokenizer(path: Path) -> Tokenizer:
    try:
        import llama_cpp  # noqa: F401 - only whether it is there
    except ImportError:
        from harness.tokenizers.hf import HFTokenizer

        return HFTokenizer.from_gguf(path)
    from harness.tokenizers.gguf import GGUFTokenizer

    try:
        return GGUFTokenizer(path)
    except HarnessError:
        raise
    except Exception as exc:  # ctypes and llama.cpp raise plain errors on a broken file
        raise ModelLoadError(f"cannot read the tokenizer of {path}: {exc}") from None
