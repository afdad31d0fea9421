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


@pytest.mark.parametrize(
    "damage, needle",
    [
        (lambda c: (c / "state.json").write_text("{broken"), "cannot read"),
        (lambda c: (c / "state.json").write_text("[1, 2]"), "does not hold a JSON object"),
        (lambda c: (c / "state.json").write_text(json.dumps({"step": "5", "config": json.loads(
            (c / "state.json").read_text())["config"]})), "holds no valid step"),
        (lambda c: (c / "unet.safetensors").write_bytes(b"\x00trunc"), "cannot resume from"),
        (lambda c: (c / "optimizer.pt").write_bytes(b"PK\x03\x04"), "cannot resume from"),
        (lambda c: (c / "ema.safetensors").unlink(), "cannot resume from"),
    ],
)  # fmt: skip
def test_a_damaged_checkpoint_is_one_error_and_overwrite_starts_over(tmp_path, damage, needle):
    out = tmp_path / "run"
    cfg = ScratchConfig(**CFG, steps=6)
    assert train_scratch(cfg, out, stop_at=4) is None
    damage(out / "checkpoint")
    with pytest.raises(TckrError, match=needle) as e:
        train_scratch(cfg, out)
    assert str(out / "checkpoint") in str(e.value) and "--overwrite" in str(e.value)
    assert "\n" not in str(e.value)
    assert train_scratch(cfg, out, overwrite=True) == out  # the damaged checkpoint goes; 6 steps from 0
    log = [json.loads(x)["step"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 6 and log[-1] == 6


def test_checkpoints_are_replaced_as_a_unit(tmp_path, monkeypatch):
    """Killed while writing a checkpoint, the folder keeps the previous one whole; killed between the
    swap's two renames, the previous one is found under checkpoint.old and resumed from."""
    import tckr_engine.train.generator as scratch

    out = tmp_path / "run"
    cfg = ScratchConfig(**{**CFG, "checkpoint_every": 2}, steps=6)
    assert train_scratch(cfg, out, stop_at=2) is None
    before = weights(out)
    real = scratch.save_checkpoint

    def killed_mid_write(folder, step, identity, write):
        def partial(tmp):
            write(tmp)
            raise KeyboardInterrupt  # after the weights, before state.json

        real(folder, step, identity, partial)

    monkeypatch.setattr(scratch, "save_checkpoint", killed_mid_write)
    with pytest.raises(KeyboardInterrupt):
        train_scratch(cfg, out, stop_at=4)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 2
    assert all((before[k] == v).all() for k, v in weights(out).items())
    assert not (out / "checkpoint.tmp").exists()
    monkeypatch.undo()

    (out / "checkpoint").rename(out / "checkpoint.old")  # stopped between the two renames
    assert train_scratch(cfg, out, stop_at=4) is None  # resumes from step 2
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint"]
