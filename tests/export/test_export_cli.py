"""`skillkv export`: CLI usage, one-line errors (tiny random model), and the export's token-id decision."""

from __future__ import annotations

import json

import pytest
from conftest import one_line_error, run_cli as run

from export_support import manifest, served_prompt_ids

TINY = ["--model", "dummy:tiny", "--device", "cpu"]


def test_export_then_check_json(monkeypatch, capsys, tiny_skills, tmp_path):
    out_dir = tmp_path / "fleet"
    code, out, _ = run(monkeypatch, capsys, "export", "alpha-tool", "beta-codes", "--to", "sglang-hicache",
                       str(out_dir), "--model-name", "org/tiny", "--tp", "2", "--page-size", "16", "--skills",
                       str(tiny_skills), "--store", str(tmp_path / "s"), *TINY, "--json")
    assert code == 0, out
    r = json.loads(out)
    assert r["pages"] == r["prefix_tokens"] // 16 and r["files"] == 2 * r["pages"]
    assert r["left_out_tokens"] == r["prefix_tokens"] % 16
    code, out, _ = run(monkeypatch, capsys, "export", "--check", str(out_dir), "--json")
    assert code == 0
    (rep,) = json.loads(out)["reports"]
    assert rep["ok"] and [x["hits"] for x in rep["ranks"]] == [r["pages"]] * 2
    assert {p.suffix for p in out_dir.iterdir()} == {".bin", ".json"}  # nothing else, no temp file left


def test_text_output_says_what_was_left_out(monkeypatch, capsys, tiny_skills, tmp_path):
    code, out, _ = run(monkeypatch, capsys, "export", "beta-codes", "--to", "lmcache", str(tmp_path / "x"),
                       "--model-name", "org/tiny", "--hash", "builtin", "--skills", str(tiny_skills), "--store",
                       str(tmp_path / "s"), *TINY)
    assert code == 0 and "left out: the last" in out and "partial chunk" in out


@pytest.mark.parametrize("args,needle", [
    (["--to", "redis", "X", "--model-name", "m"], "unknown target"),
    (["--to", "lmcache", "X", "--model-name", "org/m@1"], "unknown model-name format"),
    (["--to", "lmcache", "X", "--model-name", "m", "--hash", "md5"], "unknown hash"),
    (["--to", "lmcache", "X"], "--model-name is required"),
    (["--to", "lmcache", "X", "--model-name", "m", "--tp", "3"], "does not divide"),
    (["--to", "lmcache", "X", "--model-name", "m", "--tp", "0"], "--tp must be"),
    (["--to", "lmcache", "X", "--model-name", "m", "--dtype", "bfloat16"], "dtype mismatch"),
    (["--to", "sglang-hicache", "X", "--model-name", "m", "--layout", "page_head"], "unknown layout"),
    (["--to", "sglang-hicache", "X", "--model-name", "m", "--page-size", "0"], "--page-size"),
    (["--to", "lmcache", "X", "--model-name", "m", "--model", "dummy:gemma3-tiny"], "sliding-window"),
    (["--to", "lmcache", "X", "--model-name", "m", "--model", "dummy:tiny", "nope"], "unknown skill"),
])
def test_one_line_errors(monkeypatch, capsys, tiny_skills, tmp_path, args, needle):
    args = [str(tmp_path / "out") if a == "X" else a for a in args]
    model = [] if "--model" in args else TINY
    code, _, err = run(monkeypatch, capsys, "export", "alpha-tool", *args, "--skills", str(tiny_skills),
                       "--store", str(tmp_path / "s"), *model)
    one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_check_errors(monkeypatch, capsys, tmp_path):
    code, _, err = run(monkeypatch, capsys, "export", "--check", str(tmp_path))
    one_line_error(code, err, "no skillkv export manifest")
    code, _, err = run(monkeypatch, capsys, "export", "--check", str(tmp_path / "missing"))
    one_line_error(code, err, "is not a folder")
    code, _, err = run(monkeypatch, capsys, "export", "alpha-tool")
    one_line_error(code, err, "--to lmcache DIR")


def test_exported_ids_are_the_servers_for_any_question(tiny_kv, tmp_path):
    from skillkv.export import export

    r = export(tiny_kv, ["gamma-notes", "alpha-tool"], "lmcache", tmp_path, "org/tiny", hash="builtin")
    m = manifest(tmp_path)
    assert m["skills"] == ["gamma-notes", "alpha-tool"] and r["cut_by_probes"] == 0
    for q in ("Which level?", "  spaced", "\nnewline", "日本語"):
        assert served_prompt_ids(tiny_kv, m["system_text"], q)[:r["prefix_tokens"]] == m["token_ids"]


def test_check_refuses_a_doctored_manifest(monkeypatch, capsys, tiny_kv, tmp_path):
    from skillkv.export import export

    export(tiny_kv, ["beta-codes"], "lmcache", tmp_path, "org/tiny", hash="builtin")
    (path,) = tmp_path.glob("skillkv-export-*.json")
    m = json.loads(path.read_text())
    m["model_name"] = "x@../../etc"
    path.write_text(json.dumps(m))
    code, _, err = run(monkeypatch, capsys, "export", "--check", str(tmp_path))
    one_line_error(code, err, "bad model name")
