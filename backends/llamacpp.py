"""The llama.cpp backend (``llamacpp``): GGUF files on CPU through llama-cpp-python.

Inference goes through llama.cpp's own batch API: many sequences per ``llama_decode``, a
shared prompt prefix evaluated once into sequence 0 and attached to the other sequences with
``llama_memory_seq_cp`` (in a unified KV cache that shares the cells, it copies nothing),
and logits requested only at the positions a request needs. Embedding matrices are read
from the file with the ``gguf`` package and dequantised with numpy: no torch needed.
"""

from __future__ import annotations

import ctypes
import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness import paths
from harness.backend import (
    Backend,
    Capability,
    Fingerprint,
    GenerateRequest,
    GenerateResult,
    ProbeRequest,
    ProbeResult,
    ScoreRequest,
    ScoreResult,
)
from harness.errors import ModelLoadError
from harness.gguf_file import sha256_file
from harness.hookspecs import hookimpl
from harness.llamacpp_lib import LoadedModel, clear_errors, last_error
from harness.options import BackendOption
from harness.tokenizers.gguf import GGUFTokenizer

DEFAULT_CTX = 8192  # KV cells shared by all the sequences of one decode
MAX_SEQS = 64  # sequences per decode; 256 (llama.cpp's limit) measured 14 % slower here
MAX_OUTPUTS = 1024  # logits rows per decode: rows x vocab x 4 bytes is 1 GiB on Gemma 3


@hookimpl
def register_backends(register):
    register("llamacpp", LlamaCppBackend)


class _Batch:
    """A reusable ``llama_batch``: tokens, positions, one sequence id each, logits flags."""

    def __init__(self, lib: Any, capacity: int) -> None:
        self.lib = lib
        self.capacity = capacity
        self.raw = lib.llama_batch_init(capacity, 0, 1)
        self.token = np.ctypeslib.as_array(self.raw.token, shape=(capacity,))
        self.pos = np.ctypeslib.as_array(self.raw.pos, shape=(capacity,))
        self.n_seq = np.ctypeslib.as_array(self.raw.n_seq_id, shape=(capacity,))
        self.logits = np.ctypeslib.as_array(self.raw.logits, shape=(capacity,))
        self.seq = [self.raw.seq_id[i] for i in range(capacity)]
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, tokens: Sequence[int], start: int, seq: int, logits_at: Sequence[int] = ()
            ) -> None:
        """Tokens at positions ``start...`` of ``seq``; logits for the indices ``logits_at``
        of ``tokens``."""
        k, m = self.n, len(tokens)
        if k + m > self.capacity:
            raise RuntimeError(f"batch of {k + m} tokens over capacity {self.capacity}")
        self.token[k: k + m] = tokens
        self.pos[k: k + m] = np.arange(start, start + m)
        self.n_seq[k: k + m] = 1
        self.logits[k: k + m] = 0
        for j in range(k, k + m):
            self.seq[j][0] = seq
        for j in logits_at:
            self.logits[k + j] = 1
        self.n = k + m

    def free(self) -> None:
        self.lib.llama_batch_free(self.raw)


class LlamaCppBackend(Backend):
    """A GGUF model run by llama.cpp on CPU."""

    name = "llamacpp"
    capabilities = frozenset({Capability.VOCAB, Capability.EMBEDDINGS, Capability.SCORE,
                              Capability.GENERATE})
    load_options = (
        BackendOption("threads", int, None, "CPU threads (default: every core)"),
        BackendOption("n_ctx", int, DEFAULT_CTX,
                      "key/value cells shared by the sequences of a decode"),
        BackendOption("seqs", int, MAX_SEQS, "sequences decoded at once"),
    )

    def __init__(self, target: str, threads: int | None = None, n_ctx: int = DEFAULT_CTX,
                 seqs: int = MAX_SEQS) -> None:
        super().__init__(target)
        self.path = Path(target).expanduser()
        if self.path.suffix.lower() != ".gguf" and not self.path.is_file():
            raise ModelLoadError(f"the llamacpp backend loads .gguf files, not {target!r}")
        self._model = LoadedModel(self.path, vocab_only=False)
        lib = self.lib = self._model.lib
        self.tokenizer = GGUFTokenizer(self.path, model=self._model)
        self.threads = int(threads or os.cpu_count() or 1)
        self.n_ctx_train = int(lib.llama_model_n_ctx_train(self._model.ptr))
        self.n_ctx = int(min(n_ctx, self.n_ctx_train) if self.n_ctx_train > 0 else n_ctx)
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = self.n_ctx
        params.n_ubatch = min(512, self.n_ctx)
        params.n_seq_max = max(2, min(int(seqs), int(lib.llama_max_parallel_sequences())))
        params.kv_unified = True
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        clear_errors()
        self.ctx = lib.llama_init_from_model(self._model.ptr, params)
        if not self.ctx:
            self._model.free()
            raise ModelLoadError(f"llama.cpp cannot create a context for {self.path}: "
                                 f"{last_error()}")
        self.n_seqs = int(lib.llama_n_seq_max(self.ctx))
        self.mem = lib.llama_get_memory(self.ctx)
        self.n_vocab = self.tokenizer.n_tokens()
        self.batch = _Batch(lib, self.n_ctx)
        self._digest: str | None = None
        self._embeddings: dict[str, np.ndarray] = {}
        self._gguf: Any = None  # gguf.GGUFReader, opened when the embeddings are first read

    # --- identity and vocabulary ------------------------------------------------------------

    def _sha(self) -> str:
        if self._digest is None:
            self._digest = sha256_file(self.path)
        return self._digest

    @classmethod
    def offline_tokenizer(cls, target: str, meta: dict[str, Any]) -> GGUFTokenizer:
        """The GGUF file's tokenizer, loaded vocabulary-only."""
        path = Path(target).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        return GGUFTokenizer(path)

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, f"gguf-sha256:{self._sha()}", self._file_type(),
                           self.vocab().tokenizer_hash())

    def _file_type(self) -> str:
        """The quantisation named as llama.cpp does (Q4_1, Q4_K_M...): the run's dtype."""
        from gguf import LlamaFileType

        try:
            return LlamaFileType(int(self._model.meta("general.file_type") or "")).name \
                .removeprefix("MOSTLY_")
        except ValueError:
            return "gguf"

    def describe(self) -> dict[str, Any]:
        buf = ctypes.create_string_buffer(128)
        self.lib.llama_model_desc(self._model.ptr, buf, len(buf))
        return {
            "architecture": self._model.meta("general.architecture"),
            "description": buf.value.decode("utf-8", errors="replace"),
            "n_params": int(self.lib.llama_model_n_params(self._model.ptr)),
            "hidden_size": int(self.lib.llama_model_n_embd(self._model.ptr)),
            "embedding_rows": self.n_vocab,
            "tokenizer_size": self.n_vocab,
            "device": "cpu",
            "threads": self.threads,
            "n_ctx": self.n_ctx,
            "file_type": self._file_type(),
            "source": f"gguf-sha256:{self._sha()}",
        }

    def context_length(self) -> int:
        return self.n_ctx

    # --- embeddings, straight from the file ------------------------------------------------

    def _reader(self) -> Any:
        if self._gguf is None:
            from gguf import GGUFReader

            try:
                self._gguf = GGUFReader(str(self.path))
            except Exception as exc:  # llama.cpp loaded it, so this is unlikely
                raise ModelLoadError(f"cannot read the tensors of {self.path}: {exc}") from None
        return self._gguf

    def _tensor(self, name: str) -> np.ndarray | None:
        """A tensor dequantised to float32, cached as .npy under the user cache dir, keyed by
        the file's sha256: parsing a large vocabulary's GGUF metadata takes seconds."""
        if name in self._embeddings:
            return self._embeddings[name]
        cached = paths.cache_dir() / "llamacpp-tensors" / self._sha()[:32] / f"{name}.npy"
        absent = cached.with_suffix(".absent")
        if absent.exists():
            return None
        if not cached.exists():
            from gguf.quants import dequantize

            tensor = next((t for t in self._reader().tensors if t.name == name), None)
            cached.parent.mkdir(parents=True, exist_ok=True)
            if tensor is None:
                absent.touch()
                return None
            rows = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type),
                                        dtype=np.float32)
            tmp = cached.with_name(f".tmp-{os.getpid()}-{cached.name}")
            np.save(tmp, rows)
            tmp.replace(cached)
        self._embeddings[name] = np.load(cached)
        return self._embeddings[name]

    def input_embeddings(self) -> np.ndarray:
        emb = self._tensor("token_embd.weight")
        if emb is None:
            raise NotImplementedError(f"{self.path} has no token_embd.weight tensor")
        return emb

    def output_embeddings(self) -> np.ndarray:
        out = self._tensor("output.weight")
        return self.input_embeddings() if out is None else out

    def embeddings_tied(self) -> bool:
        return self._tensor("output.weight") is None

    # --- batched inference ------------------------------------------------------------------

    def _decode(self) -> np.ndarray:
        """Run the batch; return the logits rows it asked for, in batch order."""
        n_out = int(self.batch.logits[: self.batch.n].sum())
        self.batch.raw.n_tokens = self.batch.n
        rc = self.lib.llama_decode(self.ctx, self.batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}"
                               + (" (no room in the KV cache)" if rc == 1 else ""))
        if n_out == 0:
            return np.empty((0, self.n_vocab), dtype=np.float32)
        ptr = self.lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy()

    def _reset(self) -> None:
        self.lib.llama_memory_clear(self.mem, True)

    def _prefill_prefix(self, prefix: Sequence[int]) -> None:
        """The shared prefix into sequence 0, once for all the chunks that follow."""
        self._reset()
        for k in range(0, len(prefix), self.n_ctx):
            self.batch.clear()
            self.batch.add(prefix[k: k + self.n_ctx], k, 0)
            self._decode()

    def _chunks(self, idx: list[int], sizes: Sequence[int], budget: int,
                outputs: Sequence[int] | None = None) -> Iterator[list[int]]:
        """Consecutive groups of at most ``n_seqs - 1`` requests whose tokens fit ``budget``
        and whose logits rows (``outputs``, default one each) fit ``MAX_OUTPUTS``."""
        chunk: list[int] = []
        used = rows = 0
        for i in idx:
            need = 1 if outputs is None else outputs[i]
            if chunk and (len(chunk) >= self.n_seqs - 1 or used + sizes[i] > budget
                          or rows + need > MAX_OUTPUTS):
                yield chunk
                chunk, used, rows = [], 0, 0
            chunk.append(i)
            used += sizes[i]
            rows += need
        if chunk:
            yield chunk

    @staticmethod
    def _log_softmax(logits: np.ndarray) -> np.ndarray:
        logits = logits - logits.max(axis=1, keepdims=True)
        return logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        results = [ScoreResult() for _ in requests]
        good = []
        for i, req in enumerate(requests):
            if problem := req.problem(self.n_vocab):
                results[i].error = problem
            elif len(req.ids) > self.n_ctx:
                results[i].error = f"{len(req.ids)} tokens is longer than n_ctx {self.n_ctx}"
            else:
                good.append(i)
        sizes = [len(r.ids) for r in requests]
        outputs = [len(set(r.positions)) for r in requests]
        for chunk in self._chunks(good, sizes, self.n_ctx, outputs):
            try:
                self._reset()
                self.batch.clear()
                for s, i in enumerate(chunk):
                    req = requests[i]
                    self.batch.add(req.ids, 0, s, sorted({p - 1 for p in req.positions}))
                logp = self._decode()
                row = 0
                for i in chunk:
                    req = requests[i]
                    cols = sorted({p - 1 for p in req.positions})
                    at = {c: row + k for k, c in enumerate(cols)}
                    block = logp[row: row + len(cols)]
                    block = self._log_softmax(block)
                    results[i].logprobs = [float(block[at[p - 1] - row, t])
                                           for p, t in zip(req.positions, req.targets,
                                                           strict=True)]
                    row += len(cols)
            except Exception as exc:  # a failed decode fails each of its requests
                for i in chunk:
                    results[i].error = f"{type(exc).__name__}: {exc}"
        return results

    def probe(self, requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        """Per prefix: the prefix once into sequence 0, shared by up to 63 sequences per
        decode; then greedy steps for the sequences not yet decided, one token each."""
        results = [ProbeResult() for _ in requests]
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if problem := r.problem(self.n_vocab):
                results[i].error = problem
            else:
                groups[tuple(r.prefix)].append(i)
        for prefix, idx in groups.items():
            sizes = [len(r.ids) + r.steps for r in requests]
            try:
                self._prefill_prefix(prefix)
            except Exception as exc:
                for i in idx:
                    results[i] = ProbeResult(error=f"{type(exc).__name__}: {exc}")
                continue
            for chunk in self._chunks(idx, sizes, self.n_ctx - len(prefix)):
                try:
                    self._probe_chunk(len(prefix), [requests[i] for i in chunk],
                                      [results[i] for i in chunk])
                except Exception as exc:
                    for i in chunk:
                        results[i] = ProbeResult(error=f"{type(exc).__name__}: {exc}")
        return results

    def _attach_prefix(self, n_prefix: int, n: int) -> None:
        for s in range(1, n + 1):
            self.lib.llama_memory_seq_rm(self.mem, s, -1, -1)
            if n_prefix:
                self.lib.llama_memory_seq_cp(self.mem, 0, s, -1, -1)

    def _release(self, n: int) -> None:
        for s in range(1, n + 1):
            self.lib.llama_memory_seq_rm(self.mem, s, -1, -1)

    def _probe_chunk(self, n_prefix: int, reqs: list[ProbeRequest],
                     out: list[ProbeResult]) -> None:
        self._attach_prefix(n_prefix, len(reqs))
        try:
            targets = np.array([r.target for r in reqs])
            live = list(range(len(reqs)))
            start = [0] * len(reqs)
            checked = [i for i, r in enumerate(reqs) if r.checkpoint is not None]
            if checked:  # read the checkpoint, give up below it, go on from its cache
                self.batch.clear()
                for i in checked:
                    c = reqs[i].checkpoint
                    self.batch.add(reqs[i].ids[:c], n_prefix, i + 1, [c - 1])
                    start[i] = c
                logp = self._log_softmax(self._decode())
                p = np.exp(logp[np.arange(len(checked)), targets[checked]])
                for row, i in enumerate(checked):
                    if p[row] < reqs[i].give_up_below:
                        out[i].probs, out[i].gave_up = [float(p[row])], True
                live = [i for i in live if not out[i].gave_up]
            if not live:
                return
            self.batch.clear()
            for i in live:
                r = reqs[i]
                self.batch.add(r.ids[start[i]:], n_prefix + start[i], i + 1,
                               [len(r.ids) - start[i] - 1])
            pos = [n_prefix + len(r.ids) for r in reqs]
            step = 0
            while True:
                logp = self._log_softmax(self._decode())
                p = np.exp(logp[np.arange(len(live)), targets[live]])
                nxt = logp.argmax(axis=1)
                still = []
                for row, r in enumerate(live):
                    out[r].probs.append(float(p[row]))
                    out[r].ids.append(int(nxt[row]))
                    stop = reqs[r].stop_at if reqs[r].stop_at is not None else 2.0
                    if (p[row] < stop and reqs[r].steps > step + 1
                            and not self.tokenizer.is_eog(int(nxt[row]))):
                        still.append(r)
                step += 1
                if not still:
                    break
                self.batch.clear()
                for r in still:
                    self.batch.add([out[r].ids[-1]], pos[r], r + 1, [0])
                    pos[r] += 1
                live = still
        finally:
            self._release(len(reqs))

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        """Greedy continuations, many sequences per decode; a prefix that every request of a
        chunk shares is evaluated once."""
        results = [GenerateResult() for _ in requests]
        order = sorted(range(len(requests)), key=lambda i: list(requests[i].ids))
        sizes = [len(r.ids) + r.max_new_tokens for r in requests]
        too_long = {i for i in order if sizes[i] > self.n_ctx}
        for i in too_long:
            results[i].error = f"prompt and answer need {sizes[i]} tokens, over n_ctx {self.n_ctx}"
        for chunk in self._chunks([i for i in order if i not in too_long], sizes, self.n_ctx):
            try:
                self._generate_chunk([requests[i] for i in chunk], [results[i] for i in chunk])
            except Exception as exc:
                for i in chunk:
                    results[i] = GenerateResult(error=f"{type(exc).__name__}: {exc}")
        return results

    def _generate_chunk(self, reqs: list[GenerateRequest], out: list[GenerateResult]) -> None:
        shared = _common_prefix([list(r.ids) for r in reqs])
        shared = shared[: min(len(r.ids) for r in reqs) - 1] if shared else []
        self._prefill_prefix(shared)
        self._attach_prefix(len(shared), len(reqs))
        try:
            self.batch.clear()
            for s, r in enumerate(reqs, start=1):
                tail = list(r.ids)[len(shared):]
                self.batch.add(tail, len(shared), s, [len(tail) - 1])
            pos = [len(r.ids) for r in reqs]
            live = [i for i, r in enumerate(reqs) if r.max_new_tokens > 0]
            if live:
                first = self._decode().argmax(axis=1)  # one row per request, in order
                nxt = {i: int(first[i]) for i in live}
            while live:
                still = []
                for i in live:
                    if self.tokenizer.is_eog(nxt[i]):
                        continue
                    out[i].ids.append(nxt[i])
                    if len(out[i].ids) < reqs[i].max_new_tokens:
                        still.append(i)
                if not still:
                    break
                self.batch.clear()
                for i in still:
                    self.batch.add([nxt[i]], pos[i], i + 1, [0])
                    pos[i] += 1
                logits = self._decode()
                nxt = {i: int(logits[k].argmax()) for k, i in enumerate(still)}
                live = still
        finally:
            self._release(len(reqs))
        for r in out:
            r.text = self.decode(r.ids)

    def close(self) -> None:
        if getattr(self, "ctx", None):
            self.batch.free()
            self.lib.llama_free(self.ctx)
            self.ctx = None
            self._model.free()
            self.tokenizer = None  # its vocab was the model's
        self._embeddings.clear()
        self._gguf = None


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    if not seqs:
        return []
    first, last = min(seqs), max(seqs)  # the LCP of a set is the LCP of its extremes
    n = 0
    while n < min(len(first), len(last)) and first[n] == last[n]:
        n += 1
    return first[:n]
