"""``harness check``: find a scanned model's glitch tokens in text files, standard input or
a field of JSON lines, with the model's own tokenizer and no weights.

``open_checker`` reads what the database holds (the final verdicts, the vocabulary, how to
rebuild the tokenizer); ``check_text`` and ``check_json_lines`` read one input each and
yield a ``Finding`` per occurrence and a ``BadInput`` per line or file they cannot read,
going on after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from sqlalchemy.engine import Engine

from harness import store
from harness.evaluate import final_verdict_tokens, find_model
from harness.stored_tokenizer import stored_model_tokenizer
from harness.token_finder import TokenFinder

BLOCK_BYTES = 8 << 20  # plain text is read and tokenized this much at a time
BATCH_CHARS = 4 << 20  # JSON lines: field texts gathered per batch


@dataclass
class Checker:
    """What ``check`` needs of one scanned model: the tokens to look for (id to verdict and
    text) and a ``TokenFinder`` over its tokenizer."""

    model: str
    verdict_run: int
    verdicts: dict[int, str]
    texts: dict[int, str]
    finder: TokenFinder

    def close(self) -> None:
        """Free the tokenizer."""
        self.finder.tok.close()


@dataclass(frozen=True)
class Finding:
    """One glitch token in the input: where (``line`` 1-based; plain text: ``column``, the
    1-based character column in that line; JSON lines: ``field`` and ``offset``, the 0-based
    character offset in that field's string), which token, and its final verdict."""

    source: str
    line: int
    token_id: int
    token: str
    verdict: str
    column: int | None = None
    field: str | None = None
    offset: int | None = None

    def as_dict(self) -> dict:
        """The finding as one JSON object (``--json``)."""
        where = {"column": self.column} if self.field is None else \
            {"field": self.field, "offset": self.offset}
        return {"source": self.source, "line": self.line, **where, "token_id": self.token_id,
                "token": self.token, "verdict": self.verdict}


@dataclass(frozen=True)
class BadInput:
    """A line (or a whole file, ``line`` None) that could not be read, and why."""

    source: str
    line: int | None
    reason: str

    def __str__(self) -> str:
        where = self.source if self.line is None else f"{self.source}:{self.line}"
        return f"{where}: {self.reason}"


def open_checker(engine: Engine, model: str, include_suspect: bool = False) -> Checker:
    """The glitch tokens (and, with ``include_suspect``, the suspect ones) of the stored
    model ``model`` and its tokenizer; one-line errors where it was never scanned or has no
    final verdicts."""
    model_id, label = find_model(engine, model)
    with engine.connect() as conn:
        run_id, tokens = final_verdict_tokens(conn, model_id, label, model, include_suspect)
        raw = [r for r, _ in store.token_bytes(conn, model_id)]
    tok = stored_model_tokenizer(engine, model_id)
    finder = TokenFinder(tok, raw, [t.token_id for t in tokens])
    return Checker(label, run_id, {t.token_id: t.verdict for t in tokens},
                   {t.token_id: t.text for t in tokens}, finder)


def check_text(checker: Checker, source: str, stream: BinaryIO) -> Iterator[Finding | BadInput]:
    """The findings in a plain-text input, read in blocks cut where the text tokenizes the
    same whole and cut (``token_finder.CUT``; the whole input at once where the tokenizer
    gives no such place)."""
    line = 1
    rest = b""
    cuttable = checker.finder.cuttable
    while True:
        chunk = stream.read(BLOCK_BYTES) if cuttable else stream.read()
        data = rest + chunk
        if not data:
            return
        if chunk and cuttable:
            cut = _last_cut(data)
            if cut is None:
                rest = data
                continue
            data, rest = data[:cut], data[cut:]
        else:
            rest = b""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            bad_line = line + data.count(b"\n", 0, exc.start)
            yield BadInput(source, bad_line, f"not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                                             "the rest of this input is skipped")
            return
        yield from _text_findings(checker, source, text, data, line)
        line += text.count("\n")
        if not chunk:
            return


def _last_cut(data: bytes) -> int | None:
    """The last place in ``data`` where the text may be cut (``token_finder.CUT``: before a
    newline that follows a printable ASCII character), or None."""
    end = len(data)
    while True:
        j = data.rfind(b"\n", 0, end)
        if j < 1:
            return None
        if 0x21 <= data[j - 1] <= 0x7E:
            return j
        end = j


def _text_findings(checker: Checker, source: str, text: str, data: bytes, first_line: int
                   ) -> Iterator[Finding]:
    hits = sorted(checker.finder.find([text], [data]), key=lambda h: h.offset)
    line, at = first_line, 0
    for h in hits:
        line += text.count("\n", at, h.offset)
        at = h.offset
        column = h.offset - (text.rfind("\n", 0, h.offset) + 1) + 1
        yield Finding(source, line, h.token_id, checker.texts[h.token_id],
                      checker.verdicts[h.token_id], column=column)


def _field(record: object, field: str) -> tuple[str | None, str | None]:
    """(the string at ``field``, a dotted path, or None; why not, or None)."""
    value = record
    for part in field.split("."):
        if not isinstance(value, dict):
            return None, f"not a JSON object where {field!r} should be"
        if part not in value:
            return None, f"no field {field!r}"
        value = value[part]
    if not isinstance(value, str):
        kind = "null" if value is None else type(value).__name__
        return None, f"field {field!r} is {kind}, not a string"
    return value, None


def check_json_lines(checker: Checker, source: str, stream: BinaryIO, field: str
                     ) -> Iterator[Finding | BadInput]:
    """The findings in the string ``field`` of each JSON line; a line that is not JSON, not
    an object, or lacks the field is one ``BadInput``, and the next line is read."""
    batch: list[str] = []
    lines: list[int] = []
    size = 0
    for number, data in enumerate(stream, 1):
        if not data.strip():
            continue
        try:
            record = json.loads(data.rstrip(b"\r\n"))
        except UnicodeDecodeError:
            yield BadInput(source, number, "not UTF-8 text")
            continue
        except json.JSONDecodeError as exc:
            yield BadInput(source, number, f"not valid JSON: {exc.msg} (column {exc.colno})")
            continue
        value, why = _field(record, field)
        if value is None:
            yield BadInput(source, number, why or "unreadable")
            continue
        batch.append(value)
        lines.append(number)
        size += len(value)
        if size >= BATCH_CHARS:
            yield from _field_findings(checker, source, field, batch, lines)
            batch, lines, size = [], [], 0
    yield from _field_findings(checker, source, field, batch, lines)


def _field_findings(checker: Checker, source: str, field: str, batch: list[str],
                    lines: list[int]) -> Iterator[Finding]:
    hits = sorted(checker.finder.find(batch), key=lambda h: (h.text, h.offset))
    for h in hits:
        yield Finding(source, lines[h.text], h.token_id, checker.texts[h.token_id],
                      checker.verdicts[h.token_id], field=field, offset=h.offset)
