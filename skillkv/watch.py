"""Watch mode: recompile a skill as soon as one of its files changes.

    w = Watcher(kv, "skills", on_line=print)
    w.run(max_events=None, timeout=None)      # until Ctrl-C (or the bounds, for tests)

How it works
  - A watchdog observer (inotify/FSEvents/...) watches the skills folder recursively. Each file event is mapped to
    the skill folder it belongs to (the first path component under the root; the root itself when it is one skill),
    so an editor that saves through a temporary file and a rename, a `references/` edit, or a folder rename all
    land on the right skill. Events only mark a folder dirty; read-only events (opened, closed-no-write) are
    ignored, so compiling (which reads the files) never feeds back.
  - A folder is processed once no event touched it for `debounce` seconds: it is parsed alone and, if valid, only
    that skill is compiled (`SkillKV.compile_skill`, the compile stage, incremental by content hash). Its new snapshot is written to a
    temp file, fsynced and renamed into the store, then indexed (skillkv.store): readers see the old snapshot or the
    new one, never half of one. Other skills are not read, let alone recompiled.
  - An invalid edit prints its error and leaves the last good snapshot in place. A folder whose `SKILL.md` is gone
    makes the skill's snapshots stale (they no longer match any current skill: `ls` stops listing them, `gc` deletes
    them). A skill renamed to a name another folder already uses is refused with an error.
  - One line per processed skill: (skill, tokens, seconds, result).
  - Stops on Ctrl-C, on `max_events` processed results, after `timeout` seconds, or with a SkillkvError when the
    watched folder disappears. The observer is always stopped and joined; a compile is never interrupted midway by
    the watcher itself, and a Ctrl-C during one can only leave a temp file that `gc` removes (the rename is last).
"""

from __future__ import annotations

import queue
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from skillkv.errors import SkillError
from skillkv.skills import Skill, parse_skill

WRITE_EVENTS = {"created", "modified", "moved", "deleted", "closed"}


@dataclass
class WatchLine:
    skill: str
    tokens: int
    seconds: float
    result: str  # compiled | recompiled | up to date | deleted | error | renamed
    detail: str = ""
    folder: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        tail = f" ({self.detail})" if self.detail else ""
        return f"{self.skill}  {self.tokens} tokens  {self.seconds:.2f} s  {self.result}{tail}"


def check_root(root: Path | str) -> Path:
    """The watched folder, resolved; SkillError if it is not a folder."""
    path = Path(root).resolve()
    if not path.is_dir():
        raise SkillError(f"skills folder {path} does not exist")
    return path


class Watcher:
    def __init__(self, kv, root: Path | str, on_line: Callable[[WatchLine], None] = print, debounce: float = 0.3,
                 compression: str = "none"):
        self.kv = kv
        self.root = Path(root).resolve()
        self.on_line = on_line
        self.debounce = debounce
        self.compression = compression
        self.events: queue.Queue[tuple[float, str]] = queue.Queue()
        self.names: dict[str, str] = {}  # folder name -> skill name of its last good parse
        self._observer = None

    # ------------------------------------------------------------------ events (observer thread)

    def _folder_of(self, path: str) -> str | None:
        """The skill folder (first component under the root, or "." when the root is one skill) or None."""
        try:
            parts = Path(path).resolve().relative_to(self.root).parts
        except (ValueError, OSError):
            return None
        if "." in self.names or (self.root / "SKILL.md").is_file():
            return "."
        if not parts or parts[0].startswith("."):
            return None  # the root itself, or hidden folders (.git, editor state)
        if len(parts) >= 2 or (self.root / parts[0]).is_dir() or parts[0] in self.names:
            return parts[0]
        return None  # a loose file at the top level

    def _on_event(self, event) -> None:
        if event.event_type not in WRITE_EVENTS:
            return
        now = time.monotonic()
        for p in (event.src_path, getattr(event, "dest_path", "") or ""):
            folder = self._folder_of(p) if p else None
            if folder:
                self.events.put((now, folder))

    def _start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                watcher._on_event(event)

        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.root), recursive=True)
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)
            self._observer = None

    # ------------------------------------------------------------------ processing (main thread)

    def _emit(self, line: WatchLine) -> WatchLine:
        self.on_line(line)
        return line

    def learn(self, skills: list[Skill]) -> None:
        """Remember which folder holds which skill (to tell a rename from a deletion later)."""
        for s in skills:
            self.names["." if s.path.resolve() == self.root else s.path.name] = s.name

    def initial(self) -> list[WatchLine]:
        """Compile whatever is out of date at start (and learn which folder holds which skill)."""
        lines = []
        self.kv.reload()
        for r in self.kv.compile(compression=self.compression):
            lines.append(self._emit(WatchLine(r.skill, r.tokens, round(r.seconds, 3),
                                              "error" if r.status == "skipped" else r.status, r.reason)))
        self.learn(self.kv.load_skills().skills)
        return lines

    def process(self, folder: str) -> WatchLine:
        """Re-read one skill folder and compile it (or report it deleted / invalid)."""
        t0 = time.perf_counter()
        path = self.root if folder == "." else self.root / folder
        old = self.names.get(folder)
        if not (path / "SKILL.md").is_file():
            if old is None:
                return self._emit(WatchLine(folder, 0, 0.0, "ignored", "no SKILL.md", folder))
            del self.names[folder]
            if old in self.names.values():
                return self._emit(WatchLine(old, 0, 0.0, "renamed", f"folder {folder} moved", folder))
            n = sum(1 for e in self.kv.snapshots.entries().values() if e.skill == old)
            return self._emit(WatchLine(old, 0, round(time.perf_counter() - t0, 3), "deleted",
                                        f"{n} snapshot(s) now stale; skillkv gc removes them", folder))
        try:
            skill = parse_skill(path, follow_symlinks=self.kv.follow_symlinks, root=self.root)
        except SkillError as e:
            return self._emit(WatchLine(old or folder, 0, round(time.perf_counter() - t0, 3), "error",
                                        f"{e}; last good snapshot kept", folder))
        owner = next((f for f, n in self.names.items() if n == skill.name and f != folder
                      and ((self.root / f / "SKILL.md").is_file())), None)
        if owner is not None:
            return self._emit(WatchLine(skill.name, 0, round(time.perf_counter() - t0, 3), "error",
                                        f"{path / 'SKILL.md'}: name {skill.name!r} already used by "
                                        f"{self.root / owner}; last good snapshot kept", folder))
        r = self.kv.compile_skill(skill, compression=self.compression)
        if r.status == "skipped":
            return self._emit(WatchLine(skill.name, 0, round(time.perf_counter() - t0, 3), "error",
                                        f"{r.reason}; last good snapshot kept", folder))
        self.names[folder] = skill.name
        detail = "; ".join(skill.warnings)
        if old and old != skill.name:
            n = sum(1 for e in self.kv.snapshots.entries().values() if e.skill == old)
            detail = "; ".join(x for x in (f"renamed from {old} ({n} old snapshot(s) now stale)", detail) if x)
        return self._emit(WatchLine(skill.name, r.tokens, round(time.perf_counter() - t0, 3), r.status, detail,
                                    folder))

    def start(self) -> None:
        """Start the observer: file events queue up until `poll` processes them (for a host loop, e.g. serve)."""
        self._start_observer()

    def poll(self, pending: dict[str, float], wait: float = 0.0, limit: int | None = None) -> list[WatchLine]:
        """One round: queue events into `pending` (folder -> time of its last event) and, once none arrive
        within `wait` seconds, process the folders quiet for `debounce` seconds (at most `limit`). Returns the
        processed lines, "ignored" ones left out. Raises SkillError when the watched folder disappeared."""
        try:
            t, folder = self.events.get(timeout=wait) if wait > 0 else self.events.get_nowait()
            pending[folder] = max(t, pending.get(folder, 0.0))
            return []  # drain everything queued before deciding
        except queue.Empty:
            pass
        if not self.root.is_dir():
            raise SkillError(f"watched skills folder {self.root} disappeared; stopped")
        now = time.monotonic()
        due = [f for f, t in pending.items() if now - t >= self.debounce]
        done: list[WatchLine] = []
        # folders that still hold a SKILL.md first, so a folder rename reads as "renamed", not "deleted"
        for folder in sorted(due, key=lambda f: not (self.root / f / "SKILL.md").is_file()):
            del pending[folder]
            line = self.process(folder)
            if line.result != "ignored":
                done.append(line)
            if limit is not None and len(done) >= limit:
                break
        return done

    def run(self, max_events: int | None = None, timeout: float | None = None, initial: bool = True,
            ready: Callable[[], None] | None = None) -> list[WatchLine]:
        """Watch until Ctrl-C, `max_events` processed folders, or `timeout` seconds. Returns the event lines."""
        check_root(self.root)
        if initial:
            self.initial()
        self._start_observer()
        done: list[WatchLine] = []
        pending: dict[str, float] = {}
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            ready and ready()
            while max_events is None or len(done) < max_events:
                if deadline is not None and time.monotonic() >= deadline:
                    break
                done += self.poll(pending, wait=0.05, limit=None if max_events is None else max_events - len(done))
        except KeyboardInterrupt:
            pass
        finally:
            self.stop()
        return done
