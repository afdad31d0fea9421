"""A `tckr-engine run` config file: `load_run_config` reads and validates it into a `RunConfig`, and each
stage's settings are resolved from it here (`pipeline.py` runs the stages).

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

Everything is checked when the file is loaded (`validate_run_config` builds every stage's config once), so a
bad value is one error before any stage runs. `to_toml` writes the resolved config back (`RUN/config.toml`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from tckr_engine.config import (
    GenerateConfig,
    check_field_types,
    did_you_mean,
    is_finite_number,
    load_toml,
)
from tckr_engine.errors import TckrError

CAPTIONERS = ("attributes", "hf", "none")
GENERATOR_MODES = ("reuse", "scratch", "lora")
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789-_.")


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
    """`where` names the table as the user wrote it: "[teacher]", "[[students]] small", ..."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        hint = did_you_mean(unknown[0], allowed) if len(unknown) == 1 else ""
        raise TckrError(
            f"unknown key(s) {', '.join(unknown)} in {where}{hint}; valid keys: {', '.join(sorted(allowed))}"
        )


def _norm(table: Any, where: str) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise TckrError(f"[{where}] must be a table")
    return {k.replace("-", "_"): v for k, v in table.items()}


def _field_names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)} - {"extra"}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    _check_keys(values, _field_names(cls), where)
    check_field_types(cls, values, f"{where}")
    try:
        cfg = cls(**values)
    except TypeError as e:
        raise TckrError(f"bad {where} table: {e}") from None
    try:
        return cfg.validate()
    except TckrError as e:  # the config's own message names the field; add the table
        raise TckrError(f"{where}: {e}") from None


def load_run_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Read and validate a run config; `overrides` replace `[run]` values (CLI flags)."""
    data = load_toml(path)
    tables = {"run", "caption", "teacher", "generator", "generate", "train", "students", "evaluate"}
    _check_keys(data, tables, "the top level of the file")
    run = _norm(data.get("run", {}), "run")
    _check_keys(run, {"dataset", "seed", "threads", "device"}, "[run]")
    run.update({k: v for k, v in (overrides or {}).items() if v is not None})
    check_field_types(RunConfig, run, "[run]")
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
    caption_settings(cfg)
    teacher_config(cfg)
    generator_settings(cfg)
    generate_config(cfg, "generator", None, None, 1)  # the [generate] table alone
    for spec in student_specs(cfg, train_size=None):
        student_config(cfg, spec)
    enabled = cfg.evaluate.get("enabled", True)
    if not isinstance(enabled, bool):
        raise TckrError(f"[evaluate] enabled must be true or false, got {enabled!r}")
    if enabled:
        lira_settings(cfg)


# ------------------------------------------------------------------------------ each stage's settings
def caption_settings(cfg: RunConfig) -> dict[str, Any]:
    c = {"captioner": "attributes", "model": None, "batch_size": 32, "max_new_tokens": 20, **cfg.caption}
    _check_keys(c, {"captioner", "model", "batch_size", "max_new_tokens"}, "[caption]")
    if c["captioner"] not in CAPTIONERS:
        raise TckrError(f"[caption] captioner must be one of {', '.join(CAPTIONERS)}, got {c['captioner']!r}")
    if c["captioner"] == "hf" and not c["model"]:
        raise TckrError("[caption] captioner = 'hf' needs model = a local image-to-text model folder")
    return c


def teacher_config(cfg: RunConfig) -> Any:
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
    return _build(TeacherConfig, {**base, **table}, "[teacher]")


def generator_settings(cfg: RunConfig) -> tuple[str, Any]:
    g = dict(cfg.generator)
    mode = g.pop("mode", "reuse")
    if mode not in GENERATOR_MODES:
        raise TckrError(f"[generator] mode must be one of {', '.join(GENERATOR_MODES)}, got {mode!r}")
    if mode == "reuse":
        _check_keys(g, {"model"}, "[generator]")
        return mode, g.get("model", GenerateConfig.model)
    if mode == "scratch":
        from tckr_engine.train.generator import ScratchConfig

        base = {"dataset": cfg.dataset, "seed": cfg.seed, "threads": cfg.threads}
        return mode, _build(ScratchConfig, {**base, **g}, "[generator]")
    from tckr_engine.train.lora import LoraTrainConfig

    if "model" in g:
        g["base"] = g.pop("model")
    base = {"dataset": cfg.dataset, "seed": cfg.seed, "threads": cfg.threads, "device": cfg.device}
    if "targets" in g:
        g["targets"] = tuple(g["targets"])
    return mode, _build(LoraTrainConfig, {**base, **g}, "[generator]")


def student_specs(cfg: RunConfig, train_size: int | None) -> list[dict[str, Any]]:
    """[[students]] (or one default student): name, synthetic image count, StudentConfig overrides."""
    gen = cfg.generate
    default_images = gen.get("num_images")
    default_from = "[generate] num_images"
    if "ratio" in gen:
        if default_images is not None:
            raise TckrError("[generate] give num_images or ratio, not both")
        default_images, default_from = ("ratio", gen["ratio"]), "[generate] ratio"
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
        images, where = s.pop("images", None), f"[[students]] {name}: images"
        if "ratio" in s:
            images, where = ("ratio", s.pop("ratio")), f"[[students]] {name}: ratio"
        if images is None:
            images, where = default_images, default_from
        if images is None:
            images = GenerateConfig.num_images
        if isinstance(images, tuple):
            ratio = images[1]
            if not is_finite_number(ratio) or ratio <= 0:
                raise TckrError(f"{where} must be a positive number, got {ratio!r}")
            images = None if train_size is None else max(1, round(ratio * train_size))
        elif isinstance(images, bool) or not isinstance(images, int) or images <= 0:
            raise TckrError(f"{where} must be a positive integer, got {images!r}")
        out.append({"name": name, "images": images, "overrides": s})
    return out


def student_config(cfg: RunConfig, spec: dict[str, Any]) -> Any:
    from tckr_engine.train.gkd import StudentConfig

    base = {"dataset": cfg.dataset, "seed": cfg.seed, "threads": cfg.threads, "device": cfg.device}
    base["teacher"] = "teacher"  # replaced by the run's teacher folder once that stage has run
    fields_ = _field_names(StudentConfig)
    _check_keys(cfg.train, fields_, "[train]")  # name the table the user wrote the key in
    own = f"[[students]] {spec['name']}"
    _check_keys(spec["overrides"], fields_, own)
    table = {**base, **cfg.train, **spec["overrides"]}
    if table["teacher"] != "teacher":
        where = own if "teacher" in spec["overrides"] else "[train]"
        raise TckrError(f"{where}: the teacher is the run's [teacher]; remove 'teacher' here")
    return _build(StudentConfig, table, f"{own} (with [train])" if cfg.students else "[train]")


def lira_settings(cfg: RunConfig) -> dict[str, Any]:
    """[evaluate] as LiraConfig overrides; the rest of the shadow recipe is copied from the teacher."""
    from tckr_engine.eval.evaluate import lira_settings as resolve_lira
    from tckr_engine.privacy import LiraConfig

    table = {k: v for k, v in cfg.evaluate.items() if k not in ("enabled", "shadows")}
    _check_keys(table, _field_names(LiraConfig), "[evaluate]")
    check_field_types(LiraConfig, table, "[evaluate]")
    shared = cfg.evaluate.get("shadows")
    if shared is not None and (not isinstance(shared, str) or not shared.strip()):
        raise TckrError(f"[evaluate] shadows must be a folder path (a string), got {shared!r}")
    base = {"seed": cfg.seed, "threads": cfg.threads, "device": cfg.device}
    return resolve_lira({**base, **table})


def generate_source(cfg: RunConfig) -> str:
    """[generate] source: diffusion (the generator of [generator]) or a teacher-driven source (synth/)."""
    from tckr_engine.synth import SOURCES

    source = cfg.generate.get("source", "diffusion")
    if source != "diffusion" and source not in SOURCES:
        raise TckrError(f"[generate] source must be one of diffusion, {', '.join(SOURCES)}; got {source!r}")
    return source


def generate_config(
    cfg: RunConfig, model: str | None, captions: str | None, teacher: str | None, images: int
) -> Any:
    """The [generate] table resolved: a GenerateConfig, or a SynthConfig for source activation-max / bss."""
    source = generate_source(cfg)
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
    return _build(GenerateConfig, values, "[generate]")


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
