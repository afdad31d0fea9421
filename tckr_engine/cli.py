"""The `tckr-engine` command line. A shell: each command parses flags, builds a config, calls one function.

Errors the user can fix (`TckrError`) are printed as one red line on stderr with exit code 2, never a
traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from tckr_engine.errors import TckrError

app = typer.Typer(
    name="tckr-engine",
    help="Synthetic image datasets from diffusion models (TCKR / KR), generated at scale.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # soft wrap: an error stays one line


def _setup_logging(verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    handler = RichHandler(console=console, show_path=False, show_time=False, markup=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    logging.getLogger("tckr_engine").setLevel(level)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub: models come from local paths
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our bar is the only one on the terminal
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


class _RichProgress:
    """Adapts the library's progress callbacks to a rich progress bar with images/sec."""

    def __init__(self, progress: Progress, label: str) -> None:
        self.progress, self.label, self.task = progress, label, None

    def start(self, total: int, done: int) -> None:
        self.task = self.progress.add_task(self.label, total=total, completed=done)

    def advance(self, n: int) -> None:
        self.progress.advance(self.task, n)


def _bar(label: str, *extra: Any) -> Progress:
    """The progress bar every long command shows: label, bar, count, extra columns, elapsed, remaining."""
    return Progress(
        TextColumn(f"[bold]{label}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def _images_per_second() -> Any:
    from rich.progress import ProgressColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} img/s" if speed else "-- img/s", style="cyan")

    return Rate()


@app.command()
def generate(
    shards: Annotated[
        str,
        typer.Option(
            "--shards", help="Output shard folder or fsspec URL (file://, s3://, ...); resumed if it exists."
        ),
    ],
    model: Annotated[str | None, typer.Option(help="Generator: a preset name or a folder.")] = None,
    dataset: Annotated[str | None, typer.Option(help="Real dataset giving class names and indices.")] = None,
    num_images: Annotated[int | None, typer.Option("--num-images", help="Images to generate.")] = None,
    shard_size: Annotated[int | None, typer.Option("--shard-size", help="Samples per shard.")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[float | None, typer.Option(help="Classifier-free guidance scale (<=1: off).")] = None,
    sampler: Annotated[str | None, typer.Option(help="ddim | dpm++ | euler")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed; per-image seeds derive from it.")] = None,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="Images per denoiser batch.")] = None,
    image_format: Annotated[str | None, typer.Option("--format", help="png | jpg | webp")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda")] = None,
    dtype: Annotated[str | None, typer.Option(help="auto | fp32 | bf16 | fp16")] = None,
    attention: Annotated[str | None, typer.Option(help="auto | sdpa | triton | xformers")] = None,
    backend: Annotated[
        str | None,
        typer.Option(
            help="Denoiser: torch | compile | onnxruntime | tensorrt. 'ray' is an alias for "
            "--distributor ray with the torch denoiser."
        ),
    ] = None,
    captions: Annotated[Path | None, typer.Option(help="Captions JSONL from 'tckr-engine caption'.")] = None,
    prompt_template: Annotated[
        str | None, typer.Option("--prompt-template", help="Without captions.")
    ] = None,
    teacher: Annotated[
        Path | None, typer.Option(help="Classifier folder: adds logits.npy per sample.")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (recorded in run.json).")] = None,
    image_size: Annotated[int | None, typer.Option("--image-size", help="Override a preset's size.")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML file with a [generate] table.")] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a folder holding another run.")
    ] = False,
    writers: Annotated[int, typer.Option(help="Encoding threads (per process or Ray worker).")] = 2,
    distributor: Annotated[
        str | None,
        typer.Option(
            help="local | ray. local runs in this process, or rank-strided when launched by torchrun/srun "
            "(RANK/WORLD_SIZE, SLURM_PROCID/SLURM_STEP_NUM_TASKS). Never changes the shards."
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            help="Ray: cluster address ('auto', 'ray://HOST:10001'); default: the running "
            "cluster, else a new local one.",
        ),
    ] = None,
    workers: Annotated[
        int | None, typer.Option(help="Ray: actors, each holding the model (default: what the cluster fits).")
    ] = None,
    gpus_per_worker: Annotated[
        float | None, typer.Option("--gpus-per-worker", help="Ray: GPUs per actor (default 1 on cuda).")
    ] = None,
    max_retries: Annotated[
        int, typer.Option("--max-retries", help="Ray: retries of a failed shard (a dead worker included).")
    ] = 3,
    rank: Annotated[
        int | None, typer.Option(help="Rank-strided: this process's rank (default: RANK or SLURM_PROCID).")
    ] = None,
    world_size: Annotated[
        int | None,
        typer.Option("--world-size", help="Rank-strided: number of processes (default: WORLD_SIZE, or 1)."),
    ] = None,
    source: Annotated[
        str,
        typer.Option(
            help="diffusion (the text-conditioned generator) | activation-max (optimised from noise to "
            "maximise a class logit of --teacher) | bss (boundary samples of real images between --teacher "
            "and --student)."
        ),
    ] = "diffusion",
    student: Annotated[
        Path | None, typer.Option(help="bss: the reference student classifier folder.")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="bss: real split of the base images (train | test).")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Generate a synthetic dataset into sharded WebDataset tars (resumable, deterministic)."""
    _setup_logging(verbose)
    if source != "diffusion":
        diffusion_only = {
            "--model": model, "--guidance": guidance, "--sampler": sampler, "--dtype": dtype,
            "--attention": attention, "--backend": backend, "--captions": captions,
            "--prompt-template": prompt_template, "--image-size": image_size, "--distributor": distributor,
            "--ray-address": ray_address, "--workers": workers, "--gpus-per-worker": gpus_per_worker,
            "--rank": rank, "--world-size": world_size,
        }  # fmt: skip
        given = [flag for flag, value in diffusion_only.items() if value is not None]
        if given:
            raise TckrError(f"{', '.join(given)} only apply to --source diffusion, not {source}")
        common = {
            "dataset": dataset, "num_images": num_images, "shard_size": shard_size, "seed": seed,
            "batch_size": batch_size, "image_format": image_format, "device": device, "threads": threads,
            "teacher": str(teacher) if teacher else None, "student": str(student) if student else None,
            "split": split,
        }  # fmt: skip
        _generate_synthetic(source, config, common, steps, shards, overwrite)
        return
    if student is not None or split is not None:
        raise TckrError("--student and --split only apply to --source bss")
    from tckr_engine.config import GenerateConfig, generate_config_from_toml
    from tckr_engine.engine.distributed import distribution_from_options
    from tckr_engine.engine.generate import generate as run_generate

    dist, backend = distribution_from_options(
        backend,
        distributor,
        rank=rank,
        world_size=world_size,
        ray_address=ray_address,
        workers=workers,
        gpus_per_worker=gpus_per_worker,
        max_retries=max_retries,
    )
    base = generate_config_from_toml(config) if config is not None else GenerateConfig()
    cfg = base.merged(
        {
            "model": model,
            "dataset": dataset,
            "num_images": num_images,
            "shard_size": shard_size,
            "steps": steps,
            "guidance": guidance,
            "sampler": sampler,
            "seed": seed,
            "batch_size": batch_size,
            "image_format": image_format,
            "device": device,
            "dtype": dtype,
            "attention": attention,
            "backend": backend,
            "captions": str(captions) if captions else None,
            "prompt_template": prompt_template,
            "teacher": str(teacher) if teacher else None,
            "threads": threads,
            "image_size": image_size,
        }
    ).validate()
    if writers < 1:
        raise TckrError(f"writers must be a positive integer, got {writers}")
    label = f"generate {dist.rank}/{dist.world_size}" if dist.strided else "generate"
    with _bar(label, _images_per_second()) as bar:
        summary = run_generate(
            cfg,
            shards,
            overwrite=overwrite,
            writers=writers,
            progress=_RichProgress(bar, label),
            distribution=dist,
        )
    mine = f" (rank {dist.rank} of {dist.world_size})" if dist.strided else ""
    console.print(
        f"[green]done[/green]: {summary.images} images in {summary.shards} shards{mine} at {summary.out} "
        f"({summary.generated} generated in {summary.seconds:.1f} s, "
        f"{summary.images_per_second:.2f} images/s)"
    )


def _generate_synthetic(
    source: str, config: Path | None, options: dict[str, Any], steps: int | None, shards: str, overwrite: bool
) -> None:
    """`generate --source activation-max|bss`: the teacher-driven sources of `tckr_engine.synth`."""
    from tckr_engine.config import load_toml
    from tckr_engine.synth import SOURCES, generate_synthetic, synth_config

    if source not in SOURCES:
        raise TckrError(f"--source must be diffusion, {', '.join(SOURCES)}; got {source!r}")
    table: dict[str, Any] = {}
    if (
        config is not None
    ):  # the [generate] table: SynthConfig keys, [generate.activation_max] / [generate.bss]
        table = load_toml(config).get("generate", {})
        if not isinstance(table, dict):
            raise TckrError(f"[generate] in {config} must be a table")
        table = {k: v for k, v in table.items() if k != "source"}
    table |= {"source": source, **{k: v for k, v in options.items() if v is not None}}
    cfg = synth_config(table)
    if steps is not None:  # optimisation steps of the source
        sub = "activation_max" if source == "activation-max" else "bss"
        cfg = dataclasses.replace(cfg, **{sub: dataclasses.replace(getattr(cfg, sub), steps=steps)})
    cfg.validate()
    with _bar(f"generate {source}", _images_per_second()) as bar:
        summary = generate_synthetic(
            cfg, shards, progress=_RichProgress(bar, f"generate {source}"), overwrite=overwrite
        )
    console.print(
        f"[green]done[/green]: {summary.images} {source} images in {summary.shards} shards at {summary.out} "
        f"({summary.generated} generated in {summary.seconds:.1f} s, "
        f"{summary.images_per_second:.2f} images/s)"
    )


@app.command()
def verify(
    shards: Annotated[str, typer.Argument(help="Shard folder or fsspec URL written by 'generate'.")],
    write_index: Annotated[
        bool,
        typer.Option(
            "--write-index", help="Write index.json when every shard is intact (rank-strided merge)."
        ),
    ] = False,
) -> None:
    """Check every shard against its stats file; exit 1 naming each missing or corrupt shard."""
    _setup_logging(False)
    from tckr_engine.engine.generate import verify as run_verify

    problems = run_verify(shards, write_index_file=write_index)
    for name, problem in problems:
        console.print(f"[red]bad[/red] {shards.rstrip('/')}/{name}: {problem}")
    if problems:
        console.print(f"{len(problems)} problem(s) in {shards}; rerun the same 'generate' command to repair")
        raise typer.Exit(1)
    done = "; index.json written" if write_index else ""
    console.print(f"[green]ok[/green]: every shard in {shards} agrees with its stats file{done}")


@app.command()
def caption(
    out: Annotated[Path, typer.Option("--out", help="Captions JSONL to write.")],
    dataset: Annotated[str, typer.Option(help="fashion-mnist | digits | FOLDER")] = "fashion-mnist",
    captioner: Annotated[str, typer.Option(help="attributes | hf")] = "attributes",
    caption_model: Annotated[
        Path | None, typer.Option("--caption-model", help="hf: local model folder.")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda (hf captioner)")] = "cpu",
    batch_size: Annotated[int, typer.Option("--batch-size", help="hf: images per batch.")] = 32,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="hf: caption length.")] = 20,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Caption every image of the real train split; prompt = "<class name>: <caption>"."""
    _setup_logging(verbose)
    from tckr_engine.data import load_dataset
    from tckr_engine.data.captioners import caption_dataset, write_captions

    data = load_dataset(dataset, "train")
    with _bar("caption") as bar:
        task = bar.add_task("caption", total=len(data))
        captions = caption_dataset(
            data,
            captioner,
            str(caption_model) if caption_model else None,
            device,
            batch_size,
            max_new_tokens,
            progress=lambda n: bar.advance(task, n),
        )
    write_captions(out, data, captions)
    console.print(f"[green]done[/green]: {len(captions)} captions ({len(set(captions))} distinct) -> {out}")


@app.command()
def finetune(
    out: Annotated[Path, typer.Option("--out", help="Generator folder to write (resumed if it exists).")],
    mode: Annotated[
        str, typer.Option(help="scratch (built-in UNets) | lora (any diffusers UNet)")
    ] = "scratch",
    preset: Annotated[str, typer.Option(help="scratch: the built-in UNet preset.")] = "tiny-fmnist",
    base: Annotated[Path | None, typer.Option(help="lora: SD checkpoint or generator folder.")] = None,
    dataset: Annotated[str, typer.Option(help="fashion-mnist | digits | FOLDER")] = "fashion-mnist",
    captions: Annotated[Path | None, typer.Option(help="Captions JSONL; class names otherwise.")] = None,
    steps: Annotated[
        int | None, typer.Option(help="Optimiser steps (scratch: 3600; lora: from --epochs).")
    ] = None,
    epochs: Annotated[float, typer.Option(help="lora: epochs when --steps is not given.")] = 3.0,
    batch_size: Annotated[int | None, typer.Option("--batch-size", help="scratch 128, lora 1.")] = None,
    grad_accum: Annotated[int, typer.Option("--grad-accum", help="lora: gradient accumulation.")] = 4,
    lr: Annotated[
        float | None, typer.Option(help="AdamW lr (scratch 2e-3 cosine; lora 1e-4 constant).")
    ] = None,
    rank: Annotated[int, typer.Option(help="lora: rank.")] = 4,
    alpha: Annotated[float, typer.Option(help="lora: alpha.")] = 4.0,
    targets: Annotated[
        str, typer.Option(help="lora: comma-separated target modules.")
    ] = "to_q,to_k,to_v,to_out.0",
    flip: Annotated[str, typer.Option(help="lora: random | none (horizontal flips).")] = "random",
    device: Annotated[str, typer.Option(help="lora: auto | cpu | cuda")] = "auto",
    dtype: Annotated[str, typer.Option(help="lora: fp32 | bf16 (frozen base weights)")] = "fp32",
    seed: Annotated[int, typer.Option()] = 0,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every")] = 250,
    sample_every: Annotated[int, typer.Option("--sample-every", help="scratch: sample grid cadence.")] = 500,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a text-conditioned generator: from scratch (built-in small UNets) or LoRA (peft, TCKR recipe)."""
    _setup_logging(verbose)
    captions_path = str(captions) if captions else None
    if mode == "scratch":
        from tckr_engine.train.generator import ScratchConfig, train_scratch

        cfg = ScratchConfig(
            preset=preset,
            dataset=dataset,
            captions=captions_path,
            steps=steps or 3600,
            batch_size=batch_size or 128,
            lr=lr or 2e-3,
            seed=seed,
            checkpoint_every=checkpoint_every,
            sample_every=sample_every,
            threads=threads,
        ).validate()
        total, train = cfg.steps, train_scratch
    elif mode == "lora":
        from tckr_engine.data import load_dataset
        from tckr_engine.train.lora import LoraTrainConfig, train_lora

        if flip not in ("random", "none"):
            raise TckrError(f"flip must be random or none, got {flip!r}")
        cfg = LoraTrainConfig(
            base=str(base) if base else "",
            dataset=dataset,
            captions=captions_path,
            rank=rank,
            alpha=alpha,
            targets=tuple(t.strip() for t in targets.split(",") if t.strip()),
            lr=lr or 1e-4,
            epochs=epochs,
            steps=steps,
            batch_size=batch_size or 1,
            grad_accum=grad_accum,
            random_flip=flip == "random",
            seed=seed,
            checkpoint_every=checkpoint_every,
            device=device,
            dtype=dtype,
            threads=threads,
        ).validate()
        total, train = cfg.total_steps(len(load_dataset(dataset, "train"))), train_lora
    else:
        raise TckrError(f"mode must be scratch or lora, got {mode!r}")
    with _bar("finetune", TextColumn("loss {task.fields[loss]}")) as bar:
        task = bar.add_task("finetune", total=total, loss="--")

        def advance(n: int, loss: float) -> None:
            bar.update(task, advance=n, loss=f"{loss:.4f}")

        path = train(cfg, out, overwrite=overwrite, progress=advance)
    console.print(f"[green]done[/green]: generator saved to {path}")


@app.command()
def teacher(
    out: Annotated[Path, typer.Option("--out", help="Teacher folder to write (weights, metrics.json).")],
    dataset: Annotated[str, typer.Option(help="fashion-mnist | digits | FOLDER")] = "fashion-mnist",
    arch: Annotated[str, typer.Option(help="resnet-small | small-cnn | timm:<name>")] = "resnet-small",
    init_weights: Annotated[
        Path | None, typer.Option("--init-weights", help="timm:<name> only: local weights file.")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Training epochs; the best on validation is kept.")] = 10,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (cosine decay).")] = 1e-3,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a previous teacher run.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train the teacher classifier on real data (best epoch chosen on a validation split of train)."""
    _setup_logging(verbose)
    from tckr_engine.train.teacher import TeacherConfig, train_teacher

    cfg = TeacherConfig(
        arch=arch,
        dataset=dataset,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        threads=threads,
        device=device,
        init_weights=str(init_weights) if init_weights else None,
    ).validate()
    with _bar("teacher", TextColumn("loss {task.fields[loss]} acc {task.fields[acc]}")) as bar:
        task = bar.add_task("teacher", total=None, loss="--", acc="--")

        def advance(done: int, total: int, loss: float, acc: float) -> None:
            bar.update(task, completed=done, total=total, loss=f"{loss:.4f}", acc=f"{acc:.3f}")

        metrics = train_teacher(cfg, out, progress=advance, overwrite=overwrite)
    console.print(
        f"[green]done[/green]: best epoch {metrics['best_epoch']} "
        f"(val acc {metrics['best_val_accuracy']:.4f}), test acc {metrics['test_accuracy']:.4f} -> {out}"
    )


@app.command()
def quality(
    shards: Annotated[Path, typer.Argument(help="Shard folder written by 'generate'.")],
    teacher: Annotated[Path, typer.Option(help="Classifier folder trained on the real dataset.")],
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Teacher agreement and teacher-feature Fréchet distance of a synthetic set (writes quality.json)."""
    _setup_logging(verbose)
    from tckr_engine.eval.quality import synthetic_quality

    result = synthetic_quality(shards, teacher)
    console.print(
        f"[green]done[/green]: {result['images']} images, "
        f"teacher agreement {result['teacher_agreement']:.4f}, "
        f"Fréchet distance {result['frechet_distance']:.3f} (teacher on real test: "
        f"{result['real_test_agreement']:.4f}) -> {shards / 'quality.json'}"
    )


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
    _setup_logging(verbose)
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
    images: Annotated[int, typer.Option(help="Images per row and repeat (rounded to whole batches).")] = 192,
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
    train_batch_size: Annotated[int, typer.Option("--train-batch-size")] = 128,
    train_workers: Annotated[
        int | None,
        typer.Option("--train-workers", help="Trainer row: DataLoader workers (default: the trainer's)."),
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    note: Annotated[str, typer.Option(help="Free text stored with the results (e.g. machine state).")] = "",
    out: Annotated[Path, typer.Option("--out", help="Folder for the CSV, JSON and plot.")] = Path(
        "docs/bench"
    ),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Images/sec of the engine per backend x attention beside a plain diffusers pipeline (+ trainer row)."""
    _setup_logging(verbose)
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
        note=note,
    ).validate()

    with _bar("bench", TextColumn("{task.description}"), _images_per_second()) as bar:

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


@app.command()
def train(
    shards: Annotated[Path, typer.Option("--shards", help="Synthetic shard folder (the pool).")],
    out: Annotated[Path, typer.Option("--out", help="Student folder (resumed from its checkpoint).")],
    teacher: Annotated[Path | None, typer.Option(help="Teacher classifier folder (labels 'online').")] = None,
    arch: Annotated[str, typer.Option(help="resnet-small | small-cnn | timm:<name>")] = "resnet-small",
    labels: Annotated[str, typer.Option(help="online | stored | hard")] = "online",
    temperature: Annotated[float, typer.Option(help="Soft-label temperature.")] = 1.0,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing")] = 0.1,
    epochs: Annotated[int, typer.Option()] = 20,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 128,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (cosine decay).")] = 1e-3,
    regenerate_every: Annotated[
        int, typer.Option("--regenerate-every", help="A fresh synthetic set every R epochs (0: never).")
    ] = 0,
    regenerate: Annotated[
        str, typer.Option(help="pool (disjoint shard subsets) | engine (new shards, in-process)")
    ] = "pool",
    images_per_round: Annotated[
        int | None, typer.Option("--images-per-round", help="Synthetic images per round.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Real dataset for validation/test (default: the shards').")
    ] = None,
    workers: Annotated[int, typer.Option(help="DataLoader workers decoding shards.")] = 2,
    seed: Annotated[int, typer.Option()] = 0,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    device: Annotated[str, typer.Option(help="cpu | cuda")] = "cpu",
    bss: Annotated[
        bool, typer.Option("--bss", help="Add the BSS (boundary samples) loss term; needs --teacher.")
    ] = False,
    bss_attack_size: Annotated[
        int, typer.Option("--bss-attack-size", help="BSS base samples attacked per batch.")
    ] = 64,
    bss_steps: Annotated[int, typer.Option("--bss-steps", help="BSS attack steps.")] = 10,
    bss_temperature: Annotated[
        float, typer.Option("--bss-temperature", help="Temperature of the BSS soft cross-entropies.")
    ] = 3.0,
    bss_beta: Annotated[
        float, typer.Option("--bss-beta", help="BSS term weight at the start (0 ablates the BSS term).")
    ] = 2.0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished student.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a student on synthetic shards with Generative Knowledge Distillation (optionally + BSS)."""
    _setup_logging(verbose)
    from tckr_engine.train.gkd import StudentConfig, train_student

    cfg = StudentConfig(
        arch=arch,
        dataset=dataset,
        teacher=str(teacher) if teacher else None,
        labels=labels,
        temperature=temperature,
        label_smoothing=label_smoothing,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        regenerate=regenerate,
        regenerate_every=regenerate_every,
        images_per_round=images_per_round,
        workers=workers,
        seed=seed,
        threads=threads,
        device=device,
        bss=bss,
        bss_attack_size=bss_attack_size,
        bss_steps=bss_steps,
        bss_temperature=bss_temperature,
        bss_beta=bss_beta,
    ).validate()
    with _bar("train", TextColumn("loss {task.fields[loss]} {task.fields[rate]} samples/s")) as bar:
        task = bar.add_task("train", total=None, loss="--", rate="--")

        def advance(done: int, total: int, loss: float, rate: float) -> None:
            bar.update(task, completed=done, total=total, loss=f"{loss:.4f}", rate=f"{rate:.0f}")

        metrics = train_student(cfg, shards, out, progress=advance, overwrite=overwrite)
    console.print(
        f"[green]done[/green]: best epoch {metrics['best_epoch']} "
        f"(val acc {metrics['best_val_accuracy']:.4f}), test acc {metrics['test_accuracy']:.4f} -> {out}"
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
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Test accuracy, LiRA membership inference (AUC, TPR at low FPR), AOP and a report for classifiers."""
    _setup_logging(verbose)
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
    with _stage_bar("shadow models") as update:
        report = run_evaluate(named, teacher, out, settings, shards=shards, progress=update)
    console.print(f"[green]done[/green]: report at {out / 'report.md'}")
    typer.echo(headline_table(report["models"]))


@contextmanager
def _stage_bar(stage: str) -> Iterator[Any]:
    """One rich progress bar per pipeline stage (a `pipeline.StageUI`)."""
    with _bar(f"{stage:>16s}", TextColumn("{task.fields[info]}")) as progress:
        task = progress.add_task(stage, total=None, info="")

        def update(completed: int, total: int | None, **fields: Any) -> None:
            info = "  ".join(
                f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items()
            )
            progress.update(task, completed=completed, total=total, info=info)

        yield update


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
    _setup_logging(verbose)
    from tckr_engine.pipeline import load_run_config, run_pipeline
    from tckr_engine.report import headline_table

    cfg = load_run_config(config, {"threads": threads, "device": device})
    folder = out if out is not None else Path("runs") / config.stem
    report = run_pipeline(cfg, folder, force=tuple(force or ()), ui=_stage_bar)
    console.print(f"[green]done[/green] in {report['total_seconds']:.0f} s: report at {folder / 'report.md'}")
    typer.echo(headline_table(report["models"]))


def main() -> None:
    try:
        app()
    except TckrError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]: committed shards are kept; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
