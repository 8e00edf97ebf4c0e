"""The generic tool format: how tools, tool calls and tool results enter the prompt for a chat template that has no
tools of its own (the default model's SmolLM2 ChatML template, most small models). It is the Hermes / Qwen2.5 format,
the one llama.cpp's and vLLM's generic paths use, so models trained on either read it; the tool-call parser of issue
24 parses the `<tool_call>` blocks back. Exactly:

Tool definitions: appended to the conversation's leading system message after a blank line, or a system message of
their own at the front when the conversation does not start with one (`SECTION_HEAD`, one tool per line as JSON,
`SECTION_TAIL`):

    # Tools

    You may call one or more functions to assist with the user query.

    You are provided with function signatures within <tools></tools> XML tags:
    <tools>
    {"type": "function", "function": {"name": "read_file", "description": "...", "parameters": {...}}}
    </tools>

    For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
    <tool_call>
    {"name": <function-name>, "arguments": <args-json-object>}
    </tool_call>

An assistant message's tool calls: its text, then one block per call, joined by newlines (no text: the blocks alone):

    <tool_call>
    {"name": "read_file", "arguments": {"path": "SKILL.md"}}
    </tool_call>

A tool message: with role `tool` and its content as is where the template renders that role, else a `user` message
whose content is

    <tool_response>
    ...the tool's output...
    </tool_response>

JSON is `json.dumps(..., ensure_ascii=False)` (", " and ": " separators, as the templates' `tojson`); arguments
that are not a JSON object stay the client's string.
"""

from __future__ import annotations

import json

from skillkv.serve.protocol import Tool, ToolCall

SECTION_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
SECTION_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
                "<tool_call></tool_call> XML tags:\n<tool_call>\n"
                '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def _json(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def function_tools(tools: list[Tool] | None) -> list[dict]:
    """The declared function tools as templates expect them ({"type": "function", "function": {name, description,
    parameters}}, absent fields left out); other tool types are dropped."""
    return [{"type": "function", "function": t.function.model_dump(exclude_none=True)}
            for t in tools or [] if t.type == "function" and t.function is not None]


def tools_section(tools: list[dict]) -> str:
    """The tool definitions of the generic format (module docstring)."""
    return SECTION_HEAD + "".join("\n" + _json(t) for t in tools) + SECTION_TAIL


def with_tools(system: str, tools: list[dict]) -> str:
    """A system message's text with the tools section appended after a blank line (the section alone when empty)."""
    return system + "\n\n" + tools_section(tools) if system else tools_section(tools)


def arguments(call: ToolCall):
    """A call's arguments as templates expect them: the parsed JSON object, else the client's string as is."""
    args = call.function.arguments
    if isinstance(args, dict):
        return args
    try:
        parsed = json.loads(args)
    except ValueError:
        return args
    return parsed if isinstance(parsed, dict) else args


def call_block(call: ToolCall) -> str:
    return f"<tool_call>\n{_json({'name': call.function.name, 'arguments': arguments(call)})}\n</tool_call>"


def assistant_text(text: str, calls: list[ToolCall]) -> str:
    """An assistant message's content with its tool calls in the generic format."""
    return "\n".join(([text] if text else []) + [call_block(c) for c in calls])


def tool_response(text: str) -> str:
    """A tool message's content as a user message carries it where the template has no tool role."""
    return f"<tool_response>\n{text}\n</tool_response>"
