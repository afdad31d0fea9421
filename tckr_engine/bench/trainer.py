"""Trainer throughput: student training samples/sec streaming from shards vs from in-memory tensors.

Both modes train the same freshly initialised student (same seed, architecture, batch size, AdamW, the
trainer's shift/flip augmentation and soft-target loss with hard labels) for the same number of optimiser
steps; only where the uint8 batches come from differs:
- stream: `train.stream.shard_loader` over the shard tars with the trainer's default streams (`workers`),
  `loader` ("auto": DataLoader worker processes, or in the training process when CPU training leaves no
  core spare) and shuffle buffer (PNG decoding included, loader start-up too, as at every epoch);
- memory: the same images decoded once into one uint8 tensor, sliced into batches.
The shard list is repeated so one loader pass covers every step (a long epoch, as in a real run).
A third figure, `loader`, is the stream's batches drawn as fast as the loader yields them with no model:
the ceiling streaming can reach; when it is below the in-memory rate the loader is the bottleneck (add
DataLoader workers) rather than the model.

Standalone, on any shard folder (an A/B of loader changes on the same shards):

    python -m tckr_engine.bench.trainer --shards runs/demo/synthetic --threads 2 --out trainer.json
"""

from __future__ import annotations

import io
import logging
import math
import statistics
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tckr_engine.models.classifier import Classifier
from tckr_engine.train.gkd import StudentConfig
from tckr_engine.train.losses import gkd_loss
from tckr_engine.train.stream import loader_in_process, loader_note, shard_loader
from tckr_engine.train.teacher import random_shift_flip

log = logging.getLogger(__name__)


def read_tar_images(urls: Sequence[str | Path]) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """key -> uint8 (H, W, C) image and key -> class index, for every sample of the tars."""
    from PIL import Image

    images: dict[str, np.ndarray] = {}
    labels: dict[str, int] = {}
    for url in urls:
        with tarfile.open(url) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                data = tar.extractfile(member).read()
                if ext in ("png", "jpg", "webp"):
                    with Image.open(io.BytesIO(data)) as image:
                        arr = np.asarray(image)
                    images[key] = arr[..., None] if arr.ndim == 2 else arr
                elif ext == "cls":
                    labels[key] = int(data)
    return images, labels


def _memory_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> Iterator[dict[str, Any]]:
    while True:
        for lo in range(0, len(images) - batch_size + 1, batch_size):
            yield {"images": images[lo : lo + batch_size], "cls": labels[lo : lo + batch_size]}


def _train(
    batches: Iterator[dict[str, Any]],
    steps: int,
    model: Classifier,
    device: torch.device,
    num_classes: int,
    shift: int,
) -> tuple[int, float]:
    """`steps` optimiser steps on `batches`; returns (samples, seconds), the clock starting before the
    first batch is requested (so loader start-up counts) and stopping after the last step."""
    cfg = StudentConfig()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    aug = torch.Generator().manual_seed(0)
    model.train()
    seen = 0
    t0 = time.perf_counter()
    for step, batch in enumerate(batches):
        if step == steps:
            break
        x = random_shift_flip(batch["images"], shift, True, aug).to(device)  # (B, H, W, C) uint8
        target = F.one_hot(batch["cls"], num_classes).float().to(device)  # (B, K)
        loss = gkd_loss(model(x), target, 1.0, cfg.label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return seen, time.perf_counter() - t0


def trainer_throughput(
    urls: Sequence[str | Path],
    classes: Sequence[str],
    device: torch.device,
    batch_size: int,
    steps: int,
    workers: int | None = None,
    arch: str = "resnet-small",
    seed: int = 0,
    repeats: int = 1,
    loader: str | None = None,
) -> dict[str, Any]:
    """Samples/sec of `steps` student steps streaming `urls` vs from the same images in memory, and of the
    loader alone; medians of `repeats` interleaved rounds (min and max beside them). `workers` and `loader`
    default to the trainer's."""
    defaults = StudentConfig()
    workers = defaults.workers if workers is None else workers
    in_process = loader_in_process(loader or defaults.loader, device, workers, torch.get_num_threads())
    images, labels = read_tar_images(urls)
    keys = sorted(images)
    if len(keys) < batch_size:
        raise ValueError(f"the trainer row needs at least {batch_size} images, the shards hold {len(keys)}")
    mem_images = torch.from_numpy(np.stack([images[k] for k in keys]))  # (N, H, W, C) uint8
    mem_labels = torch.tensor([labels[k] for k in keys], dtype=torch.int64)  # (N,)
    _, h, _, c = mem_images.shape
    shift = max(1, min(4, h // 10))  # the trainer's default rule
    k = len(classes)

    def fresh_model() -> Classifier:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Classifier(arch, k, c, h, tuple(classes)).to(device)

    repeat = math.ceil((steps + 1) * batch_size / len(keys)) + max(1, workers)  # partial batches per worker
    stream = shard_loader(
        [str(u) for u in urls] * repeat,
        batch_size,
        workers,
        defaults.shuffle_buffer,
        seed,
        in_process=in_process,
    )
    modes = {
        "memory": lambda: _train(
            _memory_batches(mem_images, mem_labels, batch_size), steps, fresh_model(), device, k, shift
        ),
        "stream": lambda: _train(iter(stream), steps, fresh_model(), device, k, shift),
        "loader": lambda: _drain(iter(stream), steps),
    }
    # Warm-up (allocator, kernels) on a throwaway model, then the modes in turn, `repeats` rounds, so a
    # drift in the machine's speed hits every mode alike; each round trains a fresh identical model.
    _train(_memory_batches(mem_images, mem_labels, batch_size), 2, fresh_model(), device, k, shift)
    runs: dict[str, list[tuple[int, float]]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode, measure in modes.items():
            runs[mode].append(measure())
    if min(n for n, _ in runs["stream"]) < steps * batch_size // 2:
        log.warning("the stream ended early: %s samples for %d steps", [n for n, _ in runs["stream"]], steps)
    out = {
        "arch": arch,
        "batch_size": batch_size,
        "steps": steps,
        "repeats": repeats,
        "workers": min(workers, len(urls) * repeat),
        "loader_mode": "in-process" if in_process else "processes",  # "loader" is the loader-alone figure
        "loader_note": loader_note(min(workers, len(urls) * repeat), in_process),
        "shuffle_buffer": defaults.shuffle_buffer,
        "images": len(keys),
    }
    for mode, got in runs.items():
        rates = [n / s for n, s in got]
        out[mode] = {
            "samples": got[0][0],  # per repeat
            "seconds": round(statistics.median(s for _, s in got), 4),
            "samples_per_s": round(statistics.median(rates), 2),
            "samples_per_s_min": round(min(rates), 2),
            "samples_per_s_max": round(max(rates), 2),
        }
    out["stream_vs_memory"] = round(out["stream"]["samples_per_s"] / out["memory"]["samples_per_s"], 4)
    return out


def _drain(batches: Iterator[dict[str, Any]], steps: int) -> tuple[int, float]:
    """`steps` batches from the loader with no model: (samples, seconds), loader start-up included."""
    seen = 0
    t0 = time.perf_counter()
    for step, batch in enumerate(batches):
        if step == steps:
            break
        seen += len(batch["images"])
    return seen, time.perf_counter() - t0


def loader_costs(urls: Sequence[str], repeats: int = 3) -> dict[str, Any]:
    """Microseconds per sample of the loader's steps, in this process (best of `repeats`): tar expansion by
    webdataset's own `tarfile`-based reader and by the engine's (`train.stream._tar_samples`), the decode
    of one sample (image, class, stored logits when the shards have them) and the .npy parse alone by
    `np.load` and by the engine's cached-header path."""
    import webdataset as wds
    from webdataset.cache import StreamingOpen

    from tckr_engine.train.stream import IMAGE_KEYS, _decode, _load_npy, _tar_samples

    keep = frozenset((*IMAGE_KEYS, "cls", "logits.npy"))

    def best(fn: Any) -> tuple[float, Any]:
        times, out = [], None
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - t0)
        return min(times), out

    t_wds, ref = best(lambda: list(wds.tariterators.tarfile_samples(iter([{"url": u} for u in urls]))))
    t_ours, samples = best(lambda: list(_tar_samples(StreamingOpen()(list(urls)), keep)))
    n = len(samples)
    if n == 0 or len(ref) != n:
        raise ValueError(f"the shards hold {n} samples by the engine's reader and {len(ref)} by webdataset's")
    logits = all("logits.npy" in s for s in samples)
    t_dec, _ = best(lambda: [_decode(s, logits) for s in samples])
    out = {
        "samples": n,
        "stored_logits": logits,
        "tar_webdataset_us": round(1e6 * t_wds / n, 2),
        "tar_engine_us": round(1e6 * t_ours / n, 2),
        "decode_us": round(1e6 * t_dec / n, 2),
    }
    if logits:
        blobs = [s["logits.npy"] for s in samples]
        t_np, _ = best(lambda: [np.load(io.BytesIO(b), allow_pickle=False) for b in blobs])
        t_fast, _ = best(lambda: [_load_npy(b) for b in blobs])
        out.update(npy_np_load_us=round(1e6 * t_np / n, 2), npy_engine_us=round(1e6 * t_fast / n, 2))
    return out


def main() -> None:
    import argparse
    import json
    import os
    from datetime import datetime, timezone

    from tckr_engine.bench.flops import device_name
    from tckr_engine.bench.kernels import git_sha
    from tckr_engine.config import check_training_device
    from tckr_engine.engine.spec import versions
    from tckr_engine.errors import TckrError
    from tckr_engine.train.shard_folders import open_shard_folder
    from tckr_engine.train.stream import LOADERS

    parser = argparse.ArgumentParser(description="Student samples/sec streaming shards vs in memory.")
    parser.add_argument("--shards", required=True, help="a shard folder written by 'tckr-engine generate'")
    parser.add_argument("--arch", default="resnet-small")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=16, help="optimiser steps per mode and repeat")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds of the three modes")
    parser.add_argument("--workers", type=int, default=None, help="shard streams (default: the trainer's)")
    parser.add_argument(
        "--loader", choices=LOADERS, default=None,
        help="where the streams are read: DataLoader worker processes or in-process (default: the trainer's)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="PyTorch threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="JSON file to write (default: log only)")
    parser.add_argument(
        "--costs", type=int, default=0, metavar="N",
        help="also time the loader's steps per sample, in this process, on the first shards (>= N samples)",
    )  # fmt: skip
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    def fail(message: str) -> None:
        parser.exit(2, f"error: {message}\n")

    for name in ("batch_size", "steps", "repeats", "threads", "workers", "costs"):
        value, least = getattr(args, name), 0 if name in ("workers", "costs") else 1
        if value is not None and value < least:
            fail(f"--{name.replace('_', '-')} must be an integer >= {least}, got {value}")
    try:
        check_training_device(args.device)
    except TckrError as e:
        fail(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        folder = open_shard_folder(args.shards)
        result = trainer_throughput(
            folder.urls, folder.classes, device, args.batch_size, args.steps, args.workers, args.arch,
            repeats=args.repeats, loader=args.loader,
        )  # fmt: skip
        if args.costs:
            take = 1
            while take < len(folder.urls) and sum(folder.nsamples[:take]) < args.costs:
                take += 1
            result["costs"] = loader_costs(folder.urls[:take])
    except (TckrError, ValueError) as e:  # ValueError: fewer images than one batch
        fail(str(e))
    result.update(
        shards=str(folder.path), device=device_name(device), threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(), versions=versions(), git_sha=git_sha(), started=started,
    )  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.out)
    for mode in ("memory", "stream", "loader"):
        m = result[mode]
        log.info(
            "%-7s %9.1f samples/s (%.1f-%.1f)",
            mode, m["samples_per_s"], m["samples_per_s_min"], m["samples_per_s_max"],
        )  # fmt: skip
    log.info("stream / memory: %.1f %% (%s)", 100 * result["stream_vs_memory"], result["loader_note"])
    for name, value in result.get("costs", {}).items():
        log.info("%-18s %s", name, value)


if __name__ == "__main__":
    main()
