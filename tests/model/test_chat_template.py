"""skillkv renders chat templates exactly as transformers' apply_chat_template(tokenize=False) does, on every template
the project uses (the default model's, the ChatML fallback, Gemma 3's, Llama 3 style ones), and the prompt layout
built on them is the same with either tokenizer."""

from __future__ import annotations

import pytest
from transformers import PreTrainedTokenizerFast

from skillkv.model import CHATML_TEMPLATE, byte_tokenizer
from skillkv.prompt import _SYS, _USER, template_parts

GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\\n\\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\\n'}}
{%- endif -%}
"""
LLAMA3_SHORT = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
# Llama 3.1's structure: namespaces, a date from strftime_now, tools as JSON, whitespace control, loop controls
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}{%- set date_string = strftime_now("%d %b %Y") %}{%- endif %}
{%- set ns = namespace(system='', seen=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}{{- t | tojson(indent=4) }}{{- "\\n\\n" }}{%- endfor %}
{%- endif %}
{{- ns.system }}{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role == 'tool' %}{%- continue %}{%- endif %}
    {%- set ns.seen = ns.seen + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- if ns.seen > 50 %}{%- break %}{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
WITH_GENERATION_TAG = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                       "{% endgeneration %}{% else %}[{{ m.role }}] {{ m.content }}\n{% endif %}{% endfor %}"
                       "{% if add_generation_prompt %}[assistant] {% endif %}{{ {'a': '<b>&'} | tojson }}")
TEMPLATES = {"chatml": CHATML_TEMPLATE, "gemma3": GEMMA3, "llama3-short": LLAMA3_SHORT, "llama3.1": LLAMA31,
             "generation-tag": WITH_GENERATION_TAG}
CHATS = [
    [{"role": "system", "content": _SYS}, {"role": "user", "content": _USER}],
    [{"role": "system", "content": "Be brief.  "}, {"role": "user", "content": " Hi\n"},
     {"role": "assistant", "content": "Hello.", "tool_calls": None}, {"role": "user", "content": "Ünïcødé ✓ <b>"}],
    [{"role": "user", "content": "only a user"}],
]


def _pair(template: str):
    """skillkv's tokenizer and a transformers fast tokenizer over the same backend, specials and template."""
    mine = byte_tokenizer()
    mine.chat_template = template
    ref = PreTrainedTokenizerFast(tokenizer_object=mine.backend_tokenizer, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ref.chat_template = template
    return mine, ref


@pytest.mark.parametrize("name", list(TEMPLATES))
@pytest.mark.parametrize("chat", range(len(CHATS)))
@pytest.mark.parametrize("gen", [True, False], ids=["gen", "nogen"])
def test_rendering_equals_transformers(name, chat, gen):
    mine, ref = _pair(TEMPLATES[name])
    kw = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]} if name == "llama3.1" else {}
    try:
        want = ref.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=False, **kw)
    except Exception as e:  # noqa: BLE001 - the template refuses this conversation: so must skillkv
        with pytest.raises(type(e)):
            mine.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=False, **kw)
        return
    assert mine.apply_chat_template(CHATS[chat], add_generation_prompt=gen, tokenize=False, **kw) == want


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_prompt_parts_are_the_same_with_either_tokenizer(name):
    mine, ref = _pair(TEMPLATES[name])
    assert template_parts(mine) == template_parts(ref)


def test_gemma_template_raises_as_transformers_does():
    mine, ref = _pair(GEMMA3)
    chat = [{"role": "assistant", "content": "first"}]
    with pytest.raises(Exception, match="alternate") as a:
        ref.apply_chat_template(chat, tokenize=False)
    with pytest.raises(type(a.value), match="alternate"):
        mine.apply_chat_template(chat, tokenize=False)


def test_sandbox_refuses_what_transformers_refuses():
    import jinja2

    for t in ("{{ ''.__class__.__mro__ }}", "{% set ns = namespace(_x=1) %}{{ ns }}"):
        mine, ref = _pair(t)
        with pytest.raises(jinja2.exceptions.SecurityError):
            ref.apply_chat_template(CHATS[0], tokenize=False)
        with pytest.raises(jinja2.exceptions.SecurityError):
            mine.apply_chat_template(CHATS[0], tokenize=False)
