"""The CLI: one-line errors with non-zero exits, JSON output, batch mode (tiny random model)."""

from __future__ import annotations

import json

import pytest
from conftest import one_line_error, run_cli as run

TINY = ["--model", "dummy:tiny", "--device", "cpu"]


def json_error(code, out, err, needle):
    """With --json an error is one JSON object on stdout, the same exit code, nothing on stderr."""
    assert code != 0 and err == "", err
    obj = json.loads(out)
    assert set(obj) == {"error"} and needle in obj["error"]["message"] and obj["error"]["exit_code"] == code
    return obj["error"]


def test_compile_then_ask_json(monkeypatch, capsys, tiny_skills, tmp_path):
    store = str(tmp_path / "store")
    code, out, _ = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY, "--json")
    assert code == 0
    assert {r["status"] for r in json.loads(out)["results"]} == {"compiled"}
    code, out, _ = run(monkeypatch, capsys, "ask", "What does B-17 mean?", "--skill", "beta-codes", "--skills",
                       str(tiny_skills), "--store", store, *TINY, "--json", "--max-tokens", "5")
    assert code == 0
    ans = json.loads(out)
    assert set(ans) >= {"answer", "output_token_ids", "skills", "mode", "tokens", "timings_ms", "model"}
    assert set(ans["tokens"]) == {"prompt", "cached", "computed", "prefix_cache", "skill_kv"}
    assert ans["tokens"]["cached"] == ans["tokens"]["prefix_cache"] + ans["tokens"]["skill_kv"]
    assert set(ans["timings_ms"]) == {"model_load", "snapshot_load", "ttft", "total"}
    assert ans["skills"] == ["beta-codes"] and ans["mode"] == "exact" and ans["tokens"]["cached"] > 0
    code, out, _ = run(monkeypatch, capsys, "ls", str(tiny_skills), "--store", store, *TINY[:2], "--json")
    assert code == 0 and {s["state"] for s in json.loads(out)["skills"]} == {"current"}


def test_compile_verify_recompiles_what_a_plain_compile_finds_current(monkeypatch, capsys, tiny_skills, tmp_path):
    store = tmp_path / "store"
    code, _, _ = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", str(store), *TINY, "--json")
    files = sorted(store.glob("*/snapshots/beta-codes-*.safetensors"))
    assert code == 0 and len(files) == 1
    data = bytearray(files[0].read_bytes())
    data[-100] ^= 0xFF  # in the tensors: the header still says current
    files[0].write_bytes(bytes(data))
    statuses = []
    for flags in ([], ["--verify"], ["--verify"]):
        code, out, _ = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", str(store), *TINY, "--json",
                           *flags)
        statuses.append({r["skill"]: r["status"] for r in json.loads(out)["results"]})
        assert code == 0
    assert set(statuses[0].values()) == {"up to date"}
    assert statuses[1].pop("beta-codes") == "recompiled" and set(statuses[1].values()) == {"up to date"}
    assert set(statuses[2].values()) == {"up to date"}


def test_ask_streams_text_and_stats(monkeypatch, capsys, tiny_skills, tmp_path):
    code, out, err = run(monkeypatch, capsys, "ask", "What does B-17 mean?", "-s", "beta-codes", "--skills",
                         str(tiny_skills), "--store", str(tmp_path / "s"), *TINY, "--max-tokens", "3")
    assert code == 0
    assert "mode exact" in err and "cached" in err


def test_batch(monkeypatch, capsys, tiny_skills, tmp_path):
    f = tmp_path / "q.jsonl"
    f.write_text('{"q": "What does B-17 mean?", "skills": ["beta-codes"]}\n\n'
                 '{"q": "Which level is the default?", "skills": ["alpha-tool", "beta-codes"]}\n'
                 '{"q": "What do the beta error codes mean?"}\n')
    code, out, _ = run(monkeypatch, capsys, "ask", "--batch", str(f), "--skills", str(tiny_skills), "--store",
                       str(tmp_path / "s"), *TINY, "--max-tokens", "2")
    assert code == 0
    rows = [json.loads(x) for x in out.splitlines()]
    assert [r["skills"] for r in rows] == [["beta-codes"], ["alpha-tool", "beta-codes"], ["beta-codes"]]
    assert rows[2]["tokens"]["cached"] > 0  # loaded once, reused


@pytest.mark.parametrize("case", ["missing", "empty", "file", "all-malformed"])
def test_bad_skills_folder(monkeypatch, capsys, tmp_path, case):
    target = tmp_path / "skills"
    if case == "empty":
        target.mkdir()
    elif case == "file":
        target.write_text("x")
    elif case == "all-malformed":
        (target / "bad").mkdir(parents=True)
        (target / "bad" / "SKILL.md").write_text("---\nname: [unclosed\n---\nbody\n")
    code, out, err = run(monkeypatch, capsys, "compile", str(target), "--store", str(tmp_path / "s"), *TINY)
    assert code != 0 and "Traceback" not in err
    if case != "all-malformed":
        one_line_error(code, err, str(target))
    else:
        line = [ln for ln in err.splitlines() if "skipped" in ln]
        assert len(line) == 1 and "bad/SKILL.md" in line[0] and "not valid YAML" in line[0]


def test_malformed_skill_is_skipped_others_compile(monkeypatch, capsys, tiny_skills, tmp_path):
    (tiny_skills / "broken").mkdir()
    (tiny_skills / "broken" / "SKILL.md").write_text("---\nname: broken\n---\nno description here\n")
    code, out, _ = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", str(tmp_path / "s"), *TINY,
                       "--json")
    assert code == 1  # a skill was skipped; the others compiled
    res = {r["skill"]: r for r in json.loads(out)["results"]}
    assert sum(r["status"] == "compiled" for r in res.values()) == 3
    skipped = [r for r in res.values() if r["status"] == "skipped"]
    assert len(skipped) == 1 and "broken/SKILL.md" in skipped[0]["reason"] and "description" in skipped[0]["reason"]


@pytest.mark.parametrize("argv,needle", [
    (["ask", ""], "question is empty"),
    (["ask", "hi", "--skill", "nope"], "unknown skill 'nope'"),
    (["ask", "hi", "--mode", "fast"], "unknown mode"),
])
def test_ask_errors(monkeypatch, capsys, tiny_skills, tmp_path, argv, needle):
    code, _, err = run(monkeypatch, capsys, *argv, "--skills", str(tiny_skills), "--store", str(tmp_path / "s"),
                       *TINY)
    one_line_error(code, err, needle)


def test_unknown_model(monkeypatch, capsys, tiny_skills, tmp_path):
    code, _, err = run(monkeypatch, capsys, "compile", str(tiny_skills), "--model", str(tmp_path / "no-such-model"))
    one_line_error(code, err, "not found")
    code, _, err = run(monkeypatch, capsys, "compile", str(tiny_skills), "--model", "dummy:no-such-preset")
    one_line_error(code, err, "unknown dummy model")


def test_unwritable_store(monkeypatch, capsys, tiny_skills, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    code, _, err = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", str(blocker / "store"), *TINY)
    one_line_error(code, err, "is a file")
    assert blocker.read_text() == "I am a file, not a folder"


def test_prompt_too_long(monkeypatch, capsys, tiny_skills, tmp_path):
    (tiny_skills / "alpha-tool" / "SKILL.md").write_text(
        "---\nname: alpha-tool\ndescription: huge\n---\n" + "word " * 5000)
    code, _, err = run(monkeypatch, capsys, "ask", "What?", "--skill", "alpha-tool", "--skills", str(tiny_skills),
                       "--store", str(tmp_path / "s"), *TINY)
    one_line_error(code, err, "exceeds the model's context of 4,096 tokens")


def test_bad_batch_lines_get_their_own_error_lines(monkeypatch, capsys, tiny_skills, tmp_path):
    """Issue 12: a bad line (not JSON, no "q", an unknown skill, too long) gets {"error": ...} on its own output
    line, every other line is answered, and the exit code is 1."""
    f = tmp_path / "q.jsonl"
    f.write_text('{"q": "What does B-17 mean?", "skills": ["beta-codes"]}\nnot json\n\n{"skills": []}\n'
                 '{"q": "hi", "skills": ["nope"]}\n{"q": "' + "word " * 5000 + '"}\n'
                 '{"q": "What does B-42 mean?", "skills": ["beta-codes"]}\n')
    code, out, err = run(monkeypatch, capsys, "ask", "--batch", str(f), "--skills", str(tiny_skills), "--store",
                         str(tmp_path / "s"), *TINY, "--max-tokens", "2")
    assert code == 1 and "Traceback" not in err
    rows = [json.loads(x) for x in out.splitlines()]
    assert len(rows) == 6  # one per non-empty line, in order
    assert rows[0]["skills"] == ["beta-codes"] and rows[5]["skills"] == ["beta-codes"]
    errors = [r["error"] for r in rows[1:5]]
    assert [e["line"] for e in errors] == [2, 4, 5, 6]
    assert "q.jsonl:2: not a JSON object" in errors[0]["message"] and "'q'" in errors[1]["message"]
    assert "unknown skill 'nope'" in errors[2]["message"] and errors[2]["type"] == "skill_error"
    assert "exceeds the model's context" in errors[3]["message"] and errors[3]["type"] == "prompt_too_long"
    # every line fine: exit 0; an unreadable file: one error, exit 2
    f.write_text('{"q": "What does B-17 mean?", "skills": ["beta-codes"]}\n')
    assert run(monkeypatch, capsys, "ask", "--batch", str(f), "--skills", str(tiny_skills), "--store",
               str(tmp_path / "s"), *TINY, "--max-tokens", "2")[0] == 0
    code, _, err = run(monkeypatch, capsys, "ask", "--batch", str(tmp_path / "none.jsonl"), *TINY)
    one_line_error(code, err, "cannot read batch file")
    assert code == 2


def test_gc_cli(monkeypatch, capsys, tiny_skills, tmp_path):
    store = str(tmp_path / "s")
    run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY)
    import shutil
    shutil.rmtree(tiny_skills / "gamma-notes")
    code, out, _ = run(monkeypatch, capsys, "gc", str(tiny_skills), "--store", store, *TINY[:2], "--json")
    assert code == 0 and [r["skill"] for r in json.loads(out)["removed"]] == ["gamma-notes"]


def test_ask_on_the_paged_engine_and_its_option_errors(monkeypatch, capsys, tiny_skills, tmp_path):
    store = str(tmp_path / "store")
    base = ["ask", "What does B-17 mean?", "-s", "beta-codes", "--skills", str(tiny_skills), "--store", store, *TINY,
            "--max-tokens", "4", "--json"]
    code, out, err = run(monkeypatch, capsys, *base, "--engine", "paged", "--gpu-kv-budget", "8MiB",
                         "--pin", "alpha-tool")
    assert code == 0, err
    paged = json.loads(out)
    code, out, _ = run(monkeypatch, capsys, *base, "--engine", "hf")
    assert code == 0 and json.loads(out)["output_token_ids"] == paged["output_token_ids"]
    for args, needle in [(["--engine", "vllm"], "unknown engine"), (["--gpu-kv-budget", "lots"], "not a size"),
                         (["--engine", "paged", "--gpu-kv-budget", "1KB"], "holds no page"),
                         (["--engine", "paged", "--pin", "nope"], "unknown skill")]:
        code, out, err = run(monkeypatch, capsys, *base, *args)
        json_error(code, out, err, needle)
