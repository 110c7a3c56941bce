"""Full-vocabulary speed of `repeat-probe` with the `verify-3` probe set on a GPT-2-small model.

The model is GPT-2 small built from `GPT2Config()` (124M parameters, 50,257 rows, 1,024
positions, tied embeddings) with random weights (`torch.manual_seed(0)`), saved in a temporary
folder with a byte-level BPE tokenizer trained here on the verify-3 templates and some English
(no hub access needed; `--tokenizer` takes a saved tokenizer folder instead), and loaded
through the `hf` backend: bf16 on CUDA, float32 on CPU. The token ids probed are the model's,
0..50,256, whatever the tokenizer's size. A random model gives no token a probability near the
0.01 threshold, so nothing stops early: every token runs all three prompts for all three
greedy steps, the detector's worst case (the script counts the steps run and says so).

Measured, after a warm-up:

- the detector as a scan runs it (`det.run` over the token ids, findings collected), prefix
  caches cleared first so that computing them is included: wall time and tokens/s;
- unless `--no-breakdown`, a second, instrumented run with the device synchronised at every
  boundary: per prompt, the time in `backend.probe` split into the shared-prefix forward, the
  copy of its key/value cache to every row, model forwards on the prompt tails, the one-token
  decode forwards, and the rest (logits, host syncs, Python per row); and the detector's
  Python outside `probe` (requests, the re-encoding check, decoding completions, findings);
- with `--baseline`, a plain batched pass on the same tokens: for every token each of the three
  prompts in full (nothing shared, no key/value cache), right-padded batches of up to
  `batch_tokens` tokens through `model(...)` with logits at every position, three greedy steps
  each re-running the whole sequence, no early stopping; with the ratio of the two times and
  how far their scores and verdicts agree;
- with `--profile N`, a `torch.profiler` table of the top operators over N tokens.

    python benchmarks/verify3_gpu.py                # CUDA, bf16, all 50,257 tokens
    python benchmarks/verify3_gpu.py --baseline     # the same, and the plain batched pass
    python benchmarks/verify3_gpu.py --device cpu --vocab-limit 300 --layers 2   # smoke run

Writes benchmarks/results/verify3_gpu.json (`--out`) and prints a summary.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import tempfile
import time
import types
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

import backends.hf as hf_module
from backends.hf import HFBackend
from detectors.repeat_probe import RepeatProbe
from harness.backend import ProbeRequest, ProbeResult
from harness.detector import Finding, ScanContext
from harness.probe_sets import PromptPlan
from harness.verdicts import GLITCH
from harness.vocab import analyze
from probes import VERIFY_3

ROOT = Path(__file__).resolve().parents[1]
EOS = "<|endoftext|>"
TOKENIZER_SIZE = 1000  # at most: training stops when the corpus has no more merges
WARMUP_TOKENS = 8  # the detector's warm-up; the plain pass warms up on 2
ENGLISH = (
    "The quick brown fox jumps over the lazy dog.",
    "Please repeat the string back to me, exactly as it was written.",
    "Glitch tokens are tokens that a language model barely saw during its training.",
    "What does this word mean? It has no meaning that I know of, said the assistant.",
    "The device repeats its input exactly; the output is always identical to the input.",
    "Below, the same phrase is simply repeated over and over again, twenty times or more.",
)
FILLERS = (" cat", " dog", "Magikarp", "42", " the", "ing", "é", "数")
SECTIONS = ("prefix", "kv_copy", "kv_select", "forward_prompt", "forward_decode")


# --- the model ----------------------------------------------------------------------------


def tokenizer_corpus() -> list[str]:
    """English sentences and the verify-3 templates with a few different fillers."""
    texts = list(ENGLISH)
    for k, template in enumerate(VERIFY_3.templates):
        body = template.replace("{repeat}", "")
        for j in range(len(FILLERS)):
            texts.append(body.replace("{token}", FILLERS[(j + k) % len(FILLERS)]))
    return texts * 4


def build_model(folder: Path, layers: int, tokenizer: str | None) -> dict[str, Any]:
    """Save GPT-2 small (``layers`` blocks) with random weights and a tokenizer in ``folder``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import (
        AutoTokenizer,
        GPT2Config,
        GPT2LMHeadModel,
        PreTrainedTokenizerFast,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
        source = tokenizer
    else:
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(tokenizer_corpus(), vocab_size=TOKENIZER_SIZE, min_frequency=1,
                                special_tokens=[EOS], show_progress=False)
        tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS,
                                      bos_token=EOS, unk_token=EOS)
        source = f"byte-level BPE trained here ({len(tok)} tokens)"
    tok.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=layers)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return {"config": f"GPT2Config(n_layer={layers})", "layers": layers,
            "n_embd": config.n_embd, "n_positions": config.n_positions,
            "vocab_rows": config.vocab_size, "tokenizer": source, "tokenizer_size": len(tok)}


def pick_tokens(rows: int, limit: int | None) -> np.ndarray:
    """Every id, or ``limit`` ids spread evenly over the vocabulary (both ends included)."""
    if limit is None or limit >= rows:
        return np.arange(rows)
    return np.unique(np.linspace(0, rows - 1, max(1, limit)).round().astype(np.int64))


# --- timing -------------------------------------------------------------------------------


class Timers:
    """Seconds and counts per (prompt label, section); the device is synchronised at every
    boundary so that queued GPU work is charged to the section that queued it."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.counts: Counter[tuple[str, str]] = Counter()
        self.label = "-"
        self.in_prefix = False
        self._forward_start = 0.0

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[(self.label, name)] += time.perf_counter() - start

    def wrap(self, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.section(name):
                return fn(*args, **kwargs)

        return timed

    def total(self, name: str, label: str | None = None) -> float:
        return sum(s for (lab, sec), s in self.seconds.items()
                   if sec == name and (label is None or lab == label))


def count_work(counts: Counter[tuple[str, str]], label: str, requests: Sequence[ProbeRequest],
               results: Sequence[ProbeResult]) -> None:
    counts[(label, "requests")] += len(requests)
    counts[(label, "steps")] += sum(len(r.probs) for r in results)
    counts[(label, "errors")] += sum(r.error is not None for r in results)


def install_timers(be: HFBackend, timers: Timers, undo: list[Callable[[], None]]) -> None:
    """Time the prefix forward, the key/value cache copies and every model forward: wraps
    ``be._prefix_cache`` on the instance, hooks the model, and swaps the ``copy`` module that
    ``backends.hf`` sees and the cache class's batch methods for timed versions. Each change
    appends its undo to ``undo`` as it is made."""
    prefix_cache = be._prefix_cache

    def timed_prefix(prefix: tuple[int, ...]) -> Any:
        timers.in_prefix = True
        try:
            with timers.section("prefix"):
                return prefix_cache(prefix)
        finally:
            timers.in_prefix = False

    def before(module: Any, args: Any, kwargs: dict[str, Any]) -> None:
        if not timers.in_prefix:
            timers.sync()
            timers._forward_start = time.perf_counter()

    def after(module: Any, args: Any, kwargs: dict[str, Any], output: Any) -> None:
        if timers.in_prefix:  # charged to "prefix" as a whole
            return
        timers.sync()
        ids = kwargs.get("input_ids", args[0] if args else None)
        width = 0 if ids is None else ids.shape[1]
        name = "forward_prompt" if width > 1 else "forward_decode"
        timers.seconds[(timers.label, name)] += time.perf_counter() - timers._forward_start
        timers.counts[(timers.label, f"{name}_tokens")] += 0 if ids is None else ids.numel()

    be._prefix_cache = timed_prefix  # type: ignore[method-assign]
    undo.append(lambda: vars(be).pop("_prefix_cache", None))
    body = be.model.base_model  # the backend runs the body and projects what it reads
    for hook in (body.register_forward_pre_hook(before, with_kwargs=True),
                 body.register_forward_hook(after, with_kwargs=True)):
        undo.append(hook.remove)
    from backends.shared_prefix import SharedPrefix

    select = SharedPrefix.select
    SharedPrefix.select = timers.wrap(select, "kv_select")  # type: ignore[method-assign]
    undo.append(lambda: setattr(SharedPrefix, "select", select))
    hf_copy = hf_module.copy
    hf_module.copy = types.SimpleNamespace(  # type: ignore[assignment]
        deepcopy=timers.wrap(copy.deepcopy, "kv_copy"))
    undo.append(lambda: setattr(hf_module, "copy", hf_copy))
    if not be._prefix_caches:
        return
    cache_cls = type(next(iter(be._prefix_caches.values())))
    for method, name in (("batch_repeat_interleave", "kv_copy"),
                         ("batch_select_indices", "kv_select")):
        if not hasattr(cache_cls, method):
            continue
        own = method in vars(cache_cls)
        original = getattr(cache_cls, method)
        setattr(cache_cls, method, timers.wrap(original, name))
        undo.append((lambda c=cache_cls, m=method, o=original: setattr(c, m, o)) if own
                    else (lambda c=cache_cls, m=method: delattr(c, m)))


@contextmanager
def watched(be: HFBackend, plans: Sequence[PromptPlan], counts: Counter[tuple[str, str]],
            timers: Timers | None = None) -> Iterator[None]:
    """Count the probe work per prompt (``be.probe`` wrapped on the instance); with
    ``timers``, also time it section by section (``install_timers``; needs a prefix cache
    already built, to find the cache class). Everything is put back on exit."""
    labels = {(p.prefix, len(p.tail)): p.label for p in plans}
    probe = be.probe
    undo: list[Callable[[], None]] = []

    def watched_probe(requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        label = (labels.get((tuple(requests[0].prefix), len(requests[0].ids)), "other")
                 if requests else "other")
        if timers is None:
            results = probe(requests)
        else:
            timers.label = label
            with timers.section("probe"):
                results = probe(requests)
            timers.label = "-"
        count_work(counts, label, requests, results)
        return results

    try:
        be.probe = watched_probe  # type: ignore[method-assign]
        undo.append(lambda: vars(be).pop("probe", None))
        if timers is not None:
            install_timers(be, timers, undo)
        yield
    finally:
        for step in reversed(undo):
            step()


def run_detector(det: RepeatProbe, ctx: ScanContext, token_ids: np.ndarray,
                 sync: Callable[[], None], what: str) -> tuple[list[Finding], float]:
    """``det.run`` over ``token_ids`` from cold prefix caches; findings and wall seconds."""
    ctx.backend._prefix_caches.clear()  # type: ignore[attr-defined]
    findings: list[Finding] = []
    every = max(1, len(token_ids) // 10)
    sync()
    start = time.perf_counter()
    for batch in det.run(ctx, token_ids):
        before = len(findings)
        findings.extend(batch)
        if len(findings) // every > before // every and len(findings) < len(token_ids):
            print(f"  {what}: {len(findings)}/{len(token_ids)} tokens, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    sync()
    return findings, time.perf_counter() - start


# --- the plain batched pass ---------------------------------------------------------------


def plain_chunk(be: HFBackend, chunk: Sequence[tuple[list[int], int]], steps: int
                ) -> tuple[list[float], int]:
    """Highest P(target) over ``steps`` greedy positions for each (prompt ids, target):
    right-padded, every step re-running the whole sequence, logits at every position."""
    dev = be.device
    n = len(chunk)
    lengths = [len(ids) for ids, _ in chunk]
    width = max(lengths) + steps - 1
    ids = torch.full((n, width), be._pad_id(), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for b, (seq, _) in enumerate(chunk):
        ids[b, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[b, : len(seq)] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    rows = torch.arange(n, device=dev)
    at = torch.tensor(lengths, device=dev)  # where each row's next token goes
    targets = torch.tensor([t for _, t in chunk], device=dev)
    best = torch.zeros(n, device=dev)
    forwarded = 0
    for step in range(steps):
        w = max(lengths) + step
        logits = be.model(input_ids=ids[:, :w], attention_mask=mask[:, :w],
                          use_cache=False).logits
        forwarded += n * w
        logp = torch.log_softmax(logits[rows, at - 1].float(), dim=-1)
        best = torch.maximum(best, logp.gather(1, targets[:, None]).squeeze(1).exp())
        if step + 1 < steps:
            nxt = logp.argmax(dim=-1)
            ids[rows, at] = nxt
            mask[rows, at] = 1
            at = at + 1
    return best.tolist(), forwarded


def plain_pass(be: HFBackend, plans: Sequence[PromptPlan], token_ids: Sequence[int],
               steps: int, sync: Callable[[], None]) -> tuple[dict[int, float], float, int]:
    """Every prompt for every token, sorted by length into batches of at most
    ``be.batch_tokens`` tokens; each token's highest probability over prompts and steps."""
    seqs = sorted(((plan.full_ids(t), t) for plan in plans for t in token_ids),
                  key=lambda s: len(s[0]))
    chunks: list[list[tuple[list[int], int]]] = [[]]
    for seq in seqs:
        if chunks[-1] and (len(chunks[-1]) + 1) * (len(seq[0]) + steps - 1) > be.batch_tokens:
            chunks.append([])
        chunks[-1].append(seq)
    best = dict.fromkeys(token_ids, 0.0)
    forwarded = 0
    every = max(1, len(chunks) // 10)
    sync()
    start = time.perf_counter()
    with torch.inference_mode():
        for k, chunk in enumerate(chunks):
            probs, n = plain_chunk(be, chunk, steps)
            forwarded += n
            for (_, t), p in zip(chunk, probs, strict=True):
                best[t] = max(best[t], p)
            if (k + 1) % every == 0 and k + 1 < len(chunks):
                print(f"  plain pass: batch {k + 1}/{len(chunks)}, "
                      f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    sync()
    return best, time.perf_counter() - start, forwarded


# --- profile ------------------------------------------------------------------------------


def profile_table(det: RepeatProbe, ctx: ScanContext, token_ids: np.ndarray, cuda: bool
                  ) -> str:
    """The top operators of ``det.run`` over ``token_ids`` by self time (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    ctx.backend._prefix_caches.clear()  # type: ignore[attr-defined]
    with profile(activities=activities) as prof:
        for _ in det.run(ctx, token_ids):
            pass
    averages = prof.key_averages()
    keys = (("self_device_time_total", "self_cuda_time_total") if cuda
            else ("self_cpu_time_total",))
    for key in keys:
        try:
            return averages.table(sort_by=key, row_limit=30)
        except (AttributeError, KeyError):
            continue
    return averages.table(row_limit=30)


# --- main ---------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if cuda else "cpu",
                    help="cuda, cuda:N or cpu (default: cuda when available)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                    help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--vocab-limit", type=int,
                    help="probe this many token ids, spread evenly over the vocabulary "
                         "(default: all 50,257)")
    ap.add_argument("--layers", type=int, default=12, help="transformer blocks (default 12)")
    ap.add_argument("--batch-tokens", type=int,
                    help="the hf backend's tokens per forward pass (default: its own, "
                         f"{hf_module.CUDA_BATCH_TOKENS} on CUDA, {hf_module.CPU_BATCH_TOKENS} "
                         "on CPU)")
    ap.add_argument("--detector-batch", type=int,
                    help="tokens per repeat-probe batch, an experiment: sets "
                         "the detector's batch option (default: 256 on CPU, 4096 on CUDA)")
    ap.add_argument("--tokenizer", help="a saved tokenizer folder to use instead of training one")
    ap.add_argument("--baseline", action="store_true",
                    help="also time the plain batched pass and print the ratio")
    ap.add_argument("--no-breakdown", action="store_true",
                    help="skip the instrumented run that splits where the time goes")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also write a torch.profiler table of N tokens next to --out")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/verify3_gpu.json"))
    args = ap.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def breakdown(timers: Timers, labels: Sequence[str], wall: float) -> dict[str, Any]:
    """Seconds per section and prompt, the remainder of ``probe`` and of the whole run."""
    by_prompt = {}
    for label in labels:
        row = {name: round(timers.total(name, label), 3) for name in SECTIONS}
        probe_s = timers.total("probe", label)
        row["probe_other"] = round(probe_s - sum(timers.total(n, label) for n in SECTIONS), 3)
        row["probe"] = round(probe_s, 3)
        row["forward_prompt_tokens"] = timers.counts[(label, "forward_prompt_tokens")]
        row["forward_decode_tokens"] = timers.counts[(label, "forward_decode_tokens")]
        by_prompt[label] = row
    probe_s = timers.total("probe")
    sections = {name: timers.total(name) for name in SECTIONS}
    sections["probe_other"] = probe_s - sum(sections.values())
    sections["detector_outside_probe"] = wall - probe_s
    return {"wall_s": round(wall, 3),
            "seconds": {k: round(v, 3) for k, v in sections.items()},
            "share": {k: round(v / wall, 4) for k, v in sections.items()},
            "by_prompt": by_prompt}


def main() -> None:
    args = parse_args()
    cuda = args.device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    detector_batch = args.detector_batch or (4096 if args.device.startswith("cuda") else 256)
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="verify3-") as tmp:
        start = time.perf_counter()
        model_info = build_model(Path(tmp), args.layers, args.tokenizer)
        be = HFBackend(tmp, dtype=args.dtype, device=args.device, batch_tokens=args.batch_tokens)
        setup_s = time.perf_counter() - start
    model_info["n_params"] = be.describe()["n_params"]
    vocab = be.vocab()
    ctx = ScanContext(backend=be, vocab=vocab, categories=analyze(vocab, be.encode_batch))
    det = RepeatProbe(probes="verify-3", batch=detector_batch)
    opts = det.prepare(ctx)
    plans = det.plans
    steps, threshold = int(opts["steps"]), float(opts["threshold"])
    token_ids = pick_tokens(len(vocab), args.vocab_limit)
    n = len(token_ids)
    device_name = torch.cuda.get_device_name(torch.device(args.device)) if cuda else (
        platform.processor() or platform.machine())
    result["info"] = {
        "device": args.device, "device_name": device_name, "dtype": args.dtype,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda if cuda else None}
    result["model"] = {**model_info, "weights": "random (torch.manual_seed(0))",
                       "setup_s": round(setup_s, 2)}
    result["settings"] = {
        "probe_set": "verify-3", "prompt_order": opts["prompt_order"], "threshold": threshold,
        "steps": steps, "batch_tokens": be.batch_tokens,
        "detector_batch": detector_batch, "tokens": n,
        "token_ids": "all" if n == len(vocab) else f"{n} spread evenly over 0..{len(vocab) - 1}",
        "tokenizer_rows_probed": int(np.sum(~vocab.padding[token_ids])),
        "padding_rows_probed": int(np.sum(vocab.padding[token_ids])),
        "warmup_tokens": min(n, WARMUP_TOKENS)}
    result["plans"] = [{"label": p.label, "prefix_tokens": len(p.prefix),
                        "tail_tokens": len(p.tail), "slots": len(p.slots)} for p in plans]
    print(f"verify-3 over {n} tokens: GPT-2 small, {args.layers} layers, "
          f"{model_info['n_params'] / 1e6:.1f}M params, random weights; {device_name} "
          f"({args.device}, {args.dtype}); batch_tokens {be.batch_tokens}, detector batch "
          f"{detector_batch}", flush=True)
    print("prompts (prefix + tail tokens): " + ", ".join(
        f"{p.label} {len(p.prefix)}+{len(p.tail)}" for p in plans), flush=True)

    for _ in det.run(ctx, token_ids[-WARMUP_TOKENS:]):
        pass
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    counts: Counter[tuple[str, str]] = Counter()
    with watched(be, plans, counts):
        findings, wall = run_detector(det, ctx, token_ids, sync, "repeat-probe")
    verdicts = Counter(f.verdict for f in findings)
    done = sum(counts[(p.label, "steps")] for p in plans)
    worst = n * len(plans) * steps
    detector = {
        "wall_s": round(wall, 3), "tokens_per_s": round(n / wall, 1),
        "ms_per_token": round(1000 * wall / n, 4),
        "projected_full_vocab_s": round(wall * len(vocab) / n, 1),
        "verdicts": dict(verdicts),
        "decided_by_prompt": dict(Counter(f.evidence.get("repeated_in") for f in findings
                                          if "repeated_in" in f.evidence)),
        "probe_requests": {p.label: counts[(p.label, "requests")] for p in plans},
        "greedy_steps_run": done, "worst_case_steps": worst, "worst_case": done == worst,
        "probe_errors": sum(counts[(p.label, "errors")] for p in plans)}
    if cuda:
        detector["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    result["detector"] = detector
    print(f"repeat-probe: {wall:.2f} s, {n / wall:.1f} tokens/s "
          f"(full vocabulary at this rate: {wall * len(vocab) / n:.1f} s); verdicts "
          f"{dict(verdicts)}; greedy steps run {done}/{worst}"
          f"{' (worst case: nothing stopped early)' if done == worst else ''}", flush=True)

    if not args.no_breakdown:
        timers = Timers(sync)
        with watched(be, plans, Counter(), timers):
            _, inst_wall = run_detector(det, ctx, token_ids, sync, "instrumented")
        split = breakdown(timers, [p.label for p in plans], inst_wall)
        result["breakdown"] = split
        print(f"where the time goes (instrumented run, synchronised: {inst_wall:.2f} s):")
        head = ("prompt", "probe", *SECTIONS, "probe_other")
        print("  " + f"{head[0]:<18}" + "".join(f"{h:>15}" for h in head[1:]))
        for label, row in split["by_prompt"].items():
            print("  " + f"{label:<18}" + "".join(f"{row[h]:>15.3f}" for h in head[1:]))
        print("  " + ", ".join(f"{k} {v:.3f} s ({100 * split['share'][k]:.1f}%)"
                               for k, v in split["seconds"].items()), flush=True)

    if args.baseline:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        plain_pass(be, plans, [int(t) for t in token_ids[-2:]], steps, sync)
        best, base_s, forwarded = plain_pass(be, plans, [int(t) for t in token_ids], steps, sync)
        det_p = np.array([f.score for f in findings], dtype=np.float64)
        base_p = np.array([best[f.token_id] for f in findings], dtype=np.float64)
        agree = float(np.mean((det_p < threshold) == (base_p < threshold)))
        baseline = {
            "definition": "every prompt for every token in full (no prefix cache, no key/value "
                          "cache), right-padded batches of <= batch_tokens tokens, logits at "
                          "every position, 3 greedy steps each re-running the sequence, "
                          "no early stopping",
            "wall_s": round(base_s, 3), "tokens_per_s": round(n / base_s, 1),
            "forward_tokens": forwarded,
            "baseline_over_detector": round(base_s / wall, 2),
            "verdict_agreement": agree,
            "baseline_glitch": int(np.sum(base_p < threshold)),
            "detector_glitch": int(verdicts.get(GLITCH, 0)),
            "max_abs_prob_diff": float(np.max(np.abs(det_p - base_p))),
            "max_prob": {"detector": float(det_p.max()), "baseline": float(base_p.max())}}
        if cuda:
            baseline["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
        result["baseline"] = baseline
        print(f"plain batched pass: {base_s:.2f} s, {n / base_s:.1f} tokens/s; repeat-probe is "
              f"{base_s / wall:.2f}x as fast; verdicts agree on {100 * agree:.1f}%, "
              f"max |dP| {baseline['max_abs_prob_diff']:.2e}", flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.profile:
        table = profile_table(det, ctx, token_ids[: args.profile], cuda)
        path = out.with_suffix(".profile.txt")
        path.write_text(table + "\n")
        result["profile"] = {"tokens": min(n, args.profile), "table": str(path)}
        print(f"profile of {min(n, args.profile)} tokens: {path}")
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
