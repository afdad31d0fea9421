"""generate -> shard folder contract read back by webdataset; resume; verify; teacher logits."""

import io
import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
import webdataset as wds
from conftest import TINY, tiny_config
from PIL import Image

from tckr_engine.data import class_names
from tckr_engine.engine.generate import generate, verify
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier, load_classifier, save_classifier


def read_back(out):
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / e["url"]) for e in index["shardlist"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode("pill"))


def tar_bytes(out):
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def test_webdataset_reads_back_what_generate_wrote(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    index = json.loads((tiny_run / "index.json").read_text())
    samples = read_back(tiny_run)
    classes = list(class_names("digits"))

    assert run["spec"]["classes"] == classes and run["num_shards"] == 3
    assert [e["nsamples"] for e in index["shardlist"]] == [40, 40, 20]
    assert [e["url"] for e in index["shardlist"]] == [f"shards/{k:06d}.tar" for k in range(3)]
    assert len(samples) == 100
    keys = [s["__key__"] for s in samples]
    assert (
        keys[:2] == ["00000000000", "00000000001"] and keys[40] == "00000100000" and "." not in "".join(keys)
    )
    assert Counter(s["cls"] for s in samples) == {c: 10 for c in range(10)}
    for s in samples:
        assert isinstance(s["png"], Image.Image) and s["png"].size == (8, 8) and s["png"].mode == "L"
        assert s["txt"] == classes[s["cls"]]  # the default template is "{name}"
        meta = s["json"]
        assert meta["class_name"] == classes[s["cls"]] and meta["steps"] == TINY["steps"]
        assert meta["sampler"] == "dpm++" and meta["generator"] == "preset:tiny-digits"
        assert meta["source"] == "diffusion" and isinstance(meta["seed"], int)
        assert "logits.npy" not in s
    for k in range(3):
        stats = json.loads((tiny_run / "shards" / f"{k:06d}_stats.json").read_text())
        assert stats["count"] == index["shardlist"][k]["nsamples"] and stats["failures"] == 0
    assert verify(tiny_run) == []
    assert not list(tiny_run.rglob("*.tmp"))


def test_same_spec_is_byte_identical_and_resume_is_a_no_op(tiny_run, tmp_path):
    out = tmp_path / "again"
    generate(tiny_config(), out)
    assert tar_bytes(out) == tar_bytes(tiny_run)
    summary = generate(tiny_config(), out)
    assert summary.generated == 0 and summary.images == 100


def test_resume_regenerates_exactly_the_broken_shards(tiny_run, tmp_path):
    out = tmp_path / "broken"
    shutil.copytree(tiny_run, out)
    (out / "shards" / "000001_stats.json").unlink()  # never committed
    tar2 = out / "shards" / "000002.tar"
    tar2.write_bytes(tar2.read_bytes()[:-5000])  # truncated after commit
    (out / "shards" / ".000000.tar.tmp").write_bytes(b"leftover")
    problems = dict(verify(out))
    assert set(problems) == {"shards/000001.tar", "shards/000002.tar", "index.json"}
    summary = generate(tiny_config(), out)
    assert summary.shards_generated == 2 and summary.generated == 60
    assert tar_bytes(out) == tar_bytes(tiny_run) and verify(out) == []
    assert not list(out.rglob("*.tmp"))


def test_verify_catches_a_flipped_byte(tiny_run, tmp_path):
    out = tmp_path / "flip"
    shutil.copytree(tiny_run, out)
    tar = out / "shards" / "000000.tar"
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    assert verify(out) == [("shards/000000.tar", "sha256 disagrees with stats (corrupt or modified)")]


def test_other_spec_in_existing_folder_is_refused_unless_overwrite(tiny_run, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(tiny_run, out)
    before = tar_bytes(out)
    with pytest.raises(TckrError, match=r"different run \(changed: seed\)"):
        generate(tiny_config(seed=1), out)
    assert tar_bytes(out) == before
    generate(tiny_config(seed=1), out, overwrite=True)
    assert tar_bytes(out) != before and verify(out) == []
    assert json.loads((out / "run.json").read_text())["spec"]["seed"] == 1


@pytest.mark.parametrize("fmt", ["jpg", "webp"])
def test_lossy_formats(tmp_path, fmt):
    out = tmp_path / fmt
    generate(tiny_config(num_images=20, image_format=fmt, quality=90), out)
    samples = read_back(out)
    assert len(samples) == 20 and all(isinstance(s[fmt], Image.Image) for s in samples)
    assert verify(out) == []


def write_captions_file(tmp_path, per_class=2):
    classes = class_names("digits")
    lines = [
        {
            "index": i,
            "class_index": c,
            "class_name": classes[c],
            "caption": f"cap{i}",
            "prompt": f"{classes[c]}: cap{i}",
        }
        for i, c in enumerate([c for _ in range(per_class) for c in range(10)])
    ]
    captions = tmp_path / "captions.jsonl"
    captions.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return captions


def test_captions_drive_prompts(tmp_path):
    classes = class_names("digits")
    captions = write_captions_file(tmp_path)
    out = tmp_path / "cap"
    generate(tiny_config(num_images=40, captions=str(captions)), out)
    samples = read_back(out)
    for s in samples:
        assert s["txt"] == f"{classes[s['cls']]}: {s['json']['caption']}"
    # each class has two captions and four images: each caption is used twice
    assert set(Counter(s["txt"] for s in samples).values()) == {2}


def test_teacher_logits_are_stored_as_float16(tmp_path):
    torch.manual_seed(0)
    teacher = Classifier("small-cnn", 10, 1, 8, class_names("digits"), width=8).eval()
    save_classifier(teacher, tmp_path / "teacher")
    out = tmp_path / "with-teacher"
    generate(tiny_config(num_images=32, teacher=str(tmp_path / "teacher")), out)
    loaded = load_classifier(tmp_path / "teacher")
    samples = list(wds.WebDataset(str(out / "shards" / "000000.tar"), shardshuffle=False).decode())
    assert len(samples) == 32
    images = torch.stack([torch.from_numpy(np.array(Image.open(io.BytesIO(s["png"])))) for s in samples])
    with torch.no_grad():
        expected = loaded(images[..., None]).numpy()  # (B, 10) from the decoded PNGs
    stored = np.stack([s["logits.npy"] for s in samples])
    assert stored.dtype == np.float16 and stored.shape == (32, 10)
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert verify(out) == []


def test_resuming_one_shard_with_many_prompts_is_byte_identical(tmp_path):
    """Prompt embeddings must not depend on which shards ran earlier in the same process."""
    cfg = tiny_config(captions=str(write_captions_file(tmp_path, per_class=9)), steps=2)
    whole = tmp_path / "whole"
    generate(cfg, whole)
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for name in ("000002.tar", "000002_stats.json"):
        (resumed / "shards" / name).unlink()
    assert generate(cfg, resumed).shards_generated == 1
    assert tar_bytes(resumed) == tar_bytes(whole)
