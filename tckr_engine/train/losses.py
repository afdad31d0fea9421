"""The student's loss terms, one batch at a time (REFERENCE.md §1.5, §2 and §4).

GKD (`gkd_loss`) = `F.cross_entropy(student(x_aug) / T, soft, label_smoothing=s)`: both sides at one
temperature, no T² factor (there is no hard-label term to balance). At T = 1, s = 0.1 it is exactly TCKR's
`CrossEntropyLoss(label_smoothing=0.1)(student_logits, soft)`. `batch_targets` gives `soft` for each label
kind of the trainer ("online": the teacher on the augmented batch; "stored": the shards' logits.npy;
"hard": the shard's class, one-hot).

BSS (`BSSBatch`, `synth.bss`): the loss becomes CE(s(x), y) + α·softCE_T(t(x), s(x)) + β·softCE_T(t(x̃), s(x̃))
with y the shard's `cls`, T = `bss_temperature`, no label smoothing, and x̃ the boundary samples walked from
the *augmented* batch x (the reference attacks its augmented CIFAR batch), selected with the student's logits
of its training forward. The teacher labels x online whatever the trainer's `labels` says. The schedules of
α and β are the trainer's (`train/gkd.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier
from tckr_engine.synth.bss import boundary_samples, bss_loss

if TYPE_CHECKING:
    from tckr_engine.train.gkd import StudentConfig


def soft_targets(teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / T) in float32: (B, K) -> (B, K) probabilities."""
    return torch.softmax(teacher_logits.float() / temperature, dim=1)


def gkd_loss(
    student_logits: torch.Tensor, target_probs: torch.Tensor, temperature: float, label_smoothing: float
) -> torch.Tensor:
    """Soft-target cross-entropy with label smoothing, batch mean: -Σ_k q_k log softmax(z / T)_k.

    `target_probs` p (B, K) is already at temperature T (`soft_targets`); q = (1 - s) p + s / K is PyTorch's
    label smoothing of probability targets. No T² factor. T = 1: TCKR's loss exactly.
    """
    z = student_logits.float() / temperature  # (B, K)
    return F.cross_entropy(z, target_probs.float(), label_smoothing=label_smoothing)


def batch_targets(
    labels: str,
    batch: dict[str, Any],
    x_aug: torch.Tensor,
    teacher: Classifier | None,
    temperature: float,
    num_classes: int,
) -> torch.Tensor:
    """Target probabilities (B, K) for one augmented batch `x_aug` uint8 (B, H, W, C) on the device."""
    if labels == "online":
        assert teacher is not None
        with torch.no_grad():
            return soft_targets(teacher(x_aug), temperature)  # (B, K) on the augmented image
    if labels == "stored":
        logits = batch["logits"]  # (B, K') float32, computed on the un-augmented image
        if logits.shape[1] != num_classes:
            raise TckrError(f"stored logits have {logits.shape[1]} classes, the dataset {num_classes}")
        return soft_targets(logits.to(x_aug.device), temperature)  # (B, K)
    cls = batch["cls"]  # (B,) int64 on the CPU
    if int(cls.max()) >= num_classes or int(cls.min()) < 0:
        raise TckrError(f"shard class index {int(cls.max())} is out of range for {num_classes} classes")
    return F.one_hot(cls, num_classes).float().to(x_aug.device)  # (B, K)


@dataclass
class BSSBatch:
    """What the BSS loss term needs of one batch besides the student (module docstring)."""

    teacher: Classifier
    teacher_logits: torch.Tensor  # (B, K) teacher logits of the augmented batch
    y: torch.Tensor  # (B,) int64 hard labels (the shard's cls), on the device
    alpha: float
    beta: float
    generator: torch.Generator  # CPU generator for target classes
    samples: int = 0  # out: boundary samples used in this batch (0 when β = 0)


def batch_loss(
    student: Classifier,
    x_aug: torch.Tensor,
    target_probs: torch.Tensor | None,
    cfg: StudentConfig,
    bss: BSSBatch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, student logits (B, K)) of one batch: the one place to add another loss term.

    Without `bss`: the GKD loss on `target_probs`. With it: `bss_loss` (module docstring); `target_probs`
    is unused, and boundary samples are walked only when β > 0 (the reference's `if ratio_attack > 0`).
    """
    logits = student(x_aug)  # (B, K)
    if bss is None:
        assert target_probs is not None
        temperature = 1.0 if cfg.labels == "hard" else cfg.temperature
        return gkd_loss(logits, target_probs, temperature, cfg.label_smoothing), logits
    bcfg = cfg.bss_config()
    adv_s = adv_t = None
    if bss.beta > 0:
        x_adv, info = boundary_samples(
            bss.teacher, None, x_aug, bss.y, cfg=bcfg, teacher_logits=bss.teacher_logits,
            student_logits=logits.detach(), generator=bss.generator,
        )  # fmt: skip
        bss.samples = len(x_adv)  # x_adv: (N, C, H, W) normalised float, N <= attack_size
        if len(x_adv):
            adv_s, adv_t = student(x_adv), info.teacher_logits  # (N, K) each
    loss = bss_loss(logits, bss.teacher_logits, bss.y, adv_s, adv_t, bss.alpha, bss.beta, bcfg.temperature)
    return loss, logits
