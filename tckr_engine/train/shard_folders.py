"""The student's shard folders: the checks that a folder is finished and sound, and regeneration rounds.

- `open_shard_folder(path)`: a finished shard folder (DESIGN.md data contract: run.json, index.json, committed
  shards whose stats files agree with the tars) as a `ShardFolder`; anything missing or corrupt is one
  `TckrError` naming the folder and the fix.
- `plan_rounds(...)`: which shard tars each regeneration round reads. Pure (no I/O beyond what the
  `ShardFolder` already holds), so the disjointness of pool rounds is checked without training.
- `round_generate_config` / `ensure_round`: an engine round generated in-process from the pool's recorded run.
The loader that streams the tars is `train/stream.py`.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from tckr_engine.config import GenerateConfig
from tckr_engine.engine.generate import read_run, shard_count
from tckr_engine.engine.shards import INDEX_FILE, SHARD_DIR, shard_problem, tar_name
from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)

REGEN_DIR = "regen"  # engine rounds are generated into OUT/regen/round-XXX/


@dataclass(frozen=True)
class ShardFolder:
    """A checked, finished shard folder: its run.json and the tars listed by its index, in index order."""

    path: Path
    run: dict[str, Any]
    urls: tuple[str, ...]  # absolute tar paths
    nsamples: tuple[int, ...]  # samples per tar

    @property
    def spec(self) -> dict[str, Any]:
        return self.run["spec"]

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.spec["classes"])

    @property
    def shard_size(self) -> int:
        return int(self.spec["shard_size"])


def open_shard_folder(path: str | Path) -> ShardFolder:
    """Read and check a shard folder: run.json, index.json and every listed shard against its stats file.

    The check is `shard_problem` (size and sha256 against the stats file, the commit marker), the same one
    `generate` uses to decide what to resume; `tckr-engine verify` additionally decodes every sample.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise TckrError(f"{folder} is a file, not a shard folder; pass the folder 'generate --shards' wrote")
    if not folder.is_dir():
        raise TckrError(f"shard folder not found: {folder}; write one with 'tckr-engine generate --shards'")
    run = read_run(folder)
    if run is None or "spec" not in run or "num_shards" not in run:
        raise TckrError(f"{folder} has no valid run.json; is it a folder written by 'tckr-engine generate'?")
    fix = (
        f"rerun 'tckr-engine generate' to finish or repair it ('tckr-engine verify {folder}' lists problems)"
    )
    try:
        listed = [
            (e["url"], int(e["nsamples"])) for e in json.loads((folder / INDEX_FILE).read_text())["shardlist"]
        ]
    except (OSError, ValueError, KeyError, TypeError):
        raise TckrError(f"{folder} has no valid {INDEX_FILE}: the folder is unfinished; {fix}") from None
    expected = [f"{SHARD_DIR}/{tar_name(s)}" for s in range(run["num_shards"])]
    if [url for url, _ in listed] != expected:
        raise TckrError(f"{folder / INDEX_FILE} does not list the run's {run['num_shards']} shards; {fix}")
    for shard, (url, count) in enumerate(listed):
        expected_count = shard_count(run["spec"], shard)
        problem = shard_problem(folder, shard, expected_count)
        if problem is None and count != expected_count:
            problem = f"the index says {count} samples, the run {expected_count}"
        if problem is not None:
            raise TckrError(f"shard {folder / url} is not usable ({problem}); {fix}")
    return ShardFolder(
        folder.resolve(),
        run,
        tuple(str(folder.resolve() / url) for url, _ in listed),
        tuple(count for _, count in listed),
    )


@dataclass(frozen=True)
class Round:
    """One regeneration round: the epochs that train on it and the shard tars they stream."""

    index: int
    epochs: tuple[int, ...]  # 1-based
    folder: Path  # the shard folder the tars belong to
    urls: tuple[str, ...]
    nsamples: tuple[int, ...]
    generated: bool  # True: an engine round the trainer generates into `folder` (absent until then)

    @property
    def images(self) -> int:
        return sum(self.nsamples)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.index,
            "epochs": list(self.epochs),
            "folder": str(self.folder),
            "generated": self.generated,
            "images": self.images,
            "shards": list(self.urls),
        }


def num_rounds(epochs: int, every: int) -> int:
    """Rounds training reads: epoch e (1-based) reads round (e - 1) // every; every = 0: one round."""
    return 1 if every == 0 else 1 + (epochs - 1) // every


def round_of_epoch(epoch: int, every: int) -> int:
    return 0 if every == 0 else (epoch - 1) // every


def plan_rounds(
    pool: ShardFolder,
    epochs: int,
    every: int,
    mode: str,
    images_per_round: int | None,
    regen_dir: Path,
) -> list[Round]:
    """The data of every round, chosen at shard granularity.

    Each round reads k whole shards, k = ceil(images_per_round / shard_size) (rounded up, so a round holds
    at least `images_per_round` images when the shards are full). With `images_per_round` unset, k is the
    whole folder when there is one round, else an equal share, floor(num_shards / rounds).
    - mode "pool": round r reads the pool's shards [r*k, (r+1)*k): rounds are disjoint. The pool must hold
      rounds * k shards, rounds = 1 + (epochs - 1) // every (REFERENCE §1.5 writes N x (1 + epochs // R),
      which also counts a round that would start after the last epoch when R divides epochs).
    - mode "engine": round 0 reads the pool's first k shards; round r >= 1 is a new folder
      `regen_dir/round-XXX` generated from the pool's recorded run with seed + r and as many images as
      round 0 holds (see `round_generate_config`).
    """
    rounds, size, have = num_rounds(epochs, every), pool.shard_size, len(pool.urls)
    if images_per_round is not None:
        k = math.ceil(images_per_round / size)
    elif rounds == 1 or mode == "engine":
        k = have
    else:
        k = max(1, have // rounds)
    need = rounds * k if mode == "pool" else k
    if need > have:
        asked = f"{images_per_round} images" if images_per_round is not None else "an equal share"
        raise TckrError(
            f"shard pool {pool.path} is too small: it holds {have} shard(s) of {size} images "
            f"({sum(pool.nsamples)} images), and {rounds} round(s) (1 + (epochs - 1) // regenerate_every) of "
            f"{k} shard(s) each ({asked}, rounded up to whole shards) need {need}; "
            f"generate a pool of at least {need * size} images, or lower images_per_round or epochs"
        )
    epochs_of = [
        tuple(e for e in range(1, epochs + 1) if round_of_epoch(e, every) == r) for r in range(rounds)
    ]
    plan = []
    for r in range(rounds):
        if mode == "pool" or r == 0:
            lo, hi = r * k if mode == "pool" else 0, (r + 1) * k if mode == "pool" else k
            plan.append(Round(r, epochs_of[r], pool.path, pool.urls[lo:hi], pool.nsamples[lo:hi], False))
            continue
        folder = (regen_dir / f"round-{r:03d}").resolve()
        spec = {"shard_size": size, "num_images": plan[0].images}
        shards = range(math.ceil(plan[0].images / size))
        urls = tuple(str(folder / SHARD_DIR / tar_name(s)) for s in shards)
        plan.append(Round(r, epochs_of[r], folder, urls, tuple(shard_count(spec, s) for s in shards), True))
    return plan


def round_generate_config(pool: ShardFolder, round_index: int, num_images: int) -> GenerateConfig:
    """The GenerateConfig of an engine round: the pool's recorded run with seed + round and `num_images`.

    Device, dtype, attention and CPU threads are pinned to what the pool's spec resolved to, and the
    captions and teacher to the absolute paths it recorded, so a round is generated like the pool was.
    Per-sample noise seeds are splitmix64(seed, index), so seed + r shares no noise with seed.
    """
    recorded, spec = pool.run.get("config"), pool.spec
    if not isinstance(recorded, dict):
        raise TckrError(
            f"{pool.path}/run.json records no generate config, so new rounds cannot be generated from it; "
            "use regenerate = 'pool' or regenerate the folder with this version of tckr-engine"
        )
    known = {f.name for f in fields(GenerateConfig)} - {"extra"}
    values = {k: v for k, v in recorded.items() if k in known}
    values.update(
        num_images=num_images,
        seed=int(spec["seed"]) + round_index,
        threads=spec["threads"],
        device=spec["device"],
        dtype=spec["dtype"],
        attention=spec["attention"],
    )
    if spec["prompts"].get("source") == "captions":
        values["captions"] = spec["prompts"]["captions"]
    if spec.get("teacher"):
        values["teacher"] = spec["teacher"]["path"]
    return GenerateConfig(**values)


def ensure_round(rnd: Round, pool: ShardFolder) -> None:
    """Generate an engine round's folder in-process (resuming or reusing a finished one) and check it."""
    if not rnd.generated:
        return
    from tckr_engine.engine.generate import generate

    threads = torch.get_num_threads()
    log.info("round %d: generating %d images into %s", rnd.index, rnd.images, rnd.folder)
    with torch.random.fork_rng(devices=[]):  # generation must not move the training RNG
        generate(round_generate_config(pool, rnd.index, rnd.images), rnd.folder)
    torch.set_num_threads(threads)  # the engine pins the pool's CPU thread count; restore the trainer's
    got = open_shard_folder(rnd.folder)
    if (got.urls, got.nsamples, got.classes) != (rnd.urls, rnd.nsamples, pool.classes):
        raise TckrError(
            f"regenerated round {rnd.folder} does not hold the planned shards; rerun with --overwrite"
        )
