"""Tokenizer-structure facts that explain most glitch tokens (as Land & Bartolo's reports
list them): the longer vocabulary tokens that contain a token, whether its text on its own
tokenizes to it (a token reached only as a step of the merges that build longer tokens is
rarely or never seen in training), and its nearest neighbours in input-embedding space
(never-trained rows sit together).

Pure functions over the vocabulary's bytes and the embedding matrix, vectorised with numpy;
``facts`` assembles them for a set of tokens into the JSON the ``token_facts`` table holds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

EXAMPLES = 5  # containing tokens named per token
NEIGHBOURS = 8  # nearest neighbours per token
QUERY_CELLS = 1 << 25  # similarities per matrix product (128 MB of float32)
MAX_FACT_TOKENS = 5000  # tokens per scan that get facts (glitch first)


class VocabBytes:
    """The vocabulary's bytes joined into one string, with each token's start and end, for
    substring searches over every token at once."""

    def __init__(self, raw: Sequence[bytes]) -> None:
        self.raw = raw
        lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        self.ends = np.cumsum(lengths)
        self.starts = self.ends - lengths
        self.joined = b"".join(raw)

    def containing(self, token_id: int) -> np.ndarray:
        """The ids of the longer tokens whose bytes contain token ``token_id``'s bytes."""
        needle = self.raw[token_id]
        if not needle:
            return np.zeros(0, dtype=np.int64)
        found: list[int] = []
        find = self.joined.find
        i = find(needle)
        while i != -1:
            found.append(i)
            i = find(needle, i + 1)
        pos = np.asarray(found, dtype=np.int64)
        owner = np.searchsorted(self.starts, pos, side="right") - 1
        inside = pos + len(needle) <= self.ends[owner]
        owner = np.unique(owner[inside])
        longer = (self.ends[owner] - self.starts[owner]) > len(needle)
        return owner[longer]


def alone_encodings(encode_batch: Callable[[Sequence[str]], list[list[int]]],
                    texts: Sequence[str]) -> list[list[int]]:
    """What each text encodes to on its own (no special tokens added)."""
    return encode_batch(list(texts)) if texts else []


def nearest_neighbours(emb: np.ndarray, token_ids: Sequence[int], k: int = NEIGHBOURS
                       ) -> dict[int, list[tuple[int, float]]]:
    """Per token, its ``k`` nearest other rows of ``emb`` by cosine similarity, closest
    first (equal ones by id), as (token id, cosine). One matrix product per block of query
    rows, each query's similarities one contiguous row (a selection along a column of a
    vocabulary-long block, the earlier layout, took longer than the product on Gemma 3)."""
    ids = np.asarray(token_ids, dtype=np.int64)
    ids = ids[ids < emb.shape[0]]
    if not len(ids):
        return {}
    size = emb.shape[0]
    inv = np.linalg.norm(emb, axis=1)
    inv[inv == 0] = 1.0
    inv = (1.0 / inv).astype(emb.dtype)
    k = min(k, size - 1)
    rows = max(1, QUERY_CELLS // size)
    buf = np.empty((min(rows, len(ids)), size), dtype=np.result_type(emb.dtype, np.float32))
    out: dict[int, list[tuple[int, float]]] = {}
    for a in range(0, len(ids), rows):
        block = ids[a:a + rows]
        sims = buf[:len(block)]
        np.matmul(emb[block] * inv[block, None], emb.T, out=sims)
        sims *= inv
        sims[np.arange(len(block)), block] = -np.inf  # not itself
        top = np.argpartition(sims, size - k, axis=1)[:, size - k:]  # the k largest
        top_sims = np.take_along_axis(sims, top, axis=1)
        kth = top_sims.min(axis=1)
        for r in np.flatnonzero((sims >= kth[:, None]).sum(axis=1) > k).tolist():
            tied = np.flatnonzero(sims[r] >= kth[r])  # more than k: keep the lowest ids
            top[r] = tied[np.lexsort((tied, -sims[r, tied]))[:k]]
            top_sims[r] = sims[r, top[r]]
        order = np.lexsort((top, -top_sims), axis=1)
        top = np.take_along_axis(top, order, axis=1)
        top_sims = np.take_along_axis(top_sims, order, axis=1)
        for t, near, cos in zip(block.tolist(), top.tolist(), top_sims.tolist(), strict=True):
            out[t] = [(n, round(c, 4)) for n, c in zip(near, cos, strict=True)]
    return out


def facts(raw: Sequence[bytes], texts: Sequence[str], token_ids: Sequence[int],
          encode_batch: Callable[[Sequence[str]], list[list[int]]] | None = None,
          emb: np.ndarray | None = None, special: np.ndarray | None = None
          ) -> dict[int, dict[str, Any]]:
    """The structure facts of ``token_ids``: ``contained_in`` (how many longer tokens
    contain the token, and a few of them as [id, text]), ``alone`` (the ids its text
    encodes to on its own) and ``reachable_alone`` (whether that is the token itself),
    ``only_inside_longer`` (not reachable alone, but inside longer tokens), and
    ``neighbours`` ([id, cosine] in input-embedding space) where ``emb`` is given.
    Special tokens are reachable as themselves (written out, tokenizers parse them)."""
    vb = VocabBytes(raw)
    ids = [int(t) for t in token_ids]
    spelled = [_utf8(raw[t]) for t in ids]  # a piece of a character has no text alone
    alone: dict[int, list[int]] = {}
    if encode_batch is not None:
        ask = [t for t, s in zip(ids, spelled, strict=True) if s]
        alone = dict(zip(ask, alone_encodings(
            encode_batch, [s for s in spelled if s]), strict=True))
    near = nearest_neighbours(emb, ids) if emb is not None else {}
    out: dict[int, dict[str, Any]] = {}
    for t in ids:
        inside = vb.containing(t)
        examples = inside[np.argsort(vb.ends[inside] - vb.starts[inside],
                                     kind="stable")][:EXAMPLES]
        f: dict[str, Any] = {"contained_in": {"count": int(len(inside)),
                                              "examples": [[int(e), texts[e]]
                                                           for e in examples.tolist()]}}
        if t in alone:
            enc = [int(x) for x in alone[t]]
            reachable = enc == [t] or bool(special is not None and special[t])
            f.update(alone=enc, reachable_alone=reachable,
                     only_inside_longer=not reachable and len(inside) > 0)
        if t in near:
            f["neighbours"] = [[n, s] for n, s in near[t]]
        out[t] = f
    return out


def _utf8(raw: bytes) -> str | None:
    try:
        return raw.decode("utf-8") or None
    except UnicodeDecodeError:
        return None
