"""Watch mode with real file events (watchdog observer on a temp folder), always bounded by events and time."""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

from skillkv.errors import SkillError
from skillkv.watch import Watcher

REPO = Path(__file__).resolve().parent.parent
TINY = ["--model", "dummy:tiny", "--device", "cpu"]


class Run:
    """Watcher.run on a thread, bounded; `lines` collects what it printed after the initial compile."""

    def __init__(self, kv, root, max_events, timeout=20.0, debounce=0.1):
        self.lines, self.error, self.started = [], None, threading.Event()
        self.w = Watcher(kv, root, on_line=self._line, debounce=debounce)
        self.w.initial()
        self.lines.clear()
        self.t = threading.Thread(target=self._go, args=(max_events, timeout), daemon=True)
        self.t.start()
        assert self.started.wait(10)

    def _line(self, line):
        line.at = time.monotonic()
        self.lines.append(line)

    def _go(self, max_events, timeout):
        try:
            self.w.run(max_events=max_events, timeout=timeout, initial=False, ready=self.started.set)
        except Exception as e:  # noqa: BLE001
            self.error = e
            self.started.set()

    def join(self):
        self.t.join(30)
        assert not self.t.is_alive() and self.w._observer is None
        return self.lines


def snapshot_files(kv):
    """File name -> inode: a rewritten snapshot is a new file (atomic rename); a read only touches its mtime."""
    return {p.name: p.stat().st_ino for p in kv.snapshots.snap_dir.glob("*.safetensors")}


def current_key(kv, name):
    kv.reload()
    return kv.compiler.keys(kv.pick([name]))[0]


def test_edit_recompiles_only_that_skill(tiny_kv, tiny_skills):
    r = Run(tiny_kv, tiny_skills, max_events=1)
    before = snapshot_files(tiny_kv)
    assert len(before) == 3
    md = tiny_skills / "beta-codes" / "SKILL.md"
    t0 = time.monotonic()
    md.write_text(md.read_text() + "\nCode B-99 means the network is down.\n")
    [line] = r.join()
    assert (line.skill, line.result) == ("beta-codes", "recompiled") and line.tokens > 0
    key = current_key(tiny_kv, "beta-codes")
    tiny_kv.snapshots._index = None
    assert tiny_kv.snapshots.contains(key)
    assert line.at - t0 < 1.0 + line.seconds  # the goal: 1 s plus the compile time
    after = snapshot_files(tiny_kv)
    assert {n: m for n, m in after.items() if n in before} == before  # nothing else rewritten
    assert len(after) == 4 and {s.state for s in tiny_kv.status()} == {"current"}


def test_editor_save_via_temp_file_and_rename(tiny_kv, tiny_skills):
    r = Run(tiny_kv, tiny_skills, max_events=1)
    md = tiny_skills / "gamma-notes" / "SKILL.md"
    tmp = tiny_skills / "gamma-notes" / ".SKILL.md.swp"
    tmp.write_text(md.read_text() + "\nAlso a Security section.\n")
    os.replace(tmp, md)
    [line] = r.join()
    assert (line.skill, line.result) == ("gamma-notes", "recompiled")
    assert tiny_kv.snapshots.contains(current_key(tiny_kv, "gamma-notes"))


def test_invalid_edit_keeps_last_good_then_fix(tiny_kv, tiny_skills):
    good_key = current_key(tiny_kv, "alpha-tool")
    r = Run(tiny_kv, tiny_skills, max_events=2)
    md = tiny_skills / "alpha-tool" / "SKILL.md"
    text = md.read_text()
    md.write_text("---\nname: [unclosed\n---\nbody\n")
    deadline = time.monotonic() + 10
    while not r.lines and time.monotonic() < deadline:
        time.sleep(0.02)
    assert r.lines[0].result == "error" and "not valid YAML" in r.lines[0].detail
    assert tiny_kv.snapshots.contains(good_key)
    md.write_text(text + "\nLevel 9 is the maximum.\n")
    lines = r.join()
    assert [x.result for x in lines] == ["error", "recompiled"]


def test_delete_and_rename_conflict(tiny_kv, tiny_skills):
    r = Run(tiny_kv, tiny_skills, max_events=2)
    md = tiny_skills / "gamma-notes" / "SKILL.md"
    md.write_text(md.read_text().replace("name: gamma-notes", "name: beta-codes"))
    deadline = time.monotonic() + 10
    while not r.lines and time.monotonic() < deadline:
        time.sleep(0.02)
    shutil.rmtree(tiny_skills / "alpha-tool")
    lines = r.join()
    assert lines[0].result == "error" and "already used" in lines[0].detail
    assert (lines[1].skill, lines[1].result) == ("alpha-tool", "deleted")
    tiny_kv.reload()
    assert "alpha-tool" not in {s.skill.name for s in tiny_kv.status()}
    assert not any(e.skill == "alpha-tool" for k, e in tiny_kv.snapshots.entries().items()
                   if k in tiny_kv.live_keys())


def test_watched_folder_disappears(tiny_kv, tiny_skills):
    r = Run(tiny_kv, tiny_skills, max_events=5, timeout=10)
    shutil.rmtree(tiny_skills)
    r.join()
    assert isinstance(r.error, SkillError) and "disappeared" in str(r.error)


def test_cli_watch_once(monkeypatch, capsys, tiny_skills, tmp_path):
    from skillkv.cli import main

    md = tiny_skills / "beta-codes" / "SKILL.md"

    def edit():  # once the initial compile is done and the observer had time to start
        deadline = time.monotonic() + 15
        while len(list((tmp_path / "s").glob("*/snapshots/*.safetensors"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.7)
        md.write_text(md.read_text() + "\nCode B-7 means low memory.\n")
    threading.Thread(target=edit, daemon=True).start()
    monkeypatch.setattr(sys, "argv", ["skillkv", "watch", str(tiny_skills), "--store", str(tmp_path / "s"), *TINY,
                                      "--once", "--timeout", "20", "--debounce", "0.1"])
    with pytest.raises(SystemExit) as e:
        main()
        raise SystemExit(0)
    assert e.value.code in (0, None)
    out = capsys.readouterr().out.splitlines()
    assert sum("compiled" in x for x in out) == 4 and "beta-codes" in out[-1] and "recompiled" in out[-1]


@pytest.mark.slow
def test_real_model_edit_is_in_the_store_within_1s_plus_compile(real_kv, tmp_path):
    """The issue's goal on the default model (eval/watch_latency.py measures the same through the CLI)."""
    from skillkv.api import SkillKV

    root = tmp_path / "skills"
    for name in ("git-commit-messages", "release-notes"):
        shutil.copytree(REPO / "skills" / name, root / name)
    kv = SkillKV(model="default", store=real_kv.store_root, skills=root, device="cpu")
    kv._runner = real_kv.runner  # the weights loaded once per session
    r = Run(kv, root, max_events=1, timeout=600, debounce=0.3)  # the CLI's default debounce
    others = {n: m for n, m in snapshot_files(kv).items() if n.startswith("release-notes-")}
    assert others
    md = root / "git-commit-messages" / "SKILL.md"
    t0 = time.monotonic()
    md.write_text(md.read_text() + "\nKeep the subject under 50 characters where you can.\n")
    [line] = r.join()
    assert (line.skill, line.result) == ("git-commit-messages", "recompiled") and line.tokens > 600
    kv.snapshots._index = None
    assert kv.snapshots.contains(current_key(kv, "git-commit-messages"))
    assert line.at - t0 - line.seconds < 1.0  # overhead beyond the compile: debounce + events + index
    assert {n: m for n, m in snapshot_files(kv).items() if n in others} == others  # the other skill untouched
