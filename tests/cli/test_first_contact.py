"""Issue 13, what a new user meets first: --version, help without Python types, one-line usage errors, JSON errors
with --json, tables that read at 80 columns (a pipe), text from skills that cannot drive the terminal, --device
cuda without CUDA, --store naming a file, sizes with units, `stats` creating nothing, the first ask's timings, the
context and --max-tokens limits said out loud, compile's progress, summary and exit codes, ask's progress hook
and --compare (tiny random model; the real model's demo is in tests/test_readme.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, run_cli as run, write_skill

from skillkv.generate import SamplingParams

TINY = ["--model", "dummy:tiny", "--device", "cpu"]
COMMANDS = ["compile", "ask", "ls", "stats", "gc", "watch", "serve", "export", "eval", "bench", "loadtest"]
ESC = "\x1b"


def one_line(code: int, err: str, needle: str = "") -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("skillkv: error:") and needle in lines[0], lines[0]
    return lines[0]


def json_error(code: int, out: str, err: str) -> dict:
    assert code != 0 and err == "", err
    [line] = out.splitlines()
    obj = json.loads(line)
    assert set(obj) == {"error"} and set(obj["error"]) == {"message", "type", "exit_code"}
    assert obj["error"]["exit_code"] == code and "\n" not in obj["error"]["message"]
    return obj["error"]


# ---------------------------------------------------------------- version, help, usage errors


def test_version(monkeypatch, capsys):
    from skillkv import __version__

    code, out, err = run(monkeypatch, capsys, "--version")
    assert (code, out, err) == (0, f"skillkv {__version__}\n", "")
    p = subprocess.run([sys.executable, "-X", "importtime", "-m", "skillkv", "--version"], capture_output=True,
                       text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert p.returncode == 0 and p.stdout == f"skillkv {__version__}\n"
    imported = {ln.split("|")[-1].strip() for ln in p.stderr.splitlines() if ln.startswith("import time:")}
    assert "torch" not in imported  # instant


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_no_python_types_and_fits_80_columns(monkeypatch, capsys, command):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(monkeypatch, capsys, *([command] if command else []), "--help")
    assert code == 0 and "Usage: skillkv" in out
    for bad in ("<bool>", "<str>", "<path>", "<int", "<float", "list[", " range>", "[x>=", "<=x"):
        assert bad not in out, (command, bad)
    assert max(len(line) for line in out.splitlines()) <= 80
    if command == "ask":
        assert re.search(r"--store\s+DIR", out) and re.search(r"--max-tokens\s+N", out) and "(at least 1)" in out
        assert re.search(r"--explain\s+Print", out)  # a flag: no type at all


@pytest.mark.parametrize("argv,needle", [
    (["ask", "q", "--recompute", "3"], "invalid value for '--recompute'"),
    (["ask", "q", "--max-tokens", "lots"], "invalid value for '--max-tokens'"),
    (["gc", "--max-bytez", "1"], "no such option: --max-bytez"),
    (["serve", "--port", "99999"], "invalid value for '--port'"),
    (["nope"], "no such command 'nope' (commands: compile, ask, ls"),
    (["ls", "a", "b"], "unexpected extra argument"),
])
def test_usage_errors_are_one_line_or_one_json_object(monkeypatch, capsys, argv, needle):
    code, out, err = run(monkeypatch, capsys, *argv)
    assert code == 2 and out == ""
    line = one_line(code, err, needle)
    assert "╭" not in err and "Usage:" not in err and ("--help" in line or "commands:" in line)
    if argv[0] != "nope":
        code, out, err = run(monkeypatch, capsys, *argv, "--json")
        e = json_error(code, out, err)
        assert e["type"] == "usage_error" and e["exit_code"] == 2 and needle in e["message"]


def test_json_errors_for_known_and_internal_errors(monkeypatch, capsys, tiny_skills, tmp_path):
    code, out, err = run(monkeypatch, capsys, "ask", "hi", "-s", "nope", "--skills", str(tiny_skills), "--store",
                         str(tmp_path / "s"), *TINY, "--json")
    e = json_error(code, out, err)
    assert e == {"message": e["message"], "type": "skill_error", "exit_code": 2} and "unknown skill 'nope'" in \
        e["message"]
    code, out, err = run(monkeypatch, capsys, "ask", "", "--json")
    assert json_error(code, out, err)["message"] == "the question is empty"
    # an internal error: one line (or one JSON object), exit 1, no traceback
    import skillkv.report

    monkeypatch.setattr(skillkv.report, "collect", lambda *a: (_ for _ in ()).throw(RuntimeError("boom\nmore")))
    import skillkv.cli.stats

    monkeypatch.setattr(skillkv.cli.stats, "collect", skillkv.report.collect)
    args = ["stats", "--skills", str(tiny_skills), "--store", str(tmp_path / "s"), *TINY[:2]]
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 1 and "RuntimeError: boom" in one_line(code, err, "internal error")
    code, out, err = run(monkeypatch, capsys, *args, "--json")
    assert json_error(code, out, err)["type"] == "internal_error"


# ---------------------------------------------------------------- tables at 80 columns, printable text


@pytest.fixture
def wide_skills(tiny_skills):
    """A long name, a long description, and a description that tries to clear and recolour the terminal."""
    write_skill(tiny_skills, "a-rather-long-skill-name-for-eighty-columns", "Use when " + "checking widths " * 20,
                "Width test body.\n" * 30)
    write_skill(tiny_skills, "delta-escapes", '"\\e[2J\\e[31mClears the screen\\u202e and turns it red."',
                "Escape test body.\n" * 30)
    return tiny_skills


@pytest.mark.parametrize("command", ["ls", "stats", "compile"])
def test_tables_read_at_80_columns_in_a_pipe(monkeypatch, capsys, wide_skills, tmp_path, command):
    store = str(tmp_path / "store")
    monkeypatch.delenv("COLUMNS", raising=False)  # stdout is not a terminal here: 80 columns
    assert run(monkeypatch, capsys, "ask", "What does B-17 mean?", "-s", "beta-codes", "--skills", str(wide_skills),
               "--store", store, *TINY, "--max-tokens", "1", "--json")[0] == 0
    args = {"ls": ["ls", str(wide_skills)], "stats": ["stats", "--skills", str(wide_skills)],
            "compile": ["compile", str(wide_skills)]}[command]
    code, out, err = run(monkeypatch, capsys, *args, "--store", store, *TINY[:2])
    assert code == 0, err
    lines = out.splitlines()[:-1] if command == "compile" else out.splitlines()  # not the summary line
    table = lines[lines.index(next(x for x in lines if x.startswith("skill "))):]
    assert all(len(x) <= 80 for x in table), "\n".join(x for x in table if len(x) > 80)
    names = {"alpha-tool", "beta-codes", "gamma-notes", "delta-escapes", "a-rather-long-skill-name-for-eighty-columns"}
    assert {x.split()[0] for x in table[1:] if x and not x.startswith(" ")} == names  # names whole
    assert ESC not in out + err and "\u202e" not in out + err
    if command == "ls":
        at = next(i for i, x in enumerate(table) if x.startswith("delta-escapes"))
        assert "missing" in table[at] and "\\x1b[2J\\x1b[31mClears" in table[at + 1]  # visible, not executed
        assert table[at + 1].startswith("    ")  # a 43-character name: descriptions go under their rows
    if command == "stats":
        assert re.search(r"^beta-codes\s+current\s+1\s+\S+", next(x for x in table if x.startswith("beta-codes")))
    # a narrow terminal: the description moves under its row, names still whole
    monkeypatch.setenv("COLUMNS", "50")
    code, out, _ = run(monkeypatch, capsys, *args, "--store", store, *TINY[:2])
    assert code == 0 and "a-rather-long-skill-name-for-eighty-columns" in out


def test_table_layout_rules():
    from skillkv.cli.table import Col, render

    cols = [Col("skill"), Col("n", right=True, drop=1), Col("description", flex=True)]
    rows = [["a-very-long-name-that-must-never-be-cut", "12", "x" * 200], ["b", "3", "short"]]
    wide = [t.plain for t in render(cols, rows, 120)]
    assert wide[1].startswith("a-very-long-name-that-must-never-be-cut  12  xxx") and len(wide[1]) == 120
    assert wide[1].endswith("…") and wide[2].endswith("short") and wide[0].split() == ["skill", "n", "description"]
    narrow = [t.plain for t in render(cols, rows, 56)]  # < 16 characters left: the description goes below
    assert narrow[1].rstrip() == "a-very-long-name-that-must-never-be-cut  12" and narrow[2].startswith("    xxx")
    tiny = [t.plain for t in render(cols, rows, 30)]  # too narrow even for the name: the droppable column goes
    assert tiny[0].split() == ["skill"] and tiny[1] == "a-very-long-name-that-must-never-be-cut"
    assert tiny[2].startswith("    xxx") and tiny[2].endswith("…")
    assert [t.plain for t in render([Col("a"), Col("b", right=True)], [["x", "1"], ["yy", "100"]], 80)] == \
        ["a     b", "x     1", "yy  100"]


def test_explain_and_compile_reasons_are_printable(monkeypatch, capsys, wide_skills, tmp_path):
    code, _, err = run(monkeypatch, capsys, "ask", "What clears the screen and turns it red?", "--explain",
                       "--skills", str(wide_skills), "--store", str(tmp_path / "s"), *TINY, "--max-tokens", "1",
                       "--json")
    assert code == 0 and "explain:" in err and ESC not in err


# ---------------------------------------------------------------- --device, --store, sizes, stats


DEVICE_CMDS = [["ask", "q"], ["compile"], ["watch"], ["serve"], ["export", "x", "--to", "lmcache", "d",
                                                                   "--model-name", "m"], ["eval"], ["bench"],
               ["loadtest"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without CUDA")
@pytest.mark.parametrize("argv", DEVICE_CMDS, ids=lambda a: a[0])
def test_device_cuda_without_cuda_is_one_line(monkeypatch, capsys, tiny_skills, tmp_path, argv):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(monkeypatch, capsys, *argv, "--model", "dummy:tiny", "--device", "cuda")
    assert code == 2 and out == ""
    one_line(code, err, "--device cuda: CUDA is not available")
    code, out, err = run(monkeypatch, capsys, *argv, "--model", "dummy:tiny", "--device", "tpu")
    one_line(code, err, "unknown device 'tpu'")


STORE_CMDS = [["ask", "q"], ["ls"], ["stats"], ["gc"], ["compile"], ["watch"], ["serve"], ["eval"],
              ["export", "x", "--to", "lmcache", "d", "--model-name", "m"], ["loadtest"]]


@pytest.mark.parametrize("argv", STORE_CMDS, ids=lambda a: a[0])
def test_store_naming_a_file_is_one_clear_error_everywhere(monkeypatch, capsys, tiny_skills, tmp_path, argv):
    """One behaviour for every command (issue 13: ask answered with a misleading warning, ls/stats listed every
    skill "missing" and exited 0)."""
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    for store, needle in [(blocker, "it is a file"), (blocker / "sub", f"{blocker} is a file")]:
        extra = [str(tiny_skills)] if argv[0] in ("compile", "watch", "ls", "gc") else \
            [] if argv[0] == "eval" else ["--skills", str(tiny_skills)]
        model = TINY[:2] if argv[0] in ("ls", "stats", "gc") else TINY
        code, out, err = run(monkeypatch, capsys, *argv, *extra, "--store", str(store), *model)
        assert code == 2 and out == ""
        one_line(code, err, f"store {store} is not a folder ({needle})")
    assert blocker.read_text() == "a file"


def test_sizes_take_units_everywhere(monkeypatch, capsys, tiny_skills, tmp_path):
    store = str(tmp_path / "s")
    assert run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY)[0] == 0
    for size in ("100MB", "100MiB", "0"):
        code, out, err = run(monkeypatch, capsys, "gc", str(tiny_skills), "--store", store, *TINY[:2],
                             "--max-bytes", size, "--json")
        assert code == 0, err
    assert json.loads(out)["store_bytes"] == 0  # 0 empties the store
    code, _, err = run(monkeypatch, capsys, "gc", str(tiny_skills), "--store", store, *TINY[:2], "--max-bytes", "-1")
    one_line(code, err, "size must be zero or positive")


def test_stats_in_a_folder_without_a_store_creates_nothing(monkeypatch, capsys, tiny_skills, tmp_path):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), *TINY[:2])
    assert code == 0 and "questions  0" in out and "no asks recorded" in err
    code, out, _ = run(monkeypatch, capsys, "stats", "--skills", str(tiny_skills), *TINY[:2], "--json")
    assert code == 0 and json.loads(out)["questions"] == 0
    assert not (tmp_path / "cache_store").exists()


def test_the_compose_stand_in_is_not_a_users_skill(monkeypatch, capsys, tiny_skills, tmp_path):
    from skillkv.compose.neighbour import NEIGHBOUR

    store = str(tmp_path / "s")
    common = ["--skills", str(tiny_skills), "--store", store, *TINY]
    assert run(monkeypatch, capsys, "ask", "What does B-17 mean?", "-s", "alpha-tool", "-s", "beta-codes",
               "--mode", "compose", *common, "--max-tokens", "1", "--json")[0] == 0
    code, out, _ = run(monkeypatch, capsys, "stats", *common[:4], *TINY[:2], "--json")
    rep = json.loads(out)
    assert NEIGHBOUR.name not in rep["skills"] and rep["internal"]["compose_neighbour"]["snapshots"] == 1
    code, out, _ = run(monkeypatch, capsys, "stats", *common[:4], *TINY[:2], "--plot", str(tmp_path / "p.png"))
    assert NEIGHBOUR.name not in out and "compose stand-in" in out


def test_plot_has_title_dates_with_month_and_the_rate(tiny_kv, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from skillkv.report import collect
    from skillkv.stats import plot

    tiny_kv.compile()
    tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=SamplingParams(max_tokens=1))
    rep, asks = collect(tiny_kv, None)
    assert rep["prefill_rate_tok_s"] > 0 and rep["prefill_rate_samples"] >= 1
    seen = {}
    real_savefig = plt.Figure.savefig

    def spy(fig, *a, **k):
        ax = fig.axes[0]
        fig.canvas.draw()
        seen["title"] = fig._suptitle.get_text()
        seen["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
        seen["right"] = [a.get_ylabel() for a in fig.axes[0].child_axes]
        return real_savefig(fig, *a, **k)
    plt.Figure.savefig = spy
    try:
        plot(asks, rep["skills"], tmp_path / "p.png", title="skillkv stats: dummy-tiny (store)",
             rate=rep["prefill_rate_tok_s"])
    finally:
        plt.Figure.savefig = real_savefig
    month = time.strftime("%b")
    assert seen["title"] == "skillkv stats: dummy-tiny (store)" and any(month in t for t in seen["ticks"])
    assert any("tok/s" in x for x in seen["right"])


# ---------------------------------------------------------------- ask: timings, limits, progress, compare


def test_first_ask_counts_the_model_load_once(tiny_skills, tmp_path):
    from skillkv.api import SkillKV

    kv = SkillKV(model="dummy:tiny", store=tmp_path / "s", skills=tiny_skills, device="cpu")
    load = kv.handle.load

    def slow_load():
        time.sleep(0.4)
        return load()
    kv.handle.load = slow_load
    t0 = time.perf_counter()
    ans = kv.ask("What does B-17 mean?", ["beta-codes"], params=SamplingParams(max_tokens=2))
    wall = (time.perf_counter() - t0) * 1e3
    tm = ans.timings_ms
    assert tm["model_load"] >= 400 and tm["total"] <= wall + 1  # counted once (it was counted twice)
    assert tm["total"] >= tm["model_load"] + tm["ttft"] - 1
    # the model loaded before the ask (by a compile): the ask reports no load it did not wait for
    kv2 = SkillKV(model="dummy:tiny", store=tmp_path / "s", skills=tiny_skills, device="cpu")
    kv2.compile(["alpha-tool"])
    ans = kv2.ask("What does B-17 mean?", ["beta-codes"], params=SamplingParams(max_tokens=2))
    assert ans.timings_ms["model_load"] < 50


def test_context_and_max_tokens_limits_are_said(monkeypatch, capsys, tiny_skills, tmp_path):
    # a skill that leaves ~40 tokens of the tiny model's 4,096-token context
    from skillkv.api import SkillKV

    kv = SkillKV(model="dummy:tiny", store=tmp_path / "s", skills=tiny_skills, device="cpu")
    head = len(kv.builder.layout(kv.pick(["alpha-tool"]), "What?").ids) - len(kv.builder.skill_ids(
        kv.pick(["alpha-tool"])[0]))
    body = "w" * (4096 - head - 40 - 60)
    (tiny_skills / "alpha-tool" / "SKILL.md").write_text(f"---\nname: alpha-tool\ndescription: big\n---\n{body}\n")
    common = ["What?", "-s", "alpha-tool", "--skills", str(tiny_skills), "--store", str(tmp_path / "s"), *TINY]
    code, out, err = run(monkeypatch, capsys, "ask", *common, "--max-tokens", "256")
    assert code == 0, err
    m = re.search(r"the answer is limited to (\d+) tokens by the model's context of 4,096", err)
    assert m, err
    room = int(m.group(1))
    assert 0 < room < 256
    cut = re.search(r"the answer was cut at (\d+) tokens by the model's context \(finish_reason: length\)", err)
    if cut:  # a random model may also stop early
        assert int(cut.group(1)) == room
    code, out, err = run(monkeypatch, capsys, "ask", *common, "--max-tokens", "3")
    assert code == 0 and "cut at 3 tokens by --max-tokens 3 (finish_reason: length)" in err
    assert "limited to" not in err
    code, out, err = run(monkeypatch, capsys, "ask", *common, "--max-tokens", "3", "--json")
    assert json.loads(out)["finish_reason"] == "length"


def test_ask_progress_hook_and_plain_progress_lines(tiny_kv, capsys):
    events = []
    ans = tiny_kv.ask("What does B-17 mean?", ["beta-codes"], params=SamplingParams(max_tokens=1),
                      on_progress=lambda stage, n: events.append((stage, n)))
    assert [e[0] for e in events] == ["skills", "question"] and sum(n for _, n in events) == ans.tokens["prompt"]
    from skillkv.cli.progress import Waiting

    w = Waiting(quiet=0.05, every=0.1)
    w.update("prefilling the question (7,812 tokens)")
    time.sleep(0.4)
    w.stop()
    lines = [x for x in capsys.readouterr().err.splitlines() if x]
    assert lines[0] == "skillkv: prefilling the question (7,812 tokens)…" and "so far)" in lines[1]


def test_compile_progress_summary_and_exit_codes(monkeypatch, capsys, tiny_skills, tmp_path):
    store = str(tmp_path / "s")
    code, out, err = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY)
    assert code == 0 and out.splitlines()[-1] == "3 compiled, 0 up to date, 0 skipped"
    progress = [x for x in err.splitlines() if x.startswith("compile: ")]  # plain lines: stderr is not a terminal
    assert [x.split()[1] for x in progress] == ["alpha-tool", "beta-codes", "gamma-notes"]
    assert re.fullmatch(r"compile: alpha-tool \(1/3, [\d,]+ tokens; 0/[\d,]+ tokens done, ETA …\)", progress[0])
    assert re.search(r"ETA [\d.]+ (ms|s)\)$", progress[1])
    code, out, err = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY)
    assert code == 0 and out.splitlines()[-1] == "0 compiled, 3 up to date, 0 skipped" and "compile: " not in err
    # a skill longer than the context is skipped by name with its numbers; the others compile; exit 1
    write_skill(tiny_skills, "huge-skill", "Too long.", "word " * 1500)
    code, out, err = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY)
    assert code == 1 and out.splitlines()[-1] == "0 compiled, 3 up to date, 1 skipped"
    assert re.search(r"skillkv: skipped: huge-skill: [\d,]+ tokens; the model's context is 4,096", err)
    code, out, _ = run(monkeypatch, capsys, "compile", str(tiny_skills), "--store", store, *TINY, "--json")
    assert code == 1 and json.loads(out)["summary"] == "0 compiled, 3 up to date, 1 skipped"
    code, _, err = run(monkeypatch, capsys, "compile", str(tmp_path / "missing"), "--store", store, *TINY)
    assert code == 2 and one_line(code, err, "missing")


def test_compare_shows_both_answers_and_the_speedup(monkeypatch, capsys, tiny_skills, tmp_path):
    monkeypatch.setenv("COLUMNS", "80")
    common = ["What does B-17 mean?", "-s", "beta-codes", "--skills", str(tiny_skills), "--store",
              str(tmp_path / "s"), *TINY, "--max-tokens", "4"]
    code, out, _ = run(monkeypatch, capsys, "ask", *common, "--compare")  # nothing compiled yet: said so
    assert code == 0 and "The skills' KV was not compiled yet" in out
    code, out, err = run(monkeypatch, capsys, "ask", *common, "--compare", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["identical"] is True and r["answer"]["mode"] == "exact" and r["full"]["mode"] == "full"
    assert r["answer"]["output_token_ids"] == r["full"]["output_token_ids"] and r["first_token_speedup"] > 0
    assert r["full"]["tokens"]["cached"] == 0 and r["answer"]["tokens"]["cached"] > 0
    code, out, err = run(monkeypatch, capsys, "ask", *common, "--compare")
    assert code == 0, err
    assert re.search(r"^first token\s+\S+ m?s\s+\S+ m?s$", out, re.M)
    assert re.search(r"^Same answer as a full prefill, token for token; first token [\d.]+x sooner\.$", out, re.M)
    assert "prompt tokens reused from compiled skill KV (beta-codes)" in out
    assert all(len(x) <= 80 for x in out.splitlines()[1:])
    for bad, needle in [(["--mode", "full"], "--compare compares a mode"), (["--server", "http://x"], "--compare")]:
        code, _, err = run(monkeypatch, capsys, "ask", *common, "--compare", *bad)
        one_line(code, err, needle)


def test_watch_keeps_going_past_a_skill_that_cannot_compile(monkeypatch, capsys, tiny_skills, tmp_path):
    """As compile does, and serve (tests/serve/test_serve.py): the skill is reported by name, the others compile."""
    write_skill(tiny_skills, "huge-skill", "Too long.", "word " * 1500)
    code, out, err = run(monkeypatch, capsys, "watch", str(tiny_skills), "--store", str(tmp_path / "s"), *TINY,
                         "--timeout", "1", "--json")
    lines = {x["skill"]: x for x in map(json.loads, out.splitlines())}
    assert code == 0 and "Traceback" not in err
    assert {n: x["result"] for n, x in lines.items() if n != "huge-skill"} == dict.fromkeys(
        ["alpha-tool", "beta-codes", "gamma-notes"], "compiled")
    assert lines["huge-skill"]["result"] == "error" and "the model's context is 4,096" in lines["huge-skill"]["detail"]


def test_follow_symlinks_flag(monkeypatch, capsys, tiny_skills, tmp_path):
    """Issue 12: a skill folder linking outside the skills folder is refused in one line unless --follow-symlinks."""
    outside = tmp_path / "elsewhere"
    write_skill(outside, "linked-skill", "Use for the linked skill.", "Linked body.\n" * 10)
    (tiny_skills / "linked-skill").symlink_to(outside / "linked-skill", target_is_directory=True)
    code, out, _ = run(monkeypatch, capsys, "ls", str(tiny_skills), "--store", str(tmp_path / "s"), *TINY[:2],
                       "--json")
    rep = json.loads(out)
    assert "linked-skill" not in {s["name"] for s in rep["skills"]} and any("links outside" in p for p in
                                                                            rep["problems"])
    code, out, _ = run(monkeypatch, capsys, "ls", str(tiny_skills), "--store", str(tmp_path / "s"), *TINY[:2],
                       "--json", "--follow-symlinks")
    assert code == 0 and "linked-skill" in {s["name"] for s in json.loads(out)["skills"]}
