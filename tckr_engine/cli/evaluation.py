"""Commands that measure models and data, and the whole pipeline: `quality`, `evaluate`, `run`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from tckr_engine.cli._app import app, console, setup_logging, stage_bar
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import check_output_folder


@app.command()
def quality(
    shards: Annotated[Path, typer.Argument(help="Shard folder written by 'generate'.")],
    teacher: Annotated[Path, typer.Option(help="Classifier folder trained on the real dataset.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Teacher agreement and teacher-feature Fréchet distance of a synthetic set (writes quality.json)."""
    setup_logging(verbose)
    from tckr_engine.eval.quality import synthetic_quality

    result = synthetic_quality(shards, teacher)
    console.print(
        f"[green]done[/green]: {result['images']} images, "
        f"teacher agreement {result['teacher_agreement']:.4f}, "
        f"Fréchet distance {result['frechet_distance']:.3f} (teacher on real test: "
        f"{result['real_test_agreement']:.4f}) -> {shards / 'quality.json'}"
    )


@app.command()
def evaluate(
    models: Annotated[
        list[str], typer.Argument(help="Classifier folders to evaluate, as FOLDER or NAME=FOLDER.")
    ],
    teacher: Annotated[
        Path, typer.Option(help="The teacher trained on real data: fixes members (its training images).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for shadow models, results and report.md.")],
    shards: Annotated[
        Path | None, typer.Option(help="Synthetic shard folder: adds its quality to the report.")
    ] = None,
    num_shadows: Annotated[int, typer.Option("--num-shadows", help="LiRA shadow models (even).")] = 16,
    members: Annotated[int, typer.Option(help="Members (and as many non-members) attacked.")] = 1000,
    epochs: Annotated[
        int | None, typer.Option(help="Shadow training epochs (default: the teacher's).")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    shadows: Annotated[
        Path | None,
        typer.Option(
            help="Shared shadow-model folder (e.g. a run's privacy/shadows): reused when its setup matches, "
            "never replaced (default: OUT/shadows)."
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Test accuracy, LiRA membership inference (AUC, TPR at low FPR), AOP and a report for classifiers."""
    setup_logging(verbose)
    check_output_folder(out, "evaluation folder")
    from tckr_engine.eval.evaluate import evaluate as run_evaluate
    from tckr_engine.report import headline_table

    named: dict[str, str] = {}
    for item in models:
        name, _, folder = item.rpartition("=") if "=" in item else ("", "", item)
        name = name or Path(folder).name
        if name in named:
            raise TckrError(f"two models are named {name!r}; name them NAME=FOLDER")
        named[name] = folder
    settings: dict[str, Any] = {"num_shadows": num_shadows, "members": members, "seed": seed}
    settings |= {"device": device, "threads": threads}
    if epochs is not None:
        settings["epochs"] = epochs
    with stage_bar("shadow models") as update:
        report = run_evaluate(
            named, teacher, out, settings, shards=shards, progress=update, shadows_dir=shadows
        )
    console.print(f"[green]done[/green]: report at {out / 'report.md'}")
    typer.echo(headline_table(report["models"]))


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Run config (TOML), e.g. configs/fashion-mnist-cpu.toml.")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Run folder (default: runs/<config name>).")
    ] = None,
    force: Annotated[
        list[str] | None, typer.Option("--force", help="Redo a stage even if up to date (repeatable).")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for every stage.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """The whole pipeline from one TOML file: caption, teacher, generator, generate, train, evaluate."""
    setup_logging(verbose)
    if out is not None:
        check_output_folder(out, "run folder")
    from tckr_engine.pipeline import run_pipeline
    from tckr_engine.report import headline_table
    from tckr_engine.run_config import load_run_config

    cfg = load_run_config(config, {"threads": threads, "device": device})
    folder = out if out is not None else Path("runs") / config.stem
    report = run_pipeline(cfg, folder, force=tuple(force or ()), ui=stage_bar)
    console.print(f"[green]done[/green] in {report['total_seconds']:.0f} s: report at {folder / 'report.md'}")
    typer.echo(headline_table(report["models"]))
