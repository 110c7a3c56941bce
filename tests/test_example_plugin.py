"""The example third-party plugin (examples/glitch-harness-example), installed as a user would.

The package is pip-installed (not editable) into a temporary folder, never into the project's
virtualenv, so a failed or interrupted test leaves nothing behind and a test run beside this
one never sees it. ``harness`` then runs in a subprocess with that folder on PYTHONPATH: a
fresh process reads the entry points again, as it would after ``pip install``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from harness import plugins
from harness.detector import FindingArrays, ScanContext
from harness.vocab import Vocab

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "glitch-harness-example"
PACKAGE = "glitch-harness-example==0.1.0"

# The .npz model written by the tests: 300 token strings, 304 embedding rows (4 padding).
N_TOKENS, N_ROWS, DIM = 300, 304, 16
JUNK = {10: "------------", 20: "\n\n\n\n", 30: "\u200b", 40: " .......", 50: "\x1b"}
NOT_JUNK = {11: ".", 12: "...", 13: " (", 14: "://", 15: "'s", 16: " é", 17: "日本", 18: "  a."}
COLLAPSED = (250, 251, 252, 253)  # rows never moved from one shared initial value


@pytest.fixture(scope="module")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example package built and installed by pip into a folder of its own."""
    work = tmp_path_factory.mktemp("example-plugin")
    src = work / "src"
    shutil.copytree(EXAMPLE, src,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    site = work / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-input", "--no-index", "--no-cache-dir", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"pip could not install the example plugin:\n{proc.stderr}")
    assert (site / "glitch_harness_example-0.1.0.dist-info" / "entry_points.txt").is_file()
    return site


@pytest.fixture
def example_module(example_site: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """The installed example package, imported and registered in this process."""
    monkeypatch.syspath_prepend(str(example_site))
    module = importlib.import_module("glitch_harness_example")
    registered = "junk-text" in plugins.registry().detectors  # installed in this venv too
    if not registered:
        plugins.register_plugin(module, name="example")
    yield module
    if not registered:
        plugins.unregister_plugin(module)


def harness(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the ``harness`` command in a fresh process that sees the installed example."""
    script = Path(sys.executable).with_name("harness")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "harness.cli"]
    path = os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([*command, *args], env={**os.environ, "PYTHONPATH": path},
                          cwd=site.parent, capture_output=True, text=True, timeout=120)


def write_model(path: Path) -> Path:
    """An .npz model with planted junk tokens and collapsed embedding rows."""
    def word(i: int) -> str:  # distinct for every i: i written in base 26 with letters
        return chr(97 + i % 26) if i < 26 else word(i // 26) + chr(97 + i % 26)

    rng = np.random.default_rng(7)
    tokens = [("" if i % 2 else " ") + word(i) for i in range(N_TOKENS)]
    tokens[0] = "<|endoftext|>"
    for i, text in {**JUNK, **NOT_JUNK}.items():
        tokens[i] = text
    emb = rng.normal(size=(N_ROWS, DIM)).astype(np.float32)
    emb[list(COLLAPSED)] = 0.001
    special = np.zeros(N_TOKENS, dtype=bool)
    special[0] = True
    np.savez(path, embeddings=emb, tokens=np.array(tokens, dtype=str),
             unembeddings=emb * 0.5, special=special)
    return path


def test_pip_installed_plugin_is_listed_with_its_package(example_site):
    proc = harness(example_site, "plugins", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    backends = {b["name"]: b["package"] for b in data["backends"]}
    detectors = {d["name"]: d for d in data["detectors"]}
    assert backends["npz"] == PACKAGE
    assert backends["hf"].startswith("glitch-harness==")
    assert detectors["junk-text"]["package"] == PACKAGE
    assert detectors["junk-text"]["requires"] == ["vocab"]
    assert detectors["junk-text"]["version"] == "1"
    assert "embedding-centroid" in detectors
    assert "example" in data["plugins"]


def test_scan_npz_file_with_the_plugin_detector(example_site, tmp_path):
    model = write_model(tmp_path / "model.npz")
    db = str(tmp_path / "results.db")
    proc = harness(example_site, "scan", f"npz:{model}", "-d", "junk-text,embedding-centroid",
                   "--db", db)
    assert proc.returncode == 0, proc.stderr
    assert "junk-text: ok 299, suspect 5" in proc.stdout

    def sql(query: str) -> list[dict]:
        result = harness(example_site, "sql", query, "--json", "--db", db)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    rows = sql("SELECT detector, token_id, text, score FROM latest_findings "
               "WHERE verdict = 'suspect' ORDER BY detector, token_id")
    flagged = {d: [r["token_id"] for r in rows if r["detector"] == d]
               for d in ("junk-text", "embedding-centroid")}
    assert flagged["junk-text"] == sorted(JUNK)
    assert flagged["embedding-centroid"] == list(COLLAPSED)
    junk = {r["token_id"]: r for r in rows if r["detector"] == "junk-text"}
    assert junk[10]["text"] == "------------" and junk[10]["score"] == 1.0
    assert junk[40]["score"] == 1.0  # the leading space is junk too
    assert junk[50]["score"] == 1.0  # flagged for its control character

    counts = sql("SELECT r.detector, r.status, count(f.token_id) AS n FROM runs r "
                 "JOIN findings f ON f.run_id = r.id GROUP BY r.id ORDER BY r.id")
    assert counts == [{"detector": "junk-text", "status": "done", "n": N_ROWS},
                      {"detector": "embedding-centroid", "status": "done", "n": N_ROWS}]
    evidence = sql("SELECT json(evidence_json) AS e, score FROM latest_findings "
                   "WHERE detector = 'junk-text' AND token_id IN (18, 303) ORDER BY token_id")
    assert json.loads(evidence[0]["e"]) == {"chars": 4, "space": 2, "punct": 1, "control": 0,
                                           "repeats": 1}
    assert evidence[0]["score"] == 0.75  # "  a." is not junk enough
    assert evidence[1]["score"] is None  # a padding row has no text
    models = sql("SELECT backend, fingerprint, vocab_size, meta_json FROM models")
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    assert models[0]["backend"] == "npz" and models[0]["vocab_size"] == N_ROWS
    assert f"npz|sha256:{digest}|float32|" in models[0]["fingerprint"]
    assert json.loads(models[0]["meta_json"])["tied"] is False
    categories = sql("SELECT token_id, category FROM tokens WHERE category != 'normal' "
                     "ORDER BY token_id")
    assert {r["token_id"]: r["category"] for r in categories} == {
        0: "special", **{r: "padding" for r in range(N_TOKENS, N_ROWS)}}

    again = harness(example_site, "scan", f"npz:{model}", "-d", "junk-text", "--db", db)
    assert again.returncode == 0, again.stderr
    assert "stored run reused" in again.stdout  # same file, same fingerprint


def test_unknown_detector_is_one_line_naming_the_plugins_detectors(example_site, tmp_path):
    model = write_model(tmp_path / "model.npz")
    proc = harness(example_site, "scan", f"npz:{model}", "-d", "no-such-detector",
                   "--db", str(tmp_path / "results.db"))
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "error: unknown detector 'no-such-detector'" in proc.stderr
    assert "junk-text" in proc.stderr and "embedding-centroid" in proc.stderr


def test_junk_text_on_the_fake_backend(cli, fake_plugin, example_module):
    code, out, err = cli("scan", "fake-model", "-d", "junk-text,embedding-centroid")
    assert code == 0, err
    assert "junk-text: ok 64 " in out  # plain letters: nothing flagged
    code, out, _ = cli("sql", "SELECT token_id FROM latest_findings WHERE verdict = 'suspect' "
                       "ORDER BY token_id", "--csv")
    assert out.split()[1:] == [str(i) for i in fake_plugin.COLLAPSED]

    # the same detector on the fake backend with a vocabulary that holds junk
    backend = fake_plugin.FakeBackend("seed-2")
    texts = ["<|pad|>", "\n\n\n\n\n", "    ", "=====", "\x00", "abc", "...", " ----",
             "\u200b", "\ue000", "\ufffd", "\u2500\u2500\u2500\u2500", "\t\t\t", "\x1b[0m",
             "a-b-c-", "日本語", " \u3000 \u3000"]
    raw = [t.encode() for t in texts] + [b"\xe2\x80", b"\xff", b""]
    special = np.zeros(len(raw), dtype=bool)
    special[[0, 1]] = True
    categories = np.array(["special", "special"] + ["normal"] * (len(raw) - 3) + ["padding"],
                          dtype=object)
    vocab = Vocab(raw=raw, text=[r.decode("utf-8", "backslashreplace") for r in raw],
                  special=special, byte_token=np.zeros(len(raw), dtype=bool))
    ctx = ScanContext(backend=backend, vocab=vocab, categories=categories)

    def flagged(**options: object) -> list[int]:
        detector = example_module.JunkText(**options)
        assert detector.prepare(ctx)["unicode"] == unicodedata.unidata_version
        batches = list(detector.run(ctx, np.arange(len(raw))[::-1]))
        assert all(isinstance(b, FindingArrays) for b in batches)
        ids = np.concatenate([b.token_ids for b in batches])
        assert ids.tolist() == list(range(len(raw)))[::-1]
        verdicts = np.concatenate([b.verdicts for b in batches])
        return sorted(ids[verdicts == "suspect"].tolist())

    # 1 is special; 6 and 12 have 3 characters; 14 is 50 % junk; 17, 18: undecodable bytes
    assert flagged() == [2, 3, 4, 7, 8, 9, 10, 11, 13, 16]
    assert flagged(whitespace="false") == [3, 4, 7, 8, 9, 10, 11, 13]
    assert flagged(control=False, min_chars="3") == [2, 3, 6, 7, 11, 12, 16]
    assert flagged(fraction="0.5", control=False) == [2, 3, 7, 11, 13, 14, 16]


def test_vectorised_text_stats_match_a_loop_over_tokens(example_module):
    from glitch_harness_example import junk_text

    rng = np.random.default_rng(0)
    alphabet = [b"a", b" ", b"-", b"\n", b"\x00", b"\xff", b"\xe2", b"\x80", b"\xe2\x80\x94",
                b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"\xed\xb3\xbf", b"\xef\xbb\xbf", b"|"]
    raw = [b"".join(alphabet[j] for j in rng.integers(0, len(alphabet), size=rng.integers(0, 7)))
           for _ in range(3000)]
    stats = junk_text.text_stats(raw)
    for i, token in enumerate(raw):
        chars = token.decode("utf-8", "surrogateescape")
        classes = junk_text.classify(np.array([ord(c) for c in chars], dtype=np.int64))
        expected = {"chars": len(chars), "space": int((classes == junk_text.SPACE).sum()),
                    "punct": int((classes == junk_text.PUNCT).sum()),
                    "control": int((classes == junk_text.CONTROL).sum()),
                    "repeats": sum(a == b for a, b in zip(chars, chars[1:], strict=False))}
        assert {k: int(v[i]) for k, v in stats.items()} == expected, token
    sample = " \t\n-.,=|~\u2500\x00\x1b\u200b\ufeff\ue000\ufffdaé日😀\U000e0041\U000f0000\udcff"
    assert junk_text.classify(np.array([ord(c) for c in sample])).tolist() == [
        1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 0, 0, 0, 0, 3, 3, 4]


def test_npz_backend_errors_are_one_line(cli, example_module, tmp_path):
    good = write_model(tmp_path / "good.npz")
    (tmp_path / "text.npz").write_text("not an archive")
    np.save(tmp_path / "single.npy", np.zeros((3, 2)))
    np.savez(tmp_path / "no-tokens.npz", embeddings=np.zeros((3, 2)))
    np.savez(tmp_path / "short.npz", embeddings=np.zeros((2, 2)), tokens=np.array(["a", "b", "c"]))
    np.savez(tmp_path / "bytes.npz", embeddings=np.zeros((2, 2)), tokens=np.array([b"a", b"b"]))
    np.savez(tmp_path / "pickled.npz", embeddings=np.zeros((2, 2)),
             tokens=np.array(["a", None], dtype=object))
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:2000])
    cases = {
        "missing.npz": "npz: no such file",
        "text.npz": "is not a readable .npz archive",
        "single.npy": "holds a single array (.npy)",
        "no-tokens.npz": "lacks 'tokens' (arrays: embeddings)",
        "short.npz": "3 tokens but only 2 embedding rows",
        "bytes.npz": "'tokens' must be a 1-D array of str",
        "pickled.npz": "is not a readable .npz archive",
        "truncated.npz": "is not a readable .npz archive",
    }
    for name, message in cases.items():
        code, _, err = cli("scan", f"npz:{tmp_path / name}", "-d", "junk-text")
        assert code == 2, (name, err)
        assert err.strip().count("\n") == 0 and err.strip().startswith("error: npz: "), err
        assert message in err, (name, err)

    backend = example_module.NpzBackend(str(good))
    assert backend.encode(" ....... .") == [40, 11]
    assert backend.decode([10, 11]) == "------------."
    assert backend.fingerprint() == example_module.NpzBackend(str(good)).fingerprint()
    assert np.array_equal(backend.output_embeddings(), backend.input_embeddings() * 0.5)


def test_npz_backend_declares_an_option_that_scan_accepts(cli, example_module, tmp_path):
    """The example backend's one declared option: listed by `harness plugins`, given with
    -b; an option it does not declare is one line naming the ones it has."""
    model = write_model(tmp_path / "model.npz")
    with np.load(model) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["wte"] = arrays.pop("embeddings")
    renamed = tmp_path / "renamed.npz"
    np.savez(renamed, **arrays)

    code, out, _ = cli("plugins", "--json")
    npz = next(b for b in json.loads(out)["backends"] if b["name"] == "npz")
    assert [(o["name"], o["type"], o["default"]) for o in npz["options"]] == \
        [("embeddings_key", "str", "embeddings")]

    code, _, err = cli("scan", f"npz:{renamed}", "-d", "embedding-centroid")
    assert code == 2 and "lacks 'embeddings'" in err
    code, out, err = cli("scan", f"npz:{renamed}", "-d", "embedding-centroid",
                         "-b", "embeddings_key=wte")
    assert code == 0, err
    code, plain, err = cli("scan", f"npz:{model}", "-d", "embedding-centroid")
    assert code == 0, err
    counts = [line for line in out.splitlines() if "embedding-centroid:" in line]
    assert counts and counts[0].split("(")[0] == \
        [line for line in plain.splitlines() if "embedding-centroid:" in line][0].split("(")[0]

    code, _, err = cli("scan", f"npz:{model}", "-d", "embedding-centroid", "-b", "threads=2")
    assert code == 2 and err.strip().count("\n") == 0
    assert "backend 'npz' has no option threads (its options: embeddings_key" in err

    # harness compare passes the same option to the scans it runs
    np.savez(tmp_path / "other.npz", **{**arrays, "wte": arrays["wte"] * 2})
    code, out, err = cli("compare", f"npz:{renamed}", f"npz:{tmp_path / 'other.npz'}",
                         "-d", "embedding-centroid", "-b", "embeddings_key=wte",
                         "--format", "json")
    assert code == 0, err
    assert "embedding-centroid" in json.loads(out)["detectors"]
