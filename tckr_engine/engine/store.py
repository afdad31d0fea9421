"""Where a shard folder lives: a local folder or any fsspec URL (`file://`, `memory://`, `s3://`, ...).

Every file of the folder contract goes through a `Store`, so `generate`, `verify`, resume and the Ray and
rank-strided modes work the same on any file system. Writes follow one of two commit protocols:

- rename stores (local folders, `file://`, `memory://`): the bytes go to a hidden, uniquely named
  `.NAME.<random>.tmp` beside the target, are flushed (and fsynced on a local disk), then renamed over NAME;
  a reader sees the old file or the whole new one. Unique temp names matter: two writers of the same file (a
  re-issued straggler, two ranks writing the index) never write into each other's temp file.
- other stores (object stores, where "rename" is a copy): the object is written under its final name in one
  PUT, which object stores make visible whole or not at all.

Either way the shard's stats file is written last and is the commit marker (shards.py): a tar without a
valid stats file that agrees with it is never taken as committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import posixpath
import uuid
from pathlib import Path
from typing import IO, Any

from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_replace

# Protocols whose rename is a real rename (atomic on a local disk; process-local and instant in memory).
RENAME_PROTOCOLS = frozenset({"file", "local", "memory"})
TMP_SUFFIX = ".tmp"


def is_url(location: str | Path) -> bool:
    return isinstance(location, str) and "://" in location


class Store:
    """A folder on a file system; paths given to its methods are relative to the folder ("shards/x.tar").

    `rename=None` picks the commit protocol from the URL's protocol (see the module docstring); tests and
    callers may force the copy-then-stats protocol with `rename=False`.
    """

    def __init__(self, location: str | Path, rename: bool | None = None) -> None:
        import fsspec

        if is_url(location):
            scheme = str(location).split("://", 1)[0]
            try:
                self.fs, self.root = fsspec.core.url_to_fs(str(location))
            except ImportError as e:  # a known protocol whose package is not installed (s3fs, gcsfs, ...)
                raise TckrError(f"{location}: {e}".splitlines()[0]) from None
            except ValueError as e:  # "Protocol not known: ..."
                raise TckrError(
                    f"{location}: unknown storage protocol {scheme!r} ({e}); use a local folder or an "
                    "fsspec URL such as file://, memory:// or s3://"
                ) from None
        else:
            from fsspec.implementations.local import LocalFileSystem

            self.fs, self.root = LocalFileSystem(), str(Path(location).expanduser().absolute())
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.is_local = "file" in protocols
        self.rename = bool(RENAME_PROTOCOLS & set(protocols)) if rename is None else rename
        self.root = self.root.rstrip("/") or "/"
        # What the user sees in messages and what a Ray worker rebuilds the store from.
        self.url = self.root if self.is_local else self.fs.unstrip_protocol(self.root)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Store({self.url!r}, rename={self.rename})"

    @property
    def local_path(self) -> Path | None:
        """The folder as a `Path` when it is on the local disk, else None."""
        return Path(self.root) if self.is_local else None

    def path(self, rel: str = "") -> str:
        return posixpath.join(self.root, rel) if rel else self.root

    # --- reading -------------------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def is_dir(self, rel: str = "") -> bool:
        return self.fs.isdir(self.path(rel))

    def is_file(self, rel: str) -> bool:
        return self.fs.isfile(self.path(rel))

    def size(self, rel: str) -> int | None:
        """Size in bytes, None when the file is missing."""
        try:
            return int(self.fs.size(self.path(rel)))
        except (FileNotFoundError, OSError):
            return None

    def listdir(self, rel: str = "") -> list[str]:
        """Names (not paths) of the entries of a folder; empty when it does not exist."""
        try:
            return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(self.path(rel), detail=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def open(self, rel: str, mode: str = "rb") -> IO[bytes]:
        return self.fs.open(self.path(rel), mode)

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def sha256(self, rel: str) -> str:
        """sha256 of a file, streamed (a shard is never held whole in memory for this)."""
        h = hashlib.sha256()
        with self.open(rel) as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        return h.hexdigest()

    # --- writing -------------------------------------------------------------------------------------

    def makedirs(self, rel: str = "") -> None:
        self.fs.makedirs(self.path(rel), exist_ok=True)

    def write(self, rel: str, data: bytes) -> None:
        """Commit `data` under `rel`: temp + rename where the store can rename, one PUT where it cannot."""
        target = self.path(rel)
        if not self.rename:
            self.fs.pipe_file(target, data)
            return
        head, name = posixpath.split(target)
        tmp = posixpath.join(head, f".{name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}")
        if self.is_local:
            atomic_replace(Path(tmp), Path(target), data)
            return
        try:
            self.fs.pipe_file(tmp, data)
            self.fs.mv(tmp, target)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm_file(tmp)

    def write_json(self, rel: str, obj: Any) -> None:
        self.write(rel, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())

    def remove(self, rel: str) -> None:
        """Delete a file; a missing one is fine."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.path(rel))

    def remove_tree(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)


def open_store(location: Store | str | Path) -> Store:
    """A Store for a local path, a `file://`, `memory://`, `s3://`... URL, or a Store (returned as is)."""
    return location if isinstance(location, Store) else Store(location)


def is_temp_name(name: str) -> bool:
    return name.startswith(".") and name.endswith(TMP_SUFFIX)
