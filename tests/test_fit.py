"""The shared classifier-fitting loop: seeded determinism, callbacks, LR schedule, augmentation defaults."""

import math

import numpy as np
import pytest
import torch

from tckr_engine.data import load_dataset
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier
from tckr_engine.train.fit import auto_hflip, auto_shift, cosine_lambda, evaluate_accuracy, fit_classifier

RECIPE = dict(batch_size=32, lr=5e-3, weight_decay=5e-5, label_smoothing=0.1, shift=1, hflip=False)


def _model(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Classifier("small-cnn", 10, 1, 8, tuple("0123456789"), width=8)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train").subset(np.arange(300)), load_dataset("digits", "test")


def test_fit_learns_calls_back_and_is_seeded(digits):
    train, test = digits
    model, epochs, steps = _model(), [], []
    history = fit_classifier(
        model, train.images, train.labels, epochs=3, seed=1, **RECIPE,
        on_epoch=lambda e, m, s: epochs.append((e, m is model, s["steps"])),
        progress=lambda done, total, loss, acc: steps.append((done, total)),
    )  # fmt: skip
    assert epochs == [(1, True, 9), (2, True, 18), (3, True, 27)]  # 300 // 32 = 9 full batches per epoch
    assert steps[0] == (1, 27) and steps[-1] == (27, 27) and len(steps) == 27
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[-1]["lr"] == 0.0  # cosine ends at 0
    assert (
        history[-1]["train_loss"] < history[0]["train_loss"] and evaluate_accuracy(model, test) > 0.3
    )  # chance: 0.1

    def weights(seed):
        m = _model()
        fit_classifier(m, torch.from_numpy(train.images), train.labels, epochs=1, seed=seed, **RECIPE)
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.equal(weights(2), weights(2)) and not torch.equal(weights(2), weights(3))


def test_fit_refuses_bad_data():
    with pytest.raises(TckrError, match=">= 2 images"):
        fit_classifier(
            _model(), np.zeros((1, 8, 8, 1), np.uint8), np.zeros(1, np.int64), epochs=1, seed=0, **RECIPE
        )
    with pytest.raises(TckrError, match=r"needs torch\.uint8 data"):
        fit_classifier(
            _model(), np.zeros((4, 8, 8, 1), np.float32), np.zeros(4, np.int64), epochs=1, seed=0, **RECIPE
        )


def test_schedule_and_augmentation_defaults():
    f = cosine_lambda(10)
    assert f(0) == 1.0 and f(5) == pytest.approx(0.5) and f(10) == 0.0 and f(20) == 0.0
    assert f(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert [auto_shift(s) for s in (8, 28, 32, 64)] == [1, 2, 3, 4]
    assert not auto_hflip("digits") and auto_hflip("fashion-mnist")
