"""The paged KV pool: one preallocated pair of tensors per model, sized by a byte budget.

    k, v: [layers, num_pages + 1, page_size, kv_heads, head_dim]   (per layer: FlashInfer's NHD paged layout)

Every slot holds a finite value from the start (zeros; on the CPU anonymous memory the OS zeroes page by page on
first touch, so a 2 GiB pool costs nothing until used), and the last page (`zero_page`) is never handed out: the
torch backend reads whole key blocks past a sequence's end (engine/block_attention.py), which must be finite.

Bookkeeping (which pages are free, resident, referenced, pinned) lives in `PageTable` (engine/pages.py). The
pool never grows: `budget_bytes` is a hard cap, and `nbytes` never exceeds it.
"""

from __future__ import annotations

import torch

from skillkv.engine.pages import PageTable
from skillkv.errors import SkillkvError

KV = list[tuple[torch.Tensor, torch.Tensor]]


class KVPool:
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: str | torch.device,
                 budget_bytes: int, page_size: int = 16):
        self.layers, self.kv_heads, self.head_dim, self.page_size = layers, kv_heads, head_dim, page_size
        self.dtype, self.device = dtype, torch.device(device)
        elem = torch.empty((), dtype=dtype).element_size()
        self.page_bytes = 2 * layers * page_size * kv_heads * head_dim * elem
        num_pages = int(budget_bytes // self.page_bytes) - 1  # one page is the zero page
        if num_pages < 1:
            raise SkillkvError(f"KV budget of {budget_bytes} bytes holds no page ({self.page_bytes} bytes each, "
                               f"two at least)")
        shape = (layers, num_pages + 1, page_size, kv_heads, head_dim)
        self.k, self.v = _zeros(shape, dtype, self.device), _zeros(shape, dtype, self.device)
        self.zero_page = num_pages  # never handed out, never written: reads past a sequence's pages land here
        self.table = PageTable(num_pages, page_size)
        self.budget_bytes = budget_bytes

    @classmethod
    def for_model(cls, hf_config, dtype, device, budget_bytes: int, page_size: int = 16) -> KVPool:
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        return cls(hf_config.num_hidden_layers, hf_config.num_key_value_heads, head_dim, dtype, device,
                   budget_bytes, page_size)

    @property
    def num_pages(self) -> int:
        return self.table.num_pages

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    def slots(self, pages: list[int], start: int, n: int) -> torch.Tensor:
        """Flat slot ids (page * page_size + offset) of token positions [start, start + n) in `pages`."""
        pos = torch.arange(start, start + n)
        page_idx = torch.tensor(pages, dtype=torch.long)[pos // self.page_size]
        return (page_idx * self.page_size + pos % self.page_size).to(self.device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store new keys/values [n, kv_heads, head_dim] at flat `slots` of `layer`."""
        self.k[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, k)
        self.v[layer].view(-1, self.kv_heads, self.head_dim).index_copy_(0, slots, v)

    def load(self, pages: list[int], kv: KV, non_blocking: bool = True, start: int = 0) -> None:
        """Copy a whole prefix (per layer [n, kv_heads, head_dim], any device, pinned host memory for speed)
        into `pages`, its first row at slot `start` of the first page. Contiguous pages take one copy per layer
        and tensor; scattered pages go through slots."""
        for layer, (k, v) in enumerate(kv):
            self.load_layer(layer, pages, k, v, start, non_blocking)

    def load_layer(self, layer: int, pages: list[int], k: torch.Tensor, v: torch.Tensor, offset: int = 0,
                   non_blocking: bool = True) -> None:
        """Copy keys/values [n, kv_heads, head_dim] of one layer to token positions [offset, offset + n) of
        `pages` (on the current stream). Contiguous pages take one copy per tensor, none when the source already
        is that destination (a snapshot read in place: Runner.reserve)."""
        n = k.shape[0]
        if pages == list(range(pages[0], pages[0] + len(pages))):
            span = slice(pages[0], pages[0] + len(pages))
            for pool, src in ((self.k, k), (self.v, v)):
                dst = pool[layer, span].view(-1, self.kv_heads, self.head_dim)[offset:offset + n]
                if src.data_ptr() != dst.data_ptr() or src.device != dst.device:  # else read in place already
                    dst.copy_(src, non_blocking=non_blocking)
        else:
            slots = self.slots(pages, offset, n)
            self.write(layer, slots, k.to(self.device, non_blocking=non_blocking),
                       v.to(self.device, non_blocking=non_blocking))

    def gather(self, layer: int, pages: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, kv_heads, head_dim] of the first n tokens of `pages` (for the torch backend)."""
        idx = torch.tensor(pages, device=self.device)
        k = self.k[layer].index_select(0, idx).view(-1, self.kv_heads, self.head_dim)[:n]
        v = self.v[layer].index_select(0, idx).view(-1, self.kv_heads, self.head_dim)[:n]
        return k, v

    def read_rows(self, layer: int, pages: list[int], start: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, kv_heads, head_dim] (new tensors) of token positions [start, start + n) of
        `pages` in `layer`."""
        slots = self.slots(pages, start, n)
        return (self.k[layer].view(-1, self.kv_heads, self.head_dim).index_select(0, slots),
                self.v[layer].view(-1, self.kv_heads, self.head_dim).index_select(0, slots))

    def copy_slots(self, src: int, dst: int, lo: int, hi: int) -> None:
        """Copy token slots [lo, hi) of page `src` to the same slots of page `dst`, in every layer."""
        self.k[:, dst, lo:hi].copy_(self.k[:, src, lo:hi])
        self.v[:, dst, lo:hi].copy_(self.v[:, src, lo:hi])

    def copy_page_prefix(self, src: int, dst: int, n: int, layer: int | None = None) -> None:
        """Copy the first n token slots of page `src` to page `dst` in every layer, or only in `layer`
        (copy-on-write of a shared, partly filled last page)."""
        at = slice(None) if layer is None else layer
        self.k[at, dst, :n].copy_(self.k[at, src, :n])
        self.v[at, dst, :n].copy_(self.v[at, src, :n])


def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on the CPU over anonymous memory (zeroed lazily by the OS, not written here)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    import mmap

    n = 1
    for x in shape:
        n *= x
    nbytes = n * torch.empty((), dtype=dtype).element_size()
    flags = getattr(mmap, "MAP_PRIVATE", 0) | getattr(mmap, "MAP_ANONYMOUS", 0)  # not shared with a forked child
    buf = mmap.mmap(-1, max(nbytes, 1), flags=flags) if flags else mmap.mmap(-1, max(nbytes, 1))
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
