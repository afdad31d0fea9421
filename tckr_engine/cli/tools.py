"""Deployment and measurement tools: `export`, `bench`, `presets`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import TextColumn

from tckr_engine.cli._app import app, console, images_per_second, progress_bar, setup_logging
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import check_output_folder


@app.command()
def export(
    model: Annotated[str, typer.Argument(help="Generator preset/folder (its UNet) or classifier folder.")],
    out: Annotated[Path, typer.Option("--out", help="Export folder: model.onnx + export.json.")],
    kind: Annotated[str, typer.Option(help="auto | unet | classifier")] = "auto",
    opset: Annotated[int, typer.Option(help="ONNX opset (17-20).")] = 17,
    fp16: Annotated[bool, typer.Option("--fp16", help="Convert the graph to fp16 (for GPUs).")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Profile opt batch (rows per call).")] = 16,
    max_batch_size: Annotated[
        int | None, typer.Option("--max-batch-size", help="Profile max batch (default: --batch-size).")
    ] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Override a preset's size.")] = None,
    tensorrt: Annotated[
        bool, typer.Option("--tensorrt", help="Also build a TensorRT engine (model.plan; CUDA GPU).")
    ] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing export.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Export a generator UNet or a classifier to ONNX (dynamic batch, checked against PyTorch)."""
    setup_logging(verbose)
    check_output_folder(out, "export folder")
    from tckr_engine.export.api import ExportConfig, export_model

    cfg = ExportConfig(
        model=model,
        out=str(out),
        kind=kind,
        opset=opset,
        fp16=fp16,
        batch_size=batch_size,
        max_batch_size=max_batch_size,
        image_size=image_size,
        tensorrt=tensorrt,
        overwrite=overwrite,
    ).validate()
    info = export_model(cfg)
    check = info.get("check") or {}
    diff = f", max |onnx - torch| {check['max_abs_diff']:.2e}" if "max_abs_diff" in check else ""
    what = f"{info['kind']} ({info['precision']}, opset {info['opset']})"
    console.print(f"[green]done[/green]: {what} -> {out}{diff}")


@app.command()
def bench(
    preset: Annotated[str, typer.Option(help="tiny-fmnist | sd15-arch | any preset, fmnist or a folder.")] = (
        "tiny-fmnist"
    ),
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto | fp32 | bf16 | fp16")] = "auto",
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma list, e.g. 64,128.")] = "64",
    steps: Annotated[int, typer.Option(help="Denoising steps.")] = 20,
    guidance: Annotated[float, typer.Option(help="Classifier-free guidance scale.")] = 2.0,
    sampler: Annotated[str, typer.Option(help="ddim | dpm++ | euler")] = "dpm++",
    images: Annotated[int, typer.Option(help="Images per row and repeat (rounded to whole batches).")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed repeats per row (median and spread).")] = 3,
    backends: Annotated[str, typer.Option(help="Comma list of torch,compile,onnxruntime,tensorrt.")] = (
        "torch,compile,onnxruntime,tensorrt"
    ),
    attention: Annotated[
        str, typer.Option(help="Comma list of sdpa,triton,xformers.")
    ] = "sdpa,triton,xformers",
    dataset: Annotated[str | None, typer.Option(help="Class names for the prompts (default: auto).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Override a preset's size.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads for every row.")] = None,
    writers: Annotated[int, typer.Option(help="Engine encoding threads.")] = 2,
    train_steps: Annotated[
        int, typer.Option("--train-steps", help="Trainer row: steps per mode (0: no trainer row).")
    ] = 16,
    train_batch_size: Annotated[
        int | None,
        typer.Option(
            "--train-batch-size", help="Trainer row batch (default: 128, at most the row's images)."
        ),
    ] = None,
    train_workers: Annotated[
        int | None,
        typer.Option("--train-workers", help="Trainer row: DataLoader workers (default: the trainer's)."),
    ] = None,
    train_repeats: Annotated[
        int, typer.Option("--train-repeats", help="Trainer row: interleaved rounds of its modes.")
    ] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    time_budget: Annotated[
        float | None,
        typer.Option(
            "--time-budget",
            help="Seconds after which no row is set up and no timed round starts; rows keep the rounds "
            "they finished (at least one) and the results are written.",
        ),
    ] = None,
    profile: Annotated[
        bool,
        typer.Option(
            "--profile",
            help="After the timed rounds, one batch per row under the PyTorch profiler: its time by kind "
            "of kernel / op (conv, gemm, attention, norm, ...) in the JSON and under the table.",
        ),
    ] = False,
    note: Annotated[str, typer.Option(help="Free text stored with the results (e.g. machine state).")] = "",
    out: Annotated[Path, typer.Option("--out", help="Folder for the CSV, JSON and plot.")] = Path(
        "docs/bench"
    ),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Images/sec of the engine per backend x attention beside a plain diffusers pipeline (+ trainer row)."""
    setup_logging(verbose)
    check_output_folder(out, "bench output folder")
    from tckr_engine.bench.throughput import BenchConfig, BenchProgress, format_table, run_bench

    def split(text: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in text.split(",") if x.strip())

    try:
        sizes = tuple(int(x) for x in split(batch_sizes))
    except ValueError:
        raise TckrError(f"--batch-sizes must be a comma list of integers, got {batch_sizes!r}") from None
    cfg = BenchConfig(
        preset=preset,
        dataset=dataset,
        device=device,
        dtype=dtype,
        batch_sizes=sizes,
        steps=steps,
        guidance=guidance,
        sampler=sampler,
        images=images,
        repeats=repeats,
        backends=split(backends),
        attention=split(attention),
        threads=threads,
        writers=writers,
        seed=seed,
        image_size=image_size,
        train_steps=train_steps,
        train_batch_size=train_batch_size,
        train_workers=train_workers,
        train_repeats=train_repeats,
        time_budget_s=time_budget,
        profile=profile,
        note=note,
    ).validate()

    with progress_bar("bench", TextColumn("{task.description}"), images_per_second()) as bar:

        class Show(BenchProgress):
            task: Any = None

            def status(self, line: str) -> None:
                bar.console.print(f"[dim]bench[/dim] {line}", highlight=False)

            def start(self, label: str, total: int) -> None:
                if self.task is not None:
                    bar.remove_task(self.task)
                self.task = bar.add_task(label, total=total)

            def advance(self, n: int) -> None:
                bar.advance(self.task, n)

        result = run_bench(cfg, out, progress=Show())
    typer.echo(format_table(result))
    console.print(f"[green]done[/green]: {', '.join(result['files'].values())}")


@app.command()
def presets() -> None:
    """List the built-in generator presets."""
    from tckr_engine.models.generator import list_presets

    for name, desc in list_presets().items():
        typer.echo(f"{name:14s} {desc}")
