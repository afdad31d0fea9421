"""Commands that train models: `caption` (its inputs), `finetune`, `teacher`, `train`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import TextColumn

from tckr_engine.cli._app import app, console, progress_bar, setup_logging
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import check_output_folder


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
    setup_logging(verbose)
    from tckr_engine.data import load_dataset
    from tckr_engine.data.captioners import caption_dataset, write_captions
    from tckr_engine.fsutil import check_output_file

    out = check_output_file(out, "captions file")  # before captioning the whole split
    data = load_dataset(dataset, "train")
    with progress_bar("caption") as bar:
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
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Write into a folder of other files, and start over where its checkpoint is another "
            "config's or unreadable (a readable checkpoint of the same config is resumed).",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Train a text-conditioned generator: from scratch (built-in small UNets) or LoRA (peft, TCKR recipe)."""
    setup_logging(verbose)
    check_output_folder(out, "generator folder")
    captions_path = str(captions) if captions else None
    if mode == "scratch":
        from tckr_engine.train.generator import ScratchConfig, train_scratch

        cfg = ScratchConfig(
            preset=preset,
            dataset=dataset,
            captions=captions_path,
            steps=3600 if steps is None else steps,
            batch_size=128 if batch_size is None else batch_size,
            lr=2e-3 if lr is None else lr,
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
            lr=1e-4 if lr is None else lr,
            epochs=epochs,
            steps=steps,
            batch_size=1 if batch_size is None else batch_size,
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
    with progress_bar("finetune", TextColumn("loss {task.fields[loss]}")) as bar:
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
    setup_logging(verbose)
    check_output_folder(out, "teacher folder")
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
    with progress_bar("teacher", TextColumn("loss {task.fields[loss]} acc {task.fields[acc]}")) as bar:
        task = bar.add_task("teacher", total=None, loss="--", acc="--")

        def advance(done: int, total: int, loss: float, acc: float) -> None:
            bar.update(task, completed=done, total=total, loss=f"{loss:.4f}", acc=f"{acc:.3f}")

        metrics = train_teacher(cfg, out, progress=advance, overwrite=overwrite)
    _print_trained(metrics, out)


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
    workers: Annotated[
        int, typer.Option(help="Shard streams decoded in parallel; their number fixes the batch order.")
    ] = 2,
    loader: Annotated[
        str,
        typer.Option(
            help="auto | processes | in-process: read the streams in DataLoader worker processes or in the "
            "training process (the same batches); auto: in-process when training on the CPU leaves no "
            "core per stream spare."
        ),
    ] = "auto",
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
    setup_logging(verbose)
    check_output_folder(out, "student folder")
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
        loader=loader,
        seed=seed,
        threads=threads,
        device=device,
        bss=bss,
        bss_attack_size=bss_attack_size,
        bss_steps=bss_steps,
        bss_temperature=bss_temperature,
        bss_beta=bss_beta,
    ).validate()
    with progress_bar("train", TextColumn("loss {task.fields[loss]} {task.fields[rate]} samples/s")) as bar:
        task = bar.add_task("train", total=None, loss="--", rate="--")

        def advance(done: int, total: int, loss: float, rate: float) -> None:
            bar.update(task, completed=done, total=total, loss=f"{loss:.4f}", rate=f"{rate:.0f}")

        metrics = train_student(cfg, shards, out, progress=advance, overwrite=overwrite)
    _print_trained(metrics, out)


def _print_trained(metrics: dict[str, Any], out: Path) -> None:
    """The summary line of a finished classifier (teacher or student)."""
    console.print(
        f"[green]done[/green]: best epoch {metrics['best_epoch']} "
        f"(val acc {metrics['best_val_accuracy']:.4f}), test acc {metrics['test_accuracy']:.4f} -> {out}"
    )
