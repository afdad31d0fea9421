"""BatchScheduler: what goes into each batch. Pure policy: no tensors, no I/O, O(1) memory per image.

Every sample is a pure function of (run spec, global index i):
- class: `i % C` (class-balanced: each class gets `N // C` images, the first `N % C` classes one more;
  TCKR's "N // C per class + remainder round-robin");
- prompt: the k-th image of class c (k = i // C) takes prompt `perm_c[k % n_c]` of that class's prompts, where
  `perm_c` is a seeded permutation: captions are cycled, each reused ~equally (as TCKR cycles them per class);
- seed: `sample_seed(run_seed, i)`, a splitmix64 hash, so noise never depends on batch layout or order.
Batches never cross a shard boundary and a shard's last batch is padded to the fixed batch size with copies
of its last job (dropped after sampling): a shard's batches are the same whatever else runs beside it, which
keeps shards byte-identical whether generated whole, resumed, or on another worker.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from tckr_engine.data.captions import Prompt

_MASK64 = (1 << 64) - 1


def sample_seed(run_seed: int, index: int) -> int:
    """Per-sample noise seed: splitmix64 of (run seed, global index), 63 bits."""
    z = (run_seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass(frozen=True)
class Job:
    """One image to generate."""

    index: int  # global sample index in the run
    shard: int
    slot: int  # position inside its shard; the sample key is f"{shard:06d}{slot:05d}"
    class_index: int
    prompt: Prompt
    seed: int

    @property
    def key(self) -> str:
        return f"{self.shard:06d}{self.slot:05d}"


@dataclass(frozen=True)
class Batch:
    """A fixed-size batch. `jobs[:n_real]` are real; the rest are padding (copies of the last real job)."""

    shard: int
    jobs: tuple[Job, ...]
    n_real: int
    last_in_shard: bool


class BatchScheduler:
    """Assigns classes, prompts and seeds to sample indices, and packs shards into fixed-shape batches."""

    def __init__(
        self,
        num_images: int,
        shard_size: int,
        batch_size: int,
        prompts: Sequence[Sequence[Prompt]],
        seed: int,
    ) -> None:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every class needs at least one prompt")
        self.num_images = num_images
        self.shard_size = shard_size
        # Never pad beyond what a shard can hold: 8 images with --batch-size 64 run as one batch of 8.
        self.batch_size = min(batch_size, shard_size, num_images)
        self.prompts = [list(p) for p in prompts]
        self.num_classes = len(prompts)
        self.seed = seed
        # One seeded permutation per class; memory is the prompt list's, never the image count's.
        self._perm = []
        for c, plist in enumerate(self.prompts):
            order = list(range(len(plist)))
            random.Random(sample_seed(seed, c) ^ 0x5EED).shuffle(order)
            self._perm.append(order)

    @property
    def num_shards(self) -> int:
        return -(-self.num_images // self.shard_size)

    def shard_count(self, shard: int) -> int:
        """Number of samples in `shard`."""
        self._check_shard(shard)
        return min(self.shard_size, self.num_images - shard * self.shard_size)

    def job(self, index: int) -> Job:
        if not 0 <= index < self.num_images:
            raise IndexError(f"sample index {index} outside [0, {self.num_images})")
        c = index % self.num_classes
        k = index // self.num_classes
        order = self._perm[c]
        prompt = self.prompts[c][order[k % len(order)]]
        shard, slot = divmod(index, self.shard_size)
        return Job(index, shard, slot, c, prompt, sample_seed(self.seed, index))

    def class_counts(self) -> list[int]:
        """Images per class over the whole run."""
        base, extra = divmod(self.num_images, self.num_classes)
        return [base + (1 if c < extra else 0) for c in range(self.num_classes)]

    def schedule(self, shard_ids: Iterable[int]) -> Iterator[Batch]:
        """Yield the batches of the given shards, in order; a padded batch closes each shard."""
        for shard in shard_ids:
            start = shard * self.shard_size
            count = self.shard_count(shard)
            for lo in range(0, count, self.batch_size):
                n = min(self.batch_size, count - lo)
                jobs = [self.job(start + lo + j) for j in range(n)]
                jobs += [jobs[-1]] * (self.batch_size - n)
                yield Batch(shard, tuple(jobs), n, lo + n == count)

    def _check_shard(self, shard: int) -> None:
        if not 0 <= shard < self.num_shards:
            raise IndexError(f"shard {shard} outside [0, {self.num_shards})")
