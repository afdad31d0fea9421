"""`tckr-engine run CONFIG.toml`: caption -> teacher -> finetune (or reuse) -> generate -> train -> evaluate.

Every stage is the library function its own command calls, run into one folder (DESIGN.md "The run folder").
A stage is skipped when its output is finished and was made from the same inputs: `RUN/stages.json` holds,
per stage, a fingerprint of its resolved settings and of the fingerprints of the stages it reads, and whether
it finished. A finished stage with a different fingerprint is redone (its output replaced); an unfinished
one with the same fingerprint is resumed where the stage supports it (generate, train). `force` redoes named
stages (and so everything downstream of them, whose fingerprints change with theirs).

The config file and its tables: `run_config.py`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write, write_json
from tckr_engine.run_config import (
    RunConfig,
    caption_settings,
    generate_config,
    generate_source,
    generator_settings,
    lira_settings,
    student_config,
    student_specs,
    teacher_config,
    to_toml,
)

log = logging.getLogger(__name__)

STAGES = ("caption", "teacher", "generator", "generate", "quality", "train", "evaluate", "report")
STAGES_FILE = "stages.json"

# A stage reports progress through `update(completed, total, **fields)`; `ui(stage)` opens one per stage.
Update = Callable[..., None]
StageUI = Callable[[str], AbstractContextManager[Update]]


def _no_ui(stage: str) -> AbstractContextManager[Update]:
    return nullcontext(lambda *a, **k: None)


# --------------------------------------------------------------------------------------------- stages
def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dataclasses as dicts)."""
    norm = [dataclasses.asdict(p) if dataclasses.is_dataclass(p) else p for p in parts]
    blob = json.dumps(norm, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class Stages:
    """`RUN/stages.json`: per stage, the fingerprint it was started with and whether it finished."""

    def __init__(self, run_dir: Path, force: set[str]) -> None:
        self.path = run_dir / STAGES_FILE
        self.force = force
        try:
            self.state: dict[str, dict[str, Any]] = json.loads(self.path.read_text())
        except FileNotFoundError:
            self.state = {}
        except (OSError, ValueError):  # ValueError: bad JSON or not UTF-8
            self.state = None  # type: ignore[assignment]
        if not isinstance(self.state, dict) or not all(isinstance(v, dict) for v in self.state.values()):
            raise TckrError(f"{self.path} is unreadable; delete it to redo every stage") from None

    def plan(self, stage: str, fp: str) -> str:
        """'skip' (finished, same inputs), 'resume' (started with the same inputs) or 'fresh'."""
        rec = self.state.get(stage)
        if stage in self.force or rec is None or rec.get("fingerprint") != fp:
            return "fresh"
        return "skip" if rec.get("done") else "resume"

    def mark(self, stage: str, fp: str, done: bool, **info: Any) -> None:
        self.state[stage] = {"fingerprint": fp, "done": done, **info}
        write_json(self.path, self.state)


def _real_train_size(dataset: str) -> int:
    from tckr_engine.data import load_dataset

    return len(load_dataset(dataset, "train"))


def run_pipeline(
    cfg: RunConfig, out: str | Path, *, force: tuple[str, ...] = (), ui: StageUI = _no_ui
) -> dict[str, Any]:
    """Run (or resume) every stage of `cfg` into `out`; returns the report dict (also in report.json)."""
    bad = sorted(set(force) - set(STAGES))
    if bad:
        raise TckrError(f"unknown stage(s) to force: {', '.join(bad)}; stages are {', '.join(STAGES)}")
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "config.toml", to_toml(cfg).encode())
    stages = Stages(out, set(force))
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        s = time.perf_counter()
        result = fn()
        timings[stage] = round(time.perf_counter() - s, 1)
        return result

    captions, fp_captions = timed("caption", lambda: _stage_caption(cfg, out, stages, ui))
    teacher, fp_teacher = timed("teacher", lambda: _stage_teacher(cfg, out, stages, ui))
    model, fp_generator = None, fingerprint("no generator")
    if generate_source(cfg) == "diffusion":
        model, fp_generator = timed(
            "generator", lambda: _stage_generator(cfg, out, stages, ui, captions, fp_captions)
        )
    specs = student_specs(cfg, _real_train_size(cfg.dataset))
    images = max(s["images"] for s in specs)
    gen_cfg = generate_config(cfg, model, captions, str(teacher), images)
    synthetic, fp_synth = timed(
        "generate", lambda: _stage_generate(gen_cfg, out, stages, ui, (fp_captions, fp_teacher, fp_generator))
    )
    quality = timed("quality", lambda: _stage_quality(synthetic, teacher, stages, fp_synth, fp_teacher))
    students = timed(
        "train", lambda: _stage_train(cfg, specs, synthetic, teacher, out, stages, ui, fp_synth, fp_teacher)
    )
    enabled = cfg.evaluate.get("enabled", True)
    models = [{"name": "teacher", "path": str(teacher), "trained_on": "real train split", "fp": fp_teacher}]
    models += students
    results = timed("evaluate", lambda: _stage_evaluate(cfg, models, out, stages, ui) if enabled else [])
    report = {
        "title": f"tckr-engine run: {cfg.dataset}",
        "dataset": cfg.dataset,
        "models": results or [_accuracy_only(m) for m in models],
        "quality": quality,
        "shards": str(synthetic),
        "classes": list(_classes(cfg.dataset)),
        "seconds": timings,
        "total_seconds": round(time.perf_counter() - t0, 1),
        "commands": [f"tckr-engine run {cfg.source}"] if cfg.source else [],
    }
    from tckr_engine.report import write_report

    write_report(out, report)
    stages.mark("report", fingerprint(report["models"]), True)
    return report


def _classes(dataset: str) -> tuple[str, ...]:
    from tckr_engine.data import class_names

    return class_names(dataset)


def _accuracy_only(m: dict[str, Any]) -> dict[str, Any]:
    metrics = json.loads((Path(m["path"]) / "metrics.json").read_text())
    return {**{k: v for k, v in m.items() if k != "fp"}, "test_accuracy": metrics["test_accuracy"]}


def _stage_caption(cfg: RunConfig, out: Path, stages: Stages, ui: StageUI) -> tuple[str | None, str]:
    c = caption_settings(cfg)
    fp = fingerprint("caption", cfg.dataset, c)
    if c["captioner"] == "none":
        return None, fp
    path = out / "captions.jsonl"
    if stages.plan("caption", fp) == "skip" and path.is_file():
        log.info("caption: up to date (%s)", path)
        return str(path), fp
    from tckr_engine.data import load_dataset
    from tckr_engine.data.captioners import caption_dataset, write_captions

    stages.mark("caption", fp, False)
    data = load_dataset(cfg.dataset, "train")
    with ui("caption") as update:
        done = [0]

        def advance(n: int) -> None:
            done[0] += n
            update(done[0], len(data))

        captions = caption_dataset(
            data, c["captioner"], c["model"], cfg.device, c["batch_size"], c["max_new_tokens"], advance
        )
    write_captions(path, data, captions)
    stages.mark("caption", fp, True)
    return str(path), fp


def _stage_teacher(cfg: RunConfig, out: Path, stages: Stages, ui: StageUI) -> tuple[Path, str]:
    tcfg = teacher_config(cfg)
    if isinstance(tcfg, Path):  # reused: its fingerprint is its metrics (they change when it is retrained)
        return tcfg, fingerprint("teacher-path", (tcfg / "metrics.json").read_text())
    from tckr_engine.train.teacher import train_teacher

    path = out / "teacher"
    fp = fingerprint("teacher", tcfg)
    if stages.plan("teacher", fp) == "skip" and (path / "metrics.json").is_file():
        log.info("teacher: up to date (%s)", path)
        return path, fp
    stages.mark("teacher", fp, False)
    with ui("teacher") as update:
        train_teacher(
            tcfg, path, overwrite=True, progress=lambda d, t, loss, acc: update(d, t, loss=loss, acc=acc)
        )
    stages.mark("teacher", fp, True)
    return path, fp


def _stage_generator(
    cfg: RunConfig, out: Path, stages: Stages, ui: StageUI, captions: str | None, fp_captions: str
) -> tuple[str, str]:
    mode, settings = generator_settings(cfg)
    if mode == "reuse":
        return settings, fingerprint("generator-reuse", settings)
    settings = dataclasses.replace(settings, captions=captions)
    fp = fingerprint("generator", mode, settings, fp_captions)
    path = out / "generator"
    plan = stages.plan("generator", fp)
    if plan == "skip" and path.is_dir():
        log.info("generator: up to date (%s)", path)
        return str(path), fp
    if plan == "fresh" and path.exists():
        shutil.rmtree(path)
    stages.mark("generator", fp, False)
    if mode == "scratch":
        from tckr_engine.train.generator import train_scratch as train
    else:
        from tckr_engine.train.lora import train_lora as train
    with ui("finetune") as update:
        done = [0]

        def advance(n: int, loss: float) -> None:
            done[0] += n
            update(done[0], None, loss=loss)

        train(settings, path, progress=advance)
    stages.mark("generator", fp, True)
    return str(path), fp


def _stage_generate(
    gen_cfg: Any, out: Path, stages: Stages, ui: StageUI, upstream: tuple[str, ...]
) -> tuple[Path, str]:
    """`generate` (a GenerateConfig) or `generate --source ...` (a SynthConfig) into RUN/synthetic."""
    from tckr_engine.engine.generate import generate, verify
    from tckr_engine.synth import SynthConfig, generate_synthetic

    path = out / "synthetic"
    fp = fingerprint("generate", gen_cfg, *upstream)
    plan = stages.plan("generate", fp)
    if plan == "skip" and not verify(path):
        log.info("generate: up to date (%s)", path)
        return path, fp
    stages.mark("generate", fp, False)

    class _Progress:
        def start(self, total: int, done: int) -> None:
            self.total, self.done = total, done
            self.update(done, total)

        def advance(self, n: int) -> None:
            self.done += n
            self.update(self.done, self.total)

    with ui("generate") as update:
        progress = _Progress()
        progress.update = update
        if isinstance(gen_cfg, SynthConfig):
            generate_synthetic(gen_cfg, path, progress, overwrite=plan == "fresh")
        else:
            generate(gen_cfg, path, overwrite=plan == "fresh", progress=progress)
    stages.mark("generate", fp, True)
    return path, fp


def _stage_quality(synthetic: Path, teacher: Path, stages: Stages, fp_synth: str, fp_teacher: str) -> dict:
    from tckr_engine.eval.quality import synthetic_quality

    fp = fingerprint("quality", fp_synth, fp_teacher)
    path = synthetic / "quality.json"
    if stages.plan("quality", fp) == "skip" and path.is_file():
        return json.loads(path.read_text())
    stages.mark("quality", fp, False)
    result = synthetic_quality(synthetic, teacher)
    stages.mark("quality", fp, True)
    return result


def _stage_train(
    cfg: RunConfig,
    specs: list[dict[str, Any]],
    synthetic: Path,
    teacher: Path,
    out: Path,
    stages: Stages,
    ui: StageUI,
    fp_synth: str,
    fp_teacher: str,
) -> list[dict[str, Any]]:
    from tckr_engine.train.gkd import train_student

    students = []
    for spec in specs:
        name = spec["name"]
        scfg = student_config(cfg, spec)
        scfg = dataclasses.replace(scfg, teacher=str(teacher), images_per_round=spec["images"])
        fp = fingerprint("train", scfg.result_settings(), fp_synth, fp_teacher)
        key = f"train:{name}"
        path = out / name
        plan = stages.plan(key, fp)
        if not (plan == "skip" and (path / "metrics.json").is_file()):
            stages.mark(key, fp, False)
            with ui(f"train {name}") as update:
                train_student(
                    scfg, synthetic, path, overwrite=plan == "fresh",
                    progress=lambda d, t, loss, sps: update(d, t, loss=loss, rate=sps),
                )  # fmt: skip
            stages.mark(key, fp, True)
        labels = getattr(scfg, "labels", "online")
        rounds = _rounds(scfg)
        trained_on = f"{spec['images']:,} synthetic images ({labels} labels{rounds})"
        students.append(
            {
                "name": name,
                "path": str(path),
                "trained_on": trained_on,
                "synthetic_images": spec["images"],
                "labels": labels,
                "fp": fp,
            }
        )
    return students


def _rounds(scfg: Any) -> str:
    every = getattr(scfg, "regenerate_every", 0)
    if not every:
        return ""
    return f", regenerated every {every} epochs from the {getattr(scfg, 'regenerate', 'pool')}"


def _stage_evaluate(
    cfg: RunConfig, models: list[dict[str, Any]], out: Path, stages: Stages, ui: StageUI
) -> list[dict[str, Any]]:
    from tckr_engine.eval.evaluate import evaluate_model, prepare_shadows

    settings = lira_settings(cfg)
    privacy = out / "privacy"
    privacy.mkdir(parents=True, exist_ok=True)  # with another run's shadows nothing else makes it
    shared = cfg.evaluate.get("shadows")  # another run's shadow folder, reused when its setup matches
    with ui("shadow models") as update:
        shadows = prepare_shadows(settings, models[0]["path"], privacy, progress=update, shadows_dir=shared)
    results = []
    for m in models:
        fp = fingerprint("evaluate", m["fp"], shadows.fingerprint)
        key = f"evaluate:{m['name']}"
        path = privacy / f"{m['name']}.json"
        if stages.plan(key, fp) == "skip" and path.is_file():
            result = json.loads(path.read_text())
        else:
            stages.mark(key, fp, False)
            result = evaluate_model(Path(m["path"]), shadows, cfg.dataset)
            write_json(path, result)
            stages.mark(key, fp, True)
        results.append({**{k: v for k, v in m.items() if k != "fp"}, **result})
    return results
