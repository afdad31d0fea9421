"""The diffusers baseline the engine is measured against: what a diffusers user writes, image files included.

- Pixel-space generators (no diffusers pipeline class exists for a text-conditioned pixel UNet): the plain
  diffusers sampling loop - the same UNet module, the diffusers scheduler class and config the engine's
  run spec names, `randn_tensor` with one `torch.Generator` per image (so the noise is the engine's), the
  conditional and unconditional halves in one batch, `VaeImageProcessor.postprocess` to PIL images.
- Latent generators (Stable Diffusion architecture): a real `StableDiffusionPipeline` built from the same
  UNet, VAE and scheduler, called with `prompt_embeds` / `negative_prompt_embeds` from the generator's text
  encoder (the `sd15-arch` preset has no tokenizer; for a CLIP checkpoint this is the computation
  `encode_prompt` does), per-image generators, `output_type="pil"`.
Both encode the batch's prompts and the empty negative prompt on every call, as pipelines do, and save
each image with `PIL.Image.save` one by one on the calling thread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tckr_engine.engine.scheduler import Job
from tckr_engine.models.generator import Generator

UNCOND = ""  # the negative prompt diffusers pipelines use when none is given


def diffusers_scheduler(spec: dict[str, Any]) -> Any:
    """The scheduler the run spec records, rebuilt from diffusers by class name and config."""
    import diffusers

    desc = spec["scheduler"]
    return getattr(diffusers, desc["class"]).from_config(desc["config"])


class Baseline:
    """`baseline(jobs) -> PIL images` for one batch of jobs; `save` writes them like a user would."""

    def __init__(self, generator: Generator, spec: dict[str, Any]) -> None:
        self.generator = generator
        self.steps = int(spec["steps"])
        self.guidance = float(spec["guidance"])
        self.cfg = self.guidance > 1.0
        self.scheduler = diffusers_scheduler(spec)
        self.device = torch.device(spec["device"])
        self.describe = ""

    def attention_note(self) -> str:
        """The UNet's attention processor classes (diffusers' own for a plain baseline)."""
        procs = getattr(self.generator.unet, "attn_processors", {})
        return "attention " + ("+".join(sorted({type(p).__name__ for p in procs.values()})) or "none")

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        enc = self.generator.text_encoder
        cond = enc(prompts)  # (B, L, D)
        uncond = enc([UNCOND] * len(prompts)) if self.cfg else None  # (B, L, D)
        return cond, uncond

    def __call__(self, jobs: Sequence[Job]) -> list[Any]:
        raise NotImplementedError

    @staticmethod
    def save(images: list[Any], jobs: Sequence[Job], folder: Path) -> None:
        for image, job in zip(images, jobs, strict=True):
            image.save(folder / f"{job.key}.png")

    def text_seconds(self, jobs: Sequence[Job], repeats: int = 3) -> float:
        """Median seconds the per-call prompt encoding costs for one batch (reported, not subtracted)."""
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.encode([j.prompt.text for j in jobs])
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times)


class PixelLoop(Baseline):
    """The plain diffusers sampling loop for a pixel-space text-conditioned UNet."""

    def __init__(self, generator: Generator, spec: dict[str, Any]) -> None:
        from diffusers.image_processor import VaeImageProcessor

        super().__init__(generator, spec)
        self.processor = VaeImageProcessor(do_normalize=True)
        self.describe = (
            f"plain diffusers loop: {type(self.generator.unet).__name__} + "
            f"{type(self.scheduler).__name__}, CFG as one batch, VaeImageProcessor.postprocess, PIL save, "
            f"{self.attention_note()}"
        )

    @torch.no_grad()
    def __call__(self, jobs: Sequence[Job]) -> list[Any]:
        from diffusers.utils.torch_utils import randn_tensor

        gen, sched = self.generator, self.scheduler
        cond, uncond = self.encode([j.prompt.text for j in jobs])
        context = torch.cat([uncond, cond]) if self.cfg else cond  # (2B or B, L, D)
        generators = [torch.Generator().manual_seed(j.seed) for j in jobs]
        shape = (len(jobs), *gen.latent_shape)
        latents = randn_tensor(shape, generator=generators, device=self.device, dtype=gen.dtype)
        latents = latents * sched.init_noise_sigma  # (B, C, h, w)
        sched.set_timesteps(self.steps, device=self.device)
        for t in sched.timesteps:
            model_in = torch.cat([latents] * 2) if self.cfg else latents
            model_in = sched.scale_model_input(model_in, t)
            noise = gen.unet(model_in, t, encoder_hidden_states=context).sample
            if self.cfg:
                noise_u, noise_c = noise.chunk(2)
                noise = noise_u + self.guidance * (noise_c - noise_u)
            latents = sched.step(noise, t, latents).prev_sample
        return self.processor.postprocess(latents, output_type="pil")


class SDPipeline(Baseline):
    """diffusers' `StableDiffusionPipeline` on the generator's UNet, VAE and the run's scheduler."""

    def __init__(self, generator: Generator, spec: dict[str, Any]) -> None:
        from diffusers import StableDiffusionPipeline

        super().__init__(generator, spec)
        self.pipe = StableDiffusionPipeline(
            vae=generator.vae,
            text_encoder=None,
            tokenizer=None,
            unet=generator.unet,
            scheduler=self.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self.describe = (
            f"diffusers StableDiffusionPipeline ({type(self.scheduler).__name__}), prompt_embeds from the "
            f"generator's text encoder, output_type='pil', PIL save, {self.attention_note()}"
        )

    def __call__(self, jobs: Sequence[Job]) -> list[Any]:
        cond, uncond = self.encode([j.prompt.text for j in jobs])
        return self.pipe(
            prompt_embeds=cond,
            negative_prompt_embeds=uncond,
            generator=[torch.Generator().manual_seed(j.seed) for j in jobs],
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            output_type="pil",
        ).images


def make_baseline(generator: Generator, spec: dict[str, Any]) -> Baseline:
    return SDPipeline(generator, spec) if generator.kind == "latent" else PixelLoop(generator, spec)


def run_baseline(
    baseline: Baseline,
    batches: Sequence[Sequence[Job]],
    folder: Path,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Generate every batch and save its images into `folder` (created), one PNG file per image."""
    folder.mkdir(parents=True, exist_ok=True)
    for jobs in batches:
        images = baseline(jobs)
        baseline.save(images, jobs, folder)
        if on_batch is not None:
            on_batch(len(jobs))


def read_pngs(folder: Path) -> dict[str, np.ndarray]:
    """key -> uint8 (H, W, C) of every PNG file in `folder`."""
    from PIL import Image

    out = {}
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as image:
            arr = np.asarray(image)
        out[path.stem] = arr[..., None] if arr.ndim == 2 else arr
    return out
