"""`tckr-engine run CONFIG.toml`: caption -> teacher -> finetune (or reuse) -> generate -> train -> evaluate.

Every stage is the library function its own command calls, run into one folder (DESIGN.md "The run folder").
A stage is skipped when its output is finished and was made from the same inputs: `RUN/stages.json` holds,
per stage, a fingerprint of its resolved settings and of the fingerprints of the stages it reads, and whether
it finished. A finished stage with a different fingerprint is redone (its output replaced); an unfinished
one with the same fingerprint is resumed where the stage supports it (generate, train). `force` redoes named
stages (and so everything downstream of them, whose fingerprints change with theirs).

Config tables (every key optional except where noted; unknown keys are errors):
`[run]` dataset, seed, threads, device; `[caption]` captioner (attributes | hf | none), model, batch_size,
max_new_tokens; `[teacher]` TeacherConfig fields, or `path` to reuse a trained teacher; `[generator]` mode
(reuse | scratch | lora), `model` (reuse: preset or folder; lora: the base checkpoint) and the scratch / LoRA
training fields; `[generate]` GenerateConfig fields and `ratio` (images = ratio x real train size), or
`source = "activation-max" | "bss"` with SynthConfig fields (`[generate.activation_max]`, `[generate.bss]`,
bss's `student`) to synthesise from the teacher instead (no generator stage then);
`[train]` StudentConfig fields shared by every student; `[[students]]` optional variants: `name`, `images` or
`ratio`, and StudentConfig overrides (e.g. `labels = "hard"`); `[evaluate]` LiraConfig fields, `enabled`, and
`shadows` (a shadow-model folder shared between runs attacked on the same data, e.g. another run's
`privacy/shadows`: reused when its setup matches, an error when it does not).
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
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tckr_engine.config import GenerateConfig, load_toml
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write, write_json

log = logging.getLogger(__name__)

STAGES = ("caption", "teacher", "generator", "generate", "quality", "train", "evaluate", "report")
STAGES_FILE = "stages.json"
CAPTIONERS = ("attributes", "hf", "none")
GENERATOR_MODES = ("reuse", "scratch", "lora")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")

# A stage reports progress through `update(completed, total, **fields)`; `ui(stage)` opens one per stage.
Update = Callable[..., None]
StageUI = Callable[[str], AbstractContextManager[Update]]


def _no_ui(stage: str) -> AbstractContextManager[Update]:
    return nullcontext(lambda *a, **k: None)


@dataclass
class RunConfig:
    """A whole pipeline run; tables are kept as validated dicts and turned into stage configs on use."""

    dataset: str = "fashion-mnist"
    seed: int = 0
    threads: int | None = None  # CPU threads for every stage (recorded in the shard spec)
    device: str = "cpu"  # cpu | cuda: classifiers, generator training and generation
    caption: dict[str, Any] = field(default_factory=dict)
    teacher: dict[str, Any] = field(default_factory=dict)
    generator: dict[str, Any] = field(default_factory=dict)
    generate: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    students: list[dict[str, Any]] = field(default_factory=list)
    evaluate: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # the TOML file this came from (for the report's "reproduce" line)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _check_keys(table: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise TckrError(
            f"unknown key(s) {', '.join(unknown)} in [{where}]; valid keys: {', '.join(sorted(allowed))}"
        )


def _norm(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise TckrError(f"[{where}] must be a table")
    return {k.replace("-", "_"): v for k, v in table.items()}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra"}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    _check_keys(values, _field_names(cls), where)
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise TckrError(f"bad [{where}] table: {e}") from None
    return cfg.validate()


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config; `overrides` replace `[run]` values (CLI flags)."""
    data = load_toml(path)
    tables = {"run", "caption", "teacher", "generator", "generate", "train", "students", "evaluate"}
    _check_keys(data, tables, "top level")
    run = _norm(data.get("run", {}), "run")
    _check_keys(run, {"dataset", "seed", "threads", "device"}, "run")
    run.update({k: v for k, v in (overrides or {}).items() if v is not None})
    students = data.get("students", [])
    if not isinstance(students, list):
        raise TckrError("[[students]] must be an array of tables (write [[students]] for each)")
    cfg = RunConfig(
        **run,
        caption=_norm(data.get("caption", {}), "caption"),
        teacher=_norm(data.get("teacher", {}), "teacher"),
        generator=_norm(data.get("generator", {}), "generator"),
        generate=_norm(data.get("generate", {}), "generate"),
        train=_norm(data.get("train", {}), "train"),
        students=[_norm(s, "students") for s in students],
        evaluate=_norm(data.get("evaluate", {}), "evaluate"),
        source=str(path),
    )
    validate_run_config(cfg)
    return cfg


def validate_run_config(cfg: RunConfig) -> None:
    """Build every stage config once, so a bad value fails before any stage runs."""
    from tckr_engine.data.datasets import resolve_dataset

    if cfg.device not in ("cpu", "cuda"):
        raise TckrError(f"[run] device must be cpu or cuda, got {cfg.device!r}")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int) or cfg.seed < 0:
        raise TckrError(f"[run] seed must be a non-negative integer, got {cfg.seed!r}")
    resolve_dataset(cfg.dataset)  # a missing dataset is one clear error now, not after the first stage
    _caption_settings(cfg)
    _teacher_config(cfg)
    _generator_settings(cfg)
    _generate_config(cfg, "generator", None, None, 1)  # the [generate] table alone
    for spec in _student_specs(cfg, train_size=None):
        _student_config(cfg, spec)
    if cfg.evaluate.get("enabled", True):
        _lira_settings(cfg)


# ---------------------------------------------------------------------------------------------- settings
def _caption_settings(cfg: RunConfig) -> dict[str, Any]:
    c = {"captioner": "attributes", "model": None, "batch_size": 32, "max_new_tokens": 20, **cfg.caption}
    _check_keys(c, {"captioner", "model", "batch_size", "max_new_tokens"}, "caption")
    if c["captioner"] not in CAPTIONERS:
        raise TckrError(f"[caption] captioner must be one of {', '.join(CAPTIONERS)}, got {c['captioner']!r}")
    if c["captioner"] == "hf" and not c["model"]:
        raise TckrError("[caption] captioner = 'hf' needs model = a local image-to-text model folder")
    return c


def _teacher_config(cfg: RunConfig) -> Any:
    from tckr_engine.train.teacher import TeacherConfig

    table = {k: v for k, v in cfg.teacher.items() if k != "path"}
    if "path" in cfg.teacher:
        if table:
            raise TckrError("[teacher] path reuses a trained teacher: remove the training keys beside it")
        path = Path(cfg.teacher["path"]).expanduser()
        if not (path / "metrics.json").is_file():
            raise TckrError(f"[teacher] path {path} is not a finished teacher folder (no metrics.json)")
        return path
    base = {"dataset": cfg.dataset, "seed": cfg.seed, "threads": cfg.threads, "device": cfg.device}
    return _build(TeacherConfig, {**base, **table}, "teacher")


def _generator_settings(cfg: RunConfig) -> tuple[str, Any]:
    g = dict(cfg.generator)
    mode = g.pop("mode", "reuse")
    if mode not in GENERATOR_MODES:
        raise TckrError(f"[generator] mode must be one of {', '.join(GENERATOR_MODES)}, got {mode!r}")
    if mode == "reuse":
        _check_keys(g, {"model"}, "generator")
        return mode, g.get("model", GenerateConfig.model)
    if mode == "scratch":
        from tckr_engine.train.generator import ScratchConfig

        base = {"dataset": cfg.dataset, "seed": cfg.seed, "threads": cfg.threads}
        return mode, _build(ScratchConfig, {**base, **g}, "generator")
    from tckr_engine.train.lora import LoraTrainConfig

    if "model" in g:
        g["base"] = g.pop("model")
    base = {"dataset": cfg.dataset, "seed": cfg.seed, "threads": cfg.threads, "device": cfg.device}
    if "targets" in g:
        g["targets"] = tuple(g["targets"])
    return mode, _build(LoraTrainConfig, {**base, **g}, "generator")


def _student_specs(cfg: RunConfig, train_size: int | None) -> list[dict[str, Any]]:
    """[[students]] (or one default student): name, synthetic image count, StudentConfig overrides."""
    gen = cfg.generate
    default_images = gen.get("num_images")
    if "ratio" in gen:
        if default_images is not None:
            raise TckrError("[generate] give num_images or ratio, not both")
        default_images = ("ratio", gen["ratio"])
    specs = cfg.students or [{"name": "student"}]
    out, names = [], set()
    for raw in specs:
        s = dict(raw)
        name = s.pop("name", None)
        if not isinstance(name, str) or not name or not set(name) <= _NAME_CHARS:
            raise TckrError(f"[[students]] name must be lowercase letters, digits, -, _ or . (got {name!r})")
        if name in names:
            raise TckrError(f"[[students]] name {name!r} appears twice")
        names.add(name)
        if "images" in s and "ratio" in s:
            raise TckrError(f"[[students]] {name}: give images or ratio, not both")
        images = s.pop("images", None)
        if "ratio" in s:
            images = ("ratio", s.pop("ratio"))
        images = images if images is not None else default_images
        if images is None:
            images = GenerateConfig.num_images
        if isinstance(images, tuple):
            ratio = images[1]
            if isinstance(ratio, bool) or not isinstance(ratio, int | float) or ratio <= 0:
                raise TckrError(f"ratio must be a positive number, got {ratio!r}")
            images = None if train_size is None else max(1, round(ratio * train_size))
        elif isinstance(images, bool) or not isinstance(images, int) or images <= 0:
            raise TckrError(f"[[students]] {name}: images must be a positive integer, got {images!r}")
        out.append({"name": name, "images": images, "overrides": s})
    return out


def _student_config(cfg: RunConfig, spec: dict[str, Any]) -> Any:
    from tckr_engine.train.gkd import StudentConfig

    base = {"dataset": cfg.dataset, "seed": cfg.seed, "threads": cfg.threads, "device": cfg.device}
    base["teacher"] = "teacher"  # replaced by the run's teacher folder once that stage has run
    table = {**base, **cfg.train, **spec["overrides"]}
    if table["teacher"] != "teacher":
        raise TckrError(f"students.{spec['name']}: the teacher is the run's [teacher]; remove 'teacher' here")
    return _build(StudentConfig, table, f"students.{spec['name']}")


def _lira_settings(cfg: RunConfig) -> dict[str, Any]:
    """[evaluate] as LiraConfig overrides; the rest of the shadow recipe is copied from the teacher."""
    from tckr_engine.eval.evaluate import lira_settings
    from tckr_engine.privacy import LiraConfig

    table = {k: v for k, v in cfg.evaluate.items() if k not in ("enabled", "shadows")}
    _check_keys(table, _field_names(LiraConfig), "evaluate")
    shared = cfg.evaluate.get("shadows")
    if shared is not None and (not isinstance(shared, str) or not shared.strip()):
        raise TckrError(f"[evaluate] shadows must be a folder path (a string), got {shared!r}")
    base = {"seed": cfg.seed, "threads": cfg.threads, "device": cfg.device}
    return lira_settings({**base, **table})


def _source(cfg: RunConfig) -> str:
    """[generate] source: diffusion (the generator of [generator]) or a teacher-driven source (synth/)."""
    from tckr_engine.synth import SOURCES

    source = cfg.generate.get("source", "diffusion")
    if source != "diffusion" and source not in SOURCES:
        raise TckrError(f"[generate] source must be one of diffusion, {', '.join(SOURCES)}; got {source!r}")
    return source


def _generate_config(
    cfg: RunConfig, model: str | None, captions: str | None, teacher: str | None, images: int
) -> Any:
    """The [generate] table resolved: a GenerateConfig, or a SynthConfig for source activation-max / bss."""
    source = _source(cfg)
    table = {k: v for k, v in cfg.generate.items() if k not in ("ratio", "num_images", "source")}
    fixed = {"dataset", "teacher"} | ({"model", "captions"} if source == "diffusion" else set())
    if fixed & set(table):
        raise TckrError(
            f"[generate] {', '.join(sorted(fixed & set(table)))} are set by the pipeline; remove them "
            "(choose the generator in [generator], the dataset in [run])"
        )
    values = {"seed": cfg.seed, "threads": cfg.threads, "device": cfg.device, **table}
    if source != "diffusion":  # the teacher drives generation; [generator] is not used
        from tckr_engine.synth import synth_config

        values.update(source=source, dataset=cfg.dataset, teacher=teacher or "teacher", num_images=images)
        try:
            return synth_config(values).validate()
        except TckrError as e:
            raise TckrError(f"[generate] {e}") from None
    values.update(model=model, dataset=cfg.dataset, captions=captions, teacher=teacher, num_images=images)
    return _build(GenerateConfig, values, "generate")


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
        except (OSError, json.JSONDecodeError):
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


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):  # e.g. [generate] activation_max = { steps = 100 }
        items = (f"{k} = {_toml_value(x)}" for k, x in v.items() if x is not None)
        return "{ " + ", ".join(items) + " }"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def to_toml(cfg: RunConfig) -> str:
    """The resolved config as TOML (None values omitted), so `run RUN/config.toml` repeats the run."""
    lines = ["[run]"]
    for key in ("dataset", "seed", "threads", "device"):
        if getattr(cfg, key) is not None:
            lines.append(f"{key} = {_toml_value(getattr(cfg, key))}")
    for table in ("caption", "teacher", "generator", "generate", "train", "evaluate"):
        values = {k: v for k, v in getattr(cfg, table).items() if v is not None}
        lines += ["", f"[{table}]", *(f"{k} = {_toml_value(v)}" for k, v in values.items())]
    for s in cfg.students:
        lines += ["", "[[students]]", *(f"{k} = {_toml_value(v)}" for k, v in s.items() if v is not None)]
    return "\n".join(lines) + "\n"


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
    if _source(cfg) == "diffusion":
        model, fp_generator = timed(
            "generator", lambda: _stage_generator(cfg, out, stages, ui, captions, fp_captions)
        )
    specs = _student_specs(cfg, _real_train_size(cfg.dataset))
    images = max(s["images"] for s in specs)
    gen_cfg = _generate_config(cfg, model, captions, str(teacher), images)
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
    c = _caption_settings(cfg)
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
    tcfg = _teacher_config(cfg)
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
    mode, settings = _generator_settings(cfg)
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
        scfg = _student_config(cfg, spec)
        scfg = dataclasses.replace(scfg, teacher=str(teacher), images_per_round=spec["images"])
        fp = fingerprint("train", scfg, fp_synth, fp_teacher)
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

    settings = _lira_settings(cfg)
    privacy = out / "privacy"
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
