"""Canonical LiRA (Carlini et al., "Membership Inference Attacks From First Principles", 2022).

Setup (REFERENCE.md §1.7 and §5). The *challenge set* (the pool) is M real images the attacked model's
recipe trained on (the train split minus the teacher's validation split, `train_val_split`) followed by M
images of the real test split. K shadow models of the same architecture are each trained on a random half
of the pool, balanced so every example is IN for exactly K/2 of them (`shadows.py`), and their scores on
the pool are cached. Attacking a model then costs only its own forward passes.

Score of an example (x, y) under a model: the logit-scaled confidence `log p_y − log Σ_{y'≠y} p_y'`,
computed from log_softmax (logsumexp over the other classes, so p_y → 1 stays finite), once per
deterministic augmentation (identity, mirror where the dataset is mirror-safe, ±1 px shifts). The
augmentations form a multivariate observation with a diagonal Gaussian, as in Carlini's code.

Variants, all "higher = member":
- `lira-online`: per-example IN and OUT Gaussians (median, std over the shadows), log likelihood ratio;
- `lira-offline`: per-example OUT Gaussian only, one-sided: log P(score_out <= observed score);
- `*-global-var`: the same with one pooled within-example variance instead of per-example variances;
- `loss` (−cross-entropy of the target on the un-augmented example) and `confidence` (max softmax
  probability) baselines, which need no shadows.
`max_auc` is the maximum AUC over the LiRA variants, the figure TCKR reports (they take the maximum over 12).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tckr_engine.config import check_positive, check_training_device
from tckr_engine.data import load_dataset, train_val_split
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import write_json
from tckr_engine.models.classifier import Classifier, load_classifier
from tckr_engine.privacy.metrics import LOW_FPRS, plot_roc, roc, summarize
from tckr_engine.train.fit import check_recipe

if TYPE_CHECKING:
    from tckr_engine.privacy.shadows import Shadows

log = logging.getLogger(__name__)

Aug = tuple[bool, int, int]  # (mirror, dy, dx): mirror first, then translate by (dy, dx) px, zero fill
IDENTITY: Aug = (False, 0, 0)
_SHIFTS = ((0, 0), (0, 1), (0, -1), (1, 0), (-1, 0))  # identity and ±1 px along each axis
_MIN_STD = 1e-3  # floor on a Gaussian's std (logit units) so a degenerate example cannot give inf / nan
LIRA_VARIANTS = ("lira-online", "lira-online-global-var", "lira-offline", "lira-offline-global-var")
RUNTIME_FIELDS = ("device", "threads", "eval_batch_size")  # do not change what the shadows are


@dataclass
class LiraConfig:
    """Shadow-model and challenge-set settings; `validate()` turns bad values into one-line `TckrError`s.

    The training recipe should be the attacked model's (`teacher_setup` copies it from a teacher run).
    """

    num_shadows: int = 16  # K, even (balanced IN/OUT); Carlini et al. report 16 as a strong setting (§5)
    members: int = 1000  # M per side: M train images + M test images, as in TCKR (REFERENCE §1.7)
    arch: str = "resnet-small"  # small-cnn | resnet-small | timm:<name>: the attacked model's
    width: int | None = None  # small-cnn / resnet-small base width; None: the architecture's default
    init_weights: str | None = None  # timm:<name> only: the local weights file the target started from
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3  # REFERENCE §1.6 (AdamW, cosine)
    weight_decay: float = 5e-5  # REFERENCE §1.6
    label_smoothing: float = 0.1  # REFERENCE §1.6
    shift: int | None = None  # training shift in px; None: `auto_shift` of the image size, as the teacher
    hflip: bool | None = None  # training flips and the mirror score augmentation; None: off for digits only
    augment: bool = True  # score on identity + mirror + ±1 px shifts (5 or 10 views); False: identity only
    val_fraction: float = 0.1  # the teacher's: members come from train minus its validation split
    split_seed: int = 0  # the teacher's seed, which drew that validation split
    seed: int = 0  # challenge draw, membership masks, shadow initialisation and data order
    device: str = "cpu"  # cpu | cuda
    threads: int | None = None  # torch CPU threads; None: torch's default
    eval_batch_size: int = 512  # images per scoring forward (times the number of augmentations)

    def validate(self) -> LiraConfig:
        """Check every field; raise a one-line TckrError naming the first bad one. Returns self."""
        for name in ("members", "epochs", "batch_size", "eval_batch_size"):
            check_positive(name, getattr(self, name))
        check_positive("num_shadows", self.num_shadows)
        if self.num_shadows < 4 or self.num_shadows % 2:
            raise TckrError(
                f"num_shadows must be an even number >= 4 (each example is IN for exactly half of them and "
                f"online LiRA needs >= 2 IN and OUT scores), got {self.num_shadows}"
            )
        check_recipe(self)  # the attacked model's recipe: the teacher's checks
        if not 0 <= self.val_fraction < 1:
            raise TckrError(f"val_fraction must be in [0, 1) (the teacher's), got {self.val_fraction}")
        for name in ("seed", "split_seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TckrError(f"{name} must be a non-negative integer, got {value!r}")
        check_training_device(self.device)
        return self


def teacher_setup(teacher_dir: str | Path, **overrides: Any) -> tuple[LiraConfig, str]:
    """`(LiraConfig, dataset spec)` copying a finished teacher run's recipe and validation split.

    Reads `metrics.json` of `train_teacher`'s folder: architecture, width, epochs, batch size, optimiser,
    label smoothing, the resolved shift / flip, and the `val_fraction` and seed of its validation split.
    `overrides` replace any field (e.g. `num_shadows=64, epochs=5`).
    """
    path = Path(teacher_dir).expanduser() / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
        c, aug = metrics["config"], metrics["augmentation"]
        base = {k: c[k] for k in ("arch", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing")}
        base |= {"width": c.get("width"), "init_weights": c.get("init_weights")}
        base |= {"shift": aug["shift"], "hflip": aug["hflip"], "val_fraction": c["val_fraction"]}
        base |= {"split_seed": c["seed"], "device": c.get("device", "cpu"), "threads": c.get("threads")}
        dataset = str(metrics["dataset"])
    except (FileNotFoundError, NotADirectoryError):
        raise TckrError(f"no finished teacher run at {path.parent}: {path.name} is missing") from None
    except OSError as e:
        raise TckrError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:  # ValueError: bad JSON or not UTF-8
        raise TckrError(f"cannot read the teacher recipe from {path}: {type(e).__name__} {e}") from None
    unknown = set(overrides) - {f.name for f in dataclasses.fields(LiraConfig)}
    if unknown:
        raise TckrError(f"unknown LiRA setting(s): {', '.join(sorted(unknown))}")
    return LiraConfig(**(base | overrides)).validate(), dataset


@dataclass(frozen=True, eq=False)
class ChallengeSet:
    """The pool: `members` train images the target saw, then as many test images it did not."""

    dataset: str  # the dataset's name (ImageDataset.name)
    images: np.ndarray  # (2M, H, W, C) uint8
    labels: np.ndarray  # (2M,) int64
    classes: tuple[str, ...]
    member_index: np.ndarray  # (M,) indices into the train split
    nonmember_index: np.ndarray  # (M,) indices into the test split

    @property
    def members(self) -> int:
        return len(self.member_index)

    @property
    def is_member(self) -> np.ndarray:
        """(2M,) bool: True for the first M examples, the attacked model's training images."""
        return np.arange(len(self.labels)) < self.members

    def sha256(self) -> str:
        """Content hash of the pool (images, labels, class names)."""
        h = hashlib.sha256(np.ascontiguousarray(self.images).tobytes())
        h.update(self.labels.astype("<i8").tobytes())
        h.update(json.dumps(list(self.classes)).encode())
        return h.hexdigest()


def build_challenge(
    dataset: str, members: int, val_fraction: float = 0.1, split_seed: int = 0, seed: int = 0
) -> ChallengeSet:
    """Draw M members from `dataset`'s train split minus `train_val_split(val_fraction, split_seed)` and M
    non-members from its test split, both uniformly with `seed` and kept in index order."""
    train = load_dataset(dataset, "train")
    train_idx, _ = train_val_split(train.labels, val_fraction, seed=split_seed)
    test = load_dataset(dataset, "test")
    if test.classes != train.classes:
        raise TckrError(
            f"{dataset}: test classes {list(test.classes)} differ from train {list(train.classes)}"
        )
    if members > len(train_idx) or members > len(test):
        raise TckrError(
            f"{dataset} is too small for members={members}: it has {len(train_idx)} training images "
            f"(outside the validation split) and {len(test)} test images; lower members to at most "
            f"{min(len(train_idx), len(test))}"
        )
    rng = np.random.default_rng([seed, 0x11A])
    member_index = np.sort(rng.choice(train_idx, members, replace=False))  # (M,)
    nonmember_index = np.sort(rng.choice(len(test), members, replace=False))  # (M,)
    images = np.concatenate([train.images[member_index], test.images[nonmember_index]])  # (2M, H, W, C)
    labels = np.concatenate([train.labels[member_index], test.labels[nonmember_index]])  # (2M,)
    return ChallengeSet(train.name, images, labels, train.classes, member_index, nonmember_index)


def augmentations(mirror: bool, augment: bool = True) -> list[Aug]:
    """The deterministic score views: identity first, then ±1 px shifts, each also mirrored if `mirror`."""
    if not augment:
        return [IDENTITY]
    return [(flip, dy, dx) for flip in ((False, True) if mirror else (False,)) for dy, dx in _SHIFTS]


def apply_augmentation(images: torch.Tensor, aug: Aug) -> torch.Tensor:
    """uint8 (B, H, W, C) -> (B, H, W, C): optional mirror, then translation by (dy, dx) with zero fill."""
    flip, dy, dx = aug
    x = images.flip(2) if flip else images  # (B, H, W, C)
    if dy or dx:
        _, h, w, _ = x.shape
        p = max(abs(dy), abs(dx))
        padded = F.pad(x, (0, 0, p, p, p, p))  # (B, H+2p, W+2p, C)
        x = padded[:, p - dy : p - dy + h, p - dx : p - dx + w]  # (B, H, W, C): out[i, j] = in[i-dy, j-dx]
    return x


@torch.no_grad()
def log_probs(model: Classifier, images: np.ndarray, augs: list[Aug], batch_size: int = 512) -> np.ndarray:
    """log_softmax (A, N, K) float64 of `model` in eval mode on every view of uint8 `images` (N, H, W, C)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = np.empty((len(augs), len(images), model.config["num_classes"]), np.float64)
    for i in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(device)  # (b, H, W, C)
        views = torch.cat([apply_augmentation(batch, a) for a in augs])  # (A*b, H, W, C)
        logits = model(views).double()  # (A*b, K); float64 so log p_y of a confident model stays exact
        out[:, i : i + len(batch)] = F.log_softmax(logits, 1).view(len(augs), len(batch), -1).cpu().numpy()
    model.train(was_training)
    return out


def lira_score(logp: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit-scaled confidence `log p_y − log Σ_{y'≠y} p_y'`: log-probs (..., N, K) -> (..., N)."""
    from scipy.special import logsumexp

    idx = np.broadcast_to(np.asarray(labels)[:, None], (*logp.shape[:-1], 1))  # (..., N, 1)
    log_py = np.take_along_axis(logp, idx, -1)[..., 0]  # (..., N)
    others = logp.copy()
    np.put_along_axis(others, idx, -np.inf, -1)
    return log_py - logsumexp(others, axis=-1)  # (..., N)


def _gaussians(scores: np.ndarray, inside: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-example median and std of shadow `scores` (K, A, N) where `inside` (K, N); plus the pooled std."""
    s = np.where(inside[:, None, :], scores, np.nan)  # (K, A, N)
    mu = np.nanmedian(s, axis=0)  # (A, N); Carlini's code uses the median for the mean
    sd = np.nanstd(s, axis=0)  # (A, N)
    pooled = float(np.sqrt(np.mean(sd**2)))  # one within-example std for all examples and views
    return mu, np.maximum(sd, _MIN_STD), max(pooled, _MIN_STD)


def _log_normal(x: np.ndarray, mu: np.ndarray, sd: np.ndarray | float) -> np.ndarray:
    return -0.5 * ((x - mu) / sd) ** 2 - np.log(sd) - 0.5 * np.log(2 * np.pi)


def lira_variants(target: np.ndarray, shadow_scores: np.ndarray, masks: np.ndarray) -> dict[str, np.ndarray]:
    """The four LiRA membership scores (N,) of target scores (A, N), shadow scores (K, A, N), masks (K, N)."""
    from scipy.special import log_ndtr

    if (masks.sum(0) < 2).any() or ((~masks).sum(0) < 2).any():
        raise TckrError("every pool example needs >= 2 IN and >= 2 OUT shadow models; retrain the shadows")
    mu_in, sd_in, g_in = _gaussians(shadow_scores, masks)
    mu_out, sd_out, g_out = _gaussians(shadow_scores, ~masks)
    # Diagonal multivariate Gaussian over the views: per-view log densities are averaged (Carlini's code).
    return {
        "lira-online": (_log_normal(target, mu_in, sd_in) - _log_normal(target, mu_out, sd_out)).mean(0),
        "lira-online-global-var": (
            _log_normal(target, mu_in, g_in) - _log_normal(target, mu_out, g_out)
        ).mean(0),
        "lira-offline": log_ndtr((target - mu_out) / sd_out).mean(0),
        "lira-offline-global-var": log_ndtr((target - mu_out) / g_out).mean(0),
    }


def attack(
    target_model: Classifier | str | Path,
    shadows: Shadows,
    *,
    batch_size: int | None = None,
    device: str | None = None,
) -> dict[str, Any]:
    """Run LiRA (4 variants) and the loss / confidence baselines against `target_model` on the pool.

    Returns `{"summary": json-serialisable dict, "curves": {variant: (fpr, tpr)}, "scores": {variant: (2M,)},
    "is_member": (2M,) bool}`. The summary holds, per variant, `auc`, `tpr_at_0.1%_fpr`, `tpr_at_1%_fpr`,
    plus `max_auc` / `max_auc_variant` over the LiRA variants and the target's accuracy on members and
    non-members (its generalisation gap on the pool). The model is moved to `device` (default: the shadows'
    device). With M members the FPR resolution is 1/M: TPR at 0.1 % FPR needs M >= 1000 to mean anything.
    """
    model = load_classifier(target_model) if isinstance(target_model, str | Path) else target_model
    cfg, ch = shadows.config, shadows.challenge
    if tuple(model.classes) != tuple(ch.classes):
        raise TckrError(f"target classes {list(model.classes)} differ from the pool's {list(ch.classes)}")
    shape = (model.config["image_size"], model.config["in_channels"])
    if shape != (ch.images.shape[1], ch.images.shape[3]):
        raise TckrError(
            f"target expects {shape[0]} px x {shape[1]} channel(s), the pool is {ch.images.shape[1:]}"
        )
    arch_keys = ("arch", "width")
    target_arch = {k: model.config.get(k) for k in arch_keys}
    shadow_arch = {k: shadows.model_config.get(k) for k in arch_keys}
    if target_arch != shadow_arch:
        log.warning("target %s differs from the shadow models %s: LiRA is weaker", target_arch, shadow_arch)
    model.to(torch.device(device or cfg.device))

    logp = log_probs(model, ch.images, shadows.augmentations, batch_size or cfg.eval_batch_size)  # (A, 2M, K)
    target = lira_score(logp, ch.labels)  # (A, 2M)
    scores = lira_variants(target, shadows.scores, shadows.masks)
    identity = shadows.augmentations.index(IDENTITY)
    scores["loss"] = logp[identity, np.arange(len(ch.labels)), ch.labels]  # −cross-entropy, (2M,)
    scores["confidence"] = np.exp(logp[identity]).max(1)  # (2M,)

    is_member = ch.is_member
    variants = {name: summarize(s, is_member) for name, s in scores.items()}
    curves = {name: roc(s, is_member) for name, s in scores.items()}
    best = max(LIRA_VARIANTS, key=lambda v: variants[v]["auc"])
    correct = logp[identity].argmax(1) == ch.labels  # (2M,)
    summary = {
        "max_auc": variants[best]["auc"],
        "max_auc_variant": best,
        "variants": variants,
        "low_fprs": list(LOW_FPRS),
        "dataset": ch.dataset,
        "members": ch.members,
        "num_shadows": int(shadows.masks.shape[0]),
        "augmentations": [list(a) for a in shadows.augmentations],
        "target": {
            **target_arch,
            "accuracy_members": float(correct[is_member].mean()),
            "accuracy_nonmembers": float(correct[~is_member].mean()),
        },
        "shadows": {"path": str(shadows.path), "fingerprint": shadows.fingerprint, **shadow_arch},
        "shadow_arch_matches": target_arch == shadow_arch,
    }
    log.info(
        "LiRA on %d members + %d non-members, %d shadows: max AUC %.4f (%s), loss-threshold AUC %.4f",
        ch.members, ch.members, summary["num_shadows"], summary["max_auc"], best, variants["loss"]["auc"],
    )  # fmt: skip
    return {"summary": summary, "curves": curves, "scores": scores, "is_member": is_member}


def save_attack(result: dict[str, Any], out_dir: str | Path, title: str = "LiRA") -> tuple[Path, Path]:
    """Write `mia.json` (the summary) and `mia_roc.png` (log-log ROC of every variant) into `out_dir`."""
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    variants = result["summary"]["variants"]
    curves = {f"{name} (AUC {variants[name]['auc']:.3f})": c for name, c in result["curves"].items()}
    png = plot_roc(curves, out / "mia_roc.png", title)
    write_json(out / "mia.json", result["summary"])
    return out / "mia.json", png
