"""Progress on stderr: a live line on a terminal, plain lines elsewhere (a log, CI, `2> file`).

  CompileProgress  the skill being compiled, tokens done / total and an ETA from the rate measured so far
  Waiting          what a long step is doing (an ask's prefill) with the seconds it has taken; on a terminal a
                   spinner, elsewhere one line after `quiet` seconds and one every `every` seconds after that
"""

from __future__ import annotations

import sys
import threading
import time

from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from skillkv.cli.common import err, human_seconds, printable


def live() -> bool:
    return sys.stderr.isatty()


class CompileProgress:
    """`todo` = [(skill name, tokens)] of the skills that will be computed, in compile order."""

    def __init__(self, model: str, todo: list[tuple[str, int]], enabled: bool = True):
        self.todo, self.total = list(todo), sum(n for _, n in todo)
        self.done_tokens, self.i, self.t0 = 0, 0, None
        self.enabled = enabled and bool(todo)
        self.bar = None
        if self.enabled and live():
            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                                TextColumn("{task.fields[tokens]}"), TextColumn("{task.fields[eta]}"),
                                TimeElapsedColumn(), console=err, transient=True)
            self.task = self.bar.add_task(f"compiling for {model}", total=self.total, tokens="", eta="")
            self.bar.start()
        self._announce()

    def _eta(self) -> str:
        if not self.done_tokens or self.t0 is None:
            return "ETA …"
        rate = self.done_tokens / max(1e-6, time.perf_counter() - self.t0)
        return f"ETA {human_seconds((self.total - self.done_tokens) / rate)}"

    def _announce(self) -> None:
        """The next skill starts."""
        if not self.enabled or self.i >= len(self.todo):
            return
        if self.t0 is None:
            self.t0 = time.perf_counter()
        name, n = self.todo[self.i]
        counts = f"{self.done_tokens:,}/{self.total:,} tokens"
        if self.bar is not None:
            self.bar.update(self.task, description=f"{printable(name)} ({self.i + 1}/{len(self.todo)})",
                            completed=self.done_tokens, tokens=counts, eta=self._eta())
        else:
            err.print(f"compile: {printable(name)} ({self.i + 1}/{len(self.todo)}, {n:,} tokens; {counts} done, "
                      f"{self._eta()})", markup=False, highlight=False, soft_wrap=True)

    def result(self, r) -> None:
        """A skill's result came: if it was the one in progress, count it and announce the next."""
        if not self.enabled or self.i >= len(self.todo) or r.skill != self.todo[self.i][0]:
            return
        self.done_tokens += self.todo[self.i][1]
        self.i += 1
        self._announce()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class Waiting:
    """A step that may take long; `update(text)` says what it is doing now, `stop()` ends it (idempotent)."""

    def __init__(self, enabled: bool = True, quiet: float = 2.0, every: float = 15.0):
        self.enabled, self.quiet, self.every = enabled, quiet, every
        self.text, self.t0, self._stop = "", time.perf_counter(), threading.Event()
        self._thread = self.bar = None

    def update(self, text: str) -> None:
        if not self.enabled or self._stop.is_set():
            return
        self.text = text
        if live():
            if self.bar is None:
                self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                                    console=err, transient=True)
                self.task = self.bar.add_task(text)
                self.bar.start()
            self.bar.update(self.task, description=text)
        elif self._thread is None:
            self._thread = threading.Thread(target=self._plain, daemon=True, name="skillkv-progress")
            self._thread.start()

    def _plain(self) -> None:
        wait, first = self.quiet, True
        while not self._stop.wait(wait):
            took = "" if first else f" ({human_seconds(time.perf_counter() - self.t0)} so far)"
            err.print(f"skillkv: {self.text}…{took}", markup=False, highlight=False, soft_wrap=True)
            wait, first = self.every, False

    def stop(self) -> None:
        self._stop.set()
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1)
