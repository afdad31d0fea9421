"""Generator quality metrics: teacher agreement, Fréchet distance on teacher features, shard image reader."""

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from tckr_engine.config import GenerateConfig
from tckr_engine.data import load_dataset
from tckr_engine.engine.generate import generate
from tckr_engine.errors import TckrError
from tckr_engine.eval.quality import (
    frechet_distance,
    frechet_distance_from_features,
    read_shard_images,
    teacher_agreement,
)
from tckr_engine.models.classifier import Classifier
from tckr_engine.train.teacher import predict

DIGITS = tuple("0123456789")


@pytest.fixture(scope="module")
def teacher():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Classifier("small-cnn", 10, 1, 8, DIGITS, width=8).eval()


@pytest.fixture(scope="module")
def digits_test():
    return load_dataset("digits", "test")


def test_agreement_is_one_on_own_predictions_and_zero_on_wrong_labels(teacher, digits_test):
    images = digits_test.images  # (359, 8, 8, 1)
    pred = predict(teacher, images)  # (359,)
    assert teacher_agreement(teacher, images, pred, batch_size=50) == 1.0
    assert teacher_agreement(teacher, torch.from_numpy(images.copy()), (pred + 1) % 10) == 0.0
    half = pred.copy()
    half[::2] = (half[::2] + 1) % 10
    assert teacher_agreement(teacher, images, half) == pytest.approx(179 / 359)
    assert teacher.training is False


def test_agreement_rejects_mismatched_inputs(teacher, digits_test):
    with pytest.raises(TckrError, match="one label per image"):
        teacher_agreement(teacher, digits_test.images, np.zeros(3, np.int64))
    with pytest.raises(TckrError, match="3 channel"):
        teacher_agreement(teacher, np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int64))
    with pytest.raises(TckrError, match="uint8 images"):
        teacher_agreement(teacher, np.zeros((2, 8, 8, 1), np.float32), np.zeros(2, np.int64))


def test_frechet_formula_matches_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))  # (200, 6) correlated features
    b = rng.normal(0.5, 2.0, size=(150, 6))  # (150, 6)
    cov1, cov2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov1 @ cov2).real  # the classic FID computation
    expected = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(cov1 + cov2 - 2 * covmean)
    assert frechet_distance_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance_from_features(a, a) == pytest.approx(0.0, abs=1e-9)
    wide = rng.normal(size=(5, 20))  # N < F: singular covariance, still real and finite
    assert np.isfinite(frechet_distance_from_features(wide, wide[::-1] + 1.0))
    with pytest.raises(TckrError, match="two"):
        frechet_distance_from_features(a[:1], b)


def test_frechet_is_zero_for_identical_sets_and_grows_with_the_shift(teacher, digits_test):
    real = digits_test.images  # (359, 8, 8, 1)
    same = frechet_distance(teacher, real, real.copy(), batch_size=100)
    shuffled = frechet_distance(teacher, real, real[::-1].copy())  # same set, other order
    darker = (real // 2).astype(np.uint8)  # a small distribution shift
    moved = np.roll(real, 3, axis=2)  # a large one: content shifted by 3 of 8 px
    scale = frechet_distance(teacher, real[:180], real[180:])  # two halves of one distribution
    assert same < 1e-6 * scale and shuffled < 1e-6 * scale
    d_dark, d_moved = frechet_distance(teacher, real, darker), frechet_distance(teacher, real, moved)
    assert scale < d_dark and scale < d_moved


def _read_tars_directly(out):
    """Independent reader (tarfile + PIL) in index order, to cross-check the webdataset path."""
    index = json.loads((out / "index.json").read_text())
    images, labels = [], []
    for entry in index["shardlist"]:
        with tarfile.open(out / entry["url"]) as tar:
            for member in tar.getmembers():
                data = tar.extractfile(member).read()
                if member.name.endswith(".png"):
                    images.append(np.asarray(Image.open(io.BytesIO(data)))[..., None])  # (H, W, 1)
                elif member.name.endswith(".cls"):
                    labels.append(int(data))
    return np.stack(images), np.array(labels)


def test_read_shard_images_from_a_generated_folder(tmp_path):
    out = tmp_path / "gen"
    cfg = GenerateConfig(
        model="tiny-digits", dataset="digits", num_images=20, steps=2, threads=1, shard_size=8, batch_size=8
    )
    generate(cfg, out)
    images, labels = read_shard_images(out)
    assert images.shape == (20, 8, 8, 1) and images.dtype == np.uint8 and labels.dtype == np.int64
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10  # class-balanced
    ref_images, ref_labels = _read_tars_directly(out)
    assert np.array_equal(images, ref_images) and np.array_equal(labels, ref_labels)


def test_read_shard_images_errors_are_one_line(tmp_path, tiny_run):
    with pytest.raises(TckrError, match=r"has no valid run\.json"):
        read_shard_images(tmp_path)
    out = tmp_path / "copy"
    shutil.copytree(tiny_run, out)
    (out / "index.json").write_text("{broken")
    with pytest.raises(TckrError, match=r"has no valid index\.json"):
        read_shard_images(out)
    shutil.copy(tiny_run / "index.json", out / "index.json")
    tar = out / "shards" / "000001.tar"
    tar.write_bytes(tar.read_bytes()[: 512 * 4])  # cut on a tar block boundary: readable, samples missing
    with pytest.raises(TckrError, match=r"shard .*000001.tar is not usable"):
        read_shard_images(out)


def test_quality_refuses_a_truncated_shard(cli, teacher, tiny_run, tmp_path):
    from tckr_engine.models.classifier import save_classifier

    save_classifier(teacher, tmp_path / "teacher")
    out = tmp_path / "cut"
    shutil.copytree(tiny_run, out)
    tar = out / "shards" / "000000.tar"
    tar.write_bytes(tar.read_bytes()[: 512 * 4])
    result = cli("quality", out, "--teacher", tmp_path / "teacher")
    assert result.code == 2 and "000000.tar is not usable" in result.err and "Traceback" not in result.err
    assert not (out / "quality.json").exists()


def test_quality_command_writes_agreement_and_distance(cli, teacher, tiny_run, tmp_path):
    from tckr_engine.models.classifier import save_classifier

    save_classifier(teacher, tmp_path / "teacher")
    result = cli("quality", tiny_run, "--teacher", tmp_path / "teacher")
    assert result.code == 0, result.err
    report = json.loads((tiny_run / "quality.json").read_text())
    (tiny_run / "quality.json").unlink()  # the session fixture stays as generate left it
    images, labels = read_shard_images(tiny_run)
    assert report["images"] == 100 and report["generator"] == "preset:tiny-digits"
    assert report["teacher_agreement"] == pytest.approx(teacher_agreement(teacher, images, labels))
    assert report["frechet_distance"] > 0 and 0 <= report["real_test_agreement"] <= 1
    other = Classifier("small-cnn", 3, 1, 8, ("a", "b", "c"), width=4)
    save_classifier(other, tmp_path / "other")
    bad = cli("quality", tiny_run, "--teacher", tmp_path / "other")
    assert bad.code == 2 and "classes differ" in bad.err
