"""Teacher classifier training on real data, with model selection on a validation split carved from train.

Recipe (REFERENCE.md §1.6, minus AugMix and early stopping): AdamW lr 1e-3 wd 5e-5, cosine decay per step,
label smoothing 0.1, random shift (zero padding + random crop) and horizontal flip; the loop itself is
`tckr_engine.train.fit.fit_classifier`, shared with the LiRA shadow models.
The best epoch is chosen on the validation split only (TCKR's public code selects on test, a flaw we do not
copy); the test split is loaded once, after training, to evaluate the selected weights.

Output folder: `model.safetensors` + `classifier.json` (the best epoch, `load_classifier` reads them),
`train_log.jsonl` (one line per epoch) and `metrics.json`, written last: its presence marks a finished run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tckr_engine.config import check_positive, check_training_device
from tckr_engine.data import load_dataset, train_val_split
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import write_json
from tckr_engine.models.classifier import (
    RUN_LOG_NAME,
    RUN_METRICS_NAME,
    Classifier,
    count_parameters,
    load_classifier,
    save_classifier,
)
from tckr_engine.train.fit import (
    Progress,
    auto_hflip,
    auto_shift,
    check_recipe,
    evaluate_accuracy,
    fit_classifier,
    predict,
    random_shift_flip,
)

# Re-exported: other modules import these from here.
__all__ = ["Progress", "TeacherConfig", "evaluate_accuracy", "predict", "random_shift_flip", "train_teacher"]

log = logging.getLogger(__name__)

METRICS_NAME = RUN_METRICS_NAME
LOG_NAME = RUN_LOG_NAME
_OUTPUTS = (METRICS_NAME, LOG_NAME, "model.safetensors", "classifier.json")


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
        check_recipe(self)
        if not 0 < self.val_fraction < 1:
            raise TckrError(
                f"val_fraction must be in (0, 1): the best epoch is chosen on it, got {self.val_fraction}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise TckrError(f"seed must be a non-negative integer, got {self.seed!r}")
        check_training_device(self.device)
        return self


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
    shift = auto_shift(min(h, w)) if cfg.shift is None else cfg.shift
    hflip = auto_hflip(full.name) if cfg.hflip is None else cfg.hflip
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

    val_acc: list[float] = []
    best = {"epoch": 0, "acc": -1.0}

    def on_epoch(epoch: int, model: Classifier, stats: dict[str, Any]) -> None:
        """Score the epoch on validation, keep it if strictly better (earliest wins ties), log a line."""
        acc = evaluate_accuracy(model, val, cfg.eval_batch_size)
        val_acc.append(acc)
        if acc > best["acc"]:  # strictly better: the earliest epoch wins ties
            best.update(epoch=epoch, acc=acc)
            save_classifier(model, out)
        line = {
            "epoch": epoch,
            "train_loss": round(stats["train_loss"], 5),
            "train_accuracy": round(stats["train_accuracy"], 5),
            "val_accuracy": round(acc, 5),
            "lr": stats["lr"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        with (out / LOG_NAME).open("a") as f:
            f.write(json.dumps(line) + "\n")
        log.info(
            "epoch %d/%d: train loss %.4f acc %.4f, val acc %.4f%s",
            epoch, cfg.epochs, line["train_loss"], line["train_accuracy"], acc,
            " (best)" if best["epoch"] == epoch else "",
        )  # fmt: skip

    fit_classifier(
        model,
        train.images,
        train.labels,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        label_smoothing=cfg.label_smoothing,
        shift=shift,
        hflip=hflip,
        seed=cfg.seed,
        device=device,
        on_epoch=on_epoch,
        progress=progress,
    )
    best_epoch, best_acc = int(best["epoch"]), float(best["acc"])

    # Selection is over. The test split is read for the first time here, to score the saved best weights.
    best = load_classifier(out, unfinished=True).to(device)  # metrics.json comes after
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
