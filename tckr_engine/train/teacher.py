"""Teacher classifier training on real data, with model selection on a validation split carved from train.

Recipe (REFERENCE.md §1.6, minus AugMix and early stopping): AdamW lr 1e-3 wd 5e-5, cosine decay per step,
label smoothing 0.1, random shift (zero padding + random crop) and horizontal flip written in plain torch.
The best epoch is chosen on the validation split only (TCKR's public code selects on test, a flaw we do not
copy); the test split is loaded once, after training, to evaluate the selected weights.

Output folder: `model.safetensors` + `classifier.json` (the best epoch, `load_classifier` reads them),
`train_log.jsonl` (one line per epoch) and `metrics.json`, written last: its presence marks a finished run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tckr_engine.config import check_positive
from tckr_engine.data import ImageDataset, load_dataset, train_val_split
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import write_json
from tckr_engine.models.classifier import (
    ARCH_HELP,
    ARCHS,
    TIMM_PREFIX,
    Classifier,
    count_parameters,
    load_classifier,
    save_classifier,
)

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.json"
LOG_NAME = "train_log.jsonl"
_OUTPUTS = (METRICS_NAME, LOG_NAME, "model.safetensors", "classifier.json")
# (done steps, total steps, running train loss, running train accuracy) after every optimiser step.
Progress = Callable[[int, int, float, float], None]


@dataclass
class TeacherConfig:
    """Teacher training settings; `validate()` turns bad values into one-line `TckrError`s."""

    arch: str = "resnet-small"  # small-cnn | resnet-small | timm:<name>
    dataset: str = "fashion-mnist"
    epochs: int = 10  # ~9 min per Fashion-MNIST epoch for resnet-small on one CPU core
    batch_size: int = 128
    lr: float = 1e-3  # REFERENCE §1.6 (AdamW, cosine)
    weight_decay: float = 5e-5  # REFERENCE §1.6
    label_smoothing: float = 0.1  # REFERENCE §1.6
    val_fraction: float = 0.1  # of the train split, stratified; selection happens on it, never on test
    shift: int | None = None  # max random shift in px (zero padding + crop); None: H // 10 clamped to 1..4
    hflip: bool | None = None  # random horizontal flips; None: on, except for 'digits' (not mirror-safe)
    width: int | None = None  # base width of small-cnn / resnet-small; None: the architecture's default
    init_weights: str | None = None  # timm:<name> only: a local weights file to start from (no downloads)
    seed: int = 0  # weight init, data order, augmentation and the validation split
    threads: int | None = None  # torch CPU threads; None: torch's default
    device: str = "cpu"  # cpu | cuda
    eval_batch_size: int = 512

    def validate(self) -> TeacherConfig:
        """Check every field; raise a one-line TckrError naming the first bad one. Returns self."""
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_positive(name, getattr(self, name))
        for name in ("threads", "width"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise TckrError(f"{name} must be a positive integer or unset, got {value!r}")
        if self.shift is not None and (not isinstance(self.shift, int) or not 0 <= self.shift <= 16):
            raise TckrError(f"shift must be an integer in 0..16 (pixels) or unset, got {self.shift!r}")
        if not 0 < self.lr < 1:
            raise TckrError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.weight_decay < 1:
            raise TckrError(f"weight_decay must be in [0, 1), got {self.weight_decay}")
        if not 0 <= self.label_smoothing < 1:
            raise TckrError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.val_fraction < 1:
            raise TckrError(
                f"val_fraction must be in (0, 1): the best epoch is chosen on it, got {self.val_fraction}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TckrError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.arch not in ARCHS and not (
            self.arch.startswith(TIMM_PREFIX) and len(self.arch) > len(TIMM_PREFIX)
        ):
            raise TckrError(f"unknown classifier architecture {self.arch!r}; choose one of {ARCH_HELP}")
        if self.width is not None and self.arch not in ARCHS:
            raise TckrError(f"width applies to {', '.join(ARCHS)} only, not {self.arch}")
        if self.init_weights is not None and self.arch in ARCHS:
            raise TckrError(f"init_weights applies to {TIMM_PREFIX}<name> classifiers only, not {self.arch}")
        if self.device not in ("cpu", "cuda"):
            raise TckrError(f"device must be cpu or cuda, got {self.device!r}")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise TckrError("device 'cuda' asked for but torch sees no CUDA GPU; use --device cpu")
        return self


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


def _lr_lambda(total_steps: int) -> Callable[[int], float]:
    def f(step: int) -> float:  # cosine from 1 to 0 over the whole run, per optimiser step
        return 0.5 * (1 + math.cos(math.pi * min(step, total_steps) / total_steps))

    return f


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix runs; with overwrite, remove the previous run's files (metrics.json first)."""
    existing = [n for n in _OUTPUTS if (out / n).exists()]
    if existing and not overwrite:
        raise TckrError(
            f"{out} already holds a teacher run ({', '.join(existing)}); choose a new folder or --overwrite"
        )
    for name in existing:  # metrics.json goes first, so a half-deleted folder never looks finished
        (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)


def _auto_shift(image_size: int) -> int:
    return max(1, min(4, image_size // 10))  # 8 px -> 1, 28 px -> 2, 32 px -> 3, >= 40 px -> 4


def train_teacher(
    cfg: TeacherConfig, out: str | Path, progress: Progress | None = None, *, overwrite: bool = False
) -> dict[str, Any]:
    """Train a teacher on `cfg.dataset`'s train split minus a validation split; returns the metrics.

    Each epoch is scored on the validation split; the best one (earliest on ties) is saved to `out` with
    `save_classifier`. Only then is the test split loaded and the saved weights evaluated on it once.
    """
    cfg.validate()
    out = Path(out).expanduser()
    _prepare_out(out, overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    full = load_dataset(cfg.dataset, "train")
    train_idx, val_idx = train_val_split(full.labels, cfg.val_fraction, seed=cfg.seed)
    train, val = full.subset(train_idx), full.subset(val_idx)
    if len(train) < 2 or len(val) == 0:
        raise TckrError(
            f"{cfg.dataset} train split is too small ({len(full)} images) to carve a validation split"
        )
    _, h, w, c = train.images.shape
    shift = _auto_shift(min(h, w)) if cfg.shift is None else cfg.shift
    hflip = (full.name != "digits") if cfg.hflip is None else cfg.hflip
    device = torch.device(cfg.device)

    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        arch_kwargs: dict[str, Any] = {} if cfg.width is None else {"width": cfg.width}
        if cfg.init_weights is not None:
            arch_kwargs["init_weights"] = cfg.init_weights
        model = Classifier(cfg.arch, len(full.classes), c, h, full.classes, **arch_kwargs).to(device)
    log.info(
        "teacher %s (%d parameters) on %s: %d train / %d val images %dx%dx%d, shift %d px, flip %s",
        cfg.arch, count_parameters(model), cfg.dataset, len(train), len(val), h, w, c, shift, hflip,
    )  # fmt: skip

    images = torch.from_numpy(np.ascontiguousarray(train.images))  # (N, H, W, C) uint8
    labels = torch.from_numpy(train.labels)  # (N,)
    steps_per_epoch = max(1, len(train) // cfg.batch_size)  # partial last batch dropped (BN needs > 1)
    total = cfg.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(total))
    rng = torch.Generator().manual_seed(cfg.seed)
    val_acc: list[float] = []
    best_epoch, best_acc, done = 0, -1.0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        perm = torch.randperm(len(train), generator=rng)  # (N,)
        loss_sum, correct, seen = 0.0, 0, 0
        for i in range(steps_per_epoch):
            idx = perm[i * cfg.batch_size : (i + 1) * cfg.batch_size]  # (B,)
            x = random_shift_flip(images[idx], shift, hflip, rng).to(device)  # (B, H, W, C) uint8
            y = labels[idx].to(device)  # (B,)
            logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
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
        acc = evaluate_accuracy(model, val, cfg.eval_batch_size)
        val_acc.append(acc)
        if acc > best_acc:  # strictly better: the earliest epoch wins ties
            best_epoch, best_acc = epoch, acc
            save_classifier(model, out)
        line = {
            "epoch": epoch,
            "train_loss": round(loss_sum / seen, 5),
            "train_accuracy": round(correct / seen, 5),
            "val_accuracy": round(acc, 5),
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        with (out / LOG_NAME).open("a") as f:
            f.write(json.dumps(line) + "\n")
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f, val acc %.4f%s",
            epoch, cfg.epochs, line["train_loss"], line["train_accuracy"], acc,
            " (best)" if best_epoch == epoch else "",
        )  # fmt: skip

    # Selection is over. The test split is read for the first time here, to score the saved best weights.
    best = load_classifier(out).to(device)
    test = load_dataset(cfg.dataset, "test")
    if test.classes != full.classes:
        raise TckrError(
            f"{cfg.dataset}: test classes {list(test.classes)} differ from train {list(full.classes)}"
        )
    test_acc = evaluate_accuracy(best, test, cfg.eval_batch_size)
    metrics = {
        "arch": cfg.arch,
        "dataset": cfg.dataset,
        "parameters": count_parameters(best),
        "num_train": len(train),
        "num_val": len(val),
        "num_test": len(test),
        "val_accuracy": val_acc,
        "best_epoch": best_epoch,
        "best_val_accuracy": best_acc,
        "test_accuracy": test_acc,
        "seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "augmentation": {"shift": shift, "hflip": hflip},
        "config": dataclasses.asdict(cfg),
    }
    write_json(out / METRICS_NAME, metrics)  # written last: marks a finished run
    log.info("best epoch %d (val acc %.4f): test acc %.4f -> %s", best_epoch, best_acc, test_acc, out)
    return metrics
