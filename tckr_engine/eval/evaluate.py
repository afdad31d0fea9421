"""`tckr-engine evaluate`: real-test accuracy, membership inference (LiRA + baselines) and AOP per classifier.

The shadow models are trained once per (dataset, teacher split, LiRA setup) in `PRIVACY/shadows/` and reused
for every model attacked on the same pool (teacher, students, later runs). Members are real images the
teacher trained on (the train split minus its validation split); non-members are real test images. A
student trained only on synthetic data never saw either, so its attack AUC measures what leaked through the
generator and the teacher's soft labels.

AOP (REFERENCE.md §1) = accuracy% / (AUC% / 50)², with TCKR's AUC: the maximum over the LiRA variants.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tckr_engine.allocator import keep_freed_memory
from tckr_engine.data import load_dataset
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import write_json
from tckr_engine.models.classifier import load_classifier
from tckr_engine.privacy import LiraConfig, Shadows, aop, attack, teacher_setup, train_shadows
from tckr_engine.train.fit import evaluate_accuracy

log = logging.getLogger(__name__)

SHADOWS_DIR = "shadows"
# the variants the report plots and tabulates (all variants stay in the JSON)
ROC_VARIANTS = ("lira-online", "loss")


def lira_settings(table: dict[str, Any]) -> dict[str, Any]:
    """Check a `[evaluate]`-style table of LiraConfig overrides (keys and values); returns it unchanged."""
    names = {f for f in LiraConfig.__dataclass_fields__}
    unknown = sorted(set(table) - names)
    if unknown:
        raise TckrError(f"unknown LiRA setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
    LiraConfig(**table).validate()
    return table


def prepare_shadows(
    settings: dict[str, Any],
    teacher: str | Path,
    privacy_dir: str | Path,
    progress: Callable[..., None] | None = None,
    shadows_dir: str | Path | None = None,
) -> Shadows:
    """Train or reuse the shadow models for attacks on models of `teacher`'s data and split.

    The shadows copy the teacher's training recipe (architecture, optimiser, augmentation, validation
    split) with `settings` (LiraConfig fields) on top. In `privacy_dir/shadows` a changed setup replaces the
    old shadows; a shared `shadows_dir` (another run's shadows) is reused or finished when its setup matches
    and never replaced: another setup there is a one-line error.
    """
    cfg, dataset = teacher_setup(teacher, **settings)
    if shadows_dir is not None:
        shared = Path(shadows_dir).expanduser()
        log.info("shadow models: the shared folder %s", shared)
        return train_shadows(cfg, dataset, shared, progress, overwrite=False)
    return train_shadows(cfg, dataset, Path(privacy_dir).expanduser() / SHADOWS_DIR, progress, overwrite=True)


def evaluate_model(model_path: str | Path, shadows: Shadows, dataset: str | None = None) -> dict[str, Any]:
    """Accuracy on the real test split, the attack summary and AOP of one classifier folder.

    Returns a JSON-able dict: `test_accuracy`, `privacy` (attack summary: per-variant AUC / TPR at 0.1 % and
    1 % FPR, `max_auc`), `aop`, and `roc` {variant: (fpr list, tpr list)} for the plotted variants.
    """
    path = Path(model_path).expanduser()
    model = load_classifier(path)
    dataset = dataset or shadows.challenge.dataset
    test = load_dataset(dataset, "test")
    if tuple(test.classes) != tuple(model.classes):
        raise TckrError(f"{path} was trained on classes {list(model.classes)}, not {dataset}'s")
    model.to(shadows.config.device)
    accuracy = evaluate_accuracy(model, test, shadows.config.eval_batch_size)
    result = attack(model, shadows)
    summary = result["summary"]
    score = aop(100 * accuracy, 100 * summary["max_auc"])
    log.info("%s: test acc %.4f, max LiRA AUC %.4f, AOP %.2f", path, accuracy, summary["max_auc"], score)
    return {
        "model": str(path),
        "test_accuracy": accuracy,
        "privacy": summary,
        "aop": score,
        "roc": {v: [a.tolist() for a in _thin(*result["curves"][v])] for v in ROC_VARIANTS},
    }


def _thin(fpr: Any, tpr: Any, points: int = 400) -> tuple[Any, Any]:
    """At most ~`points` ROC points, log-spaced in FPR (what a log-log plot shows), ends kept."""
    import numpy as np

    if len(fpr) <= points:
        return fpr, tpr
    grid = np.unique(np.concatenate([[0.0], np.logspace(-5, 0, points)]))
    idx = np.unique(np.clip(np.searchsorted(fpr, grid, side="right") - 1, 0, len(fpr) - 1))
    return fpr[idx], tpr[idx]


@keep_freed_memory()  # no page faults for every batch's tensors (allocator.py)
def evaluate(
    models: dict[str, str | Path],
    teacher: str | Path,
    out: str | Path,
    settings: dict[str, Any] | None = None,
    *,
    shards: str | Path | None = None,
    progress: Callable[..., None] | None = None,
    shadows_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate named classifier folders against one shadow set; writes `out/<name>.json` and a report.

    `teacher` fixes the data split the attack uses (its members); it is evaluated too unless it is already
    among `models`. With `shards`, the synthetic set's teacher agreement and Fréchet distance are added.
    `shadows_dir`: a shared shadow folder (see `prepare_shadows`) instead of `out/shadows`.
    """
    from tckr_engine.eval.quality import synthetic_quality
    from tckr_engine.report import write_report

    out = Path(out).expanduser()
    teacher = Path(teacher).expanduser()
    named = dict(models)
    if all(Path(p).expanduser().resolve() != teacher.resolve() for p in named.values()):
        named = {"teacher": teacher, **named}
    _check_models(named, teacher)  # a typo or a model of other classes fails before any shadow trains
    shadows = prepare_shadows(lira_settings(dict(settings or {})), teacher, out, progress, shadows_dir)
    out.mkdir(parents=True, exist_ok=True)  # with shared shadows nothing has made it yet
    results = []
    for name, path in named.items():
        result = evaluate_model(path, shadows)
        write_json(out / f"{name}.json", result)
        is_teacher = Path(path).expanduser().resolve() == teacher.resolve()
        origin = {"trained_on": "real train split"} if is_teacher else _origin(path)
        results.append({"name": name, "path": str(path), **origin, **result})
    report: dict[str, Any] = {
        "title": f"tckr-engine evaluate: {shadows.challenge.dataset}",
        "dataset": shadows.challenge.dataset,
        "models": results,
        "classes": list(shadows.challenge.classes),
    }
    if shards is not None:
        report["quality"] = synthetic_quality(shards, teacher)
        report["shards"] = str(shards)
    write_report(out, report)
    return report


def _check_models(named: dict[str, Any], teacher: Path) -> None:
    """Every model folder loads and has the teacher's classes (else one TckrError naming the first)."""
    classes = load_classifier(teacher).classes
    for name, path in named.items():
        model = load_classifier(path)
        if tuple(model.classes) != tuple(classes):
            raise TckrError(
                f"model {name} ({path}) has classes {list(model.classes)}, the teacher {list(classes)}; "
                "evaluate models of the teacher's dataset"
            )


def _origin(path: str | Path) -> dict[str, Any]:
    """What a classifier folder was trained on, from its metrics.json: `trained_on` (text) and, for a student
    of synthetic shards, `synthetic_images` (per round: the set size) and `labels` (the report's sweep)."""
    try:
        metrics = json.loads((Path(path).expanduser() / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"trained_on": "unknown"}
    rounds = (metrics.get("regeneration") or {}).get("rounds")
    if isinstance(rounds, list) and rounds:
        images = sum(int(r.get("images", 0)) for r in rounds)
        labels = metrics.get("labels", "?")
        return {
            "trained_on": f"{images:,} synthetic images ({labels} labels, {len(rounds)} round(s))",
            "synthetic_images": int(rounds[0].get("images", 0)),
            "labels": labels,
        }
    return {"trained_on": f"real {metrics.get('dataset', '?')} train split"}
