"""Layer-pipelined paging of a prefix into the KV pool: the question's first layers compute while later layers
still land.

A copier thread issues each layer's copies (source -> pool pages) on a dedicated CUDA stream and records an event
per layer; the runner's `layer_ready(i)` hook blocks the CPU only until layer i's copies are *issued*, then makes the
compute stream wait on that layer's event. Stream ordering: the copy stream first waits for everything already
queued on the compute stream (evicted pages may still be read there). Sources (runners/base.KVSource) become ready
layer by layer themselves (an L2 read verifies each layer's checksums as it lands); source buffers stay referenced
until the last copy completed. On the CPU the same code runs with plain copies on the copier thread.

A source found damaged fails the PageIn: every waiter (a running prefill included) raises SnapshotError; the owner
(runners/paged.py) drops the entry from the pool as soon as no sequence holds it, so it is never served.
"""

from __future__ import annotations

import contextlib
import threading

import torch

from skillkv.errors import SnapshotError


class PageIn:
    """A prefix being paged into pool `pages`: `pieces` (KVSource: tiers/host_cache.HostKV, runners/base.ReadyKV) placed
    at token `offsets`.
    `wait(layer)` is the runner's readiness hook: it returns once layer `layer` may be read on the current
    stream, or raises SnapshotError if a piece is damaged."""

    def __init__(self, key: str, pieces: list, offsets: list[int], pages: list[int], layers: int,
                 device: torch.device):
        self.key, self.pieces, self.offsets, self.pages, self.layers = key, pieces, offsets, pages, layers
        self.cuda = device.type == "cuda"
        self.device = device
        self.issued = [threading.Event() for _ in range(layers)]
        self.events: list = [None] * layers
        self.error: BaseException | None = None
        self.finished = threading.Event()  # every copy completed (or failed): pinned buffers released
        self.released = False  # the owner's own hold on the pool entry, dropped once finished
        self.start_event = None
        if self.cuda:  # copies go after everything already queued on the compute stream
            self.start_event = torch.cuda.Event()
            self.start_event.record(torch.cuda.current_stream(device))

    def run(self, pool, stream) -> None:
        """Issue every layer's copies (on the copier thread)."""
        try:
            with torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext():
                if self.cuda:
                    stream.wait_event(self.start_event)
                for layer in range(self.layers):
                    for piece, off in zip(self.pieces, self.offsets):
                        k, v = piece.wait(layer)
                        pool.load_layer(layer, self.pages, k, v, off, non_blocking=True)
                    if self.cuda:
                        ev = torch.cuda.Event()
                        ev.record(stream)
                        self.events[layer] = ev
                    self.issued[layer].set()
                if self.cuda and self.layers:
                    self.events[-1].synchronize()  # host buffers stay referenced until the last copy landed
                for piece in self.pieces:
                    piece.complete.wait()  # an L2 read is cached in the host tier before the page-in counts as done
        except BaseException as e:  # noqa: BLE001 - reported to every waiter
            if self.cuda:  # copies already issued land before the pages can be freed and reused
                with contextlib.suppress(Exception):
                    stream.synchronize()
            self.error = e
            for ev in self.issued:
                ev.set()
        finally:
            self.pieces = []  # release the host buffers
            self.finished.set()

    def wait(self, layer: int) -> None:
        self.issued[layer].wait()
        if self.error is not None:
            raise self.error if isinstance(self.error, SnapshotError) else SnapshotError(
                f"{self.key[:12]}: paging failed ({type(self.error).__name__}: {self.error})")
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(self.events[layer])

    def result(self) -> None:
        """Wait until every layer landed; raise SnapshotError if it failed."""
        for layer in range(self.layers):
            self.wait(layer)
        self.finished.wait()

    @property
    def failed(self) -> bool:
        return self.finished.is_set() and self.error is not None
