"""``harness check``, ``export`` and ``show`` on a stored scan of the tiny GPT-2 (its
tokenizer folder; no weights are loaded), with the final verdicts written through the store;
and the ``TokenFinder`` against whole-text tokenization."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest

from harness.db import open_db
from harness.token_finder import TokenFinder
from harness.tokenizers.hf import HFTokenizer
from tests.crafted_db import store_scan

THE, C3, GL = 268, 128, 286  # ' the', the byte 0xC3 (half of 'ï' and 'é'), 'Gl'
PLANTED = {THE: ("glitch", 0.0004), C3: ("glitch", 0.0001), GL: ("glitch", 0.002),
           81: ("ok", 0.6), 299: ("suspect", 0.03)}  # 'q': repeated; 'fo': suspect


@pytest.fixture
def tiny_scan(tiny_model_dir, db_url):
    """A stored 'scan' of the tiny model (on SQLite and on PostgreSQL): three glitch tokens,
    one suspect, one ok, everything else ok without a probe."""
    tok = HFTokenizer.load(tiny_model_dir)
    store_scan(open_db(db_url), f"hf:{tiny_model_dir}", tok.vocab(), PLANTED, alias="tiny")
    return db_url, tok


def whole_text_hits(tok: HFTokenizer, text: str, watch: set[int]) -> list[tuple[int, int, int]]:
    """(line, 1-based column, token id) of every watched token in ``text``, tokenized whole,
    offsets from the tokens' bytes."""
    raw = tok.vocab().raw
    data = text.encode("utf-8")
    pos, hits = 0, []
    for t in tok.encode(text):
        if t in watch:
            char = len(data[:pos].decode("utf-8", errors="ignore"))
            if pos < len(data) and (data[pos] & 0xC0) == 0x80:
                char -= 1  # a token that starts inside a character: that character
            before = text[:char]
            hits.append((before.count("\n") + 1, char - (before.rfind("\n") + 1) + 1, t))
        pos += len(raw[t])
    return hits


TEXT = ("naïve café – the quick fox\n"
        "Glitch tokens!\n"
        "    indented: the end\n"
        "\n"
        "plain ascii line without any of them\n")


def test_check_reports_each_glitch_token_with_line_and_character_column(cli, tiny_scan,
                                                                        tmp_path):
    db, tok = tiny_scan
    path = tmp_path / "data.txt"
    path.write_text(TEXT, encoding="utf-8")
    code, out, err = cli("check", "tiny", str(path), "--db", str(db), "--json")
    assert code == 1, err  # found: a failing gate
    found = [json.loads(line) for line in out.splitlines()]
    got = [(f["line"], f["column"], f["token_id"]) for f in found]
    glitch = {t for t, (v, _) in PLANTED.items() if v == "glitch"}
    assert got == whole_text_hits(tok, TEXT, glitch)
    # columns count characters, not bytes: 'ï' is the 3rd, 'é' the 10th of line 1
    assert (1, 3, C3) in got and (1, 10, C3) in got
    assert (1, TEXT.index(" the") + 1, THE) in got and (2, 1, GL) in got
    assert {f["verdict"] for f in found} == {"glitch"}
    assert all(f["source"] == str(path) for f in found)
    assert 81 not in {f["token_id"] for f in found}  # ok tokens are not reported
    # the summary (stderr with --json) counts per token
    assert f"{len(got)} glitch token occurrences of 3 tokens in 1 input" in err
    # --suspect: the suspect 'fo' of ' fox' too
    code, out, _ = cli("check", "tiny", str(path), "--db", str(db), "--json", "--suspect")
    extra = [json.loads(x) for x in out.splitlines()]
    assert [(f["line"], f["token_id"], f["verdict"]) for f in extra
            if f["token_id"] == 299] == [(1, 299, "suspect")]
    assert len(extra) == len(got) + 1
    # the plain output: FILE:LINE:COLUMN, verdict, id, token
    code, out, _ = cli("check", "tiny", str(path), "--db", str(db))
    assert code == 1
    assert f"{path}:2:1: glitch {GL} 'Gl'" in out.splitlines()


def test_check_reads_standard_input_and_passes_clean_text(cli, tiny_scan, monkeypatch):
    import io
    import sys

    db, _ = tiny_scan
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"quick fox\n")))
    code, out, err = cli("check", "tiny", "--db", str(db))
    assert code == 0, err
    assert "0 glitch token occurrences" in out


def test_check_json_lines_names_a_bad_line_and_goes_on(cli, tiny_scan, tmp_path):
    db, tok = tiny_scan
    records = ['{"text": "x the y", "id": 1}', '{"text": "café"', '{"text": 5}',
               '{"meta": {"text": "Glitch"}}', "", '{"meta": {"text": "x the"}, "text": "ab"}',
               '{"text": "naïve Glitch"}']
    path = tmp_path / "corpus.jsonl"
    path.write_text("\n".join(records) + "\n", encoding="utf-8")
    code, out, err = cli("check", "tiny", str(path), "--field", "text", "--json",
                         "--db", str(db))
    assert code == 1
    skipped = [line for line in err.splitlines() if line.startswith("skipped:")]
    assert skipped == [f"skipped: {path}:2: not valid JSON: Expecting ',' delimiter "
                       "(column 16)",
                       f"skipped: {path}:3: field 'text' is int, not a string",
                       f"skipped: {path}:4: no field 'text'"]
    found = [(f["line"], f["field"], f["offset"], f["token_id"])
             for f in map(json.loads, out.splitlines())]
    glitch = {t for t, (v, _) in PLANTED.items() if v == "glitch"}
    want = []
    for n, rec in enumerate(records, 1):
        try:
            value = json.loads(rec)["text"]
        except (ValueError, KeyError):
            continue
        if isinstance(value, str):
            want += [(n, "text", col - 1, t) for _, col, t in
                     whole_text_hits(tok, value, glitch)]
    assert found == want and (1, "text", 1, THE) in found and (7, "text", 2, C3) in found
    # a nested field
    code, out, err = cli("check", "tiny", str(path), "--field", "meta.text", "--json",
                         "--db", str(db))
    assert code == 1
    assert [(f["line"], f["offset"]) for f in map(json.loads, out.splitlines())] == [(4, 0),
                                                                                    (6, 1)]
    # nothing found but lines skipped: exit 2, not a pass
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "quick"}\nnot json\n')
    code, out, err = cli("check", "tiny", str(bad), "--field", "text", "--db", str(db))
    assert code == 2 and "1 unreadable line skipped" in out
    assert f"skipped: {bad}:2: not valid JSON" in err


def test_check_of_a_model_never_scanned_is_one_line(cli, tiny_scan, tmp_path):
    db, _ = tiny_scan
    path = tmp_path / "a.txt"
    path.write_text("the\n")
    code, out, err = cli("check", "gemma3-270m", str(path), "--db", str(db))
    assert code == 2 and out == ""
    assert err.strip() == ("error: no stored scan of 'gemma3-270m' in this database: run "
                           "`harness scan gemma3-270m` first")
    code, _, err = cli("check", "tiny", str(tmp_path / "missing.txt"), "--db", str(db))
    assert code == 2 and err.strip().startswith("error: cannot read") and \
        err.strip().count("\n") == 0


def test_token_finder_finds_what_whole_text_tokenization_gives(tiny_model_dir, monkeypatch):
    """Cut into pieces, prefiltered or not, batched: the same tokens at the same offsets as
    tokenizing each text whole."""
    import harness.token_finder

    monkeypatch.setattr(harness.token_finder, "GROUP_CHARS", 40)  # many cuts, small groups
    tok = HFTokenizer.load(tiny_model_dir)
    raw = tok.vocab().raw
    rng = random.Random(0)
    words = ["the", " the", "quick", "Glitch", "naïve", "café", "–", "\n", "\n  ", "  ",
             "x.", "(Gl)", "🙂", "input:", "\n\n", "\tcat"]
    texts = ["".join(rng.choice(words) for _ in range(rng.randrange(1, 400)))
             for _ in range(30)]
    watch = [THE, C3, GL, 273]
    for prefilter in (True, False):
        finder = TokenFinder(tok, raw, watch, prefilter=prefilter)
        assert finder.exact and finder.cuttable
        hits = sorted((h.text, h.offset, h.token_id) for h in finder.find(texts))
        want = []
        for i, text in enumerate(texts):
            for line, col, t in whole_text_hits(tok, text, set(watch)):
                start = sum(len(x) + 1 for x in text.split("\n")[:line - 1])
                want.append((i, start + col - 1, t))
        assert hits == sorted(want) and len(hits) > 50


def test_export_formats(cli, tiny_scan, tmp_path):
    db, _ = tiny_scan
    code, out, err = cli("export", "tiny", "--db", str(db))
    assert code == 0, err
    # a lone byte is listed as its stored text; a leading space needs a JSON string
    assert out.splitlines() == ["\\xc3", '" the"', "Gl"]
    code, out, _ = cli("export", "tiny", "--format", "logit-bias", "--db", str(db))
    assert json.loads(out) == {str(C3): -100, str(THE): -100, str(GL): -100}
    code, out, _ = cli("export", "tiny", "-f", "logit-bias", "--include-suspect",
                       "--db", str(db))
    assert json.loads(out) == {str(C3): -100, str(THE): -100, str(GL): -100, "299": -100}
    code, out, _ = cli("export", "tiny", "-f", "llamacpp", "--db", str(db))
    assert out.split() == ["--logit-bias", f"{C3}-inf", "--logit-bias", f"{THE}-inf",
                           "--logit-bias", f"{GL}-inf"]
    target = tmp_path / "block.json"
    code, out, _ = cli("export", "tiny", "-f", "json", "-o", str(target), "--db", str(db))
    assert code == 0 and out == ""
    data = json.loads(target.read_text())
    assert data["model"] == "tiny" and [t["id"] for t in data["tokens"]] == [C3, THE, GL]
    the = data["tokens"][1]
    assert the["text"] == " the" and the["raw_hex"] == b" the".hex()
    assert the["repeat_prob"] == pytest.approx(0.0004)
    assert the["evidence"]["repeat-probe"]["p"]["repeats"] == pytest.approx(0.0004)
    assert the["flagged_by"] == ["repeat-probe"]
    code, _, err = cli("export", "tiny", "-f", "yaml", "--db", str(db))
    assert code == 2 and "--format must be one of text, json, logit-bias, llamacpp" in err


def test_exported_text_list_reads_back_as_truth(cli, tiny_scan, tmp_path):
    """The plain list is what `harness evaluate --truth` reads: every glitch token found."""
    db, _ = tiny_scan
    truth = tmp_path / "truth.txt"
    _, out, _ = cli("export", "tiny", "-o", str(truth), "--db", str(db))
    code, out, err = cli("evaluate", "tiny", "--truth", str(truth), "--json", "--db", str(db))
    assert code == 0, err
    ev = json.loads(out)
    assert ev["true_positives"] == 3 and ev["precision"] == 1.0 and ev["not_in_vocab"] == []


def test_show_prints_every_finding_and_structure(cli, tiny_scan):
    db, _ = tiny_scan
    code, out, err = cli("show", "tiny", str(THE), "--json", "--db", str(db))
    assert code == 0, err
    info = json.loads(out)
    assert info["id"] == THE and info["text"] == " the" and info["verdict"] == "glitch"
    assert [f["detector"] for f in info["findings"]] == ["repeat-probe", "verdict"]
    s = info["structure"]
    # no longer token of the tiny vocabulary holds ' the'; its text alone tokenizes to it
    assert s["contained_in"] == {"count": 0, "examples": []}
    assert s["alone"] == [THE] and s["reachable_alone"] is True
    assert info["structure_stored"] is False  # computed now: no neighbours without weights
    assert "neighbours" not in s
    # 'ck' (273) is inside 'ack' (293); alone, 'ck' tokenizes to itself
    code, out, _ = cli("show", "tiny", "273", "--json", "--db", str(db))
    s = json.loads(out)["structure"]
    assert s["contained_in"] == {"count": 1, "examples": [[293, "ack"]]}
    # by text (a JSON string keeps the leading space), the same token
    code, out, _ = cli("show", "tiny", '" the"', "--json", "--db", str(db))
    assert code == 0 and json.loads(out)["id"] == THE
    code, out, _ = cli("show", "tiny", "Gl", "--db", str(db))
    assert code == 0 and "final verdict: glitch" in out and "repeat-probe" in out
    code, _, err = cli("show", "tiny", "no-such-token-text", "--db", str(db))
    assert code == 2 and err.count("\n") == 1 and "no token with text" in err
    code, _, err = cli("show", "tiny", "99999", "--db", str(db))
    assert code == 2 and "outside 0..299" in err


def test_show_names_the_ids_of_an_ambiguous_text(cli, harness_home):
    from harness.vocab import Vocab

    vocab = Vocab(raw=[b"a", b"b", b"a"], text=["a", "b", "a"],
                  special=np.zeros(3, bool), byte_token=np.zeros(3, bool))
    db = harness_home / "amb.db"
    store_scan(open_db(f"sqlite:///{db}"), "hf:/nowhere", vocab, {0: ("glitch", 0.001)},
               alias="amb")
    code, _, err = cli("show", "amb", "a", "--db", str(db))
    assert code == 2 and "2 tokens have text 'a': ids 0, 2; give one id" in err
