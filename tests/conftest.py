"""Shared fixtures: tiny generated shard folders, a tiny Stable Diffusion checkpoint, a CLI runner."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

if not torch.cuda.is_available():
    # The Triton kernel tests run under the interpreter; it must be on before anything imports triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tckr_engine.config import GenerateConfig

# The fast test configuration: 8x8 digits, 100 images in 3 shards (40, 40, 20), a padded last batch.
TINY = dict(
    model="tiny-digits",
    dataset="digits",
    num_images=100,
    shard_size=40,
    batch_size=16,
    steps=4,
    threads=1,
)


def tiny_config(**changes) -> GenerateConfig:
    return GenerateConfig(**{**TINY, **changes})


def tiny_unet():
    """A tiny text-conditioned UNet: 4 transformer blocks (down 1, mid 1, up 2), self + cross attention."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),  # attention at 8x8 and in the mid block
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=2,  # diffusers' name for the number of heads: head dims 8 (64 tokens), 16 (mid)
        norm_num_groups=8,
    ).eval()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A finished shard folder of the TINY config (do not modify: copy it first)."""
    from tckr_engine.engine.generate import generate

    out = tmp_path_factory.mktemp("tiny") / "out"
    generate(tiny_config(), out)
    return out


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet (256 printable characters)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny random Stable Diffusion checkpoint (UNet, VAE, CLIP text encoder, tokenizer) saved locally."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        text = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(vocab),
                hidden_size=32,
                intermediate_size=37,
                num_attention_heads=4,
                num_hidden_layers=2,
                max_position_embeddings=16,
                bos_token_id=vocab["<|startoftext|>"],
                eos_token_id=vocab["<|endoftext|>"],
                pad_token_id=vocab["<|endoftext|>"],
            )
        )
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            block_out_channels=(16, 32),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(8, 16),
            down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=16,
        )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    path = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipe.save_pretrained(str(path))
    return path


class CliResult:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run `tckr-engine ARGS` in-process through the real entry point (error handling included)."""
    from tckr_engine.cli import main

    def run(*args: str) -> CliResult:
        monkeypatch.setattr(sys, "argv", ["tckr-engine", *map(str, args)])
        capsys.readouterr()
        try:
            main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run
