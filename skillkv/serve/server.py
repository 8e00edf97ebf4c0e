"""Building and running the server: one SkillKV (runner, tiers, store) + Worker + FastAPI app under uvicorn.

    srv = Server(ServeConfig(model="default", skills="skills"))
    srv.start_background()          # tests, load test: an ephemeral port on 127.0.0.1, in a thread
    print(srv.url); ...; srv.close()

    Server(cfg).run()               # `skillkv serve`: blocks until Ctrl-C
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from skillkv.errors import SkillkvError

@dataclass
class ServeConfig:
    host: str = "127.0.0.1"
    port: int = 8321
    model: str | None = None
    skills: str | Path | None = None
    store: str | Path | None = None
    device: str | None = None
    kv_budget: int | None = None  # bytes; None: 2 GiB on the CPU, half the free GPU memory on CUDA
    host_budget: int | None = None  # bytes of the host tier (default 4 GiB)
    engine: str = "auto"
    pins: list[str] = field(default_factory=list)
    max_batch: int = 64
    max_step_tokens: int = 4096
    attention: str = "auto"
    batch_invariant: bool | None = None  # True: required (refused where it cannot hold); None: where it holds
    watch: bool = True
    default_max_tokens: int = 256
    compose_neighbours: bool | None = None  # compile compose's neighbour snapshots at start (None: as compile does)
    body_limit: int = 1 << 20  # bytes of a request body; a larger one is answered 413 unread
    follow_symlinks: bool = False  # load skill folders and files that link outside the skills folder
    log_level: str = "warning"


class Server:
    """`log(line)` takes the server's own lines (default: stderr), `access(entry)` one dict per request (default:
    its text line through `log`; skillkv.serve.middleware)."""

    def __init__(self, cfg: ServeConfig, kv=None, log=None, access=None):
        from skillkv.api import SkillKV
        from skillkv.serve.app import create_app
        from skillkv.serve.middleware import format_entry
        from skillkv.serve.worker import Worker

        self.cfg = cfg
        self.log = log or (lambda s: print(f"skillkv serve: {s}", file=sys.stderr, flush=True))
        self.access = access or (lambda e: self.log(format_entry(e)))
        # the same SkillKV as `skillkv ask` builds: one runner, its fingerprint and store, tiers, compose, pins
        self.kv = kv or SkillKV(model=cfg.model, store=cfg.store, skills=cfg.skills, device=cfg.device,
                                on_warning=lambda m: self.log(f"warning: {m}"), engine=cfg.engine,
                                kv_budget=cfg.kv_budget, host_budget=cfg.host_budget, pin=list(cfg.pins),
                                batch_invariant=cfg.batch_invariant, attention=cfg.attention,
                                follow_symlinks=cfg.follow_symlinks)
        self.worker = Worker(self.kv, max_batch=cfg.max_batch, max_step_tokens=cfg.max_step_tokens, watch=cfg.watch,
                             default_max_tokens=cfg.default_max_tokens, on_log=self.log,
                             neighbours=cfg.compose_neighbours)
        self.app = create_app(self.worker, cfg.body_limit, self.access)
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
        use = self.worker.runner.usage()
        pool = f"KV pool {use['bytes'] / 2**30:.2f} GiB, {use.get('attention', 'transformers')} attention, " \
            if "attention" in use else ""
        invariance = f" ({use['invariance']})" if use.get("invariance") else ""
        self.log(f"{self.kv.handle.name} ready in {time.perf_counter() - t0:.1f} s ({self.kv.engine} runner, {pool}"
                 f"batch-invariant {'on' if self.worker.runner.batch_invariant else 'off'}{invariance})")
        config = uvicorn.Config(self.app, log_level=self.cfg.log_level, timeout_graceful_shutdown=3,
                                access_log=False)
        self._uvicorn = uvicorn.Server(config)
        return sock

    def run(self) -> None:
        """Serve until interrupted."""
        sock = self._prepare()
        self.log(f"serving on {self.url} (OpenAI API at {self.url}/v1; Ctrl-C stops)")
        handle_exit = self._uvicorn.handle_exit

        def on_signal(sig, frame) -> None:
            if not self._uvicorn.should_exit:
                self.log("shutting down: finishing open requests (Ctrl-C again to stop at once)")
            handle_exit(sig, frame)
        self._uvicorn.handle_exit = on_signal
        try:
            self._uvicorn.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it handled, once it has shut down
            pass
        finally:
            self.worker.close()
            sock.close()
        n = self.worker.served
        self.log(f"stopped ({n:,} request{'' if n == 1 else 's'} answered)")

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
