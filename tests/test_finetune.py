"""From-scratch generator training: loss goes down, resume continues exactly, output loads in generate."""

import json

import pytest
from conftest import tiny_config

from tckr_engine.engine.generate import generate, verify
from tckr_engine.errors import TckrError
from tckr_engine.models.generator import load_generator
from tckr_engine.train.generator import ScratchConfig, train_scratch

CFG = dict(
    preset="tiny-digits",
    dataset="digits",
    batch_size=16,
    checkpoint_every=4,
    sample_every=10,
    lr=3e-3,
    warmup_steps=2,
)


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "checkpoint" / "ema.safetensors"))


def test_train_resume_and_generate(tmp_path):
    whole = tmp_path / "whole"
    train_scratch(ScratchConfig(**CFG, steps=10), whole)
    log = [json.loads(x) for x in (whole / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 10
    assert (whole / "samples" / "step_000010.png").is_file()
    assert json.loads((whole / "checkpoint" / "state.json").read_text())["step"] == 10

    split = tmp_path / "split"
    assert train_scratch(ScratchConfig(**CFG, steps=10), split, stop_at=5) is None  # checkpoint at step 5
    assert not (split / "unet").exists()  # no final generator until the run is complete
    train_scratch(ScratchConfig(**CFG, steps=10), split)  # resumes from step 5
    a, b = weights(whole), weights(split)
    assert all((a[k] - b[k]).abs().max() < 1e-5 for k in a), "resumed training must match uninterrupted"

    gen = load_generator(str(whole))
    assert gen.classes == tuple(str(d) for d in range(10)) and gen.image_size == 8
    out = tmp_path / "shards"
    generate(tiny_config(model=str(whole), num_images=10), out)
    assert verify(out) == []


def test_bad_training_inputs(tmp_path):
    with pytest.raises(TckrError, match="steps must be a positive integer"):
        train_scratch(ScratchConfig(**CFG, steps=0), tmp_path / "a")
    with pytest.raises(TckrError, match="makes 28px"):
        train_scratch(ScratchConfig(**{**CFG, "preset": "tiny-fmnist"}, steps=1), tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.txt").write_text("x")
    with pytest.raises(TckrError, match="not empty"):
        train_scratch(ScratchConfig(**CFG, steps=1), tmp_path / "c")


def test_finetune_cli_lora_and_bad_modes(cli, tiny_sd, tmp_path):
    out = tmp_path / "lora"
    args = ["finetune", "--mode", "lora", "--dataset", "digits", "--steps", "2", "--grad-accum", "1"]
    result = cli(*args, "--out", out, "--base", tiny_sd)
    assert result.code == 0, result.err
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "tckr_lora.json").is_file()
    missing_base = cli(*args, "--out", tmp_path / "x")
    assert missing_base.code == 2 and "needs a base model" in missing_base.err
    assert not (tmp_path / "x").exists()
    bad_mode = cli("finetune", "--mode", "dreambooth", "--out", tmp_path / "y")
    assert bad_mode.code == 2 and "mode must be scratch or lora" in bad_mode.err
