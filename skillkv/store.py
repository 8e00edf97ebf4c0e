"""The L2 store: snapshot files on disk, one folder per model fingerprint.

    <root>/<model-tag>/index.json                 key -> entry (skill, content hash, parent, tokens, bytes, ...)
    <root>/<model-tag>/snapshots/<skill>-<key>.safetensors
    <root>/<model-tag>/.lock                      file lock for index updates

A snapshot key is derived from (fingerprint, parent key, content hash): the key of a chain names the exact
ordered prefix it continues, like nano-vllm's chained block hashes. Files describe themselves, so the index is
only a cache: a missing or corrupted index is rebuilt from the file headers. Index updates happen under the
lock and are written atomically; snapshot files are written atomically before they are indexed, so two
processes compiling into one store never corrupt it (the last rename wins, and both wrote the same bytes).

Untrusted index (DESIGN §3): the store never touches a path outside itself. Every index entry is validated when
the index is read -- its file name must be exactly `path_for(key, skill)`'s, its fields of the right types --
and one bad entry makes the whole index be rebuilt from the snapshot files (whose own names must match their
headers). Removal unlinks only a plain file directly inside `snapshots/`: a path resolving elsewhere, or a
symbolic link, is never unlinked (the entry is dropped). A symlinked snapshot is never read (`get` refuses it).

Temporary files carry their writer's pid (`.tmp-<pid>-<random>.safetensors`, `.index-<pid>-<random>.tmp`); every write
under the lock removes those whose writer is dead (or, pid unknown, that are over an hour old).

Permissions: every file the store writes (snapshots, index.json) is created with mode 0666 less the process's umask,
like any file (0644 under the usual umask 022); folders likewise (0777 less the umask). A store shared by several
users needs a shared group and a umask that grants it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from skillkv.atomic import write_atomic
from skillkv.errors import SnapshotError, StoreError
from skillkv.snapshot import Snapshot, read_header, read_snapshot, write_snapshot
from skillkv.validate import name_problem

TEMP_MAX_AGE = 3600  # seconds: a temp file whose writer cannot be told dead is removed after this


def snapshot_key(fingerprint: str, parent: str, content_hash: str) -> str:
    """Key of the snapshot of one skill segment following the prefix `parent` ('' = right after the preamble)."""
    return hashlib.sha256(f"{fingerprint}|{parent}|{content_hash}".encode()).hexdigest()[:32]


@dataclass
class Entry:
    key: str
    file: str
    skill: str
    content_hash: str
    parent: str
    start: int
    tokens: int
    bytes: int
    compression: str
    created: float
    last_used: float

    @classmethod
    def from_dict(cls, d: dict) -> Entry:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def problem(self, key: str) -> str | None:
        """Why this entry (stored under `key`) cannot be trusted, or None: the file name must be exactly the one
        its key and skill derive, every field of its type."""
        strs = (self.key, self.file, self.skill, self.content_hash, self.parent, self.compression)
        if not all(isinstance(x, str) for x in strs):
            return "a field is not a string"
        if not all(type(x) is int for x in (self.start, self.tokens, self.bytes)) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in (self.created, self.last_used)):
            return "a field is not a number"
        if not valid_key(key) or self.key != key or name_problem(self.skill):
            return "bad key or skill name"
        if self.file != snapshot_file(key, self.skill):
            return f"file {self.file!r} is not the one its key names"
        return None


def valid_key(key) -> bool:
    """A key is ASCII letters and digits (snapshot_key's are 32 hex digits): nothing a path could be made of."""
    return isinstance(key, str) and 0 < len(key) <= 64 and key.isascii() and key.isalnum()


def snapshot_file(key: str, skill: str) -> str:
    """The one file name a snapshot of `skill` under `key` may have."""
    return f"{skill}-{key}.safetensors"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


class Store:
    """Snapshots of one model (`tag`, `fingerprint`) under `root`."""

    def __init__(self, root: Path | str, tag: str, fingerprint: str):
        self.root = Path(root)
        self.dir = self.root / tag
        self.snap_dir = self.dir / "snapshots"
        self.fingerprint = fingerprint
        self._index: dict[str, Entry] | None = None

    # ------------------------------------------------------------------ basics

    def ensure_writable(self) -> None:
        """Create the folders and prove a file can be written there; StoreError (one line) otherwise."""
        try:
            self.snap_dir.mkdir(parents=True, exist_ok=True)
            probe = self.dir / f".probe-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise StoreError(f"store {self.root} is not writable ({e.strerror or e})") from None

    def _lock(self) -> FileLock:
        self.dir.mkdir(parents=True, exist_ok=True)
        return FileLock(str(self.dir / ".lock"), timeout=60)

    def path_for(self, key: str, skill: str) -> Path:
        return self.snap_dir / snapshot_file(key, skill)

    def _own_file(self, name: str) -> Path | None:
        """snapshots/<name> if it is a plain file (not a link) directly inside the snapshot folder, else None."""
        p = self.snap_dir / name
        if "/" in name or "\\" in name or name in ("", ".", "..") or p.is_symlink() or not p.is_file():
            return None
        try:
            return p if p.resolve().parent == self.snap_dir.resolve() else None
        except OSError:
            return None

    # ------------------------------------------------------------------ index

    def _read_index(self) -> dict[str, Entry]:
        """The index, every entry validated (`Entry.problem`); rebuilt from the files if any entry is bad."""
        try:
            raw = json.loads((self.dir / "index.json").read_text())
            index = {k: Entry.from_dict(v) for k, v in raw["entries"].items()}
            if any(e.problem(k) for k, e in index.items()):
                return self._rebuild()
            return index
        except FileNotFoundError:
            return self._rebuild() if self.snap_dir.is_dir() else {}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return self._rebuild()

    def _rebuild(self) -> dict[str, Entry]:
        """Rebuild the index from the self-describing snapshot files (skips unreadable ones)."""
        out = {}
        for p in sorted(self.snap_dir.glob("*.safetensors")) if self.snap_dir.is_dir() else []:
            if p.name.startswith(".") or self._own_file(p.name) is None:
                continue  # a temporary file of a write that never finished, or a link
            try:
                m = read_header(p)
                if m.get("fingerprint") != self.fingerprint:
                    continue
                st = p.stat()
                e = Entry(key=m["key"], file=p.name, skill=m["skill"], content_hash=m["content_hash"],
                          parent=m.get("parent", ""), start=int(m["start"]), tokens=int(m["tokens"]),
                          bytes=st.st_size, compression=m["compression"], created=float(m["created"]),
                          last_used=st.st_mtime)
                if e.problem(e.key) is None:
                    out[e.key] = e
            except (SnapshotError, KeyError, ValueError, TypeError, OSError, OverflowError):
                continue
        return out

    def _write_index(self, index: dict[str, Entry]) -> None:
        data = {"fingerprint": self.fingerprint, "entries": {k: vars(e) for k, e in index.items()}}
        write_atomic(self.dir / "index.json", json.dumps(data, indent=1).encode(), ".index-", ".tmp")

    def _clean_temps(self, max_age: float = TEMP_MAX_AGE) -> int:
        """Remove temp files of dead writers (pid in the name), or pid unknown, older than `max_age`. Call under
        the lock. Returns how many were removed."""
        removed, now = 0, time.time()
        cands = list(self.snap_dir.glob(".tmp-*")) if self.snap_dir.is_dir() else []
        cands += list(self.dir.glob(".index-*.tmp")) + list(self.dir.glob(".probe-*"))
        for p in cands:
            head = p.name.split("-")[1] if p.name.count("-") >= 1 else ""
            head = head.split(".")[0]
            try:
                pid = int(head)
            except ValueError:
                pid = None
            if pid == os.getpid():
                continue
            with contextlib.suppress(OSError):
                if p.is_symlink() or not p.is_file() or p.resolve().parent not in (self.snap_dir.resolve(),
                                                                                 self.dir.resolve()):
                    continue
                if (pid is not None and not _pid_alive(pid)) or now - p.stat().st_mtime > max_age:
                    p.unlink()
                    removed += 1
        return removed

    def _update(self, fn) -> None:
        try:
            with self._lock():
                self._clean_temps()
                index = self._read_index()
                fn(index)
                self._write_index(index)
                self._index = index
        except Timeout:
            raise StoreError(f"store {self.dir} is locked by another process (waited 60 s)") from None
        except OSError as e:
            raise StoreError(f"cannot update the store index in {self.dir} ({e.strerror or e})") from None

    def entries(self) -> dict[str, Entry]:
        if self._index is None:
            self._index = self._read_index()
        return self._index

    # ------------------------------------------------------------------ snapshots

    def contains(self, key: str) -> bool:
        e = self.entries().get(key)
        return e is not None and self._own_file(e.file) is not None

    def file_path(self, key: str) -> Path:
        """The snapshot file of `key`: a plain file inside the snapshot folder. Raises SnapshotError otherwise
        (not indexed, missing, a link)."""
        e = self.entries().get(key)
        if e is None:
            raise SnapshotError(f"snapshot {key[:12]} is not in the store")
        p = self._own_file(e.file)
        if p is None:
            raise SnapshotError(f"{e.file}: missing, or a link (never read)")
        return p

    def put(self, snap: Snapshot, compression: str = "none") -> Entry:
        """Write a snapshot atomically and index it. Raises StoreError if the store cannot be written."""
        path = self.path_for(snap.key, snap.skill)
        try:
            self.snap_dir.mkdir(parents=True, exist_ok=True)
            nbytes = write_snapshot(path, snap, compression)
        except OSError as e:
            raise StoreError(f"cannot write snapshot to {self.snap_dir} ({e.strerror or e})") from None
        now = time.time()
        entry = Entry(key=snap.key, file=path.name, skill=snap.skill, content_hash=snap.content_hash,
                      parent=snap.parent, start=snap.start, tokens=snap.n_tokens, bytes=nbytes,
                      compression=compression, created=now, last_used=now)
        self._update(lambda index: index.__setitem__(snap.key, entry))
        return entry

    def get(self, key: str, token_ids: list[int] | None = None) -> Snapshot:
        """Read and verify the snapshot `key`. Raises SnapshotError if missing, corrupted, foreign or stale."""
        snap = read_snapshot(self.file_path(key), fingerprint=self.fingerprint, key=key, token_ids=token_ids)
        self.touch(key)
        return snap

    def touch(self, key: str, path: Path | None = None) -> None:
        """Record a use of `key` (file mtime), for LRU without rewriting the index per read. `path`: its file as
        `file_path(key)` just returned it (saves looking it up again)."""
        if path is None:
            e = self.entries().get(key)
            path = self._own_file(e.file) if e is not None else None
        if path is not None:
            with contextlib.suppress(OSError):
                os.utime(path)

    def header_matches(self, key: str, content_hash: str, tokens: int) -> bool:
        """Cheap currency check (header only, no tensor read): fingerprint, key, content hash, token count.
        The full verification (checksums, token ids) still happens on every load."""
        e = self.entries().get(key)
        p = self._own_file(e.file) if e else None
        try:
            m = read_header(p) if p else None
        except SnapshotError:
            return False
        return bool(m) and (m.get("fingerprint"), m.get("key"), m.get("content_hash"), m.get("tokens")) == (
            self.fingerprint, key, content_hash, str(tokens))

    def remove(self, keys: list[str]) -> int:
        """Delete snapshots by key; return bytes freed. Only a plain file directly inside the snapshot folder is
        ever unlinked (a link or a path resolving elsewhere is not: its entry is dropped)."""
        freed = 0

        def drop(index):
            nonlocal freed
            for k in keys:
                e = index.pop(k, None)
                p = self._own_file(e.file) if e is not None and e.problem(k) is None else None
                if p is not None:
                    with contextlib.suppress(OSError):
                        p.unlink()
                        freed += e.bytes
        self._update(drop)
        return freed

    def last_used(self, e: Entry) -> float:
        try:
            return self.path_for(e.key, e.skill).stat().st_mtime
        except OSError:
            return e.last_used

    def size_bytes(self) -> int:
        return sum(e.bytes for e in self.entries().values())

    def gc(self, live_keys: set[str], max_bytes: int | None = None) -> tuple[list[Entry], int]:
        """Remove snapshots not in `live_keys` (stale), stray temp files, and then least-recently-used
        snapshots until the store is under `max_bytes`. Returns (removed entries, bytes freed)."""
        entries = self.entries()
        doomed = [e for k, e in entries.items() if k not in live_keys or self._own_file(e.file) is None]
        if max_bytes is not None:
            alive = sorted((e for e in entries.values() if e not in doomed), key=self.last_used)
            total = sum(e.bytes for e in alive)
            while alive and total > max_bytes:
                e = alive.pop(0)
                doomed.append(e)
                total -= e.bytes
        indexed = {e.file for e in entries.values()}
        with contextlib.suppress(Timeout, OSError), self._lock():
            self._clean_temps()
        for p in [p for p in self.snap_dir.glob("*.safetensors") if p.name not in indexed]:
            with contextlib.suppress(OSError):
                if self._own_file(p.name) is None or time.time() - p.stat().st_mtime < TEMP_MAX_AGE:
                    continue  # a link, or maybe another process's write in flight, not yet indexed
                p.unlink()
        freed = self.remove([e.key for e in doomed])
        return doomed, freed
