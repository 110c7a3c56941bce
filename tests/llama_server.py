"""Run ``python -m llama_cpp.server`` on loopback for tests and benchmarks.

``start_llama_server()`` is a context manager yielding a ``LlamaServer`` (its base URL
``http://127.0.0.1:PORT/v1``); ``llama_server`` is a session-scoped pytest fixture yielding
that URL for SmolLM2-135M (served as model ``smollm2``). A conftest can import it with
``from tests.llama_server import llama_server  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL_ALIAS = "smollm2"
START_TIMEOUT_S = 60.0
# One thread by default: on a small machine whose cores are busy with other work, llama.cpp's
# threads spin at their barriers and a one-token step measured 3.5 s with two threads
# against 0.1 s with one (a 135M model gains little from a second thread anyway).
DEFAULT_THREADS = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class LlamaServer:
    """A running llama_cpp.server: its base URL, served model name and API key (if any)."""

    url: str
    model: str
    api_key: str | None
    log: Path

    @property
    def root(self) -> str:
        return self.url.removesuffix("/v1")


def _ready(url: str, api_key: str | None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/models", headers=headers),
                                    timeout=2) as resp:
            return bool(json.loads(resp.read()).get("data"))
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _warm_up(url: str, api_key: str | None) -> None:
    """The first completion pays for paging the weights in and allocating buffers (seconds
    on a busy CPU): pay it here, not in the first test's timing."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    body = json.dumps({"prompt": "Hello", "max_tokens": 1, "temperature": 0}).encode()
    with urllib.request.urlopen(urllib.request.Request(url + "/completions", body, headers),
                                timeout=START_TIMEOUT_S):
        pass


@contextlib.contextmanager
def start_llama_server(model_path: str | None = None, *, alias: str = MODEL_ALIAS,
                       api_key: str | None = None, threads: int = DEFAULT_THREADS,
                       n_ctx: int = 2048,
                       extra_args: Sequence[str] = ()) -> Iterator[LlamaServer]:
    """Start the server (SmolLM2 by default), wait until /v1/models answers, stop it after.

    ``extra_args`` go to the server as they are, e.g. ``("--kv_overrides",
    "tokenizer.ggml.add_bos_token=bool:true")`` to make the model start prompts with a BOS.
    """
    if model_path is None:
        from models.aliases import smollm2_gguf

        model_path = smollm2_gguf()
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model_path,
           "--model_alias", alias, "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--verbose", "False", *extra_args]
    if api_key:
        cmd += ["--api_key", api_key]
    log = Path(tempfile.mkstemp(prefix="llama-server-", suffix=".log")[1])
    url = f"http://127.0.0.1:{port}/v1"
    with log.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(url, api_key):
            if proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {proc.returncode}: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama_cpp.server did not answer within "
                                   f"{START_TIMEOUT_S:.0f} s (log: {log})")
            time.sleep(0.2)
        _warm_up(url, api_key)
        yield LlamaServer(url, alias, api_key, log)
        keep_log = False
    except BaseException:
        keep_log = True  # the server's log explains a failed start or test
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if not keep_log:
            log.unlink(missing_ok=True)


@pytest.fixture(scope="session")
def llama_server() -> Iterator[str]:
    """Base URL of a llama_cpp.server serving SmolLM2-135M as model ``smollm2``."""
    with start_llama_server() as server:
        yield server.url
