"""Membership-inference metrics: ROC, AUC, TPR at a fixed low FPR, TCKR's AOP, and a log-log ROC plot.

Every score follows one convention: a higher score means "more likely a member". TPR at 0.1 % and 1 % FPR
are what Carlini et al. ("Membership Inference Attacks From First Principles") ask to report next to AUC,
since AUC is dominated by the easy, high-FPR regime that says little about privacy (REFERENCE.md §5).
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from tckr_engine.fsutil import atomic_write

log = logging.getLogger(__name__)

LOW_FPRS = (0.001, 0.01)  # the operating points reported next to AUC (0.1 % and 1 % FPR)


def roc(scores: np.ndarray, is_member: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve `(fpr, tpr)` of membership `scores` (N,) against boolean ground truth `is_member` (N,).

    Every threshold is kept (no dropping of collinear points) so `tpr_at_fpr` is exact.
    """
    from sklearn.metrics import roc_curve  # local import: sklearn is slow to import

    scores, is_member = np.asarray(scores, np.float64), np.asarray(is_member, bool)
    if scores.shape != is_member.shape or scores.ndim != 1:
        raise ValueError(f"need scores (N,) and is_member (N,), got {scores.shape} and {is_member.shape}")
    if is_member.all() or not is_member.any():
        raise ValueError("is_member needs both members and non-members to draw a ROC curve")
    if not np.isfinite(scores).all():
        raise ValueError(f"{int((~np.isfinite(scores)).sum())} membership scores are not finite")
    fpr, tpr, _ = roc_curve(is_member, scores, drop_intermediate=False)
    return fpr, tpr


def auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under a ROC curve (trapezoids); 0.5 is chance, 1 perfect separation, 0 perfectly reversed."""
    return float(np.trapezoid(tpr, fpr)) if hasattr(np, "trapezoid") else float(np.trapz(tpr, fpr))


def tpr_at_fpr(fpr: np.ndarray, tpr: np.ndarray, target: float) -> float:
    """Highest TPR among the curve's thresholds with FPR <= `target` (0.0 when none qualifies)."""
    ok = np.asarray(fpr) <= target
    return float(np.asarray(tpr)[ok].max()) if ok.any() else 0.0


def summarize(scores: np.ndarray, is_member: np.ndarray) -> dict[str, float]:
    """`{"auc", "tpr_at_0.1%_fpr", "tpr_at_1%_fpr"}` of membership `scores` (N,) against `is_member` (N,)."""
    fpr, tpr = roc(scores, is_member)
    out = {"auc": auc(fpr, tpr)}
    for target in LOW_FPRS:
        out[f"tpr_at_{target * 100:g}%_fpr"] = tpr_at_fpr(fpr, tpr, target)
    return out


def aop(accuracy_pct: float, auc_pct: float) -> float:
    """TCKR's Accuracy-Over-Privacy, `accuracy / (AUC / 50)²`, both in percent (REFERENCE.md §1).

    A model at chance-level MIA (AUC 50 %) keeps its accuracy as AOP; a more attackable model is penalised
    quadratically. Example: CIFAR-10 teacher, 97.52 % accuracy at 53.89 % AUC -> 83.95.
    """
    if not 0 <= accuracy_pct <= 100:
        raise ValueError(f"accuracy_pct must be a percentage in [0, 100], got {accuracy_pct}")
    if not 1 < auc_pct <= 100:
        raise ValueError(f"auc_pct must be a percentage in (1, 100] (AUC 0.54 is 54.0 here), got {auc_pct}")
    return accuracy_pct / (auc_pct / 50.0) ** 2


def plot_roc(
    curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "Membership inference"
) -> Path:
    """Write a log-log ROC plot (PNG) of `{label: (fpr, tpr)}` with the chance diagonal; returns the path.

    Log axes show the low-FPR regime that matters (Carlini et al.); the file is written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # object API: no global pyplot state, no display backend

    path = Path(path).expanduser()
    fig = Figure(figsize=(5, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lowest = 1.0
    for label, (fpr, tpr) in curves.items():
        fpr, tpr = np.asarray(fpr), np.asarray(tpr)
        positive = fpr[fpr > 0]
        lowest = min(lowest, float(positive.min()) if positive.size else 1.0)
        ax.plot(fpr, tpr, label=label, linewidth=1.2)
    lo = max(1e-5, min(1e-3, lowest / 2))
    ax.plot([lo, 1], [lo, 1], "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, 1)
    ax.set_ylim(lo, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, buf.getvalue())
    log.info("ROC plot -> %s", path)
    return path
