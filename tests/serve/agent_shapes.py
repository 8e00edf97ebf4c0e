"""Multi-turn conversations shaped like what agent clients send (docs/SERVE.md "Prompt mapping", DESIGN.md §8): a
system prompt with the skill catalog, the tools the agent declares, the SKILL.md body brought in mid-way (a skill
tool's result: Gemini CLI `activate_skill`, opencode `skill`; a file read through a tool: Codex `cat` through
`shell`, deepagents `read_file` with `cat -n` numbering; a `<skill>` user message: Codex `$name`, Claude Code), then
a tool call and its result every turn. Each shape: {"messages": the first request's, "tools": [...], "turns":
[(assistant message the model answered, messages the client appended after it), ...]}.
"""

from __future__ import annotations

import json

from conftest import REPO

SKILL = "sql-review"
QUESTION = "The users endpoint is slow and I think app/db.py builds SQL by hand. Review it."
WORK = [  # (what the agent does, its argument, the tool's output): the same work in every shape
    ("read", "app/db.py", "def find_user(conn, name):\n    return conn.execute(\n        f\"SELECT * FROM users "
                          "WHERE name = '{name}'\")\n"),
    ("shell", "grep -rn 'execute(' app/", "app/db.py:2:    return conn.execute(\napp/orders.py:14:    "
                                          "cur.execute(q)\n"),
    ("read", "app/orders.py", "q = \"SELECT * FROM orders WHERE user_id IN (\" + ids + \")\"\ncur.execute(q)\n"),
    ("shell", "psql -c 'EXPLAIN SELECT * FROM users WHERE name = $1'",
     "Seq Scan on users  (cost=0.00..431.00 rows=1 width=72)\n  Filter: (name = 'x'::text)\n"),
    ("shell", "pytest -q tests/test_db.py", "....\n4 passed in 0.31s\n"),
]


def skill_md() -> str:
    return (REPO / "skills" / SKILL / "SKILL.md").read_text()


def skill_body(kv) -> str:
    return kv.pick([SKILL])[0].body


def request(messages: list[dict], tools: list[dict] | None, **extra) -> dict:
    body = {"model": "default", "messages": messages, "max_tokens": 16, **extra}
    if tools is not None:
        body["tools"] = tools
    return body


def fn(name: str, description: str, /, **params: str) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": {
        "type": "object", "properties": {k: {"type": v} for k, v in params.items()}, "required": list(params)}}}


def call(i: int, name: str, content: str | None = None, /, **args) -> dict:
    return {"role": "assistant", "content": content, "tool_calls": [
        {"id": f"call_{i}", "type": "function",
         "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}]}


def result(i: int, text: str) -> dict:
    return {"role": "tool", "tool_call_id": f"call_{i}", "content": text}


def _work(read: tuple[str, str], shell: tuple[str, str], first: int) -> list:
    """The WORK steps as (assistant call, [tool result]) turns, then a final answer and the user's next question."""
    turns = []
    for i, (kind, arg, out) in enumerate(WORK, first):
        name, param = read if kind == "read" else shell
        text = "Let me look at the code first." if i == first else None
        turns.append((call(i, name, text, **{param: arg}), [result(i, out)]))
    turns.append(({"role": "assistant", "content": "Both queries interpolate user input: use parameters."},
                  [{"role": "user", "content": "Fix app/orders.py then."}]))
    return turns


def _catalog(kv, style: str) -> str:
    skills = kv.load_skills().skills
    if style == "xml":
        return "<available_skills>\n" + "".join(f"  <skill>\n    <name>{s.name}</name>\n    <description>"
                                                f"{s.description}</description>\n  </skill>\n" for s in skills) \
            + "</available_skills>"
    return "## Skills\n" + "".join(f"- {s.name}: {s.description} (file: ~/.codex/skills/{s.name}/SKILL.md)\n"
                                   for s in skills)


def gemini_cli(kv) -> dict:
    tools = [fn("activate_skill", "Activates a skill by name.", name="string"),
             fn("read_file", "Reads a file.", absolute_path="string"),
             fn("run_shell_command", "Runs a shell command.", command="string")]
    system = "You are an interactive CLI agent.\n\n# Available Agent Skills\n" + _catalog(kv, "xml")
    loaded = f'<activated_skill name="{SKILL}">\n<instructions>\n{skill_body(kv)}\n</instructions>\n</activated_skill>'
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
            "tools": tools, "turns": [(call(0, "activate_skill", name=SKILL), [result(0, loaded)])]
            + _work(("read_file", "absolute_path"), ("run_shell_command", "command"), 1)}


def opencode(kv) -> dict:
    tools = [fn("skill", "Load a skill's instructions.", name="string"), fn("read", "Read a file.", filePath="string"),
             fn("bash", "Run a command.", command="string")]
    system = "You are opencode, an interactive CLI tool.\n" + _catalog(kv, "xml")
    loaded = [{"type": "text", "text": f"## Skill: {SKILL}\n\n**Base directory**: /repo/.opencode/skill/{SKILL}\n\n"},
              {"type": "text", "text": skill_body(kv)}]
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
            "tools": tools, "turns": [(call(0, "skill", name=SKILL), [result(0, loaded)])]
            + _work(("read", "filePath"), ("bash", "command"), 1)}


def codex(kv) -> dict:
    tools = [fn("shell", "Runs a shell command.", command="string"), {"type": "web_search"}]
    dev = "<skills_instructions>\n" + _catalog(kv, "md") + "</skills_instructions>"
    return {"messages": [{"role": "system", "content": "You are Codex, a coding agent."},
                         {"role": "developer", "content": dev}, {"role": "user", "content": QUESTION}],
            "tools": tools, "turns": [(call(0, "shell", command=f"cat ~/.codex/skills/{SKILL}/SKILL.md"),
                                       [result(0, skill_md())])] + _work(("shell", "command"), ("shell", "command"), 1)}


def deepagents(kv) -> dict:
    tools = [fn("ls", "List files.", path="string"), fn("read_file", "Read a file.", file_path="string"),
             fn("execute", "Run a command.", command="string")]
    system = "You are a Deep Agent.\n\n" + _catalog(kv, "md")
    numbered = "\n".join(f"{i:6d}\t{ln}" for i, ln in enumerate(skill_md().splitlines(), 1))
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}],
            "tools": tools, "turns": [(call(0, "read_file", file_path=f"/skills/{SKILL}/SKILL.md"),
                                       [result(0, numbered)])]
            + _work(("read_file", "file_path"), ("execute", "command"), 1)}


def skill_message(kv) -> dict:
    """Codex `$sql-review` / Claude Code: the body as a `<skill>` user message before the question."""
    tools = [fn("Bash", "Run a command.", command="string"), fn("Read", "Read a file.", file_path="string")]
    block = f"<skill>\n<name>{SKILL}</name>\n<path>/home/u/.codex/skills/{SKILL}/SKILL.md</path>\n{skill_md()}</skill>"
    return {"messages": [{"role": "system", "content": "You are Claude Code."}, {"role": "user", "content": block},
                         {"role": "user", "content": QUESTION}],
            "tools": tools, "turns": _work(("Read", "file_path"), ("Bash", "command"), 0)}


SHAPES = {"gemini-cli": gemini_cli, "opencode": opencode, "codex": codex, "deepagents": deepagents,
          "skill-message": skill_message}


def plain_conversation() -> dict:
    """A plain client: no tools, no catalog, text turns; later questions would choose other skills on their own."""
    q = "Review this SQL query for injection risks: SELECT * FROM users WHERE id = $1"
    follow = ["Is an index on id enough?", "What does EXPLAIN ANALYZE add?", "And NULL comparisons?",
              "How do I write a good git commit message for this fix?"]
    turns = [({"role": "assistant", "content": f"Answer {i}: use parameters."}, [{"role": "user", "content": f}])
             for i, f in enumerate(follow)]
    turns.append(({"role": "assistant", "content": "Say what changed and why."}, []))
    return {"messages": [{"role": "user", "content": q}], "tools": None, "turns": turns}
