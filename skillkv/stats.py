"""Usage statistics: one SQLite database per store, `<store>/stats.sqlite`.

Every `SkillKV.ask` records one row in `asks` (model tag, mode, token counts, timings) and one row per skill in
`ask_skills` (which tier its KV came from: `l1` = resident in the runner, `host` = the host tier's cache, `l2` = a
snapshot loaded from disk, `computed` = prefilled now; `memory` = the in-process memo of versions before the
runners held their own prefixes, kept for old records). `summary()` turns them into what `skillkv stats` prints.

Robustness contract: statistics are never worth a failed ask. A database that is not a database (or whose
schema is unusable) is moved aside to `stats.sqlite.corrupt-<time>` and recreated with a warning; a database
that stays locked past a short timeout skips the write (or reads as empty) with a warning. Callers still wrap
`record` so that nothing here can fail an ask.

Estimated time saved: cached tokens divided by the model's prefill rate, measured the way `skillkv bench` measures
it: full prefills of skill-sized prompts, nothing else in the step. The compile stage records every piece of at
least MIN_RATE_TOKENS tokens it computes (tokens, seconds; table `prefills`); the rate is the median over the last
RATE_SAMPLES of them (a warm-up or a moment of load does not move a median). Asks are not used: their first-token
time covers a short question whose fixed costs dominate, and a server's asks wait in batches.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

DB_NAME = "stats.sqlite"
TIERS = ("l1", "host", "memory", "l2", "computed")
SCHEMA = """
CREATE TABLE IF NOT EXISTS asks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    mode TEXT NOT NULL,
    skills TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    computed_tokens INTEGER NOT NULL,
    snapshot_load_ms REAL,
    ttft_ms REAL,
    total_ms REAL
);
CREATE TABLE IF NOT EXISTS ask_skills (
    ask_id INTEGER NOT NULL REFERENCES asks(id),
    pos INTEGER NOT NULL,
    skill TEXT NOT NULL,
    tier TEXT NOT NULL,
    tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ask_skills_skill ON ask_skills(skill);
CREATE TABLE IF NOT EXISTS prefills (
    ts REAL NOT NULL,
    model TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    seconds REAL NOT NULL
);
"""
MIN_RATE_TOKENS = 256
RATE_SAMPLES = 20


@dataclass
class AskRecord:
    model: str
    mode: str
    skills: list[str]
    tiers: list[str]  # one per skill, in order
    skill_tokens: list[int]  # tokens of each skill's piece, in order
    prompt: int
    cached: int
    computed: int
    snapshot_load_ms: float | None = None
    ttft_ms: float | None = None
    total_ms: float | None = None
    ts: float = field(default_factory=time.time)


def _warn_stderr(msg: str) -> None:
    import sys

    print(f"skillkv: warning: {msg}", file=sys.stderr)


class StatsDB:
    """The statistics of one store. Opens lazily; every public method survives a locked or corrupted file."""

    def __init__(self, root: Path | str, on_warning: Callable[[str], None] = _warn_stderr, timeout: float = 2.0):
        self.path = Path(root) / DB_NAME
        self.on_warning = on_warning
        self.timeout = timeout

    # ------------------------------------------------------------------ connection

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(str(self.path), timeout=self.timeout)
        try:
            con.executescript(SCHEMA)
            con.execute("SELECT id, ts, model, mode, skills, prompt_tokens, cached_tokens, computed_tokens, "
                        "snapshot_load_ms, ttft_ms, total_ms FROM asks LIMIT 1").fetchall()
            con.execute("SELECT ask_id, pos, skill, tier, tokens FROM ask_skills LIMIT 1").fetchall()
        except BaseException:
            con.close()
            raise
        return con

    def _recreate(self, why: Exception) -> None:
        aside = self.path.with_name(f"{DB_NAME}.corrupt-{int(time.time())}")
        with contextlib.suppress(OSError):
            self.path.replace(aside)
        for suffix in ("-wal", "-shm", "-journal"):
            with contextlib.suppress(OSError):
                self.path.with_name(DB_NAME + suffix).unlink()
        self.on_warning(f"stats database {self.path} was unreadable ({why}); moved to {aside.name} and recreated")

    @staticmethod
    def _is_transient(e: Exception) -> bool:
        """Locked, busy, read-only or not openable: the file is fine, leave it alone."""
        msg = str(e).lower()
        return isinstance(e, sqlite3.OperationalError) and any(
            w in msg for w in ("locked", "busy", "readonly", "read-only", "unable to open", "disk i/o"))

    def _run(self, fn, default, what: str):
        """fn(con) in a transaction; corrupted -> recreate and retry once; locked -> warn, return default."""
        for attempt in range(2):
            try:
                con = self._connect()
                try:
                    with con:
                        return fn(con)
                finally:
                    con.close()
            except sqlite3.DatabaseError as e:
                if self._is_transient(e):
                    self.on_warning(f"stats database {self.path} not available ({e}); {what} skipped")
                    return default
                if attempt == 0:
                    self._recreate(e)
                    continue
                self.on_warning(f"stats database {self.path} unusable ({e}); {what} skipped")
                return default
            except OSError as e:
                self.on_warning(f"stats database {self.path} cannot be opened ({e.strerror or e}); {what} skipped")
                return default
        return default

    # ------------------------------------------------------------------ write / read

    def record(self, r: AskRecord) -> None:
        def write(con):
            cur = con.execute(
                "INSERT INTO asks (ts, model, mode, skills, prompt_tokens, cached_tokens, computed_tokens, "
                "snapshot_load_ms, ttft_ms, total_ms) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (r.ts, r.model, r.mode, json.dumps(r.skills), r.prompt, r.cached, r.computed,
                 r.snapshot_load_ms, r.ttft_ms, r.total_ms))
            con.executemany("INSERT INTO ask_skills (ask_id, pos, skill, tier, tokens) VALUES (?,?,?,?,?)",
                            [(cur.lastrowid, i, s, t, n)
                             for i, (s, t, n) in enumerate(zip(r.skills, r.tiers, r.skill_tokens))])
        self._run(write, None, "recording this ask")

    def exists(self) -> bool:
        """Whether the database file is there (readers do not create it)."""
        return self.path.is_file()

    def record_prefill(self, model: str, tokens: int, seconds: float) -> None:
        """A full prefill of `tokens` that took `seconds` (the compile stage's pieces; module docstring)."""
        if tokens < MIN_RATE_TOKENS or seconds <= 0:
            return
        self._run(lambda con: con.execute("INSERT INTO prefills (ts, model, tokens, seconds) VALUES (?,?,?,?)",
                                          (time.time(), model, tokens, seconds)), None, "recording a prefill rate")

    def prefill_rate(self, model: str) -> tuple[float | None, int]:
        """(median tokens/s of the last RATE_SAMPLES recorded prefills of `model`, how many), or (None, 0)."""
        if not self.exists():
            return None, 0
        return _median_rate(self._run(lambda con: _rates(con, model), [], "reading prefill rates"))

    def asks(self, model: str | None = None) -> list[dict]:
        return self._run(lambda con: _asks(con, model), [], "reading statistics")

    def report(self, model: str) -> tuple[list[dict], float | None, int]:
        """`asks(model)` and `prefill_rate(model)` in one read (one warning if the file is locked); nothing is
        created when the database does not exist."""
        if not self.exists():
            return [], None, 0
        asks, rates = self._run(lambda con: (_asks(con, model), _rates(con, model)), ([], []), "reading statistics")
        return (asks, *_median_rate(rates))


def _asks(con, model: str | None) -> list[dict]:
    con.row_factory = sqlite3.Row
    q, args = "SELECT * FROM asks", ()
    if model:
        q, args = q + " WHERE model = ?", (model,)
    rows = [dict(x) for x in con.execute(q + " ORDER BY ts, id", args)]
    by_id = {row["id"]: row for row in rows}
    for row in rows:
        row["skills"] = json.loads(row["skills"])
        row["per_skill"] = []
    for x in con.execute("SELECT * FROM ask_skills ORDER BY ask_id, pos"):
        if x["ask_id"] in by_id:
            by_id[x["ask_id"]]["per_skill"].append({"skill": x["skill"], "tier": x["tier"], "tokens": x["tokens"]})
    return rows


def _rates(con, model: str) -> list[tuple[int, float]]:
    return [tuple(r) for r in con.execute("SELECT tokens, seconds FROM prefills WHERE model = ? ORDER BY ts DESC "
                                          "LIMIT ?", (model, RATE_SAMPLES)).fetchall()]


def _median_rate(rows: list[tuple[int, float]]) -> tuple[float | None, int]:
    rates = sorted(t / s for t, s in rows if s > 0)
    if not rates:
        return None, 0
    mid = len(rates) // 2
    return (rates[mid] if len(rates) % 2 else (rates[mid - 1] + rates[mid]) / 2), len(rates)


def summary(asks: list[dict], rate: float | None = None) -> dict:
    """Totals and per-skill numbers from the rows of `StatsDB.asks`; `rate` is the prefill rate (tokens/s,
    `StatsDB.prefill_rate`) the time saved is estimated with (store facts are added by the caller)."""
    prompt = sum(a["prompt_tokens"] for a in asks)
    cached = sum(a["cached_tokens"] for a in asks)
    computed = sum(a["computed_tokens"] for a in asks)
    tier_counts = dict.fromkeys(TIERS, 0)
    skills: dict[str, dict] = {}
    for a in asks:
        for p in a["per_skill"]:
            tier_counts[p["tier"]] = tier_counts.get(p["tier"], 0) + 1
            s = skills.setdefault(p["skill"], {"uses": 0, "tokens": 0, "tokens_saved": 0, "last_used": None,
                                               "tiers": dict.fromkeys(TIERS, 0)})
            s["uses"] += 1
            s["tokens"] += p["tokens"]
            if p["tier"] != "computed":
                s["tokens_saved"] += p["tokens"]
            s["tiers"][p["tier"]] = s["tiers"].get(p["tier"], 0) + 1
            s["last_used"] = max(s["last_used"] or 0, a["ts"])
    n_pieces = sum(tier_counts.values())
    return {
        "questions": len(asks),
        "by_mode": {m: sum(1 for a in asks if a["mode"] == m) for m in sorted({a["mode"] for a in asks})},
        "tokens": {"prompt": prompt, "cached": cached, "computed": computed},
        "prefill_tokens_saved": cached,
        "prefill_rate_tok_s": round(rate, 1) if rate else None,
        "est_time_saved_s": round(cached / rate, 3) if rate else None,
        "tier_hits": tier_counts,
        "tier_hit_rate": {t: round(c / n_pieces, 3) for t, c in tier_counts.items()} if n_pieces else {},
        "skills": skills,
    }


def saved_over_time(asks: list[dict]) -> tuple[list[float], list[int]]:
    """(timestamps, cumulative prefill tokens saved) for the plot."""
    ts, total, out = [], 0, []
    for a in asks:
        total += a["cached_tokens"]
        ts.append(a["ts"])
        out.append(total)
    return ts, out


def plot(asks: list[dict], per_skill: dict[str, dict], path: Path, title: str = "",
         rate: float | None = None) -> None:
    """Two panels: cumulative prefill tokens saved over time (and, with the prefill `rate`, the seconds they
    would have taken), uses per skill; `title` names the model and the store. Written atomically."""
    from skillkv.errors import SkillkvError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.dates as mdates
        import matplotlib.pyplot as plt
    except ImportError:
        raise SkillkvError("--plot needs matplotlib (pip install matplotlib)") from None
    import datetime as dt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    if title:
        fig.suptitle(title)
    ts, saved = saved_over_time(asks)
    when = [dt.datetime.fromtimestamp(t) for t in ts]
    ax1.step(when, saved, where="post")
    if when and when[0] == when[-1]:  # one moment: an hour around it, not matplotlib's years
        ax1.set_xlim(when[0] - dt.timedelta(minutes=30), when[0] + dt.timedelta(minutes=30))
    ax1.set_title("prefill tokens saved (cumulative)")
    ax1.set_ylabel("tokens")
    ax1.xaxis.set_major_formatter(mdates.DateFormatter("%d %b %H:%M"))  # day and month, never a bare hour
    if rate:
        sec = ax1.secondary_yaxis("right", functions=(lambda t: t / rate, lambda s: s * rate))
        sec.set_ylabel(f"seconds of prefill saved (at {rate:,.0f} tok/s)")
    fig.autofmt_xdate()
    names = sorted(per_skill, key=lambda n: -per_skill[n]["uses"])
    ax2.barh(names[::-1], [per_skill[n]["uses"] for n in names[::-1]])
    ax2.set_title("uses per skill")
    ax2.set_xlabel("asks")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix or '.png'}")
    try:
        fig.savefig(tmp, dpi=100)
        tmp.replace(path)
    except OSError as e:
        raise SkillkvError(f"cannot write plot {path} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
