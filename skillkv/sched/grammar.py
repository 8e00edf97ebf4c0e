"""Constrained decoding: a grammar-compiled token mask per step, through xgrammar (the library vLLM and SGLang use;
CPU and CUDA), so an answer is text the grammar accepts (a JSON object, a JSON schema's instance, a tool call).

    grammars = Grammars.of(tokenizer, vocab_size, stop_ids)     # one per tokenizer (TokenizerInfo, compiler)
    c = grammars.constraint(key, build)                        # build() -> xgrammar.Grammar; compiled once per key
    req.constraint = c                                         # the loop: c.mask(row) before choosing, c.accept(tok)

The loop (sched/loop.py) calls `mask(logits_row)` before it picks a request's token (tokens the grammar does not
allow get -inf; sampling and greedy alike), then `accept(token)`. The grammar's end lets only the model's stop
tokens through, so a constrained answer ends with a stop token exactly when it is complete (or at `max_tokens`,
cut short, as OpenAI does). `ConstraintError` when no token is allowed (a grammar that cannot be completed).

Cost: compiled grammars are cached per key (LRU, 256; a tool schema compiles in a few milliseconds), a mask is one
`fill_next_token_bitmask` (tens of microseconds); requests without a constraint never touch this module (xgrammar is
imported on the first constrained request only).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from skillkv.errors import SkillkvError
from skillkv.lazy import torch

CACHED = 256  # compiled grammars kept per tokenizer


class ConstraintError(SkillkvError):
    """A constrained request that cannot go on (no token allowed, a token refused)."""


def _xgr():
    try:
        import xgrammar
    except ImportError:
        raise SkillkvError("constrained decoding needs xgrammar (pip install xgrammar)") from None
    return xgrammar


class Constraint:
    """One request's grammar state (an xgrammar GrammarMatcher) and its token bitmask."""

    def __init__(self, compiled, vocab_size: int, stop_ids: list[int]):
        xgr = _xgr()
        self._xgr, self.vocab_size = xgr, vocab_size
        self.matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stop_ids))
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, row: torch.Tensor) -> None:
        """Set the logits of tokens the grammar does not allow next to -inf, in place (`row`: [vocab])."""
        self.matcher.fill_next_token_bitmask(self.bitmask)
        view = row.view(1, -1)
        self._xgr.apply_token_bitmask_inplace(view, self.bitmask.to(row.device, non_blocking=True),
                                              vocab_size=min(self.vocab_size, view.shape[1]))
        if not torch.isfinite(row).any():
            raise ConstraintError("the grammar allows no next token (a schema that cannot be completed?)")

    def accept(self, token: int) -> None:
        if not self.matcher.accept_token(token):
            raise ConstraintError(f"token {token} is not allowed by the grammar")

    @property
    def finished(self) -> bool:
        return self.matcher.is_terminated()


class Grammars:
    """The grammar compiler of one tokenizer and its cache of compiled grammars."""

    _BY_TOKENIZER: dict[tuple[int, int], Grammars] = {}

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        xgr = _xgr()
        from xgrammar.tokenizer_info import TokenizerInfo

        backend = getattr(tokenizer, "backend_tokenizer", None)
        vocab = [""] * vocab_size
        for text, i in tokenizer.get_vocab().items():
            if i < vocab_size:
                vocab[i] = text
        meta = TokenizerInfo._detect_metadata_from_hf(backend.to_str()) if backend is not None else \
            {"vocab_type": xgr.VocabType.RAW, "add_prefix_space": False}
        info = xgr.TokenizerInfo(vocab, meta["vocab_type"], vocab_size=vocab_size, stop_token_ids=list(stop_ids),
                                 add_prefix_space=meta["add_prefix_space"])
        self.compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.vocab_size, self.stop_ids = vocab_size, list(stop_ids)
        self._compiled: OrderedDict[str, object] = OrderedDict()

    @classmethod
    def of(cls, tokenizer, vocab_size: int, stop_ids: list[int]) -> Grammars:
        key = (id(tokenizer), vocab_size)
        if key not in cls._BY_TOKENIZER:
            cls._BY_TOKENIZER[key] = cls(tokenizer, vocab_size, stop_ids)
        return cls._BY_TOKENIZER[key]

    def compiled(self, key: str, build: Callable[[], object]):
        """The compiled grammar of `key` (built by `build()`, an xgrammar Grammar, the first time)."""
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        grammar = self.compiler.compile_grammar(build())
        self._compiled[key] = grammar
        if len(self._compiled) > CACHED:
            self._compiled.popitem(last=False)
        return grammar

    def constraint(self, key: str, build: Callable[[], object]) -> Constraint:
        return Constraint(self.compiled(key, build), self.vocab_size, self.stop_ids)
