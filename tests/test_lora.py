"""LoRA fine-tuning (peft, UNet only) of the tiny SD checkpoint and of a saved pixel generator; loading the
result through `load_generator` (fused), through diffusers' own `load_lora_weights`, and in `generate`."""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from tckr_engine.config import GenerateConfig
from tckr_engine.errors import TckrError
from tckr_engine.models.generator import LORA_CONFIG, LORA_WEIGHTS, load_generator
from tckr_engine.train.lora import LoraTrainConfig, train_lora

# lr 1e-2 instead of TCKR's 1e-4 so that a handful of steps visibly moves the tiny model.
FAST = dict(dataset="digits", steps=4, batch_size=2, grad_accum=2, lr=1e-2, checkpoint_every=2, threads=1)


def _lora_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / LORA_WEIGHTS))


def _unet_out(unet: torch.nn.Module, seed: int = 0) -> torch.Tensor:
    cfg = unet.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)  # (2, C, h, w)
    context = torch.randn(2, 5, cfg.cross_attention_dim, generator=g)  # (2, L, D)
    with torch.no_grad():
        return unet(x, torch.tensor([10, 700]), encoder_hidden_states=context, return_dict=False)[0]


@pytest.fixture(scope="module")
def sd_lora(tiny_sd: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("lora") / "sd-lora"
    train_lora(LoraTrainConfig(base=str(tiny_sd), **FAST), out)
    return out


def test_lora_folder_contents(sd_lora: Path, tiny_sd: Path) -> None:
    info = json.loads((sd_lora / LORA_CONFIG).read_text())
    assert info["base"] == str(tiny_sd.resolve()) and Path(info["base"]).is_absolute()
    assert (info["rank"], info["alpha"], info["targets"]) == (4, 4.0, ["to_q", "to_k", "to_v", "to_out.0"])
    tensors = _lora_tensors(sd_lora)
    assert tensors and all(k.startswith("unet.") and ".lora." in k for k in tensors)  # diffusers format
    downs = [v for k, v in tensors.items() if k.endswith("lora.down.weight")]
    assert downs and all(v.shape[0] == 4 for v in downs)  # rank 4
    state = json.loads((sd_lora / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4


def test_lora_changes_the_unet_and_the_id(sd_lora: Path, tiny_sd: Path) -> None:
    base, tuned = load_generator(str(tiny_sd)), load_generator(str(sd_lora))
    assert (_unet_out(base.unet) - _unet_out(tuned.unet)).abs().max() > 1e-3
    assert not any("lora" in n for n, _ in tuned.unet.named_modules())  # fused and unloaded: a plain UNet
    assert tuned.ident.startswith(base.ident + "+lora:sd-lora@") and tuned.ident != base.ident
    assert tuned.classes == tuple(str(i) for i in range(10))


def test_diffusers_loads_the_file_and_fused_equals_unfused(sd_lora: Path, tiny_sd: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), local_files_only=True)
    before = _unet_out(pipe.unet)
    pipe.load_lora_weights(str(sd_lora))  # finds pytorch_lora_weights.safetensors by its default name
    unfused = _unet_out(pipe.unet)
    assert (unfused - before).abs().max() > 1e-3
    pipe.fuse_lora()
    fused = _unet_out(pipe.unet)
    torch.testing.assert_close(fused, unfused, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(_unet_out(load_generator(str(sd_lora)).unet), unfused, atol=1e-5, rtol=1e-4)


def test_resume_continues_the_step_count(tiny_sd: Path, sd_lora: Path, tmp_path: Path) -> None:
    out = tmp_path / "resumed"
    cfg = LoraTrainConfig(base=str(tiny_sd), **FAST)
    train_lora(dataclasses.replace(cfg, steps=2), out)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    calls: list[float] = []
    train_lora(cfg, out, progress=lambda n, loss: calls.append(loss))
    assert len(calls) == 2  # steps 3 and 4 only
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    a, b = _lora_tensors(out), _lora_tensors(sd_lora)
    assert a.keys() == b.keys()
    for k in a:  # 2 + 2 resumed steps == 4 straight steps (weights, optimizer and RNG state restored)
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    with pytest.raises(TckrError, match="another LoRA training config"):
        train_lora(dataclasses.replace(cfg, rank=2), out)


def _images(shards: Path) -> list[bytes]:
    images = []
    for tar in sorted((shards / "shards").glob("*.tar")):
        with tarfile.open(tar) as t:
            images += [t.extractfile(m).read() for m in t.getmembers() if m.name.endswith(".png")]
    return images


def test_generate_with_the_lora(sd_lora: Path, tiny_sd: Path, tmp_path: Path) -> None:
    from PIL import Image

    from tckr_engine.engine.generate import generate

    cfg = GenerateConfig(
        model=str(sd_lora), dataset="digits", num_images=8, shard_size=8, batch_size=8, steps=2, threads=1
    )
    generate(cfg, tmp_path / "lora")
    generate(dataclasses.replace(cfg, model=str(tiny_sd)), tmp_path / "base")
    tuned, base = _images(tmp_path / "lora"), _images(tmp_path / "base")
    assert len(tuned) == len(base) == 8
    px = [np.asarray(Image.open(io.BytesIO(b))).astype(int) for b in (tuned[0], base[0])]
    assert px[0].shape == (16, 16, 3) and np.abs(px[0] - px[1]).max() > 0
    run = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert "+lora:sd-lora@" in run["spec"]["generator"]["id"]


def test_sd_checkpoint_and_lora_generate_at_another_size(sd_lora: Path, tiny_sd: Path) -> None:
    """TCKR generated at 224 px with SD2 (768 native): the size of latent generators can be overridden."""
    assert load_generator(str(tiny_sd)).image_size == 16
    assert load_generator(str(tiny_sd), 24).latent_shape == (4, 12, 12)
    assert load_generator(str(sd_lora), 24).image_size == 24
    with pytest.raises(TckrError, match="multiple of 2"):
        load_generator(str(tiny_sd), 25)


def test_lora_on_a_saved_pixel_generator(tmp_path: Path) -> None:
    from tckr_engine.models.generator import build_preset, save_generator

    gen = build_preset("tiny-digits")
    gen.classes = tuple(str(i) for i in range(10))
    base = save_generator(gen, tmp_path / "pixel")
    out = train_lora(LoraTrainConfig(base=str(base), **{**FAST, "steps": 2}), tmp_path / "pixel-lora")
    tuned = load_generator(str(out))
    assert tuned.kind == "pixel" and tuned.image_size == 8
    assert (_unet_out(load_generator(str(base)).unet) - _unet_out(tuned.unet)).abs().max() > 1e-3


def test_bad_inputs_are_one_line_errors(sd_lora: Path, tiny_sd: Path, tmp_path: Path) -> None:
    with pytest.raises(TckrError, match="itself a LoRA folder"):
        train_lora(LoraTrainConfig(base=str(sd_lora), **FAST), tmp_path / "x")
    with pytest.raises(TckrError, match="base model folder not found"):
        train_lora(LoraTrainConfig(base=str(tmp_path / "missing"), **FAST), tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "file").write_text("x")
    with pytest.raises(TckrError, match="not empty"):
        train_lora(LoraTrainConfig(base=str(tiny_sd), **FAST), tmp_path / "full")
    with pytest.raises(TckrError, match="rank must be a positive integer"):
        LoraTrainConfig(base=str(tiny_sd), rank=0).validate()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / LORA_CONFIG).write_text(json.dumps({"base": str(tmp_path / "gone")}))
    with pytest.raises(TckrError, match="no pytorch_lora_weights"):
        load_generator(str(broken))
