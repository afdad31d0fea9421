"""From-scratch training of the built-in text-conditioned pixel UNets on (image, prompt) pairs.

Epsilon (or v) prediction on the preset's DDPM schedule, prompt dropout for classifier-free guidance, AdamW
with linear warm-up and cosine decay, EMA weights (what gets saved and sampled), resumable checkpoints, a
sample grid PNG every N steps. Prompts are embedded once per unique prompt (MiniLM) and looked up per batch.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tckr_engine.allocator import keep_freed_memory
from tckr_engine.config import check_positive
from tckr_engine.data.captions import read_captions_per_image
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write
from tckr_engine.models.generator import Generator, build_preset, save_generator
from tckr_engine.train.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"


@dataclass
class ScratchConfig:
    """Training settings for a built-in pixel UNet (defaults: REFERENCE.md §8, the calibrated recipe)."""

    preset: str = "tiny-fmnist"
    dataset: str = "fashion-mnist"
    captions: str | None = None  # JSONL from `tckr-engine caption`; class-name prompts when absent
    steps: int = 3600
    batch_size: int = 128
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 1e-2
    ema_decay: float = 0.999
    prompt_dropout: float = 0.1  # share of prompts replaced by "" so the model also learns p(x)
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 250
    sample_every: int = 500
    threads: int | None = None

    def validate(self) -> ScratchConfig:
        for name in ("steps", "batch_size", "checkpoint_every", "sample_every"):
            check_positive(name, getattr(self, name))
        if not 0 < self.lr < 1:
            raise TckrError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 <= self.prompt_dropout < 1:
            raise TckrError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if not 0 < self.ema_decay < 1:
            raise TckrError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.threads is not None:
            check_positive("threads", self.threads, hi=1024)
        return self

    def identity(self) -> dict[str, Any]:
        """Fields a resume must agree on (everything but the step budget and logging cadence)."""
        skip = {"steps", "checkpoint_every", "sample_every", "threads"}
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))  # cosine down to 10 %

    return f


def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters(), strict=True):
            e.lerp_(p, 1 - decay)


class _Prompts:
    """Per-image prompt ids into a table of unique prompt embeddings (row 0 = the empty prompt)."""

    def __init__(self, gen: Generator, prompts: list[str], batch: int = 256) -> None:
        unique = ["", *sorted(set(prompts) - {""})]
        position = {p: i for i, p in enumerate(unique)}
        self.ids = torch.tensor([position[p] for p in prompts])  # (N,)
        chunks = [gen.text_encoder(unique[i : i + batch]) for i in range(0, len(unique), batch)]
        self.table = torch.cat(chunks).float()  # (U, L, D)
        log.info("%d images, %d unique prompts embedded", len(prompts), len(unique))


def _save_checkpoint(folder: Path, unet, ema, opt, sched, step: int, rng: torch.Generator, cfg) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(tmp / "unet.safetensors"))
        save_file({k: v.contiguous() for k, v in ema.state_dict().items()}, str(tmp / "ema.safetensors"))
        torch.save(
            {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "rng": rng.get_state()},
            tmp / "optimizer.pt",
        )

    save_checkpoint(folder, step, cfg.identity(), write)


def _read_checkpoint(folder: Path) -> tuple[dict, dict, dict]:
    """(unet, ema, optimizer + scheduler + RNG state) of a checkpoint, all read before any is applied."""
    from safetensors.torch import load_file

    return (
        load_file(str(folder / "unet.safetensors")),
        load_file(str(folder / "ema.safetensors")),
        torch.load(folder / "optimizer.pt", weights_only=True),
    )


def _sample_grid(ema, gen: Generator, prompts: list[str], path: Path, seed: int, per_row: int = 8) -> None:
    """A grid with one row per prompt (class), `per_row` samples each, 20 DPM-Solver++ steps, guidance 2."""
    from PIL import Image

    from tckr_engine.engine.sampler import denoise, initial_noise, make_scheduler, unet_fn

    ema.eval()
    texts = [p for p in prompts for _ in range(per_row)]
    cond = gen.text_encoder(texts)
    uncond = gen.text_encoder([""])
    sched = make_scheduler("dpm++", gen.schedule, "pixel")
    seeds = [seed * 1000 + i for i in range(len(texts))]
    noise = initial_noise(
        seeds, (gen.channels, gen.image_size, gen.image_size), torch.device("cpu"), cond.dtype
    )
    x = denoise(unet_fn(ema), sched, noise * sched.init_noise_sigma, cond, uncond, 2.0, 20)
    images = gen.decode(x).numpy()  # (R*C, H, W, ch)
    h, w, ch = images.shape[1:]
    grid = (
        images.reshape(len(prompts), per_row, h, w, ch)
        .transpose(0, 2, 1, 3, 4)
        .reshape(len(prompts) * h, per_row * w, ch)
    )
    Image.fromarray(grid[..., 0] if ch == 1 else grid).save(path)


@keep_freed_memory()  # no page faults for every batch's tensors (allocator.py)
def train_scratch(
    cfg: ScratchConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, float], None] | None = None,
    stop_at: int | None = None,
) -> Path | None:
    """Train (or resume) a preset from scratch into `out`; returns the saved generator folder (= out).

    `stop_at` ends this call early at that step with a checkpoint (a time-boxed slice of the same run; the
    schedule still spans `cfg.steps`) and returns None; rerunning resumes.
    """

    from tckr_engine.data import load_dataset

    cfg.validate()
    out = Path(out).expanduser()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dataset = load_dataset(cfg.dataset, "train")
    gen = build_preset(cfg.preset)
    if (dataset.images.shape[1], dataset.images.shape[3]) != (gen.image_size, gen.channels):
        raise TckrError(
            f"preset {cfg.preset} makes {gen.image_size}px x {gen.channels} channels but {cfg.dataset} has "
            f"{dataset.images.shape[1]}px x {dataset.images.shape[3]}; choose a matching preset"
        )
    if cfg.captions:
        prompts = read_captions_per_image(cfg.captions, dataset.classes, dataset.labels)
    else:
        prompts = [dataset.classes[c] for c in dataset.labels.tolist()]
    table = _Prompts(gen, prompts)

    unet = gen.unet.train()
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup_steps, cfg.steps))
    rng = torch.Generator().manual_seed(cfg.seed)
    step = 0

    ckpt = out / CHECKPOINT_DIR
    resumed = load_checkpoint(ckpt, cfg.identity(), overwrite, _read_checkpoint, "training")
    if resumed is not None:
        step, (unet_state, ema_state, extra) = resumed
        unet.load_state_dict(unet_state)
        ema.load_state_dict(ema_state)
        opt.load_state_dict(extra["optimizer"])
        sched.load_state_dict(extra["lr_scheduler"])
        rng.set_state(extra["rng"])
        log.info("resuming from step %d", step)
    elif out.exists() and any(not p.name.startswith(CHECKPOINT_DIR) for p in out.iterdir()) and not overwrite:
        raise TckrError(
            f"{out} is not empty and holds no training checkpoint; choose a new folder or --overwrite"
        )

    noise_sched = training_noise_schedule(gen.schedule)
    images = torch.from_numpy(np.array(dataset.images)).permute(0, 3, 1, 2)  # (N, C, H, W) uint8, own copy
    (out / "samples").mkdir(parents=True, exist_ok=True)
    log_path = out / "train_log.jsonl"
    class_prompts = list(dataset.classes)
    t0 = time.perf_counter()
    end = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
    while step < end:
        idx = torch.randint(0, len(images), (cfg.batch_size,), generator=rng)
        x0 = images[idx].float() / 127.5 - 1  # (B, C, H, W) in [-1, 1]
        ids = table.ids[idx].clone()
        ids[torch.rand(cfg.batch_size, generator=rng) < cfg.prompt_dropout] = 0  # dropped -> ""
        noise = torch.randn(x0.shape, generator=rng)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=rng)
        xt = noise_sched.add_noise(x0, noise, t)
        target = (
            noise_sched.get_velocity(x0, noise, t)
            if gen.schedule["prediction_type"] == "v_prediction"
            else noise
        )
        pred = unet(xt, t, encoder_hidden_states=table.table[ids], return_dict=False)[0]
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        _ema_update(ema, unet, min(cfg.ema_decay, (1 + step) / (10 + step)))
        value = float(loss.detach())
        if progress is not None:
            progress(1, value)
        if step % 50 == 0 or step == cfg.steps:
            with log_path.open("a") as f:
                f.write(
                    json.dumps(
                        {
                            "step": step,
                            "loss": round(value, 5),
                            "lr": sched.get_last_lr()[0],
                            "seconds": round(time.perf_counter() - t0, 1),
                        }
                    )
                    + "\n"
                )
        if step % cfg.checkpoint_every == 0 or step in (cfg.steps, end):
            _save_checkpoint(ckpt, unet, ema, opt, sched, step, rng, cfg)
        if step % cfg.sample_every == 0 or step == cfg.steps:
            with torch.no_grad():
                _sample_grid(ema, gen, class_prompts, out / "samples" / f"step_{step:06d}.png", cfg.seed)
    if step < cfg.steps:
        return None
    final = Generator(
        ema,
        gen.text_encoder,
        gen.schedule,
        "pixel",
        gen.image_size,
        gen.channels,
        gen.ident,
        classes=tuple(dataset.classes),
    )
    save_generator(final, out)
    atomic_write(out / "train_config.json", (json.dumps(dataclasses.asdict(cfg), indent=2) + "\n").encode())
    return out


def training_noise_schedule(schedule: dict[str, Any]) -> Any:
    """The DDPM forward process (betas, prediction type) a generator was/is trained with."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(schedule)
