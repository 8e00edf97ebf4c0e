"""Watch-mode latency on the real default model: save a one-skill edit -> its new snapshot is indexed in the store.

    .venv/bin/python eval/watch_latency.py [--model default] [--edits 3] [--skills a,b,c] [--target NAME]

Runs `skillkv watch --json` as a separate process (the CLI as a user runs it, real file events) on a copy of some
of the repository's skills in a temporary folder with a temporary store, waits for the initial compile, then edits
the target skill's SKILL.md `--edits` times. For each edit it records:
  latency   from the moment the edited file is closed to the moment the store's index.json lists a snapshot of the
            skill with the new content hash (polled every 5 ms; the snapshot file is renamed in before indexing)
  compile   the seconds watch reported for that skill (parse + tokenize + prefill + write), its own measurement
  overhead  latency - compile: the debounce (default 0.3 s), event delivery and the index update
and checks that no other skill's snapshot file was rewritten. The goal (issue 5): overhead <= 1 s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from skillkv.skills import parse_skill  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--edits", type=int, default=3)
    ap.add_argument("--skills", default="git-commit-messages,release-notes,python-debugging")
    ap.add_argument("--target", default="release-notes")
    ap.add_argument("--debounce", type=float, default=0.3)
    a = ap.parse_args()
    names = a.skills.split(",")
    tmp = Path(tempfile.mkdtemp(prefix="skillkv-watch-"))
    try:
        root = tmp / "skills"
        for n in names:
            shutil.copytree(REPO / "skills" / n, root / n)
        store = tmp / "store"
        env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        cmd = [sys.executable, "-m", "skillkv", "watch", str(root), "--store", str(store), "--model", a.model,
               "--json", "--debounce", str(a.debounce), "--max-events", str(a.edits), "--timeout", "900"]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        lines: list[tuple[float, dict]] = []
        cond = threading.Condition()

        def reader():
            for raw in proc.stdout:
                try:
                    obj = json.loads(raw)
                except ValueError:
                    continue
                with cond:
                    lines.append((time.monotonic(), obj))
                    cond.notify_all()

        threading.Thread(target=reader, daemon=True).start()

        def wait_lines(n: int, timeout: float) -> None:
            with cond:
                if not cond.wait_for(lambda: len(lines) >= n or proc.poll() is not None, timeout):
                    raise SystemExit(f"timed out waiting for watch output ({len(lines)} lines)")
                if len(lines) < n:
                    raise SystemExit(f"watch exited: {proc.stderr.read()}")

        t0 = time.monotonic()
        wait_lines(len(names), 900)
        print(f"initial compile of {len(names)} skills: {time.monotonic() - t0:.1f} s "
              f"({', '.join('%s %d tok %.2f s' % (o['skill'], o['tokens'], o['seconds']) for _, o in lines)})")
        time.sleep(1.5)  # the observer starts right after the initial compile
        [index] = store.glob("*/index.json")
        snaps = index.parent / "snapshots"
        others = {p.name: p.stat().st_mtime_ns for p in snaps.glob("*.safetensors") if not p.name.startswith(a.target)}
        md = root / a.target / "SKILL.md"
        rows = []
        for i in range(a.edits):
            with open(md, "a", encoding="utf-8") as f:
                f.write(f"\nEdit {i}: keep entries short.\n")
            t_save = time.monotonic()
            want = parse_skill(root / a.target).content_hash
            while True:
                try:
                    entries = json.loads(index.read_text()).get("entries", {})
                except (OSError, ValueError):
                    entries = {}
                if any(e.get("content_hash") == want and e.get("parent") == "" for e in entries.values()):
                    break
                if time.monotonic() - t_save > 600:
                    raise SystemExit("the new snapshot never appeared")
                time.sleep(0.005)
            latency = time.monotonic() - t_save
            wait_lines(len(names) + i + 1, 120)
            obj = lines[len(names) + i][1]
            assert obj["skill"] == a.target and obj["result"] == "recompiled", obj
            rows.append((latency, obj["seconds"], obj["tokens"]))
            print(f"edit {i}: save -> indexed {latency:.3f} s, compile {obj['seconds']:.3f} s "
                  f"({obj['tokens']} tokens), overhead {latency - obj['seconds']:.3f} s")
            time.sleep(0.5)
        proc.wait(60)
        now = {p.name: p.stat().st_mtime_ns for p in snaps.glob("*.safetensors") if not p.name.startswith(a.target)}
        untouched = all(now.get(k) == v for k, v in others.items())
        over = [r[0] - r[1] for r in rows]
        print(f"\nmodel {a.model}, debounce {a.debounce} s, {a.edits} edits of {a.target}: overhead median "
              f"{statistics.median(over):.3f} s, max {max(over):.3f} s (goal <= 1 s); compile median "
              f"{statistics.median(r[1] for r in rows):.2f} s; other skills' snapshots untouched: {untouched}")
    finally:
        if "proc" in locals() and proc.poll() is None:
            proc.terminate()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
