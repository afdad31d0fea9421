"""synth/: activation maximisation, boundary-supporting samples (BSS), and both as shard-folder sources.

A small-cnn teacher and a weaker student are trained on 8x8 digits once per module (a few seconds each).
"""

import io
import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from tckr_engine.data import class_names, load_dataset
from tckr_engine.engine.generate import verify
from tckr_engine.engine.scheduler import sample_seed
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier, load_classifier, save_classifier
from tckr_engine.synth import (
    ActivationMaxConfig,
    BSSConfig,
    SynthConfig,
    activation_maximise,
    boundary_samples,
    bss_loss,
    bss_schedule,
    generate_synthetic,
    synth_config,
    total_variation,
)
from tckr_engine.synth.activation_max import BNStatsLoss, roll_per_sample
from tckr_engine.synth.bss import sample_targets, select_base_samples
from tckr_engine.train.teacher import TeacherConfig, train_teacher

FAST_AM = dict(steps=25)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(teacher folder, student folder): small-cnn on digits; the student is trained less (weaker)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("synth-models")
    common = dict(arch="small-cnn", dataset="digits", batch_size=32, lr=1e-2, threads=1)
    train_teacher(TeacherConfig(**common, epochs=2, width=16, seed=0), root / "teacher")
    train_teacher(TeacherConfig(**common, epochs=1, width=8, seed=1), root / "student")
    return root / "teacher", root / "student"


@pytest.fixture(scope="module")
def teacher(models):
    return load_classifier(models[0])


@pytest.fixture(scope="module")
def student(models):
    return load_classifier(models[1])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "train")


def normalised(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, H, W, C) -> the classifiers' normalised float (B, C, H, W) (mean = std = 0.5)."""
    return (images.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5


# ------------------------------------------------------------------------------------------------
# activation maximisation


def test_activation_max_raises_the_target_logit(teacher):
    targets = [i % 10 for i in range(20)]
    r = activation_maximise(teacher, targets, list(range(20)), ActivationMaxConfig(**FAST_AM))
    assert r.images.dtype == torch.uint8 and r.images.shape == (20, 8, 8, 1)
    assert r.target_logit.mean() > r.start_logit.mean() + 2.0
    with torch.no_grad():
        logits = teacher(r.images)
    torch.testing.assert_close(r.logits, logits)  # reported logits are the teacher's on the uint8 images
    torch.testing.assert_close(r.target_prob, logits.softmax(1)[torch.arange(20), torch.tensor(targets)])
    assert (logits.argmax(1) == torch.tensor(targets)).float().mean() >= 0.8
    assert not any(p.grad is not None for p in teacher.parameters())
    assert not teacher.training


def test_activation_max_is_deterministic_and_independent_of_batching(teacher):
    cfg = ActivationMaxConfig(steps=10, bn=0.0)  # BN matching couples a batch by design: off here
    targets, seeds = [3, 1, 4, 1, 5, 9], [10, 11, 12, 13, 14, 15]
    whole = activation_maximise(teacher, targets, seeds, cfg).images
    again = activation_maximise(teacher, targets, seeds, cfg).images
    split = torch.cat(
        [activation_maximise(teacher, targets[:2], seeds[:2], cfg).images,
         activation_maximise(teacher, targets[2:], seeds[2:], cfg).images]
    )  # fmt: skip
    assert torch.equal(whole, again)
    diff = (whole.int() - split.int()).abs()
    assert diff.max() <= 1 and (diff == 0).float().mean() >= 0.98
    other = activation_maximise(teacher, targets, [s + 100 for s in seeds], cfg).images
    assert not torch.equal(whole, other)


def test_l2_weight_shrinks_the_image_norm(teacher):
    base = dict(steps=25, tv=0.0, bn=0.0)
    targets, seeds = [i % 10 for i in range(10)], list(range(10))
    free = activation_maximise(teacher, targets, seeds, ActivationMaxConfig(**base, l2=0.0)).images
    decayed = activation_maximise(teacher, targets, seeds, ActivationMaxConfig(**base, l2=20.0)).images
    norm = lambda im: normalised(im).flatten(1).norm(dim=1).mean()  # noqa: E731
    assert norm(decayed) < 0.8 * norm(free)


def test_tv_weight_lowers_total_variation(teacher):
    base = dict(steps=25, l2=0.0, bn=0.0)
    targets, seeds = [i % 10 for i in range(10)], list(range(10))
    free = activation_maximise(teacher, targets, seeds, ActivationMaxConfig(**base, tv=0.0)).images
    smooth = activation_maximise(teacher, targets, seeds, ActivationMaxConfig(**base, tv=20.0)).images
    assert total_variation(normalised(smooth)).mean() < 0.7 * total_variation(normalised(free)).mean()


def test_bn_matching_moves_batch_statistics_towards_the_running_ones(teacher):
    base = dict(steps=25, l2=0.0, tv=0.0)
    targets, seeds = [i % 10 for i in range(20)], list(range(20))

    def bn_loss(images):
        hooks = BNStatsLoss(teacher.net)
        assert len(hooks.layers) == 5  # small-cnn: five conv blocks with BN
        with hooks, torch.no_grad():
            teacher(images)
        return float(hooks.loss)

    free = activation_maximise(teacher, targets, seeds, ActivationMaxConfig(**base, bn=0.0)).images
    matched = activation_maximise(teacher, targets, seeds, ActivationMaxConfig(**base, bn=1.0)).images
    assert bn_loss(matched) < 0.8 * bn_loss(free)


def test_roll_per_sample_matches_torch_roll():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    out = roll_per_sample(x, torch.tensor([1, -2]), torch.tensor([0, 3]))
    assert torch.equal(out[0], torch.roll(x[0], (1, 0), (1, 2)))
    assert torch.equal(out[1], torch.roll(x[1], (-2, 3), (1, 2)))


@pytest.mark.parametrize(
    "change",
    [dict(steps=0), dict(lr=0), dict(lr=-1.0), dict(l2=-1), dict(tv=float("nan")), dict(bn="big"),
     dict(jitter=-1), dict(objective="kl"), dict(steps=True)],
)  # fmt: skip
def test_bad_activation_max_settings_are_one_line_errors(change):
    with pytest.raises(TckrError) as e:
        ActivationMaxConfig(**change).validate()
    assert "\n" not in str(e.value) and "activation_max." in str(e.value)


# ------------------------------------------------------------------------------------------------
# BSS


def test_bss_schedules_match_the_reference_formulas():
    # alpha = 1 + 3 (1 - p); beta = max(2 (1 - 4p/3), 0)  (train_BSS_distillation.py, p = epoch / max_epoch)
    for p, (alpha, beta) in {0.0: (4.0, 2.0), 0.5: (2.5, 2 / 3), 0.75: (1.75, 0.0), 1.0: (1.0, 0.0)}.items():
        got = bss_schedule(p)
        assert got == pytest.approx((alpha, beta), abs=1e-12), p
    assert bss_schedule(0.9)[1] == 0.0 and bss_schedule(0.25) == pytest.approx((3.25, 4 / 3))
    assert bss_schedule(1.5) == bss_schedule(1.0)  # clamped
    with pytest.raises(TckrError):
        bss_schedule(float("nan"))


def test_bss_loss_equals_a_hand_computed_value():
    s = torch.tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 1])
    adv_s, adv_t = torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, -1.0]])
    alpha, beta, T = 2.5, 0.5, 3.0

    def softmax(v):
        e = [math.exp(a) for a in v]
        return [a / sum(e) for a in e]

    def soft_ce(tt, ss):  # -mean_i sum_c softmax(t/T) log softmax(s/T)
        total = 0.0
        for ti, si in zip(tt, ss, strict=True):
            p, q = softmax([a / T for a in ti]), softmax([a / T for a in si])
            total -= sum(pc * math.log(qc) for pc, qc in zip(p, q, strict=True))
        return total / len(tt)

    ce = -(math.log(softmax(s[0].tolist())[0]) + math.log(softmax(s[1].tolist())[1])) / 2
    expected = ce + alpha * soft_ce(t.tolist(), s.tolist()) + beta * soft_ce(adv_t.tolist(), adv_s.tolist())
    got = bss_loss(s, t, y, adv_s, adv_t, alpha, beta, T)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    without = ce + alpha * soft_ce(t.tolist(), s.tolist())
    assert bss_loss(s, t, y, adv_s, adv_t, alpha, 0.0, T).item() == pytest.approx(without, rel=1e-6)
    assert bss_loss(s, t, y, adv_s[:0], adv_t[:0], alpha, beta, T).item() == pytest.approx(without, rel=1e-6)
    # gradients reach the student side only through s and adv_s
    s_req, adv_req = s.clone().requires_grad_(True), adv_s.clone().requires_grad_(True)
    bss_loss(s_req, t, y, adv_req, adv_t, alpha, beta, T).backward()
    assert s_req.grad is not None and adv_req.grad is not None and adv_req.grad.abs().sum() > 0


def test_base_samples_are_correct_for_both_and_have_the_largest_gap():
    torch.manual_seed(0)
    t, s = torch.randn(40, 5) * 3, torch.randn(40, 5) * 3
    y = t.argmax(1).clone()
    y[:5] = (y[:5] + 1) % 5  # five teacher mistakes
    index, score = select_base_samples(t, s, y, attack_size=4)
    both = (t.argmax(1) == y) & (s.argmax(1) == y)
    diff = (t.softmax(1) - s.softmax(1)) ** 2
    expected = torch.stack([diff[i].sum() - diff[i, y[i]] for i in range(40)])
    ranked = sorted((i for i in range(40) if both[i]), key=lambda i: -float(expected[i]))
    assert index.tolist() == ranked[:4]
    torch.testing.assert_close(score, expected[index])
    teacher_only, _ = select_base_samples(t, s, y, attack_size=40, require_student_correct=False)
    assert set(teacher_only.tolist()) == set(torch.nonzero(t.argmax(1) == y).squeeze(1).tolist())


def test_target_classes_follow_the_renormalised_teacher_distribution():
    logits = torch.tensor([[3.0, 1.0, 0.0, 2.0, -1.0]]).repeat(40_000, 1)
    k = sample_targets(logits, torch.Generator().manual_seed(0))
    q = logits[0].softmax(0)
    expected = q / (1 - q.max())
    expected[0] = 0.0  # the top class is never a target
    freq = torch.bincount(k, minlength=5).float() / len(k)
    assert freq[0] == 0
    torch.testing.assert_close(freq, expected, atol=0.01, rtol=0)


def test_bss_walks_towards_the_target_and_the_gap_shrinks_each_step(teacher, student, digits):
    x = torch.from_numpy(digits.images[:256])  # (256, 8, 8, 1) uint8
    y = torch.from_numpy(digits.labels[:256])
    cfg = BSSConfig()
    x_adv, info = boundary_samples(
        teacher, student, x, y, cfg=cfg, generator=torch.Generator().manual_seed(0)
    )
    n = len(info.index)
    assert 10 <= n <= 64 and x_adv.shape == (n, 1, 8, 8) and x_adv.dtype == torch.float32
    assert x_adv.min() >= -1 and x_adv.max() <= 1  # the normalised range of mean = std = 0.5
    with torch.no_grad():
        t0, s0 = teacher(x[info.index]).argmax(1), student(x[info.index]).argmax(1)
    assert torch.equal(t0, info.y) and torch.equal(s0, info.y) and torch.equal(info.y, y[info.index])
    assert (info.target != info.y).all()
    assert info.gap.shape == (info.steps + 1, n) and info.active.shape == (info.steps, n)
    assert (info.gap[0] > 0).all()  # f_y > f_k at the start: y is the teacher's class

    active = info.active
    change = info.gap[1:] - info.gap[:-1]  # (S, N)
    assert active.sum() > n  # some samples take more than one step
    assert (change[active] < 0).all()  # every step of a moving sample shrinks f_y - f_k
    assert (change[~active] == 0).all()  # stopped samples do not move
    torch.testing.assert_close(info.teacher_logits, teacher(x_adv))
    final_class = info.teacher_logits.argmax(1)
    assert (final_class != info.y).float().mean() >= 0.5  # most walks crossed the boundary
    assert not any(p.grad is not None for p in teacher.parameters())
    assert not any(p.grad is not None for p in student.parameters())


def test_bss_stop_rule_and_reused_logits(teacher, student, digits):
    x = torch.from_numpy(digits.images[:128])
    y = torch.from_numpy(digits.labels[:128])
    with torch.no_grad():
        t_logits, s_logits = teacher(x), student(x)
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    a, info_a = boundary_samples(teacher, student, x, y, generator=g())
    b, info_b = boundary_samples(
        teacher, None, x, y, teacher_logits=t_logits, student_logits=s_logits, generator=g()
    )
    assert torch.equal(a, b) and torch.equal(info_a.target, info_b.target)
    # replay: a sample moves at step s iff the teacher's argmax at the start of step s is its class y
    xs = normalised(x[info_a.index])
    cfg = BSSConfig()
    rows = torch.arange(len(xs))
    for step in range(info_a.steps):
        xv = xs.clone().requires_grad_(True)
        logits = teacher.net(xv)
        f_y, f_k = logits[rows, info_a.y], logits[rows, info_a.target]
        (grad,) = torch.autograd.grad((f_k - f_y).sum(), xv)
        active = logits.argmax(1) == info_a.y
        assert torch.equal(active, info_a.active[step])
        scale = cfg.step_size * active.float() * (f_y - f_k + 1e-4).detach() / grad.flatten(1).norm(dim=1)
        xs = (xs + scale[:, None, None, None] * grad).clamp(-1, 1).detach()
    torch.testing.assert_close(xs, a)


def test_bss_refuses_mismatched_normalisation(teacher, digits):
    other = Classifier("small-cnn", 10, 1, 8, class_names("digits"), mean=0.1, std=0.3, width=8).eval()
    x, y = torch.from_numpy(digits.images[:8]), torch.from_numpy(digits.labels[:8])
    with pytest.raises(TckrError, match="normalisation"):
        boundary_samples(teacher, other, x, y)


@pytest.mark.parametrize(
    "change",
    [dict(attack_size=0), dict(steps=-1), dict(step_size=0), dict(temperature="3"), dict(beta_zero_at=0),
     dict(beta_zero_at=1.5), dict(alpha_start=-1), dict(attack_size=300), dict(require_student_correct=1)],
)  # fmt: skip
def test_bad_bss_settings_are_one_line_errors(change):
    with pytest.raises(TckrError) as e:
        BSSConfig(**change).validate()
    assert "\n" not in str(e.value) and "bss." in str(e.value)


# ------------------------------------------------------------------------------------------------
# sources -> shard folders


def read_back(out):
    index = json.loads((out / "index.json").read_text())
    urls = [str(out / e["url"]) for e in index["shardlist"]]
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def tars(out):
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def decoded(sample) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(sample["png"]))))[..., None]  # (H, W, 1)


def am_config(models, **changes):
    values = dict(
        source="activation-max", teacher=str(models[0]), dataset="digits", num_images=25, shard_size=10,
        batch_size=4, threads=1, activation_max=ActivationMaxConfig(steps=8),
    )  # fmt: skip
    return SynthConfig(**{**values, **changes})


def bss_config(models, **changes):
    values = dict(
        source="bss", teacher=str(models[0]), student=str(models[1]), dataset="digits", num_images=50,
        shard_size=20, threads=1, bss=BSSConfig(attack_size=16, candidates=64),
    )  # fmt: skip
    return SynthConfig(**{**values, **changes})


def test_activation_max_source_writes_a_valid_deterministic_shard_folder(models, teacher, tmp_path):
    out = tmp_path / "am"
    summary = generate_synthetic(am_config(models), out)
    assert summary.images == 25 and summary.shards == 3 and summary.generated == 25
    assert verify(out) == []
    run = json.loads((out / "run.json").read_text())
    spec = run["spec"]
    assert spec["source"] == "activation-max" and spec["classes"] == list(class_names("digits"))
    assert spec["activation_max"] == {
        "steps": 8, "lr": 0.1, "objective": "logit", "l2": 0.01, "tv": 0.1, "bn": 0.1, "jitter": 1,
        "init_std": 0.5,
    }  # fmt: skip
    assert spec["generator"]["image_size"] == 8 and spec["generator"]["channels"] == 1
    assert "config" not in run and run["synth_config"]["source"] == "activation-max"

    samples = read_back(out)
    assert [s["cls"] for s in samples] == [i % 10 for i in range(25)]
    images = torch.stack([decoded(s) for s in samples])
    with torch.no_grad():
        expected = teacher(images).numpy()
    stored = np.stack([s["logits.npy"] for s in samples])
    assert stored.dtype == np.float16 and stored.shape == (25, 10)
    np.testing.assert_allclose(stored.astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    for i, s in enumerate(samples):
        meta = s["json"]
        assert s["txt"] == f"activation-max: {i % 10}" and meta["class_name"] == str(i % 10)
        assert meta["source"] == "activation-max" and meta["settings"] == spec["activation_max"]
        assert meta["index"] == i and meta["seed"] == sample_seed(0, i)  # per-sample seed: (run seed, index)
        prob = torch.tensor(expected[i]).softmax(0)[i % 10].item()
        assert meta["target_prob"] == pytest.approx(prob, abs=1e-4)

    again = tmp_path / "again"
    generate_synthetic(am_config(models), again)
    assert tars(out) == tars(again)  # same config -> byte-identical shards and stats
    other = tmp_path / "other-seed"
    generate_synthetic(am_config(models, seed=1), other)
    assert tars(out)["000000.tar"] != tars(other)["000000.tar"]

    # resume: a lost shard is regenerated byte-identically, committed ones are kept
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    for name in ("000001.tar", "000001_stats.json"):
        (resumed / "shards" / name).unlink()
    summary = generate_synthetic(am_config(models), resumed)
    assert summary.shards_generated == 1 and summary.generated == 10
    assert tars(resumed) == tars(out) and verify(resumed) == []
    with pytest.raises(TckrError, match="different run"):
        generate_synthetic(am_config(models, activation_max=ActivationMaxConfig(steps=9)), resumed)


def test_bss_source_writes_a_valid_deterministic_shard_folder(models, teacher, digits, tmp_path):
    out = tmp_path / "bss"
    summary = generate_synthetic(bss_config(models), out)
    assert summary.images == 50 and summary.shards == 3
    assert verify(out) == []
    spec = json.loads((out / "run.json").read_text())["spec"]
    assert spec["source"] == "bss" and spec["bss"]["steps"] == 10 and spec["bss"]["step_size"] == 0.3
    assert spec["base"]["split"] == "train" and spec["student"]["id"]

    samples = read_back(out)
    assert len(samples) == 50
    images = torch.stack([decoded(s) for s in samples])
    with torch.no_grad():
        expected = teacher(images).numpy()
    np.testing.assert_allclose(
        np.stack([s["logits.npy"] for s in samples]).astype(np.float32), expected, rtol=2e-3, atol=2e-3
    )
    for s in samples:
        meta = s["json"]
        assert s["cls"] == int(digits.labels[meta["base_index"]])  # cls = the base image's class
        assert meta["target_class"] != s["cls"] and s["txt"] == f"bss: {s['cls']} -> {meta['target_class']}"
        assert 0 <= meta["steps_moved"] <= 10 and meta["source"] == "bss"
    moved = sum(s["json"]["steps_moved"] > 0 for s in samples)
    assert moved == 50  # every base sample starts on y's side, so it moves at least once
    changed = [
        (decoded(s)[..., 0].numpy() != digits.images[s["json"]["base_index"]][..., 0]).any() for s in samples
    ]
    assert np.mean(changed) > 0.9

    again = tmp_path / "again"
    generate_synthetic(bss_config(models), again)
    assert tars(out) == tars(again)


def test_source_errors_are_one_line(models, tmp_path):
    with pytest.raises(TckrError, match="student"):
        generate_synthetic(bss_config(models, student=None), tmp_path / "a")
    with pytest.raises(TckrError, match="teacher"):
        generate_synthetic(am_config(models, teacher=None), tmp_path / "b")
    wrong = Classifier("small-cnn", 10, 1, 8, tuple("abcdefghij"), width=8)
    save_classifier(wrong, tmp_path / "wrong")
    with pytest.raises(TckrError, match="differ from the dataset"):
        generate_synthetic(am_config(models, teacher=str(tmp_path / "wrong")), tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(TckrError, match="source must be"):
        SynthConfig(source="diffusion", teacher="x").validate()


def test_synth_config_from_a_table():
    cfg = synth_config(
        {"source": "bss", "teacher": "t", "student": "s", "num-images": 7, "bss": {"attack-size": 8},
         "activation_max": {"steps": 3, "tv": 0.5}}
    )  # fmt: skip
    assert cfg.num_images == 7 and cfg.bss.attack_size == 8 and cfg.activation_max.tv == 0.5
    with pytest.raises(TckrError, match="unknown bss option"):
        synth_config({"teacher": "t", "bss": {"attack_steps": 3}})
    with pytest.raises(TckrError, match="unknown synth option"):
        synth_config({"teacher": "t", "guidance": 2})


def test_bss_softce_uses_no_t_squared_factor():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    y = torch.zeros(4, dtype=torch.long)
    kd = bss_loss(s, t, y, None, None, 1.0, 0.0, 3.0) - F.cross_entropy(s, y)
    manual = -(F.softmax(t / 3, 1) * F.log_softmax(s / 3, 1)).sum(1).mean()
    torch.testing.assert_close(kd, manual)


# ------------------------------------------------------------------------------------------------
# the CLI: generate --source


def test_cli_generate_source_activation_max_and_bss(models, cli, tmp_path):
    teacher, student = models
    out = tmp_path / "am"
    r = cli("generate", "--source", "activation-max", "--teacher", teacher, "--dataset", "digits",
            "--shards", out, "--num-images", 20, "--shard-size", 10, "--batch-size", 10, "--steps", 5,
            "--device", "cpu", "--threads", 1)  # fmt: skip
    assert r.code == 0, r.out
    assert "activation-max images" in r.out + r.err
    run = json.loads((out / "run.json").read_text())
    assert run["spec"]["source"] == "activation-max" and run["spec"]["activation_max"]["steps"] == 5
    assert cli("verify", out).code == 0
    config = tmp_path / "bss.toml"
    config.write_text('[generate]\nsplit = "test"\n[generate.bss]\nattack_size = 4\ncandidates = 16\n')
    out = tmp_path / "bss"
    r = cli("generate", "--source", "bss", "--teacher", teacher, "--student", student, "--dataset", "digits",
            "--shards", out, "--num-images", 8, "--shard-size", 8, "--steps", 3, "--device", "cpu",
            "--threads", 1, "--config", config)  # fmt: skip
    assert r.code == 0, r.out
    spec = json.loads((out / "run.json").read_text())["spec"]
    assert spec["base"]["split"] == "test" and spec["bss"]["attack_size"] == 4 and spec["bss"]["steps"] == 3
    assert cli("verify", out).code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "activation-max", "--guidance", "2"], "--guidance only apply to --source diffusion"),
        (["--source", "bss"], "needs a teacher"),
        (["--source", "dreams"], "--source must be diffusion, activation-max, bss"),
        (["--student", "x"], "--student and --split only apply to --source bss"),
    ],
)
def test_cli_generate_source_errors_are_one_line(cli, tmp_path, args, message):
    r = cli("generate", "--shards", tmp_path / "x", "--dataset", "digits", *args)
    text = r.out + r.err
    assert r.code != 0 and message in text and "Traceback" not in text
    assert not (tmp_path / "x").exists()
