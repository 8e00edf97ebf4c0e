"""The arithmetic and the table of `skillkv bench --agent`: per-server summaries of per-request records, the ratios
between servers measured in one run, and the token-for-token check of skillkv against its own `mode: full`.

A record is one request: {conversation, turn, kind (first | skill | tool | user), skill_body (bool), prompt_tokens,
reused, computed, ttft_ms, total_ms, output_ids, text, error}; `sent: False` marks a turn never sent (its
conversation stopped at an error, or the column ran out of time).

  summarize(records, wall_s)   reused share = sum(reused) / sum(prompt tokens) over the answered turns after the
                               first of each conversation, and over those that bring no new skill body; first-token
                               p50 / p90 per turn kind and for every turn after the first without a new skill body;
                               on those turns also first token / the server's own time computing the new tokens
                               (`server_prompt_ms`: the cost of reuse beyond the prefill it leaves; goal <= 1.3)
                               answers/s = answered requests / wall time of the column; prompt and computed tokens
  ratios(a, b)                 a vs b: reused shares a / b, first-token p50s b / a (above 1: a is faster),
                               answers/s a / b, computed tokens b / a (above 1: a computes fewer)
  identical(normal, full)      per (conversation, turn) answered by both: output token ids when both carry them,
                               else the text; the pairs that differ
  markdown(report)             the docs/BENCHMARKS.md table (agent section), columns side by side
"""

from __future__ import annotations

import statistics

from skillkv.measure.loadtest import pct

KINDS = {"first": "first turn", "skill": "turns bringing a skill body", "tool": "tool-result turns",
         "user": "new user-message turns", "later": "every turn after the first without a new skill body"}


def _share(rs: list[dict]) -> float | None:
    if not rs or any(r["reused"] is None for r in rs):
        return None
    prompt = sum(r["prompt_tokens"] for r in rs)
    return round(sum(r["reused"] for r in rs) / prompt, 3) if prompt else None


def _times(rs: list[dict]) -> dict:
    xs = [r["ttft_ms"] for r in rs if r["ttft_ms"] is not None]
    return {"n": len(xs), "p50": round(statistics.median(xs), 1) if xs else None,
            "p90": round(pct(xs, 90), 1) if xs else None}


def _over_prefill(rs: list[dict]) -> dict:
    xs = [r["ttft_ms"] / r["server_prompt_ms"] for r in rs
          if r["ttft_ms"] is not None and (r.get("server_prompt_ms") or 0) > 0]
    return {"n": len(xs), "p50": round(statistics.median(xs), 2) if xs else None,
            "p90": round(pct(xs, 90), 2) if xs else None}


def summarize(records: list[dict], wall_s: float) -> dict:
    ok = [r for r in records if r.get("sent", True) and not r["error"]]
    later = [r for r in ok if r["turn"] > 0]
    plain = [r for r in later if not r["skill_body"]]
    ttft = {k: _times([r for r in ok if r["kind"] == k]) for k in KINDS if k != "later"}
    ttft["later"] = _times(plain)
    known = [r for r in ok if r["computed"] is not None]
    errors = [r for r in records if r.get("sent", True) and r["error"]]
    return {"requests": len(records), "answered": len(ok), "errors": len(errors),
            "not_sent": sum(1 for r in records if not r.get("sent", True)),
            "first_error": errors[0]["error"] if errors else "",
            "reused_share_after_first": _share(later), "reused_share_no_new_skill": _share(plain),
            "ttft_ms": ttft, "ttft_over_prefill": _over_prefill(plain),
            "answers_per_s": round(len(ok) / wall_s, 3) if wall_s and ok else None,
            "prompt_tokens": sum(r["prompt_tokens"] for r in ok),
            "computed_tokens": sum(r["computed"] for r in known) if known else None,
            "wall_s": round(wall_s, 2)}


def _ratio(x, y, digits: int = 2):
    return round(x / y, digits) if x is not None and y else None


def ratios(a: dict, b: dict) -> dict:
    return {"reused_share_after_first": _ratio(a["reused_share_after_first"], b["reused_share_after_first"]),
            "reused_share_no_new_skill": _ratio(a["reused_share_no_new_skill"], b["reused_share_no_new_skill"]),
            "ttft_p50_speedup": {k: _ratio(b["ttft_ms"][k]["p50"], a["ttft_ms"][k]["p50"]) for k in KINDS},
            "answers_per_s": _ratio(a["answers_per_s"], b["answers_per_s"]),
            "computed_tokens_fewer": _ratio(b["computed_tokens"], a["computed_tokens"])}


def identical(normal: list[dict], full: list[dict]) -> dict:
    other = {(r["conversation"], r["turn"]): r for r in full if r.get("sent", True) and not r["error"]}
    compared, bad, approx = 0, [], []  # a turn answered over the approximate cache ("cached") may differ: counted
    for r in normal:
        f = other.get((r["conversation"], r["turn"]))
        if f is None or not r.get("sent", True) or r["error"]:
            continue
        compared += 1
        both_ids = r.get("output_ids") is not None and f.get("output_ids") is not None
        same = r["output_ids"] == f["output_ids"] if both_ids else r["text"] == f["text"]
        if not same:
            (approx if r.get("mode") == "cached" else bad).append([r["conversation"], r["turn"]])
    return {"compared": compared, "identical": compared - len(bad) - len(approx), "by": "output token ids or text",
            "mismatches": bad, "approximate": sum(r.get("mode") == "cached" for r in normal),
            "approximate_mismatches": approx}


def _cell(x, fmt: str = "{}") -> str:
    return "-" if x is None else fmt.format(x)


def _x(x, word: str = "") -> str:
    return "-" if x is None else f"**{x}x**{word}"


def _better(x, more: str, less: str) -> str:
    """A ratio above 1 as `more` (2.5x faster), below 1 inverted as `less` (1.4x slower)."""
    if x is None:
        return "-"
    return f"**{x}x** {more}" if x >= 1 else f"**{round(1 / x, 2)}x** {less}"


def _p50_p90(t: dict) -> str:
    return f"{_cell(t['p50'])} / {_cell(t['p90'])} ms (n={t['n']})"


def _ratio_cell(t: dict | None) -> str:
    return "-" if not t or t["p50"] is None else f"{t['p50']}x / {t['p90']}x (n={t['n']})"


def markdown(rep: dict) -> str:
    m, cols = rep["meta"], rep["columns"]
    names = [n for n in ("skillkv", "skillkv-full", "llama.cpp") if n in cols]
    heads = {"skillkv": "skillkv", "skillkv-full": "skillkv `mode: full`",
             "llama.cpp": f"llama.cpp (xllamacpp {m.get('xllamacpp') or '-'})"}
    vs = [("skillkv-full", "skillkv vs full"), ("llama.cpp", "skillkv vs llama.cpp")]
    vs = [(k, t) for k, t in vs if k in names and "skillkv" in names]
    s = {n: cols[n]["summary"] for n in names}
    r = {k: rep["ratios"].get(f"skillkv_vs_{k}") for k, _ in vs}
    peer = (f" (llama.cpp: the same GGUF, {m.get('gguf')}, {m['threads']} threads, one slot of {m['context']:,} "
            "tokens per conversation, prompt cache on)") if "llama.cpp" in names else ""
    load = f", load average {m['load_average']} at the start" if m.get("load_average") is not None else ""
    load += f", {m['load_average_end']} at the end" if m.get("load_average_end") is not None else ""
    lines = [f"Measured {m['date']} on {m['device']}{load}; skillkv {m['skillkv']}, torch {m['torch']}; model "
             f"{m['model']}{peer}. {m['conversations']} conversations x {m['turns']} turns, "
             f"{'concurrent (one thread each)' if m['concurrent'] else 'interleaved round-robin'}, "
             f"{'tools sent (OpenAI shapes)' if m['tools'] else 'no tools (tool calls flattened into the text)'}, "
             f"answers of 16-32 tokens, greedy; seed {m['seed']}, scale {m['scale']}, traces planned to fill 90% of "
             f"{m['context']:,} tokens. {m.get('note') or ''} Regenerate: `{m['command']}`.".replace("  ", " "), "",
             "| | " + " | ".join(heads[n] for n in names) + "".join(f" | {t}" for _, t in vs) + " |",
             "|---" * (1 + len(names) + len(vs)) + "|"]

    def row(label: str, cell, ratio=None):
        lines.append(f"| {label} | " + " | ".join(cell(s[n]) for n in names) +
                     "".join(f" | {ratio(r[k]) if ratio and r[k] else '-'}" for k, _ in vs) + " |")

    row("reused share of prompt tokens, turns after the first", lambda x: _cell(x["reused_share_after_first"]),
        lambda q: _x(q["reused_share_after_first"]))
    row("reused share, turns bringing no new skill body", lambda x: _cell(x["reused_share_no_new_skill"]),
        lambda q: _x(q["reused_share_no_new_skill"]))
    for k, label in KINDS.items():
        row(f"first token p50 / p90, {label}", lambda x, k=k: _p50_p90(x["ttft_ms"][k]),
            lambda q, k=k: _better(q["ttft_p50_speedup"][k], "faster", "slower"))
    row("first token / the server's prefill of the new tokens, p50 / p90, turns after the first without a new "
        "skill body", lambda x: _ratio_cell(x.get("ttft_over_prefill")))
    row("answers/s over the run", lambda x: _cell(x["answers_per_s"]), lambda q: _x(q["answers_per_s"]))
    row("prompt tokens / computed tokens",
        lambda x: f"{x['prompt_tokens']:,} / {_cell(x['computed_tokens'], '{:,}')}",
        lambda q: _better(q["computed_tokens_fewer"], "fewer computed", "more computed"))
    row("errors (first)", lambda x: f"{x['errors']}" + (f" ({x['first_error'][:80]})" if x["errors"] else ""))
    same = rep.get("identical")
    if same:
        lines += ["", f"skillkv answers identical to `mode: full`, token for token: **{same['identical']}/"
                      f"{same['compared']}** turns" + (f" (differ: {same['mismatches'][:10]})" if same["mismatches"]
                                                       else "") + "."]
        if same.get("approximate"):
            lines[-1] += (f" {same['approximate']} turns were answered over the approximate prefix cache (mode "
                          f"`cached`: this machine's kernels are not chunk-invariant); "
                          f"{len(same['approximate_mismatches'])} of them differ from `mode: full`.")
    lines += [f"- {n}" for n in rep.get("notes", [])]
    return "\n".join(lines)
