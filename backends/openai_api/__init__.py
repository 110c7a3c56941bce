"""The ``openai`` backend: a model behind an OpenAI-compatible HTTP API.

``openai:MODEL@BASE_URL`` names a model served by OpenAI itself, vLLM, llama.cpp's
``llama-server``, ``python -m llama_cpp.server`` or anything else that speaks
``/v1/completions`` (or, as a last resort, ``/v1/chat/completions``). Without ``@BASE_URL`` the
base is ``$OPENAI_BASE_URL``, else ``https://api.openai.com/v1``.

The model itself is a black box; the tokenizer is local (``tokenizer=``: an alias, a ``.gguf``
file, a Hugging Face tokenizer folder or ``tokenizer.json``, ``tiktoken:ENCODING``), or
tiktoken's for OpenAI model names, or the server's own tokenize endpoints. At load the backend
asks the server what it can do (see ``OpenAIBackend``) and records what it found in
``describe()``.

One concern per module: ``transport`` (requests, retries, failures), ``negotiate`` (what the
server can do), ``scoring`` (log-probabilities and probes), ``tokenizers`` (the tokenizer and
the server's spellings of tokens) and ``backend`` (the ``Backend`` composed of them).
"""

from backends.openai_api.backend import OpenAIBackend
from backends.openai_api.tokenizers import ServerTokenizer
from harness.hookspecs import hookimpl

__all__ = ["OpenAIBackend", "ServerTokenizer"]


@hookimpl
def register_backends(register):
    register("openai", OpenAIBackend)
