"""A real dataset's training images as a shard folder, so the student trainer can read real data.

`write_real_shards("fashion-mnist", out, fraction=0.2)` writes what `generate` writes (run.json,
shards/NNNNNN.tar + stats, index.json; per sample png, cls = the real label, txt, json), with no
`logits.npy` (train with labels "online" or "hard", or with BSS, which labels online). Used by the
KD vs KD + BSS comparison (REFERENCE §4 trains on real CIFAR-10); there is no CLI command for it.

Validation hygiene: the student trainer picks its best epoch on `train_val_split(train labels,
val_fraction, seed)` of the real train split. The folder holds only the *training* side of that same split
(pass the student's `val_fraction` and `seed`), so no validation image is ever trained on; `fraction`
then keeps a seeded random subset of it (round(fraction · n) images, at least 1). Sample order in the
shards is that random order, so every shard is a mix of classes.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from tckr_engine import __version__
from tckr_engine.config import MAX_SHARD_SIZE, check_positive
from tckr_engine.data.datasets import load_dataset, resolve_dataset, train_val_split
from tckr_engine.engine.shards import RUN_FILE, SHARD_DIR, commit_shard, encode_sample, tar_bytes, write_index
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import write_json

log = logging.getLogger(__name__)

SUBSET_SALT = 0x5EA1  # the subset permutation's seed differs from the split's


def real_subset(
    dataset: str, fraction: float = 1.0, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, int]:
    """(indices into the real train split, size of its training side): the images `write_real_shards` keeps,
    in shard order."""
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction <= 1:
        raise TckrError(f"fraction must be in (0, 1], got {fraction!r}")
    full = load_dataset(dataset, "train")
    train_idx, _ = train_val_split(full.labels, val_fraction, seed=seed)
    order = np.random.default_rng([seed, SUBSET_SALT]).permutation(train_idx)
    keep = max(1, round(fraction * len(train_idx)))
    return order[:keep], len(train_idx)


def write_real_shards(
    dataset: str,
    out: str | Path,
    *,
    fraction: float = 1.0,
    val_fraction: float = 0.1,
    seed: int = 0,
    shard_size: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write `fraction` of `dataset`'s train split (minus the student's validation images) as a shard folder
    at `out`; returns its run.json. A finished folder with the same spec is kept as is (idempotent); one with
    another spec is refused unless `overwrite`."""
    check_positive("shard_size", shard_size, hi=MAX_SHARD_SIZE)
    name = resolve_dataset(dataset)
    full = load_dataset(name, "train")
    idx, pool_size = real_subset(name, fraction, val_fraction, seed)
    _, h, _, c = full.images.shape  # square images (the shard spec has one image_size)
    spec: dict[str, Any] = {
        "source": "real",
        "dataset": name,
        "classes": list(full.classes),
        "num_images": len(idx),
        "shard_size": shard_size,
        "seed": seed,
        "real": {"split": "train", "fraction": fraction, "val_fraction": val_fraction, "of": pool_size},
        "image_format": "png",
        "quality": 95,
        "device": "cpu",
        "dtype": "fp32",
        "threads": 1,
        "image_size": h,
        "teacher": None,
        "sampler": "real",
        "guidance": None,
        "generator": {"id": f"real:{name}", "kind": "real", "image_size": h, "channels": c},
    }
    num_shards = -(-len(idx) // shard_size)
    run = {"format": 1, "tckr_engine_version": __version__, "num_shards": num_shards, "spec": spec}
    out = Path(out).expanduser()
    if (out / RUN_FILE).exists() and not overwrite:
        old = json.loads((out / RUN_FILE).read_text())
        if old.get("spec") != spec:
            raise TckrError(f"{out} holds another shard folder; choose a new folder or pass overwrite=True")
        if (out / "index.json").exists():
            return old
    (out / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    (out / "index.json").unlink(missing_ok=True)  # rewritten last: marks the folder finished
    write_json(out / RUN_FILE, run)
    t0 = time.perf_counter()
    for shard in range(num_shards):
        members: list[tuple[str, bytes]] = []
        rows = idx[shard * shard_size : (shard + 1) * shard_size]
        t_shard = time.perf_counter()
        for slot, i in enumerate(rows.tolist()):
            label = int(full.labels[i])
            meta = {"source": "real", "dataset": name, "index": i, "class_name": full.classes[label]}
            members += encode_sample(
                f"{shard:06d}{slot:05d}", full.images[i], "png", 95, label, full.classes[label], meta, None
            )
        commit_shard(out, shard, tar_bytes(members), len(rows), time.perf_counter() - t_shard)
    write_index(out, num_shards)
    log.info(
        "%d real %s train images (%.0f%% of %d) in %d shard(s) -> %s (%.1f s)", len(idx), name,
        100 * fraction, pool_size, num_shards, out, time.perf_counter() - t0,
    )  # fmt: skip
    return run
