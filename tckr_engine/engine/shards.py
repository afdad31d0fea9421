"""The shard folder contract (DESIGN.md "Data contract"): sample encoding, tar layout, commit protocol,
stats files, index and verification.

OUT/run.json, OUT/shards/NNNNNN.tar, OUT/shards/NNNNNN_stats.json (written last), OUT/index.json.
OUT is a local folder or any fsspec URL (store.py): a tar is written to a hidden `.NNNNNN.tar.<random>.tmp`,
flushed (fsynced on disk), then renamed, or put whole where the store cannot rename; the stats file follows
the same way. A shard is complete iff its stats file parses and agrees with the tar (size and sha256).
Tar members have fixed mtime/owner/mode, so a shard's bytes are a pure function of its samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tckr_engine.engine.store import Store, is_temp_name, open_store
from tckr_engine.errors import TckrError

Location = Store | str | Path  # a shard folder: local path, fsspec URL or Store

RUN_FILE = "run.json"
INDEX_FILE = "index.json"
SHARD_DIR = "shards"
TAR_MTIME = 0  # fixed: shards must not depend on the wall clock
EXTENSIONS = {"png": "png", "jpg": "jpg", "webp": "webp"}
# The members of one sample, in tar order (logits.npy only with a teacher).
SAMPLE_PARTS = ("image", "cls", "txt", "json", "logits.npy")


def tar_name(shard: int) -> str:
    return f"{shard:06d}.tar"


def stats_name(shard: int) -> str:
    return f"{shard:06d}_stats.json"


def encode_image(image: np.ndarray, fmt: str, quality: int) -> bytes:
    """uint8 (H, W, C) -> encoded bytes. Deterministic for a given Pillow build."""
    from PIL import Image

    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    pil = Image.fromarray(arr)
    if fmt == "png":
        pil.save(buf, format="PNG", compress_level=6)
    elif fmt == "jpg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        pil.save(buf, format="WEBP", quality=quality, method=4)
    else:
        raise TckrError(f"unknown image format {fmt!r}; choose png, jpg or webp")
    return buf.getvalue()


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def encode_sample(
    key: str,
    image: np.ndarray,
    fmt: str,
    quality: int,
    cls: int,
    prompt: str,
    meta: dict[str, Any],
    logits: np.ndarray | None,
) -> list[tuple[str, bytes]]:
    """The (member name, bytes) pairs of one sample, in tar order. Keys never contain dots."""
    files = [
        (f"{key}.{EXTENSIONS[fmt]}", encode_image(image, fmt, quality)),
        (f"{key}.cls", str(int(cls)).encode()),
        (f"{key}.txt", prompt.encode("utf-8")),
        (f"{key}.json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")),
    ]
    if logits is not None:
        files.append((f"{key}.logits.npy", encode_npy(logits.astype(np.float16))))
    return files


def tar_bytes(members: Iterable[tuple[str, bytes]]) -> bytes:
    """A deterministic ustar archive of the members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mtime = TAR_MTIME
            info.mode = 0o444
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@dataclass(frozen=True)
class ShardStats:
    shard: int
    count: int
    bytes: int
    sha256: str
    seconds: float
    failures: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "url": f"{SHARD_DIR}/{tar_name(self.shard)}",
            "count": self.count,
            "bytes": self.bytes,
            "sha256": self.sha256,
            "seconds": round(self.seconds, 3),
            "failures": self.failures,
        }


def tar_path(shard: int) -> str:
    """The tar's path relative to the shard folder (what index.json lists)."""
    return f"{SHARD_DIR}/{tar_name(shard)}"


def stats_path(shard: int) -> str:
    return f"{SHARD_DIR}/{stats_name(shard)}"


def commit_shard(out: Location, shard: int, data: bytes, count: int, seconds: float) -> ShardStats:
    """Commit protocol: tar first (temp + rename, or one PUT), then its stats file, the commit marker.

    Committing bytes that are already committed (a re-issued straggler finishing second, two ranks given
    the same shard) leaves the folder untouched, so a second writer never un-commits the first one's shard.
    """
    store = open_store(out)
    stats = ShardStats(shard, count, len(data), hashlib.sha256(data).hexdigest(), seconds)
    previous = read_stats(store, shard)
    if (
        previous is not None
        and previous.get("sha256") == stats.sha256
        and store.size(tar_path(shard)) == stats.bytes
        and store.sha256(tar_path(shard)) == stats.sha256
    ):
        return stats
    store.remove(stats_path(shard))  # a stale marker must never vouch for a new tar
    store.write(tar_path(shard), data)
    store.write_json(stats_path(shard), stats.to_json())
    return stats


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_stats(out: Location, shard: int) -> dict[str, Any] | None:
    store = open_store(out)
    try:
        stats = store.read_json(stats_path(shard))
    except (OSError, ValueError):  # missing, unreadable, or not JSON
        return None
    return stats if isinstance(stats, dict) else None


def shard_problem(
    out: Location, shard: int, expected_count: int | None = None, deep: bool = False
) -> str | None:
    """None when the shard is committed and agrees with its stats; else what is wrong, in words.

    `deep` also opens the tar and decodes every sample (what `verify` does).
    """
    store = open_store(out)
    tar = tar_path(shard)
    stats = read_stats(store, shard)
    size = store.size(tar)
    if stats is None:
        return "missing" if size is None else "no valid stats file (not committed)"
    if size is None:
        return "stats file present but the tar is missing"
    if size != stats.get("bytes"):
        return f"size {size} disagrees with stats ({stats.get('bytes')} bytes)"
    if store.sha256(tar) != stats.get("sha256"):
        return "sha256 disagrees with stats (corrupt or modified)"
    if expected_count is not None and stats.get("count") != expected_count:
        return f"holds {stats.get('count')} samples, the run expects {expected_count}"
    if deep:
        with store.open(tar) as f:
            return _deep_check(f, shard, int(stats.get("count", -1)))
    return None


def _deep_check(fileobj: Any, shard: int, count: int) -> str | None:
    """Read the tar, group members by key, decode every file."""
    from PIL import Image

    samples: dict[str, set[str]] = {}
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not key.startswith(f"{shard:06d}") or len(key) != 11:
                    return f"unexpected member {member.name!r}"
                data = tar.extractfile(member).read()
                if ext in EXTENSIONS.values():
                    Image.open(io.BytesIO(data)).load()
                elif ext == "cls":
                    int(data)
                elif ext == "json":
                    json.loads(data)
                elif ext == "logits.npy":
                    np.load(io.BytesIO(data), allow_pickle=False)
                samples.setdefault(key, set()).add(ext)
    except (tarfile.TarError, OSError, ValueError, SyntaxError) as e:
        return f"unreadable: {e}"
    if len(samples) != count:
        return f"holds {len(samples)} samples, stats say {count}"
    for key, exts in samples.items():
        if not {"cls", "txt", "json"} <= exts or not exts & set(EXTENSIONS.values()):
            return f"sample {key} is incomplete ({', '.join(sorted(exts))})"
    return None


def all_committed(out: Location, num_shards: int) -> bool:
    """Every shard has a stats file (cheap: no hashing; `verify` does the deep check)."""
    store = open_store(out)
    return all(read_stats(store, shard) is not None for shard in range(num_shards))


def write_index(out: Location, num_shards: int) -> dict[str, Any]:
    """wids-style index of all committed shards."""
    store = open_store(out)
    shardlist = []
    for shard in range(num_shards):
        stats = read_stats(store, shard)
        if stats is None:
            raise TckrError(f"cannot write the index: shard {shard} is not committed")
        shardlist.append({"url": tar_path(shard), "nsamples": stats["count"]})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shardlist}
    store.write_json(INDEX_FILE, index)
    return index


def temp_file_shard(name: str) -> int | None:
    """The shard a temp file belongs to (".000012.tar.<random>.tmp" -> 12), None for folder-level files."""
    digits = name[1:7]
    return int(digits) if len(name) > 7 and digits.isdigit() and name[7] in "._" else None


def remove_temp_files(out: Location, owns: Callable[[int], bool] | None = None) -> None:
    """Remove leftovers of a crashed run (hidden .tmp files); they are never mistaken for shards.

    `owns(shard)` limits the sweep to the temp files of one rank's shards (a rank must never delete a file
    another rank is writing); folder-level temp files are then left alone (harmless, hidden).
    """
    store = open_store(out)
    for folder in ("", SHARD_DIR):
        for name in store.listdir(folder):
            if not is_temp_name(name):
                continue
            shard = temp_file_shard(name) if folder else None
            if owns is None or (shard is not None and owns(shard)):
                store.remove(posixpath.join(folder, name) if folder else name)
