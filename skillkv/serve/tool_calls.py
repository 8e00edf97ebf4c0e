"""Tool calls read back out of the model's answer: the text the model writes in the chat template's call format
becomes OpenAI's `message.tool_calls` (and `finish_reason: "tool_calls"`), while it streams.

Two formats, chosen per chat template by rendering a probe call once (`call_format`):
  hermes       `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, anywhere in the answer;
               the text around them is content. Hermes / Qwen templates and the generic tool format of templates
               with no tools of their own (serve/tool_format.py: the default model's).
  llama3_json  the whole answer is one JSON object `{"name": ..., "parameters": {...}}` (`"arguments"` accepted
               too), optionally after `<|python_tag|>`. Llama 3.x templates.

`CallStream` is fed the answer's text pieces as the loop streams them and gives back events in order:
  ("text", s)      content, as soon as it cannot be the start of a call (hermes: a tail that could begin
                   `<tool_call>` is held back; llama3_json: an answer whose first character is `{` is held to its end)
  ("call", call)   a complete call, OpenAI's shape: {"index", "id", "type": "function",
                   "function": {"name", "arguments": JSON string}}
A block ends at the first `</tool_call>` after which its text parses as JSON (a
string in the arguments may hold the tag). `finish()` flushes what was held back. A block that does not hold a call
(not JSON, no name, a name the request did not declare, arguments that are not an object nor a string holding one)
or is cut off by the answer's end stays content, as the model wrote it (vLLM does the same), and is counted in
`invalid`. With `parallel=False` (the request's `parallel_tool_calls: false`) calls after the first stay content
too. Nothing here constrains what the model writes (a weak model may write no call, or text that looks like one);
`tool_choice` "required" or a named function does (serve/constraints.py).
"""

from __future__ import annotations

import json
import uuid

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
FORMATS = ("hermes", "llama3_json")
_PROBE = "skillkv_probe_call"
_FORMATS: dict[tuple[int, str], str] = {}


def call_format(tok) -> str:
    """The format the tokenizer's chat template writes an assistant's tool call in (module docstring), probed once
    per template: `llama3_json` where the rendered call is a bare JSON object with "parameters", else `hermes`
    (also the generic format's)."""
    from skillkv.serve.render import _apply

    key = (id(tok), str(getattr(tok, "chat_template", None)))
    if key not in _FORMATS:
        fn = {"type": "function", "function": {"name": _PROBE, "description": "A probe.",
                                               "parameters": {"type": "object", "properties": {}}}}
        msgs = [{"role": "user", "content": "A probe question."},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_probe", "type": "function", "function": {"name": _PROBE, "arguments": {}}}]}]
        text = _apply(tok, msgs, [fn]) or ""
        at = text.rfind(_PROBE)
        llama = at >= 0 and OPEN not in text and '"parameters"' in text[at:]
        _FORMATS[key] = "llama3_json" if llama else "hermes"
    return _FORMATS[key]


def _call(obj, names: set[str] | None, index: int) -> dict | None:
    """OpenAI's tool call of a parsed object, or None when it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string, as the API carries them
        args = _loads(args)
    if not isinstance(args, dict) or (names is not None and obj["name"] not in names):
        return None
    return {"index": index, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
            "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}}


def _loads(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


class CallStream:
    """One answer's text -> content and tool calls (module docstring). `names`: the request's function names
    (None: any name)."""

    def __init__(self, fmt: str, names: set[str] | None = None, parallel: bool = True):
        if fmt not in FORMATS:
            raise ValueError(f"unknown tool-call format {fmt!r} (choose from {', '.join(FORMATS)})")
        self.fmt, self.names, self.parallel = fmt, names, parallel
        self.calls: list[dict] = []
        self.content: list[str] = []
        self.invalid = 0
        self._buf = ""  # text not yet given out
        self._started = False  # llama3_json: the answer's first non-space character was seen
        self._json = False  # llama3_json: ... and it opens a JSON object (the answer is held to its end)

    @property
    def text(self) -> str:
        return "".join(self.content)

    def push(self, piece: str) -> list[tuple]:
        self._buf += piece
        return self._llama(False) if self.fmt == "llama3_json" else self._hermes(False)

    def finish(self) -> list[tuple]:
        return self._llama(True) if self.fmt == "llama3_json" else self._hermes(True)

    def _text(self, s: str) -> list[tuple]:
        if not s:
            return []
        self.content.append(s)
        return [("text", s)]

    def _take(self, block: str, obj) -> list[tuple]:
        """A candidate call: an event "call", or its text as content (counted invalid)."""
        call = _call(obj, self.names, len(self.calls)) if self.parallel or not self.calls else None
        if call is None:
            self.invalid += 1
            return self._text(block)
        self.calls.append(call)
        return [("call", call)]

    def _hermes(self, end: bool) -> list[tuple]:
        out = []
        while True:
            at = self._buf.find(OPEN)
            if at < 0:
                keep = 0 if end else _partial(self._buf, OPEN)
                head = self._buf[:len(self._buf) - keep]
                if self.calls and not head.strip():  # space after a call: held, dropped at the end
                    self._buf = "" if end else self._buf
                    return out
                out += self._text(head)
                self._buf = self._buf[len(head):]
                return out
            if not (self.calls and not self._buf[:at].strip()):  # not the space between two calls
                out += self._text(self._buf[:at])
            self._buf = self._buf[at:]
            close, obj = self._buf.find(CLOSE), None
            while close >= 0:  # a close tag inside the JSON (a string holding it) is not the block's end
                obj = _loads(self._buf[len(OPEN):close].strip())
                if obj is not None:
                    break
                close = self._buf.find(CLOSE, close + 1)
            if close < 0:
                if end:  # no close tag ends a JSON object: cut off by the answer's end, or not a call
                    out += self._take(self._buf, None)
                    self._buf = ""
                return out
            block, self._buf = self._buf[:close + len(CLOSE)], self._buf[close + len(CLOSE):]
            out += self._take(block, obj)

    def _llama(self, end: bool) -> list[tuple]:
        if not self._started:
            lead = self._buf.lstrip()
            if not lead or (not end and (PYTHON_TAG.startswith(lead) and len(lead) < len(PYTHON_TAG))):
                return []  # nothing yet that decides it
            self._started = True
            self._json = lead.startswith("{") or lead.startswith(PYTHON_TAG)
        if not self._json:
            s, self._buf = self._buf, ""
            return self._text(s)
        if not end:
            return []
        s, self._buf = self._buf, ""
        body = s.strip()
        body = body[len(PYTHON_TAG):].strip() if body.startswith(PYTHON_TAG) else body
        return self._take(s, _loads(body))


def _partial(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0
