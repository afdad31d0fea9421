"""The Engine: owns the generation loop (schedule -> sample -> hand off to the writer pool).

Per batch: the batch's unique prompts are encoded together (a batch's prompts are fixed by the spec); the
noise comes from each job's own seed; the sampler runs the whole denoising loop with classifier-free guidance
batched into one forward; images are converted to uint8 on the device, labelled by the teacher there, and
only then copied to the host.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from tckr_engine.allocator import keep_freed_memory
from tckr_engine.engine.backends import GRAPH_BACKENDS, Denoiser, ParallelSlices, make_denoiser
from tckr_engine.engine.sampler import denoise, initial_noise, make_scheduler
from tckr_engine.engine.scheduler import Batch, BatchScheduler
from tckr_engine.engine.spec import DTYPES, Resources
from tckr_engine.engine.writer import ShardWriterPool

log = logging.getLogger(__name__)

UNCOND_PROMPT = ""  # the unconditional context for classifier-free guidance, as in diffusers pipelines


class Engine:
    """Generates the batches of a run spec with a loaded generator (and optional teacher)."""

    def __init__(self, spec: dict[str, Any], resources: Resources) -> None:
        self.spec = spec
        self.device = torch.device(spec["device"])
        self.dtype = DTYPES[spec["dtype"]]
        self.generator = resources.generator.to(self.device, self.dtype)
        self.teacher = resources.teacher
        if self.teacher is not None:
            self.teacher.to(self.device)
        self.scheduler = BatchScheduler(
            spec["num_images"], spec["shard_size"], spec["batch_size"], resources.prompts, spec["seed"]
        )
        if spec["backend"] not in GRAPH_BACKENDS:  # a graph backend exports the UNet with its own attention
            self._set_attention(spec["attention"])
        self.denoiser = make_denoiser(spec, self.generator)  # torch | compile | onnxruntime | tensorrt
        self._uncond = self.embed([UNCOND_PROMPT]) if spec["guidance"] > 1.0 else None  # (1, L, D)

    def _set_attention(self, name: str) -> None:
        # "sdpa" too: the engine's processor gives diffusers' output bit for bit and caches the
        # cross-attention keys and values of a sampling loop's context (kernels/kv_cache.py)
        from tckr_engine.kernels.processor import set_attention_backend

        set_attention_backend(self.generator.unet, name)

    def embed(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) context for the prompts: their unique texts, in first-seen order, encoded in one call.

        Only what this call is given is encoded together, never a cache filled by earlier batches: the
        encoder's numerics can depend on the batch it runs in, and a shard's bytes must not depend on which
        shards ran before it in this process. A batch's prompts are a pure function of the spec, so its
        context is too. (An earlier scheme encoded each prompt with a fixed chunk of the run's prompt list;
        with one caption per image that encoded ~20x more prompts than the run used.)
        """
        unique = list(dict.fromkeys(prompts))
        encoded = dict(zip(unique, self.generator.text_encoder(unique), strict=True))
        return torch.stack([encoded[p] for p in prompts])

    def sample(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Generate one batch: uint8 images (B, H, W, C) and teacher logits (B, K) or None, on the device."""
        with keep_freed_memory(self.device.type == "cpu"):  # no page faults for each step's tensors
            return self._sample(batch)

    @torch.inference_mode()
    def _sample(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        jobs = batch.jobs
        cond = self.embed([j.prompt.text for j in jobs])  # (B, L, D)
        noise = initial_noise([j.seed for j in jobs], self.generator.latent_shape, self.device, self.dtype)

        def loop(model: Denoiser, rows: slice) -> torch.Tensor:  # the whole sampler on some of the images
            sched = make_scheduler(self.spec["sampler"], self.generator.schedule, self.generator.kind)
            return denoise(
                model,
                sched,
                noise[rows] * sched.init_noise_sigma,
                cond[rows],
                self._uncond,
                self.spec["guidance"],
                self.spec["steps"],
            )

        if isinstance(self.denoiser, ParallelSlices):
            # Groups of images run their own sampling loops side by side, one single-threaded UNet each:
            # no barrier per denoising step (the scheduler's step and the CFG mix run in the workers too).
            # The images are those of one loop over the batch whose UNet calls are cut into the groups'
            # rows (tests/test_bench.py); the group sizes are the spec's (`cpu_slicing`). The padding of a
            # shard's last batch (copies of its last real job, never written) is not sampled: the last
            # real image stands in for it, so the shapes stay those of a full batch.
            n = batch.n_real
            g = self.denoiser.group_size(n, 2 if self._uncond is not None else 1)
            x = torch.cat(self.denoiser.map(loop, [slice(i, min(i + g, n)) for i in range(0, n, g)]))
            if n < len(jobs):  # a padded batch; a full one is not copied again
                x = torch.cat([x, x[-1:].expand(len(jobs) - n, *x.shape[1:])])  # (B, C, h, w)
        else:
            x = loop(self.denoiser, slice(None))
        images = self.generator.decode(x)  # (B, H, W, C) uint8
        logits = self.teacher(images).float() if self.teacher is not None else None  # (B, K)
        return images, logits

    def metadata(self, batch: Batch) -> list[dict[str, Any]]:
        classes, spec = self.spec["classes"], self.spec
        return [
            {
                "index": j.index,
                "seed": j.seed,
                "class_name": classes[j.class_index],
                "caption": j.prompt.caption,
                "guidance": spec["guidance"],
                "steps": spec["steps"],
                "sampler": spec["sampler"],
                "generator": spec["generator"]["id"],
                "source": spec["source"],
            }
            for j in batch.jobs[: batch.n_real]
        ]

    def run(
        self,
        shard_ids: Iterable[int],
        writer: ShardWriterPool,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        """Generate every batch of `shard_ids` into `writer`; `on_batch(n)` reports n new images."""
        with keep_freed_memory(self.device.type == "cpu"):  # one scope for the run, not one per batch
            for batch in self.scheduler.schedule(shard_ids):
                images, logits = self.sample(batch)
                n = batch.n_real
                host_images = images[:n].cpu().numpy()
                host_logits = logits[:n].cpu().numpy().astype(np.float16) if logits is not None else None
                writer.submit(batch, host_images, self.metadata(batch), host_logits)
                if on_batch is not None:
                    on_batch(n)
