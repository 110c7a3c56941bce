"""llama-cpp-python, initialised once with its log kept instead of printed, and a loaded
``llama_model``: shared by the ``llamacpp`` backend and the GGUF tokenizer."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from harness.errors import HarnessError, ModelLoadError
from harness.gguf_file import check_gguf_header


def llama_lib() -> Any:
    """llama_cpp, initialised once, with its log routed into ``_LOG`` instead of stderr."""
    try:
        import llama_cpp
    except ImportError:
        raise HarnessError("the llamacpp backend needs llama-cpp-python: "
                           "pip install 'glitch-harness[llamacpp]' (builds from source, "
                           "about 10 minutes)") from None
    if not hasattr(llama_lib, "callback"):
        llama_cpp.llama_backend_init()
        llama_lib.callback = llama_cpp.llama_log_callback(_log_sink)  # must outlive every call
        llama_cpp.llama_log_set(llama_lib.callback, ctypes.c_void_p(0))
    return llama_cpp


_LOG: list[str] = []


def _log_sink(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
    if level == 4:  # GGML_LOG_LEVEL_ERROR: kept to explain a failed load, never printed
        _LOG.append(text.decode("utf-8", errors="replace").strip())
        del _LOG[:-20]


def clear_errors() -> None:
    """Forget llama.cpp's earlier errors, before a call that ``last_error`` may explain."""
    _LOG.clear()


def last_error() -> str:
    """llama.cpp's first error line, without its function-name prefixes."""
    for line in _LOG:
        reason = line.rsplit("error loading model: ", 1)[-1] if "error loading model" in line \
            else line.split(": ", 1)[-1]
        if reason:
            return reason
    return "llama.cpp could not load it"


class LoadedModel:
    """A ``llama_model`` pointer, freed with its owner."""

    def __init__(self, path: Path, vocab_only: bool) -> None:
        lib = llama_lib()
        check_gguf_header(path)  # llama.cpp itself checks the rest and says what is wrong
        params = lib.llama_model_default_params()
        params.vocab_only = vocab_only
        clear_errors()
        self.ptr = lib.llama_model_load_from_file(str(path).encode(), params)
        if not self.ptr:
            raise ModelLoadError(f"llama.cpp cannot load {path}: {last_error()}")
        self.vocab = lib.llama_model_get_vocab(self.ptr)
        self.lib = lib

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else None

    def free(self) -> None:
        if self.ptr:
            self.lib.llama_model_free(self.ptr)
            self.ptr = None
