"""Prompt elicitation: gradient descent in the embedding space for a prompt that makes the
model say a target (Rumbelow & Watkins' "prompt generation"), projected onto real tokens.

The prompt is ``positions`` free embeddings after the tokenizer's BOS (if any), and the
target follows them directly: nothing else is in the context. Each row of a batch (one
target and one seed) starts from the embeddings of random real tokens, drawn from its seed
alone, so a row's result does not depend on the batch it runs in.

One step, per row (PEZ, Wen et al. 2023, "Hard prompts made easy", with Rumbelow & Watkins'
regulariser, and a gradient-guided token swap as in AutoPrompt / GCG):

1. project the continuous prompt ``P`` onto the nearest allowed token of each position
   (cosine similarity over the whole candidate vocabulary, one matrix product, in chunks);
2. run the model on the projected prompt and the target (teacher-forced when the target has
   several tokens): the loss is ``-log p(target)`` plus ``reg`` times the mean squared
   distance of each position to its nearest token;
3. the gradient of the loss, taken at the projected prompt, updates ``P`` (straight
   through the projection) with Adam;
4. ``swaps``: the same gradient ranks, for each position, the tokens whose embedding would
   lower the loss most to first order; that many one-token changes of the projected prompt
   (the best ranked token at each position in turn, then the second best, ...) run through
   the model without gradients, and the best of them, when it beats the projected prompt,
   is taken: ``P`` jumps to that token's embedding at that position. Pure PEZ (``swaps``
   0) drifts between tokens slowly; the swaps find the one token a target needs before it
   (`` b`` before ``ecause``) that a continuous step rarely lands on.

Because every forward pass runs on a real token sequence, each step measures the
probability of the target after the prompts it tried; the best prompt of a row so far is
kept. A row stops once that probability reaches ``stop_at`` (with ``groups``: once any row
of its group does); the batch stops when every row has. At the end, the best prompt of each
row and the projection of its final ``P`` are scored again by a plain forward pass of the
backend (``Backend.score``), and the better of the two is the row's result.

torch is imported only when an elicitation runs (llama.cpp-only installs have none).
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.backend import Backend, Capability, ScoreRequest
from harness.errors import HarnessError
from harness.vocab import NORMAL, PADDING, SPECIAL

PROMPT_TOKENS = ("normal", "nonspecial")  # which tokens a prompt may hold
# swaps are read after the cached prefix from this many changed prompts a step on; fewer
# read whole (one model call instead of one per position: calls cost more than arithmetic)
PREFIX_MIN_SEQUENCES = 128
SIM_CELLS = 1 << 24  # similarity scores computed at once while projecting (64 MiB)
LOGIT_CELLS = 1 << 25  # logits computed at once while trying swaps (128 MiB)


@dataclass(frozen=True)
class ElicitOptions:
    """How an elicitation optimises. ``stop_at`` ends a row once its projected prompt gives
    the target that probability; ``allow_target`` lets the prompt hold the target's own
    tokens (the model may then just copy them)."""

    positions: int = 8
    steps: int = 100
    lr: float = 0.3
    reg: float = 0.1
    swaps: int = 16
    stop_at: float = 0.9
    allow_target: bool = False
    prompt_tokens: str = "normal"

    def check(self) -> None:
        """One clear line for an option out of range."""
        if self.positions < 1:
            raise HarnessError("elicitation needs at least one prompt position")
        if self.steps < 1:
            raise HarnessError("elicitation needs at least one optimisation step")
        if not self.lr > 0:
            raise HarnessError(f"learning rate must be positive, not {self.lr}")
        if self.swaps < 0:
            raise HarnessError(f"swaps must be at least 0, not {self.swaps}")
        if not self.reg >= 0:
            raise HarnessError(f"the regulariser weight must be at least 0, not {self.reg}")
        if not 0 < self.stop_at <= 1:
            raise HarnessError(f"stop_at must be in (0, 1], not {self.stop_at}")
        if self.prompt_tokens not in PROMPT_TOKENS:
            raise HarnessError(f"prompt_tokens must be {' or '.join(PROMPT_TOKENS)}, "
                               f"not {self.prompt_tokens!r}")


@dataclass
class ElicitRow:
    """One target and one seed to optimise a prompt for (``group``: rows that stop together
    once one of them reaches ``stop_at``; ``restart``: its number among its target's rows)."""

    target: list[int]
    seed: int
    restart: int = 0
    group: int | None = None


@dataclass
class Elicited:
    """What one row found: the discrete prompt, the target's probability after it by a
    plain forward pass, the steps it ran, and its share of the batch's wall time."""

    row: ElicitRow
    prompt_ids: list[int]
    probability: float
    steps: int
    wall_s: float
    trace: list[float] = field(default_factory=list)  # best probability so far, per step


def prompt_candidates(categories: Sequence[str] | np.ndarray, which: str = "normal"
                      ) -> np.ndarray:
    """The token ids a prompt may hold: the ``normal`` tokens of the tokenizer analysis
    (no special, byte, undecodable or unreachable token), or every ``nonspecial`` one."""
    cats = np.asarray(categories, dtype=object)
    if which == "normal":
        keep = cats == NORMAL
    elif which == "nonspecial":
        keep = (cats != SPECIAL) & (cats != PADDING)
    else:
        raise HarnessError(f"prompt_tokens must be {' or '.join(PROMPT_TOKENS)}, not {which!r}")
    return np.flatnonzero(keep)


def check_backend(backend: Backend) -> None:
    """One clear line for a backend that cannot take gradients."""
    if Capability.GRADIENTS not in backend.capabilities:
        raise HarnessError(f"backend {backend.name!r} has no gradients; elicit needs a "
                           "white-box backend such as hf")


def elicit(backend: Backend, rows: Sequence[ElicitRow], candidates: np.ndarray,
           options: ElicitOptions, progress: Callable[[int], None] = lambda n: None,
           trace: bool = False) -> list[Elicited]:
    """Optimise a prompt for every row, all rows in one batch per target length; return one
    ``Elicited`` per row, in order. ``candidates``: the token ids a prompt may hold
    (``prompt_candidates``). ``progress`` gets the number of steps done as they go."""
    check_backend(backend)
    options.check()
    if not rows:
        return []
    if len(candidates) == 0:
        raise HarnessError("no token may appear in a prompt (the candidate set is empty)")
    model = backend.differentiable()
    results: list[Elicited | None] = [None] * len(rows)
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if not r.target:
            raise HarnessError("an elicitation target needs at least one token")
        by_length.setdefault(len(r.target), []).append(i)
    bos = backend.bos_ids()
    finals: list[list[int]] = [[] for _ in rows]
    for idx in by_length.values():
        found, ends = _optimise(model, bos, [rows[i] for i in idx], candidates, options,
                                progress, trace)
        for i, res, end in zip(idx, found, ends, strict=True):
            results[i], finals[i] = res, end
    done = [r for r in results if r is not None]
    _rescore(backend, bos, done, finals)
    return done


class _Candidates:
    """The tokens a prompt may hold, over which each step searches in vocabulary chunks:
    the nearest one to a continuous position (cosine), and the ones a gradient prefers."""

    def __init__(self, torch: Any, embeddings: Any, candidates: np.ndarray) -> None:
        self.torch = torch
        self.ids = torch.as_tensor(candidates, dtype=torch.long, device=embeddings.device)
        self.rows = embeddings[self.ids]
        self.unit = self.rows / self.rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.where = {int(t): k for k, t in enumerate(candidates.tolist())}

    def _top(self, queries: Any, matrix: Any, k: int, banned: list[list[int]]) -> Any:
        """Per query (B, N, d), the candidate ids (B, N, k) of the ``k`` highest
        ``query · row``; ``banned[b]``: ids that row b may not take."""
        torch = self.torch
        b, n, d = queries.shape
        flat = queries.reshape(b * n, d)
        cols = [(r, self.where[t]) for r, ids in enumerate(banned) for t in ids
                if t in self.where]
        chunk = max(1024, SIM_CELLS // max(1, b * n))
        best_v = torch.full((b * n, 0), -math.inf, device=queries.device)
        best_i = torch.zeros((b * n, 0), dtype=torch.long, device=queries.device)
        for start in range(0, len(self.ids), chunk):
            sims = (flat @ matrix[start:start + chunk].T).view(b, n, -1)
            for r, c in cols:
                if start <= c < start + sims.shape[2]:
                    sims[r, :, c - start] = -math.inf
            value, index = sims.reshape(b * n, -1).topk(min(k, sims.shape[2]), dim=1)
            best_v = torch.cat([best_v, value], dim=1)
            best_i = torch.cat([best_i, index + start], dim=1)
            if best_v.shape[1] > k:
                best_v, keep = best_v.topk(k, dim=1)
                best_i = best_i.gather(1, keep)
        return self.ids[best_i].view(b, n, -1)

    def nearest(self, prompt: Any, banned: list[list[int]]) -> Any:
        """The nearest allowed token (B, N) to each position of ``prompt`` (B, N, d)."""
        unit = prompt / prompt.norm(dim=2, keepdim=True).clamp_min(1e-12)
        return self._top(unit, self.unit, 1, banned)[:, :, 0]

    def descents(self, grad: Any, k: int, banned: list[list[int]]) -> Any:
        """Per position, the ``k`` tokens (B, N, k) along whose embedding the loss falls
        fastest to first order (the most negative ``grad · row``)."""
        return self._top(-grad, self.rows, k, banned)


class _Batch:
    """The model run on a batch of prompts: ``[BOS] + prompt + target[:-1]``, reading the
    target's log-probability (summed over its tokens) after the prompt."""

    def __init__(self, torch: Any, model: Any, bos: list[int], targets: Any,
                 n_pos: int) -> None:
        self.torch, self.model = torch, model
        emb = model.embeddings
        self.emb = emb
        self.n_bos = len(bos)
        self.bos = emb[torch.tensor(bos, dtype=torch.long, device=emb.device)] if bos else None
        self.targets = targets  # (B, T)
        self.tail = emb[targets[:, :-1]]  # teacher forcing: the target's tokens but the last
        self.reads = len(bos) + n_pos - 1 + torch.arange(targets.shape[1], device=emb.device)

    def _read(self, hidden: Any, rows: Any, offset: int = 0) -> Any:
        """log p(target) of batch rows ``rows`` from hidden states that start ``offset``
        positions into the sequence."""
        logits = self.model.logits(hidden[:, self.reads - offset])
        logp = self.torch.log_softmax(logits, dim=-1)
        return logp.gather(2, self.targets[rows][:, :, None]).squeeze(2).sum(dim=1)

    def _with_tail(self, embeds: Any, rows: Any) -> Any:
        if self.targets.shape[1] > 1:
            return self.torch.cat([embeds, self.tail[rows]], dim=1)
        return embeds

    def _sequence(self, prompt: Any, rows: Any) -> Any:
        parts = [self._with_tail(prompt, rows)]
        if self.bos is not None:
            parts.insert(0, self.bos.expand(len(rows), -1, -1))
        return self.torch.cat(parts, dim=1)

    def logp(self, prompt: Any, rows: Any) -> Any:
        """log p(target) (len(rows),) after ``prompt`` (len(rows), N, d), for batch rows
        ``rows``."""
        return self._read(self.model.hidden(self._sequence(prompt, rows)), rows)

    def logp_and_state(self, prompt: Any, rows: Any) -> tuple[Any, Any]:
        """``logp`` and the model's state after reading the sequence
        (``Differentiable.hidden_and_state``): ``logp_swaps`` reads the positions before
        each change from it instead of computing them again."""
        hidden, state = self.model.hidden_and_state(self._sequence(prompt, rows))
        return self._read(hidden, rows), state

    def _chunk(self) -> int:
        return max(1, LOGIT_CELLS // (self.emb.shape[0] * self.targets.shape[1]))

    def logp_ids(self, ids: Any, rows: Any) -> Any:
        """``logp`` of token prompts (len(rows), N), without gradients, in chunks."""
        torch = self.torch
        size = self._chunk()
        with torch.no_grad():
            return torch.cat([self.logp(self.emb[ids[i:i + size]], rows[i:i + size])
                              for i in range(0, len(ids), size)])

    def logp_swaps(self, ids: Any, tried: Any, pos: Any, rows: Any, state: Any) -> Any:
        """``logp`` (L, K) of one-token changes ``tried`` (L, K, N) of the prompts ``ids``
        (L, N) of batch rows ``rows``, change k at position ``pos[k]``, without gradients.

        The positions before a change are the unchanged prompt's: each change reads only from
        its position on, after them in ``state`` (``logp_and_state`` of ``ids``), about half
        the arithmetic of reading every changed prompt whole. Fewer than
        ``PREFIX_MIN_SEQUENCES`` changed prompts are read whole."""
        torch = self.torch
        n_live, n_swaps, n_pos = tried.shape
        if n_live * n_swaps < PREFIX_MIN_SEQUENCES:
            return self.logp_ids(tried.reshape(n_live * n_swaps, n_pos),
                                 rows.repeat_interleave(n_swaps)).view(n_live, n_swaps)
        size = self._chunk()
        out = torch.empty(n_live, n_swaps, device=self.emb.device)
        with torch.no_grad():
            for at in sorted(set(pos.tolist())):
                ks = torch.nonzero(pos == at).flatten()
                seqs = tried[:, ks, at:].reshape(n_live * len(ks), n_pos - at)
                which = torch.arange(n_live, device=ids.device).repeat_interleave(len(ks))
                length = self.n_bos + at
                found = []
                for i in range(0, len(seqs), size):
                    part, r = which[i:i + size], rows[which[i:i + size]]
                    suffix = self._with_tail(self.emb[seqs[i:i + size]], r)
                    if length:
                        hidden = self.model.hidden_after(state, part, length, suffix)
                    else:
                        hidden = self.model.hidden(suffix)
                    found.append(self._read(hidden, r, offset=length))
                out[:, ks] = torch.cat(found).view(n_live, len(ks))
        return out


def _optimise(model: Any, bos: list[int], rows: list[ElicitRow], candidates: np.ndarray,
              options: ElicitOptions, progress: Callable[[int], None], trace: bool
              ) -> tuple[list[Elicited], list[list[int]]]:
    """One batch of rows whose targets have the same length: each row's best prompt, and
    the projection of its prompt where the optimisation ended."""
    import torch

    t0 = time.perf_counter()
    emb = model.embeddings
    dev = emb.device
    n_rows, n_pos = len(rows), options.positions
    vocab = _Candidates(torch, emb, candidates)
    banned = [[] if options.allow_target else sorted(set(r.target)) for r in rows]
    start_ids = torch.stack([_start(torch, r.seed, candidates, n_pos) for r in rows]).to(dev)
    prompt = emb[start_ids].clone().requires_grad_(True)
    optimiser = torch.optim.Adam([prompt], lr=options.lr)
    batch = _Batch(torch, model, bos, torch.tensor([r.target for r in rows],
                                                   dtype=torch.long, device=dev), n_pos)
    groups = [r.group if r.group is not None else -1 - i for i, r in enumerate(rows)]
    best_p = np.full(n_rows, -1.0)
    best_ids = start_ids.cpu().numpy().copy()
    steps_run = np.zeros(n_rows, dtype=np.int64)
    traces: list[list[float]] = [[] for _ in rows]
    active = np.ones(n_rows, dtype=bool)
    n_swaps = options.swaps
    for _ in range(options.steps):
        live = np.flatnonzero(active)
        if len(live) == 0:
            break
        rows_t = torch.as_tensor(live, device=dev)
        cont = prompt[rows_t]
        live_banned = [banned[i] for i in live]
        with torch.no_grad():
            ids = vocab.nearest(cont.detach(), live_banned)
        hard = emb[ids]
        straight = cont + (hard - cont).detach()  # forward on the tokens, gradient to P
        straight.retain_grad()  # its gradient: the loss's at the projected prompt
        logp, state = batch.logp_and_state(straight, rows_t)
        dist = ((cont - hard.detach()) ** 2).sum(dim=2).mean(dim=1)
        loss = (options.reg * dist - logp).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        p = logp.detach().exp().cpu().numpy()
        ids_np = ids.cpu().numpy()
        if n_swaps:
            ids_np, p = _swap(torch, vocab, batch, prompt, live, rows_t, ids, p,
                              straight.grad, state, n_swaps, live_banned)
        steps_run[live] += 1
        better = p > best_p[live]
        best_p[live[better]] = p[better]
        best_ids[live[better]] = ids_np[better]
        if trace:
            for i in live:
                traces[i].append(float(best_p[i]))
        done_groups = {groups[i] for i in live if best_p[i] >= options.stop_at}
        for i in live:
            if groups[i] in done_groups:
                active[i] = False
        progress(1)
    with torch.no_grad():  # the projection where each row's optimisation ended
        final_ids = vocab.nearest(prompt.detach(), banned).cpu().numpy()
    wall = time.perf_counter() - t0
    share = steps_run / max(1, int(steps_run.sum()))
    return [Elicited(r, best_ids[i].tolist(), float(best_p[i]), int(steps_run[i]),
                     float(wall * share[i]), traces[i]) for i, r in enumerate(rows)], \
        final_ids.tolist()


def _swap(torch: Any, vocab: _Candidates, batch: _Batch, prompt: Any, live: np.ndarray,
          rows_t: Any, ids: Any, p: np.ndarray, grad: Any, state: Any, n_swaps: int,
          banned: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Try ``n_swaps`` one-token changes of each live row's projected prompt ``ids``, the
    ones the gradient ranks best; where the best beats the projected prompt (probability
    ``p``), take it (``P`` jumps to the token there). Returns each row's prompt and its
    probability after the swap step."""
    n_live, n_pos = ids.shape
    per_pos = -(-n_swaps // n_pos)
    with torch.no_grad():
        ranked = vocab.descents(grad, per_pos, banned)  # (L, N, per_pos)
        pos = torch.arange(n_swaps, device=ids.device) % n_pos
        rank = torch.arange(n_swaps, device=ids.device) // n_pos
        tokens = ranked[:, pos, rank]  # (L, K)
        tried = ids[:, None, :].repeat(1, n_swaps, 1)
        tried[:, torch.arange(n_swaps), pos] = tokens
        q = batch.logp_swaps(ids, tried, pos, rows_t, state).exp()
        q_best, k_best = q.max(dim=1)
        q_best, k_best = q_best.cpu().numpy(), k_best.cpu().numpy()
        ids_np, p = ids.cpu().numpy(), p.copy()
        for j in np.flatnonzero(q_best > p):
            k = int(k_best[j])
            at, token = int(pos[k]), int(tokens[j, k])
            ids_np[j, at] = token
            p[j] = q_best[j]
            prompt[int(live[j]), at] = vocab.rows[vocab.where[token]]
    return ids_np, p


def _start(torch: Any, seed: int, candidates: np.ndarray, n: int) -> Any:
    """The starting prompt of a row: ``n`` candidate tokens drawn from its seed alone."""
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randint(0, len(candidates), (n,), generator=gen)
    return torch.as_tensor(candidates, dtype=torch.long)[pick]


def _rescore(backend: Backend, bos: list[int], results: list[Elicited],
             finals: list[list[int]]) -> None:
    """Score each row's best prompt and its final projection by the backend's plain
    forward pass (``score``); keep the better, with its probability."""
    reqs = []
    for r, final in zip(results, finals, strict=True):
        for prompt in (r.prompt_ids, final):
            ids = [*bos, *prompt, *r.row.target]
            start = len(bos) + len(prompt)
            reqs.append(ScoreRequest(ids, list(range(start, start + len(r.row.target))),
                                     r.row.target))
    scores = backend.score(reqs)
    for k, (r, final) in enumerate(zip(results, finals, strict=True)):
        probs = []
        for s in scores[2 * k: 2 * k + 2]:
            if s.error:
                raise HarnessError(f"cannot score an elicited prompt: {s.error}")
            probs.append(float(math.exp(sum(s.logprobs))))
        if probs[1] > probs[0]:
            r.prompt_ids = list(final)
        r.probability = max(probs)


def token_frequencies(results: Sequence[Elicited], top: int = 20) -> list[tuple[int, int]]:
    """Rumbelow & Watkins' aggregate: how often each token appears in the prompts found over the
    restarts, most frequent first (ties by id)."""
    counts = Counter(t for r in results for t in r.prompt_ids)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


# --- one elicitation call: `harness elicit MODEL TARGET` ------------------------------------


@dataclass
class Session:
    """One ``harness elicit`` call: its restarts (stored as rows of ``elicitations`` under
    ``session``), their prompts' text, and Rumbelow & Watkins' token frequencies over the restarts
    (token id, text, count)."""

    session: str
    model_id: int
    label: str
    target_ids: list[int]
    target_text: str
    options: ElicitOptions
    results: list[Elicited]
    prompt_texts: list[str]
    frequencies: list[tuple[int, str, int]]
    wall_s: float


def parse_target(backend: Backend, n_rows: int, target: str, as_ids: bool = False
                 ) -> list[int]:
    """The token ids of an elicitation target: ``target`` encoded without special tokens,
    or with ``as_ids`` read as comma-separated token ids. A target the tokenizer cannot
    produce as given (empty, or whose tokens decode to another text) is one clear line."""
    if as_ids:
        try:
            ids = [int(t) for t in target.split(",") if t.strip()]
        except ValueError:
            raise HarnessError(f"--ids takes comma-separated token ids, not {target!r}"
                               ) from None
        if not ids:
            raise HarnessError("the target names no token id")
        bad = [t for t in ids if not 0 <= t < n_rows]
        if bad:
            raise HarnessError(f"token ids {bad[:5]} are outside 0..{n_rows - 1}")
        return ids
    if not target:
        raise HarnessError("the target is empty: give the text the model should say")
    try:
        ids = backend.encode(target)
        again = backend.decode(ids)
    except Exception as exc:  # a tokenizer refuses text it cannot encode (lone surrogates)
        raise HarnessError(f"the tokenizer cannot encode the target {target!r}: "
                           f"{type(exc).__name__}") from None
    if not ids:
        raise HarnessError(f"the target {target!r} encodes to no token")
    if again != target:
        raise HarnessError(f"the tokenizer cannot produce the target {target!r}: its tokens "
                           f"{ids[:8]} decode as {again!r}")
    return ids


def run_session(engine: Any, model: str, target: str, *, restarts: int = 4, seed: int = 0,
                options: ElicitOptions | None = None, as_ids: bool = False,
                backend: str | None = None, backend_options: dict[str, Any] | None = None,
                reporter: Any = None) -> Session:
    """``harness elicit``: load ``model``, optimise ``restarts`` prompts for ``target``
    (restart ``r`` starts from seed ``seed + r``; all restarts run as one batch), store every
    restart in ``elicitations`` and return them."""
    import uuid

    from harness import store
    from harness.plugins import registry
    from harness.runner import Reporter, open_model, store_model

    options = options or ElicitOptions()
    options.check()
    if restarts < 1:
        raise HarnessError("--restarts must be at least 1")
    reporter = reporter or Reporter()
    reg = registry()
    ref, be, _ = open_model(model, reg, backend, backend_options, reporter)
    try:
        check_backend(be)
        vocab = be.vocab()
        ids = parse_target(be, len(vocab), target, as_ids)
        limit = be.context_length()
        length = len(be.bos_ids()) + options.positions + len(ids)
        if limit is not None and length > limit:
            raise HarnessError(f"prompt and target take {length} tokens, more than the "
                               f"model's context ({limit})")
        model_id, cats, _ = store_model(engine, ref, be, vocab, reporter)
        text = be.decode(ids) if as_ids else target
        rows = [ElicitRow(ids, seed=seed + r, restart=r) for r in range(restarts)]
        t0 = time.perf_counter()
        advance = reporter.start("elicit", options.steps)
        found = elicit(be, rows, prompt_candidates(cats, options.prompt_tokens), options,
                       advance)
        wall = time.perf_counter() - t0
        texts = be.decode_batch([f.prompt_ids for f in found])
        shown = {t: vocab.text[t] for t, _ in token_frequencies(found, top=10**9)}
        freqs = [(t, shown[t], n) for t, n in token_frequencies(found)]
    finally:
        be.close()
    session = uuid.uuid4().hex[:16]
    record = {**options.__dict__, "restarts": restarts, "seed": seed, "batch_wall_s": wall}
    with engine.begin() as conn:
        store.insert_elicitations(conn, [{
            "model_id": model_id, "run_id": None, "session": session, "target_ids": ids,
            "target_text": text, "restart": f.row.restart, "seed": f.row.seed,
            "n_positions": options.positions, "steps": f.steps, "prompt_ids": f.prompt_ids,
            "prompt_text": t, "probability": f.probability, "wall_s": f.wall_s,
            "options": record} for f, t in zip(found, texts, strict=True)])
    return Session(session, model_id, ref.alias or ref.ref, ids, text, options, found, texts,
                   freqs, wall)
