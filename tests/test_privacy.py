"""Membership inference: metrics and AOP, the LiRA score, balanced masks, cached shadows, digits attacks."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

from tckr_engine.data import load_dataset, train_val_split
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier
from tckr_engine.privacy import (
    LiraConfig,
    aop,
    attack,
    auc,
    balanced_masks,
    build_challenge,
    lira_score,
    load_shadows,
    plot_roc,
    roc,
    save_attack,
    summarize,
    teacher_setup,
    tpr_at_fpr,
    train_shadows,
)
from tckr_engine.privacy.lira import LIRA_VARIANTS, apply_augmentation, augmentations
from tckr_engine.train.fit import fit_classifier
from tckr_engine.train.teacher import TeacherConfig, train_teacher

# Tiny but real: small-cnn (width 16) on 8x8 digits, 150 members + 150 non-members, 8 shadows of 30 epochs
# without augmentation or label smoothing (overfits on purpose): ~6 s of shadow training on one core.
M, K = 150, 8
RECIPE = dict(epochs=30, batch_size=32, lr=3e-3, weight_decay=0.0, label_smoothing=0.0, shift=0, hflip=False)
CFG = LiraConfig(num_shadows=K, members=M, arch="small-cnn", width=16, threads=1, **RECIPE)


def _fit_target(images, labels, seed):
    """A model with the shadows' architecture and recipe, trained on `images` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Classifier("small-cnn", 10, 1, 8, tuple(str(i) for i in range(10)), width=16)
    fit_classifier(model, images, labels, seed=seed, **RECIPE)
    return model


@pytest.fixture(scope="module")
def shadows(tmp_path_factory):
    return train_shadows(CFG, "digits", tmp_path_factory.mktemp("lira") / "shadows")


# --- metrics -------------------------------------------------------------------------------------------


def test_aop_reproduces_tckr_cifar10_teacher():
    assert aop(97.52, 53.89) == pytest.approx(83.95, abs=0.005)  # REFERENCE §1: acc 97.52, AUC 53.89 %
    assert aop(90.0, 50.0) == 90.0  # chance-level MIA keeps the accuracy
    with pytest.raises(ValueError, match="percentage"):
        aop(97.52, 0.5389)  # a fraction where a percentage is expected


def test_roc_auc_tpr_on_hand_made_scores():
    is_member = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
    perfect = np.array([8, 7, 6, 5, 4, 3, 2, 1], float)
    fpr, tpr = roc(perfect, is_member)
    assert auc(fpr, tpr) == 1.0 and tpr_at_fpr(fpr, tpr, 0.01) == 1.0
    fpr, tpr = roc(-perfect, is_member)  # reversed: every member scores below every non-member
    assert auc(fpr, tpr) == 0.0 and tpr_at_fpr(fpr, tpr, 0.01) == 0.0
    # One non-member ranked first: nothing is caught at FPR <= 1 %, all at FPR 25 %, AUC = 1 - 4/16.
    mixed = np.array([7, 6, 5, 4, 8, 3, 2, 1], float)
    s = summarize(mixed, is_member)
    assert s["auc"] == pytest.approx(0.75) and s["tpr_at_1%_fpr"] == 0.0 and s["tpr_at_0.1%_fpr"] == 0.0
    assert tpr_at_fpr(*roc(mixed, is_member), 0.25) == 1.0
    with pytest.raises(ValueError, match="both members and non-members"):
        roc(perfect, np.ones(8, bool))


def test_plot_roc_writes_a_png(tmp_path):
    curves = {
        "a": roc(np.arange(10.0), np.arange(10) >= 5),
        "b": (np.array([0, 0.5, 1]), np.array([0, 0.7, 1])),
    }
    path = plot_roc(curves, tmp_path / "sub" / "roc.png", "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    assert not list(tmp_path.glob("sub/.*"))  # no temp file left behind


# --- score, views, masks, config ----------------------------------------------------------------------


def test_lira_score_is_stable_logit_of_the_true_class():
    logits = torch.tensor([[2.0, 0.5, -1.0], [200.0, 0.0, 0.0], [0.0, 0.0, 300.0]], dtype=torch.float64)
    logp = torch.log_softmax(logits, 1).numpy()
    labels = np.array([0, 0, 0])
    p = torch.softmax(logits, 1).numpy()
    got = lira_score(logp, labels)
    assert got[0] == pytest.approx(np.log(p[0, 0]) - np.log(p[0, 1] + p[0, 2]))
    assert got[1] == pytest.approx(200.0 - np.log(2.0))  # p_y == 1.0 in floating point: still finite
    assert got[2] == pytest.approx(-300.0)  # p_y underflows to 0: still finite
    assert lira_score(np.stack([logp, logp]), labels).shape == (2, 3)  # leading view axis


def test_score_views_move_pixels_as_named():
    img = torch.zeros(1, 5, 5, 1, dtype=torch.uint8)
    img[0, 1, 3] = 255  # row 1, column 3
    views = augmentations(True)
    where = {a: tuple(torch.nonzero(apply_augmentation(img, a)[0, ..., 0])[0].tolist()) for a in views}
    assert (
        where[(False, 0, 0)] == (1, 3) and where[(False, 1, 0)] == (2, 3) and where[(False, 0, -1)] == (1, 2)
    )
    assert where[(True, 0, 0)] == (1, 1) and where[(True, -1, 0)] == (0, 1)  # mirror first, then shift
    diagonal = apply_augmentation(img, (True, -1, 1))[0, ..., 0]
    assert torch.nonzero(diagonal).tolist() == [[0, 2]] and diagonal.sum() == 255
    assert len(views) == 10 and views[0] == (False, 0, 0) and augmentations(False) == views[:5]
    assert augmentations(True, augment=False) == [(False, 0, 0)]


def test_masks_are_balanced_and_random():
    masks = balanced_masks(8, 500, seed=3)
    assert masks.shape == (8, 500) and masks.dtype == bool
    assert (masks.sum(0) == 4).all()  # every example IN for exactly K/2 shadows
    assert masks.sum(1).min() > 200 and masks.sum(1).max() < 300  # each shadow sees about half the pool
    assert len({row.tobytes() for row in masks.T}) > 50  # not one pattern repeated
    assert np.array_equal(masks, balanced_masks(8, 500, seed=3))
    assert not np.array_equal(masks, balanced_masks(8, 500, seed=4))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_shadows=7), "num_shadows must be an even number >= 4"),
        (dict(num_shadows=2), "num_shadows must be an even number >= 4"),
        (dict(members=0), "members must be a positive integer"),
        (dict(lr=0.0), r"lr must be in \(0, 1\)"),
        (dict(arch="vgg"), "unknown classifier architecture 'vgg'"),
        (dict(device="tpu"), "device must be cpu or cuda"),
        (dict(seed=-1), "seed must be a non-negative integer"),
    ],
)
def test_bad_config_is_one_line_error(change, message):
    with pytest.raises(TckrError, match=message) as e:
        LiraConfig(**change).validate()
    assert "\n" not in str(e.value)


def test_too_many_members_for_the_dataset_is_a_clear_error(tmp_path):
    with pytest.raises(TckrError, match=r"digits is too small for members=400.*at most 359"):
        train_shadows(dataclasses.replace(CFG, members=400), "digits", tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_challenge_members_are_the_teachers_training_images(tmp_path):
    teacher = TeacherConfig(dataset="digits", arch="small-cnn", width=4, epochs=1, seed=5, threads=1)
    train_teacher(teacher, tmp_path)
    cfg, dataset = teacher_setup(tmp_path, num_shadows=4, members=100)
    assert dataset == "digits" and (cfg.arch, cfg.width, cfg.split_seed) == ("small-cnn", 4, 5)
    assert (cfg.num_shadows, cfg.epochs, cfg.shift, cfg.hflip) == (4, 1, 1, False)  # resolved shift / flip
    ch = build_challenge(dataset, cfg.members, cfg.val_fraction, cfg.split_seed, cfg.seed)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    fit_idx, val_idx = train_val_split(train.labels, 0.1, seed=5)
    assert set(ch.member_index) <= set(fit_idx) and not set(ch.member_index) & set(val_idx)
    assert np.array_equal(ch.images[:100], train.images[ch.member_index])
    assert np.array_equal(ch.images[100:], test.images[ch.nonmember_index])
    assert ch.is_member.sum() == 100 and ch.is_member[:100].all()
    with pytest.raises(TckrError, match="no finished teacher run"):
        teacher_setup(tmp_path / "nothing")


# --- shadows and attacks -------------------------------------------------------------------------------


def test_shadow_folder_is_complete_and_balanced(shadows):
    assert shadows.trained == K and shadows.masks.shape == (K, 2 * M)
    assert (shadows.masks.sum(0) == K // 2).all()  # balanced: IN for exactly half the shadows
    assert np.array_equal(np.load(shadows.path / "masks.npy"), shadows.masks)
    assert shadows.scores.shape == (K, 5, 2 * M) and np.isfinite(shadows.scores).all()  # 5 views, no mirror
    assert shadows.model_config["arch"] == "small-cnn" and shadows.model_config["width"] == 16
    # Shadows score their own training examples higher than the others: the signal LiRA feeds on.
    views_mean = shadows.scores.mean(1)  # (K, 2M)
    assert views_mean[shadows.masks].mean() > views_mean[~shadows.masks].mean() + 0.3


def test_shadows_are_reused_not_retrained(shadows):
    before = {p: p.stat().st_mtime_ns for p in shadows.path.glob("shadow_*/*")}
    assert len(before) == 3 * K
    again = train_shadows(CFG, "digits", shadows.path)
    assert again.trained == 0 and again.fingerprint == shadows.fingerprint
    assert {p: p.stat().st_mtime_ns for p in shadows.path.glob("shadow_*/*")} == before
    assert np.array_equal(again.scores, shadows.scores) and np.array_equal(again.masks, shadows.masks)
    # Runtime-only fields do not change what the shadows are.
    assert train_shadows(dataclasses.replace(CFG, eval_batch_size=64), "digits", shadows.path).trained == 0
    with pytest.raises(TckrError, match=r"another setup \(epochs 30 -> 31\).*delete this one"):
        train_shadows(dataclasses.replace(CFG, epochs=31), "digits", shadows.path)
    assert load_shadows(shadows.path).fingerprint == shadows.fingerprint


def test_interrupted_shadows_resume_and_overwrite_retrains(tmp_path):
    cfg = dataclasses.replace(CFG, num_shadows=4, members=20, epochs=2)
    first = train_shadows(cfg, "digits", tmp_path)
    weights = (tmp_path / "shadow_001" / "model.safetensors").read_bytes()
    shutil.rmtree(tmp_path / "shadow_001")
    with pytest.raises(TckrError, match="lacks 1 of 4 shadow models"):
        load_shadows(tmp_path)
    resumed = train_shadows(cfg, "digits", tmp_path)
    assert resumed.trained == 1 and np.array_equal(resumed.scores, first.scores)
    assert (tmp_path / "shadow_001" / "model.safetensors").read_bytes() == weights  # seeded: identical
    redone = train_shadows(dataclasses.replace(cfg, epochs=3), "digits", tmp_path, overwrite=True)
    assert redone.trained == 4 and redone.fingerprint != first.fingerprint
    assert json.loads((tmp_path / "shadows.json").read_text())["identity"]["config"]["epochs"] == 3


def test_lira_detects_an_overfit_target(shadows, tmp_path):
    ch = shadows.challenge
    target = _fit_target(ch.images[:M], ch.labels[:M], seed=123)  # trained on exactly the members
    result = attack(target, shadows)
    s = result["summary"]
    assert set(s["variants"]) == {*LIRA_VARIANTS, "loss", "confidence"}
    assert s["max_auc"] == max(s["variants"][v]["auc"] for v in LIRA_VARIANTS) > 0.7
    assert s["variants"]["lira-online"]["auc"] > 0.7 and s["target"]["accuracy_members"] == 1.0
    assert s["shadow_arch_matches"] and s["num_shadows"] == K and s["members"] == M
    fpr, tpr = result["curves"][s["max_auc_variant"]]
    assert auc(fpr, tpr) == pytest.approx(s["max_auc"])
    summary_path, png = save_attack(result, tmp_path, "overfit target")
    assert json.loads(summary_path.read_text()) == json.loads(json.dumps(s)) and png.stat().st_size > 0


def test_lira_is_near_chance_on_a_target_that_never_saw_the_members(shadows):
    ch = shadows.challenge
    train = load_dataset("digits", "train")
    fit_idx, _ = train_val_split(train.labels, CFG.val_fraction, seed=CFG.split_seed)
    others = np.random.default_rng(1).choice(np.setdiff1d(fit_idx, ch.member_index), M, replace=False)
    target = _fit_target(train.images[others], train.labels[others], seed=7)  # disjoint from the pool
    s = attack(target, shadows)["summary"]
    for name, v in s["variants"].items():
        assert 0.35 < v["auc"] < 0.65, (name, v["auc"])
    assert s["target"]["accuracy_members"] < 1.0  # it really did not memorise them


def test_attack_refuses_a_model_of_other_classes(shadows):
    other = Classifier("small-cnn", 3, 1, 8, ("a", "b", "c"), width=4)
    with pytest.raises(TckrError, match="target classes"):
        attack(other, shadows)
