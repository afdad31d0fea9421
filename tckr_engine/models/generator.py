"""Generators: a denoising UNet, its text encoder, its noise schedule and (for latent models) a VAE.

Sources:
- named presets (`PRESETS`): small text-conditioned pixel-space UNets for 8-64 px images, conditioned on
  MiniLM token states, freshly initialised with a fixed seed; and `sd15-arch`, the Stable Diffusion 1.5
  UNet + VAE architecture with random weights and random text embeddings, for throughput work;
- a folder saved by `save_generator` (diffusers format: `unet/`, `scheduler/`, `tckr_generator.json`);
- a local diffusers Stable Diffusion checkpoint (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
  `tokenizer/`, `scheduler/`), loaded with `local_files_only=True`.
Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tckr_engine.errors import TckrError
from tckr_engine.models.text import RandomTextEncoder, TextEncoder, build_text_encoder

log = logging.getLogger(__name__)

CONFIG_NAME = "tckr_generator.json"
LORA_CONFIG = "tckr_lora.json"  # a LoRA folder written by tckr_engine.train.lora: base path, rank, alpha, ...
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # diffusers' LoRA file name and format
INIT_SEED = 0  # presets are initialised under this seed so "preset:X" always names the same weights

# The training noise schedule of the built-in pixel UNets: cosine ("squaredcos_cap_v2"), epsilon prediction.
PIXEL_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "squaredcos_cap_v2",
    "prediction_type": "epsilon",
}
# Stable Diffusion 1.x schedule (scaled linear betas), as in its scheduler_config.json.
SD15_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "clip_sample": False,
}


@dataclass(frozen=True)
class Preset:
    """A named generator architecture."""

    name: str
    kind: str  # "pixel" (UNet denoises images in [-1, 1]) or "latent" (SD-style, VAE-decoded)
    image_size: int
    channels: int  # image channels written to shards
    unet: dict[str, Any]
    text: dict[str, Any]
    schedule: dict[str, Any]
    description: str
    vae: dict[str, Any] = field(default_factory=dict)


def _pixel_unet(channels: int, blocks: tuple[int, ...], attn_levels: int, size: int) -> dict[str, Any]:
    """A small pixel UNet config with cross-attention (to 384-d MiniLM tokens) at the lowest `attn_levels`."""
    n = len(blocks)
    down = tuple("CrossAttnDownBlock2D" if i >= n - attn_levels else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if i < attn_levels else "UpBlock2D" for i in range(n))
    return {
        "sample_size": size,
        "in_channels": channels,
        "out_channels": channels,
        "block_out_channels": blocks,
        "layers_per_block": 1,
        "down_block_types": down,
        "up_block_types": up,
        "cross_attention_dim": 384,
        "attention_head_dim": 8,  # diffusers' name for the number of heads in this UNet class
        "norm_num_groups": 8,
    }


_MINILM = {"type": "minilm", "length": 32}

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        Preset(
            "tiny-fmnist",
            "pixel",
            28,
            1,
            _pixel_unet(1, (16, 32, 64), 1, 28),
            _MINILM,
            PIXEL_SCHEDULE,
            "1.15 M-param pixel UNet for 28x28 grey images (Fashion-MNIST), attention at 7x7",
        ),
        Preset(
            "small-fmnist",
            "pixel",
            28,
            1,
            _pixel_unet(1, (32, 64, 64), 2, 28),
            _MINILM,
            PIXEL_SCHEDULE,
            "3 M-param pixel UNet for 28x28 grey images, attention at 14x14 and 7x7",
        ),
        Preset(
            "tiny-digits",
            "pixel",
            8,
            1,
            _pixel_unet(1, (16, 32), 1, 8),
            _MINILM,
            PIXEL_SCHEDULE,
            "pixel UNet for 8x8 grey images (scikit-learn digits); the fast test preset",
        ),
        Preset(
            "small-32",
            "pixel",
            32,
            3,
            _pixel_unet(3, (32, 64, 128), 2, 32),
            _MINILM,
            PIXEL_SCHEDULE,
            "pixel UNet for 32x32 RGB images (CIFAR-sized)",
        ),
        Preset(
            "small-64",
            "pixel",
            64,
            3,
            _pixel_unet(3, (32, 64, 128, 128), 2, 64),
            _MINILM,
            PIXEL_SCHEDULE,
            "pixel UNet for 64x64 RGB images",
        ),
        Preset(
            "sd15-arch",
            "latent",
            512,
            3,
            {"sample_size": 64, "cross_attention_dim": 768},  # every other field: diffusers' SD 1.5 defaults
            {"type": "random", "length": 77, "dim": 768},
            SD15_SCHEDULE,
            "SD 1.5 UNet + VAE architecture, random weights, random text embeddings (throughput work)",
            vae={
                "down_block_types": ("DownEncoderBlock2D",) * 4,
                "up_block_types": ("UpDecoderBlock2D",) * 4,
                "block_out_channels": (128, 256, 512, 512),
                "layers_per_block": 2,
                "latent_channels": 4,
                "sample_size": 512,
                "scaling_factor": 0.18215,
            },
        ),
    ]
}


class Generator:
    """Everything the engine needs to turn (prompt, noise) into uint8 images."""

    def __init__(
        self,
        unet: torch.nn.Module,
        text_encoder: TextEncoder,
        schedule: dict[str, Any],
        kind: str,
        image_size: int,
        channels: int,
        ident: str,
        vae: torch.nn.Module | None = None,
        classes: tuple[str, ...] | None = None,
    ) -> None:
        self.unet = unet.eval()
        self.vae = vae.eval() if vae is not None else None
        self.text_encoder = text_encoder
        self.schedule = dict(schedule)
        self.kind = kind
        self.image_size = image_size
        self.channels = channels
        self.ident = ident
        self.classes = classes
        self.device = torch.device("cpu")
        self.dtype = torch.float32

    @property
    def unet_params(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, h, w) of what the UNet denoises."""
        cfg = self.unet.config
        if self.kind == "latent":
            scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
            return (cfg.in_channels, self.image_size // scale, self.image_size // scale)
        return (cfg.in_channels, self.image_size, self.image_size)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> Generator:
        self.device, self.dtype = torch.device(device), dtype
        for module in (self.unet, self.vae):
            if module is not None:
                module.to(self.device)
                if module.dtype != dtype:  # diffusers warns on any dtype cast, even a no-op one
                    module.to(dtype)
        self.text_encoder.to(self.device, dtype)
        return self

    @torch.inference_mode()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """Denoised samples (B, C, h, w) -> uint8 images (B, H, W, C) on the same device."""
        if self.vae is not None:
            x = self.vae.decode(x / self.vae.config.scaling_factor, return_dict=False)[0]  # (B, 3, H, W)
        # Same rounding as diffusers' image processor: [-1, 1] -> [0, 1] -> round(255 x).
        x = (x / 2 + 0.5).clamp(0, 1) * 255
        return x.round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.ident,
            "kind": self.kind,
            "image_size": self.image_size,
            "channels": self.channels,
            "text_encoder": self.text_encoder.describe(),
        }


# Trained generators shipped inside the package (diffusers format, safetensors), by name.
EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "generators"


def embedded_generators() -> dict[str, Path]:
    """Name -> folder of every trained generator shipped with the package."""
    if not EMBEDDED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(EMBEDDED_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


def list_presets() -> dict[str, str]:
    """Every name `load_generator` accepts besides folders: embedded trained generators, then presets."""
    names = {}
    for name, folder in embedded_generators().items():
        about = json.loads((folder / CONFIG_NAME).read_text()).get("description", "")
        names[name] = f"trained, embedded: {about}"
    names.update({name: p.description for name, p in PRESETS.items()})
    return names


def build_preset(name: str, image_size: int | None = None) -> Generator:
    """A freshly initialised preset; weights are a pure function of (name, image_size)."""
    if name not in PRESETS:
        raise TckrError(
            f"unknown model {name!r}: not a preset ({', '.join(PRESETS)}) and not an existing folder"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel

    p = PRESETS[name]
    size = image_size or p.image_size
    unet_cfg = dict(p.unet)
    if p.kind == "pixel":
        levels = len(unet_cfg["block_out_channels"]) - 1
        if size % (2**levels):
            raise TckrError(f"image_size {size} of preset {name} must be divisible by {2**levels}")
        unet_cfg["sample_size"] = size
    else:
        if size % 8:
            raise TckrError(f"image_size {size} of preset {name} must be divisible by 8")
        unet_cfg["sample_size"] = size // 8
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(INIT_SEED)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**p.vae) if p.vae else None
    ident = f"preset:{name}" + (f"@{size}" if size != p.image_size else "")
    return Generator(unet, build_text_encoder(p.text), p.schedule, p.kind, size, p.channels, ident, vae=vae)


def file_digest(paths: list[Path]) -> str:
    """sha256 over the bytes of several files (weights identify a generator)."""
    h = hashlib.sha256()
    for path in sorted(paths):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def save_generator(gen: Generator, path: str | Path) -> Path:
    """Save a pixel-space generator in diffusers format (safetensors) plus `tckr_generator.json`."""
    if gen.kind != "pixel":
        raise TckrError(
            "only pixel-space generators are saved by tckr-engine; SD checkpoints stay as they are"
        )
    from diffusers import DDPMScheduler

    path = Path(path)
    gen.unet.save_pretrained(str(path / "unet"), safe_serialization=True)
    DDPMScheduler(**gen.schedule).save_pretrained(str(path / "scheduler"))
    cfg = {
        "format": 1,
        "kind": gen.kind,
        "image_size": gen.image_size,
        "channels": gen.channels,
        "text_encoder": gen.text_encoder.describe(),
        "classes": list(gen.classes) if gen.classes else None,
    }
    (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def _scheduler_config(folder: Path) -> dict[str, Any]:
    f = folder / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        raise TckrError(f"generator folder {folder} has no scheduler/scheduler_config.json")
    cfg = _read_json(f)
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def _read_json(f: Path) -> dict[str, Any]:
    """A generator folder's JSON file as a dict; unreadable or not an object is one TckrError."""
    try:
        cfg = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TckrError(
            f"cannot read {f} ({e}); the generator folder is damaged, save or train it again"
        ) from None
    if not isinstance(cfg, dict):
        raise TckrError(f"{f} is not a JSON object; the generator folder is damaged, save or train it again")
    return cfg


def _load_lora_generator(folder: Path, image_size: int | None = None) -> Generator:
    """A LoRA folder (`tckr_lora.json` + diffusers LoRA file): its base with the LoRA fused into the UNet.

    The adapter is fused and unloaded, so the engine (and export, compile) sees a plain UNet; the generator
    id names the base and the LoRA file's digest.
    """
    lora_file = folder / LORA_WEIGHTS
    try:
        info = json.loads((folder / LORA_CONFIG).read_text())
        base = Path(info["base"])
    except (OSError, ValueError, KeyError, TypeError):
        raise TckrError(f"{folder / LORA_CONFIG} is unreadable or has no 'base'; retrain the LoRA") from None
    if not lora_file.is_file():
        raise TckrError(f"LoRA folder {folder} has no {LORA_WEIGHTS}; the training did not finish")
    if (base / LORA_CONFIG).is_file():
        raise TckrError(f"the base of LoRA {folder} is a LoRA folder too ({base}); stacking is not supported")
    if not base.is_dir():
        raise TckrError(f"base model of LoRA {folder} not found: {base}; restore it or edit {LORA_CONFIG}")
    gen = load_generator(str(base), image_size)
    try:
        gen.unet.load_lora_adapter(
            str(folder), weight_name=LORA_WEIGHTS, prefix="unet", local_files_only=True, adapter_name="lora"
        )
    except (ImportError, ValueError, RuntimeError, OSError, KeyError) as e:
        raise TckrError(f"cannot load the LoRA {lora_file} into {base}: {str(e).splitlines()[0]}") from None
    if "lora" not in (getattr(gen.unet, "peft_config", None) or {}):
        raise TckrError(f"{lora_file} has no weights for the UNet of {base}; was it trained on another base?")
    gen.unet.fuse_lora()
    gen.unet.unload_lora()  # keeps the fused weights, removes the peft layers
    gen.ident = f"{gen.ident}+lora:{folder.name}@{file_digest([lora_file])}"
    if info.get("classes"):
        gen.classes = tuple(info["classes"])
    return gen


def load_generator(spec: str, image_size: int | None = None) -> Generator:
    """A preset name, a folder saved by `save_generator`, a local diffusers SD checkpoint, or a LoRA folder
    written by `tckr_engine.train.lora` (base + LoRA, fused)."""
    folder = Path(spec).expanduser()
    if not folder.exists() and spec in embedded_generators():
        folder = embedded_generators()[spec]
    if not folder.exists():
        if spec in PRESETS:
            return build_preset(spec, image_size)
        if "/" in spec or spec.startswith("."):
            raise TckrError(f"generator folder not found: {folder}; pass an existing folder or a preset name")
        return build_preset(spec, image_size)  # raises the unknown-preset error
    if not folder.is_dir():
        raise TckrError(f"generator path {folder} is not a folder")
    if (folder / LORA_CONFIG).is_file():
        return _load_lora_generator(folder, image_size)
    if image_size is not None and not (folder / "model_index.json").is_file():
        raise TckrError(
            "image_size can only be overridden for presets and Stable Diffusion checkpoints, "
            "not for a saved pixel-space generator (it was trained at one size)"
        )
    from diffusers import AutoencoderKL, UNet2DConditionModel

    weights = sorted((folder / "unet").glob("*.safetensors"))
    if not weights:
        raise TckrError(f"no unet/*.safetensors under {folder}; is this a diffusers-format generator folder?")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            str(folder / "unet"), local_files_only=True, use_safetensors=True
        )
    except (OSError, ValueError, RuntimeError) as e:
        raise TckrError(f"cannot load the UNet from {folder / 'unet'}: {str(e).splitlines()[0]}") from None
    schedule = _scheduler_config(folder)
    if (folder / CONFIG_NAME).is_file():
        cfg = _read_json(folder / CONFIG_NAME)
        try:
            size, channels = int(cfg["image_size"]), int(cfg["channels"])
            encoder = cfg["text_encoder"]
            classes = tuple(cfg["classes"]) if cfg.get("classes") else None
        except (KeyError, TypeError, ValueError) as e:
            raise TckrError(
                f"{folder / CONFIG_NAME} needs integer image_size and channels and a text_encoder "
                f"({type(e).__name__}: {e}); the generator folder is damaged, save or train it again"
            ) from None
        text = build_text_encoder(encoder)
        ident = f"{folder.name}@{file_digest(weights)}"
        return Generator(unet, text, schedule, "pixel", size, channels, ident, classes=classes)
    if (folder / "model_index.json").is_file():  # a diffusers Stable Diffusion checkpoint
        vae_w = sorted((folder / "vae").glob("*.safetensors"))
        if not vae_w:
            raise TckrError(f"no vae/*.safetensors under {folder}; the checkpoint is incomplete")
        vae = AutoencoderKL.from_pretrained(str(folder / "vae"), local_files_only=True, use_safetensors=True)
        text = build_text_encoder({"type": "clip"}, root=folder)
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        size = int(unet.config.sample_size) * scale
        if image_size is not None:  # diffusers' UNet handles latents that are not a multiple of 2**levels
            if image_size % scale:
                raise TckrError(
                    f"image_size must be a multiple of {scale} for {folder.name}, got {image_size}"
                )
            size = image_size
        ident = f"{folder.name}@{file_digest(weights + vae_w)}"
        return Generator(unet, text, schedule, "latent", size, 3, ident, vae=vae)
    raise TckrError(f"{folder} has neither {CONFIG_NAME} nor model_index.json; not a generator folder")


__all__ = [
    "PRESETS",
    "Generator",
    "RandomTextEncoder",
    "build_preset",
    "list_presets",
    "load_generator",
    "save_generator",
]
