"""The noise schedule / sampler: diffusers schedulers stepped on a whole batch, CFG batched into one forward.

`make_scheduler` builds a diffusers scheduler from the generator's training schedule; `denoise` runs the
whole loop. Pixel-space models clip or threshold the x0 prediction (REFERENCE.md §8: with the cosine
schedule, alpha_bar at the last training step is ~0 and an unclipped first x0 estimate saturates).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tckr_engine.errors import TckrError
from tckr_engine.kernels.kv_cache import cross_attention_kv_cache

# Callable (x (B, C, h, w), t (scalar tensor), context (B, L, D)) -> model output (B, C, h, w)
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def make_scheduler(name: str, schedule: dict[str, Any], kind: str) -> Any:
    """A fresh diffusers scheduler for sampler `name` on the generator's training `schedule`."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    pixel = kind == "pixel"
    base = {k: v for k, v in schedule.items() if not k.startswith("_")}
    if name == "ddim":
        return DDIMScheduler.from_config({**base, "clip_sample": pixel, "clip_sample_range": 1.0})
    if name == "dpm++":
        extra = {"thresholding": True, "sample_max_value": 1.0} if pixel else {"thresholding": False}
        return DPMSolverMultistepScheduler.from_config({**base, "algorithm_type": "dpmsolver++", **extra})
    if name == "euler":
        return EulerDiscreteScheduler.from_config(base)
    raise TckrError(f"unknown sampler {name!r}; choose ddim, dpm++ or euler")


def scheduler_description(scheduler: Any) -> dict[str, Any]:
    """The scheduler class and its resolved config (recorded in run.json)."""
    cfg = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    return {"class": type(scheduler).__name__, "config": cfg}


def initial_noise(
    seeds: list[int], shape: tuple[int, int, int], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """One CPU generator per sample (device independent, as diffusers' `randn_tensor` with a list)."""
    noise = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)) for s in seeds]
    return torch.cat(noise).to(device, dtype)  # (B, C, h, w)


@torch.inference_mode()
def denoise(
    model: DenoiseFn,
    scheduler: Any,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor | None,
    guidance: float,
    steps: int,
) -> torch.Tensor:
    """Run the sampler from pure noise `latents` (B, C, h, w), already scaled by `init_noise_sigma`.

    With guidance > 1 and an unconditional context, the conditional and unconditional passes run as one
    forward of batch 2B; guided output = uncond + guidance * (cond - uncond), as diffusers pipelines do.
    """
    scheduler.set_timesteps(steps, device=latents.device)
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(0)  # avoids a timestep lookup (a host sync) on the first step
    cfg = guidance > 1.0 and uncond is not None
    # (2B, L, D) with guidance: unconditional rows first, as diffusers pipelines order them
    context = torch.cat([uncond.expand(cond.shape[0], -1, -1), cond]) if cfg else cond
    x = latents
    # `context` is one tensor for the whole loop: cross-attention layers project it to keys and values once
    with cross_attention_kv_cache():
        for t in scheduler.timesteps:
            x_in = torch.cat([x, x]) if cfg else x  # (2B or B, C, h, w)
            x_in = scheduler.scale_model_input(x_in, t)
            out = model(x_in, t, context)
            if cfg:
                out_u, out_c = out.chunk(2)
                out = out_u + guidance * (out_c - out_u)
            x = scheduler.step(out, t, x, return_dict=False)[0]
    return x


def unet_fn(unet: torch.nn.Module) -> DenoiseFn:
    """The eager PyTorch denoiser: a diffusers UNet2DConditionModel forward."""

    def fn(x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]

    return fn
