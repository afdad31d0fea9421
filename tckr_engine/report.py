"""The run report: `report.md` + `report.json` + figures (ROC, per-class sample grid, size sweep).

Input is the plain dict that `eval.evaluate` produces per model (accuracy, attacks, AOP) plus what the run
knows about itself; this module only formats and plots, it computes no metric. Figures use matplotlib's Agg
backend and every file is written atomically, `report.json` last.
"""

from __future__ import annotations

import io
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write, write_json

log = logging.getLogger(__name__)

REPORT_MD = "report.md"
REPORT_JSON = "report.json"
FIGURES = "figures"


def _pct(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _save_figure(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    atomic_write(path, buf.getvalue())


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def shard_samples_per_class(shard_folder: str | Path, per_class: int) -> dict[int, list[np.ndarray]]:
    """The first `per_class` images of each class in a shard folder, streamed (stops once it has enough)."""
    import webdataset as wds
    from PIL import Image

    folder = Path(shard_folder)
    try:
        index = json.loads((folder / "index.json").read_text())
        urls = [str(folder / e["url"]) for e in index["shardlist"]]
        num_classes = len(json.loads((folder / "run.json").read_text())["spec"]["classes"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise TckrError(
            f"{folder} is not a finished shard folder ({e}); rerun 'tckr-engine generate'"
        ) from None
    found: dict[int, list[np.ndarray]] = {c: [] for c in range(num_classes)}
    for sample in wds.WebDataset(urls, shardshuffle=False).decode():
        cls = int(sample["cls"])
        if len(found.get(cls, ())) >= per_class:
            continue
        key = next(k for k in ("png", "jpg", "webp") if k in sample)
        with Image.open(io.BytesIO(sample[key])) as im:
            found.setdefault(cls, []).append(
                np.asarray(im.convert("L" if im.mode in ("L", "I", "1") else "RGB"))
            )
        if all(len(v) >= per_class for v in found.values()):
            break
    return found


def plot_samples(shard_folder: str | Path, classes: list[str], path: Path, per_class: int = 8) -> Path:
    """A grid: one row per class (its name on the left), `per_class` generated images per row."""
    plt = _pyplot()
    found = shard_samples_per_class(shard_folder, per_class)
    rows = len(classes)
    fig, axes = plt.subplots(rows, per_class, figsize=(per_class * 0.9, rows * 0.9), squeeze=False)
    for r, name in enumerate(classes):
        for k in range(per_class):
            ax = axes[r][k]
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(False)
            images = found.get(r, [])
            if k < len(images):
                image = images[k]
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
            if k == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("generated samples per class", fontsize=9)
    _save_figure(fig, path)
    return path


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str) -> Path:
    """Log-log ROC curves (the way LiRA reports them: the low-FPR region is what matters)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    floor = 1e-4
    for label, (fpr, tpr) in curves.items():
        ax.plot(np.maximum(fpr, floor), np.maximum(tpr, floor), label=label, lw=1.2)
    ax.plot([floor, 1], [floor, 1], "k--", lw=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(floor, 1)
    ax.set_ylim(floor, 1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    _save_figure(fig, path)
    return path


SweepPoint = tuple[int, float, float, float]  # synthetic images, test accuracy %, max AUC %, AOP


def _sweep_point(m: dict[str, Any], images: int) -> SweepPoint:
    auc = (m.get("privacy") or {}).get("max_auc")
    aop = m.get("aop")
    nan = float("nan")
    return (images, 100 * m["test_accuracy"], nan if auc is None else 100 * auc, nan if aop is None else aop)


def sweep_series(rows: list[dict[str, Any]]) -> dict[str, list[SweepPoint]]:
    """Students' (images, accuracy %, max attack AUC %, AOP) by label kind, sorted by synthetic-set size."""
    series: dict[str, list[SweepPoint]] = {}
    for r in sorted(rows, key=lambda r: r["synthetic_images"]):
        point = _sweep_point(r, int(r["synthetic_images"]))
        series.setdefault(f"{r.get('labels') or 'soft'} labels", []).append(point)
    return series


def sweep_reference(models: list[dict[str, Any]]) -> tuple[str, SweepPoint] | None:
    """The sweep's dashed reference: the first model not trained on synthetic images (the teacher)."""
    return next(((m["name"], _sweep_point(m, 0)) for m in models if not m.get("synthetic_images")), None)


def plot_sweep(
    rows: list[dict[str, Any]], path: Path, reference: tuple[str, SweepPoint] | None = None
) -> Path:
    """Accuracy, attack AUC and AOP of the students against synthetic-set size, one line per label kind;
    `reference` (sweep_reference()) is drawn as a dashed line on each panel."""
    plt = _pyplot()
    series = sweep_series(rows)
    sizes = sorted({p[0] for points in series.values() for p in points})
    fig, axes = plt.subplots(1, 3, figsize=(10, 3))
    for i, (ax, title) in enumerate(zip(axes, ("test accuracy (%)", "max LiRA AUC (%)", "AOP"), strict=True)):
        for label, points in series.items():
            ax.plot([p[0] for p in points], [p[i + 1] for p in points], "o-", label=label)
        if reference is not None and not math.isnan(reference[1][i + 1]):
            ax.axhline(reference[1][i + 1], color="grey", linestyle="--", linewidth=1, label=reference[0])
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes])  # the measured sizes, not log-scale decades
        ax.minorticks_off()
        ax.set_xlabel("synthetic images")
        ax.set_title(title, fontsize=9)
    axes[0].legend(fontsize=7)
    _save_figure(fig, path)
    return path


def _model_row(m: dict[str, Any]) -> str:
    lira = m.get("privacy") or {}
    online = (lira.get("variants") or {}).get("lira-online") or {}
    loss = (lira.get("variants") or {}).get("loss") or {}
    return (
        f"| {m['name']} | {m['trained_on']} | **{_pct(m['test_accuracy'])}** | {_pct(online.get('auc'))} "
        f"| {_pct(online.get('tpr_at_1%_fpr'))} | {_pct(online.get('tpr_at_0.1%_fpr'))} "
        f"| {_pct(loss.get('auc'))} | {_pct(lira.get('max_auc'))} | **{_num(m.get('aop'))}** |"
    )


def headline_table(models: list[dict[str, Any]]) -> str:
    """The teacher/student table (markdown), also printed by `make demo`."""
    head = (
        "| model | trained on | test acc (%) | LiRA online AUC (%) | TPR@1% FPR (%) | TPR@0.1% FPR (%) "
        "| loss-attack AUC (%) | max AUC (%) | AOP |\n|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(_model_row(m) for m in models)])


def write_report(out: str | Path, report: dict[str, Any]) -> Path:
    """Write `out/report.md`, `out/report.json` and `out/figures/*`; returns the markdown path.

    `report` keys: `title`, `dataset`, `models` (list of evaluate() results with `name`, `trained_on`, and
    optionally `synthetic_images`, `labels` and `roc`), optional `quality` (synthetic_quality()), `shards` (a
    shard folder for the sample grid), `classes`, `notes` (list of markdown lines), `commands`.
    """
    out = Path(out)
    figures = out / FIGURES
    figures.mkdir(parents=True, exist_ok=True)
    models = report["models"]
    lines = [f"# {report.get('title', 'tckr-engine report')}", ""]
    lines += [f"Dataset: **{report['dataset']}**. Accuracy is on the real test split (never used for "
              "selection); membership inference targets real training images (members) against held-out "
              "real test images (non-members). AOP = accuracy / (AUC% / 50)², with the max-over-variants "
              "AUC (TCKR's convention).", ""]  # fmt: skip
    lines += ["## Teacher and students", "", headline_table(models), ""]

    curves = {}
    for m in models:
        for variant, (fpr, tpr) in (m.get("roc") or {}).items():
            if variant in ("lira-online", "loss"):
                curves[f"{m['name']} ({variant})"] = (np.asarray(fpr), np.asarray(tpr))
    if curves:
        plot_roc(curves, figures / "roc.png", f"membership inference on {report['dataset']}")
        lines += ["## Membership inference (log-log ROC)", "", f"![ROC]({FIGURES}/roc.png)", ""]
        attack = next((m["privacy"] for m in models if m.get("privacy")), None)
        if attack is not None:
            lines += [
                f"LiRA (Carlini et al.): {attack['num_shadows']} shadow models on random halves of a pool of "
                f"{attack['members']} real training images (members) + {attack['members']} real test images "
                f"(non-members), {len(attack['augmentations'])} augmented views; online and offline, "
                "per-example and global variance; loss- and confidence-threshold baselines. The shadow "
                "models train on the pool only, so they see far fewer images than a teacher trained on the "
                "whole train split: a weaker attack than canonical LiRA, whose shadows train like the "
                "target.",
                "",
            ]
    sweep = [m for m in models if m.get("synthetic_images")]
    if len({m["synthetic_images"] for m in sweep}) > 1:
        plot_sweep(sweep, figures / "sweep.png", sweep_reference(models))
        lines += ["## Against synthetic-set size", "", f"![sweep]({FIGURES}/sweep.png)", ""]
    quality = report.get("quality")
    if quality:
        lines += [
            "## Synthetic data quality",
            "",
            f"{quality['images']} generated images: teacher agreement "
            f"**{_pct(quality['teacher_agreement'])} %** (the teacher on real test images: "
            f"{_pct(quality['real_test_agreement'])} %), teacher-feature "
            f"Fréchet distance to the real test split **{_num(quality['frechet_distance'], 3)}**.",
            "",
        ]
    if report.get("shards") and report.get("classes"):
        plot_samples(report["shards"], list(report["classes"]), figures / "samples.png")
        lines += ["## Samples (one row per class)", "", f"![samples]({FIGURES}/samples.png)", ""]
    if report.get("notes"):
        lines += ["## Notes", "", *report["notes"], ""]
    if report.get("commands"):
        lines += ["## Reproduce", "", *(f"    {c}" for c in report["commands"]), ""]
    md = out / REPORT_MD
    atomic_write(md, "\n".join(lines).encode())
    slim = {**report, "models": [{k: v for k, v in m.items() if k != "roc"} for m in models]}
    write_json(out / REPORT_JSON, slim)  # last: its presence marks a finished report
    log.info("report -> %s", md)
    return md
