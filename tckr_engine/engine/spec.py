"""Run specs: a validated GenerateConfig resolved into the JSON-able spec recorded in `run.json`.

The spec is what decides shard bytes: generator identity (weights digest), classes, prompts (captions
digest), sampler and its resolved scheduler config, counts, seed, image format, device, dtype, attention,
backend and CPU threads. Two runs with the same spec produce byte-identical shards. `Resources` are the
loaded objects the spec names; workers rebuild them from the spec alone (`load_resources`).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tckr_engine import __version__
from tckr_engine.config import GenerateConfig
from tckr_engine.data.captions import Prompt, captions_digest, read_captions, template_prompts
from tckr_engine.engine.backends import check_backend, cpu_slicing
from tckr_engine.engine.sampler import make_scheduler, scheduler_description
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier, load_classifier
from tckr_engine.models.generator import Generator, file_digest, load_generator

log = logging.getLogger(__name__)

RUN_FORMAT = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Resources:
    """The loaded objects a spec names."""

    generator: Generator
    prompts: list[list[Prompt]]
    teacher: Classifier | None = None


def versions() -> dict[str, str]:
    import diffusers
    import numpy
    import PIL

    return {
        "tckr_engine": __version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def resolve_device(device: str, dtype: str) -> tuple[str, str]:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TckrError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    if dtype == "auto":
        dtype = "fp16" if device == "cuda" else "fp32"
    return device, dtype


def resolve_attention(attention: str, device: str) -> str:
    """ "auto" -> the device's default; any backend that cannot run here is a TckrError."""
    from tckr_engine.kernels.processor import check_attention_backend, default_attention_backend

    if attention == "auto":
        return default_attention_backend(torch.device(device))
    check_attention_backend(attention)
    return attention


def class_list(dataset: str) -> list[str]:
    from tckr_engine.data import class_names

    return list(class_names(dataset))


def _check_classes(what: str, theirs: tuple[str, ...] | None, classes: list[str]) -> None:
    if theirs is not None and list(theirs) != classes:
        raise TckrError(
            f"{what} classes {list(theirs)} differ from the dataset's {classes} "
            "(names and order must match); pass the --dataset it was trained on"
        )


def resolve(cfg: GenerateConfig, previous: dict[str, Any] | None = None) -> tuple[dict[str, Any], Resources]:
    """Validate `cfg`, load what it names, and return (run.json content, resources).

    `previous` is an existing run.json: when `cfg.threads` is unset, its recorded thread count is kept so a
    resume on the same folder reproduces the same bytes.
    """
    cfg.validate()
    device, dtype = resolve_device(cfg.device, cfg.dtype)
    check_backend(cfg.backend, device, dtype)  # a backend that cannot run here fails before any loading
    threads = cfg.threads
    if threads is None and previous is not None:
        threads = previous.get("spec", {}).get("threads")
    threads = int(threads or torch.get_num_threads())
    classes = class_list(cfg.dataset)

    if cfg.captions:
        prompts = read_captions(cfg.captions, classes)
        prompt_spec = {
            "source": "captions",
            "captions": str(Path(cfg.captions).resolve()),
            "sha256": captions_digest(cfg.captions),
        }
    else:
        prompts = template_prompts(classes, cfg.prompt_template)
        prompt_spec = {"source": "template", "template": cfg.prompt_template}

    generator = load_generator(cfg.model, cfg.image_size)
    _check_classes(f"generator {cfg.model}", generator.classes, classes)
    scheduler = make_scheduler(cfg.sampler, generator.schedule, generator.kind)

    teacher, teacher_spec = None, None
    if cfg.teacher:
        teacher = load_classifier(cfg.teacher)
        _check_classes(f"teacher {cfg.teacher}", teacher.classes, classes)
        tcfg = teacher.config
        if (tcfg["image_size"], tcfg["in_channels"]) != (generator.image_size, generator.channels):
            raise TckrError(
                f"teacher {cfg.teacher} expects {tcfg['image_size']}px x {tcfg['in_channels']} channels, the "
                f"generator makes {generator.image_size}px x {generator.channels}; pick a matching teacher"
            )
        teacher_path = Path(cfg.teacher).expanduser()
        teacher_spec = {
            "path": str(teacher_path.resolve()),
            "id": file_digest([teacher_path / "model.safetensors"]),
        }

    spec = {
        "source": "diffusion",
        "model": cfg.model,
        "generator": generator.describe(),
        "dataset": cfg.dataset,
        "classes": classes,
        # How contexts are batched through the text encoder (its numerics can depend on the batch):
        # "batch" = each sampling batch's unique prompts in one call (Engine.embed). Part of the spec so that
        # a folder started under another scheme is never resumed into a mix.
        "prompts": {**prompt_spec, "encoding": "batch"},
        "num_images": cfg.num_images,
        "shard_size": cfg.shard_size,
        "batch_size": cfg.batch_size,
        "steps": cfg.steps,
        "guidance": float(cfg.guidance),
        "sampler": cfg.sampler,
        "scheduler": scheduler_description(scheduler),
        "seed": cfg.seed,
        "image_format": cfg.image_format,
        "quality": cfg.quality,
        "device": device,
        "dtype": dtype,
        "attention": resolve_attention(cfg.attention, device),
        "backend": cfg.backend,
        "threads": threads,
        # How the CPU runs the UNet over a batch (row slices, one after another or side by side): compile's
        # and onnxruntime's bytes can depend on the slice shape, so a folder keeps the slicing it began with.
        "cpu_slicing": cpu_slicing(device, cfg.backend, threads, unet_params=generator.unet_params),
        "image_size": cfg.image_size,
        "teacher": teacher_spec,
    }
    run = {
        "format": RUN_FORMAT,
        "tckr_engine_version": __version__,
        "num_shards": -(-cfg.num_images // cfg.shard_size),
        "spec": spec,
        "versions": versions(),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"},
    }
    return run, Resources(generator, prompts, teacher)


def load_resources(run: dict[str, Any]) -> Resources:
    """Rebuild the resources from a run.json alone (what a remote worker does)."""
    spec = run["spec"]
    generator = load_generator(spec["model"], spec.get("image_size"))
    if generator.describe() != spec["generator"]:
        raise TckrError(f"generator {spec['model']} changed since the run started (weights differ)")
    if spec["prompts"]["source"] == "captions":
        path = spec["prompts"]["captions"]
        if captions_digest(path) != spec["prompts"]["sha256"]:
            raise TckrError(f"captions file {path} changed since the run started")
        prompts = read_captions(path, spec["classes"])
    else:
        prompts = template_prompts(spec["classes"], spec["prompts"]["template"])
    teacher = load_classifier(spec["teacher"]["path"]) if spec.get("teacher") else None
    return Resources(generator, prompts, teacher)


def spec_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Names of the spec fields that differ between two run.json files."""
    a, b = old.get("spec", {}), new.get("spec", {})
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
