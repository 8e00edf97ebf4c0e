"""Agent conversations ("traces") for `skillkv bench --agent`, shaped like published agent traffic (DESIGN.md §8).

    traces = make_traces(skills, conversations=4, turns=20, seed=0, count=tokens_of_the_model)
    msgs = request_messages(traces[0], i, answers)     # the messages of request i, given the answers so far

Contract:
  - deterministic: the same skills, arguments and `count` give the same traces, text for text;
  - each trace has a head (a system prompt: agent instructions, the skill catalog `<available_skills>` of every
    skill with its name, description and location, and an environment block naming the conversation's own project
    folder) and `tools`: 3-8 OpenAI function tools of the trace's client, ~1,000-2,000 tokens of JSON at scale 1;
    conversations of the same client shape share instructions and tools, as sessions of one client do;
  - a trace is `turns` steps; step i is one request: `new` messages appended before it (tool results for the calls
    of step i-1, or a user message starting a task), and `calls`, the tool calls scripted onto that request's answer
    (the bench appends the model's actual answer text verbatim as the assistant message, with these calls);
    tool results are 50-600 tokens at scale 1 (shrunk together, never below 50, so that the last request fits
    `fill` of `context`), answers are limited to 16-32 tokens (`Step.max_tokens`);
  - exactly one step brings a SKILL.md body (`kind == "skill"`), in the shape of the trace's client, rotating over
    conversations: "tool" a skill tool's result `<skill_content name=..>` + body without frontmatter (Gemini CLI,
    opencode), "shell" a shell tool's result of `cat .../SKILL.md` (the whole file; Codex, deepagents), "user" a user
    message `<skill><name>..</name><path>..</path>` + body `</skill>` before the task (Codex `$name`, Claude Code);
    every later task's request quotes a line of that body. Only skills whose SKILL.md is at most a fifth of `context`
    are loaded;
  - the last request is planned to fit `fill` of `context` with `max_tokens` to spare, the tools' JSON counted
    unless `with_tools` is False (they are not sent then);
  - `request_messages(..., tools=False)` is the shape for servers without tool support: assistant tool calls
    flattened into the content as `<tool_call>{"name", "arguments"}</tool_call>`, tool results as user messages
    `<tool_response>...</tool_response>` (as the generic tool format writes them); the default sends the OpenAI shapes (`tool_calls` with id / type / function.name /
    function.arguments as a JSON string, `tool` messages with `tool_call_id`).
A trace that cannot fit raises SkillkvError (one line: fewer turns, a smaller scale or a larger context).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field

from skillkv.errors import SkillkvError
from skillkv.measure import agent_content as text

SHAPES = ("tool", "shell", "user")
CLIENTS = {"tool": ("Agent A", "activate_skill", "/home/dev/.agent-a/skills"),
           "shell": ("Agent B", "shell", ".agents/skills"),
           "user": ("Agent C", "", "/home/dev/.agent-c/skills")}
BASE_TOOLS = {"tool": ["read_file", "shell", "activate_skill"], "shell": ["shell", "read_file"],
              "user": ["shell", "read_file"]}
WORK_TOOLS = ["read_file", "shell", "grep", "list_dir", "edit_file", "glob", "read_file", "shell"]
OVERHEAD = 6  # template tokens around one message (<|im_start|>role\n ... <|im_end|>\n)


@dataclass
class Call:
    id: str
    name: str
    args: dict


@dataclass
class Step:
    new: list[dict]
    calls: list[Call]
    max_tokens: int
    kind: str  # first | user | tool | skill
    skill: str = ""


@dataclass
class Trace:
    index: int
    shape: str
    client: str
    skill: str
    system: str
    tools: list[dict]
    steps: list[Step]
    tokens: dict = field(default_factory=dict)


def _facts(body: str) -> list[str]:
    """Whole sentences of the body (wrapped lines joined; headings, tables and code left out), 40-200 characters."""
    out = []
    for block in re.split(r"\n\s*\n|\n(?=\s*(?:[-*]|\d+\.)\s)", body):
        lines = [x.strip() for x in block.strip().splitlines()]
        if not lines or lines[0].startswith(("#", "```", "|")):
            continue
        joined = re.sub(r"^(?:[-*]|\d+\.)\s+", "", " ".join(lines))
        out += [x.strip() for x in re.split(r"(?<=[.!?])\s+", joined) if 40 <= len(x.strip()) <= 200]
    return out or [body.strip().splitlines()[0][:200]]


def catalog(skills, root: str) -> str:
    items = [f"  <skill>\n    <name>{s.name}</name>\n    <description>{s.description.strip()}</description>\n"
             f"    <location>{root}/{s.name}/SKILL.md</location>\n  </skill>" for s in skills]
    return "<available_skills>\n" + "\n".join(items) + "\n</available_skills>"


def _head(shape: str, skills, seed: int, scale: float, count) -> tuple[str, list[dict]]:
    rng = random.Random(f"{seed}:client:{shape}")
    client, _, root = CLIENTS[shape]
    names = list(BASE_TOOLS[shape])
    others = [n for n in text.CLIENT_TOOLS if n not in names and n != "activate_skill"]
    names += rng.sample(others, rng.randint(3, 8) - len(names))
    tools = text.tool_defs(names, round(rng.randint(1000, 2000) * scale), count, rng)
    system = (text.instructions(client, round(250 * scale), count, rng) + "\n\n# Skills\nThese skills are available."
              " Load a skill's full instructions when the task matches its description.\n" + catalog(skills, root))
    return system, tools


def _loader(shape: str, skill, seed: int) -> tuple[str, dict, str]:
    """(tool name, its arguments, the text that brings the body) for `skill` in the client shape."""
    tool, root = CLIENTS[shape][1], CLIENTS[shape][2]
    where = f"{root}/{skill.name}/SKILL.md"
    if shape == "tool":
        body = f'<skill_content name="{skill.name}">\n{skill.body.strip()}\n</skill_content>'
        return tool, {"name": skill.name}, body
    if shape == "shell":
        return tool, {"command": f"cat {where}"}, (skill.path / "SKILL.md").read_text()
    return "", {}, f"<skill>\n<name>{skill.name}</name>\n<path>{where}</path>\n{skill.body.strip()}\n</skill>"


def _plan(index: int, shape: str, skill, tools: list[dict], turns: int, seed: int, rng: random.Random):
    """Steps with tool results still unsized: (steps, [(step, message, call)] of results to write)."""
    names = [t["function"]["name"] for t in tools]
    usable = [n for n in WORK_TOOLS if n in names]
    load_tool, load_args, body_text = _loader(shape, skill, seed)
    load_at = rng.choice([1, 2]) if shape != "user" else -1
    facts, topic = _facts(skill.body), skill.name.replace("-", " ")
    steps, pending, rounds, loaded, todo = [], [], 0, False, []
    for i in range(turns):
        new, kind = [], "first" if i == 0 else "user"
        for c in pending:
            m = {"role": "tool", "tool_call_id": c.id, "content": ""}
            new.append(m)
            if c.name == load_tool and c.args == load_args:
                m["content"], kind = body_text, "skill"
            else:
                todo.append((i, m, c))
                kind = "tool" if kind != "skill" else kind
        if not pending:
            ask = text.fact_request(rng, skill.name, rng.choice(facts)) if loaded else text.task_request(rng, topic)
            if shape == "user" and not loaded and i >= 1:
                new.append({"role": "user", "content": body_text})
                kind, loaded = "skill", True
            new.append({"role": "user", "content": ask})
            rounds = rng.randint(1, 4) if i or shape != "user" else min(rng.randint(1, 4), max(1, turns - 3))
        if shape != "user" and not loaded and i + 1 == load_at:
            calls, loaded = [Call(f"call_{index}_{i}_0", load_tool, load_args)], True
        elif rounds > 0:
            rounds -= 1
            calls = [Call(f"call_{index}_{i}_{k}", n, text.call_args(n, rng))
                     for k, n in enumerate(rng.sample(usable, 1 + (rng.random() < 0.25)))]
        else:
            calls = []
        steps.append(Step(new, calls, rng.randint(16, 32), kind, skill.name if kind == "skill" else ""))
        pending = calls
    return steps, todo


def _estimate(system: str, tools: list[dict], steps: list[Step], sizes: list[int], count) -> int:
    n = count(system) + (count(json.dumps(tools)) if tools else 0) + sum(sizes)
    for i, st in enumerate(steps):
        n += sum(count(m["content"]) + OVERHEAD for m in st.new)
        if i < len(steps) - 1:
            n += st.max_tokens + OVERHEAD + sum(count(json.dumps(c.args)) + 12 for c in st.calls)
    return n


def make_traces(skills, conversations: int = 4, turns: int = 20, seed: int = 0, scale: float = 1.0,
                context: int = 8192, count=None, fill: float = 0.9, with_tools: bool = True) -> list[Trace]:
    count = count or (lambda s: max(1, len(s) // 4))
    fits = sorted((s for s in skills if count((s.path / "SKILL.md").read_text()) <= context // 5),
                  key=lambda s: s.name)
    if not fits:
        raise SkillkvError(f"no skill's SKILL.md fits a fifth of a {context:,}-token context")
    random.Random(seed).shuffle(fits)
    heads = {shape: _head(shape, skills, seed, scale, count) for shape in SHAPES}
    out = []
    for index in range(conversations):
        rng = random.Random(f"{seed}:conversation:{index}")
        shape, skill = SHAPES[index % len(SHAPES)], fits[index % len(fits)]
        system, tools = heads[shape]
        sent = tools if with_tools else []
        system += (f"\n\n# Environment\nWorking directory: /home/dev/{rng.choice(text.WORDS)}-"
                   f"{rng.choice(text.WORDS)}-{index}\nPlatform: linux\nToday's date: 2026-12-{1 + index % 28:02d}")
        steps, todo = _plan(index, shape, skill, tools, turns, seed, rng)
        lo, hi = 50 * scale, 600 * scale
        sizes = [round(math.exp(rng.uniform(math.log(lo), math.log(hi)))) for _ in todo]
        budget = int(fill * context) - steps[-1].max_tokens
        fixed = _estimate(system, sent, steps, [0] * len(sizes), count)
        slack = 20 * len(sizes)  # grow() overshoots a target by up to one line
        if fixed + sum(sizes) + slack > budget and sizes:
            room = budget - fixed - slack
            shrink = (room - lo * len(sizes)) / max(1, sum(sizes) - lo * len(sizes))
            sizes = [max(round(lo), int(lo + (s - lo) * max(0.0, shrink))) for s in sizes]
        if fixed + sum(sizes) + slack > budget:
            raise SkillkvError(f"{turns} turns do not fit {fill:.0%} of a {context:,}-token context (about "
                               f"{fixed + sum(sizes) + slack:,} tokens); use fewer turns, a smaller --scale or a "
                               "larger --context")
        for (i, m, c), size in zip(todo, sizes):
            m["content"] = text.tool_output(c.name, c.args, size, count, rng)
        client = CLIENTS[shape][0]
        t = Trace(index, shape, client, skill.name, system, tools, steps)
        t.tokens = {"system": count(system), "tools": count(json.dumps(tools)),
                    "estimate": _estimate(system, sent, steps, [0] * len(sizes), count)}
        out.append(t)
    return out


def assistant(answer: str, calls: list[Call], tools: bool = True) -> dict:
    if not calls:
        return {"role": "assistant", "content": answer}
    if not tools:
        flat = "".join(f"\n<tool_call>\n{json.dumps({'name': c.name, 'arguments': c.args})}\n</tool_call>"
                       for c in calls)
        return {"role": "assistant", "content": answer + flat}
    return {"role": "assistant", "content": answer, "tool_calls": [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": json.dumps(c.args)}}
        for c in calls]}


def request_messages(trace: Trace, i: int, answers: list[str], tools: bool = True) -> list[dict]:
    """The messages of request `i`: the head, every earlier step with the answers given (`answers[j]` for step j)."""
    msgs = [{"role": "system", "content": trace.system}]
    for j, st in enumerate(trace.steps[:i + 1]):
        if j:
            msgs.append(assistant(answers[j - 1], trace.steps[j - 1].calls, tools))
        for m in st.new:
            msgs.append(m if tools or m["role"] != "tool" else
                        {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
    return msgs
