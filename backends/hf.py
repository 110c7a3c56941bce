"""The Hugging Face transformers backend (``hf``): hub ids, local folders and GGUF files.

A GGUF file is dequantized by transformers once and cached as safetensors under the user
cache dir, keyed by the file's sha256, so the next load takes about a second.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import paths
from harness.backend import (
    Backend,
    Capability,
    Differentiable,
    Fingerprint,
    GenerateRequest,
    GenerateResult,
    ProbeRequest,
    ProbeResult,
    ScoreRequest,
    ScoreResult,
)
from harness.errors import HarnessError, ModelLoadError, first_line
from harness.gguf_file import check_gguf, sha256_file
from harness.hookspecs import hookimpl
from harness.options import BackendOption
from harness.tokenizers import Tokenizer
from harness.tokenizers.hf import HFTokenizer, quiet_transformers
from harness.tokenizers.local import local_tokenizer

if TYPE_CHECKING:
    from backends.shared_prefix import SharedPrefix

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Tokens per forward pass: large enough to keep the matrix units busy, small enough for the
# activations of a small model to stay in cache on a CPU.
CPU_BATCH_TOKENS = 4096
CUDA_BATCH_TOKENS = 65536
VOCAB_MAJOR_ROWS = 256  # reads up to this many rows project weight-first
# A bf16 or fp16 body can put a probability on the other side of a probe's threshold than
# float32 does (SmolLM2 on an H200: token 32608 at 0.01001 in bf16, 0.00927 in float32).
# Probes that end within this factor of their threshold run again on the model loaded in
# float32, so that verdicts do not depend on the dtype.
NEAR_THRESHOLD = 2.0


@hookimpl
def register_backends(register):
    register("hf", HFBackend, default=True)


class HFBackend(Backend):
    """A causal LM loaded with transformers, on CUDA when present, else CPU."""

    name = "hf"
    capabilities = frozenset({Capability.VOCAB, Capability.EMBEDDINGS, Capability.SCORE,
                              Capability.GENERATE, Capability.GRADIENTS})
    load_options = (
        BackendOption("dtype", str, "auto", "auto, float32, bfloat16 or float16"),
        BackendOption("device", str, "auto", "auto (CUDA when present), cpu, cuda, cuda:1 ..."),
        BackendOption("batch_tokens", int, None,
                      "tokens per forward pass (default 4096 on CPU, from free memory on CUDA)"),
    )

    def __init__(self, target: str, dtype: str = "auto", device: str = "auto",
                 batch_tokens: int | None = None) -> None:
        super().__init__(target)
        try:
            import torch
            import transformers  # noqa: F401
        except ImportError as exc:
            raise HarnessError(f"the hf backend needs torch and transformers ({exc.name} is "
                               "missing): pip install 'glitch-harness[hf]'") from None
        if dtype not in DTYPES:
            raise HarnessError(f"unknown dtype {dtype!r} (choose from {', '.join(DTYPES)})")
        self.torch = torch
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise HarnessError(f"device {device!r}: torch sees no CUDA GPU here "
                               f"(torch {torch.__version__})")
        self.device = device
        bf16 = not device.startswith("cuda") or torch.cuda.is_bf16_supported()
        if dtype == "auto":
            dtype = ("bfloat16" if bf16 else "float16") if device.startswith("cuda") \
                else "float32"
        elif dtype == "bfloat16" and not bf16:
            raise HarnessError(f"{torch.cuda.get_device_name(device)} has no bfloat16: use "
                               "--dtype float16 or float32")
        self.dtype_name = dtype
        self.batch_tokens = int(batch_tokens or (
            CUDA_BATCH_TOKENS if device.startswith("cuda") else CPU_BATCH_TOKENS))
        self._prefix_caches: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._head32: tuple[Any, Any] | None = None
        self._memory_share = 0.6  # of the free GPU memory, for one pass; halved on OOM
        self._shared_prefix = False
        self._float32: HFBackend | None = None  # the float32 twin, loaded on first need
        self._load(target)
        self._check_head()
        self._shared_prefix = self._try_shared_prefix()

    @classmethod
    def offline_tokenizer(cls, target: str, meta: dict[str, Any]) -> Tokenizer:
        """The tokenizer of a GGUF file, model folder or cached hub model, no weights."""
        return local_tokenizer(target)

    # --- loading ----------------------------------------------------------------------------

    def _load(self, target: str) -> None:
        path = Path(target).expanduser()
        if path.suffix.lower() == ".gguf":
            self._load_gguf(path)
        elif path.is_dir():
            self._source = f"folder:{path.resolve()}#{_folder_digest(path)}"
            self._load_pretrained(str(path), what=f"model folder {path}")
        else:
            _check_hub_reachable(target)
            self._load_pretrained(target, what=f"{target!r} from the Hugging Face hub")
            revision = getattr(self.model.config, "_commit_hash", None) or "unknown-revision"
            self._source = f"hub:{target}@{revision}"

    def _load_pretrained(self, where: str, what: str, **kwargs: Any) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(where, **kwargs)
                self.model = AutoModelForCausalLM.from_pretrained(
                    where, dtype=getattr(self.torch, self.dtype_name), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise ModelLoadError(f"cannot load {what}: {first_line(exc)}") from None
        try:
            self.model.to(self.device)
        except (self.torch.cuda.OutOfMemoryError, RuntimeError) as exc:
            gb = sum(p.numel() * p.element_size() for p in self.model.parameters()) / 2**30
            self.model = None
            raise ModelLoadError(f"cannot put {what} ({gb:.1f} GiB of weights in "
                                 f"{self.dtype_name}) on {self.device}: "
                                 f"{first_line(exc)}") from None
        self.model.eval()
        self.tokenizer = HFTokenizer(tok, self._rows())

    def _load_gguf(self, path: Path) -> None:
        if not path.is_file():
            raise ModelLoadError(f"no GGUF file at {path}")
        digest = sha256_file(path)
        self._source = f"gguf-sha256:{digest}"
        cached = paths.cache_dir() / "hf-from-gguf" / digest[:32]
        if not (cached / "complete").exists():
            check_gguf(path)  # a file whose hash has a finished conversion is known intact
            self._convert_gguf(path, cached)
        self._load_pretrained(str(cached), what=f"cached conversion of {path} at {cached}")
        self._store_tied_under_input_name(cached / "model.safetensors")

    def _store_tied_under_input_name(self, file: Path) -> None:
        """Rewrite a conversion cached before tied embeddings were stored under the input
        embedding's name (see ``_weights_to_save``), once, so later loads skip the random
        fill."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        if not self.embeddings_tied():
            return
        wanted = _weight_name(self.model, self.model.get_input_embeddings())
        stored = _weight_name(self.model, self.model.get_output_embeddings())
        with safe_open(str(file), "pt") as f:
            names = set(f.keys())
        if wanted is None or wanted in names or stored not in names:
            return
        weights = load_file(str(file))
        weights[wanted] = weights.pop(stored)
        with contextlib.suppress(OSError):  # a read-only cache still loads, only slower
            _save_weights(weights, file)

    def _convert_gguf(self, path: Path, cached: Path) -> None:
        """Dequantize with transformers and save as safetensors (atomic: temp dir, rename)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            with quiet_transformers():
                tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
                model = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=self.torch.float32)
        except Exception as exc:  # transformers raises many types on unsupported GGUF files
            raise ModelLoadError(f"transformers cannot load {path}: {first_line(exc)}") from None
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
        try:
            _save_weights(_weights_to_save(model), tmp / "model.safetensors")
            config = model.config
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "source.json").write_text(json.dumps({"gguf": str(path)}))
            (tmp / "complete").touch()
            if cached.exists():
                shutil.rmtree(cached)
            tmp.rename(cached)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        del model

    # --- identity and vocabulary ------------------------------------------------------------

    def fingerprint(self) -> Fingerprint:
        return Fingerprint(self.name, self._source, self.dtype_name,
                           self.vocab().tokenizer_hash())

    def describe(self) -> dict[str, Any]:
        cfg = self.model.config
        info = {
            "architecture": type(self.model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "embedding_rows": int(self.model.get_input_embeddings().weight.shape[0]),
            "tokenizer_size": len(self.tokenizer.tok),
            "tied_embeddings": self.embeddings_tied(),
            "device": self.device,
            "dtype": self.dtype_name,
            "source": self._source,
        }
        if self.dtype_name != "float32":
            problem = self._float32_problem()
            info["near_threshold"] = (
                f"probes within {NEAR_THRESHOLD:g}x of their threshold run again in float32"
                if problem is None else f"kept in {self.dtype_name}: {problem}")
        return info

    def context_length(self) -> int | None:
        config = self.model.config
        text_config = getattr(config, "get_text_config", lambda: config)()
        for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
            value = getattr(text_config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    # --- white-box access -------------------------------------------------------------------

    def input_embeddings(self) -> np.ndarray:
        w = self.model.get_input_embeddings().weight
        return w.detach().to(self.torch.float32).cpu().numpy()

    def output_embeddings(self) -> np.ndarray:
        head = self.model.get_output_embeddings()
        if head is None:
            raise NotImplementedError("model has no output embeddings")
        if self.embeddings_tied():
            return self.input_embeddings()
        return head.weight.detach().to(self.torch.float32).cpu().numpy()

    def embeddings_tied(self) -> bool:
        head = self.model.get_output_embeddings()
        emb = self.model.get_input_embeddings()
        return head is not None and head.weight.data_ptr() == emb.weight.data_ptr()

    def differentiable(self) -> Differentiable:
        """The model as a differentiable function of its input embeddings (its own weights
        frozen): what ``harness.elicitation`` optimises prompts through."""
        return _HFDifferentiable(self)

    # --- batched inference ------------------------------------------------------------------
    #
    # Every pass runs the model's body (``model.base_model``) and projects only the positions
    # that are read, in float32 (``_logprobs``): on a bf16 model the verdicts near the 0.01
    # threshold must not depend on the dtype. Chunks are sized from the free GPU memory and
    # the model's key/value bytes per token; a chunk that still runs out of memory is split
    # in halves once the failed call's memory is released.

    def _pad_id(self) -> int:
        tok = self.tokenizer.tok
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def _rows(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    def _body(self, ids: Any, cache: Any = None, mask: Any = None, keep_cache: bool = False,
              shared: SharedPrefix | None = None) -> tuple[Any, Any]:
        """The model's final hidden states for ``ids`` (and its key/value cache): after
        ``cache``, or after the prefix ``shared`` holds once for every row."""
        if shared is not None:
            with shared.active():
                out = self.model.base_model(
                    input_ids=ids, use_cache=False,
                    position_ids=shared.positions(ids.shape[0], ids.shape[1], ids.device))
            return out.last_hidden_state, None
        out = self.model.base_model(input_ids=ids, attention_mask=mask, cache=cache,
                                    use_cache=keep_cache or cache is not None)
        return out.last_hidden_state, out.cache

    def _head(self) -> tuple[Any, Any]:
        """The output projection's weight and bias in float32 (the model's own tensors
        when it is float32, a float32 copy made once otherwise)."""
        if self._head32 is None:
            head = self.model.get_output_embeddings()
            if head is None:
                raise HarnessError("the model has no output embeddings to score with")
            bias = getattr(head, "bias", None)
            self._head32 = (head.weight.detach().float(),
                            None if bias is None else bias.detach().float())
        return self._head32

    def _logits(self, hidden: Any, rows: slice = slice(None), vocab_major: bool = False) -> Any:
        """Float32 logits (of the vocabulary rows ``rows``) from final hidden states: shaped
        (..., rows), or (rows, positions) with ``vocab_major`` (``hidden`` then (positions, d))."""
        weight, bias = self._head()
        if vocab_major:
            # The weight as stored times the few positions: ``hidden @ weight.T`` makes a CPU's
            # BLAS repack the whole block of the weight on every call, which for a few rows
            # (greedy steps, a cascade's last tokens) costs 1.5-3.5x the product itself.
            logits = weight[rows] @ hidden.float().T
            if bias is not None:
                logits = logits + bias[rows, None]
        else:
            logits = hidden.float() @ weight[rows].T
            if bias is not None:
                logits = logits + bias[rows]
        cfg = self.model.config
        cap = getattr(getattr(cfg, "get_text_config", lambda: cfg)(),
                      "final_logit_softcapping", None)
        if cap:
            logits = self.torch.tanh(logits / cap) * cap
        return logits

    def _logprobs(self, hidden: Any) -> Any:
        """Float32 log-probabilities of the next token from final hidden states (rows, d)."""
        return self.torch.log_softmax(self._logits(hidden), dim=-1)

    def _read(self, hidden: Any, targets: Any) -> tuple[Any, Any]:
        """Each row's log-probability of its target and its greedy token, without holding
        the whole vocabulary's logits at once: the projection runs a block of vocabulary
        rows at a time (on Gemma 3's 262,144 rows that halves the time), keeping a running
        log-sum-exp and argmax."""
        torch = self.torch
        n, size = hidden.shape[0], self._rows()
        # about 16 MB of logits per block on a CPU (cache-sized), 256 MB on a GPU
        cells = 1 << (26 if hidden.device.type == "cuda" else 22)
        block = max(1024, cells // max(1, n))
        top = torch.full((n,), float("-inf"), device=hidden.device)
        total = torch.zeros(n, device=hidden.device)
        best = torch.zeros(n, dtype=torch.long, device=hidden.device)
        own = torch.empty(n, device=hidden.device)
        # weight-first for a few rows (``_logits``); for many, the reductions along the
        # vocabulary in that layout cost more than the product saves (2,048 rows: 1.3x)
        major = n <= VOCAB_MAJOR_ROWS
        ax = 0 if major else 1
        for start in range(0, size, block):
            logits = self._logits(hidden, slice(start, start + block), vocab_major=major)
            value, index = logits.max(dim=ax)
            higher = value > top
            best = torch.where(higher, index + start, best)
            new_top = torch.maximum(top, value)
            total = total * torch.exp(top - new_top) + torch.exp(
                logits - new_top.unsqueeze(ax)).sum(dim=ax)
            top = new_top
            width = logits.shape[ax]
            mine = (targets >= start) & (targets < start + width)
            own = torch.where(mine, logits.gather(
                ax, (targets - start).clamp(0, width - 1).unsqueeze(ax)).squeeze(ax), own)
        return own - top - torch.log(total), best

    def _check_head(self) -> None:
        """The float32 projection must give the model's own next-token distribution; a
        model that transforms its logits in a way ``_logprobs`` does not know is refused."""
        torch = self.torch
        ids = torch.tensor([self.bos_ids() + self.encode(" The quick brown fox")],
                           device=self.device)
        with torch.inference_mode():
            own = torch.log_softmax(self.model(input_ids=ids).logits[0].float(), dim=-1)
            ours = self._logprobs(self._body(ids)[0][0])
        diff = float((own - ours).abs().max())
        if diff > (1e-3 if self.dtype_name == "float32" else 0.5):
            raise ModelLoadError(f"{type(self.model).__name__} computes its logits in a way "
                                 f"the hf backend does not reproduce (log-probabilities "
                                 f"differ by {diff:.3g})")

    def _try_shared_prefix(self) -> bool:
        """Use the shared-prefix attention where the model takes it and it gives what the
        plain key/value cache gives (checked on two short probes)."""
        from backends.shared_prefix import install

        if not install(self.model):
            return False
        prefix = tuple(self.bos_ids() + self.encode("Repeat after me, exactly:"))
        tail = self.encode(" the cat sat")
        reqs = [ProbeRequest(tail, t, steps=2, prefix=prefix) for t in tail[:2]]
        plain = HFBackend.probe(self, reqs)  # this class's own path, not a subclass's
        self._shared_prefix = True
        shared = HFBackend.probe(self, reqs)
        self._shared_prefix = False
        tol = 1e-3 if self.dtype_name == "float32" else 5e-2
        if all(a.error is None and b.error is None and a.ids == b.ids
               and np.allclose(a.probs, b.probs, rtol=tol, atol=1e-6)
               for a, b in zip(plain, shared, strict=True)):
            return True
        self.model.set_attn_implementation("sdpa")
        return False

    def chunk_rows(self, new_tokens: int, context: int, reads: int = 1) -> int:
        """Sequences per forward pass: ``new_tokens`` each, attending to ``context`` cached
        ones, with ``reads`` positions projected onto the vocabulary."""
        if not self.device.startswith("cuda"):
            return max(1, self.batch_tokens // max(1, new_tokens))
        free, _ = self.torch.cuda.mem_get_info(self.device)
        return chunk_rows(self.model.config, free * self._memory_share, self._dtype_bytes(),
                          new_tokens, context, reads, self._rows(), self.batch_tokens)

    def _dtype_bytes(self) -> int:
        return 4 if self.dtype_name == "float32" else 2

    def _split_on_oom(self, run: Callable[[list[int]], None], items: list[int]) -> None:
        """``run(items)``; on CUDA out of memory, the halves, each the same way.

        The split happens after the ``except`` block: inside it, the exception's traceback
        keeps the failed call's key/value cache and activations alive, and the halves would
        run out of memory again. Later chunks are sized smaller too.
        """
        try:
            run(items)
            return
        except self.torch.cuda.OutOfMemoryError:
            if len(items) == 1:
                raise
        self._memory_share = max(0.05, self._memory_share / 2)
        self.torch.cuda.empty_cache()
        half = len(items) // 2
        self._split_on_oom(run, items[:half])
        self._split_on_oom(run, items[half:])

    def _run_chunks(self, chunks: list[list[int]], run: Callable[[list[int]], None],
                    fail: Callable[[int, str], None]) -> None:
        """Run each chunk (split on out of memory); a chunk that fails fails each of its
        items with the reason, none is dropped."""
        for chunk in chunks:
            try:
                self._split_on_oom(run, chunk)
            except Exception as exc:
                for i in chunk:
                    fail(i, f"{type(exc).__name__}: {first_line(exc)}")

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        results = [ScoreResult() for _ in requests]
        good = []
        for i, req in enumerate(requests):
            results[i].error = req.problem(self._rows())
            if results[i].error is None:
                good.append(i)
        # batches of similar length, so little of each pass is spent on padding
        good.sort(key=lambda i: len(requests[i].ids))
        chunks: list[list[int]] = []
        for i in good:
            n = len(requests[i].ids)
            if chunks and len(chunks[-1]) >= self.chunk_rows(n, 0, len(requests[i].positions)):
                chunks.append([])
            if not chunks:
                chunks.append([])
            chunks[-1].append(i)

        def fail(i: int, reason: str) -> None:
            results[i].error = reason

        self._run_chunks(chunks, lambda c: self._score_chunk(requests, c, results), fail)
        return results

    def _score_chunk(self, requests: Sequence[ScoreRequest], batch: list[int],
                     results: list[ScoreResult]) -> None:
        torch = self.torch
        width = max(len(requests[i].ids) for i in batch)
        ids = torch.full((len(batch), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, i in enumerate(batch):
            req = requests[i]
            ids[b, : len(req.ids)] = torch.tensor(list(req.ids), dtype=torch.long)
            mask[b, : len(req.ids)] = 1
            for p, t in zip(req.positions, req.targets, strict=True):
                rows.append(b)
                cols.append(p - 1)
                targets.append(t)
        dev = self.device
        with torch.inference_mode():
            hidden, _ = self._body(ids.to(dev), mask=None if bool(mask.all()) else mask.to(dev))
            at = hidden[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]
            values = self._read(at, torch.tensor(targets, device=dev))[0].cpu().tolist()
        k = 0
        for i in batch:
            n = len(requests[i].positions)
            results[i].logprobs = values[k: k + n]
            k += n

    def probe(self, requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        """Requests with the same prefix and length run together: the prefix once (its
        key/value cache copied to every row), then only the rows not yet decided decode
        further; only the last position is projected onto the vocabulary."""
        results = [ProbeResult() for _ in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            if problem := r.problem(self._rows()):
                results[i].error = problem
            else:
                groups[(tuple(r.prefix), len(r.ids), r.checkpoint)].append(i)

        def fail(i: int, reason: str) -> None:
            results[i] = ProbeResult(error=reason)

        for (prefix, length, _), idx in groups.items():
            steps = max(requests[i].steps for i in idx)
            size = self.chunk_rows(length + steps, len(prefix) + length + steps)
            chunks = [idx[k: k + size] for k in range(0, len(idx), size)]
            self._run_chunks(chunks, lambda c, p=prefix: self._probe_chunk(
                p, [requests[i] for i in c], [results[i] for i in c]), fail)
        if self.dtype_name != "float32":
            self._recheck_near_threshold(requests, results)
        return results

    def _recheck_near_threshold(self, requests: Sequence[ProbeRequest],
                                results: list[ProbeResult]) -> None:
        """Probes whose highest probability ended within ``NEAR_THRESHOLD`` of their
        ``stop_at`` again, in float32 (where the twin fits; otherwise as they are)."""
        near = [i for i, (q, r) in enumerate(zip(requests, results, strict=True))
                if q.stop_at and r.error is None and not r.gave_up
                and q.stop_at / NEAR_THRESHOLD <= r.max_prob < q.stop_at * NEAR_THRESHOLD]
        if not near or (twin := self.float32_twin()) is None:
            return
        for i, res in zip(near, twin.probe([requests[i] for i in near]), strict=True):
            if res.error is None:
                results[i] = res

    def float32_twin(self) -> HFBackend | None:
        """The same model loaded in float32 on the same device (once, when first asked), or
        None where it would not fit (``describe()`` says why)."""
        if self._float32 is None and self._float32_problem() is None:
            self._float32 = HFBackend(self.target, dtype="float32", device=self.device,
                                      batch_tokens=self.batch_tokens)
        return self._float32

    def _float32_problem(self) -> str | None:
        """Why this model's float32 twin cannot be loaded beside it, or None."""
        if self._float32 is not None or not self.device.startswith("cuda"):
            return None
        need = 4 * sum(p.numel() for p in self.model.parameters())
        free, _ = self.torch.cuda.mem_get_info(self.device)
        if need > 0.5 * free:
            return (f"its float32 weights ({need / 2**30:.1f} GiB) would take more than half "
                    f"the free GPU memory ({free / 2**30:.1f} GiB)")
        return None

    def _prefix_cache(self, prefix: tuple[int, ...]) -> Any:
        """The key/value cache of ``prefix``, one row, computed once (the 8 latest kept)."""
        if prefix in self._prefix_caches:
            self._prefix_caches.move_to_end(prefix)
        else:
            ids = self.torch.tensor([list(prefix)], dtype=self.torch.long, device=self.device)
            self._prefix_caches[prefix] = self._body(ids, keep_cache=True)[1]
            while len(self._prefix_caches) > 8:
                self._prefix_caches.popitem(last=False)
        return self._prefix_caches[prefix]

    def _after_prefix(self, prefix: tuple[int, ...], rows: int, tail: int
                      ) -> tuple[Any, Any]:
        """What the rows of a chunk (``tail`` new tokens each) continue from: ``(cache,
        shared)``, one of them set (or neither, for an empty prefix). The shared-prefix
        attention keeps the prefix once; otherwise the cache is copied to every row."""
        if not prefix:
            return None, None
        if self._shared_prefix and len(prefix) >= tail:
            # long tails are faster through sdpa; a short prefix costs little to copy
            from backends.shared_prefix import SharedPrefix

            return None, SharedPrefix(self._prefix_cache(prefix), len(prefix))
        cache = copy.deepcopy(self._prefix_cache(prefix))
        cache.batch_repeat_interleave(rows)
        return cache, None

    def _probe_chunk(self, prefix: tuple[int, ...], reqs: list[ProbeRequest],
                     out: list[ProbeResult]) -> None:
        """Greedy steps on device: probabilities and tokens collect in device tensors and
        reach the host once. On a CPU, decided rows leave the batch (at the checkpoint and
        between steps); on a GPU every row runs to the end (finding the decided rows would
        wait on the device) and what a decided row computes afterwards is not recorded."""
        torch = self.torch
        n = len(reqs)
        dev = self.device
        on_cpu = not dev.startswith("cuda")
        eos = self.tokenizer.tok.eos_token_id
        eos = -1 if eos is None else int(eos)
        n_steps = max(r.steps for r in reqs)
        checkpoint = reqs[0].checkpoint  # a chunk shares its length and checkpoint
        with torch.inference_mode():
            cache, shared = self._after_prefix(prefix, n, len(reqs[0].ids))
            ids = torch.tensor([list(r.ids) for r in reqs], dtype=torch.long, device=dev)
            targets = torch.tensor([r.target for r in reqs], dtype=torch.long, device=dev)
            stop = torch.tensor([r.stop_at if r.stop_at is not None else 2.0 for r in reqs],
                                device=dev)
            steps = torch.tensor([r.steps for r in reqs], device=dev)
            probs = torch.full((n, n_steps), float("nan"), device=dev)
            greedy = torch.full((n, n_steps), -1, dtype=torch.long, device=dev)
            live = torch.ones(n, dtype=torch.bool, device=dev)
            gave_up = torch.zeros(n, dtype=torch.bool, device=dev)
            rows = torch.arange(n, device=dev)  # which request each row of the batch is

            def drop() -> bool:
                """Leave out the rows that are decided; False when none is left."""
                nonlocal rows, ids, cache
                keep = live[rows].nonzero().squeeze(1)
                if len(keep) < len(rows):
                    if shared is not None:
                        shared.select(keep)
                    elif cache is not None:
                        cache.batch_select_indices(keep)
                    rows, ids = rows[keep], ids[keep]
                return len(keep) > 0

            if checkpoint is not None:
                hidden, cache = self._body(ids[:, :checkpoint], cache, keep_cache=True,
                                           shared=shared)
                p = self._read(hidden[:, -1], targets)[0].exp()
                give = torch.tensor([r.give_up_below for r in reqs], device=dev)
                gave_up = p < give
                probs[:, 0] = torch.where(gave_up, p, probs[:, 0])
                live &= ~gave_up
                ids = ids[:, checkpoint:]
                if on_cpu and not drop():
                    n_steps = 0
            for step in range(n_steps):
                hidden, cache = self._body(ids, cache, keep_cache=True, shared=shared)
                logp, nxt = self._read(hidden[:, -1], targets[rows])
                p = logp.exp()
                was = live[rows]
                probs[rows, step] = torch.where(was, p, probs[rows, step])
                greedy[rows, step] = torch.where(was, nxt, greedy[rows, step])
                live[rows] = was & (p < stop[rows]) & (steps[rows] > step + 1) & (nxt != eos)
                if step + 1 == n_steps:
                    break
                ids = nxt[:, None]
                if on_cpu and not drop():
                    break
            probs, greedy = probs.cpu().numpy(), greedy.cpu().numpy()
            gave_up = gave_up.cpu().numpy()
        for r, res in enumerate(out):
            if gave_up[r]:
                res.probs, res.ids, res.gave_up = [float(probs[r, 0])], [], True
                continue
            seen = greedy[r] >= 0
            res.probs, res.ids = probs[r][seen].tolist(), greedy[r][seen].tolist()

    def generate(self, requests: Sequence[GenerateRequest]) -> list[GenerateResult]:
        torch = self.torch
        if not requests:
            return []
        pad = self._pad_id()
        width = max(len(r.ids) for r in requests)
        ids = torch.full((len(requests), width), pad, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for b, req in enumerate(requests):  # left padding, as generation needs
            ids[b, width - len(req.ids):] = torch.tensor(list(req.ids), dtype=torch.long)
            mask[b, width - len(req.ids):] = 1
        max_new = max(r.max_new_tokens for r in requests)
        try:
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids.to(self.device),
                                          attention_mask=mask.to(self.device),
                                          max_new_tokens=max_new, do_sample=False,
                                          pad_token_id=pad)
        except Exception as exc:
            return [GenerateResult(error=f"{type(exc).__name__}: {first_line(exc)}")
                    for _ in requests]
        eos = self.tokenizer.tok.eos_token_id
        results = []
        for b, req in enumerate(requests):
            new = out[b, width:].tolist()[: req.max_new_tokens]
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            results.append(GenerateResult(ids=new, text=self.decode(new)))
        return results

    def close(self) -> None:
        if self._float32 is not None:
            self._float32.close()
            self._float32 = None
        self.model = None
        self.tokenizer = None
        self._prefix_caches.clear()


class _HFDifferentiable(Differentiable):
    """``HFBackend.differentiable()``: the body fed ``inputs_embeds``, the float32 head.

    A model that scales its embeddings inside the embedding layer (Gemma: by the square
    root of the width) gets them here scaled, as its body reads them."""

    def __init__(self, backend: HFBackend) -> None:
        self.backend = backend
        model = backend.model
        model.requires_grad_(False)  # gradients flow to the prompt, never into the weights
        layer = model.get_input_embeddings()
        weight = layer.weight.detach()
        scale = getattr(layer, "embed_scale", None)
        if scale is not None:
            weight = weight.float() * float(scale)
        self.embeddings = weight.float()
        self.device = backend.device
        self.dtype = next(model.parameters()).dtype

    def hidden(self, embeds: Any) -> Any:
        out = self.backend.model.base_model(inputs_embeds=embeds.to(self.dtype), use_cache=False)
        return out.last_hidden_state

    def hidden_and_state(self, embeds: Any) -> tuple[Any, Any]:
        """``hidden`` and every layer's keys and values (detached) of ``embeds``."""
        out = self.backend.model.base_model(inputs_embeds=embeds.to(self.dtype), use_cache=True)
        return out.last_hidden_state, [(layer.keys.detach(), layer.values.detach())
                                       for layer in out.cache.layers]

    def hidden_after(self, state: Any, rows: Any, length: int, embeds: Any) -> Any:
        """``embeds`` read after a copy of the cached prefix, cut to ``length`` positions."""
        from transformers import DynamicCache

        torch = self.backend.torch
        cache = DynamicCache(ddp_cache_data=[(k[rows, :, :length], v[rows, :, :length])
                                             for k, v in state],
                             config=self.backend.model.config)
        n, t = embeds.shape[:2]
        positions = torch.arange(length, length + t, device=embeds.device).expand(n, t)
        out = self.backend.model.base_model(inputs_embeds=embeds.to(self.dtype), cache=cache,
                                            position_ids=positions, use_cache=True)
        return out.last_hidden_state

    def logits(self, hidden: Any) -> Any:
        return self.backend._logits(hidden)


def chunk_rows(config: Any, budget: float, dtype_bytes: int, new_tokens: int, context: int,
               reads: int, vocab_rows: int, max_tokens: int) -> int:
    """How many sequences fit one forward pass in ``budget`` bytes of GPU memory.

    Per sequence: the key/value cache of ``context`` positions (GPT-J's is about 12 times
    GPT-2's per position), the attention scores and one layer's activations for
    ``new_tokens``, and the float32 logits of ``reads`` positions; at most ``max_tokens``
    new tokens in all.
    """
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = cfg.num_hidden_layers
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    inner = (getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None)
             or 4 * hidden)
    kv = 2 * layers * kv_heads * head_dim * dtype_bytes * context
    activations = new_tokens * (6 * hidden + 3 * inner + heads * context) * dtype_bytes
    logits = reads * vocab_rows * 4 * 3  # logits, log-softmax and a temporary, float32
    rows = int(budget // (kv + activations + logits))
    return max(1, min(rows, max(1, max_tokens // max(1, new_tokens))))


def _check_hub_reachable(repo_id: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, when a hub model is neither cached nor downloadable.

    Without this, huggingface_hub retries for about a minute and logs every retry.
    """
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import logging as hub_logging

    hub_logging.set_verbosity_error()
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):
        return
    if constants.HF_HUB_OFFLINE:
        raise ModelLoadError(f"{repo_id!r} is not in the local Hugging Face cache and "
                             "HF_HUB_OFFLINE is set")
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
    except OSError as exc:
        raise ModelLoadError(
            f"cannot download {repo_id!r}: the Hugging Face hub ({url.hostname}) is "
            f"unreachable ({exc.strerror or exc}) and the model is not in the local cache"
        ) from None


def _weights_to_save(model: Any) -> dict[str, Any]:
    """The model's tensors by name, each once. Where names share one tensor (tied input and
    output embeddings) the input embedding's name is kept: transformers loads a tied pair
    from that name, and given only the head's it first fills the embedding with random
    numbers at every load (2 s on Gemma 3's 262,144 rows)."""
    state = model.state_dict()
    first = _weight_name(model, model.get_input_embeddings())
    out: dict[str, Any] = {}
    seen: set[tuple] = set()
    for name in sorted(state, key=lambda n: n != first):
        t = state[name]
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.numel() and key in seen:
            continue
        seen.add(key)
        out[name] = t.contiguous()
    return out


def _weight_name(model: Any, module: Any) -> str | None:
    return next((f"{n}.weight" for n, m in model.named_modules() if m is module), None)


def _save_weights(weights: dict[str, Any], file: Path) -> None:
    """Write safetensors atomically: a temporary file of this call's own (processes sharing
    a scan may load the same cache at once), renamed over ``file``."""
    from safetensors.torch import save_file

    fd, name = tempfile.mkstemp(prefix=f".tmp-{file.name}-", dir=file.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        save_file(weights, str(tmp), metadata={"format": "pt"})
        tmp.replace(file)
    finally:
        tmp.unlink(missing_ok=True)


def _folder_digest(path: Path) -> str:
    """Identity of a local model folder: its config and tokenizer files, and each weight
    file's name, size and first MiB (hashing many GB of weights would take minutes)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        h.update(f.name.encode())
        if f.suffix in (".json", ".txt", ".model", ".jinja"):
            h.update(f.read_bytes())
        elif f.suffix in (".safetensors", ".bin", ".pt", ".gguf"):
            h.update(str(f.stat().st_size).encode())
            with f.open("rb") as fh:
                h.update(fh.read(1 << 20))
    return h.hexdigest()[:32]
