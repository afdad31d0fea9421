"""Boundary-supporting samples (BSS; Heo et al., AAAI 2019), as the reference code does it (REFERENCE.md §4).

Reference: bhheo/BSS_distillation (`train_BSS_distillation.py`, `attacks/attack_BSS.py`). Per batch:
1. **Base samples**: those the teacher classifies correctly (argmax = y) and, by default, the student too
   (the paper's and REFERENCE's rule; the reference code itself checks only the teacher:
   `require_student_correct = False` reproduces that). Of these, the `attack_size` (64) with the largest
   Σ_{c≠y} (p_t,c − p_s,c)² (softmax at T = 1) are kept, largest first.
2. **Target class** k: drawn from the teacher's non-top classes with p_k = q_k / (1 − max q) (q = teacher
   softmax): u ~ U[0, 1), k = the first class, in descending q, whose cumulative q reaches u · Σ_{non-top} q.
3. **Attack** (10 steps, step size 0.3) on the teacher's logits f: each step takes the gradient g of
   Σ (f_k − f_y) w.r.t. the normalised input and moves every still-active sample by
   0.3 · (f_y − f_k + 1e-4) · g / ‖g‖₂ (per-sample norm), then clamps to the normalised range. A sample is
   active while the teacher's argmax, evaluated at the start of the step, is still its original class y
   (the reference's `GT == argmax`): it stops once the argmax changes, to k or to any other class. The loop
   ends early when no sample is active; the last step's move is not re-checked (as in the reference).
4. **Loss**: CE(s(x), y) + α · softCE_T(t(x), s(x)) + β · softCE_T(t(x̃), s(x̃)), softCE_T(a, b) =
   −mean_i Σ_c softmax(a_i/T)_c · log softmax(b_i/T)_c, T = 3, no T² factor; α: 4 → 1 linearly over
   training, β: 2 → 0 linearly, reaching 0 at 75 % of training (`bss_schedule`).

Input space: `boundary_samples` takes the trainer's batch as uint8 (B, H, W, C) (or already-normalised
float (B, C, H, W)) and returns x̃ as normalised float (B', C, H, W): `Classifier.forward` passes floats
straight to the network, so `student(x_adv)` and `teacher(x_adv)` work as they are. x̃ stays float because
rounding to uint8 would undo part of a 10-step walk to the boundary; the `bss` shard source rounds it and
stores the teacher's logits of the rounded image. Teacher and student must share their normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tckr_engine.config import is_number
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier
from tckr_engine.synth.activation_max import valid_range

GAP_EPS = 1e-4  # the reference's `pert + 1e-4`: a sample on the boundary still moves a little


@dataclass
class BSSConfig:
    """BSS settings, defaults from the reference code; `validate()` raises one-line `TckrError`s."""

    attack_size: int = 64  # base samples kept per batch (reference: 64 of a 256 batch)
    steps: int = 10  # attack steps
    step_size: float = 0.3  # reference `step_alpha` (L2-normalised gradient steps)
    temperature: float = 3.0  # T of both soft cross-entropies
    alpha_start: float = 4.0  # weight of the clean KD term at the start of training ...
    alpha_end: float = 1.0  # ... and at the end (linear)
    beta_start: float = 2.0  # weight of the BSS term at the start of training ...
    beta_zero_at: float = 0.75  # ... decreasing linearly to 0 at this fraction of training
    require_student_correct: bool = True  # paper/REFERENCE rule; False = the reference code (teacher only)
    candidates: int = 256  # `bss` shard source only: real images per selection batch (reference batch)

    def validate(self) -> BSSConfig:
        """Check every field; raise a one-line TckrError naming the first bad one. Returns self."""
        for name, hi in (("attack_size", 65_536), ("steps", 1000), ("candidates", 65_536)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= hi:
                raise TckrError(f"bss.{name} must be an integer in 1..{hi}, got {value!r}")
        if self.attack_size > self.candidates:
            raise TckrError(
                f"bss.attack_size ({self.attack_size}) must not exceed bss.candidates ({self.candidates})"
            )
        for name in ("step_size", "temperature"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value <= 1000:
                raise TckrError(f"bss.{name} must be a number in (0, 1000], got {value!r}")
        for name in ("alpha_start", "alpha_end", "beta_start"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value <= 1000:
                raise TckrError(f"bss.{name} must be a number in [0, 1000], got {value!r}")
        if not is_number(self.beta_zero_at) or not 0 < self.beta_zero_at <= 1:
            raise TckrError(
                f"bss.beta_zero_at must be a fraction of training in (0, 1], got {self.beta_zero_at!r}"
            )
        if not isinstance(self.require_student_correct, bool):
            raise TckrError(
                f"bss.require_student_correct must be true or false, got {self.require_student_correct!r}"
            )
        return self

    def attack_settings(self) -> dict[str, object]:
        """What decides the boundary samples (recorded in run.json and sample json by the `bss` source)."""
        return {
            "attack_size": self.attack_size,
            "steps": self.steps,
            "step_size": float(self.step_size),
            "require_student_correct": self.require_student_correct,
            "candidates": self.candidates,
            "gap_eps": GAP_EPS,
        }


def bss_schedule(progress_fraction: float, cfg: BSSConfig | None = None) -> tuple[float, float]:
    """(α, β) at `progress_fraction` of training (0 = start, 1 = end; clamped to [0, 1]).

    α = α_end + (α_start − α_end)(1 − p): 4 → 1; β = β_start · max(0, 1 − p / beta_zero_at): 2 → 0 at 75 %.
    The reference evaluates this once per epoch at p = epoch / max_epoch (epochs counted from 1).
    """
    cfg = cfg or BSSConfig()
    if not is_number(progress_fraction):
        raise TckrError(
            f"BSS schedule needs a training progress fraction in [0, 1], got {progress_fraction!r}"
        )
    p = min(1.0, max(0.0, float(progress_fraction)))
    alpha = cfg.alpha_end + (cfg.alpha_start - cfg.alpha_end) * (1.0 - p)
    beta = cfg.beta_start * max(0.0, 1.0 - p / cfg.beta_zero_at)
    return alpha, beta


def soft_cross_entropy(teacher_logits: torch.Tensor, student_logits: torch.Tensor, T: float) -> torch.Tensor:
    """−mean_i Σ_c softmax(t_i/T)_c · log softmax(s_i/T)_c; the teacher side carries no gradient."""
    target = F.softmax(teacher_logits.detach().float() / T, dim=1)  # (B, K)
    return -(target * F.log_softmax(student_logits.float() / T, dim=1)).sum(1).mean()


def bss_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    y: torch.Tensor,
    adv_student_logits: torch.Tensor | None,
    adv_teacher_logits: torch.Tensor | None,
    alpha: float,
    beta: float,
    T: float = 3.0,
) -> torch.Tensor:
    """CE(s(x), y) + α · softCE_T(t(x), s(x)) + β · softCE_T(t(x̃), s(x̃)), each term a batch mean.

    The BSS term is skipped when β = 0 or there are no boundary samples (None or zero rows), as in the
    reference (`if ratio_attack > 0` / `if attack_flag.sum()`).
    """
    loss = F.cross_entropy(student_logits.float(), y) + alpha * soft_cross_entropy(
        teacher_logits, student_logits, T
    )
    if (
        beta > 0
        and adv_student_logits is not None
        and adv_teacher_logits is not None
        and len(adv_student_logits)
    ):
        loss = loss + beta * soft_cross_entropy(adv_teacher_logits, adv_student_logits, T)
    return loss


@dataclass
class BSSInfo:
    """What `boundary_samples` did. N = number of base samples, S = attack steps actually run."""

    index: torch.Tensor  # (N,) positions of the base samples in the input batch, largest score first
    y: torch.Tensor  # (N,) their labels (= the teacher's and, by default, the student's class)
    target: torch.Tensor  # (N,) sampled target class k
    score: torch.Tensor  # (N,) Σ_{c≠y} (p_t,c − p_s,c)²
    gap: torch.Tensor  # (S + 1, N) teacher f_y − f_k before each step and on x̃
    active: torch.Tensor  # (S, N) bool: the sample moved at that step
    teacher_logits: torch.Tensor  # (N, K) teacher logits of x̃ (pass as adv_teacher_logits)
    steps: int  # S


def _check_pair(teacher: Classifier, student: Classifier | None) -> None:
    if student is not None and (teacher.mean, teacher.std) != (student.mean, student.std):
        raise TckrError(
            f"BSS needs teacher and student with the same input normalisation; teacher mean/std "
            f"{teacher.mean}/{teacher.std}, student {student.mean}/{student.std}"
        )


def select_base_samples(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    y: torch.Tensor,
    attack_size: int,
    require_student_correct: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(index (N,), score (N,)): correct samples with the largest Σ_{c≠y}(p_t,c − p_s,c)², largest first."""
    t, s = teacher_logits.detach().float(), student_logits.detach().float()
    correct = t.argmax(1) == y  # (B,)
    if require_student_correct:
        correct &= s.argmax(1) == y
    diff = (F.softmax(t, 1) - F.softmax(s, 1)).pow(2)  # (B, K)
    score = diff.sum(1) - diff.gather(1, y[:, None]).squeeze(1)  # (B,)
    index = correct.nonzero().squeeze(1)  # (M,)
    order = score[index].argsort(descending=True, stable=True)[:attack_size]  # (N,)
    return index[order], score[index[order]]


def sample_targets(teacher_logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Target class per row, from the teacher's non-top classes with p_k = q_k / (1 − max q).

    Uniforms are drawn on the CPU (from `generator` when given), so targets do not depend on the device.
    """
    q, order = F.softmax(teacher_logits.detach().float(), 1).sort(dim=1, descending=True)  # (N, K) each
    q, order = q[:, 1:], order[:, 1:]  # (N, K-1): non-top classes, descending
    u = torch.rand(len(q), generator=generator).to(q.device)  # (N,)
    threshold = q.sum(1) * u  # (N,)
    pos = (q.cumsum(1) < threshold[:, None]).sum(1).clamp(max=q.shape[1] - 1)  # (N,) first cumsum >= u·Σq
    return order.gather(1, pos[:, None]).squeeze(1)


def boundary_samples(
    teacher: Classifier,
    student: Classifier | None,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    cfg: BSSConfig | None = None,
    teacher_logits: torch.Tensor | None = None,
    student_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, BSSInfo]:
    """Boundary-supporting samples of a batch: (x̃ normalised float (N, C, H, W), info).

    x: uint8 (B, H, W, C) or normalised float (B, C, H, W); y: (B,) labels. Pass the trainer's clean-batch
    `teacher_logits` / `student_logits` (B, K) to save forwards (the reference uses the student's logits
    of its training forward); missing ones are computed here without gradients, in eval mode. `student`
    may be None when `student_logits` is given. The teacher runs in eval mode (restored afterwards); no
    parameter receives a gradient. N ≤ cfg.attack_size; N = 0 gives an empty x̃.
    """
    cfg = (cfg or BSSConfig()).validate()
    if student is None and student_logits is None:
        raise TckrError("boundary_samples needs a student or the student's logits of the batch")
    _check_pair(teacher, student)
    xn = teacher.preprocess(x) if x.dtype == torch.uint8 else x  # (B, C, H, W) normalised
    y = y.to(xn.device).long()
    lo, hi = valid_range(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        if teacher_logits is None:
            with torch.no_grad():
                teacher_logits = teacher.net(xn)  # (B, K)
        if student_logits is None:
            assert student is not None
            student_was_training = student.training
            student.eval()
            with torch.no_grad():
                student_logits = student(xn)  # (B, K)
            student.train(student_was_training)
        index, score = select_base_samples(
            teacher_logits, student_logits, y, cfg.attack_size, cfg.require_student_correct
        )
        yb = y[index]  # (N,)
        target = sample_targets(teacher_logits[index], generator)  # (N,)
        x_adv, gaps, actives = _attack(teacher, xn[index].detach().float(), yb, target, cfg, lo, hi)
        with torch.no_grad():
            final = teacher.net(x_adv).float()  # (N, K)
    finally:
        teacher.train(was_training)
    rows = torch.arange(len(index), device=xn.device)
    gaps.append(final[rows, yb] - final[rows, target])
    active = (
        torch.stack(actives) if actives else torch.zeros(0, len(index), dtype=torch.bool, device=xn.device)
    )
    info = BSSInfo(index, yb, target, score, torch.stack(gaps), active, final, len(actives))
    return x_adv, info


def _attack(
    teacher: Classifier,
    x0: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    cfg: BSSConfig,
    lo: float,
    hi: float,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The reference attack loop (module docstring, step 3). Returns (x̃, gaps per step, active per step)."""
    x = x0.clone()  # (N, C, H, W)
    rows = torch.arange(len(x), device=x.device)
    gaps: list[torch.Tensor] = []
    actives: list[torch.Tensor] = []
    if len(x) == 0:
        return x, gaps, actives
    for _ in range(cfg.steps):
        xv = x.detach().requires_grad_(True)
        logits = teacher.net(xv).float()  # (N, K)
        f_y, f_k = logits[rows, y], logits[rows, target]  # (N,) each
        (grad,) = torch.autograd.grad((f_k - f_y).sum(), xv)  # (N, C, H, W)
        active = logits.detach().argmax(1) == y  # (N,): still on the original side of the boundary
        if not bool(active.any()):  # the reference breaks here; one host sync per step, 10 per batch
            break
        gap = (f_y - f_k).detach()  # (N,)
        gaps.append(gap)
        actives.append(active)
        norm = torch.linalg.vector_norm(grad.flatten(1), dim=1).clamp_min(1e-12)  # (N,) 0/0 guard only
        scale = cfg.step_size * active.float() * (gap + GAP_EPS) / norm  # (N,)
        x = (x + scale[:, None, None, None] * grad).clamp(lo, hi)
    return x.detach(), gaps, actives
