"""Membership-inference evaluation: canonical LiRA with cached shadow models, baselines, metrics, AOP."""

from tckr_engine.privacy.lira import (
    ChallengeSet,
    LiraConfig,
    attack,
    build_challenge,
    lira_score,
    save_attack,
    teacher_setup,
)
from tckr_engine.privacy.metrics import aop, auc, plot_roc, roc, summarize, tpr_at_fpr
from tckr_engine.privacy.shadows import Shadows, balanced_masks, load_shadows, train_shadows

__all__ = [
    "ChallengeSet",
    "LiraConfig",
    "Shadows",
    "aop",
    "attack",
    "auc",
    "balanced_masks",
    "build_challenge",
    "lira_score",
    "load_shadows",
    "plot_roc",
    "roc",
    "save_attack",
    "summarize",
    "teacher_setup",
    "tpr_at_fpr",
    "train_shadows",
]
