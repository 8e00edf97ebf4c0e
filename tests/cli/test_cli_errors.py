"""The error cases a user meets from the CLI (watch, stats, selection, help): one line on stderr, the right exit code, nothing lost.

Watching a folder that disappears (and one that never existed); a skill renamed to a name that already exists;
a stats database that is locked or corrupted (recreated with a warning, never a crash); selection with zero skills
compiled (a fresh store) and with zero valid skills. The Python-level behaviour is tested in test_watch.py,
test_stats.py and test_select*.py; here it is what a user sees.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import time

from conftest import run_cli as run

from skillkv.stats import DB_NAME

TINY = ["--model", "dummy:tiny", "--device", "cpu"]


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _after_initial_compile(store, n, action):
    """Run `action` on a thread once `n` snapshots exist in `store` and the observer had time to start."""
    def go():
        deadline = time.monotonic() + 20
        while len(list(store.glob("*/snapshots/*.safetensors"))) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)
        action()
    threading.Thread(target=go, daemon=True).start()


def test_watch_folder_disappears(monkeypatch, capsys, tiny_skills, tmp_path):
    store = tmp_path / "s"
    _after_initial_compile(store, 3, lambda: shutil.rmtree(tiny_skills))
    code, out, err = run(monkeypatch, capsys, "watch", str(tiny_skills), "--store", str(store), *TINY,
                         "--timeout", "20", "--json")
    lines = out.splitlines()
    assert code != 0 and len(lines) == 4 and err == ""  # the initial compile lines, then the error (--json)
    error = json.loads(lines[-1])["error"]
    assert error["message"].startswith("watched skills folder") and "disappeared" in error["message"]
    assert error["exit_code"] == code
    assert len(list(store.glob("*/snapshots/*.safetensors"))) == 3  # nothing stored was lost


def test_watch_missing_folder(monkeypatch, capsys, tmp_path):
    code, out, err = run(monkeypatch, capsys, "watch", str(tmp_path / "nope"), "--store", str(tmp_path / "s"),
                         *TINY, "--timeout", "1")
    assert code != 0 and out == "" and one_line(err).startswith("skillkv: error:") and "nope" in err


def test_watch_rename_to_an_existing_name(monkeypatch, capsys, tiny_skills, tmp_path):
    store = tmp_path / "s"
    md = tiny_skills / "gamma-notes" / "SKILL.md"
    _after_initial_compile(store, 3, lambda: md.write_text(md.read_text().replace("name: gamma-notes",
                                                                                  "name: beta-codes")))
    code, out, err = run(monkeypatch, capsys, "watch", str(tiny_skills), "--store", str(store), *TINY,
                         "--once", "--timeout", "20", "--json", "--debounce", "0.1")
    assert code == 0, err
    line = json.loads(out.splitlines()[-1])
    assert (line["skill"], line["result"]) == ("beta-codes", "error") and "already used by" in line["detail"]
    assert "\n" not in line["detail"] and "last good snapshot kept" in line["detail"]
    # the last good snapshots of both skills are still there, none rewritten
    files = sorted(p.name.rsplit("-", 1)[0] for p in store.glob("*/snapshots/*.safetensors"))
    assert files == ["alpha-tool", "beta-codes", "gamma-notes"]


def test_stats_corrupted_database(monkeypatch, capsys, tiny_skills, tmp_path):
    store = tmp_path / "s"
    store.mkdir()
    (store / DB_NAME).write_bytes(b"garbage, not sqlite " * 50)
    code, out, err = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), "--store", str(store),
                         *TINY[:2], "--json")
    assert code == 0 and json.loads(out)["questions"] == 0
    assert one_line(err).startswith("skillkv: warning: stats database") and "recreated" in err
    assert list(store.glob(f"{DB_NAME}.corrupt-*"))  # the bad file is kept aside, not deleted
    # the recreated database records the next ask
    code, out, err = run(monkeypatch, capsys, "ask", "What does B-17 mean?", "-s", "beta-codes", "--skills",
                         str(tiny_skills), "--store", str(store), *TINY, "--max-tokens", "2", "--json")
    assert code == 0 and err == ""
    code, out, _ = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), "--store", str(store),
                       *TINY[:2], "--json")
    assert json.loads(out)["questions"] == 1


def test_stats_locked_database(monkeypatch, capsys, tiny_skills, tmp_path):
    store = tmp_path / "s"
    common = ["--skills", str(tiny_skills), "--store", str(store), *TINY]
    assert run(monkeypatch, capsys, "ask", "What does B-17 mean?", "-s", "beta-codes", *common, "--max-tokens", "2",
               "--json")[0] == 0
    con = sqlite3.connect(str(store / DB_NAME))
    con.execute("BEGIN EXCLUSIVE")
    try:
        code, out, err = run(monkeypatch, capsys, "ask", "What does B-42 mean?", "-s", "beta-codes", *common,
                             "--max-tokens", "2", "--json")
        assert code == 0 and json.loads(out)["skills"] == ["beta-codes"]  # the answer comes anyway
        assert one_line(err).startswith("skillkv: warning: stats database") and "locked" in err
        code, out, err = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), "--store", str(store),
                             *TINY[:2], "--json")
        assert code == 0 and "locked" in one_line(err)
    finally:
        con.rollback()
        con.close()
    assert not list(store.glob(f"{DB_NAME}.corrupt-*"))  # a locked file is left alone, never recreated
    code, out, _ = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), "--store", str(store),
                       *TINY[:2], "--json")
    assert json.loads(out)["questions"] == 1  # the first ask is still there


def test_selection_with_zero_skills_compiled(monkeypatch, capsys, tiny_skills, tmp_path):
    store = tmp_path / "fresh"
    code, out, err = run(monkeypatch, capsys, "ask", "What does beta error code B-17 mean?", "--skills",
                         str(tiny_skills), "--store", str(store), *TINY, "--max-tokens", "2", "--json", "--explain")
    assert code == 0, err
    ans = json.loads(out)
    assert ans["skills"] == ["beta-codes"] and ans["tiers"] == ["computed"] and ans["tokens"]["cached"] == 0
    assert "explain: + beta-codes" in err and "Traceback" not in err


def test_selection_with_zero_valid_skills(monkeypatch, capsys, tmp_path):
    bad = tmp_path / "skills" / "broken"
    bad.mkdir(parents=True)
    (bad / "SKILL.md").write_text("---\nname: [unclosed\n---\nbody\n")
    code, out, err = run(monkeypatch, capsys, "ask", "Why is my SQL query slow?", "--skills", str(tmp_path / "skills"),
                         "--store", str(tmp_path / "s"), *TINY, "--max-tokens", "2", "--json", "--explain")
    assert code == 0 and json.loads(out)["skills"] == [], err
    assert "explain: no skills to choose from" in err and "broken" in err  # says why: the skipped skill
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run(monkeypatch, capsys, "ask", "Why is my SQL query slow?", "--skills", str(empty),
                         "--store", str(tmp_path / "s"), *TINY, "--max-tokens", "2")
    assert code != 0 and out == "" and "holds no skills" in one_line(err)


def test_cli_errors_and_help_do_not_import_torch(tmp_path):
    """`--help` and input errors answer in a fraction of a second: torch and transformers are never imported."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    cases = [(["--help"], 0), (["ask", "--help"], 0), (["ask", ""], 2),
             (["ask", "q", "--batch", str(tmp_path / "x")], 2), (["watch", str(tmp_path / "missing")], 2)]
    for argv, want in cases:
        p = subprocess.run([sys.executable, "-X", "importtime", "-m", "skillkv", *argv], capture_output=True, text=True,
                           cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        assert p.returncode == want, (argv, p.stderr[-500:])
        imported = {line.split("|")[-1].strip() for line in p.stderr.splitlines() if line.startswith("import time:")}
        assert not {"torch", "transformers"} & imported, argv
        if want:
            [line] = [x for x in p.stderr.splitlines() if not x.startswith("import time:")]
            assert line.startswith("skillkv: error:")
