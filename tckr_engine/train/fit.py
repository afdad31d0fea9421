"""The supervised classifier-fitting loop shared by the teacher and the LiRA shadow models, and its helpers.

Recipe (REFERENCE.md §1.6, minus AugMix and early stopping): AdamW, cosine decay per optimiser step from
`lr` to 0, label smoothing, random shift (zero padding + random crop) and horizontal flip in plain torch.
One `torch.Generator` seeded with `seed` draws the data order and the augmentation, in that order every
step, so the same seed, data and initial weights give the same trained weights.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tckr_engine.allocator import keep_freed_memory
from tckr_engine.data import ImageDataset
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier, check_arch

# (done steps, total steps, running train loss, running train accuracy) after every optimiser step.
Progress = Callable[[int, int, float, float], None]
# (epoch, model, stats) after every epoch; stats: epoch, steps, train_loss, train_accuracy, lr.
OnEpoch = Callable[[int, Classifier, dict[str, Any]], None]

NOT_MIRROR_SAFE = ("digits",)  # datasets whose classes change under a horizontal flip (2 vs 5, ...)


def check_recipe(cfg: Any) -> None:
    """The checks of a config that trains classifiers with `fit_classifier` (`TeacherConfig`, and
    `LiraConfig`, whose shadows train as the attacked model did): `arch`, `width`, `init_weights`,
    `threads`, `shift`, `lr`, `weight_decay`, `label_smoothing`. One-line TckrError on the first bad one."""
    for name in ("threads", "width"):
        value = getattr(cfg, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
            raise TckrError(f"{name} must be a positive integer or unset, got {value!r}")
    if cfg.shift is not None and (not isinstance(cfg.shift, int) or not 0 <= cfg.shift <= 16):
        raise TckrError(f"shift must be an integer in 0..16 (pixels) or unset, got {cfg.shift!r}")
    if not 0 < cfg.lr < 1:
        raise TckrError(f"lr must be in (0, 1), got {cfg.lr}")
    if not 0 <= cfg.weight_decay < 1:
        raise TckrError(f"weight_decay must be in [0, 1), got {cfg.weight_decay}")
    if not 0 <= cfg.label_smoothing < 1:
        raise TckrError(f"label_smoothing must be in [0, 1), got {cfg.label_smoothing}")
    check_arch(cfg.arch, cfg.width, cfg.init_weights)


def auto_shift(image_size: int) -> int:
    """Default max random shift in px for square images of `image_size`: size // 10 clamped to 1..4."""
    return max(1, min(4, image_size // 10))  # 8 px -> 1, 28 px -> 2, 32 px -> 3, >= 40 px -> 4


def auto_hflip(dataset_name: str) -> bool:
    """Whether random horizontal flips are label-preserving for a dataset (off for digits)."""
    return dataset_name not in NOT_MIRROR_SAFE


def cosine_lambda(total_steps: int) -> Callable[[int], float]:
    """LR multiplier for `LambdaLR`: cosine from 1 to 0 over `total_steps` optimiser steps, 0 after."""

    def f(step: int) -> float:
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))

    return f


def random_shift_flip(
    images: torch.Tensor, shift: int, hflip: bool, generator: torch.Generator
) -> torch.Tensor:
    """Per-image random translation by up to `shift` px (zero padding, random crop) and optional mirror.

    uint8 (B, H, W, C) -> uint8 (B, H, W, C); one gather for the whole batch, randomness from `generator`.
    """
    b, h, w, _ = images.shape
    padded = F.pad(images, (0, 0, shift, shift, shift, shift)) if shift else images  # (B, H+2s, W+2s, C)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=generator)  # (B,)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=generator)  # (B,)
    cols = torch.arange(w).expand(b, w)  # (B, W)
    if hflip:
        flip = torch.rand(b, generator=generator) < 0.5  # (B,)
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    rows = dy[:, None] + torch.arange(h)  # (B, H)
    cols = dx[:, None] + cols  # (B, W)
    batch = torch.arange(b)[:, None, None]  # (B, 1, 1)
    return padded[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


@torch.no_grad()
def predict(model: Classifier, images: np.ndarray | torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """Predicted class (N,) int64 for uint8 images (N, H, W, C), in batches, in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.tensor(np.asarray(images[i : i + batch_size]), device=device)  # (b, H, W, C) uint8
        out.append(model(batch).argmax(1).cpu())  # (b,)
    model.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def evaluate_accuracy(model: Classifier, dataset: ImageDataset, batch_size: int = 512) -> float:
    """Top-1 accuracy of `model` on `dataset` (eval mode, no gradients); 0.0 for an empty dataset."""
    if len(dataset) == 0:
        return 0.0
    return float((predict(model, dataset.images, batch_size) == dataset.labels).mean())


def _as_tensor(x: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if t.dtype != dtype:
        raise TckrError(f"fit_classifier needs {dtype} data, got {t.dtype}")
    return t.cpu()


@keep_freed_memory()  # no page faults for every batch's tensors (allocator.py)
def fit_classifier(
    model: Classifier,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    label_smoothing: float,
    shift: int,
    hflip: bool,
    seed: int,
    device: str | torch.device = "cpu",
    on_epoch: OnEpoch | None = None,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Train `model` in place on uint8 `images` (N, H, W, C), int64 `labels` (N,); returns per-epoch stats.

    AdamW + cosine per step + label-smoothed cross-entropy on randomly shifted / flipped batches. Each epoch
    is a fresh permutation; the partial last batch is dropped (BatchNorm needs > 1 sample) unless the whole
    set is smaller than one batch. `on_epoch(epoch, model, stats)` runs after every epoch (validation,
    checkpoint selection, logs); `progress` after every optimiser step. The model's initial weights are the
    caller's business (seed them before building it).
    """
    x_all = _as_tensor(images, torch.uint8)  # (N, H, W, C)
    y_all = _as_tensor(labels, torch.int64)  # (N,)
    n = len(x_all)
    if n < 2 or x_all.ndim != 4 or y_all.shape != (n,):
        raise TckrError(
            f"fit_classifier needs >= 2 images (N, H, W, C) with labels (N,), got {tuple(x_all.shape)} "
            f"and {tuple(y_all.shape)}"
        )
    device = torch.device(device)
    model.to(device)
    steps_per_epoch = max(1, n // batch_size)  # partial last batch dropped (BN needs > 1)
    total = epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))
    rng = torch.Generator().manual_seed(seed)
    history: list[dict[str, Any]] = []
    done = 0
    for epoch in range(1, epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=rng)  # (N,)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]  # (B,)
            x = random_shift_flip(x_all[idx], shift, hflip, rng).to(device)  # (B, H, W, C) uint8
            y = y_all[idx].to(device)  # (B,)
            logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            done += 1
            # One host sync per step is fine here: the step itself is milliseconds to seconds on CPU.
            loss_sum += float(loss.detach()) * len(idx)
            correct += int((logits.detach().argmax(1) == y).sum())
            seen += len(idx)
            if progress is not None:
                progress(done, total, loss_sum / seen, correct / seen)
        stats = {
            "epoch": epoch,
            "steps": done,
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "lr": opt.param_groups[0]["lr"],
        }
        history.append(stats)
        if on_epoch is not None:
            on_epoch(epoch, model, stats)
    return history
