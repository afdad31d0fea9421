"""The attributes captioner and captions files: deterministic, varied within a class, label-aligned."""

import json

import numpy as np
import pytest

from tckr_engine.data import load_dataset
from tckr_engine.data.captioners import attribute_captions, caption_dataset, write_captions
from tckr_engine.data.captions import read_captions, read_captions_per_image
from tckr_engine.errors import TckrError


def test_captions_are_deterministic_and_vary_within_each_class():
    ds = load_dataset("digits")
    a = caption_dataset(ds, "attributes")
    b = caption_dataset(ds, "attributes")
    assert a == b and len(a) == len(ds)
    for c in range(10):
        within = {a[i] for i in np.flatnonzero(ds.labels == c)}
        assert len(within) >= 10, f"class {c} has only {len(within)} distinct captions"


def test_words_follow_the_pixels():
    images = np.zeros((6, 16, 16, 1), dtype=np.uint8)
    images[0, 6:10, 6:10] = 255  # small bright centred square
    images[1, 2:14, 2:14] = 255  # large
    images[2, 1:15, 6:10] = 255  # tall
    images[3, 6:10, 1:15] = 255  # wide
    images[4, 1:5, 1:5] = 100  # dim, upper left
    images[5, 11:15, 11:15] = 180  # lower right
    caps = attribute_captions(images, np.zeros(6, dtype=np.int64))
    assert caps[0].endswith("centered") and "large" in caps[1]
    assert "tall" in caps[2] and "wide" in caps[3]
    assert caps[4].startswith("dark") and caps[4].endswith("in the upper left part")
    assert caps[5].endswith("in the lower right part")


def test_written_file_round_trips_with_class_alignment(tmp_path):
    ds = load_dataset("digits").subset(np.arange(50))
    caps = caption_dataset(ds, "attributes")
    path = write_captions(tmp_path / "captions.jsonl", ds, caps)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(50))
    assert all(r["prompt"] == f"{r['class_name']}: {r['caption']}" for r in rows)
    assert all(ds.classes[r["class_index"]] == r["class_name"] for r in rows)
    per_image = read_captions_per_image(path, ds.classes, ds.labels)
    assert per_image == [r["prompt"] for r in rows]
    per_class = read_captions(path, ds.classes)
    assert sum(len(p) for p in per_class) == 50
    with pytest.raises(TckrError, match="image 0 is a"):
        read_captions_per_image(path, ds.classes, np.roll(ds.labels, 1))


def test_unknown_captioner():
    with pytest.raises(TckrError, match="unknown captioner"):
        caption_dataset(load_dataset("digits"), "blip-9000")
    with pytest.raises(TckrError, match="needs --caption-model"):
        caption_dataset(load_dataset("digits"), "hf")
