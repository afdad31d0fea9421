"""Activation maximisation: images synthesised from a teacher alone (REFERENCE.md §3).

Inputs start from seeded noise and are optimised with Adam to maximise the target class logit (Nikolaidis
et al. 2019) under the usual image priors: L2 decay, total variation, random jitter (a per-sample circular
shift at every step) and, when the teacher has batch norm, DeepInversion's statistics matching (Yin et al.
2020): forward hooks on every `BatchNorm2d` add ‖μ_batch − running_mean‖₂ + ‖σ²_batch − running_var‖₂.

Everything happens in the classifier's normalised input space x = (pixel/255 − mean) / std; x is clamped to
the valid range [(0 − mean)/std, (1 − mean)/std] after every step, and the result is rounded to uint8
(B, H, W, C) — the format of real images, shards and `Classifier.forward`.

The objective per batch is B · (mean_i ℓ_i + w_bn · L_bn) with
ℓ_i = −f_{y_i}(jitter(x_i)) + w_l2 · mean(x_i²) + w_tv · TV(x_i), i.e. Σ_i ℓ_i + B · w_bn · L_bn: the
gradient a sample receives from its own terms does not depend on the batch size. Noise and jitter offsets
come from one `torch.Generator` per sample (seeded by the caller, e.g. `sample_seed(run_seed, index)`), so
without BN matching a sample's trajectory does not depend on which batch it is in (up to floating-point
summation order); BN matching couples the samples of a batch by design (it matches batch statistics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tckr_engine.config import is_number
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier

OBJECTIVES = ("logit", "ce")


@dataclass
class ActivationMaxConfig:
    """Optimisation and regulariser settings; `validate()` turns bad values into one-line `TckrError`s."""

    steps: int = 200  # Adam steps per batch
    lr: float = 0.1  # Adam learning rate on the normalised input (range width 2 at mean = std = 0.5)
    objective: str = "logit"  # logit: maximise f_y (activation maximisation); ce: minimise CE (DeepInversion)
    l2: float = 1e-2  # weight of mean(x²) per sample: decay towards the dataset mean (x = 0)
    tv: float = 1e-1  # weight of the total variation (mean squared difference of neighbouring pixels)
    bn: float = 1e-1  # weight of DeepInversion's BN statistics matching; ignored without BatchNorm2d layers
    jitter: int | None = None  # max circular shift in px per step; None: max(1, image_size // 14); 0: off
    init_std: float = 0.5  # std of the initial Gaussian noise in the normalised space (then clamped)

    def validate(self) -> ActivationMaxConfig:
        """Check every field; raise a one-line TckrError naming the first bad one. Returns self."""
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or not 1 <= self.steps <= 100_000:
            raise TckrError(f"activation_max.steps must be an integer in 1..100000, got {self.steps!r}")
        if not is_number(self.lr) or not 0 < self.lr <= 10:
            raise TckrError(f"activation_max.lr must be a number in (0, 10], got {self.lr!r}")
        if self.objective not in OBJECTIVES:
            raise TckrError(
                f"activation_max.objective must be one of {', '.join(OBJECTIVES)}; got {self.objective!r}"
            )
        for name in ("l2", "tv", "bn"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < 1e6:
                raise TckrError(f"activation_max.{name} must be a number >= 0 (a weight), got {value!r}")
        if self.jitter is not None and (
            isinstance(self.jitter, bool) or not isinstance(self.jitter, int) or not 0 <= self.jitter <= 64
        ):
            raise TckrError(
                f"activation_max.jitter must be an integer in 0..64 (pixels) or unset, got {self.jitter!r}"
            )
        if not is_number(self.init_std) or not 0 <= self.init_std <= 10:
            raise TckrError(f"activation_max.init_std must be a number in [0, 10], got {self.init_std!r}")
        return self

    def resolved(self, image_size: int) -> dict[str, Any]:
        """The settings as recorded in run.json and in every sample's json (jitter resolved, floats)."""
        out = dataclasses.asdict(self)
        out["jitter"] = auto_jitter(image_size) if self.jitter is None else self.jitter
        for name in ("lr", "l2", "tv", "bn", "init_std"):
            out[name] = float(out[name])
        return out


def auto_jitter(image_size: int) -> int:
    """Default jitter: 8 px -> 1, 28 px -> 2, 32 px -> 2, 224 px -> 16."""
    return max(1, image_size // 14)


@dataclass
class ActivationMaxResult:
    """One synthesised batch. Logits and probabilities are the teacher's on the returned uint8 images."""

    images: torch.Tensor  # (B, H, W, C) uint8
    logits: torch.Tensor  # (B, K) float32
    target_prob: torch.Tensor  # (B,) softmax probability of the target class
    target_logit: torch.Tensor  # (B,) target logit after optimisation
    start_logit: torch.Tensor  # (B,) target logit of the initial noise (for diagnostics and tests)


def valid_range(model: Classifier) -> tuple[float, float]:
    """(lo, hi) of the normalised input: pixels 0 and 255 after `Classifier.preprocess`."""
    return (0.0 - model.mean) / model.std, (1.0 - model.mean) / model.std


def to_uint8(x: torch.Tensor, model: Classifier) -> torch.Tensor:
    """Normalised float (B, C, H, W) -> uint8 (B, H, W, C), rounded to the nearest pixel value."""
    pixels = (x.detach().float() * model.std + model.mean).clamp(0, 1)  # (B, C, H, W) in [0, 1]
    return torch.round(pixels * 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Per-sample total variation (B,): mean squared difference of vertical and horizontal neighbours."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).flatten(1).mean(1)  # (B,)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(1)  # (B,)
    return dh + dw


def roll_per_sample(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Circularly shift each image of (B, C, H, W) by its own (dy_b, dx_b) pixels; differentiable."""
    b, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device) - dy[:, None]) % h  # (B, H)
    cols = (torch.arange(w, device=x.device) - dx[:, None]) % w  # (B, W)
    x = x.gather(2, rows[:, None, :, None].expand(b, c, h, w))  # (B, C, H, W)
    return x.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


class BNStatsLoss:
    """DeepInversion's feature-statistics regulariser via forward hooks on every BatchNorm2d of a network.

    While attached, each forward adds ‖μ − running_mean‖₂ + ‖σ² − running_var‖₂ per BN layer (μ, σ² over
    batch and space of the layer's input, biased variance) to `loss`.
    """

    def __init__(self, net: nn.Module) -> None:
        self.layers = [
            m for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None
        ]
        self.loss: torch.Tensor | None = None
        self._handles: list[Any] = []

    def __enter__(self) -> BNStatsLoss:
        self._handles = [m.register_forward_hook(self._hook) for m in self.layers]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        x = inputs[0].float()  # (B, C, H, W)
        mean = x.mean(dim=(0, 2, 3))  # (C,)
        var = x.var(dim=(0, 2, 3), unbiased=False)  # (C,)
        term = torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(
            var - module.running_var
        )
        self.loss = term if self.loss is None else self.loss + term


def _noise_and_jitter(
    seeds: Sequence[int], shape: tuple[int, int, int], steps: int, jitter: int, init_std: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample initial noise (B, C, H, W) and jitter offsets (steps, B, 2), from one seed each (CPU)."""
    noise, offsets = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn((1, *shape), generator=g) * init_std)  # (1, C, H, W)
        offsets.append(torch.randint(-jitter, jitter + 1, (steps, 1, 2), generator=g))  # (steps, 1, 2)
    return torch.cat(noise), torch.cat(offsets, dim=1)


def activation_maximise(
    teacher: Classifier,
    targets: torch.Tensor | Sequence[int],
    seeds: Sequence[int],
    cfg: ActivationMaxConfig | None = None,
) -> ActivationMaxResult:
    """Synthesise a batch of images the teacher assigns to `targets` (B,), from noise seeded by `seeds`.

    Runs on the teacher's device, in fp32; the teacher is used in eval mode (restored afterwards) and its
    parameters get no gradients. See the module docstring for the objective.
    """
    cfg = (cfg or ActivationMaxConfig()).validate()
    device = next(teacher.parameters()).device
    targets = torch.as_tensor(targets, dtype=torch.long).to(device)  # (B,)
    if targets.ndim != 1 or len(targets) != len(seeds) or len(seeds) == 0:
        raise TckrError(
            f"need one seed per target class, got {len(seeds)} seeds for {tuple(targets.shape)} targets"
        )
    num_classes = int(teacher.config["num_classes"])
    if int(targets.min()) < 0 or int(targets.max()) >= num_classes:
        raise TckrError(f"target classes must be in 0..{num_classes - 1}, got {targets.tolist()}")
    size, channels = int(teacher.config["image_size"]), int(teacher.config["in_channels"])
    settings = cfg.resolved(size)
    jitter = settings["jitter"]
    lo, hi = valid_range(teacher)

    init, offsets = _noise_and_jitter(seeds, (channels, size, size), cfg.steps, jitter, cfg.init_std)
    x = init.to(device).clamp_(lo, hi).requires_grad_(True)  # (B, C, H, W) normalised
    offsets = offsets.to(device)  # (steps, B, 2)
    opt = torch.optim.Adam([x], lr=cfg.lr)
    bn = BNStatsLoss(teacher.net)
    use_bn = cfg.bn > 0 and bool(bn.layers)
    rows = torch.arange(len(targets), device=device)  # (B,)

    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            start_logit = teacher.net(x)[rows, targets].float()  # (B,)
        for step in range(cfg.steps):
            xj = roll_per_sample(x, offsets[step, :, 0], offsets[step, :, 1]) if jitter else x
            if use_bn:
                bn.loss = None
                with bn:
                    logits = teacher.net(xj)  # (B, K)
            else:
                logits = teacher.net(xj)  # (B, K)
            logits = logits.float()
            if cfg.objective == "logit":
                main = -logits[rows, targets]  # (B,)
            else:
                main = F.cross_entropy(logits, targets, reduction="none")  # (B,)
            per_sample = main + cfg.l2 * x.pow(2).flatten(1).mean(1) + cfg.tv * total_variation(x)  # (B,)
            loss = per_sample.sum()
            if use_bn and bn.loss is not None:
                loss = loss + len(targets) * cfg.bn * bn.loss
            (grad,) = torch.autograd.grad(loss, x)  # parameters get no .grad
            x.grad = grad
            opt.step()
            with torch.no_grad():
                x.clamp_(lo, hi)
        images = to_uint8(x, teacher)  # (B, H, W, C)
        with torch.no_grad():
            final = teacher(images).float()  # (B, K): the teacher on what will be stored
    finally:
        teacher.train(was_training)
    probs = final.softmax(1)  # (B, K)
    return ActivationMaxResult(images, final, probs[rows, targets], final[rows, targets], start_logit)


def class_for_index(index: int, num_classes: int) -> int:
    """Class-balanced assignment, as the engine's BatchScheduler: sample i gets class i % C."""
    return index % num_classes
