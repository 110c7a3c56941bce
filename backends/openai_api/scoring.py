"""Log-probabilities from completions: the three ways of reading them (``echo``,
``forced``, ``top_logprobs``) and the probe path built on them."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from backends.openai_api.tokenizers import Spellings
from backends.openai_api.transport import Completion, Completions, RequestFailed
from harness.backend import ProbeRequest, ProbeResult, ScoreRequest, ScoreResult

FORCE_BIAS = 100  # the largest logit bias OpenAI accepts; enough to make any token greedy
# two log-probabilities of one token "agree" within this: llama.cpp's numbers move by up to
# 0.1 with the batch a position was computed in (a cached prefix, or not)
LOGPROB_TOLERANCE = 0.25


class Mismatch(RequestFailed):
    """The server tokenized a text prompt into other tokens than the ones meant."""


def agrees(a: float | None, b: float) -> bool:
    """Are two log-probabilities of one token the same, but for the server's noise?"""
    return a is not None and abs(a - b) <= LOGPROB_TOLERANCE + 0.05 * abs(b)


class Scorer:
    """``score`` and ``probe`` by completions, the way ``score_via`` names (``echo`` or
    ``forced``: exact; ``top_logprobs``: the top ``top_k``, an approximation). Which of them
    the server gets right (``echo_ok``, ``forced_ok``) is checked at load; ``forced`` stands
    in where an echo was read otherwise than sent."""

    def __init__(self, completions: Completions, spellings: Spellings) -> None:
        self.completions = completions
        self.spellings = spellings
        self.score_via: str | None = None
        self.top_k = 0
        self.echo_ok = False
        self.forced_ok = False

    # --- one request each -------------------------------------------------------------------

    def echo(self, seq: Sequence[int]) -> list[float | None]:
        """Log-probability of each token of ``seq`` given the tokens before it (index 0 and a
        leading BOS have none), from one echoed completion."""
        got = self.completions.complete(seq, max_tokens=1, logprobs=1, echo=True)
        return self.parse_echo(seq, got)

    def parse_echo(self, seq: Sequence[int], got: Completion) -> list[float | None]:
        sent = self.completions.strip_bos(seq)
        off = len(seq) - len(sent)
        n_done = got.completion_tokens
        entries = len(got.token_logprobs)
        n_prompt = entries - n_done if n_done is not None else len(sent)
        lead = n_prompt - len(sent)  # a BOS the server added and echoes
        if lead not in (0, 1) or len(got.tokens) != entries:
            raise Mismatch(f"the server read the prompt as {n_prompt} tokens, not "
                           f"{len(sent)}")
        for i, token in enumerate(sent):
            if not self.spellings.spelled(token, got.tokens[lead + i]):
                raise Mismatch(f"the server read token {i} of the prompt as "
                               f"{got.tokens[lead + i]!r}, not "
                               f"{self.spellings.shown(token)!r}")
        values: list[float | None] = [None] * len(seq)
        for i in range(len(sent)):
            value = got.token_logprobs[lead + i]
            values[off + i] = None if value is None else float(value)
        return values

    def forced(self, context: tuple[int, ...], target: int) -> float:
        """log P(target | context): one token generated with the target's logit raised by
        ``FORCE_BIAS``; the server reports its log-probability before the bias."""
        if not self.completions.strip_bos(context):
            raise RequestFailed("position 0 has no context to send")
        got = self.completions.complete(context, max_tokens=1, logprobs=1,
                                        logit_bias={str(target): FORCE_BIAS})
        if not got.token_logprobs or got.token_logprobs[0] is None:
            raise RequestFailed("the server returned no log-probability")
        if got.tokens and not self.spellings.spelled(target, got.tokens[0]):
            raise RequestFailed(f"the server generated {got.tokens[0]!r} despite a logit bias "
                                f"on {self.spellings.shown(target)!r}")
        return float(got.token_logprobs[0])

    def _top(self, context: tuple[int, ...]) -> dict[str, float]:
        if not self.completions.strip_bos(context):
            raise RequestFailed("position 0 has no context to send")
        got = self.completions.complete(context, max_tokens=1, logprobs=self.top_k)
        if not got.top_logprobs or not got.top_logprobs[0]:
            raise RequestFailed("the server returned no log-probabilities")
        return dict(got.top_logprobs[0])

    def _run(self, jobs: list[Any]) -> list[Any]:
        return self.completions.transport.run(jobs)

    # --- score ------------------------------------------------------------------------------

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        """Log-probabilities by ``score_via``; identical requests are sent once."""
        results = [ScoreResult() for _ in requests]
        wanted: list[tuple[int, int, int]] = []  # (request, slot, position)
        for i, req in enumerate(requests):
            if problem := req.problem():
                results[i].error = problem
            else:
                results[i].logprobs = [math.nan] * len(req.positions)
                wanted.extend((i, k, p) for k, p in enumerate(req.positions))
        if self.score_via == "echo":
            self._score_echo(requests, wanted, results)
        elif self.score_via == "forced":
            self._score_forced(requests, wanted, results)
        else:
            self._score_top(requests, wanted, results)
        return results

    def _score_echo(self, requests: Sequence[ScoreRequest], wanted: list[tuple[int, int, int]],
                    results: list[ScoreResult]) -> None:
        """One echoed sequence per distinct context: the request itself for its own next
        tokens, ``ids[:p] + [target]`` for any other target; a sequence that is a prefix of
        another is read from the longer one."""
        need: dict[tuple[int, int, int], tuple[int, ...]] = {}
        for i, k, p in wanted:
            ids, t = requests[i].ids, requests[i].targets[k]
            need[(i, k, p)] = (tuple(ids) if p < len(ids) and ids[p] == t
                               else tuple(ids[:p]) + (t,))
        seqs = sorted(set(need.values()))
        cover = {}
        for j in range(len(seqs) - 1, -1, -1):  # longest first: a prefix takes its extension
            s = seqs[j]
            nxt = seqs[j + 1] if j + 1 < len(seqs) else None
            cover[s] = cover[nxt] if nxt is not None and nxt[: len(s)] == s else s
        roots = sorted(set(cover.values()))
        answers = dict(zip(roots, self._run([lambda s=s: self.echo(s) for s in roots]),
                           strict=True))
        retry: list[tuple[int, int, int]] = []
        for (i, k, p), seq in need.items():
            got = answers[cover[seq]]
            if isinstance(got, Mismatch) and self.forced_ok:
                retry.append((i, k, p))
            elif isinstance(got, Exception):
                results[i].error = str(got)
            elif got[p] is None:
                results[i].error = f"the server echoed no log-probability at position {p}"
            else:
                results[i].logprobs[k] = got[p]
        if retry:  # the text re-tokenized differently: ask position by position instead
            self._score_forced(requests, retry, results)
        _drop_failed(results)

    def _score_forced(self, requests: Sequence[ScoreRequest],
                      wanted: list[tuple[int, int, int]], results: list[ScoreResult]) -> None:
        jobs = sorted({(tuple(requests[i].ids[:p]), requests[i].targets[k])
                       for i, k, p in wanted})  # sorted: neighbours share the server's cache
        answers = dict(zip(jobs, self._run([lambda c=c, t=t: self.forced(c, t)
                                            for c, t in jobs]), strict=True))
        for i, k, p in wanted:
            got = answers[(tuple(requests[i].ids[:p]), requests[i].targets[k])]
            if isinstance(got, Exception):
                results[i].error = str(got)
            else:
                results[i].logprobs[k] = got
        _drop_failed(results)

    def _score_top(self, requests: Sequence[ScoreRequest], wanted: list[tuple[int, int, int]],
                   results: list[ScoreResult]) -> None:
        """Top-k only: a target outside the top k gets the k-th log-probability, an upper
        bound on its own."""
        contexts = sorted({tuple(requests[i].ids[:p]) for i, _, p in wanted})
        answers = dict(zip(contexts, self._run([lambda c=c: self._top(c) for c in contexts]),
                           strict=True))
        for i, k, p in wanted:
            got = answers[tuple(requests[i].ids[:p])]
            if isinstance(got, Exception):
                results[i].error = str(got)
            else:
                results[i].logprobs[k] = self._lookup(got, requests[i].targets[k])[0]
        _drop_failed(results)

    def _lookup(self, top: dict[str, float], target: int) -> tuple[float, str]:
        """The log-probability of ``target`` in a top-k answer and how far to trust it:
        ``exact``; ``bound`` (outside the top k: the k-th value, an upper bound); ``unknown``
        (a string that other tokens share is in the top k: it may or may not be the target's,
        so its value is only a guess)."""
        key = self.spellings.key_of(target)
        if key is not None and key in top:
            return float(top[key]), "exact"
        for k, v in top.items():
            if k.startswith("bytes:") and self.spellings.token_id(k) == target:
                return float(v), "exact"
        shared = [k for k in self.spellings.of(target) if k in top]
        if shared:
            return float(max(top[k] for k in shared)), "unknown"
        return float(min(top.values())), "bound"

    # --- probe ------------------------------------------------------------------------------

    def probe(self, requests: Sequence[ProbeRequest]) -> list[ProbeResult]:
        """One completion per request: ``steps`` greedy tokens with the top-k
        log-probabilities at each (requests run ``concurrency`` at a time).

        P(target) is exact where the target is among the top k. Where it is not, the k-th
        probability bounds it from above; that bound is kept when it is already below
        ``stop_at`` (the verdict cannot change), and otherwise the exact value is asked for
        with ``score`` (``forced`` or ``echo`` requests), as it is for a step where the server
        stopped at end-of-text. Asking for the first token alone and the rest only when
        needed would save llama_cpp.server its 0.13 s per reported step for tokens repeated
        at once, but there the prompt evaluation dominates (about 2 s for a 200-token prompt
        on one busy core) and the server keeps only the last prompt cached: with concurrent
        requests the second completion would evaluate the prompt again."""
        prompts = [list(r.prefix) + list(r.ids) for r in requests]
        complete = self.completions.complete
        out = self._run([lambda ids=ids, r=r: complete(ids, max_tokens=r.steps,
                                                       logprobs=self.top_k)
                         for ids, r in zip(prompts, requests, strict=True)])
        parts = [got if isinstance(got, Exception) else self._read_steps(got) for got in out]
        return self._probe_results(requests, prompts, parts)

    def _read_steps(self, got: Completion) -> tuple[list[dict[str, float]], list[int], bool]:
        """(top-k answer per step, greedy ids, stopped at end-of-text) of a completion."""
        tops = [t for t in got.top_logprobs if t]
        greedy = [self.spellings.token_id(t) for t in got.tokens[: len(tops)]]
        if any(t is None for t in greedy):  # spelled like other tokens: re-encode the text
            found = self.completions.tokenizer.encode(got.text)
        else:
            found = [int(t) for t in greedy if t is not None]
        return tops, found, got.finish_reason == "stop"

    def _probe_results(self, requests: Sequence[ProbeRequest], prompts: list[list[int]],
                       parts: list[Any]) -> list[ProbeResult]:
        results: list[ProbeResult] = []
        exact = self.score_via in ("echo", "forced")
        later: list[tuple[int, int, ScoreRequest]] = []  # (request, step, what to score)
        for n, (req, ids, part) in enumerate(zip(requests, prompts, parts, strict=True)):
            if isinstance(part, Exception):
                results.append(ProbeResult(error=str(part)))
                continue
            tops, greedy, stopped = part
            probs = []
            for s, top in enumerate(tops):
                value, trust = self._lookup(top, req.target)
                probs.append(float(np.exp(value)))
                settled = trust == "exact" or trust == "bound" and (
                    req.stop_at is not None and probs[-1] < req.stop_at)
                if not settled and exact and s <= len(greedy):
                    ctx = ids + greedy[:s]
                    later.append((n, s, ScoreRequest(ctx, [len(ctx)], [req.target])))
            reached = req.stop_at is not None and max(probs, default=0.0) >= req.stop_at
            if (exact and stopped and len(tops) < req.steps and not reached
                    and len(tops) <= len(greedy)):
                ctx = ids + greedy[: len(tops)]  # the step at which the server stopped
                probs.append(math.nan)
                later.append((n, len(tops), ScoreRequest(ctx, [len(ctx)], [req.target])))
            results.append(ProbeResult(probs=probs, ids=greedy))
        if later:
            for (n, s, _), res in zip(later, self.score([x[2] for x in later]), strict=True):
                if res.error:
                    results[n] = ProbeResult(error=res.error)
                elif results[n].error is None:
                    results[n].probs[s] = float(np.exp(res.logprobs[0]))
        return results


def _drop_failed(results: list[ScoreResult]) -> None:
    for r in results:
        if r.error:
            r.logprobs = []
