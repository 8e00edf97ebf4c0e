"""The L2 store: snapshot files on disk, one folder per model fingerprint.

    <root>/<model-tag>/index.json                 key -> entry (skill, content hash, parent, tokens, bytes, ...)
    <root>/<model-tag>/snapshots/<skill>-<key>.safetensors
    <root>/<model-tag>/.lock                      file lock for index updates

A snapshot key is derived from (fingerprint, parent key, content hash): the key of a chain names the exact
ordered prefix it continues, like nano-vllm's chained block hashes. Files describe themselves, so the index is
only a cache: a missing or corrupted index is rebuilt from the file headers. Index updates happen under the
lock and are written atomically; snapshot files are written atomically before they are indexed, so two
processes compiling into one store never corrupt it (the last rename wins, and both wrote the same bytes).
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

from skillkv.errors import SnapshotError, StoreError
from skillkv.snapshot import Snapshot, read_header, read_snapshot, write_snapshot


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
        return self.snap_dir / f"{skill}-{key}.safetensors"

    # ------------------------------------------------------------------ index

    def _read_index(self) -> dict[str, Entry]:
        try:
            raw = json.loads((self.dir / "index.json").read_text())
            return {k: Entry.from_dict(v) for k, v in raw["entries"].items()}
        except FileNotFoundError:
            return self._rebuild() if self.snap_dir.is_dir() else {}
        except (OSError, ValueError, KeyError, TypeError):
            return self._rebuild()

    def _rebuild(self) -> dict[str, Entry]:
        """Rebuild the index from the self-describing snapshot files (skips unreadable ones)."""
        out = {}
        for p in sorted(self.snap_dir.glob("*.safetensors")) if self.snap_dir.is_dir() else []:
            if p.name.startswith("."):
                continue  # a temporary file of a write that never finished
            try:
                m = read_header(p)
                if m.get("fingerprint") != self.fingerprint:
                    continue
                st = p.stat()
                out[m["key"]] = Entry(key=m["key"], file=p.name, skill=m["skill"], content_hash=m["content_hash"],
                                      parent=m.get("parent", ""), start=int(m["start"]), tokens=int(m["tokens"]),
                                      bytes=st.st_size, compression=m["compression"],
                                      created=float(m["created"]), last_used=st.st_mtime)
            except (SnapshotError, KeyError, ValueError, OSError):
                continue
        return out

    def _write_index(self, index: dict[str, Entry]) -> None:
        data = {"fingerprint": self.fingerprint, "entries": {k: vars(e) for k, e in index.items()}}
        tmp = self.dir / f".index-{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, self.dir / "index.json")

    def _update(self, fn) -> None:
        try:
            with self._lock():
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
        return e is not None and (self.snap_dir / e.file).is_file()

    def file_path(self, key: str) -> Path:
        """The file of the indexed snapshot `key` (to read it with other readers, e.g. the tiers' L2 reader).
        Raises SnapshotError if it is not indexed."""
        e = self.entries().get(key)
        if e is None:
            raise SnapshotError(f"snapshot {key[:12]} is not in the store")
        return self.snap_dir / e.file

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
        e = self.entries().get(key)
        if e is None:
            raise SnapshotError(f"snapshot {key[:12]} is not in the store")
        snap = read_snapshot(self.snap_dir / e.file, fingerprint=self.fingerprint, key=key, token_ids=token_ids)
        self.touch(key)
        return snap

    def touch(self, key: str) -> None:
        """Record a use of `key` (file mtime), for LRU without rewriting the index per read."""
        e = self.entries().get(key)
        if e is not None:
            with contextlib.suppress(OSError):
                os.utime(self.snap_dir / e.file)

    def header_matches(self, key: str, content_hash: str, tokens: int) -> bool:
        """Cheap currency check (header only, no tensor read): fingerprint, key, content hash, token count.
        The full verification (checksums, token ids) still happens on every load."""
        e = self.entries().get(key)
        try:
            m = read_header(self.snap_dir / e.file) if e else None
        except SnapshotError:
            return False
        return bool(m) and (m.get("fingerprint"), m.get("key"), m.get("content_hash"), m.get("tokens")) == (
            self.fingerprint, key, content_hash, str(tokens))

    def remove(self, keys: list[str]) -> int:
        """Delete snapshots by key; return bytes freed."""
        freed = 0

        def drop(index):
            nonlocal freed
            for k in keys:
                e = index.pop(k, None)
                if e is not None:
                    with contextlib.suppress(OSError):
                        (self.snap_dir / e.file).unlink()
                        freed += e.bytes
        self._update(drop)
        return freed

    def last_used(self, e: Entry) -> float:
        try:
            return (self.snap_dir / e.file).stat().st_mtime
        except OSError:
            return e.last_used

    def size_bytes(self) -> int:
        return sum(e.bytes for e in self.entries().values())

    def gc(self, live_keys: set[str], max_bytes: int | None = None) -> tuple[list[Entry], int]:
        """Remove snapshots not in `live_keys` (stale), stray temp files, and then least-recently-used
        snapshots until the store is under `max_bytes`. Returns (removed entries, bytes freed)."""
        entries = self.entries()
        doomed = [e for k, e in entries.items() if k not in live_keys or not (self.snap_dir / e.file).is_file()]
        if max_bytes is not None:
            alive = sorted((e for e in entries.values() if e not in doomed), key=self.last_used)
            total = sum(e.bytes for e in alive)
            while alive and total > max_bytes:
                e = alive.pop(0)
                doomed.append(e)
                total -= e.bytes
        indexed = {e.file for e in entries.values()}
        for p in list(self.snap_dir.glob(".tmp-*")) + [p for p in self.snap_dir.glob("*.safetensors")
                                                      if p.name not in indexed]:
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime < 3600:
                    continue  # may be another process's write in flight, not yet indexed
                p.unlink()
        freed = self.remove([e.key for e in doomed])
        return doomed, freed
