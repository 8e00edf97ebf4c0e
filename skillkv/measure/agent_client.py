"""One streaming chat-completions request as the agent bench sees it: time to the first content token, the answer
text, and how many prompt tokens the server reused, read from whichever fields the server reports.

    c = Client("http://127.0.0.1:8321", timeout=600)
    r = c.chat(payload)          # payload["stream"] is True; `stream_options.include_usage` asks for usage
    r.ttft, r.text, r.prompt, r.reused, r.computed, r.source, r.error

Contract:
  - never raises for a failed request: an HTTP error status, an `{"error": ...}` event in the stream, a stream that
    ends early, a timeout or a refused connection is `Reply.error` (one line); the connection is then reopened;
    a kept-alive connection the server closed while idle is reopened and the request sent again (once);
  - `ttft` is measured from just before the request is sent to the first chunk with non-empty `delta.content` or
    `delta.tool_calls` (or the finish chunk, for an empty answer); `total` to the end of the stream;
  - reuse, in this order: skillkv's `tokens` = {prefix_cache, skill_kv, computed} (top-level `skillkv.tokens` or
    `usage.skillkv`; reused = prefix_cache + skill_kv), llama.cpp's `timings` (reused = cache_n, computed =
    prompt_n), else OpenAI's `usage.prompt_tokens_details.cached_tokens`; `source` names the one used. `prompt` is
    `usage.prompt_tokens` (llama.cpp: cache_n + prompt_n when usage is missing);
  - `output_ids` is skillkv's `skillkv.output_token_ids` when the server sends it (None otherwise);
  - `server_prompt_ms`: the server's own time computing the prompt's new tokens: llama.cpp's `timings.prompt_ms`,
    skillkv's `skillkv.timings_ms.prefill` (the engine steps that fed the prompt; `ttft` from older servers).
"""

from __future__ import annotations

import http.client
import json
import time
from dataclasses import dataclass
from urllib.parse import urlparse


STALE = "connection closed before the response: "


class _Stale(Exception):
    pass


@dataclass
class Reply:
    text: str = ""
    ttft: float | None = None
    total: float = 0.0
    prompt: int | None = None
    reused: int | None = None
    computed: int | None = None
    source: str = ""
    output_ids: list[int] | None = None
    mode: str = ""  # skillkv's mode used (exact, full, cached: the approximate prefix cache, compose)
    server_prompt_ms: float | None = None
    finish: str = ""
    error: str = ""


def _message(raw: bytes) -> str:
    try:
        obj = json.loads(raw)
        err = obj.get("error", obj)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:300]
    except (ValueError, AttributeError):
        return raw[:300].decode("utf-8", "replace")


def reuse(usage: dict | None, timings: dict | None, ext: dict | None) -> tuple[int | None, int | None, int | None, str]:
    """(prompt tokens, reused, computed, source) from a response's `usage`, `timings` and `skillkv` objects."""
    usage, timings, ext = usage or {}, timings or {}, ext or {}
    prompt = usage.get("prompt_tokens")
    for toks, where in ((ext.get("tokens"), "skillkv.tokens"), (usage.get("skillkv"), "usage.skillkv")):
        if isinstance(toks, dict) and "computed" in toks:
            reused = int(toks.get("prefix_cache", 0)) + int(toks.get("skill_kv", 0))
            return (prompt if prompt is not None else reused + toks["computed"]), reused, int(toks["computed"]), where
    if "cache_n" in timings and "prompt_n" in timings:
        n, c = int(timings["cache_n"]), int(timings["prompt_n"])
        return (prompt if prompt is not None else n + c), n, c, "timings"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    if prompt is not None and cached is not None:
        return prompt, int(cached), prompt - int(cached), "cached_tokens"
    return prompt, None, None, ""


class Client:
    """One keep-alive HTTP connection to an OpenAI-compatible server."""

    def __init__(self, url: str, timeout: float = 600):
        u = urlparse(url)
        self.host, self.port, self.timeout = u.hostname, u.port or 80, timeout
        self.conn: http.client.HTTPConnection | None = None

    def _events(self, resp):
        while True:
            line = resp.readline()
            if not line:
                raise ConnectionError("the stream ended before [DONE]")
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                return
            yield json.loads(data)

    def chat(self, payload: dict) -> Reply:
        """Send `payload`; a kept-alive connection the server closed meanwhile (llama.cpp's idle timeout is 5 s) is
        reopened and the request sent again, once, timed from the second send."""
        reused = self.conn is not None
        r = self._chat(payload)
        if reused and r.error.startswith(STALE):
            r = self._chat(payload)
        return r

    def _chat(self, payload: dict) -> Reply:
        r, usage, timings, ext, parts = Reply(), None, None, None, []
        t0 = time.perf_counter()
        try:
            if self.conn is None:
                self.conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            try:
                self.conn.request("POST", "/v1/chat/completions", json.dumps(payload),
                                  {"Content-Type": "application/json"})
                resp = self.conn.getresponse()
            except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected) as e:
                raise _Stale(f"{STALE}{type(e).__name__}: {e}") from None
            if resp.status != 200:
                r.error = f"HTTP {resp.status}: {_message(resp.read())}"
            else:
                for obj in self._events(resp):
                    if "error" in obj:
                        r.error = _message(json.dumps(obj).encode())
                        continue
                    ch = (obj.get("choices") or [{}])[0]
                    delta = ch.get("delta") or {}
                    piece = delta.get("content")
                    if piece:
                        parts.append(piece)
                    if r.ttft is None and (piece or delta.get("tool_calls") or ch.get("finish_reason")):
                        r.ttft = time.perf_counter() - t0
                    r.finish = ch.get("finish_reason") or r.finish
                    usage, timings = obj.get("usage") or usage, obj.get("timings") or timings
                    ext = obj.get("skillkv") or ext
                resp.read()
        except _Stale as e:
            r.error = str(e)
            self.close()
        except (OSError, http.client.HTTPException, ValueError) as e:
            r.error = f"{type(e).__name__}: {e}".splitlines()[0][:300]
            self.close()
        r.total = time.perf_counter() - t0
        r.text = "".join(parts)
        r.prompt, r.reused, r.computed, r.source = reuse(usage, timings, ext)
        if ext:
            r.output_ids, r.mode = ext.get("output_token_ids"), ext.get("mode") or ""
            tm = ext.get("timings_ms") or {}
            r.server_prompt_ms = tm.get("prefill", tm.get("ttft"))
        if timings and "prompt_ms" in timings:
            r.server_prompt_ms = round(float(timings["prompt_ms"]), 1)
        if not r.error and r.prompt is None:
            r.error = "no usage in the response (stream_options.include_usage ignored?)"
        return r

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
