"""Classifier presets and features; teacher training on digits, selection on validation only, bad configs."""

import json

import numpy as np
import pytest
import torch

import tckr_engine.train.teacher as teacher_mod
from tckr_engine.data import ImageDataset, load_dataset
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier, count_parameters, load_classifier, save_classifier
from tckr_engine.train.teacher import TeacherConfig, evaluate_accuracy, random_shift_flip, train_teacher

# Tiny but real: resnet-small at width 8 learns 8x8 digits to ~80 % in two epochs of 40 steps (~5 s).
FAST = dict(dataset="digits", width=8, batch_size=32, epochs=2, lr=1e-2, threads=1)
CLASSES = tuple("abcde")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    return out, train_teacher(TeacherConfig(**FAST), out)


def test_resnet_small_preset_size_and_channels():
    gray = Classifier("resnet-small", 10, 1, 28, tuple("0123456789"))
    assert 0.6e6 < count_parameters(gray) < 0.8e6  # the ~0.7 M CIFAR-style ResNet-14
    rgb = Classifier("resnet-small", 5, 3, 32, CLASSES, width=8).eval()
    x = torch.randint(0, 256, (3, 32, 32, 3), dtype=torch.uint8)
    assert rgb(x).shape == (3, 5) and rgb.features(x).shape == (3, 32)


@pytest.mark.parametrize("arch", ["resnet-small", "small-cnn"])
def test_features_are_the_input_of_the_last_layer(arch):
    model = Classifier(arch, 5, 1, 16, CLASSES, width=4).eval()
    x = torch.randint(0, 256, (4, 16, 16, 1), dtype=torch.uint8)
    last = model.net.fc if arch == "resnet-small" else model.net[-1]
    with torch.no_grad():
        feats = model.features(x)  # (4, 16)
        torch.testing.assert_close(last(feats), model(x))
    assert feats.shape == (4, 16)


def test_save_load_roundtrip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = Classifier("resnet-small", 5, 1, 12, CLASSES, width=4)
    model.train()(torch.randint(0, 256, (8, 12, 12, 1), dtype=torch.uint8))  # move BN running stats
    model.eval()
    loaded = load_classifier(save_classifier(model, tmp_path / "c"))
    assert loaded.config == model.config
    x = torch.randint(0, 256, (6, 12, 12, 1), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x)) and torch.equal(loaded.features(x), model.features(x))


def test_unknown_arch_and_missing_timm_are_one_line_errors():
    with pytest.raises(TckrError, match="unknown classifier architecture 'resnet-huge'") as e:
        Classifier("resnet-huge", 5, 1, 8, CLASSES)
    assert "\n" not in str(e.value) and "timm:<model name>" in str(e.value)
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(TckrError, match=r"pip install 'tckr-engine\[timm\]'"):
            Classifier("timm:resnet18", 5, 3, 32, CLASSES)
    else:
        model = Classifier("timm:resnet18", 5, 3, 32, CLASSES)  # random init, nothing downloaded
        assert model.features(torch.zeros(2, 32, 32, 3, dtype=torch.uint8)).shape == (2, 512)


def test_random_shift_flip_moves_pixels_within_the_shift():
    images = torch.zeros(64, 9, 9, 1, dtype=torch.uint8)
    images[:, 4, 2] = 255  # one lit pixel, left of centre
    g = torch.Generator().manual_seed(0)
    assert torch.equal(random_shift_flip(images, 0, False, g), images)
    flipped = random_shift_flip(images, 0, True, g)
    cols = flipped[..., 0].amax(1).argmax(1)  # (64,) column of the lit pixel
    assert set(cols.tolist()) == {2, 6}  # itself or its mirror, both seen
    shifted = random_shift_flip(images, 2, False, g)  # (64, 9, 9, 1)
    rows, cols = shifted[..., 0].amax(2).argmax(1), shifted[..., 0].amax(1).argmax(1)
    assert shifted.shape == images.shape and shifted.dtype == torch.uint8
    assert (shifted.flatten(1).sum(1) == 255).all()  # the pixel stays inside, nothing else appears
    assert set(rows.tolist()) == {2, 3, 4, 5, 6} and set(cols.tolist()) <= {0, 1, 2, 3, 4}


def test_digits_teacher_learns_and_writes_its_folder(digits_run):
    out, metrics = digits_run
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert metrics["test_accuracy"] > 0.5 and metrics["best_val_accuracy"] > 0.5
    assert len(metrics["val_accuracy"]) == 2 and metrics["num_test"] == 359
    assert metrics["num_train"] + metrics["num_val"] == 1438 and metrics["num_val"] == 145
    assert metrics["best_epoch"] == 1 + int(np.argmax(metrics["val_accuracy"]))
    assert metrics["config"]["arch"] == "resnet-small" and metrics["seconds"] > 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2]
    assert [r["val_accuracy"] for r in log] == [round(a, 5) for a in metrics["val_accuracy"]]
    # The saved folder is the selected checkpoint: it reproduces the reported test accuracy exactly.
    model = load_classifier(out)
    test = load_dataset("digits", "test")
    assert evaluate_accuracy(model, test, batch_size=64) == metrics["test_accuracy"]


def test_selection_never_reads_test(digits_run, tmp_path, monkeypatch):
    """Same run with scrambled test labels: identical val curve, selection and weights; test is read last."""
    ref_out, ref = digits_run
    events = []
    real_load, real_save = teacher_mod.load_dataset, teacher_mod.save_classifier

    def load(spec, split="train"):
        events.append(f"load {split}")
        data = real_load(spec, split)
        if split == "test":  # scrambled labels: any use of them for selection would change the outcome
            labels = np.random.default_rng(0).permutation(data.labels)
            data = ImageDataset(data.name, data.images, (labels + 1) % 10, data.classes)
        return data

    def save(model, path):
        events.append("save")
        return real_save(model, path)

    monkeypatch.setattr(teacher_mod, "load_dataset", load)
    monkeypatch.setattr(teacher_mod, "save_classifier", save)
    metrics = train_teacher(TeacherConfig(**FAST), tmp_path / "run")

    assert events[0] == "load train" and events[-1] == "load test" and events.count("load test") == 1
    assert "save" in events and events.index("load test") > max(
        i for i, e in enumerate(events) if e == "save"
    )
    assert metrics["val_accuracy"] == ref["val_accuracy"] and metrics["best_epoch"] == ref["best_epoch"]
    assert metrics["test_accuracy"] < ref["test_accuracy"] - 0.3  # the scrambled labels were really used
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (
        ref_out / "model.safetensors"
    ).read_bytes()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(epochs=0), "epochs must be a positive integer, got 0"),
        (dict(batch_size=-1), "batch_size must be a positive integer"),
        (dict(lr=2.0), r"lr must be in \(0, 1\)"),
        (dict(val_fraction=0.0), "val_fraction must be in"),
        (dict(label_smoothing=1.0), "label_smoothing must be in"),
        (dict(arch="vgg"), "unknown classifier architecture 'vgg'"),
        (dict(arch="timm:resnet18", width=8), "width applies to"),
        (dict(shift=-1), "shift must be an integer"),
        (dict(init_weights="/w.safetensors"), "init_weights applies to timm:<name> classifiers only"),
        (dict(device="tpu"), "device must be cpu or cuda"),
    ],
)
def test_bad_config_is_one_line_error(change, message):
    with pytest.raises(TckrError, match=message) as e:
        TeacherConfig(**change).validate()
    assert "\n" not in str(e.value)


def test_refuses_to_overwrite_a_run_without_overwrite(digits_run):
    out, _ = digits_run
    with pytest.raises(TckrError, match=r"already holds a teacher run.*--overwrite"):
        train_teacher(TeacherConfig(**FAST), out)


def test_cli_teacher_trains_and_reports(cli, tmp_path):
    out = tmp_path / "t"
    args = ["teacher", "--out", out, "--dataset", "digits", "--arch", "small-cnn", "--epochs", "1"]
    result = cli(*args, "--batch-size", "64", "--lr", "5e-3", "--threads", "1")
    assert result.code == 0, result.err
    assert "test acc" in result.err and (out / "metrics.json").is_file()
    assert load_classifier(out).config["arch"] == "small-cnn"
    again = cli(*args)
    assert again.code == 2 and "already holds a teacher run" in again.err and "Traceback" not in again.err
    bad = cli("teacher", "--out", tmp_path / "u", "--epochs", "0")
    assert bad.code == 2 and "epochs must be a positive integer" in bad.err and len(bad.err.splitlines()) == 1
