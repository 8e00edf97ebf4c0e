"""Page bookkeeping for the KV pool: allocation, skill residency, references, pins and LRU eviction.

Free of torch (like nano-vllm's block manager), so its invariants are tested on the CPU after every operation.

Contract
  - Pages are ints in [0, num_pages). A page is free, or owned by exactly one resident entry (a skill snapshot
    placed in the pool) or by one request (private pages: the question and its answer).
  - `acquire(key)` references a resident entry; a referenced entry is never evicted. `release(key)` drops one
    reference.
  - When `alloc` runs out of free pages it evicts unreferenced entries, least recently used first, pinned entries
    only after every unpinned one; if that is still not enough it raises PoolFull and changes nothing.
  - `lookup` does not modify residency beyond marking the entry most recently used.
  - An entry's rows may begin inside its first page (`start` slots left empty: a skill placed at a position that
    is not a multiple of the page size keeps every row in the slot its position maps to); it owns
    pages_for(start + tokens) pages.
  - The prefix cache (engine/prefix_cache.py): a full page a sequence filled may be published, and is then owned
    by the cache (not private any more); an entry's own full pages may be indexed too (still the entry's). A held
    cached page is never evicted; unheld ones are evicted with the unreferenced entries, least recently used first
    (by a tick every use advances), pinned entries last. Evicting an entry drops its pages from the index.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from skillkv.engine.prefix_cache import CachedPage, PrefixCache
from skillkv.errors import SkillkvError


class PoolFull(SkillkvError):
    """The pool cannot hold the request even after evicting every unreferenced entry."""


@dataclass
class Resident:
    key: str
    pages: list[int]
    tokens: int
    refs: int = 0
    pinned: bool = False
    start: int = 0  # empty slots before the first row, in the first page (0 <= start < page_size)
    tail_taken: bool = False  # a request appends in the free slots after the last row (engine/paged.py)
    last: int = 0  # the table's tick at its last use (eviction order)
    published: list = field(default_factory=list)  # its pages in the prefix cache's index (CachedPage)


@dataclass
class PageTable:
    """Pages of a pool: free list, resident entries in LRU order, and private (request) pages."""

    num_pages: int
    page_size: int
    free: list[int] = field(default_factory=list)
    entries: OrderedDict = field(default_factory=OrderedDict)  # key -> Resident, least recently used first
    private: set = field(default_factory=set)
    evictions: int = 0
    tick: int = 0
    on_evict: object = None  # called with each cached page evicted for room, before its page is reused (spill)

    def __post_init__(self):
        self.cache = PrefixCache(self.page_size)
        if self.num_pages <= 0 or self.page_size <= 0:
            raise SkillkvError(f"the KV pool needs at least one page (got {self.num_pages} of {self.page_size})")
        # popped from the end: low page ids first, so a fresh pool hands out contiguous runs. `_where[p]` is p's
        # index in `free` (-1: not free), so a given page is found and taken in O(1) (`alloc(near=)` on every step)
        self.free = list(range(self.num_pages - 1, -1, -1))
        self._where = list(range(self.num_pages - 1, -1, -1))

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    # ------------------------------------------------------------------ allocation

    def _use(self, x) -> None:
        self.tick += 1
        x.last = self.tick

    def _victims(self):
        """What may be evicted, in order: unreferenced unpinned entries and unheld cached pages by last use (the
        pages in release order), then unreferenced pinned entries."""
        entries = sorted((e for e in self.entries.values() if e.refs == 0 and not e.pinned), key=lambda e: e.last)
        pages = iter(list(self.cache.lru.values()))
        page = next(pages, None)
        for e in entries:
            while page is not None and page.last <= e.last:
                yield page
                page = next(pages, None)
            yield e
        while page is not None:
            yield page
            page = next(pages, None)
        yield from [e for e in self.entries.values() if e.refs == 0 and e.pinned]

    def can_alloc(self, n: int) -> bool:
        evictable = sum(len(e.pages) for e in self.entries.values() if e.refs == 0)
        return n <= len(self.free) + evictable + len(self.cache.lru)

    def alloc(self, n: int, private: bool = True, near: int | None = None) -> list[int]:
        """`n` pages, evicting LRU unreferenced entries as needed. Private pages belong to a request. With `near`,
        pages near, near + 1, ... when they are all free (a request growing after its last page), else any."""
        if not self.can_alloc(n):
            raise PoolFull(f"KV pool full: need {n} pages of {self.page_size} tokens, {len(self.free)} free, "
                           f"{self.num_pages} in all (raise --gpu-kv-budget)")
        if near is not None and 0 <= near and near + n <= self.num_pages:
            run = range(near, near + n)
            if all(self._where[p] >= 0 for p in run):
                for p in run:
                    self._take(p)
                if private:
                    self.private.update(run)
                return list(run)
        victims = self._victims()
        while len(self.free) < n:
            v = next(victims)
            if isinstance(v, Resident):
                self.evict(v.key)
            else:
                if self.on_evict is not None:
                    self.on_evict(v)
                self.cache.drop(v)
                self._give((v.page,))
                self.evictions += 1
        got = [self._take(self.free[-1]) for _ in range(n)]
        if private:
            self.private.update(got)
        return sorted(got)

    def _take(self, page: int) -> int:
        """Remove `page` from the free list in O(1) (the last free page moves into its place)."""
        i, last = self._where[page], self.free.pop()
        if last != page:
            self.free[i], self._where[last] = last, i
        self._where[page] = -1
        return page

    def _give(self, pages) -> None:
        for p in pages:
            self._where[p] = len(self.free)
            self.free.append(p)

    def free_private(self, pages: list[int]) -> None:
        for p in pages:
            self.private.remove(p)
            self._give((p,))

    # ------------------------------------------------------------------ residents

    def add(self, key: str, pages: list[int], tokens: int, pinned: bool = False, start: int = 0) -> Resident:
        """Turn private pages (from alloc) into the resident entry `key` of `tokens` rows from slot `start` of
        its first page."""
        if key in self.entries:
            raise SkillkvError(f"entry {key[:12]} is already resident")
        if not 0 <= start < self.page_size:
            raise SkillkvError(f"an entry starts inside its first page (start {start}, page size {self.page_size})")
        if len(pages) != self.pages_for(start + tokens):
            raise SkillkvError(f"{tokens} tokens from slot {start} need {self.pages_for(start + tokens)} pages, "
                               f"got {len(pages)}")
        for p in pages:
            self.private.remove(p)
        e = Resident(key, list(pages), tokens, pinned=pinned, start=start)
        self.entries[key] = e
        self._use(e)
        return e

    def lookup(self, key: str) -> Resident | None:
        e = self.entries.get(key)
        if e is not None:
            self.entries.move_to_end(key)
            self._use(e)
        return e

    def acquire(self, key: str) -> Resident:
        e = self.entries[key]
        e.refs += 1
        self.entries.move_to_end(key)
        self._use(e)
        return e

    def release(self, key: str) -> None:
        e = self.entries[key]
        if e.refs <= 0:
            raise SkillkvError(f"entry {key[:12]} released more often than acquired")
        e.refs -= 1
        self._use(e)

    # ------------------------------------------------------------------ the prefix cache

    def publish(self, page: int, key: int, parent: int, tokens: tuple, depth: int) -> CachedPage | None:
        """Hand the private `page` (full, its KV final) to the cache, held once by its publisher. None (nothing
        changes, the page stays private) when the key is cached already."""
        cp = self.cache.add(page, key, parent, tokens, depth, refs=1)
        if cp is not None:
            self.private.remove(page)
            self._use(cp)
        return cp

    def publish_entry(self, entry: str, page: int, key: int, parent: int, tokens: tuple, depth: int) -> None:
        """Index a full page of the resident `entry` (it stays the entry's)."""
        cp = self.cache.add(page, key, parent, tokens, depth, entry=entry)
        if cp is not None:
            self.entries[entry].published.append(cp)

    def hold(self, cp: CachedPage) -> None:
        """Reference a cached page (an entry's: the entry itself is acquired by the caller)."""
        if cp.entry is None:
            self.cache.hold(cp)

    def drop_cached(self) -> None:
        """Evict every unheld cached page."""
        for cp in list(self.cache.lru.values()):
            self.cache.drop(cp)
            self._give((cp.page,))

    def unhold(self, cp: CachedPage) -> None:
        if cp.entry is None:
            self.cache.unhold(cp)
            self._use(cp)

    def pin(self, key: str, pinned: bool = True) -> None:
        self.entries[key].pinned = pinned

    def evict(self, key: str) -> None:
        e = self.entries[key]
        if e.refs:
            raise SkillkvError(f"entry {key[:12]} is in use by {e.refs} request(s) and cannot be evicted")
        del self.entries[key]
        for cp in e.published:
            self.cache.drop(cp)
        self._give(e.pages)
        self.evictions += 1

    # ------------------------------------------------------------------ checks

    def used_pages(self) -> int:
        return self.num_pages - len(self.free)

    def check(self) -> None:
        """Assert the invariants: every page is in exactly one of free / an entry / private."""
        owned = [p for e in self.entries.values() for p in e.pages]
        everything = self.free + owned + list(self.private) + self.cache.owned()
        assert sorted(everything) == list(range(self.num_pages)), "a page is lost or owned twice"
        assert all(self._where[p] == i for i, p in enumerate(self.free)), "the free list's index is stale"
        assert sum(w >= 0 for w in self._where) == len(self.free), "a page is marked free but is not"
        assert all(e.refs >= 0 for e in self.entries.values())
        assert all(len(e.pages) == self.pages_for(e.start + e.tokens) for e in self.entries.values())
        assert all(0 <= e.start < self.page_size for e in self.entries.values())
        c = self.cache
        assert all(c.index[cp.key] is cp and c.by_page[cp.page] is cp for cp in c.index.values())
        assert len(c.index) == len(c.by_page), "a page is indexed twice"
        assert all(cp.refs == 0 and cp.entry is None for cp in c.lru.values()), "a held page waits for eviction"
        assert all(cp.page in self.entries[cp.entry].pages for cp in c.index.values() if cp.entry is not None)
        assert all(cp.page in c.lru for cp in c.index.values() if cp.entry is None and cp.refs == 0)
