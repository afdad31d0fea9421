"""GKD student trainer: loss by hand, streaming loader, regeneration rounds, label modes, resume, errors."""

import dataclasses
import io
import json
import math
import shutil
import tarfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from safetensors.torch import load_file

import tckr_engine.train.gkd as gkd
from tckr_engine.data import load_dataset
from tckr_engine.data.datasets import train_val_split
from tckr_engine.data.real_shards import real_subset, write_real_shards
from tckr_engine.engine.generate import generate, verify
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import load_classifier
from tckr_engine.synth.bss import BSSConfig, boundary_samples, bss_schedule
from tckr_engine.train.gkd import StudentConfig, train_student
from tckr_engine.train.losses import BSSBatch, batch_loss, batch_targets, gkd_loss
from tckr_engine.train.shard_folders import ensure_round, open_shard_folder, plan_rounds
from tckr_engine.train.stream import epoch_batches, iterate_batches, loader_in_process, shard_loader
from tckr_engine.train.teacher import TeacherConfig, evaluate_accuracy, train_teacher

OUTPUTS = ("model.safetensors", "classifier.json", "train_log.jsonl", "checkpoint.pt", "metrics.json")


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("gkd-teacher") / "teacher"
    cfg = TeacherConfig(
        arch="small-cnn", dataset="digits", epochs=1, width=8, batch_size=32, lr=1e-2, threads=1
    )
    train_teacher(cfg, out)
    return out


@pytest.fixture(scope="module")
def pool(tmp_path_factory, teacher):
    """A 120-image digits pool in 6 shards of 20, with the teacher's logits stored (do not modify)."""
    out = tmp_path_factory.mktemp("gkd-pool") / "pool"
    generate(tiny_config(num_images=120, shard_size=20, batch_size=20, teacher=str(teacher)), out)
    return out


def student(teacher_dir, /, **changes) -> StudentConfig:
    base = dict(
        arch="small-cnn", width=4, dataset="digits", teacher=str(teacher_dir), epochs=1, batch_size=16
    )
    return StudentConfig(**{**base, "workers": 0, "shuffle_buffer": 50, "threads": 1, **changes})


def record_loader(monkeypatch) -> list[dict[str, np.ndarray]]:
    """Wrap the real shard loader: per epoch, {url/key: image} of every sample the trainer was served."""
    epochs: list[dict[str, np.ndarray]] = []
    real = gkd.shard_loader

    def loader(*args, **kwargs):
        epochs.append({})
        for batch in real(*args, **kwargs):
            for url, key, image in zip(batch["urls"], batch["keys"], batch["images"], strict=True):
                epochs[-1][f"{url}/{key}"] = image.numpy()
            yield batch

    monkeypatch.setattr(gkd, "shard_loader", loader)
    return epochs


def test_gkd_loss_equals_a_hand_computed_soft_target_cross_entropy():
    # Row 1: z = ln[1, 2, 1] -> softmax [.25, .5, .25]; target [.5, .5, 0] smoothed by s = 0.3 over K = 3:
    # q = 0.7 p + 0.1 = [.45, .45, .10]; loss = -(.45 ln .25 + .45 ln .5 + .10 ln .25) = 1.55 ln 2.
    # Row 2: z = [0, 0, 0] -> uniform; loss = ln 3 whatever the target. The loss is the batch mean.
    z = torch.log(torch.tensor([[1.0, 2.0, 1.0], [1.0, 1.0, 1.0]]))
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    assert float(gkd_loss(z, p, 1.0, 0.3)) == pytest.approx((1.55 * math.log(2) + math.log(3)) / 2, rel=1e-6)
    # T = 2 divides the student logits: z / 2 = ln[1, √2, 1] -> softmax [1, √2, 1] / (2 + √2), so
    # loss = ln(2 + √2) - .45 ln √2 = 1.0719894...
    assert float(gkd_loss(z[:1], p[:1], 2.0, 0.3)) == pytest.approx(
        math.log(2 + math.sqrt(2)) - 0.45 * 0.5 * math.log(2), rel=1e-6
    )
    assert float(gkd_loss(z[:1], p[:1], 2.0, 0.3)) == pytest.approx(1.0719894, abs=1e-6)
    # T = 1, s = 0.1 is TCKR's CrossEntropyLoss(label_smoothing=0.1)(student_logits, soft).
    s, t = torch.randn(5, 4), torch.softmax(torch.randn(5, 4), 1)
    tckr = torch.nn.CrossEntropyLoss(label_smoothing=0.1)(s, t)
    assert torch.allclose(gkd_loss(s, t, 1.0, 0.1), tckr)


def test_batch_targets_online_stored_and_hard(pool, teacher):
    t = load_classifier(teacher)
    batch = next(iter(shard_loader(open_shard_folder(pool).urls[:1], 8, logits=True)))
    x = batch["images"]  # (8, 8, 8, 1) uint8, un-augmented
    with torch.no_grad():
        logits = t(x)  # (8, 10)
    # Stored logits are the teacher's on the un-augmented image (float16 in the tar).
    torch.testing.assert_close(batch["logits"], logits, atol=2e-2, rtol=2e-3)
    stored = batch_targets("stored", batch, x, None, 2.0, 10)
    torch.testing.assert_close(stored, torch.softmax(batch["logits"] / 2, 1))
    x_aug = x.flip(2)  # any other image: online labels come from the batch the student sees
    with torch.no_grad():
        torch.testing.assert_close(
            batch_targets("online", batch, x_aug, t, 1.0, 10), torch.softmax(t(x_aug), 1)
        )
    hard = batch_targets("hard", batch, x, None, 2.0, 10)
    assert torch.equal(hard, F.one_hot(batch["cls"], 10).float())


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (dict(labels="soft"), "labels must be one of online, stored, hard"),
        (dict(teacher=None), "labels 'online' needs a teacher"),
        (dict(temperature=0), "temperature must be a positive number"),
        (dict(workers=-1), "workers must be a non-negative integer"),
        (dict(loader="threads"), "loader must be one of auto, processes, in-process"),
        (dict(regenerate="fresh"), "regenerate must be one of pool, engine"),
        (dict(images_per_round=0), "images_per_round must be a positive integer"),
        (dict(epochs=0), "epochs must be a positive integer"),
        (dict(label_smoothing=1.0), r"label_smoothing must be in \[0, 1\)"),
        (dict(bss=True, teacher=None, labels="hard"), "bss needs a teacher classifier folder"),
        (dict(bss=True, bss_steps=0), r"bss.steps must be an integer in 1\.\.1000"),
        (dict(bss=True, bss_temperature=-1.0), r"bss.temperature must be a number in \(0, 1000\]"),
        (dict(bss="yes"), "bss must be true or false"),
    ],
)
def test_bad_config_is_one_line_error(teacher, changes, message):
    with pytest.raises(TckrError, match=message) as e:
        student(teacher, **changes).validate()
    assert "\n" not in str(e.value)


def test_shard_loader_streams_every_sample_once_with_exact_batch_counts(pool, monkeypatch):
    folder = open_shard_folder(pool)
    keys = {f"{s:06d}{i:05d}" for s in range(6) for i in range(20)}
    for workers in (0, 2):
        batches = list(shard_loader(folder.urls, 16, workers, shuffle_buffer=50, seed=3))
        got = [k for b in batches for k in b["keys"]]
        assert sorted(got) == sorted(keys) and len(batches) == epoch_batches(folder.nsamples, 16, workers)
        assert batches[0]["images"].dtype == torch.uint8 and batches[0]["images"].shape[1:] == (8, 8, 1)
    assert shard_loader(folder.urls[:2], 16, workers=5).num_workers == 2  # a worker per shard at most
    assert epoch_batches(folder.nsamples[:2], 16, workers=5) == 4  # 2 workers x ceil(20 / 16)

    def order(seed, buffer=50):
        return [k for b in shard_loader(folder.urls, 16, 0, buffer, seed) for k in b["keys"]]

    assert order(3) == order(3) and order(3) != order(4)  # seeded: the trainer passes one seed per epoch
    assert order(3, buffer=0) == sorted(keys)  # no shuffle: index order
    monkeypatch.setenv("RANK", "1")  # torchrun: webdataset's split_by_node gives rank 1 of 2 shards 1, 3, 5
    monkeypatch.setenv("WORLD_SIZE", "2")
    batches = list(shard_loader(folder.urls, 16, 0, 50, 0))
    assert {k[:6] for b in batches for k in b["keys"]} == {"000001", "000003", "000005"}
    assert len(batches) == epoch_batches(folder.nsamples, 16, 0, rank=1, world_size=2) == 4


def _webdataset_loader(urls, batch_size, workers, shuffle_buffer, seed, logits):
    """The loader as webdataset's own `WebDataset` (tarfile-based) pipeline builds it: the reference."""
    import functools

    import webdataset as wds

    from tckr_engine.train.stream import _collate, _decode

    ds = wds.WebDataset(
        list(urls),
        shardshuffle=len(urls) if shuffle_buffer else False,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        seed=seed,
        empty_check=False,
    )
    if shuffle_buffer:
        ds = ds.shuffle(shuffle_buffer, seed=seed)
    ds = ds.map(functools.partial(_decode, logits=logits)).batched(batch_size, collation_fn=_collate)
    return torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(workers, len(urls)))


@pytest.mark.parametrize("workers, buffer, logits", [(0, 0, False), (0, 50, True), (2, 30, True)])
def test_shard_loader_yields_webdatasets_own_batches(pool, workers, buffer, logits):
    urls = open_shard_folder(pool).urls
    ours = list(shard_loader(urls, 16, workers, buffer, 7, logits=logits))
    ref = list(_webdataset_loader(urls, 16, workers, buffer, 7, logits))
    assert len(ours) == len(ref) == epoch_batches([20] * 6, 16, workers)
    for a, b in zip(ours, ref, strict=True):
        assert a["keys"] == b["keys"] and a["urls"] == b["urls"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["cls"], b["cls"])
        assert not logits or torch.equal(a["logits"], b["logits"])


@pytest.mark.parametrize("workers, shards", [(2, 6), (3, 5)])
def test_streams_read_in_process_give_the_worker_processes_batches(pool, workers, shards):
    # 3 streams of 5 shards hold 40, 40 and 20 samples: the third runs out first and the others go on.
    urls = open_shard_folder(pool).urls[:shards]

    def read(in_process):
        torch.manual_seed(0)
        batches = list(shard_loader(urls, 16, workers, 30, 7, logits=True, in_process=in_process))
        return batches, torch.rand(4)  # the DataLoader draws a base seed from the global RNG either way

    (ours, after), (ref, ref_after) = read(True), read(False)
    assert len(ours) == len(ref) == epoch_batches([20] * shards, 16, workers)
    for a, b in zip(ours, ref, strict=True):
        assert a["keys"] == b["keys"] and a["urls"] == b["urls"]
        assert torch.equal(a["images"], b["images"]) and torch.equal(a["logits"], b["logits"])
    assert torch.equal(after, ref_after)


@pytest.mark.parametrize(
    "loader, device, workers, threads, cores, expected",
    [
        ("auto", "cpu", 2, 2, 2, True),  # worker processes would take turns with the training threads
        ("auto", "cpu", 2, 1, 2, True),
        ("auto", "cpu", 2, 2, 4, False),  # a spare core per stream
        ("auto", "cpu", 0, 1, 8, True),  # workers 0: always here
        ("auto", "cuda", 2, 2, 2, False),  # the GPU trains, the cores decode
        ("processes", "cpu", 2, 2, 2, False),
        ("in-process", "cuda", 2, 2, 16, True),
        ("processes", "cuda", 0, 2, 16, True),
    ],
)
def test_loader_auto_reads_in_process_when_cpu_training_leaves_no_core_spare(
    monkeypatch, loader, device, workers, threads, cores, expected
):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    assert loader_in_process(loader, device, workers, threads) is expected
    with pytest.raises(TckrError, match="loader must be one of"):
        loader_in_process("thread", device, workers, threads)


def _tar(path, members, fmt=tarfile.USTAR_FORMAT):
    with tarfile.open(path, "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def test_tar_reader_groups_files_like_webdataset(tmp_path):
    import webdataset as wds

    from tckr_engine.train.stream import _tar_samples

    deep = "d" * 90 + "/" + "e" * 60  # > 100 characters: stored with the ustar prefix field
    members = [
        ("a/b", None),  # a directory
        ("__index__", b"{}"),  # webdataset skips __...__ names
        ("__meta__/x.json", b"{}"),
        ("__m__.json", b"{}"),  # but not this one: a sample with key __m__
        ("README", b"no extension: no sample"),
        ("x1.png", b"P1"), ("x1.cls", b"3"), ("x1.txt", b"a shirt"), ("x1.logits.npy", b"L1"),
        ("x2.PNG", b"P2"), ("x2.cls", b""),
        (f"{deep}/x3.png", b"P3" * 700), (f"{deep}/x3.cls", b"1"),
        ("x4.txt", b"only a caption"),
    ]  # fmt: skip
    url = str(_tar(tmp_path / "s.tar", members))
    keep = frozenset({"png", "cls", "logits.npy"})
    with open(url, "rb") as f:
        ours = list(_tar_samples(iter([{"url": url, "stream": f}]), keep))
    ref = [
        {k: v for k, v in s.items() if k in keep or k in ("__key__", "__url__")}
        for s in wds.tariterators.tarfile_samples(iter([{"url": url}]))
    ]
    assert ours == ref and [s["__key__"] for s in ours] == ["__m__", "x1", "x2", f"{deep}/x3", "x4"]
    assert ours[3]["png"] == b"P3" * 700 and set(ours[4]) == {"__key__", "__url__"}


@pytest.mark.parametrize(
    "damage, message",
    [
        ("truncate-data", "ends inside"),
        ("truncate-header", "not a readable USTAR tar"),
        ("not-a-tar", "not a readable USTAR tar"),
        ("checksum", "bad checksum"),
        ("pax", "long-name tar records"),
        ("duplicate", "appears twice"),
        ("duplicate-unread", "appears twice"),  # of an extension the loader does not keep
    ],
)
def test_tar_reader_refuses_damaged_or_foreign_tars(tmp_path, damage, message):
    from tckr_engine.train.stream import _tar_samples

    members = [("k1.png", b"x" * 600), ("k1.cls", b"1"), ("k2.png", b"y" * 600), ("k2.cls", b"2")]
    if damage == "duplicate":
        members.append(("k2.cls", b"3"))
    elif damage == "duplicate-unread":
        members += [("k2.txt", b"a"), ("k2.txt", b"b")]
    path = _tar(tmp_path / "s.tar", members if damage != "pax" else [("p" * 120 + ".png", b"z")],
                tarfile.PAX_FORMAT if damage == "pax" else tarfile.USTAR_FORMAT)  # fmt: skip
    data = path.read_bytes()
    if damage == "truncate-data":
        data = data[: 512 * 6 + 100]  # inside the data of k2.png (k1: 512 + 1024, 512 + 512)
    elif damage == "truncate-header":
        data = data[: 512 * 5 + 100]  # inside the header of k2.png
    elif damage == "not-a-tar":
        data = b"PK\x03\x04" + bytes(2000)
    elif damage == "checksum":
        data = data[:10] + b"Z" + data[11:]  # a byte of the first member's name
    path.write_bytes(data)
    with pytest.raises(TckrError, match=message) as e, open(path, "rb") as f:
        list(_tar_samples(iter([{"url": str(path), "stream": f}]), frozenset({"png", "cls"})))
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "array",
    [
        np.arange(10, dtype=np.float16),
        np.zeros((3, 4), np.float32),
        np.asfortranarray(np.ones((3, 4))),  # left to np.load
        np.array(5.0),
        np.arange(6, dtype=">i4"),
    ],
)
def test_npy_fast_path_equals_np_load(array):
    from tckr_engine.train.stream import _load_npy

    buf = io.BytesIO()
    np.save(buf, array)
    got = _load_npy(buf.getvalue())
    assert got.dtype == array.dtype and got.shape == array.shape and np.array_equal(got, array)
    with pytest.raises(ValueError):  # a truncated file is np.load's error, not a short array
        _load_npy(buf.getvalue()[:-2])


def test_pool_rounds_are_disjoint_and_a_small_pool_is_refused(pool, tmp_path):
    folder = open_shard_folder(pool)
    plan = plan_rounds(folder, epochs=5, every=2, mode="pool", images_per_round=30, regen_dir=tmp_path)
    assert [r.epochs for r in plan] == [(1, 2), (3, 4), (5,)]
    assert [r.urls for r in plan] == [folder.urls[0:2], folder.urls[2:4], folder.urls[4:6]]  # 30 -> 2 shards
    assert [r.images for r in plan] == [40, 40, 40] and not any(r.generated for r in plan)
    equal_share = plan_rounds(folder, 6, 2, "pool", None, tmp_path)  # 3 rounds, no size given: 2 shards each
    assert [len(r.urls) for r in equal_share] == [2, 2, 2]
    assert len(set().union(*(r.urls for r in equal_share))) == 6  # disjoint
    assert plan_rounds(folder, 20, 0, "pool", None, tmp_path)[0].urls == folder.urls  # no regeneration
    # 1 + (7 - 1) // 2 = 4 rounds of 2 shards = 8 shards; the pool holds 6.
    with pytest.raises(TckrError, match=r"too small: it holds 6 shard.*4 round.*need 8") as e:
        plan_rounds(folder, epochs=7, every=2, mode="pool", images_per_round=40, regen_dir=tmp_path)
    assert "\n" not in str(e.value)
    engine = plan_rounds(folder, epochs=3, every=1, mode="engine", images_per_round=30, regen_dir=tmp_path)
    assert engine[0].urls == folder.urls[:2] and [r.generated for r in engine] == [False, True, True]
    round2 = tmp_path.resolve() / "round-002/shards"
    assert engine[2].urls == (str(round2 / "000000.tar"), str(round2 / "000001.tar"))  # as many as round 0
    assert engine[2].nsamples == (20, 20) and engine[2].epochs == (3,)


def test_pool_regeneration_serves_a_fresh_disjoint_subset_each_round(pool, teacher, tmp_path, monkeypatch):
    seen = record_loader(monkeypatch)
    cfg = student(teacher, epochs=3, regenerate_every=1, images_per_round=40)
    metrics = train_student(cfg, pool, tmp_path / "s")
    assert len(seen) == 3 and all(len(epoch) == 40 for epoch in seen)
    assert (
        not set(seen[0]) & set(seen[1])
        and not set(seen[1]) & set(seen[2])
        and not set(seen[0]) & set(seen[2])
    )
    rounds = metrics["regeneration"]["rounds"]
    for epoch, r in zip(seen, rounds, strict=True):
        assert {k.rsplit("/", 1)[0] for k in epoch} == set(r["shards"])  # served exactly the planned shards
    log = [json.loads(line) for line in (tmp_path / "s/train_log.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["round"], r["samples"]) for r in log] == [(1, 0, 40), (2, 1, 40), (3, 2, 40)]
    # Four rounds of 40 images need 8 shards of 20; refused before anything is written.
    with pytest.raises(TckrError, match="too small"):
        train_student(
            student(teacher, epochs=4, regenerate_every=1, images_per_round=40), pool, tmp_path / "x"
        )
    assert not (tmp_path / "x").exists()


def test_engine_regeneration_generates_new_images_per_round(pool, teacher, tmp_path, monkeypatch):
    seen = record_loader(monkeypatch)
    cfg = student(
        teacher, labels="stored", epochs=2, regenerate="engine", regenerate_every=1, images_per_round=20
    )
    metrics = train_student(cfg, pool, tmp_path / "s")
    round1 = tmp_path / "s/regen/round-001"
    assert json.loads((round1 / "run.json").read_text())["spec"]["seed"] == 1  # the pool's seed + 1
    first = {k.rsplit("/", 1)[1]: v for k, v in seen[0].items()}
    second = {k.rsplit("/", 1)[1]: v for k, v in seen[1].items()}
    assert len(first) == len(second) == 20 and set(first) == set(second)  # same keys in another folder ...
    assert all(k.startswith(str(round1)) for k in seen[1])
    assert sum(not np.array_equal(first[k], second[k]) for k in first) >= 15  # ... holding new images
    assert [r["generated"] for r in metrics["regeneration"]["rounds"]] == [False, True]
    # A finished round folder is reused as is (resume), not generated again.
    stats = round1 / "shards/000000_stats.json"
    before = stats.stat().st_mtime_ns
    plan = plan_rounds(open_shard_folder(pool), 2, 1, "engine", 20, tmp_path / "s/regen")
    ensure_round(plan[1], open_shard_folder(pool))
    assert stats.stat().st_mtime_ns == before


@pytest.mark.parametrize("labels", ["online", "stored", "hard"])
def test_every_label_mode_trains_end_to_end(pool, teacher, tmp_path, labels):
    calls = []
    metrics = train_student(
        student(teacher, labels=labels), pool, tmp_path / "s", progress=lambda *a: calls.append(a)
    )
    out = tmp_path / "s"
    assert all((out / name).is_file() for name in OUTPUTS)
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
    assert metrics["labels"] == labels and metrics["best_epoch"] == 1 and metrics["steps"] == 8 == len(calls)
    assert metrics["train_samples"] == 120 and metrics["samples_per_sec"] > 0 and metrics["num_test"] == 359
    assert [c[:2] for c in calls] == [(i, 8) for i in range(1, 9)] and all(c[3] > 0 for c in calls)
    assert metrics["teacher"] == (str(teacher) if labels == "online" else None)
    test = load_dataset("digits", "test")
    assert evaluate_accuracy(load_classifier(out), test) == metrics["test_accuracy"]  # the selected weights


def test_teacher_labels_the_augmented_batch_and_every_epoch_reshuffles(pool, teacher, tmp_path, monkeypatch):
    seen = record_loader(monkeypatch)
    raw, labelled, trained = [], [], []
    real_targets, real_loss = gkd.batch_targets, gkd.batch_loss

    def targets(labels, batch, x_aug, *args):
        raw.append(batch["images"].clone())
        labelled.append(x_aug.clone())
        return real_targets(labels, batch, x_aug, *args)

    def loss(model, x_aug, *args):
        trained.append(x_aug.clone())
        return real_loss(model, x_aug, *args)

    monkeypatch.setattr(gkd, "batch_targets", targets)
    monkeypatch.setattr(gkd, "batch_loss", loss)
    train_student(student(teacher, epochs=2), pool, tmp_path / "s")
    assert len(trained) == len(labelled) == 16
    assert all(torch.equal(a, b) for a, b in zip(labelled, trained, strict=True))  # the teacher sees x_aug
    assert sum(not torch.equal(a, b) for a, b in zip(raw, trained, strict=True)) == 16  # shifted
    assert set(seen[0]) == set(seen[1]) and list(seen[0]) != list(seen[1])  # a new order every epoch


class Interrupt(Exception):
    pass


def test_resume_after_interruption_ends_like_an_uninterrupted_run(pool, teacher, tmp_path):
    # Two shard streams read by DataLoader worker processes; the resumed run reads them in this process
    # (`loader` moves the same batches, so it may change) and must still end bit for bit as the reference.
    cfg = student(teacher, epochs=2, workers=2, loader="processes")
    ref = train_student(cfg, pool, tmp_path / "ref")
    assert ref["shard_loader"] == "processes"

    def stop_in_epoch_2(done, total, loss, rate):
        if done > total // 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_student(cfg, pool, tmp_path / "s", progress=stop_in_epoch_2)
    assert not (tmp_path / "s/metrics.json").exists() and (tmp_path / "s/checkpoint.pt").is_file()
    with pytest.raises(TckrError, match=r"unfinished run with other settings \(changed: lr\)"):
        train_student(student(teacher, epochs=2, workers=2, lr=2e-3), pool, tmp_path / "s")
    resumed = train_student(dataclasses.replace(cfg, loader="in-process"), pool, tmp_path / "s")
    assert resumed["shard_loader"] == "in-process"
    for key in ("val_accuracy", "test_accuracy", "best_epoch", "train_samples", "steps"):
        assert resumed[key] == ref[key]
    log = [json.loads(line)["epoch"] for line in (tmp_path / "s/train_log.jsonl").read_text().splitlines()]
    assert log == [1, 2]
    a = torch.load(tmp_path / "ref/checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "s/checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # bit-identical final weights
    ref_best, best = (
        load_file(str(tmp_path / "ref/model.safetensors")),
        load_file(str(tmp_path / "s/model.safetensors")),
    )
    assert all(torch.equal(ref_best[k], best[k]) for k in ref_best)
    with pytest.raises(TckrError, match="already holds a finished run"):
        train_student(cfg, pool, tmp_path / "s")


def test_class_name_mismatch_is_refused(pool, teacher, tmp_path):
    bad = tmp_path / "pool"
    shutil.copytree(pool, bad)
    run = json.loads((bad / "run.json").read_text())
    run["spec"]["classes"] = sorted(run["spec"]["classes"], key=lambda c: -int(c))  # same names, other order
    (bad / "run.json").write_text(json.dumps(run))
    with pytest.raises(TckrError, match="differ from the real dataset's") as e:
        train_student(student(teacher), bad, tmp_path / "s")
    assert "\n" not in str(e.value) and not (tmp_path / "s").exists()


@pytest.mark.parametrize("in_process", [False, True])
def test_a_shard_that_breaks_while_streaming_is_one_line_either_way(pool, tmp_path, in_process):
    # A tar that changed after the folder check (open_shard_folder compares sha256s): one image garbled.
    bad = tmp_path / "000000.tar"
    shutil.copy(open_shard_folder(pool).urls[0], bad)
    with tarfile.open(bad) as tar:
        png = next(m for m in tar.getmembers() if m.name.endswith(".png"))
    with bad.open("r+b") as f:
        f.seek(png.offset_data)
        f.write(b"x" * png.size)
    loader = shard_loader([bad], 8, workers=1, in_process=in_process)  # 1 DataLoader worker, or none
    with pytest.raises(TckrError, match=r"cannot read the shards of FOLDER: .*cannot identify image") as e:
        list(iterate_batches(loader, "FOLDER"))
    assert "\n" not in str(e.value) and "tckr-engine verify FOLDER" in str(e.value)


def test_missing_unfinished_or_corrupt_shard_folder_is_refused(pool, teacher, tmp_path):
    with pytest.raises(TckrError, match="shard folder not found"):
        train_student(student(teacher), tmp_path / "nowhere", tmp_path / "s")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(pool, unfinished)
    (unfinished / "index.json").unlink()
    with pytest.raises(TckrError, match=r"no valid index\.json: the folder is unfinished"):
        train_student(student(teacher), unfinished, tmp_path / "s")
    corrupt = tmp_path / "corrupt"
    shutil.copytree(pool, corrupt)
    tar = corrupt / "shards/000002.tar"
    tar.write_bytes(tar.read_bytes()[:1000])
    with pytest.raises(TckrError, match=r"000002.tar is not usable \(size .* disagrees"):
        train_student(student(teacher), corrupt, tmp_path / "s")
    assert not (tmp_path / "s").exists()


@pytest.fixture(scope="module")
def real20(tmp_path_factory):
    """20 % of the real digits train side (seed 0, val_fraction 0.1) as a shard folder."""
    out = tmp_path_factory.mktemp("gkd-real") / "real20"
    write_real_shards("digits", out, fraction=0.2, shard_size=128)
    return out


def test_real_shards_hold_a_seeded_fraction_of_the_train_side_only(real20, tmp_path):
    full = load_dataset("digits", "train")
    train_idx, val_idx = train_val_split(full.labels, 0.1, seed=0)
    idx, pool = real_subset("digits", 0.2)
    assert pool == len(train_idx) and len(idx) == round(0.2 * pool) and not set(idx) & set(val_idx)
    assert len(set(idx)) == len(idx) and np.array_equal(idx, real_subset("digits", 0.2)[0])  # seeded
    folder = open_shard_folder(real20)
    assert sum(folder.nsamples) == len(idx) and folder.classes == full.classes
    batch = next(iter(shard_loader(folder.urls, 1000)))  # index order: the subset's order
    assert np.array_equal(batch["images"].numpy(), full.images[idx])
    assert np.array_equal(batch["cls"].numpy(), full.labels[idx])
    assert verify(real20) == []  # what `tckr-engine verify` checks
    other = write_real_shards("digits", tmp_path / "s1", fraction=0.2, seed=1, shard_size=128)
    assert other["spec"]["num_images"] == len(idx)  # same size, other images (another split and order)
    with pytest.raises(TckrError, match="holds another shard folder"):
        write_real_shards("digits", real20, fraction=0.5, shard_size=128)
    with pytest.raises(TckrError, match=r"fraction must be in \(0, 1\]"):
        write_real_shards("digits", tmp_path / "x", fraction=0)


def soft_ce(t, s, T):  # -mean_i sum_c softmax(t_i / T)_c log softmax(s_i / T)_c, written out
    p = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    return -(p * torch.log(torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True))).sum(1).mean()


def test_bss_batch_loss_is_ce_plus_weighted_soft_terms(teacher, real20):
    t = load_classifier(teacher)
    s = load_classifier(teacher).train()  # a student that agrees with the teacher: base samples exist
    torch.manual_seed(0)
    for p in s.parameters():  # ... but not exactly, so every term is non-trivial
        p.data += 0.05 * torch.randn_like(p)
    batch = next(iter(shard_loader(open_shard_folder(real20).urls, 48)))
    x, y = batch["images"], batch["cls"]  # (48, 8, 8, 1) uint8, (48,)
    cfg = student(teacher, bss=True, bss_attack_size=16, bss_steps=3, bss_temperature=2.0)
    with torch.no_grad():
        tl = t(x)  # (48, 10)
    # beta = 0: no attack; loss = CE(s(x), y) + alpha * softCE_T(t(x), s(x)).
    step = BSSBatch(t, tl, y, 2.5, 0.0, torch.Generator().manual_seed(1))
    loss, logits = batch_loss(s, x, None, cfg, step)
    want = F.cross_entropy(logits, y) + 2.5 * soft_ce(tl, logits, 2.0)
    assert step.samples == 0 and float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    # beta > 0: + beta * softCE_T(t(x_adv), s(x_adv)) on the boundary samples of the same seeded draw.
    step = BSSBatch(t, tl, y, 2.5, 1.5, torch.Generator().manual_seed(1))
    loss, logits = batch_loss(s, x, None, cfg, step)
    x_adv, info = boundary_samples(
        t, None, x, y, cfg=cfg.bss_config(), teacher_logits=tl, student_logits=logits.detach(),
        generator=torch.Generator().manual_seed(1),
    )  # fmt: skip
    assert step.samples == len(x_adv) > 0 and len(x_adv) <= 16
    want = F.cross_entropy(logits, y) + 2.5 * soft_ce(tl, logits, 2.0)
    want = want + 1.5 * soft_ce(info.teacher_logits, s(x_adv), 2.0)
    assert float(loss.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    s.zero_grad()
    loss.backward()
    assert all(p.grad is not None for p in s.parameters()) and all(p.grad is None for p in t.parameters())


def test_bss_training_follows_the_schedule_and_records_its_settings(teacher, real20, tmp_path):
    cfg = student(teacher, bss=True, epochs=4, bss_attack_size=8, bss_steps=2, labels="hard")
    metrics = train_student(cfg, real20, tmp_path / "s")
    assert all((tmp_path / "s" / name).is_file() for name in OUTPUTS)
    log = [json.loads(line) for line in (tmp_path / "s/train_log.jsonl").read_text().splitlines()]
    bcfg = BSSConfig(attack_size=8, steps=2)
    want = [bss_schedule(e / 4, bcfg) for e in (1, 2, 3, 4)]  # alpha 4 -> 1, beta 2 -> 0 at 75 %
    assert [(r["bss_alpha"], r["bss_beta"]) for r in log] == want
    assert want == [(3.25, 2 * (1 - 1 / 3)), (2.5, 2 * (1 - 2 / 3)), (1.75, 0.0), (1.0, 0.0)]
    steps = -(-len(real_subset("digits", 0.2)[0]) // 16)
    assert all(0 <= r["bss_samples"] <= 8 * steps for r in log) and [r["bss_samples"] for r in log][2:] == [
        0,
        0,
    ]
    bss = json.loads((tmp_path / "s/metrics.json").read_text())["bss"]
    assert (
        bss == metrics["bss"] and bss["attack_size"] == 8 and bss["steps"] == 2 and bss["temperature"] == 3.0
    )
    assert bss["alpha"] == [3.25, 2.5, 1.75, 1.0] and bss["beta"] == [1.333333, 0.666667, 0.0, 0.0]
    assert metrics["teacher"] == str(teacher)  # the teacher labels online even with labels 'hard'
    assert metrics["config"]["bss"] is True and metrics["test_accuracy"] > 0
    plain = train_student(student(teacher, epochs=1), real20, tmp_path / "plain")
    assert plain["bss"] is None
