"""The engine's images equal a plain diffusers sampling loop's, and StableDiffusionPipeline's, per seed."""

import io

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import tiny_config
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image

from tckr_engine.engine.generate import generate
from tckr_engine.models.generator import PIXEL_SCHEDULE, build_preset


def shard_samples(out):
    samples = list(wds.WebDataset(str(out / "shards" / "000000.tar"), shardshuffle=False).decode())
    images = np.stack([np.array(Image.open(io.BytesIO(s["png"]))) for s in samples])
    return samples, images


def plain_scheduler(name):
    """The documented sampler settings for pixel-space models, built straight from diffusers."""
    if name == "ddim":
        return DDIMScheduler(**PIXEL_SCHEDULE, clip_sample=True)
    if name == "dpm++":
        return DPMSolverMultistepScheduler(
            **PIXEL_SCHEDULE, algorithm_type="dpmsolver++", thresholding=True, sample_max_value=1.0
        )
    return EulerDiscreteScheduler(**PIXEL_SCHEDULE)


@torch.no_grad()
def plain_diffusers_loop(unet, encoder, scheduler, prompts, seeds, steps, guidance, shape):
    """What a diffusers user writes by hand: per-image generators, CFG as two halves of one batch."""
    cond = encoder(prompts)
    uncond = encoder([""] * len(prompts))
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    latents = randn_tensor((len(prompts), *shape), generator=generators) * scheduler.init_noise_sigma
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        eps = unet(model_in, t, encoder_hidden_states=torch.cat([uncond, cond])).sample
        eps_u, eps_c = eps.chunk(2)
        latents = scheduler.step(eps_u + guidance * (eps_c - eps_u), t, latents).prev_sample
    images = (latents / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)[..., 0]
    return (images.numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("sampler", ["dpm++", "ddim", "euler"])
def test_engine_matches_plain_diffusers_loop(tmp_path, sampler):
    out = tmp_path / sampler
    generate(tiny_config(num_images=16, sampler=sampler, steps=6, guidance=3.0), out)
    samples, images = shard_samples(out)
    gen = build_preset("tiny-digits")
    expected = plain_diffusers_loop(
        gen.unet,
        gen.text_encoder,
        plain_scheduler(sampler),
        [s["txt"] for s in samples],
        [s["json"]["seed"] for s in samples],
        6,
        3.0,
        (1, 8, 8),
    )
    assert images.shape == expected.shape == (16, 8, 8)
    diff = np.abs(images.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_engine_matches_stable_diffusion_pipeline(tmp_path, tiny_sd):
    out = tmp_path / "sd"
    generate(
        tiny_config(
            model=str(tiny_sd),
            num_images=12,
            batch_size=12,
            sampler="ddim",
            steps=5,
            guidance=2.5,
            prompt_template="a photo of the digit {name}",
        ),
        out,
    )
    samples, images = shard_samples(out)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        [s["txt"] for s in samples],
        generator=[torch.Generator().manual_seed(s["json"]["seed"]) for s in samples],
        num_inference_steps=5,
        guidance_scale=2.5,
        output_type="np",
    ).images
    expected = (result * 255).round().astype(np.uint8)
    assert images.shape == expected.shape == (12, 16, 16, 3)
    diff = np.abs(images.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
