"""Commands that produce and check synthetic data: `generate`, `verify`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape

from tckr_engine.cli._app import RichProgress, app, console, images_per_second, progress_bar, setup_logging
from tckr_engine.errors import TckrError

if TYPE_CHECKING:
    from tckr_engine.engine.generate import Summary


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
    config: Annotated[Path | None, typer.Option(help="TOML file with a \\[generate] table.")] = None,
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
    setup_logging(verbose)
    from tckr_engine.synth import SOURCES

    if source != "diffusion" and source not in SOURCES:  # before the flags that only fit another source
        raise TckrError(f"--source must be diffusion, {', '.join(SOURCES)}; got {source!r}")
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
    with progress_bar(label, images_per_second()) as bar:
        summary = run_generate(
            cfg,
            shards,
            overwrite=overwrite,
            writers=writers,
            progress=RichProgress(bar, label),
            distribution=dist,
        )
    mine = f" (rank {dist.rank} of {dist.world_size})" if dist.strided else ""
    _print_generated(summary, where=mine)


def _generate_synthetic(
    source: str, config: Path | None, options: dict[str, Any], steps: int | None, shards: str, overwrite: bool
) -> None:
    """`generate --source activation-max|bss`: the teacher-driven sources of `tckr_engine.synth`."""
    from tckr_engine.config import generate_table
    from tckr_engine.synth import generate_synthetic, synth_config

    table: dict[str, Any] = {}
    if config is not None:  # SynthConfig keys, [generate.activation_max] / [generate.bss]
        table = {k: v for k, v in generate_table(config).items() if k != "source"}
    table |= {"source": source, **{k: v for k, v in options.items() if v is not None}}
    cfg = synth_config(table)
    if steps is not None:  # optimisation steps of the source
        sub = "activation_max" if source == "activation-max" else "bss"
        cfg = dataclasses.replace(cfg, **{sub: dataclasses.replace(getattr(cfg, sub), steps=steps)})
    cfg.validate()
    with progress_bar(f"generate {source}", images_per_second()) as bar:
        summary = generate_synthetic(
            cfg, shards, progress=RichProgress(bar, f"generate {source}"), overwrite=overwrite
        )
    _print_generated(summary, kind=f"{source} ")


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
    setup_logging(False)
    from tckr_engine.engine.generate import verify as run_verify

    problems = run_verify(shards, write_index_file=write_index)
    for name, problem in problems:
        console.print(f"[red]bad[/red] {escape(shards.rstrip('/'))}/{escape(name)}: {escape(problem)}")
    if problems:
        console.print(f"{len(problems)} problem(s) in {shards}; rerun the same 'generate' command to repair")
        raise typer.Exit(1)
    done = "; index.json written" if write_index else ""
    console.print(f"[green]ok[/green]: every shard in {shards} agrees with its stats file{done}")


def _print_generated(summary: Summary, kind: str = "", where: str = "") -> None:
    """The summary line of a finished generation (diffusion or a teacher-driven source)."""
    console.print(
        f"[green]done[/green]: {summary.images} {kind}images in {summary.shards} shards{where} "
        f"at {summary.out} ({summary.generated} generated in {summary.seconds:.1f} s, "
        f"{summary.images_per_second:.2f} images/s)"
    )
