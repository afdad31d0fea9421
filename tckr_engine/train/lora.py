"""LoRA fine-tuning of a generator's UNet on (image, prompt) pairs, as TCKR does (REFERENCE.md §1).

peft `LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=to_q,to_k,to_v,to_out.0)` on
the UNet only; AdamW (wd 1e-2) at a constant lr of 1e-4; batch 1 x grad-accum 4; 3 epochs; images resized
to the model's resolution, center-cropped and randomly flipped, in [-1, 1]; DDPM noise schedule from the
base's scheduler config, target by its prediction type (epsilon or v). Stable Diffusion checkpoints train
in latent space (VAE encoder, frozen); generator folders saved by tckr-engine train on pixels directly.

The output folder is what `load_generator` accepts (the LoRA fused into the base UNet):
`pytorch_lora_weights.safetensors` in the diffusers format (`StableDiffusionPipeline.load_lora_weights`
reads it) and `tckr_lora.json` {"base": absolute path, "rank", "alpha", "targets", ...}, written last.
Training resumes from `checkpoint/` (LoRA weights + optimizer and RNG state).
"""

from __future__ import annotations

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
from tckr_engine.fsutil import atomic_write, write_json
from tckr_engine.models.generator import LORA_CONFIG, LORA_WEIGHTS, Generator, load_generator
from tckr_engine.train.checkpoint import load_checkpoint, save_checkpoint
from tckr_engine.train.generator import training_noise_schedule

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoint"
ADAPTER = "tckr"
INITS = {"gaussian": "gaussian", "default": True}  # peft's init_lora_weights values
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class LoraTrainConfig:
    """LoRA training settings; defaults are TCKR's (REFERENCE.md §1)."""

    base: str = ""  # a local diffusers Stable Diffusion checkpoint or a generator folder saved by tckr-engine
    dataset: str = "fashion-mnist"
    captions: str | None = None  # JSONL from `tckr-engine caption`; class-name prompts when absent
    rank: int = 4
    alpha: float = 4.0  # LoRA scale = alpha / rank = 1
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # attention projections of the UNet
    init: str = "gaussian"  # A ~ N(0, 1/r), B = 0: the LoRA starts as a no-op
    lr: float = 1e-4  # constant, no warm-up
    weight_decay: float = 1e-2
    epochs: float = 3.0  # sets the number of optimiser steps unless `steps` is given
    steps: int | None = None  # optimiser steps (each = batch_size x grad_accum images)
    batch_size: int = 1
    grad_accum: int = 4
    grad_clip: float = 1.0  # max gradient norm (diffusers' training scripts default)
    random_flip: bool = True  # horizontal flips (TCKR); turn off for orientation-sensitive data
    seed: int = 0
    checkpoint_every: int = 250
    device: str = "auto"  # cuda when available, else cpu
    # dtype of the frozen base weights (the LoRA weights always train in fp32); no fp16: it needs loss scaling
    dtype: str = "fp32"
    threads: int | None = None

    def validate(self) -> LoraTrainConfig:
        for name in ("rank", "batch_size", "grad_accum", "checkpoint_every"):
            check_positive(name, getattr(self, name))
        if self.steps is not None:
            check_positive("steps", self.steps)
        if self.threads is not None:
            check_positive("threads", self.threads, hi=1024)
        if not self.base:
            raise TckrError(
                "a LoRA needs a base model: pass --base FOLDER (an SD checkpoint or generator folder)"
            )
        if not 0 < self.alpha < math.inf or not 0 < self.epochs < math.inf:
            raise TckrError(
                f"alpha and epochs must be finite numbers > 0, got alpha={self.alpha}, epochs={self.epochs}"
            )
        if not 0 < self.lr < 1:
            raise TckrError(f"lr must be in (0, 1), got {self.lr}")
        if not self.targets or not all(isinstance(t, str) and t for t in self.targets):
            raise TckrError(f"targets must name at least one module, got {self.targets!r}")
        if self.init not in INITS:
            raise TckrError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        if self.dtype not in DTYPES:
            raise TckrError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise TckrError(f"device must be auto, cpu or cuda, got {self.device!r}")
        return self

    def identity(self) -> dict[str, Any]:
        """Fields a resume must agree on (everything but the step budget, cadence and placement)."""
        skip = {"steps", "epochs", "checkpoint_every", "device", "threads"}
        values = {k: v for k, v in dataclasses.asdict(self).items() if k not in skip}
        values["base"] = str(Path(self.base).expanduser().resolve())
        values["targets"] = list(self.targets)
        return values

    def total_steps(self, num_images: int) -> int:
        return self.steps or max(1, math.ceil(self.epochs * num_images / (self.batch_size * self.grad_accum)))


def _pixels(images: np.ndarray, size: int, channels: int, flip: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> float (B, channels, size, size) in [-1, 1]: resize the short side, center crop,
    flip the rows where `flip` (B,) is true; grey is repeated to RGB when the model wants 3 channels."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1  # (B, C, H, W)
    if x.shape[1] != channels:
        x = x.expand(-1, channels, -1, -1)  # (B, 3, H, W) from grey
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        new = (max(size, round(h * scale)), max(size, round(w * scale)))
        x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
        h, w = new
    top, left = (h - size) // 2, (w - size) // 2
    x = x[:, :, top : top + size, left : left + size]  # (B, C, size, size)
    return torch.where(flip[:, None, None, None], x.flip(-1), x).clamp(-1, 1).contiguous()


class _PromptCache:
    """Prompt -> text embedding (L, D), kept while they fit in `budget` bytes: class-name prompts are encoded
    once, a large captions file falls back to encoding each batch."""

    def __init__(self, encoder: Any, budget: int = 1 << 30) -> None:
        self.encoder, self.budget, self.used = encoder, budget, 0
        self.table: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.table]
        new: dict[str, torch.Tensor] = {}
        if missing:
            # .clone(): the encoders run under inference_mode; autograd needs a normal tensor
            new = dict(zip(missing, self.encoder(missing).clone(), strict=True))  # each (L, D)
            size = sum(t.numel() * t.element_size() for t in new.values())
            if self.used + size <= self.budget:
                self.table.update(new)
                self.used += size
        return torch.stack([self.table[p] if p in self.table else new[p] for p in prompts])  # (B, L, D)


def _lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if p.requires_grad}


def _save_checkpoint(
    folder: Path,
    unet: torch.nn.Module,
    opt: torch.optim.Optimizer,
    step: int,
    rng: torch.Generator,
    cfg: LoraTrainConfig,
) -> None:
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        weights = {n: p.detach().float().cpu().contiguous() for n, p in _lora_params(unet).items()}
        save_file(weights, str(tmp / "lora.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "rng": rng.get_state()}, tmp / "optimizer.pt")

    save_checkpoint(folder, step, cfg.identity(), write)


def _read_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(LoRA weights, optimizer + RNG state) of a checkpoint, both read before either is applied."""
    from safetensors.torch import load_file

    return load_file(str(folder / "lora.safetensors")), torch.load(folder / "optimizer.pt", weights_only=True)


def _apply_checkpoint(
    folder: Path,
    state: tuple[dict[str, torch.Tensor], dict[str, Any]],
    unet: torch.nn.Module,
    opt: torch.optim.Optimizer,
    rng: torch.Generator,
) -> None:
    weights, extra = state
    params = _lora_params(unet)
    if set(weights) != set(params):
        raise TckrError(
            f"checkpoint {folder} does not match this LoRA's layers; delete it or use --overwrite"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])
    opt.load_state_dict(extra["optimizer"])
    rng.set_state(extra["rng"])


def _prepare_out(out: Path, cfg: LoraTrainConfig, overwrite: bool) -> tuple[int, Any] | None:
    """Check `out` against an existing checkpoint: (step, its contents) to resume from, or None."""
    resumed = load_checkpoint(
        out / CHECKPOINT_DIR, cfg.identity(), overwrite, _read_checkpoint, "LoRA training"
    )
    others = out.exists() and any(not p.name.startswith(CHECKPOINT_DIR) for p in out.iterdir())
    if resumed is None and others and not overwrite:
        raise TckrError(
            f"{out} is not empty and holds no LoRA checkpoint; choose a new folder or --overwrite"
        )
    return resumed


def _save_lora(
    peft_config: Any, out: Path, cfg: LoraTrainConfig, gen: Generator, classes: tuple[str, ...]
) -> None:
    """`pytorch_lora_weights.safetensors` (diffusers format) then `tckr_lora.json` (the completion marker)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(gen.unet, adapter_name=ADAPTER)
    layers = {
        k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()
    }
    metadata = peft_config.to_dict()  # lets diffusers rebuild the exact LoraConfig (alpha != rank included)
    StableDiffusionPipeline.save_lora_weights(
        str(out), unet_lora_layers=layers, weight_name=LORA_WEIGHTS, unet_lora_adapter_metadata=metadata
    )
    info = {
        "format": 1,
        "base": str(Path(cfg.base).expanduser().resolve()),
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "targets": list(cfg.targets),
        "init": cfg.init,
        "kind": gen.kind,
        "image_size": gen.image_size,
        "classes": list(classes),
    }
    write_json(out / LORA_CONFIG, info)


@keep_freed_memory()  # no page faults for every batch's tensors (allocator.py)
def train_lora(
    cfg: LoraTrainConfig,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Train (or resume) a LoRA on the UNet of `cfg.base` into `out`; returns `out`.

    `progress(n, loss)` is called after every optimiser step (n = 1) with that step's mean loss.
    """
    try:
        from peft import LoraConfig
    except ImportError:
        raise TckrError("LoRA training needs peft: pip install peft") from None

    from tckr_engine.data import load_dataset

    cfg.validate()
    out = Path(out).expanduser()
    base = Path(cfg.base).expanduser()
    if not base.is_dir():
        raise TckrError(
            f"base model folder not found: {base}; pass a local SD checkpoint or generator folder"
        )
    if (base / LORA_CONFIG).is_file():
        raise TckrError(f"{base} is itself a LoRA folder; pass its base ({LORA_CONFIG}: 'base') instead")
    if out.resolve() == base.resolve():
        raise TckrError("the LoRA output folder must differ from the base model folder")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if cfg.device == "auto" else cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TckrError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")

    dataset = load_dataset(cfg.dataset, "train")
    gen = load_generator(str(base))
    if dataset.images.shape[3] == 3 and gen.channels == 1:
        raise TckrError(f"{cfg.base} makes grey images but {cfg.dataset} is RGB; choose a matching base")
    if gen.classes is not None and tuple(gen.classes) != tuple(dataset.classes):
        raise TckrError(f"{cfg.base} was trained on classes {list(gen.classes)}, not {list(dataset.classes)}")
    if cfg.captions:
        prompts = read_captions_per_image(cfg.captions, dataset.classes, dataset.labels)
    else:
        prompts = [dataset.classes[c] for c in dataset.labels.tolist()]
    noise_sched = training_noise_schedule(gen.schedule)
    prediction = noise_sched.config.prediction_type
    if prediction not in ("epsilon", "v_prediction"):
        raise TckrError(
            f"prediction type {prediction!r} of {cfg.base} is not supported (epsilon or v_prediction)"
        )
    resume = _prepare_out(out, cfg, overwrite)
    total = cfg.total_steps(len(dataset))

    dtype = DTYPES[cfg.dtype]
    gen.to(device, dtype)
    unet = gen.unet.requires_grad_(False)
    if gen.vae is not None:
        gen.vae.requires_grad_(False)
    peft_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        init_lora_weights=INITS[cfg.init],
        target_modules=list(cfg.targets),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the gaussian init of A is a pure function of the seed
        try:
            unet.add_adapter(peft_config, adapter_name=ADAPTER)
        except ValueError as e:
            raise TckrError(f"cannot add the LoRA to {cfg.base}'s UNet: {str(e).splitlines()[0]}") from None
    params = _lora_params(unet)
    for p in params.values():
        p.data = p.data.float()  # trainable weights in fp32 whatever the base dtype
    unet.train()
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    rng = torch.Generator().manual_seed(cfg.seed)
    step = 0
    if resume is not None:
        step = resume[0]
        _apply_checkpoint(out / CHECKPOINT_DIR, resume[1], unet, opt, rng)
        log.info("resuming from step %d of %d", step, total)
    out.mkdir(parents=True, exist_ok=True)
    (out / LORA_CONFIG).unlink(missing_ok=True)  # the folder is incomplete until training finishes

    size, embed = gen.image_size, _PromptCache(gen.text_encoder)
    n_params = sum(p.numel() for p in params.values())
    log.info(
        "LoRA r=%d on %s: %d trainable parameters, %d steps, %s", cfg.rank, cfg.base, n_params, total, device
    )
    log_path, t0 = out / "train_log.jsonl", time.perf_counter()
    while step < total:
        losses = []
        for _ in range(cfg.grad_accum):
            idx = torch.randint(0, len(dataset), (cfg.batch_size,), generator=rng)  # (B,)
            flip = torch.rand(cfg.batch_size, generator=rng) < 0.5  # (B,)
            flip &= cfg.random_flip
            x0 = _pixels(dataset.images[idx.numpy()], size, gen.channels, flip)  # (B, C, S, S)
            x0 = x0.to(device, dtype)
            with torch.no_grad():
                if gen.vae is not None:
                    dist = gen.vae.encode(x0).latent_dist
                    x0 = dist.sample(generator=rng) * gen.vae.config.scaling_factor  # (B, 4, S/8, S/8)
                context = embed([prompts[i] for i in idx.tolist()])  # (B, L, D)
            noise = torch.randn(x0.shape, generator=rng).to(device, dtype)  # (B, c, h, w)
            t = torch.randint(0, noise_sched.config.num_train_timesteps, (cfg.batch_size,), generator=rng)
            t = t.to(device)  # (B,)
            xt = noise_sched.add_noise(x0, noise, t)
            target = noise_sched.get_velocity(x0, noise, t) if prediction == "v_prediction" else noise
            pred = unet(xt, t, encoder_hidden_states=context, return_dict=False)[0]  # (B, c, h, w)
            loss = F.mse_loss(pred.float(), target.float())
            (loss / cfg.grad_accum).backward()
            losses.append(loss.detach())
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        value = float(torch.stack(losses).mean())  # one host sync per optimiser step
        if progress is not None:
            progress(1, value)
        if step % 50 == 0 or step == total:
            row = {"step": step, "loss": round(value, 5), "seconds": round(time.perf_counter() - t0, 1)}
            with log_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if step % cfg.checkpoint_every == 0 or step == total:
            _save_checkpoint(out / CHECKPOINT_DIR, unet, opt, step, rng, cfg)

    atomic_write(out / "train_config.json", (json.dumps(dataclasses.asdict(cfg), indent=2) + "\n").encode())
    _save_lora(peft_config, out, cfg, gen, dataset.classes)
    log.info("LoRA saved to %s", out / LORA_WEIGHTS)
    return out
