"""The one place skillkv.export touches SkillKV: the target engine's token ids for a prompt that starts with some
skills, and the exact KV of those ids. Re-point these two functions when SkillKV's internals change.

SkillKV calls used: `kv.pick(names)`, `kv.handle` (.tokenizer, .hf_config, .dtype, .device, .fingerprint, .load()),
`kv.builder.preamble_ids()`, `kv.builder.skill_ids(skill)`, `kv.compiler.chain_kv(skills)` (the exact KV of preamble +
skills in this order, keys after RoPE at absolute positions from 0). Everything else is transformers and skillkv.prompt.

Which ids. A vLLM or SGLang server renders the chat template around the messages and tokenizes the WHOLE text at
once; skillkv tokenizes each segment on its own ([preamble][skill 1]...). The two differ wherever BPE merges across
a segment boundary (SmolLM2: the preamble's closing "\\n\\n" before "<skill" tokenizes differently, token 38), so
snapshot KV is not, in general, the KV the fleet would look up. The exportable prefix is therefore computed on the
target's own tokenization:
  ids = tokenize(template head + system text), system text = PREAMBLE + the skills' segment texts, and then cut
  to the longest prefix that every full prompt shares, whatever the question: the tokenization of
  head + system + middle + q + tail for several probe questions q must start with it (a template whose system turn
  ends in a special token, as ChatML and Llama 3 do, keeps all of it; one that continues in plain text may lose
  the last tokens).
Its KV comes from skillkv's snapshots (`kv.compiler.chain_kv`) when skillkv's segment ids agree over the exported length,
else from one prefill of exactly those ids on the model skillkv loads (the same weights and dtype; a prefill of a
prompt's first n tokens is bit-identical to the first n positions of a prefill of the whole prompt on the CPU:
tests/export/test_export_real.py).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from skillkv.prompt import PREAMBLE, skill_segment_text, template_parts

KV = list[tuple[torch.Tensor, torch.Tensor]]

# questions of different first characters (letter, space, digit, punctuation, newline, non-Latin): a token that
# could merge with any of them is not exported
PROBES = ("x", "Hello, what is this?", " 42", "\n", "?", "日本")


@dataclass
class ModelFacts:
    """What the export needs to know of the model skillkv computes the KV with."""

    config: object  # the transformers config (family, heads, layers, sliding windows)
    dtype: torch.dtype  # the KV dtype skillkv computes in
    device: str
    fingerprint: str


def model_facts(kv) -> ModelFacts:
    h = kv.handle
    return ModelFacts(h.hf_config, h.dtype, str(h.device), h.fingerprint)


@dataclass
class PromptPrefix:
    """The exportable prefix of every prompt that starts with `skills`: see the module docstring."""

    skills: list  # Skill objects, in order
    system_text: str  # the system message content a client sends (PREAMBLE + skill segments)
    ids: list[int]  # the target's token ids, cut to what no question can change
    whole: int  # tokens of the template head + system text tokenized alone (>= len(ids))
    agree: int  # leading tokens where skillkv's own segment-wise ids equal `ids`


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prompt_prefix(kv, names: list[str]) -> PromptPrefix:
    """The target's token ids for prompts whose system message is PREAMBLE + the skills `names` in this order."""
    skills = kv.pick(names)
    tok = kv.handle.tokenizer
    head, middle, tail = template_parts(tok)
    system = PREAMBLE + "".join(skill_segment_text(s) for s in skills)
    whole = _encode(tok, head + system)
    n = min(_common(whole, _encode(tok, head + system + middle + q + tail)) for q in PROBES)
    segments = kv.builder.preamble_ids() + [t for s in skills for t in kv.builder.skill_ids(s)]
    return PromptPrefix(skills, system, whole[:n], len(whole), _common(whole[:n], segments))


@torch.inference_mode()
def _prefill(model, ids: list[int]) -> KV:
    """One forward of `ids` from position 0; the per-layer (keys, values) as [tokens, kv_heads, head_dim]."""
    from transformers import DynamicCache

    cache = DynamicCache()
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    device = next(model.parameters()).device
    model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1, **{kw: cache})
    return [(layer.keys[0].transpose(0, 1).contiguous(), layer.values[0].transpose(0, 1).contiguous())
            for layer in cache.layers]


def prefix_kv(kv, prefix: PromptPrefix, n: int) -> tuple[KV, str]:
    """The exact KV of `prefix.ids[:n]` on the CPU, in the model's dtype, and where it came from
    ("snapshots" or "prefill")."""
    if n <= prefix.agree:
        full, _ = kv.compiler.chain_kv(prefix.skills)
        source = "snapshots"
    else:
        full = _prefill(kv.handle.load(), prefix.ids[:n])
        source = "prefill"
    return [(k[:n].cpu(), v[:n].cpu()) for k, v in full], source
