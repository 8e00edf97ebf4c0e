"""Attention whose result for a query row depends only on that row and the keys at or before it: not on how many
other rows share the step, nor on where the step starts (chunk invariance). The torch backend's one formulation
(engine/attention.py).

Why: a prefix cache reuses KV computed in other steps (an earlier turn's prompt in one prefill, its answer one
decode step at a time). It equals a full prefill of the same tokens bit for bit only if every row's KV is the same
bits however the sequence was cut into steps. SDPA's CPU kernels are not: their query and key split sizes depend on
the step's lengths, so a row's softmax is summed in other groupings (and the last key block has another length).

How (the Thinking Machines recipe for batch-invariant attention: fixed split sizes, fixed reduction order):
  - keys in blocks of BLOCK positions aligned at absolute position 0 (block b = keys [b*BLOCK, (b+1)*BLOCK)); the
    last block of a sequence is read whole (slots past the sequence are finite: zero or older KV, masked);
  - per kv head (read in place: a strided view of the pool) and query row: the scores of every visible block (one
    dot product over head_dim each), keys after the row set to -inf (by absolute position), the row's maximum over
    all its keys (exact in any order), p = exp(s - max) on whole blocks, per-block sums over exactly BLOCK entries
    and per-block p @ V, then the blocks summed in block order (`cumsum`: sequential by definition); blocks a row
    cannot see contribute exact zeros; out = o / l;
  - grouped-query heads folded into the rows (query i, head j of a kv head's group -> row i*group + j), rows padded
    to a multiple of ROWS with zeros (GEMM rows then do not depend on the row count: engine/invariance.py checks
    the GEMMs; `chunk_invariant` below checks this whole function on the machine);
  - queries in chunks of CHUNK rows, each reading only the blocks up to its last position (causal skipping at block
    granularity; the chunking of rows cannot change a row's result).
Float32 arithmetic whatever the KV dtype. Cost on 2 CPU cores (default model's heads, per layer, 3,000 keys): a
fresh 3,000-token prefill 217 ms, 200 new rows 23 ms, 24 rows 4.5 ms, one decode row 1.7 ms.
"""

from __future__ import annotations

import torch

BLOCK = 256  # keys per block, aligned at position 0
CHUNK = 64  # query positions per chunk
ROWS = 8  # folded rows padded to a multiple of this


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """q [n, q_heads, d]: the rows at positions start .. start+n-1; k, v [L, kv_heads, d] (views are fine: each kv
    head is read in place, a strided matrix): keys of positions 0 .. L-1, L a multiple of BLOCK with
    L >= start+n, slots at or after start+n holding any finite values. Returns [n, q_heads, d] in q's dtype."""
    n, hq, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    if k.dtype != torch.float32:
        k, v = k.float(), v.float()
    qf = (q.float() * scale).view(n, hk, g, d)
    out = torch.empty(n, hk, g, d, dtype=torch.float32, device=q.device)
    for r0 in range(0, n, CHUNK):
        r1 = min(n, r0 + CHUNK)
        _chunk(qf[r0:r1], k, v, start + r0, out[r0:r1])
    return out.view(n, hq, d).to(q.dtype)


def _chunk(qf: torch.Tensor, k: torch.Tensor, v: torch.Tensor, p0: int, out: torch.Tensor) -> None:
    """Rows of query positions p0 .. p0+nr-1 (qf [nr, kv_heads, group, d]) into `out` of the same shape."""
    nr, hk, g, d = qf.shape
    nb = -(-(p0 + nr) // BLOCK)  # blocks up to the chunk's last position
    rows = nr * g
    pad = (-rows) % ROWS
    b0 = p0 // BLOCK  # blocks before b0 are visible to every row of the chunk
    hidden = _hidden(p0, nr, g, pad, b0, nb, qf.device)
    for h in range(hk):
        x = qf[:, h].reshape(rows, d)
        if pad:
            x = torch.cat([x, x.new_zeros(pad, d)])
        s = x @ k[:nb * BLOCK, h].T  # [rows + pad, nb * BLOCK]: one dot product over d per element
        s[:, b0 * BLOCK:].masked_fill_(hidden, float("-inf"))
        s.sub_(s.amax(1, keepdim=True)).exp_()
        sb = s.view(-1, nb, BLOCK)
        l = sb.sum(-1).cumsum(1)[:, -1]  # per-block sums over BLOCK entries, blocks added in order
        o = torch.matmul(sb.transpose(0, 1), v[:nb * BLOCK, h].reshape(nb, BLOCK, d)).cumsum(0)[-1]
        out[:, h] = (o / l.unsqueeze(-1))[:rows].view(nr, g, d)


def _hidden(p0: int, nr: int, g: int, pad: int, b0: int, nb: int, device) -> torch.Tensor:
    """[rows + pad, (nb - b0) * BLOCK]: True where a key comes after the row's position (padding rows see every key
    of the chunk's last position). Built by numpy: no parallel region for a small mask."""
    import numpy as np

    pos = np.repeat(np.arange(p0, p0 + nr), g)
    if pad:
        pos = np.concatenate([pos, np.full(pad, p0 + nr - 1)])
    hidden = np.arange(b0 * BLOCK, nb * BLOCK)[None, :] > pos[:, None]
    return torch.from_numpy(hidden).to(device)


def keys_of(pool_k: torch.Tensor, pool_v: torch.Tensor, pages: list[int], kv_len: int, page_size: int,
            zero_page: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [L, kv_heads, d] of positions 0 .. L-1 (L: kv_len rounded up to a whole BLOCK) of a
    sequence over `pages` of one layer's pool tensors [num_pages (+ zero page), page_size, kv_heads, d]: a view when
    its pages are one run and the run's blocks fit in the pool, else a gather with `zero_page` past its last page."""
    need = -(-kv_len // BLOCK) * (BLOCK // page_size)
    used = pages[:-(-kv_len // page_size)]
    first = used[0]
    if used == list(range(first, first + len(used))) and first + need <= zero_page:
        k, v = pool_k[first:first + need], pool_v[first:first + need]
    else:
        idx = torch.tensor(used + [zero_page] * (need - len(used)), device=pool_k.device)
        k, v = pool_k.index_select(0, idx), pool_v.index_select(0, idx)
    return k.reshape(need * page_size, *pool_k.shape[2:]), v.reshape(need * page_size, *pool_k.shape[2:])


_CHECKED: dict[tuple, str | None] = {}


def chunk_invariance_fails(q_heads: int, kv_heads: int, head_dim: int, device: torch.device) -> str | None:
    """None when `attend` gives every row of a 600-token sequence the same bits however the sequence is cut into
    steps (one step; cuts at 1, 7, 255, 256, 300; one-row steps at the end), on this machine with this process's
    threads; else where it does not. Cached per process (tens of milliseconds)."""
    key = (q_heads, kv_heads, head_dim, str(device), torch.get_num_threads())
    if key not in _CHECKED:
        g = torch.Generator().manual_seed(0)
        n = 600
        q, k, v = (torch.randn(n, h, head_dim, generator=g).to(device) for h in (q_heads, kv_heads, kv_heads))
        pad = -(-n // BLOCK) * BLOCK - n
        kb, vb = (torch.cat([x, x.new_zeros(pad, kv_heads, head_dim)]) for x in (k, v))
        scale = head_dim ** -0.5
        whole = attend(q, kb, vb, 0, scale)
        _CHECKED[key] = None
        for cuts in ([1, 7, 255, 256, 300], list(range(590, 600))):
            parts, prev = [], 0
            for c in cuts + [n]:
                parts.append(attend(q[prev:c], kb, vb, prev, scale))
                prev = c
            if not torch.equal(torch.cat(parts), whole):
                _CHECKED[key] = f"attention rows differ when a sequence is cut at {cuts[:5]}"
                break
    return _CHECKED[key]
