"""Chat templates rendered with jinja2 the way transformers renders them (`apply_chat_template(..., tokenize=False)`,
transformers 5.24: utils/chat_template_utils.py), without importing transformers.

The same environment: jinja2's ImmutableSandboxedEnvironment with trim_blocks and lstrip_blocks, the loopcontrols
extension and a `{% generation %}` block tag (rendered as its body: skillkv never asks for assistant masks); the
globals `raise_exception` (a TemplateError), `strftime_now`, a `dict` constructor and a `namespace` that refuses
underscore names; a `tojson` filter that does not escape HTML (json.dumps, ensure_ascii off). The variables:
`messages` (keys whose value is None dropped), `tools`, `documents`, `add_generation_prompt` and the tokenizer's
named special tokens (bos_token, eos_token, unk_token, sep_token, pad_token, cls_token, mask_token), which
keyword arguments override.

Checked against transformers' own rendering in tests/model/test_chat_template.py on every template skillkv uses.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


@lru_cache(maxsize=16)
def compile_template(source: str):
    """The compiled template (cached per source text)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`: transformers' assistant-mask marker; renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot store {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=TemplateDict(),
                       namespace=TemplateNamespace)
    return env.from_string(source)


def _plain(value):
    """JSON-like data only (what transformers passes to a template); anything else becomes '<TypeName>'."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def pick_template(template: str | dict | None, tools=None) -> str | None:
    """The template to render: a single one as is; of named ones, `tool_use` when tools are given and it exists,
    else `default` (transformers' get_chat_template)."""
    if isinstance(template, dict):
        if tools is not None and "tool_use" in template:
            return template["tool_use"]
        return template.get("default")
    return template


def render(template: str, messages: list[dict], add_generation_prompt: bool = False,
           special_tokens: dict[str, str] | None = None, tools=None, documents=None, **kwargs) -> str:
    """The chat text of `messages` (module docstring). Errors of the template itself (jinja2 TemplateError,
    raise_exception) propagate as transformers lets them."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError("messages must be a list of dicts")
    chat = []
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages should be dicts, got {m!r}")
        m = _plain({k: v for k, v in m.items() if v is not None})
        reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
        if reasoning is not None:  # transformers' _alias_reasoning_fields
            m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
        chat.append(m)
    variables = _plain({**(special_tokens or {}), **kwargs})
    return compile_template(template).render(messages=chat, tools=_plain(tools), documents=_plain(documents),
                                             add_generation_prompt=add_generation_prompt, **variables)
