"""Where a set of tokens occurs in text, as the model's own tokenizer splits it.

``TokenFinder.find(texts)`` tokenizes a batch of texts and returns every position where one
of the watched tokens (a model's glitch tokens) is produced, as a character offset.

Two things keep it fast without changing the result:

- A token can only be produced where its bytes occur in the text, when the tokenizer's
  tokens spell the text exactly (byte-level BPE, tiktoken, llama.cpp; checked at setup on
  a sample). So only the pieces of text around such occurrences are tokenized (the
  *prefilter*: all the tokens' texts searched in one pass, Aho-Corasick by
  ``ahocorasick_rs`` over the UTF-8 bytes, which finds a token that is a piece of a
  character too).
- Text is cut into pieces before each newline that follows a printable ASCII character
  (``!``..``~``): GPT-2's and SmolLM2's pre-tokenizers always split there, and no token of
  the vocabulary holds such a character followed by a newline (checked at setup, with a
  sample tokenized whole and cut; where either fails, as for Llama 3's pre-tokenizer, which
  joins punctuation and the newlines after it, texts are not cut), so the pieces tokenize
  exactly as the whole text does. Contiguous pieces are tokenized together
  in groups of up to 64 KiB, one batch call for all of them.

Every tokenized id is tested with one ``np.isin``; character offsets are computed only for
the hits, from the stored byte lengths of the tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ahocorasick_rs import BytesAhoCorasick

from harness.tokenizers import Tokenizer

# where text may be cut: before a newline that follows a printable ASCII character (GPT-2's,
# SmolLM2's and Gemma's tokenizers split there whatever follows; not after the newline, where
# a pre-tokenizer's look-ahead such as GPT-2's ``\s+(?!\S)`` splits a whitespace run by what
# follows it)
CUT = re.compile(r"(?<=[!-~])(?=\n)")
CUT_BYTES = re.compile(rb"[!-~]\n")  # a token holding this would cross a cut
CUT_PROBE = ("def f(x):\n    return x.y\n\nclass A:\n  pass  \nword\nWord 1\n2\n(a)\n[b]\n"
             "'c'\n\"d\"\n<e>\n#f\n.g\n-h\n*i*\n\tend.\n\n\nEnd!\n  * x;\n    y,\nz\n")
GROUP_CHARS = 1 << 16  # characters per tokenized group of contiguous pieces
SAMPLE = "Hello wörld, naïve café 1995!\n  x = f('y')  \n\n\tZ 🙂 end\n"


@dataclass(frozen=True)
class Hit:
    """One occurrence of a watched token: the text (its index in the batch), the character
    offset in it where the token starts (0-based; a token that starts inside a character,
    a piece of its UTF-8 bytes, is placed at that character) and the token id."""

    text: int
    offset: int
    token_id: int


class TokenFinder:
    """Finds the tokens ``watch`` in texts; ``raw`` is every token's exact bytes, by id (the
    stored vocabulary)."""

    def __init__(self, tokenizer: Tokenizer, raw: Sequence[bytes], watch: Sequence[int],
                 prefilter: bool = True) -> None:
        self.tok = tokenizer
        self.raw = raw
        self.raw_len = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
        self.watch = np.unique(np.asarray(watch, dtype=np.int64))
        self.exact = self._spells_text()
        self.cuttable = CUT_BYTES.search(b"\x00".join(raw)) is None and self._cuts_agree()
        # the prefilter's search keys: each token's bytes without leading spaces (a tokenizer
        # may fold a space into a token); a key that holds a shorter key is found through it
        # (the piece around an occurrence reaches the next cut, and no token crosses a cut)
        keys = sorted({raw[t].lstrip(b" ") or raw[t] for t in self.watch.tolist()} - {b""},
                      key=len)
        self.keys = [k for i, k in enumerate(keys)
                     if not self.cuttable or not any(s in k for s in keys[:i])]
        self.prefilter = prefilter and self.exact
        self._matcher = BytesAhoCorasick(self.keys) if self.keys and self.prefilter else None

    def _spells_text(self) -> bool:
        """Whether the tokens of a sample text spell it exactly, byte for byte."""
        ids = self.tok.encode(SAMPLE)
        if any(not 0 <= i < len(self.raw) for i in ids):
            return False
        return b"".join(self.raw[i] for i in ids) == SAMPLE.encode("utf-8")

    def _cuts_agree(self) -> bool:
        """Whether a sample tokenizes the same whole and cut at every cut (a guard for
        pre-tokenizers unlike GPT-2's and Llama 3's)."""
        points = [m.start() for m in CUT.finditer(CUT_PROBE)]
        pieces = [CUT_PROBE[a:b] for a, b in zip([0, *points], [*points, len(CUT_PROBE)],
                                                 strict=True)]
        cut = [t for ids in self.tok.encode_batch(pieces) for t in ids]
        return cut == list(self.tok.encode(CUT_PROBE))

    # --- which pieces of text to tokenize ---------------------------------------------------

    def _piece_start(self, big: str, pos: int, low: int) -> int:
        end = pos + 1
        while True:
            j = big.rfind("\n", low, end)
            if j <= low:
                return low
            if "!" <= big[j - 1] <= "~":
                return j
            end = j

    def _piece_end(self, big: str, end: int, high: int) -> int:
        m = CUT.search(big, end, high)
        return high if m is None else m.start()

    def _candidates(self, big: str, data: bytes) -> tuple[np.ndarray, np.ndarray]:
        """Start and end (characters) of every occurrence of a watched token's bytes in
        ``big`` (whose UTF-8 is ``data``), sorted; one Aho-Corasick pass over the bytes."""
        if self._matcher is None:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        hits = self._matcher.find_matches_as_indexes(data)
        if not hits:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        found = np.asarray(hits, dtype=np.int64)
        order = np.argsort(found[:, 1], kind="stable")
        bs, be = found[order, 1], found[order, 2]
        # bytes to characters: less the continuation bytes before (a start inside a character
        # is that character; an end inside one, after it)
        cont = np.flatnonzero((np.frombuffer(data, dtype=np.uint8) & 0xC0) == 0x80)
        return bs - np.searchsorted(cont, bs, side="right"), \
            be - np.searchsorted(cont, be, side="left")

    def _ranges(self, big: str, data: bytes, bounds: np.ndarray) -> list[tuple[int, int]]:
        """The pieces of ``big`` to tokenize, sorted, not overlapping; none crosses a text
        boundary in ``bounds`` (the texts' start offsets and the end)."""
        ranges: list[tuple[int, int]] = []
        if self.prefilter:
            starts, ends = self._candidates(big, data)
            units = np.searchsorted(bounds, starts, side="right") - 1
            last_end = -1
            for p, e, u in zip(starts.tolist(), ends.tolist(), units.tolist(), strict=True):
                if e <= last_end:
                    continue  # inside the piece just taken
                lo, hi = int(bounds[u]), int(bounds[u + 1])
                e = min(e, hi)
                if self.cuttable:
                    a, b = self._piece_start(big, p, lo), self._piece_end(big, e, hi)
                else:
                    a, b = lo, hi
                if ranges and a < ranges[-1][1]:
                    a = ranges[-1][0]
                    ranges.pop()
                ranges.append((a, b))
                last_end = b
        else:
            for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
                a = lo
                while a < hi:
                    b = min(a + GROUP_CHARS, hi)
                    if b < hi and self.cuttable:
                        b = self._piece_end(big, b, hi)
                    elif b < hi:
                        b = hi
                    ranges.append((a, b))
                    a = b
        return self._grouped(ranges, bounds)

    def _grouped(self, ranges: list[tuple[int, int]], bounds: np.ndarray
                 ) -> list[tuple[int, int]]:
        """Contiguous pieces of one text joined, up to ``GROUP_CHARS`` a group."""
        if not self.cuttable:
            return ranges
        grouped: list[tuple[int, int]] = []
        for a, b in ranges:
            if grouped and grouped[-1][1] == a and b - grouped[-1][0] <= GROUP_CHARS and \
                    np.searchsorted(bounds, a, side="right") == \
                    np.searchsorted(bounds, grouped[-1][0], side="right"):
                grouped[-1] = (grouped[-1][0], b)
            else:
                grouped.append((a, b))
        return grouped

    # --- tokenize and look ------------------------------------------------------------------

    def find(self, texts: Sequence[str], encoded: Sequence[bytes] | None = None) -> list[Hit]:
        """Every occurrence of a watched token in ``texts`` (``encoded``: their UTF-8, where
        the caller has it), by text and offset."""
        if not texts or not len(self.watch):
            return []
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        big = "".join(texts)
        data = b"".join(encoded) if encoded is not None else \
            big.encode("utf-8") if self.prefilter else b""
        ranges = self._ranges(big, data, bounds)
        if not ranges:
            return []
        pieces = [big[a:b] for a, b in ranges]
        encoded = self.tok.encode_arrays(pieces)
        counts = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
        flat = np.concatenate(encoded) if encoded else np.zeros(0, dtype=np.int64)
        hit = np.flatnonzero(np.isin(flat, self.watch))
        if not len(hit):
            return []
        firsts = np.concatenate([[0], np.cumsum(counts)])
        which = np.searchsorted(firsts, hit, side="right") - 1
        hits: list[Hit] = []
        for r in np.unique(which).tolist():
            ids = encoded[r]
            at = hit[which == r] - firsts[r]
            offsets = self._char_offsets(pieces[r], ids, at)
            a = ranges[r][0]
            unit = int(np.searchsorted(bounds, a, side="right") - 1)
            base = a - int(bounds[unit])
            hits.extend(Hit(unit, base + o, int(ids[k]))
                        for k, o in zip(at.tolist(), offsets, strict=True))
        return hits

    def _char_offsets(self, piece: str, ids: np.ndarray, at: np.ndarray) -> list[int]:
        """Character offsets in ``piece`` of the tokens at positions ``at`` of ``ids``."""
        data = piece.encode("utf-8")
        lens = self.raw_len[ids]
        if int(lens.sum()) != len(data):  # tokens that do not spell the text: decode
            return [len(self.tok.decode(ids[:k].tolist())) for k in at.tolist()]
        starts = (np.cumsum(lens) - lens)[at]
        cont = (np.frombuffer(data, dtype=np.uint8) & 0xC0) == 0x80
        n_cont = np.concatenate([[0], np.cumsum(cont)])
        inside = np.append(cont, False)[starts]  # a token that starts inside a character
        return (starts - n_cont[starts] - inside).tolist()
