"""The text of agent traces: tool definitions, system instructions, tool outputs and user requests, from a seeded RNG.

Contract (skillkv.measure.agent_traces builds conversations from these):
  - every function takes a `random.Random` and draws only from it: the same RNG state gives the same text;
  - `grow(line, target, count)` returns lines from `line()` joined by newlines until `count(text)` (tokens of the
    model's tokenizer, or any length function) reaches `target`; every sized text here is made that way, so a size
    asked for is the size obtained to within one line (~10-30 tokens);
  - `tool_defs(names, target, ...)` returns OpenAI function tools (`{"type": "function", "function": {name,
    description, parameters}}`, parameters a JSON schema) whose JSON is ~`target` tokens in all;
  - `call_args(tool, rng, ...)` returns arguments valid for that tool's schema; `tool_output(tool, args, target, ...)`
    the text a client would send back as the tool's result.
The words are invented (a made-up project): the benchmark measures the serving of the text, not its meaning.
"""

from __future__ import annotations

import json
import random
from typing import Callable

Count = Callable[[str], int]

WORDS = ["cache", "page", "token", "router", "batch", "queue", "store", "index", "chunk", "layer", "worker", "policy",
         "budget", "ledger", "span", "block", "slot", "stream", "config", "report", "client", "session", "trace"]
VERBS = ["load", "parse", "merge", "flush", "check", "build", "resolve", "render", "split", "rotate", "evict", "score"]
DIRS = ["src/core", "src/serve", "src/store", "src/util", "tests", "tests/unit", "docs", "scripts"]
CLIENT_TOOLS = {  # name: (what it does, {param: (json type, description)}, required)
    "read_file": ("Reads a file from the local filesystem and returns its lines with line numbers.",
                  {"path": ("string", "Absolute or project-relative path of the file to read."),
                   "offset": ("integer", "Line number to start reading from (1-based)."),
                   "limit": ("integer", "Number of lines to read; omit to read the whole file.")}, ["path"]),
    "shell": ("Runs a shell command in the project's working directory and returns its stdout, stderr and exit code.",
              {"command": ("string", "The command line to run, e.g. `pytest -q tests/unit`."),
               "timeout_ms": ("integer", "Kill the command after this many milliseconds (default 120000)."),
               "description": ("string", "Five to ten words saying what the command does, shown to the user.")},
              ["command"]),
    "activate_skill": ("Loads the full instructions of one of the available skills into the conversation.",
                       {"name": ("string", "The skill's name exactly as listed in <available_skills>.")}, ["name"]),
    "grep": ("Searches file contents with a regular expression (ripgrep syntax) and returns matching lines.",
             {"pattern": ("string", "The regular expression to search for."),
              "path": ("string", "File or folder to search in (default: the working directory)."),
              "glob": ("string", "Only search files matching this glob, e.g. `*.py`.")}, ["pattern"]),
    "list_dir": ("Lists the files and folders in a directory, one per line, folders first.",
                 {"path": ("string", "The directory to list."),
                  "ignore": ("array", "Glob patterns of entries to leave out.")}, ["path"]),
    "edit_file": ("Replaces an exact string in a file with another string and shows the edited region.",
                  {"path": ("string", "The file to modify."), "old_string": ("string", "The exact text to replace."),
                   "new_string": ("string", "The text to put in its place."),
                   "replace_all": ("boolean", "Replace every occurrence instead of requiring a unique match.")},
                  ["path", "old_string", "new_string"]),
    "write_file": ("Writes a file to the local filesystem, overwriting it if it exists.",
                   {"path": ("string", "The file to write."), "content": ("string", "The full content.")},
                   ["path", "content"]),
    "glob": ("Finds files whose path matches a glob pattern, sorted by modification time.",
             {"pattern": ("string", "The glob pattern, e.g. `src/**/*.py`."),
              "path": ("string", "The folder to search from.")}, ["pattern"]),
    "web_fetch": ("Fetches a URL and returns its content converted to markdown.",
                  {"url": ("string", "The URL to fetch."), "prompt": ("string", "What to extract from the page.")},
                  ["url"]),
    "todo_write": ("Creates and updates the task list for the current session.",
                   {"todos": ("array", "The full list of todo items with their status.")}, ["todos"]),
}
NOTES = ["Prefer this tool over running {x} through the shell.", "Never guess a {w}: read it first.",
         "Results longer than {n} lines are truncated; narrow the {w} and call it again.",
         "Call it in parallel with other read-only tools when the calls do not depend on each other.",
         "Paths must stay inside the working directory; a path outside it is refused.",
         "The user sees a one-line summary of every call, so keep arguments short and specific.",
         "When the {w} is large, read the part you need with an offset instead of the whole {w}.",
         "Do not use it to {v} the {w} of another project unless the user asks.",
         "If the call fails with a timeout, retry once with a smaller {w} before asking the user.",
         "Explain in one sentence why you call it before calling it for a {w} the user did not mention."]


def grow(line: Callable[[], str], target: int, count: Count) -> str:
    out, n = [], 0
    while n < target:
        s = line()
        out.append(s)
        n += count(s + "\n")
    return "\n".join(out)


def ident(rng: random.Random) -> str:
    return f"{rng.choice(VERBS)}_{rng.choice(WORDS)}"


def path(rng: random.Random, ext: str = ".py") -> str:
    return f"{rng.choice(DIRS)}/{rng.choice(WORDS)}_{rng.choice(WORDS)}{ext}"


def note(rng: random.Random) -> str:
    return rng.choice(NOTES).format(x=rng.choice(["cat", "grep", "find", "sed"]), w=rng.choice(WORDS),
                                    n=rng.choice([200, 500, 2000]), v=rng.choice(VERBS))


def tool_defs(names: list[str], target: int, count: Count, rng: random.Random) -> list[dict]:
    """OpenAI function tools for `names`; their usage notes grow until the JSON of all is ~`target` tokens."""
    tools = []
    for name in names:
        what, params, required = CLIENT_TOOLS[name]
        props = {}
        for p, (kind, desc) in params.items():
            props[p] = {"type": kind, "description": desc}
            if kind == "array":
                props[p]["items"] = {"type": "string"} if p == "ignore" else {
                    "type": "object", "properties": {"content": {"type": "string"},
                                                     "status": {"enum": ["pending", "in_progress", "done"]}}}
        tools.append({"type": "function", "function": {"name": name, "description": what, "parameters": {
            "type": "object", "properties": props, "required": required, "additionalProperties": False}}})
    share = max(0, target - count(json.dumps(tools))) // max(1, len(tools))
    for t in tools:
        fn = t["function"]
        fn["description"] += "\n\nUsage notes:\n" + grow(lambda: "- " + note(rng), share, count)
    return tools


def instructions(client: str, target: int, count: Count, rng: random.Random) -> str:
    rules = ["Keep answers short: the user reads them in a terminal.", "Read a file before you edit it.",
             "Run the tests after a change and report what failed.", "Never commit unless the user asks.",
             "Follow the conventions of the code around the change.", "Prefer small, reviewable edits.",
             "When a skill matches the task, load it before you start and follow it.",
             "Say which files you changed and why, in one line each.", "Do not invent file names or APIs."]
    head = (f"You are {client}, an interactive command-line agent that helps users with software engineering tasks. "
            "Use the tools available to you to inspect and change the project.")
    return head + "\n\n# Rules\n" + grow(lambda: "- " + rng.choice(rules) + " " + note(rng), target, count)


def call_args(tool: str, rng: random.Random, skill: str = "", skill_path: str = "") -> dict:
    f = path(rng)
    return {"read_file": {"path": f}, "activate_skill": {"name": skill},
            "shell": {"command": f"cat {skill_path}" if skill_path else rng.choice(
                [f"pytest -q {rng.choice(DIRS[4:6])}", "git log --oneline -20", f"python -m {rng.choice(WORDS)}",
                 "git diff --stat", f"ls -la {rng.choice(DIRS)}"])},
            "grep": {"pattern": ident(rng), "path": rng.choice(DIRS)}, "list_dir": {"path": rng.choice(DIRS)},
            "edit_file": {"path": f, "old_string": f"{ident(rng)}(", "new_string": f"{ident(rng)}("},
            "write_file": {"path": f, "content": f"def {ident(rng)}():\n    return None\n"},
            "glob": {"pattern": f"{rng.choice(DIRS)}/**/*.py"},
            "web_fetch": {"url": f"https://docs.example.org/{rng.choice(WORDS)}", "prompt": "the API summary"},
            "todo_write": {"todos": [{"content": f"{rng.choice(VERBS)} the {rng.choice(WORDS)}", "status": "pending"}
                                     for _ in range(3)]}}[tool]


def code_line(rng: random.Random, i: list[int]) -> str:
    i[0] += 1
    k = rng.random()
    if k < 0.12:
        body = f"def {ident(rng)}(self, {rng.choice(WORDS)}: int, {rng.choice(WORDS)}=None) -> dict:"
    elif k < 0.3:
        body = f"    if {rng.choice(WORDS)}.{rng.choice(WORDS)} > {rng.randint(0, 4096)}:"
    elif k < 0.5:
        body = f"        return self.{ident(rng)}({rng.choice(WORDS)}, limit={rng.randint(1, 64)})"
    elif k < 0.7:
        body = f"    # {rng.choice(VERBS)} the {rng.choice(WORDS)} before the {rng.choice(WORDS)} is read"
    else:
        body = f"    {rng.choice(WORDS)} = {ident(rng)}({rng.choice(WORDS)}, {rng.choice(WORDS)}[{rng.randint(0, 9)}])"
    return f"{i[0]:>5}\t{body}"


def shell_line(rng: random.Random, cmd: str) -> str:
    if cmd.startswith("pytest"):
        return rng.choice([f"{path(rng).replace('src', 'tests')}::test_{ident(rng)} PASSED",
                           f"{path(rng).replace('src', 'tests')}::test_{ident(rng)} FAILED",
                           f"E   AssertionError: {rng.choice(WORDS)} {rng.randint(0, 99)} != {rng.randint(0, 99)}"])
    if cmd.startswith("git"):
        return f"{rng.getrandbits(28):07x} {rng.choice(VERBS)} {rng.choice(WORDS)}: {rng.choice(VERBS)} the " \
               f"{rng.choice(WORDS)} {rng.choice(['once', 'early', 'per request', 'in place'])}"
    if cmd.startswith("ls"):
        return f"{rng.choice(['-rw-r--r--', 'drwxr-xr-x'])} 1 dev dev {rng.randint(90, 90000):>6} " \
               f"Nov {rng.randint(1, 30):>2} {path(rng)}"
    return f"{rng.choice(['INFO', 'WARN', 'DEBUG'])} {rng.choice(WORDS)}: {rng.choice(VERBS)}ed " \
           f"{rng.randint(1, 5000)} {rng.choice(WORDS)}s in {rng.randint(1, 900)} ms"


def tool_output(tool: str, args: dict, target: int, count: Count, rng: random.Random) -> str:
    """The result text a client returns for `tool` called with `args`, ~`target` tokens."""
    n = [rng.randint(0, 300)]
    if tool == "read_file":
        return grow(lambda: code_line(rng, n), target, count)
    if tool == "shell":
        return f"$ {args['command']}\n" + grow(lambda: shell_line(rng, args["command"]), target, count) + \
            f"\n[exit code {rng.choice([0, 0, 1])}]"
    if tool == "grep":
        return grow(lambda: f"{path(rng)}:{rng.randint(1, 900)}:{code_line(rng, n).split(chr(9))[1]}", target, count)
    if tool in ("list_dir", "glob"):
        return grow(lambda: path(rng, rng.choice([".py", ".md", "/", ".toml"])), target, count)
    if tool in ("edit_file", "write_file"):
        return f"The file {args['path']} has been updated. A snippet of the result:\n" + \
            grow(lambda: code_line(rng, n), target, count)
    if tool == "web_fetch":
        return grow(lambda: f"{rng.choice(['##', '-', '-', ''])} The {rng.choice(WORDS)} API {rng.choice(VERBS)}s a "
                            f"{rng.choice(WORDS)} per {rng.choice(WORDS)}.", target, count)
    return "Todos updated:\n" + grow(lambda: f"- [ ] {rng.choice(VERBS)} the {rng.choice(WORDS)}", target, count)


def task_request(rng: random.Random, topic: str) -> str:
    f = path(rng)
    return rng.choice([f"I need help with {topic}. Can you look at {f} and tell me what to change first?",
                       f"The tests in {f.replace('src', 'tests')} fail since my last change, which touched "
                       f"{topic}. Please find out why.",
                       f"Please review {f} with {topic} in mind and fix the worst problem you find.",
                       f"Next: {rng.choice(VERBS)} the {rng.choice(WORDS)} handling in {f}. Keep it small."])


def fact_request(rng: random.Random, skill: str, fact: str) -> str:
    return rng.choice([f"The {skill} skill says: \"{fact}\" Does our change follow that? Check the code again.",
                       f"Apply this rule from the {skill} skill to the file you just read: \"{fact}\"",
                       f"Quote the part of the {skill} skill that matters here and act on it: \"{fact}\""])
