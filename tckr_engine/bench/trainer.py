"""Trainer throughput: student training samples/sec streaming from shards vs from in-memory tensors.

Both modes train the same freshly initialised student (same seed, architecture, batch size, AdamW, the
trainer's shift/flip augmentation and soft-target loss with hard labels) for the same number of optimiser
steps; only where the uint8 batches come from differs:
- stream: `train.stream.shard_loader` over the shard tars with the trainer's default DataLoader workers
  and shuffle buffer (PNG decoding in the workers, loader start-up included, as at every epoch);
- memory: the same images decoded once into one uint8 tensor, sliced into batches.
The shard list is repeated so one loader pass covers every step (a long epoch, as in a real run).
"""

from __future__ import annotations

import io
import logging
import math
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
from tckr_engine.train.stream import shard_loader
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
) -> dict[str, Any]:
    """Samples/sec of `steps` student steps streaming `urls` vs from the same images in memory."""
    defaults = StudentConfig()
    workers = defaults.workers if workers is None else workers
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

    # Warm-up (allocator, kernels) on a throwaway model, then the two timed modes on identical models.
    _train(_memory_batches(mem_images, mem_labels, batch_size), 2, fresh_model(), device, k, shift)
    n_mem, s_mem = _train(
        _memory_batches(mem_images, mem_labels, batch_size), steps, fresh_model(), device, k, shift
    )
    repeat = math.ceil((steps + 1) * batch_size / len(keys)) + max(1, workers)  # partial batches per worker
    loader = shard_loader([str(u) for u in urls] * repeat, batch_size, workers, defaults.shuffle_buffer, seed)
    n_str, s_str = _train(iter(loader), steps, fresh_model(), device, k, shift)
    if n_str < steps * batch_size // 2:
        log.warning("the stream ended early: %d samples for %d steps", n_str, steps)
    mem_rate, str_rate = n_mem / s_mem, n_str / s_str
    return {
        "arch": arch,
        "batch_size": batch_size,
        "steps": steps,
        "workers": min(workers, len(urls) * repeat),
        "shuffle_buffer": defaults.shuffle_buffer,
        "images": len(keys),
        "memory": {"samples": n_mem, "seconds": round(s_mem, 4), "samples_per_s": round(mem_rate, 2)},
        "stream": {"samples": n_str, "seconds": round(s_str, 4), "samples_per_s": round(str_rate, 2)},
        "stream_vs_memory": round(str_rate / mem_rate, 4),
    }
