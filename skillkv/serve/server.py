"""Building and running the server: SkillKV + PagedEngine + Worker + FastAPI app under uvicorn.

    srv = Server(ServeConfig(model="default", skills="skills"))
    srv.start_background()          # tests, load test: an ephemeral port on 127.0.0.1, in a thread
    print(srv.url); ...; srv.close()

    Server(cfg).run()               # `skillkv serve`: blocks until Ctrl-C
"""

from __future__ import annotations

import re
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from skillkv.errors import SkillkvError

DEFAULT_CPU_BUDGET = 2 << 30
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 10**3, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_bytes(text: str) -> int:
    """'2GiB', '512M', '1.5gb', '1000000' -> bytes (k/m/g alone are binary)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise SkillkvError(f"cannot read {text!r} as a size (e.g. 2GiB, 512M, 1000000)")
    n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise SkillkvError(f"size {text!r} must be positive")
    return n


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8321
    model: str | None = None
    skills: str | Path | None = None
    store: str | Path | None = None
    device: str | None = None
    kv_budget: int | None = None  # bytes; None: 2 GiB on the CPU, half the free GPU memory on CUDA
    pins: list[str] = field(default_factory=list)
    max_batch: int = 64
    max_step_tokens: int = 4096
    attention: str = "auto"
    batch_invariant: bool = True
    watch: bool = True
    default_max_tokens: int = 256
    log_level: str = "warning"


def _budget(cfg: ServeConfig, device) -> int:
    if cfg.kv_budget:
        return cfg.kv_budget
    if device.type == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return DEFAULT_CPU_BUDGET


class Server:
    def __init__(self, cfg: ServeConfig, kv=None, log=None):
        from skillkv.api import SkillKV
        from skillkv.serve.app import create_app
        from skillkv.serve.worker import Worker

        self.cfg = cfg
        self.log = log or (lambda s: print(f"skillkv serve: {s}", file=sys.stderr, flush=True))
        # the worker owns its own PagedEngine; SkillKV supplies skills, selection and the snapshots (hf engine)
        self.kv = kv or SkillKV(model=cfg.model, store=cfg.store, skills=cfg.skills, device=cfg.device,
                                on_warning=lambda m: self.log(f"warning: {m}"), engine="hf")

        def engine():
            from skillkv.engine.paged import PagedEngine

            model = self.kv.handle.load()
            device = next(model.parameters()).device
            return PagedEngine(model, _budget(cfg, device), attention=cfg.attention, page_size=16,
                               row_block=8 if cfg.batch_invariant else 0)

        self.worker = Worker(self.kv, engine, max_batch=cfg.max_batch, max_step_tokens=cfg.max_step_tokens,
                             pins=cfg.pins, watch=cfg.watch, default_max_tokens=cfg.default_max_tokens,
                             on_log=self.log)
        self.app = create_app(self.worker)
        self._uvicorn = None
        self._thread: threading.Thread | None = None
        self.url = ""

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.cfg.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.host, self.cfg.port))
        except OSError as e:
            sock.close()
            raise SkillkvError(f"cannot listen on {self.cfg.host}:{self.cfg.port} ({e.strerror or e})") from None
        sock.listen(2048)
        host, port = sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        return sock

    def _prepare(self):
        import uvicorn

        sock = self._bind()
        t0 = time.perf_counter()
        self.worker.start()
        self.log(f"{self.kv.handle.name} ready in {time.perf_counter() - t0:.1f} s "
                 f"(KV pool {self.worker.engine.pool.nbytes / 2**30:.2f} GiB, {self.worker.engine.backend.name} "
                 f"attention, batch-invariant {'on' if self.cfg.batch_invariant else 'off'})")
        config = uvicorn.Config(self.app, log_level=self.cfg.log_level, timeout_graceful_shutdown=3,
                                access_log=False)
        self._uvicorn = uvicorn.Server(config)
        return sock

    def run(self) -> None:
        """Serve until interrupted."""
        sock = self._prepare()
        self.log(f"serving on {self.url} (OpenAI API at {self.url}/v1)")
        try:
            self._uvicorn.run(sockets=[sock])
        finally:
            self.worker.close()
            sock.close()

    def start_background(self, timeout: float = 120) -> Server:
        sock = self._prepare()
        self._thread = threading.Thread(target=self._uvicorn.run, kwargs={"sockets": [sock]}, daemon=True,
                                        name="skillkv-http")
        self._sock = sock
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._uvicorn.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise SkillkvError("the HTTP server did not start")
            time.sleep(0.02)
        return self

    def close(self) -> None:
        if self._uvicorn is not None:
            self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self.worker.close()
        if getattr(self, "_sock", None) is not None:
            self._sock.close()
