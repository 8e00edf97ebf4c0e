"""docs/RELIABILITY.md from the report of `make faults` (eval/faults.py)."""

from __future__ import annotations

from pathlib import Path


def _row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_doc(path: Path, r: dict) -> None:
    s, st, k, c, g, d = (r["snapshot_faults"], r["stale"], r["kill9"], r["concurrent"], r["gc"], r["full_disk"])
    kf = r["kill9_force"]
    t = s["totals"]
    tracebacks = t["tracebacks"] + st["tracebacks"] + k["tracebacks"] + kf["tracebacks"] + c["tracebacks"] + \
        g["tracebacks"] + d.get("tracebacks", 0)
    lines = [
        "# Reliability: the fault-injection campaign (`make faults`)",
        "",
        f"Machine: {r['machine']}. Date: {r['date']}. Model: the default (SmolLM2-135M-Instruct, fp32, CPU). "
        f"Run time: {r['minutes']} minutes. Written by `eval/faults.py` (public API and CLI only).",
        "",
        "## Summary",
        "",
        _row("what", "trials", "outcome"),
        _row("---", "---", "---"),
        _row("snapshot and index faults", t["trials"], f"damaged KV served: {t['wrong_kv']}; tracebacks: "
             f"{t['tracebacks']}"),
        _row("  of which answered in exact mode (fresh process state)", t["answered"],
             f"wrong answers (vs a clean full prefill): {t['wrong_answers']}; store healed by the next "
             f"`compile --verify`: {t['healed']}/{t['answered']}"),
        _row("stale snapshots (skill edited)", st["trials"], f"exact == full: {st['exact_equals_full']}/"
             f"{st['trials']}"),
        _row("kill -9 mid-compile (a skill edited before each run)", k["trials"], _kills(k)),
        _row("kill -9 mid-compile of `compile --force`", kf["trials"], _kills(kf)),
        _row("4 concurrent compiles on one store", f"{c['rounds']} rounds, {c['processes']} processes",
             f"non-zero exits: {c['nonzero_exits']}; bad snapshots: {c['bad_snapshots']}; missing: {c['missing']}"),
        _row("gc --max-bytes caps", g["caps"], f"over the cap: {g['over_cap']}; bad after: {g['bad_after']}; "
             f"non-zero exits: {g['nonzero_exits']}"),
        _row("full disk (tmpfs store)", 1 if d.get("run") else 0, _disk(d)),
        "",
        f"**Wrong answers: {t['wrong_answers']}. Damaged KV served: "
        f"{t['wrong_kv'] + k['served_half_written'] + kf['served_half_written']}. "
        f"Tracebacks: {tracebacks}. Files touched outside the store: {r['outside_touched']}** (a sentinel folder "
        "beside the store, hashed before and after, was the target of the index and symlink faults).",
        "",
        *_findings(k, kf),
        "## Snapshot and index faults, by kind",
        "",
        "Each trial restores a pristine store (3 skills), applies one fault to one random snapshot or to the index, "
        "then reads every snapshot back through a fresh `Store`: each must equal the pristine KV (intact) or be "
        "refused (SnapshotError, recompiled by the caller). Every 5th trial also asks in exact mode through a fresh "
        "`SkillKV` and compares the answer token by token with a clean full-prefill answer.",
        "",
        _row("fault", "trials", "snapshots refused", "snapshots intact", "answered in exact mode"),
        _row("---", "---", "---", "---", "---"),
    ]
    for name, v in s["by_fault"].items():
        lines.append(_row(name, v["trials"], v["refused"], v["intact"], v["answered"]))
    lines += ["", "Refused snapshots are the damaged ones (truncation, bit flips, appended bytes, another skill's "
              "or another model's file, links); index faults (deleted, corrupted, paths outside the store, wrong "
              "types) leave every snapshot intact because the index is rebuilt from the self-describing files, "
              "and nothing outside the store is ever unlinked.", ""]
    path.write_text("\n".join(lines) + "\n")


def _findings(k: dict, kf: dict) -> list[str]:
    if not (k["lost"] or kf["lost"]):
        return []
    return ["## Finding", "",
            f"Stored snapshots lost to a kill: {k['lost']} in the edited-skill runs, {kf['lost']} in the "
            f"`compile --force` runs. `SkillKV.compile(force=True)` (skillkv/api.py) removes the stored snapshot "
            "before computing its replacement, so a crash in between loses it; the store still never serves a "
            "damaged snapshot, and the next compile computes it again. The removal is not needed: `Store.put` "
            "replaces a snapshot atomically (temp file, fsync, rename).", ""]


def _kills(k: dict) -> str:
    return (f"half-written snapshots served: {k['served_half_written']}; stored snapshots lost: {k['lost']}; "
            f"landed during a write (temp file present): {k['mid_write']}, after a snapshot was written: "
            f"{k['after_a_write']}; calibration: {k['calibration_s']}; "
            f"runs to completion after: {k['completions']} ({k['completion_failures']} failed, "
            f"{k['temp_left_after_completion']} temp files left)")


def _disk(d: dict) -> str:
    if not d.get("run"):
        return f"not run: {d.get('why', '')}"
    return (f"tmpfs of {d['tmpfs_bytes']:,} bytes: first compile exit {d['first_exit']}, full compile exit "
            f"{d['all_exit']} with `{d['error_line']}` (one line: {d['one_line']}); snapshots stored before: "
            f"{d['stored_before']}, intact after: {d['intact_after']}, bad: {d['bad_after']}; temp files left: "
            f"{d['temp_left']}")
