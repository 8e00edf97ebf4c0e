"""Process-level faults for `make faults`: kill -9 mid-compile, concurrent compiles, gc --max-bytes, a full disk.

Everything goes through the CLI (`python -m skillkv ...`) on the real default model, and is judged from the outside:
exit codes, stderr (one line per error, never a traceback), and the store read back with the public Store API
(every indexed snapshot must verify: nothing half-written is ever served).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from skillkv.errors import SnapshotError
from skillkv.skills import load_skills
from skillkv.store import Store

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO)}


def cli(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skillkv", *map(str, args)], capture_output=True, text=True,
                          env=ENV, cwd=REPO, timeout=timeout, **kw)


def clean_stderr(err: str) -> bool:
    """No traceback, and every error is one line."""
    return "Traceback" not in err and all(not ln.startswith((" ", "\t")) for ln in err.splitlines()
                                          if ln.strip() and "Warning" not in ln)


def verify_store(root: Path, tag: str, fp: str) -> tuple[int, int]:
    """(snapshots that verify, snapshots indexed but not verifying) of a store, read as a fresh process would."""
    good, bad = _verified(root, tag, fp)
    return len(good), bad


def _verified(root: Path, tag: str, fp: str) -> tuple[set[str], int]:
    """(keys of the snapshots that verify, count of indexed ones that do not)."""
    s = Store(root, tag, fp)
    good, bad = set(), 0
    for k in s.entries():
        try:
            s.get(k)
            good.add(k)
        except SnapshotError:
            bad += 1
    return good, bad


def _drop_stale(root: Path, tag: str, fp: str, skills: Path) -> None:
    """Remove snapshots of skill texts that are no longer current (public Store and skills APIs)."""
    current = {s.content_hash for s in load_skills(skills).skills}
    s = Store(root, tag, fp)
    s.remove([k for k, e in s.entries().items() if e.content_hash not in current])


def _launch(skills: Path, store: Path, picks: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "skillkv", "compile", str(skills), "--store", str(store), *picks],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)


def _calibrate(skills: Path, store: Path, picks: list[str], edit) -> tuple[float, float]:
    """(seconds until the first temp file of a write appears, seconds until the run ends) of one compile."""
    edit()
    snaps = next(iter(store.glob("*/snapshots")))
    t0, t_write = time.perf_counter(), None
    proc = _launch(skills, store, picks)
    while proc.poll() is None:
        if t_write is None and any(snaps.glob(".tmp-*")):
            t_write = time.perf_counter() - t0
        time.sleep(0.01)
    proc.communicate()
    total = time.perf_counter() - t0
    return (t_write or 0.9 * total), total


def kill_trials(skills: Path, store: Path, tag: str, fp: str, n: int, rng: random.Random, log,
                only: tuple[str, ...] = (), force: bool = False) -> dict:
    """`n` kill -9 trials landing mid-compile. Before each run with a complete store, one skill's SKILL.md gets a
    new line, so `compile` has one snapshot to compute and write (with `force`, `compile --force` recomputes the
    unchanged skills instead). Half the kills land while the new KV is computed, half around its write (from a
    calibrated run: when the temp file appears, when the run ends). After each: every indexed snapshot must verify
    (nothing half-written is served) and every snapshot that verified before the run must still verify (nothing
    stored is lost); every 10th trial then runs a compile to completion (exit 0, all verify, no temp file left)."""
    picks = [a for s in only for a in ("--skill", s)] + (["--force"] if force else [])
    names = list(only) or sorted(d.name for d in skills.iterdir() if d.is_dir())
    assert cli("compile", skills, "--store", store, *picks).returncode == 0

    def edit() -> None:
        if not force and len(_verified(store, tag, fp)[0]) >= len(names):
            md = skills / rng.choice(names) / "SKILL.md"
            md.write_text(md.read_text() + f"\nRevision {rng.randrange(1 << 30)}.\n")
            _drop_stale(store, tag, fp, skills)

    t_write, total = _calibrate(skills, store, picks, edit)
    out = dict(trials=0, mid_write=0, after_a_write=0, served_half_written=0, lost=0, tracebacks=0, completions=0,
               completion_failures=0, temp_left_after_completion=0, finished_first=0,
               calibration_s=f"write at {t_write:.1f} s of {total:.1f} s")
    snaps = store / tag / "snapshots"
    while out["trials"] < n:
        edit()
        before, _ = _verified(store, tag, fp)
        mtimes = {q.name: q.stat().st_mtime_ns for q in snaps.glob("*.safetensors")}
        proc = _launch(skills, store, picks)
        delay = rng.uniform(0.3 * t_write, t_write) if rng.random() < 0.5 else \
            rng.uniform(max(0.0, t_write - 0.15), total)
        time.sleep(delay)
        temps = list(snaps.glob(".tmp-*"))
        wrote = any(q.stat().st_mtime_ns != mtimes.get(q.name) for q in snaps.glob("*.safetensors"))
        if proc.poll() is not None:  # finished before the kill: not a trial
            proc.communicate()
            out["finished_first"] += 1
            continue
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        out["trials"] += 1
        out["mid_write"] += bool(temps)
        out["after_a_write"] += wrote
        out["tracebacks"] += "Traceback" in err
        after, bad = _verified(store, tag, fp)
        out["served_half_written"] += bad
        out["lost"] += len(before - after)
        log(f"kill {out['trials']}{' (force)' if force else ''}: at {delay:.1f}s temp={bool(temps)} wrote={wrote} "
            f"verified {len(before)} -> {len(after)}, bad {bad}")
        if out["trials"] % 10 == 0:
            q = cli("compile", skills, "--store", store, "--json", *[a for a in picks if a != "--force"])
            out["completions"] += 1
            ok = q.returncode == 0 and clean_stderr(q.stderr) and _verified(store, tag, fp)[1] == 0
            out["completion_failures"] += not ok
            out["tracebacks"] += "Traceback" in q.stderr
            out["temp_left_after_completion"] += len(list(snaps.glob(".tmp-*")))
    return out


def concurrent(skills: Path, store: Path, tag: str, fp: str, rounds: int, log) -> dict:
    out = dict(rounds=rounds, processes=0, nonzero_exits=0, tracebacks=0, bad_snapshots=0, missing=0)
    n_skills = len([d for d in skills.iterdir() if d.is_dir()])
    for r in range(rounds):
        shutil.rmtree(store, ignore_errors=True)
        procs = [subprocess.Popen([sys.executable, "-m", "skillkv", "compile", str(skills), "--store", str(store)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
                 for _ in range(4)]
        for proc in procs:
            _, err = proc.communicate(timeout=900)
            out["processes"] += 1
            out["nonzero_exits"] += proc.returncode != 0
            out["tracebacks"] += "Traceback" in err
        good, bad = verify_store(store, tag, fp)
        out["bad_snapshots"] += bad
        out["missing"] += max(0, n_skills - good)
        log(f"concurrent round {r + 1}: verify {good}/{bad}")
    return out


def gc_caps(skills: Path, store: Path, tag: str, fp: str, log) -> dict:
    out = dict(caps=0, over_cap=0, bad_after=0, nonzero_exits=0, tracebacks=0)
    p = cli("compile", skills, "--store", store)
    assert p.returncode == 0, p.stderr[-2000:]
    sizes = sorted(q.stat().st_size for q in (store / tag / "snapshots").glob("*.safetensors"))
    total = sum(sizes)
    for cap in (total, total - 1, sizes[-1] + sizes[0], sizes[0], 0):
        cli("compile", skills, "--store", store)
        q = cli("gc", skills, "--store", store, "--max-bytes", cap)
        now = sum(x.stat().st_size for x in (store / tag / "snapshots").glob("*.safetensors"))
        out["caps"] += 1
        out["over_cap"] += now > cap
        out["nonzero_exits"] += q.returncode != 0
        out["tracebacks"] += "Traceback" in q.stderr
        out["bad_after"] += verify_store(store, tag, fp)[1]
        log(f"gc --max-bytes {cap}: store {now} bytes, exit {q.returncode}")
    return out


def full_disk(skills: Path, work: Path, tag: str, fp: str, first: str, log) -> dict:
    """A store on a small tmpfs: one snapshot fits, the next does not. Expect a one-line error, the stored one
    intact, no temp file left. Needs root (mount); reports 'not run' otherwise."""
    mnt = work / "tmpfs"
    mnt.mkdir()
    probe = cli("compile", skills, "--store", work / "size-probe", "--skill", first)
    size = sum(q.stat().st_size for q in (work / "size-probe").rglob("*") if q.is_file())
    shutil.rmtree(work / "size-probe")
    m = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size + (4 << 20)}", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if probe.returncode or m.returncode:
        return dict(run=False, why=(m.stderr or probe.stderr).strip()[:200])
    try:
        a = cli("compile", skills, "--store", mnt, "--skill", first)
        stored = verify_store(mnt, tag, fp)
        b = cli("compile", skills, "--store", mnt)
        after = verify_store(mnt, tag, fp)
        errs = [ln for ln in b.stderr.splitlines() if ln.strip()]
        temps = list((mnt / tag / "snapshots").glob(".tmp-*"))
        log(f"full disk: first exit {a.returncode} ({stored}), all exit {b.returncode}: {errs[-1:]}; after {after}")
        return dict(run=True, tmpfs_bytes=size + (4 << 20), first_exit=a.returncode, all_exit=b.returncode,
                    error_line=errs[-1] if errs else "", one_line=clean_stderr(b.stderr),
                    tracebacks=int("Traceback" in a.stderr + b.stderr), stored_before=stored[0],
                    intact_after=after[0], bad_after=after[1], temp_left=len(temps))
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)
