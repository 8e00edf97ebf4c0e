"""The tokenizer without transformers: a `tokenizers` Tokenizer (tokenizer.json) with the special tokens of
tokenizer_config.json and the model's chat template, rendered by skillkv.model.chat_template.

`Tokenizer` offers the part of transformers' fast-tokenizer interface skillkv uses, with the same results:
`tok(text, add_special_tokens=...)["input_ids"]` and `encode` (tokenizers' encode), `decode(ids,
skip_special_tokens=...)` (tokenizers' decode; transformers' clean-up of tokenization spaces only where the config
asks for it and the model is not BPE, as transformers 5 does), `apply_chat_template(messages,
add_generation_prompt=..., tokenize=False)`, `get_vocab`, `convert_tokens_to_ids`, the named special tokens and
their ids, `add_special_tokens`, and a settable `chat_template`. Tests compare encode, decode and template rendering
with transformers' on the default model.

`identity()` is what the fingerprint hashes: the tokenizer file's sha256 (cached by path, size and mtime) or the
serialized tokenizer when it has no file, plus the special tokens, the tokens added on top and the clean-up flag.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from skillkv.errors import ModelError
from skillkv.model.chat_template import SPECIAL_TOKEN_NAMES, pick_template, render

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _content(token) -> str | None:
    """A special token as tokenizer_config.json stores it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


class Tokenizer:
    """See the module docstring. `special` maps names (bos_token, ...) to token strings."""

    def __init__(self, backend, special: dict[str, str] | None = None, chat_template: str | dict | None = None,
                 clean_up: bool = False, file_sha256: str | None = None):
        self.backend_tokenizer = backend
        self.special = {k: v for k, v in (special or {}).items() if v is not None}
        self.chat_template = chat_template
        self.clean_up = clean_up
        self._file_sha256 = file_sha256
        self._added: list[str] = []
        named = [self.special[k] for k in SPECIAL_TOKEN_NAMES if k in self.special]
        self.add_special_tokens({"additional_special_tokens": named}, record=False)

    @classmethod
    def from_folder(cls, folder: Path, file_sha256=None) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja / chat_template.json) of a HF folder;
        `file_sha256(path)` hashes the tokenizer file for the identity."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        try:
            backend = Backend.from_file(str(folder / "tokenizer.json"))
            conf = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8")) \
                if (folder / "tokenizer_config.json").is_file() else {}
        except Exception as e:  # noqa: BLE001 - tokenizers raises its own exception type
            raise ModelError(f"cannot read the tokenizer of {folder}: {str(e).splitlines()[0] if str(e) else e}") \
                from None
        special = {k: _content(conf.get(k)) for k in SPECIAL_TOKEN_NAMES}
        tok = cls(backend, special, _chat_template(folder, conf), bool(conf.get("clean_up_tokenization_spaces")),
                  file_sha256(folder / "tokenizer.json") if file_sha256 else None)
        extra = conf.get("extra_special_tokens") or conf.get("additional_special_tokens") or []
        extra = list(extra.values()) if isinstance(extra, dict) else list(extra)
        decoder = conf.get("added_tokens_decoder") or {}
        extra += [t for _, t in sorted(decoder.items(), key=lambda kv: int(kv[0])) if isinstance(t, dict)
                  and t.get("special")]
        tok.add_special_tokens({"additional_special_tokens": [c for c in map(_content, extra) if c]})
        return tok

    # ------------------------------------------------------------------ transformers' interface

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        text = self.backend_tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up and type(self.backend_tokenizer.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                         (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        """The vocabulary with added tokens (transformers' len(tokenizer))."""
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            i = self.backend_tokenizer.token_to_id(tokens)
            return i if i is not None else self.unk_token_id
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def add_special_tokens(self, tokens: dict, record: bool = True) -> int:
        """Add tokens as special ones (named: bos_token..., or a list under additional_special_tokens); returns how
        many were new to the vocabulary."""
        from tokenizers import AddedToken

        names = [(k, v) for k, v in tokens.items() if k in SPECIAL_TOKEN_NAMES]
        self.special.update({k: v for k, v in names})
        texts = [v for _, v in names] + list(tokens.get("additional_special_tokens") or [])
        vocab = self.backend_tokenizer.get_vocab(with_added_tokens=True)
        new = [t for t in dict.fromkeys(texts) if t not in vocab]
        if record:
            self._added += new
        known = [t for t in dict.fromkeys(texts) if t in vocab and t not in new]
        return self.backend_tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                                          for t in new + known]) and len(new)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        return {k: self.special[k] for k in SPECIAL_TOKEN_NAMES if self.special.get(k) is not None}

    def _id(self, name: str) -> int | None:
        t = self.special.get(name)
        return None if t is None else self.backend_tokenizer.token_to_id(t)

    unk_token_id = property(lambda self: self._id("unk_token"))
    eos_token_id = property(lambda self: self._id("eos_token"))
    bos_token_id = property(lambda self: self._id("bos_token"))
    pad_token_id = property(lambda self: self._id("pad_token"))
    eos_token = property(lambda self: self.special.get("eos_token"))
    bos_token = property(lambda self: self.special.get("bos_token"))

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True,
                            tools=None, documents=None, **kwargs):
        template = pick_template(self.chat_template, tools)
        if not template:
            raise ModelError("this tokenizer has no chat template")
        text = render(template, messages, add_generation_prompt, self.special_tokens_map, tools, documents, **kwargs)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # ------------------------------------------------------------------ identity

    def identity(self) -> str:
        """The fingerprint's tokenizer part (module docstring)."""
        base = self._file_sha256 or hashlib.sha256(self.backend_tokenizer.to_str().encode()).hexdigest()
        parts = {"tokenizer": base, "special": self.special_tokens_map, "added": self._added, "clean_up": self.clean_up}
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _chat_template(folder: Path, conf: dict) -> str | dict | None:
    """The chat template as transformers 5 finds it: chat_template.jinja, else chat_template.json, else the
    `chat_template` field of tokenizer_config.json (a string, or a list of {name, template})."""
    jinja, js = folder / "chat_template.jinja", folder / "chat_template.json"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = json.loads(js.read_text(encoding="utf-8")).get("chat_template") if js.is_file() else conf.get("chat_template")
    if isinstance(t, list):
        return {d["name"]: d["template"] for d in t if isinstance(d, dict) and "name" in d}
    return t if isinstance(t, (str, dict)) else None


def byte_tokenizer() -> Tokenizer:
    """A byte-level BPE tokenizer with no merges plus ChatML specials: ids 0-255 are bytes. No files needed."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map))}
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = Tokenizer(backend, {"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "pad_token": "<|endoftext|>"},
                    CHATML_TEMPLATE)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<|endoftext|>"]},
                           record=False)
    return tok
