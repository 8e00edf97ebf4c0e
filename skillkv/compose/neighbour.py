"""The compose neighbour: the stand-in skill later skills are compiled after (skillkv.compose.repair,
"Neighbour snapshots"), and the chain of its neighbour snapshot."""

from __future__ import annotations

from pathlib import Path

from skillkv.skills import Skill

# The stand-in predecessor later skills are compiled after (see "Neighbour snapshots"): the reference of an invented
# tool, shaped like a typical skill (commands, a table, codes, examples), that no question needs. Chosen among three
# stand-ins by a question-free criterion on the project's own skills/ (disjoint from the evaluation set): the mean
# KV error of a skill composed after another one against a true prefill: 0.130 for this text, 0.136 for generic
# answering guidelines, 0.152 with no stand-in (`eval/neighbour_criterion.py --max-tokens 400 --skills
# release-notes,python-debugging,sql-review`). Changing the text changes its hash: neighbour snapshots recompile.
NEIGHBOUR = Skill(
    name="fernbank-cli",
    description="Reference for the fernbank command-line tool: commands, flags, configuration keys and exit codes. "
                "Use when the user asks how to run, configure or troubleshoot fernbank.",
    body="""## Commands

- `fernbank init --dir PATH` creates a workspace; it writes `fernbank.toml` with defaults.
- `fernbank sync --remote NAME --jobs N` copies changed files; N defaults to 4 and may be at most 32.
- `fernbank status --json` prints one JSON object per tracked file.
- `fernbank prune --older-than 30d` removes cached blobs not used for 30 days.

## Configuration (`fernbank.toml`)

| key | default | meaning |
|---|---|---|
| `cache.max_size` | `2GiB` | cache limit before pruning starts |
| `sync.retries` | `3` | attempts per file before giving up |
| `sync.timeout_s` | `45` | seconds per request |
| `log.level` | `info` | one of debug, info, warn, error |

## Exit codes

- `0` success; `2` bad arguments; `3` remote unreachable; `5` checksum mismatch (the file is re-queued once).

## Examples

```
fernbank sync --remote backup --jobs 8
fernbank prune --older-than 7d --dry-run
```

## Notes

1. Run `fernbank status` before a sync to see what will change.
2. Keep secrets out of `fernbank.toml`; use the `FERNBANK_TOKEN` environment variable.
3. A sync interrupted with Ctrl-C resumes from the last finished file.
""",
    path=Path(__file__))
