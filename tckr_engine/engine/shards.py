"""The shard folder contract (DESIGN.md "Data contract"): sample encoding, tar layout, commit protocol,
stats files, index and verification.

OUT/run.json, OUT/shards/NNNNNN.tar, OUT/shards/NNNNNN_stats.json (written last), OUT/index.json.
A tar is written to `.NNNNNN.tar.tmp`, flushed and fsynced, then renamed; the stats file follows the same
way. A shard is complete iff its stats file parses and agrees with the tar (size and sha256).
Tar members have fixed mtime/owner/mode, so a shard's bytes are a pure function of its samples.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write, write_json

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


def commit_shard(out: Path, shard: int, data: bytes, count: int, seconds: float) -> ShardStats:
    """Commit protocol: tar first (tmp + fsync + rename), then its stats file, the commit marker."""
    folder = out / SHARD_DIR
    stats = ShardStats(shard, count, len(data), hashlib.sha256(data).hexdigest(), seconds)
    (folder / stats_name(shard)).unlink(missing_ok=True)  # a stale marker must never vouch for a new tar
    atomic_write(folder / tar_name(shard), data)
    write_json(folder / stats_name(shard), stats.to_json())
    return stats


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_stats(out: Path, shard: int) -> dict[str, Any] | None:
    try:
        stats = json.loads((out / SHARD_DIR / stats_name(shard)).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return stats if isinstance(stats, dict) else None


def shard_problem(out: Path, shard: int, expected_count: int | None = None, deep: bool = False) -> str | None:
    """None when the shard is committed and agrees with its stats; else what is wrong, in words.

    `deep` also opens the tar and decodes every sample (what `verify` does).
    """
    tar = out / SHARD_DIR / tar_name(shard)
    stats = read_stats(out, shard)
    if stats is None:
        return "missing" if not tar.exists() else "no valid stats file (not committed)"
    if not tar.is_file():
        return "stats file present but the tar is missing"
    if tar.stat().st_size != stats.get("bytes"):
        return f"size {tar.stat().st_size} disagrees with stats ({stats.get('bytes')} bytes)"
    if file_sha256(tar) != stats.get("sha256"):
        return "sha256 disagrees with stats (corrupt or modified)"
    if expected_count is not None and stats.get("count") != expected_count:
        return f"holds {stats.get('count')} samples, the run expects {expected_count}"
    if deep:
        return _deep_check(tar, shard, int(stats.get("count", -1)))
    return None


def _deep_check(tar_path: Path, shard: int, count: int) -> str | None:
    """Open the tar, group members by key, decode every file."""
    from PIL import Image

    samples: dict[str, set[str]] = {}
    try:
        with tarfile.open(tar_path) as tar:
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


def write_index(out: Path, num_shards: int) -> dict[str, Any]:
    """wids-style index of all committed shards."""
    shardlist = []
    for shard in range(num_shards):
        stats = read_stats(out, shard)
        if stats is None:
            raise TckrError(f"cannot write the index: shard {shard} is not committed")
        shardlist.append({"url": f"{SHARD_DIR}/{tar_name(shard)}", "nsamples": stats["count"]})
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "shardlist": shardlist}
    write_json(out / INDEX_FILE, index)
    return index


def remove_temp_files(out: Path) -> None:
    """Remove leftovers of a crashed run (hidden .tmp files); they are never mistaken for shards."""
    for folder in (out, out / SHARD_DIR):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)
