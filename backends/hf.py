"""The Hugging Face transformers backend (``hf``): hub ids, local folders and GGUF files.

A GGUF file is dequantized by transformers once and cached as safetensors under the user
cache dir, keyed by the file's sha256, so the next load takes about a second.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import shutil
import tempfile
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from backends.gguf_file import check_gguf, sha256_file
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
from harness.errors import HarnessError, ModelLoadError
from harness.hookspecs import hookimpl
from harness.vocab import Vocab

DTYPES = ("auto", "float32", "bfloat16", "float16")
# Tokens per forward pass: large enough to keep the matrix units busy, small enough for the
# activations of a small model to stay in cache on a CPU.
CPU_BATCH_TOKENS = 4096
CUDA_BATCH_TOKENS = 65536
_SP_BYTE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@hookimpl
def register_backends(register):
    register("hf", HFBackend)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: printable stand-in character -> byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class HFBackend(Backend):
    """A causal LM loaded with transformers, on CUDA when present, else CPU."""

    name = "hf"
    capabilities = frozenset({Capability.VOCAB, Capability.EMBEDDINGS, Capability.SCORE,
                              Capability.GENERATE})

    def __init__(self, target: str, dtype: str = "auto", device: str = "auto",
                 batch_tokens: int | None = None, **options: Any) -> None:
        super().__init__(target, **options)
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
        self.device = device
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        self.dtype_name = dtype
        self.batch_tokens = int(batch_tokens or (
            CUDA_BATCH_TOKENS if device.startswith("cuda") else CPU_BATCH_TOKENS))
        self._vocab: Vocab | None = None
        self._prefix_caches: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._load(target)

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

        _quiet_transformers()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
            self.model = AutoModelForCausalLM.from_pretrained(
                where, dtype=getattr(self.torch, self.dtype_name), **kwargs)
        except (OSError, ValueError, KeyError, RuntimeError, ImportError) as exc:
            raise ModelLoadError(f"cannot load {what}: {_first_line(exc)}") from None
        self.model.to(self.device)
        self.model.eval()

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

    def _convert_gguf(self, path: Path, cached: Path) -> None:
        """Dequantize with transformers and save as safetensors (atomic: temp dir, rename)."""
        from safetensors.torch import save_model
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _quiet_transformers()
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(path.parent), gguf_file=path.name, dtype=self.torch.float32)
        except Exception as exc:  # transformers raises many types on unsupported GGUF files
            raise ModelLoadError(f"transformers cannot load {path}: {_first_line(exc)}") from None
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=cached.parent))
        try:
            save_model(model, str(tmp / "model.safetensors"))
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
        return {
            "architecture": type(self.model).__name__,
            "model_type": getattr(cfg, "model_type", None),
            "n_params": int(sum(p.numel() for p in self.model.parameters())),
            "hidden_size": getattr(cfg, "hidden_size", None),
            "embedding_rows": int(self.model.get_input_embeddings().weight.shape[0]),
            "tokenizer_size": len(self.tokenizer),
            "tied_embeddings": self.embeddings_tied(),
            "device": self.device,
            "dtype": self.dtype_name,
            "source": self._source,
        }

    def vocab(self) -> Vocab:
        if self._vocab is None:
            rows = int(self.model.get_input_embeddings().weight.shape[0])
            self._vocab = tokenizer_vocab(self.tokenizer, rows)
        return self._vocab

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            return [e.ids for e in backend.encode_batch(list(texts), add_special_tokens=False)]
        return super().encode_batch(texts)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, seqs: Sequence[Sequence[int]]) -> list[str]:
        if not seqs:
            return []
        return self.tokenizer.batch_decode([list(s) for s in seqs], skip_special_tokens=False)

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

    # --- batched inference ------------------------------------------------------------------

    def _pad_id(self) -> int:
        tok = self.tokenizer
        for candidate in (tok.pad_token_id, tok.eos_token_id, 0):
            if candidate is not None:
                return int(candidate)
        return 0

    def _logits_at(self, ids: Any, mask: Any, cols: list[int]) -> Any:
        """Logits at columns ``cols`` only: the LM head runs on no other position."""
        torch = self.torch
        wanted = sorted(set(cols))
        if "logits_to_keep" in self._forward_params():
            keep = torch.tensor(wanted, device=self.device)
            logits = self.model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
        else:
            logits = self.model(input_ids=ids, attention_mask=mask).logits[:, wanted]
        where = {c: k for k, c in enumerate(wanted)}
        return logits, torch.tensor([where[c] for c in cols], device=self.device)

    def _keep_last(self) -> dict[str, int]:
        return {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params() else {}

    def _forward_params(self) -> set[str]:
        if not hasattr(self, "_params"):
            import inspect

            self._params = set(inspect.signature(self.model.forward).parameters)
        return self._params

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        results = [ScoreResult() for _ in requests]
        good = []
        for i, req in enumerate(requests):
            results[i].error = req.problem()
            if results[i].error is None:
                good.append(i)
        # batches of similar length, so little of each pass is spent on padding
        good.sort(key=lambda i: len(requests[i].ids))
        batch: list[int] = []
        for i in good:
            if batch and (len(batch) + 1) * len(requests[i].ids) > self.batch_tokens:
                self._score_batch(requests, batch, results)
                batch = []
            batch.append(i)
        if batch:
            self._score_batch(requests, batch, results)
        return results

    def _score_batch(self, requests: Sequence[ScoreRequest], batch: list[int],
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
        try:
            with torch.inference_mode():
                logits, at = self._logits_at(ids.to(self.device), mask.to(self.device), cols)
                picked = logits[torch.tensor(rows, device=self.device), at].float()
                logp = torch.log_softmax(picked, dim=-1)
                values = logp[torch.arange(len(targets), device=self.device),
                              torch.tensor(targets, device=self.device)].cpu().tolist()
        except Exception as exc:  # a failed batch fails each of its items, none is dropped
            for i in batch:
                results[i].error = f"{type(exc).__name__}: {_first_line(exc)}"
            return
        k = 0
        for i in batch:
            n = len(requests[i].positions)
            results[i].logprobs = values[k: k + n]
            k += n

    def probe(self, requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        """Requests with the same prefix and length run together: the prefix once (its
        key/value cache copied to every row), then only the rows not yet decided decode
        further; the LM head runs on the last position only."""
        results = [ProbeResult() for _ in requests]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, r in enumerate(requests):
            groups[(tuple(r.prefix), len(r.ids))].append(i)
        for (prefix, length), idx in groups.items():
            per_row = len(prefix) + length + max(requests[i].steps for i in idx)
            size = max(1, self.batch_tokens // max(1, length + 1))
            size = min(size, max(1, 4 * self.batch_tokens // per_row))
            for k in range(0, len(idx), size):
                chunk = idx[k: k + size]
                try:
                    self._probe_split(prefix, [requests[i] for i in chunk],
                                      [results[i] for i in chunk])
                except Exception as exc:
                    for i in chunk:
                        results[i] = ProbeResult(error=f"{type(exc).__name__}: "
                                                       f"{_first_line(exc)}")
        return results

    def _probe_split(self, prefix: tuple[int, ...], reqs: list[ProbeRequest],
                     out: list[ProbeResult]) -> None:
        """Run a chunk; on a GPU out of memory, run its halves instead."""
        try:
            self._probe_chunk(prefix, reqs, out)
        except self.torch.cuda.OutOfMemoryError:
            if len(reqs) == 1:
                raise
            self.torch.cuda.empty_cache()
            half = len(reqs) // 2
            self._probe_split(prefix, reqs[:half], out[:half])
            self._probe_split(prefix, reqs[half:], out[half:])

    def _prefix_cache(self, prefix: tuple[int, ...]) -> Any:
        if prefix in self._prefix_caches:
            self._prefix_caches.move_to_end(prefix)
            return self._prefix_caches[prefix]
        torch = self.torch
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=self.device)
        cache = self.model(input_ids=ids, use_cache=True, **self._keep_last()).past_key_values
        self._prefix_caches[prefix] = cache
        while len(self._prefix_caches) > 8:
            self._prefix_caches.popitem(last=False)
        return cache

    def _probe_chunk(self, prefix: tuple[int, ...], reqs: list[ProbeRequest],
                     out: list[ProbeResult]) -> None:
        torch = self.torch
        n = len(reqs)
        dev = self.device
        with torch.inference_mode():
            past = None
            if prefix:
                past = copy.deepcopy(self._prefix_cache(prefix))
                past.batch_repeat_interleave(n)
            ids = torch.tensor([list(r.ids) for r in reqs], dtype=torch.long, device=dev)
            targets = torch.tensor([r.target for r in reqs], dtype=torch.long, device=dev)
            stop = torch.tensor([r.stop_at if r.stop_at is not None else 2.0 for r in reqs],
                                device=dev)
            steps = torch.tensor([r.steps for r in reqs], device=dev)
            eos = self.tokenizer.eos_token_id
            eos = -1 if eos is None else int(eos)
            rows = torch.arange(n, device=dev)  # which request each live row belongs to
            seen = len(prefix)
            probs: list[list[float]] = [[] for _ in reqs]
            greedy: list[list[int]] = [[] for _ in reqs]
            for step in range(int(steps.max())):
                mask = torch.ones((len(rows), seen + ids.shape[1]), dtype=torch.long,
                                  device=dev)
                res = self.model(input_ids=ids, attention_mask=mask, past_key_values=past,
                                 use_cache=True, **self._keep_last())
                past = res.past_key_values
                seen += ids.shape[1]
                logp = torch.log_softmax(res.logits[:, -1].float(), dim=-1)
                p = logp.gather(1, targets[rows, None]).squeeze(1).exp()
                nxt = logp.argmax(dim=-1)
                for r, pr, g in zip(rows.tolist(), p.tolist(), nxt.tolist(), strict=True):
                    probs[r].append(pr)
                    greedy[r].append(g)
                live = (p < stop[rows]) & (steps[rows] > step + 1) & (nxt != eos)
                if not bool(live.any()):
                    break
                if not bool(live.all()):
                    keep = live.nonzero().squeeze(1)
                    past.batch_select_indices(keep)
                    rows, nxt = rows[keep], nxt[keep]
                ids = nxt[:, None]
        for r, res_ in enumerate(out):
            res_.probs, res_.ids = probs[r], greedy[r]

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
            return [GenerateResult(error=f"{type(exc).__name__}: {_first_line(exc)}")
                    for _ in requests]
        eos = self.tokenizer.eos_token_id
        results = []
        for b, req in enumerate(requests):
            new = out[b, width:].tolist()[: req.max_new_tokens]
            if eos is not None and eos in new:
                new = new[: new.index(eos)]
            results.append(GenerateResult(ids=new, text=self.decode(new)))
        return results

    def close(self) -> None:
        self.model = None
        self._vocab = None
        self._prefix_caches.clear()


def tokenizer_vocab(tok: Any, n_rows: int | None = None) -> Vocab:
    """Every token's exact bytes from a transformers tokenizer (byte-level BPE or
    SentencePiece); rows ``n_rows`` past the tokenizer's size are padding."""
    n_tok = len(tok)
    n_rows = max(n_rows or 0, n_tok)
    pieces = tok.convert_ids_to_tokens(list(range(n_tok)))
    added = getattr(tok, "added_tokens_decoder", {})
    added_ids = {int(t) for t in added}
    special_ids = set(tok.all_special_ids) | {int(t) for t, a in added.items()
                                              if getattr(a, "special", False)}
    inv = _bytes_to_unicode() if _byte_level(tok) else None
    raw: list[bytes] = []
    byte_token = np.zeros(n_rows, dtype=bool)
    for i, piece in enumerate(pieces):
        piece = piece if piece is not None else ""
        if i in special_ids or i in added_ids:
            raw.append(piece.encode("utf-8"))
        elif inv is not None:
            try:
                raw.append(bytes(inv[c] for c in piece))
            except KeyError:  # a piece outside the byte alphabet: keep its UTF-8
                raw.append(piece.encode("utf-8"))
            byte_token[i] = len(raw[-1]) == 1 and raw[-1][0] >= 0x80
        elif m := _SP_BYTE.match(piece):
            raw.append(bytes([int(m.group(1), 16)]))
            byte_token[i] = True
        else:
            raw.append(piece.replace("\u2581", " ").encode("utf-8"))
    padding = np.zeros(n_rows, dtype=bool)
    padding[n_tok:] = True
    raw.extend(b"" for _ in range(n_rows - n_tok))
    special = np.zeros(n_rows, dtype=bool)
    special[[i for i in special_ids if i < n_rows]] = True
    text = [
        (pieces[i] if special[i] or i in added_ids else
         raw[i].decode("utf-8", errors="backslashreplace")) if i < n_tok else f"<row {i}>"
        for i in range(n_rows)
    ]
    return Vocab(raw=raw, text=text, special=special, byte_token=byte_token, padding=padding)


def _byte_level(tok: Any) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    raw = backend.decoder.__getstate__() if backend.decoder is not None else b"{}"
    decoder = json.loads(raw) or {}
    parts = decoder.get("decoders", [decoder]) if decoder else []
    return any(p.get("type") == "ByteLevel" for p in parts)


def _quiet_transformers() -> None:
    """No per-tensor progress bars or warnings from transformers under our rich display."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
