"""The prefix cache's index: full KV pages of earlier prompts and answers, found again by their tokens. Free of torch.

Every full page of a cacheable sequence (prompt and generated tokens alike) is published under a chained key:
key(page i) = hash(key(page i-1), the page's token ids), ROOT before the first. A new prompt walks its own chain of
keys from the root; each page found is verified against the page's stored tokens and parent key (a hash collision
can never serve another prompt's KV), and the walk stops at the first miss. So a hit is the KV of exactly the same
tokens at exactly the same positions, which the chunk-invariant runner computed bit for bit as a full prefill would
(engine/block_attention.py). (nano-vllm's chained block hashes, verified on every hit; vLLM's automatic prefix
caching.)

A page is owned either by the cache (`entry` None: published from a sequence's own pages; `refs` counts the
sequences holding it; unheld ones wait in `lru`, least recently released first, for PageTable to evict) or by a
resident entry (a skill's compiled prefix: `entry` is its key; the entry's own holds and pins keep it, and evicting
the entry drops its pages from the index). Contract: `match` never changes what is cached; a held page is never
in `lru`; a page is indexed at most once and every key at most once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

ROOT = 0


def chain_key(parent: int, tokens: tuple) -> int:
    """The key of a page holding `tokens` after the page keyed `parent` (ROOT for the first page)."""
    return hash((parent, tokens))


@dataclass(eq=False)
class CachedPage:
    page: int
    key: int
    parent: int
    tokens: tuple
    depth: int  # its index in the sequence (page 0 holds positions 0 .. page_size-1)
    refs: int = 0
    entry: str | None = None  # owned by this resident entry (else by the cache)
    last: int = 0  # the page table's tick at its last use (eviction order)


class PrefixCache:
    def __init__(self, page_size: int):
        self.page_size = page_size
        self.index: dict[int, CachedPage] = {}  # key -> page
        self.by_page: dict[int, CachedPage] = {}  # page -> its record
        self.lru: OrderedDict[int, CachedPage] = OrderedDict()  # unheld cache-owned pages, least recent first
        self.hits = 0  # tokens served from the cache (counters for /health and metrics)
        self.queries = 0

    def __len__(self) -> int:
        return len(self.index)

    def match(self, ids: list[int], limit: int) -> list[CachedPage]:
        """The cached pages holding the longest run of full pages of `ids` from position 0, at most `limit`
        tokens. Changes nothing."""
        ps, out, parent = self.page_size, [], ROOT
        for i in range(min(len(ids), limit) // ps):
            tokens = tuple(ids[i * ps:(i + 1) * ps])
            cp = self.index.get(chain_key(parent, tokens))
            if cp is None or cp.tokens != tokens or cp.parent != parent:
                break
            out.append(cp)
            parent = cp.key
        return out

    def add(self, page: int, key: int, parent: int, tokens: tuple, depth: int, entry: str | None = None,
            refs: int = 0) -> CachedPage | None:
        """Index `page` under `key` (None when the key or the page is indexed already: nothing changes)."""
        if key in self.index or page in self.by_page:
            return None
        cp = CachedPage(page, key, parent, tokens, depth, refs, entry)
        self.index[key] = self.by_page[page] = cp
        if entry is None and refs == 0:
            self.lru[page] = cp
        return cp

    def hold(self, cp: CachedPage) -> None:
        cp.refs += 1
        self.lru.pop(cp.page, None)

    def unhold(self, cp: CachedPage) -> None:
        if cp.refs <= 0:
            raise ValueError(f"cached page {cp.page} released more often than held")
        cp.refs -= 1
        if cp.refs == 0 and cp.entry is None and cp.page in self.by_page:
            self.lru[cp.page] = cp  # most recently released last

    def drop(self, cp: CachedPage) -> None:
        """Forget `cp` (its page is the caller's to free or keep)."""
        if self.index.get(cp.key) is cp:
            del self.index[cp.key]
        self.by_page.pop(cp.page, None)
        self.lru.pop(cp.page, None)

    def owned(self) -> list[int]:
        """Pages the cache owns (held or not)."""
        return [p for p, cp in self.by_page.items() if cp.entry is None]
