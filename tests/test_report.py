"""`harness report`: one self-contained HTML file from the stored runs of three tiny GPT-2s
(two sharing a tokenizer, one whose token ids are shifted by an extra special token), checked
against the database with SQL and rendered by a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from harness.db import open_db
from harness.runner import scan
from tests.conftest import CORPUS, DATABASES, PLANTED, TINY_ROWS, TINY_VOCAB
from tests.dbs import execute, is_postgres
from tests.dbs import query as _query

PLANTED_TEXT = "<b>&amp;</b>\x00\u202e"  # markup, an entity, a control char, an RTL override
# PostgreSQL's text cannot hold NUL: there the control character is another one
PLANTED_TEXTS = {"sqlite": PLANTED_TEXT, "postgresql": "<b>&amp;</b>\x01\u202e"}
PLANTED_SHOWN = {"sqlite": "&#x27;&lt;b&gt;&amp;amp;&lt;/b&gt;\\x00\\u202e&#x27;",
                 "postgresql": "&#x27;&lt;b&gt;&amp;amp;&lt;/b&gt;\\x01\\u202e&#x27;"}
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                  "--hide-scrollbars"]


def query(db: Path | str, sql: str, *params) -> list[tuple]:
    return _query(db, sql, *params)


def _other_weights(src: Path, dst: Path) -> Path:
    """A copy of the tiny GPT-2 (same tokenizer) whose collapsed rows are others."""
    import torch
    from transformers import GPT2LMHeadModel

    shutil.copytree(src, dst)
    model = GPT2LMHeadModel.from_pretrained(src)
    with torch.no_grad():
        model.transformer.wte.weight[list(PLANTED)] = torch.randn(len(PLANTED), 32) * 0.02
        model.transformer.wte.weight[[200, 201, 202, 203]] = 0.0005
    model.save_pretrained(dst)
    return dst


def _shifted_tokenizer(dst: Path) -> Path:
    """A tiny GPT-2 whose tokenizer has one more special token in front: the same byte
    strings get ids one higher, so only raw bytes align its tokens with the others'."""
    import torch
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CORPUS, vocab_size=TINY_VOCAB, min_frequency=1,
                            special_tokens=["<|endoftext|>", "<|pad|>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", unk_token="<|endoftext|>",
                                  pad_token="<|pad|>")
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=TINY_ROWS, n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # the same byte strings as the tiny model's planted rows
        model.transformer.wte.weight[[t + 1 for t in PLANTED]] = 0.0005
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


@pytest.fixture(scope="module", params=DATABASES)
def stored(request, tiny_model_dir, tmp_path_factory):
    """A database (SQLite, then PostgreSQL) holding budget-mode scans of three tiny models;
    one glitch token of the first gets a nasty text planted (tokens.text only: raw bytes
    stay)."""
    base = tmp_path_factory.mktemp("report")
    other = _other_weights(tiny_model_dir, base / "other-weights")
    shifted = _shifted_tokenizer(base / "shifted-tokenizer")
    pg_name = None
    if request.param == "sqlite":
        db = f"sqlite:///{base / 'results.db'}"
    else:
        server = request.getfixturevalue("pg_server")
        pg_name, db = server.new_database()
    engine = open_db(db)
    models = {}
    for name, folder in (("a", tiny_model_dir), ("b", other), ("c", shifted)):
        result = scan(str(folder), engine, candidates=0.02)  # a short table: budget mode
        assert result.verdict is not None and result.verdict.status == "done"
        models[name] = (str(folder), result.model_id)
    engine.dispose()
    (hashes,) = zip(*query(db, "SELECT tokenizer_hash FROM models ORDER BY id"), strict=True)
    assert hashes[0] == hashes[1] != hashes[2]
    planted = query(db, "SELECT min(token_id) FROM glitch_tokens WHERE model_id = ?",
                    models["a"][1])[0][0]
    assert planted is not None, "the tiny model has no glitch token to plant a text on"
    execute(db, "UPDATE tokens SET text = ? WHERE model_id = ? AND token_id = ?",
            (PLANTED_TEXTS[request.param], models["a"][1], planted))
    yield db, models, planted
    if pg_name is not None:
        request.getfixturevalue("pg_server").drop_database(pg_name)


def render(cli, db: Path | str, out: Path, *models: str) -> str:
    code, stdout, stderr = cli("report", *models, "--db", str(db), "-o", str(out))
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    assert out.is_file()
    return out.read_text(encoding="utf-8")


class Tables(HTMLParser):
    """Every <table> of a page as its class, data- attributes and body rows of cell texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tables: list[dict] = []
        self._cell: list[str] | None = None
        self._in_body = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"class": a.get("class"), "attrs": a, "rows": []})
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._in_body:
            self.tables[-1]["rows"].append([])
        elif tag == "td" and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[-1]["rows"][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "tbody":
            self._in_body = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def of(self, cls: str) -> list[dict]:
        return [t for t in self.tables if t["class"] == cls]


def parse(page: str) -> Tables:
    p = Tables()
    p.feed(page)
    return p


def test_report_is_self_contained_and_matches_the_database(cli, stored, tmp_path):
    db, models, planted = stored
    (a, id_a), (b, id_b), (c, id_c) = models["a"], models["b"], models["c"]
    page = render(cli, db, tmp_path / "report.html", a, b, c)

    # self-contained: nothing fetched from anywhere, images inline
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|iframe)\b", page)
    links = re.findall(r"""\b(?:src|href)\s*=\s*["']([^"']*)""", page)
    assert links and all(u.startswith(("data:image/png;base64,", "#")) for u in links)
    n_detectors = query(db, "SELECT count(*) FROM latest_runs WHERE detector != 'verdict'")[0][0]
    n_static = query(db, "SELECT count(*) FROM latest_runs WHERE detector IN "
                         "('embedding-centroid', 'unembedding-cosine')")[0][0]
    assert (n_detectors, n_static) == (12, 6)
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == n_detectors + n_static + 1  # histograms, scatters, one bar chart
    import base64

    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)

    # header: the stored facts of each model
    for _, model_id in models.values():
        fp, vocab = query(db, "SELECT fingerprint, vocab_size FROM models WHERE id = ?",
                          model_id)[0]
        assert f"<code>{fp}</code>" in page and f"{vocab:,} tokens" in page
        for verdict, n in query(db, "SELECT verdict, count(*) FROM final_verdicts "
                                    "WHERE model_id = ? GROUP BY 1", model_id):
            if verdict in ("glitch", "suspect"):
                assert f'<span class="v-{verdict}">{n:,} {verdict}</span>' in page

    # the glitch-token tables hold exactly the glitch_tokens view, least repeatable first
    tables = {int(t["attrs"]["data-model-id"]): t for t in parse(page).of("tokens")}
    assert set(tables) == {id_a, id_b, id_c}
    for model_id, table in tables.items():
        want = query(db, "SELECT token_id, text, raw, category, repeat_prob FROM "
                         "glitch_tokens WHERE model_id = ? ORDER BY repeat_prob IS NULL, "
                         "repeat_prob, token_id", model_id)
        assert want and table["attrs"]["data-kind"] == "glitch"
        assert len(table["rows"]) == len(want)
        for cells, (tid, text, raw, category, prob) in zip(table["rows"], want, strict=True):
            assert int(cells[0]) == tid and cells[2] == category
            # the text as repr; a lone byte of a multi-byte character as its bytes
            lone = category in ("byte", "undecodable") and not raw.isascii()
            assert cells[1] == (repr(raw) if lone else repr(text))
            assert cells[3] == "glitch"
            assert float(cells[4]) == pytest.approx(prob, rel=5e-3)
        # the evidence: every probe prompt's completion, as repr
        tid = want[0][0]
        ev = json.loads(query(db, "SELECT evidence_json FROM latest_findings WHERE model_id = ? "
                                  "AND detector = 'repeat-probe' AND token_id = ?",
                              model_id, tid)[0][0])
        for label, completion in ev["completion"].items():
            assert f"{label}: {repr(completion)}" in table["rows"][0][6]

    # token text is escaped: markup, entities and control characters never reach the page raw
    kind = "postgresql" if is_postgres(db) else "sqlite"
    assert "<b>&amp;</b>" not in page and "\x00" not in page and "\u202e" not in page
    assert "\x01" not in page
    assert PLANTED_SHOWN[kind] in page
    row = [r for r in tables[id_a]["rows"] if int(r[0]) == planted]
    assert row and row[0][1] == repr(PLANTED_TEXTS[kind])

    # overlap: token ids under one tokenizer, raw bytes across tokenizers
    label = dict(query(db, "SELECT id, coalesce(alias, ref) FROM models"))
    overlap = {(r[0], r[1]): r for r in parse(page).of("overlap")[0]["rows"]}
    assert len(overlap) == 3
    for ix, iy in ((id_a, id_b), (id_a, id_c), (id_b, id_c)):
        key = "token_id" if (ix, iy) == (id_a, id_b) else \
            "CASE WHEN length(raw) > 0 THEN raw ELSE printf('row %d of %d', token_id, model_id) END"
        if is_postgres(db) and key != "token_id":  # one type per CASE: hex text of the bytes
            key = ("CASE WHEN length(raw) > 0 THEN encode(raw, 'hex') "
                   "ELSE format('row %s of %s', token_id, model_id) END")
        both, only_x, only_y = query(db, f"""
            WITH gx AS (SELECT DISTINCT {key} AS k FROM glitch_tokens WHERE model_id = ?),
                 gy AS (SELECT DISTINCT {key} AS k FROM glitch_tokens WHERE model_id = ?)
            SELECT (SELECT count(*) FROM gx WHERE k IN (SELECT k FROM gy)),
                   (SELECT count(*) FROM gx WHERE k NOT IN (SELECT k FROM gy)),
                   (SELECT count(*) FROM gy WHERE k NOT IN (SELECT k FROM gx))""",
                                     ix, iy)[0]
        cells = overlap[(label[ix], label[iy])]
        assert cells[2].startswith("token id" if ix == id_a and iy == id_b else "raw bytes")
        assert [int(v) for v in cells[3:6]] == [both, only_x, only_y]
    # the shifted tokenizer's planted rows are the same byte strings: they align by bytes
    (shared,) = query(db, "SELECT count(*) FROM glitch_tokens x JOIN glitch_tokens y "
                          "ON x.raw = y.raw AND x.token_id + 1 = y.token_id "
                          "WHERE x.model_id = ? AND y.model_id = ? AND length(x.raw) > 0",
                    id_a, id_c)[0]
    assert shared >= 1 and int(overlap[(label[id_a], label[id_c])][3]) >= shared


def test_report_caps_the_table_and_labels_suspects(stored):
    from harness.report import build_report

    db, models, _ = stored
    engine = open_db(db)
    (n,) = query(db, "SELECT count(*) FROM glitch_tokens WHERE model_id = ?",
                 models["a"][1])[0]
    page = build_report(engine, [models["a"][0]], cap=3)
    (table,) = parse(page).of("tokens")
    assert len(table["rows"]) == 3 and f"… and {n - 3:,} more, not shown" in page
    assert "Overlap" not in page and page.count("data:image/png;base64,") == 6

    # no verified glitch token: the suspect ones, clearly labelled as such
    model_id = models["b"][1]
    run, = query(db, "SELECT DISTINCT run_id FROM final_verdicts WHERE model_id = ?",
                 model_id)[0]
    glitch = query(db, "SELECT token_id FROM glitch_tokens WHERE model_id = ?", model_id)
    execute(db, "UPDATE findings SET verdict = 'suspect' WHERE run_id = ? "
                "AND verdict = 'glitch'", (run,))
    try:
        page = build_report(engine, [models["b"][0]])
        (table,) = parse(page).of("tokens")
        suspects = query(db, "SELECT token_id FROM final_verdicts WHERE model_id = ? AND "
                             "verdict = 'suspect' ORDER BY repeat_prob IS NULL, repeat_prob, "
                             "token_id", model_id)
        assert table["attrs"]["data-kind"] == "suspect"
        assert [int(r[0]) for r in table["rows"]] == [t for (t,) in suspects]
        assert "Suspect tokens (none verified)" in page
        assert "No token was verified as a glitch token" in page
    finally:
        execute(db, "UPDATE findings SET verdict = 'glitch' WHERE run_id = ? "
                "AND token_id = ?", *[(run, t) for (t,) in glitch])
        engine.dispose()


def test_report_of_unscanned_or_static_only_models(cli, db_url, fake_plugin, tmp_path):
    out = tmp_path / "r.html"
    code, _, err = cli("report", "never-scanned", "-o", str(out))
    assert code == 2 and "harness scan never-scanned" in err, err
    assert err.strip().count("\n") == 0 and not out.exists()

    engine = open_db(db_url)
    scan("fake-model", engine, ["needs-score"])  # skipped: the fake backend cannot score
    code, _, err = cli("report", "fake-model", "-o", str(out))
    assert code == 2 and "no finished detector run" in err
    assert "run `harness scan fake-model` first" in err and not out.exists()

    scan("fake-model", engine, ["embedding-centroid"])  # static only: no final verdicts
    code, _, err = cli("report", "never-scanned", "-o", str(out))
    assert code == 2 and "no stored scan of 'never-scanned'" in err
    assert "run `harness scan never-scanned` first" in err
    code, _, err = cli("report", "fake-model", "-o", str(out))
    assert code == 0, err
    page = out.read_text(encoding="utf-8")
    (table,) = parse(page).of("tokens")
    flagged = query(db_url,
                    "SELECT token_id FROM flagged_tokens ORDER BY token_id")
    assert table["attrs"]["data-kind"] == "flagged"
    assert sorted(int(r[0]) for r in table["rows"]) == [t for (t,) in flagged]
    assert "Flagged tokens (no final verdicts)" in page
    assert page.count("data:image/png;base64,") == 1  # one histogram, no scatter
    code, _, err = cli("report", "fake-model", "-o", str(tmp_path / "no" / "such" / "r.html"))
    assert code == 2 and "no folder" in err


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is not installed, so the report cannot be rendered: "
                    "install it with `apt-get install -y chromium` (`make install` does)")
    return path


def test_report_renders_in_headless_chromium(cli, stored, tmp_path):
    from matplotlib.image import imread

    db, models, _ = stored
    if is_postgres(db):
        pytest.skip("the page does not depend on the database: rendered once, from SQLite")
    chromium = _chromium()
    report = tmp_path / "report.html"
    render(cli, db, report, models["a"][0], models["c"][0])
    shot = tmp_path / "shot.png"
    run = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-1'}",
         "--window-size=1280,2400", f"--screenshot={shot}", report.as_uri()],
        capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (2400, 1280)
    assert pixels.std() > 0.05  # not one flat colour
    ink = (pixels.mean(axis=2) < 0.6).mean()
    assert 0.005 < ink < 0.5, ink  # text and plots on a white page
    red = np.abs(pixels - np.array([0xC0, 0x39, 0x2B]) / 255).max(axis=2) < 0.08
    assert red.sum() > 500  # the inline style applied: red rules, glitch bars, crosses

    dom = subprocess.run(
        [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile-2'}",
         "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=300)
    assert dom.returncode == 0, dom.stderr[-2000:]
    tables = {int(t["attrs"]["data-model-id"]): t for t in parse(dom.stdout).of("tokens")}
    for _, model_id in (models["a"], models["c"]):
        (n,) = query(db, "SELECT count(*) FROM glitch_tokens WHERE model_id = ?", model_id)[0]
        assert len(tables[model_id]["rows"]) == n > 0
    assert len(parse(dom.stdout).of("overlap")[0]["rows"]) == 1
