"""`skillkv ask --server URL`: the question goes to a running `skillkv serve` instead of a local model.

RemoteKV has the one method of SkillKV that `ask` needs (`ask`), returning the same Answer, so the CLI prints the
stream and the --json line the same way. Only the standard library is used (urllib; SSE read line by line).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from typing import Callable

from skillkv.answer import Answer
from skillkv.generate import SamplingParams
from skillkv.errors import SkillkvError


class RemoteKV:
    def __init__(self, url: str, model: str | None = None, timeout: float = 600):
        self.url = url.rstrip("/")
        if not self.url.startswith(("http://", "https://")):
            self.url = "http://" + self.url
        self.model, self.timeout = model or "default", timeout

    def load_skills(self):
        raise SkillkvError("--explain needs a local model (it is not available with --server)")

    def ask(self, question: str, skills: list[str] | None = None, mode: str = "exact",
            params: SamplingParams | None = None, on_text: Callable[[str], None] | None = None,
            repair=None) -> Answer:
        if not question or not question.strip():
            raise SkillkvError("the question is empty")
        if mode not in ("exact", "auto") or repair is not None:
            raise SkillkvError("--server answers in exact mode only (the server keeps skills hot)")
        p = params or SamplingParams()
        body = {"model": self.model, "messages": [{"role": "user", "content": question}], "stream": True,
                "stream_options": {"include_usage": True}, "max_tokens": p.max_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "seed": p.seed}
        if skills:
            body["skills"] = list(skills)
        t0 = time.perf_counter()
        parts, finish, use, ext, model, first = [], "stop", {}, {}, self.model, None
        for obj in self._events(body):
            model = obj.get("model", model)
            for ch in obj.get("choices") or []:
                text = (ch.get("delta") or {}).get("content")
                if text:
                    first = first or time.perf_counter()
                    parts.append(text)
                    on_text and on_text(text)
                finish = ch.get("finish_reason") or finish
            use = obj.get("usage") or use
            ext = obj.get("skillkv") or ext
        end = time.perf_counter()
        prompt, cached = use.get("prompt_tokens", 0), use.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        st = ext.get("timings_ms", {})
        return Answer(question=question, answer="".join(parts), output_token_ids=ext.get("output_token_ids", []),
                      skills=ext.get("skills", []), mode="exact",
                      tokens={"prompt": prompt, "cached": cached, "computed": prompt - cached},
                      timings_ms={"model_load": 0.0, "snapshot_load": st.get("snapshot_load", 0.0),
                                  "ttft": round(((first or end) - t0) * 1e3, 1), "total": round((end - t0) * 1e3, 1),
                                  "server_ttft": st.get("ttft")},
                      model=model, finish_reason=finish, tiers=ext.get("tiers", []))

    def _events(self, body: dict):
        req = urllib.request.Request(self.url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Accept": "text/event-stream"})
        try:
            resp = urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            raise SkillkvError(f"server {self.url}: {_message(e.read(), e.code)}") from None
        except (urllib.error.URLError, OSError) as e:
            raise SkillkvError(f"cannot reach the skillkv server at {self.url} "
                               f"({getattr(e, 'reason', None) or e})") from None
        with resp:
            for raw in resp:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                obj = json.loads(data)
                if "error" in obj:
                    raise SkillkvError(f"server {self.url}: {obj['error'].get('message')}")
                yield obj


def _message(raw: bytes, status: int) -> str:
    try:
        return json.loads(raw)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"HTTP {status}"
