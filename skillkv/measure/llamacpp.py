"""llama.cpp's own OpenAI-compatible server, from the `xllamacpp` wheel, as the peer column of `skillkv bench --agent`.

    if version() is not None:
        with LlamaCpp(gguf, context=8192, slots=4, threads=2) as peer:
            ... POST peer.url + "/v1/chat/completions" ...

Contract:
  - `xllamacpp` is never a dependency of skillkv: it is imported only in the child process below, only when a peer
    is started, and `version()` is None when it is not installed (the bench then leaves the column out, one line);
  - the server runs in a child process (`python -m skillkv.measure.llamacpp CONFIG`: xllamacpp starts llama.cpp's
    C++ HTTP server on an ephemeral loopback port, prints {"url"} on stdout and serves until its stdin closes), with
    llama.cpp's logs silenced and OMP_WAIT_POLICY unset: llama.cpp's own default, as `llama-server` runs (the
    PASSIVE that skillkv's CLI sets halved llama.cpp's decode speed on the 2-core CPU); a failed start is a
    SkillkvError with the child's last line; `close()` stops it before the next column is measured;
  - configuration, as a CPU user would run it: `threads` threads for prompt and generation, `slots` parallel slots of
    `context` tokens each (n_ctx = slots x context, KV not unified), so interleaved conversations can each keep a
    slot; the prompt cache on (`cache_prompt: true` is sent per request; a request goes to the slot with the longest
    common prefix) and llama.cpp's host-RAM prompt cache at its default size; the GGUF's own chat template (jinja).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from skillkv.errors import SkillkvError


def version() -> str | None:
    """The installed xllamacpp's version, or None (found without importing it)."""
    if importlib.util.find_spec("xllamacpp") is None:
        return None
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("xllamacpp")
    except PackageNotFoundError:
        return "unknown"


class LlamaCpp:
    def __init__(self, gguf: Path, context: int, slots: int = 1, threads: int = 2):
        gguf = Path(gguf)
        if not gguf.is_file():
            raise SkillkvError(f"GGUF file {gguf} not found")
        cfg = {"gguf": str(gguf.resolve()), "context": context, "slots": slots, "threads": threads}
        self.settings = {"gguf": gguf.name, "slots": slots, "context_per_slot": context, "threads": threads,
                         "cache_prompt": True, "omp_wait_policy": "unset", "xllamacpp": version()}
        root = str(Path(__file__).resolve().parents[2])  # this skillkv, whatever the child's working directory
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
        env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        self._err = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "skillkv.measure.llamacpp", json.dumps(cfg)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        line = self.proc.stdout.readline()
        try:
            self.url = json.loads(line)["url"].rstrip("/")
        except (ValueError, KeyError, TypeError):
            self.close()
            self._err.seek(0)
            last = ([x for x in self._err.read().splitlines() if x.strip()] or ["it exited"])[-1]
            raise SkillkvError(f"llama.cpp server did not start: {last[:200]}") from None
        self.settings["cache_ram_mib"] = json.loads(line).get("cache_ram_mib")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LlamaCpp:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
        self._err.close()


def _serve(cfg: dict) -> None:
    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = cfg["gguf"]
    p.n_ctx = cfg["context"] * cfg["slots"]
    p.n_parallel = cfg["slots"]
    p.kv_unified = False
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = cfg["threads"]
    p.cache_prompt = True
    p.verbosity = -1
    p.n_gpu_layers = 0
    server = xlc.Server(p)
    print(json.dumps({"url": server.listening_address, "cache_ram_mib": p.cache_ram_mib}), flush=True)
    sys.stdin.read()  # serve until the parent closes our stdin
    del server


if __name__ == "__main__":
    _serve(json.loads(sys.argv[1]))
