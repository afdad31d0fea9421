"""The writer pool: encodes images and commits shards off the denoising thread.

The engine hands over each finished batch as host arrays and goes straight back to sampling. Encoding
(PNG/JPEG/WebP, json, npy) runs on `workers` threads (Pillow and zlib release the GIL); a single commit
thread assembles a shard's tar once all its samples are encoded and runs the commit protocol. At most
`max_pending` batches wait at any time, so memory stays bounded when encoding is slower than sampling.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tckr_engine.engine.scheduler import Batch
from tckr_engine.engine.shards import Location, ShardStats, commit_shard, encode_sample, tar_bytes
from tckr_engine.engine.store import open_store

log = logging.getLogger(__name__)


@dataclass
class _ShardState:
    started: float
    parts: list[Future] = field(default_factory=list)


class ShardWriterPool:
    """Accepts batches (`submit`), writes committed shards; `close()` waits and returns their stats."""

    def __init__(
        self,
        out: Location,
        image_format: str,
        quality: int,
        workers: int = 2,
        max_pending: int = 8,
        on_commit: Callable[[ShardStats], None] | None = None,
    ) -> None:
        self.out = open_store(out)
        self.image_format = image_format
        self.quality = quality
        self.on_commit = on_commit
        self._encode = ThreadPoolExecutor(max(1, workers), thread_name_prefix="tckr-encode")
        self._commit = ThreadPoolExecutor(1, thread_name_prefix="tckr-commit")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._shards: dict[int, _ShardState] = {}
        self._commits: list[Future] = []

    def submit(
        self,
        batch: Batch,
        images: np.ndarray,
        metas: list[dict[str, Any]],
        logits: np.ndarray | None = None,
    ) -> None:
        """Queue the real samples of `batch`: images uint8 (B, H, W, C), logits (B, K) or None."""
        self._raise_failed()
        self._slots.acquire()  # back-pressure: blocks when encoding falls behind
        state = self._shards.setdefault(batch.shard, _ShardState(time.perf_counter()))
        future = self._encode.submit(self._encode_batch, batch, images, metas, logits)
        future.add_done_callback(lambda _: self._slots.release())
        state.parts.append(future)
        if batch.last_in_shard:
            del self._shards[batch.shard]
            self._commits.append(self._commit.submit(self._commit_shard, batch.shard, state))

    def _encode_batch(
        self, batch: Batch, images: np.ndarray, metas: list[dict[str, Any]], logits: np.ndarray | None
    ) -> list[tuple[str, bytes]]:
        members: list[tuple[str, bytes]] = []
        for i, job in enumerate(batch.jobs[: batch.n_real]):
            members += encode_sample(
                job.key,
                images[i],
                self.image_format,
                self.quality,
                job.class_index,
                job.prompt.text,
                metas[i],
                None if logits is None else logits[i],
            )
        return members

    def _commit_shard(self, shard: int, state: _ShardState) -> ShardStats:
        members: list[tuple[str, bytes]] = []
        for part in state.parts:
            members += part.result()
        count = sum(1 for name, _ in members if name.endswith(".cls"))
        stats = commit_shard(self.out, shard, tar_bytes(members), count, time.perf_counter() - state.started)
        log.debug("committed shard %06d: %d samples, %d bytes", shard, count, stats.bytes)
        if self.on_commit is not None:
            self.on_commit(stats)
        return stats

    def _raise_failed(self) -> None:
        for f in self._commits:
            if f.done() and f.exception() is not None:
                raise f.exception()

    def close(self) -> list[ShardStats]:
        """Wait for every queued shard; re-raise the first failure."""
        try:
            return [f.result() for f in self._commits]
        finally:
            self._encode.shutdown(wait=True, cancel_futures=True)
            self._commit.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        """Stop without committing what is still queued (nothing half-written becomes visible)."""
        self._encode.shutdown(wait=False, cancel_futures=True)
        self._commit.shutdown(wait=True, cancel_futures=True)
