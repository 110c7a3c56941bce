"""``junk-text``: tokens whose text is mostly whitespace, control characters or punctuation.

Scraped web text leaves formatting debris in tokenizer vocabularies: rules of dashes, runs of
dots, blank lines, zero-width characters, stray control bytes. Such tokens are frequent in
the data the tokenizer was trained on and rare in the data the model was trained on, so they
are a classic source of under-trained tokens. This detector needs only the vocabulary (no
weights), so it also runs on a backend that can only tokenize.

Everything is computed for the whole vocabulary at once: one UTF-8 decode of all tokens
joined together, one lookup table of character classes, ``np.bincount`` per token.
"""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from harness.backend import Capability
from harness.detector import Detector, FindingArrays, ScanContext

CHUNK = 16384  # findings per committed batch

# Character classes.
OTHER, SPACE, PUNCT, CONTROL, BYTE = range(5)
_ASCII_SPACE = "\t\n\r\x0b\x0c"  # control characters that are ordinary whitespace
_TERMINATOR = 0xDCFF  # what surrogateescape makes of the byte 0xFF


@functools.cache
def _bmp_classes() -> np.ndarray:
    """The class of every code point below U+10000, from the Unicode general category.

    A loop over the 65,536 code points of the Basic Multilingual Plane, once per process
    (about 30 ms); the vocabulary itself is never looped over.
    """
    classes = np.full(0x10000, OTHER, dtype=np.uint8)
    for cp in range(0x10000):
        cat = unicodedata.category(chr(cp))
        if cat in ("Zs", "Zl", "Zp"):
            classes[cp] = SPACE
        elif cat[0] == "P" or (cat[0] == "S" and cp < 0x80):
            classes[cp] = PUNCT  # punctuation, and ASCII symbols such as = ~ | ^ +
        elif cat in ("Cc", "Cf", "Co"):
            classes[cp] = CONTROL  # control, format (zero-width, bidi), private use
    classes[[ord(c) for c in _ASCII_SPACE]] = SPACE
    classes[0x2500:0x25A0] = PUNCT  # box drawing and block elements: ─────, ▀▀▀
    classes[[0xFFFD, 0xFFFE, 0xFFFF]] = CONTROL  # a literal replacement char, non-characters
    classes[0xD800:0xE000] = BYTE  # surrogates: here only undecodable bytes (surrogateescape)
    return classes


def classify(codepoints: np.ndarray) -> np.ndarray:
    """The class (``OTHER``, ``SPACE``, ``PUNCT``, ``CONTROL``, ``BYTE``) of each code point."""
    cps = np.asarray(codepoints, dtype=np.int64)
    bmp = _bmp_classes()[np.minimum(cps, 0xFFFF)]
    astral_control = (cps >= 0xF0000) | ((cps >= 0xE0000) & (cps < 0xE0080))  # private, tags
    astral = np.where(astral_control, CONTROL, OTHER).astype(np.uint8)
    return np.where(cps < 0x10000, bmp, astral)


def token_codepoints(raw: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Every token's characters, concatenated, and the number of characters of each token.

    One decode of the whole vocabulary: the tokens are joined with the byte 0xFF, which never
    occurs in UTF-8, so no character can span two tokens. With ``surrogateescape`` every
    undecodable byte becomes exactly one code point (0xFF becomes U+DCFF), so the k-th 0xFF
    byte of the buffer is the k-th U+DCFF of the text: that finds the separators again even
    where a token contains the byte 0xFF itself. An undecodable byte counts as one character.
    """
    lengths = np.fromiter(map(len, raw), dtype=np.int64, count=len(raw))
    joined = b"\xff".join(raw) + b"\xff"
    text = joined.decode("utf-8", "surrogateescape")
    cps = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    ff_bytes = np.flatnonzero(np.frombuffer(joined, dtype=np.uint8) == 0xFF)
    separator_bytes = np.cumsum(lengths + 1) - 1
    is_separator = np.isin(ff_bytes, separator_bytes, assume_unique=True)
    separators = np.flatnonzero(cps == _TERMINATOR)[is_separator]
    counts = np.diff(separators, prepend=-1) - 1
    keep = np.ones(len(cps), dtype=bool)
    keep[separators] = False
    return cps[keep], counts


def text_stats(raw: Sequence[bytes]) -> dict[str, np.ndarray]:
    """Per token: ``chars``, ``space``, ``punct``, ``control`` (counts of characters of each
    class) and ``repeats`` (characters equal to the character before them)."""
    n = len(raw)
    cps, counts = token_codepoints(raw)
    owner = np.repeat(np.arange(n), counts)
    classes = classify(cps)
    stats = {"chars": counts}
    for key, cls in (("space", SPACE), ("punct", PUNCT), ("control", CONTROL)):
        stats[key] = np.bincount(owner[classes == cls], minlength=n)
    same = (cps[1:] == cps[:-1]) & (owner[1:] == owner[:-1])
    stats["repeats"] = np.bincount(owner[1:][same], minlength=n)
    return stats


class JunkText(Detector):
    """Flags tokens whose decoded text is (almost) all whitespace, punctuation or control
    characters: ``-----------``, ``\\n\\n\\n\\n``, ``.......``, ``\\x00``, zero-width spaces.

    score: the fraction of the token's characters that are whitespace, punctuation (with
    ASCII symbols and box-drawing characters) or control/format/private-use characters (high
    is suspicious; empty padding rows have no score). Verdict ``suspect`` when that fraction
    is at least ``fraction`` and the token has at least ``min_chars`` characters, or (with
    ``control``) when it contains any control character other than ordinary whitespace.
    With ``whitespace=false``, tokens that are only whitespace (code indentation) are not
    flagged. Special tokens and padding rows are never flagged.
    """

    name = "junk-text"
    version = "1"
    description = "share of whitespace, punctuation and control characters in the token text"
    requires = frozenset({Capability.VOCAB})
    suspicious_when = "high"
    defaults = {"fraction": 0.9, "min_chars": 4, "control": True, "whitespace": True}

    def prepare(self, ctx: ScanContext) -> dict[str, Any]:
        """Record the Unicode version too: character classes come from it."""
        return {**self.options, "unicode": unicodedata.unidata_version}

    def run(self, ctx: ScanContext, token_ids: np.ndarray) -> Iterator[FindingArrays]:
        stats = text_stats(ctx.vocab.raw)
        chars = stats["chars"]
        junk = stats["space"] + stats["punct"] + stats["control"]
        with np.errstate(invalid="ignore", divide="ignore"):
            score = np.where(chars > 0, junk / chars, np.nan)
        flagged = (chars >= int(self.options["min_chars"])) & (
            score >= float(self.options["fraction"]))
        if not self.options["whitespace"]:
            flagged &= stats["space"] < chars
        if self.options["control"]:
            flagged |= stats["control"] > 0
        categories = np.asarray(ctx.categories, dtype=object)
        flagged &= (categories != "special") & (categories != "padding")
        verdicts = np.where(flagged, "suspect", "ok")
        for start in range(0, len(token_ids), CHUNK):
            ids = np.asarray(token_ids[start: start + CHUNK], dtype=np.int64)
            yield FindingArrays(ids, score[ids], verdicts[ids],
                                {k: v[ids] for k, v in stats.items()})
