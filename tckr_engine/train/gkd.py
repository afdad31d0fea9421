"""The lean GKD student trainer (DESIGN.md "The trainer"; REFERENCE.md §1.5 and §2).

Streams a synthetic shard folder with webdataset (`train/stream.py`), augments each uint8 batch (random
shift, flip except for digits), labels it, and trains on soft-target cross-entropy with label smoothing:
- labels "online" (TCKR, the default): the teacher, in eval mode and without gradients, labels the
  *augmented* batch, `soft = softmax(teacher(x_aug) / T)`;
- labels "stored": `soft = softmax(logits.npy / T)` from the shards (computed on the un-augmented image);
- labels "hard": the shard's class index, one-hot (the ablation; T does not apply).
The loss terms - GKD's soft-target cross-entropy, BSS's - are in `train/losses.py`. With BSS (`bss`),
(α, β) = `bss_schedule(epoch / epochs)`, evaluated once per epoch with epochs counted from 1, as the
reference: with E epochs, β > 0 only in epochs < 0.75·E (e.g. E = 4: β = 4/3, 2/3, 0, 0) and no attack
runs when β = 0. Target classes are drawn from a generator seeded per epoch, so a resume is exact.

Regeneration every R epochs (`regenerate_every`): "pool" reads a disjoint subset of the shard folder each
round, "engine" generates a new folder per round with the pool's recorded run and seed + round into
`OUT/regen/round-XXX/` (a finished one is reused on resume). See `shard_folders.plan_rounds`.

Model selection on a validation split of the real train set (never test); the test split is read once at
the end to score the selected weights. Output folder: `model.safetensors` + `classifier.json` (best epoch),
`train_log.jsonl`, `checkpoint.pt` (end of every epoch) and `metrics.json`, written last.

Resume guarantee: every source of randomness is seeded per epoch from (seed, epoch) - data order, the
augmentation generator - or restored from the checkpoint (model, optimiser, schedule, torch's global RNG),
so on the same machine, device, thread count and `workers` a resumed run produces the same weights and
metrics as an uninterrupted one (bit-identical on CPU; GPU kernels may be non-deterministic). `loader` (where
the shard streams are read) changes the speed only: the batches are the same either way.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tckr_engine.allocator import keep_freed_memory
from tckr_engine.config import check_positive
from tckr_engine.data import ImageDataset, load_dataset, train_val_split
from tckr_engine.engine.scheduler import sample_seed
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write, write_json
from tckr_engine.models.classifier import (
    RUN_LOG_NAME,
    RUN_METRICS_NAME,
    Classifier,
    count_parameters,
    load_classifier,
    save_classifier,
)
from tckr_engine.synth.bss import BSSConfig, bss_schedule
from tckr_engine.train.fit import cosine_lambda, evaluate_accuracy, random_shift_flip
from tckr_engine.train.losses import BSSBatch, batch_loss, batch_targets
from tckr_engine.train.shard_folders import (
    REGEN_DIR,
    Round,
    ShardFolder,
    ensure_round,
    open_shard_folder,
    plan_rounds,
    round_of_epoch,
)
from tckr_engine.train.stream import (
    LOADERS,
    epoch_batches,
    iterate_batches,
    loader_in_process,
    loader_note,
    shard_loader,
)
from tckr_engine.train.teacher import TeacherConfig

log = logging.getLogger(__name__)

METRICS_NAME = RUN_METRICS_NAME
LOG_NAME = RUN_LOG_NAME
CHECKPOINT_NAME = "checkpoint.pt"
_OUTPUTS = (METRICS_NAME, LOG_NAME, "model.safetensors", "classifier.json", CHECKPOINT_NAME)
LABELS = ("online", "stored", "hard")
BSS_SALT = 0xB55  # target-class generator seeds differ from the augmentation's
REGENERATE = ("pool", "engine")
# (done steps, total steps, running train loss of the epoch, training samples per second) after every step.
Progress = Callable[[int, int, float, float], None]


@dataclass
class StudentConfig:
    """Student (GKD) training settings; `validate()` turns bad values into one-line `TckrError`s."""

    arch: str = "resnet-small"  # small-cnn | resnet-small | timm:<name>
    dataset: str | None = None  # real dataset for validation and test; None: the one the shards name
    teacher: str | None = None  # classifier folder; needed by labels "online", unused otherwise
    labels: str = "online"  # online | stored | hard (see the module docstring)
    temperature: float = 1.0  # TCKR uses 1
    label_smoothing: float = 0.1  # REFERENCE §1.5
    epochs: int = 20
    batch_size: int = 128
    lr: float = 1e-3  # REFERENCE §1.6 (AdamW, cosine per step)
    weight_decay: float = 5e-5  # REFERENCE §1.6
    regenerate: str = "pool"  # pool: disjoint shard subsets of the folder | engine: new shards per round
    regenerate_every: int = 0  # R epochs per round; 0: one round for the whole run
    images_per_round: int | None = None  # rounded up to whole shards; None: the folder or an equal share
    val_fraction: float = 0.1  # of the real train split; the best epoch is chosen on it, never on test
    shift: int | None = None  # max random shift in px; None: H // 10 clamped to 1..4 (as the teacher)
    hflip: bool | None = None  # random horizontal flips; None: on, except for 'digits' (not mirror-safe)
    width: int | None = None  # base width of small-cnn / resnet-small; None: the architecture's default
    workers: int = 2  # shard streams decoded in parallel (their number fixes the batch order); 0, 1: one
    loader: str = "auto"  # auto | processes (DataLoader workers) | in-process: where the streams are read;
    # the same batches either way; auto: in-process when CPU training leaves no core per stream spare
    shuffle_buffer: int = 2000  # samples in webdataset's shuffle buffer; 0: no shuffling (index order)
    seed: int = 0  # weight init, data order and augmentation
    threads: int | None = None  # torch CPU threads; None: torch's default
    device: str = "cpu"  # cpu | cuda
    eval_batch_size: int = 512
    bss: bool = False  # add boundary-supporting samples (REFERENCE §4): needs a teacher; see the docstring
    bss_attack_size: int = 64  # base samples attacked per batch (reference: 64 of 256)
    bss_steps: int = 10  # attack steps (reference)
    bss_step_size: float = 0.3  # L2-normalised attack step (reference)
    bss_temperature: float = 3.0  # T of both BSS soft cross-entropies (reference)
    bss_beta: float = 2.0  # β at the start of training (reference 2); 0: the BSS recipe without its BSS term

    def validate(self) -> StudentConfig:
        """Check every field; raise a one-line TckrError naming the first bad one. Returns self."""
        shared = ("arch", "epochs", "batch_size", "lr", "weight_decay", "label_smoothing", "val_fraction")
        shared += ("shift", "hflip", "width", "seed", "threads", "device", "eval_batch_size")
        TeacherConfig(**{k: getattr(self, k) for k in shared}).validate()  # same names, same rules
        if self.labels not in LABELS:
            raise TckrError(f"labels must be one of {', '.join(LABELS)}, got {self.labels!r}")
        if self.labels == "online" and not self.teacher:
            raise TckrError("labels 'online' needs a teacher classifier folder (--teacher)")
        if self.loader not in LOADERS:
            raise TckrError(f"loader must be one of {', '.join(LOADERS)}, got {self.loader!r}")
        if self.regenerate not in REGENERATE:
            raise TckrError(f"regenerate must be one of {', '.join(REGENERATE)}, got {self.regenerate!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < math.inf:
            raise TckrError(f"temperature must be a positive number, got {t!r}")
        for name in ("regenerate_every", "workers", "shuffle_buffer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise TckrError(f"{name} must be a non-negative integer, got {value!r}")
        if self.images_per_round is not None:
            check_positive("images_per_round", self.images_per_round)
        if self.dataset is not None and (not isinstance(self.dataset, str) or not self.dataset):
            raise TckrError(f"dataset must be a dataset name or folder, got {self.dataset!r}")
        if not isinstance(self.bss, bool):
            raise TckrError(f"bss must be true or false, got {self.bss!r}")
        if self.bss and not self.teacher:
            raise TckrError(
                "bss needs a teacher classifier folder (--teacher): it labels and attacks batches"
            )
        self.bss_config()
        return self

    def result_settings(self) -> dict[str, Any]:
        """The fields that decide the trained weights (all but `loader`, which moves the same batches faster
        or slower): what a resume must share with the interrupted run, and the pipeline's fingerprint."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "loader"}

    def bss_config(self) -> BSSConfig:
        """The BSSConfig of the bss_* fields (validated; reference values for everything else)."""
        return BSSConfig(
            attack_size=self.bss_attack_size,
            steps=self.bss_steps,
            step_size=self.bss_step_size,
            temperature=self.bss_temperature,
            beta_start=self.bss_beta,
            candidates=max(self.bss_attack_size, BSSConfig.candidates),
        ).validate()


def _identity(cfg: StudentConfig, pool: ShardFolder) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one."""
    return {"config": cfg.result_settings(), "shards": str(pool.path)}


def _prepare_out(out: Path, overwrite: bool, identity: dict[str, Any]) -> dict[str, Any] | None:
    """Refuse a finished folder (unless overwrite); return the checkpoint of an unfinished one to resume."""
    if (out / METRICS_NAME).exists() and not overwrite:
        raise TckrError(
            f"{out} already holds a finished run ({METRICS_NAME}); choose a new folder or --overwrite"
        )
    ckpt_path = out / CHECKPOINT_NAME
    if ckpt_path.exists() and not overwrite:
        try:
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated or foreign file: torch raises several types
            raise TckrError(f"cannot read {ckpt_path} ({type(e).__name__}); rerun with --overwrite") from None
        if ckpt.get("identity") != identity:
            old, new = ckpt.get("identity", {}), identity
            changed = [k for k in new["config"] if old.get("config", {}).get(k) != new["config"][k]]
            changed += ["shards"] if old.get("shards") != new["shards"] else []
            what = ", ".join(changed) or "format"
            raise TckrError(
                f"{out} holds an unfinished run with other settings (changed: {what}); "
                "use the same settings to resume, a new folder, or --overwrite"
            )
        return ckpt
    for name in _OUTPUTS:  # metrics.json first, so a half-deleted folder never looks finished
        if (out / name).exists():
            (out / name).unlink()
    if overwrite:
        shutil.rmtree(out / REGEN_DIR, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _save_checkpoint(out: Path, state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(out / CHECKPOINT_NAME, buf.getvalue())


def _check_inputs(cfg: StudentConfig, pool: ShardFolder, classes: tuple[str, ...], shape: tuple) -> None:
    """Class-index alignment (REFERENCE §1 pitfall), image size, stored logits."""
    if pool.classes != classes:
        raise TckrError(
            f"shard classes {list(pool.classes)} in {pool.path} differ from the real dataset's "
            f"{list(classes)} (names and order must match: shards store the real dataset's class indices); "
            "pass the matching --dataset or regenerate the shards for it"
        )
    gen = pool.spec.get("generator") or {}
    if "image_size" in gen and (gen["image_size"], gen.get("channels")) != (shape[0], shape[2]):
        raise TckrError(
            f"shards in {pool.path} hold {gen['image_size']}px x {gen.get('channels')} channel images, "
            f"the real dataset {shape[0]}px x {shape[2]}; pass the dataset the shards were generated for"
        )
    if cfg.labels == "stored" and not pool.spec.get("teacher"):
        raise TckrError(
            f"labels 'stored' needs teacher logits in the shards, but {pool.path} was generated without "
            "--teacher; use labels 'online' with --teacher, or regenerate the shards with one"
        )


def _load_teacher(
    cfg: StudentConfig, classes: tuple[str, ...], shape: tuple, device: torch.device
) -> Classifier:
    teacher = load_classifier(cfg.teacher).to(device).eval().requires_grad_(False)
    if teacher.classes != classes:
        raise TckrError(f"teacher {cfg.teacher} classes {list(teacher.classes)} differ from {list(classes)}")
    tc = teacher.config
    if (tc["image_size"], tc["in_channels"]) != (shape[0], shape[2]):
        raise TckrError(
            f"teacher {cfg.teacher} expects {tc['image_size']}px x {tc['in_channels']} channels, the data is "
            f"{shape[0]}px x {shape[2]}; pick a teacher trained on this dataset"
        )
    return teacher


def _train_epoch(
    cfg: StudentConfig,
    model: Classifier,
    teacher: Classifier | None,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    batches: Iterator[dict[str, Any]],
    aug: torch.Generator,
    shape: tuple[int, int, int],
    shift: int,
    hflip: bool,
    num_classes: int,
    report: Callable[[int, float, float], None],
    bss: tuple[float, float, torch.Generator] | None = None,
) -> tuple[float, int, int, int]:
    """One pass over `batches`; returns (summed loss, correct vs the shard class, samples, BSS samples).

    `bss` = (α, β, target generator) of this epoch turns the BSS loss on."""
    device = model_device(model)
    model.train()
    loss_sum, correct, seen, adv, t0 = 0.0, 0, 0, 0, time.perf_counter()
    for batch in batches:
        images = batch["images"]  # (B, H, W, C) uint8
        if tuple(images.shape[1:]) != shape:
            raise TckrError(f"shard images are {tuple(images.shape[1:])}, the real data {shape}")
        x = random_shift_flip(images, shift, hflip, aug).to(device)  # (B, H, W, C) uint8
        if bss is None:
            target = batch_targets(cfg.labels, batch, x, teacher, cfg.temperature, num_classes)  # (B, K)
            loss, logits = batch_loss(model, x, target, cfg)
        else:
            assert teacher is not None
            y = batch["cls"]  # (B,) int64
            if int(y.max()) >= num_classes or int(y.min()) < 0:
                raise TckrError(f"shard class index {int(y.max())} is out of range for {num_classes} classes")
            with torch.no_grad():
                t_logits = teacher(x)  # (B, K) on the augmented batch
            step = BSSBatch(teacher, t_logits, y.to(device), *bss)
            loss, logits = batch_loss(model, x, None, cfg, step)
            adv += step.samples
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        # One host sync per step is fine here: the step itself is milliseconds to seconds on CPU.
        loss_sum += float(loss.detach()) * len(images)
        correct += int((logits.detach().argmax(1).cpu() == batch["cls"]).sum())
        seen += len(images)
        report(seen, loss_sum / seen, time.perf_counter() - t0)
    return loss_sum, correct, seen, adv


def _fit(
    cfg: StudentConfig,
    model: Classifier,
    teacher: Classifier | None,
    pool: ShardFolder,
    plan: list[Round],
    val: ImageDataset,
    out: Path,
    ckpt: dict[str, Any] | None,
    aug_spec: tuple[int, bool],
    progress: Progress | None,
    in_process: bool,
) -> dict[str, Any]:
    """The epoch loop (resumed from `ckpt` when given); returns the run state (best epoch, curves, speed)."""
    every, (shift, hflip), shape = cfg.regenerate_every, aug_spec, tuple(val.images.shape[1:])
    # Steps per epoch are exact (per-worker partial batches included), so the cosine ends at zero.
    from webdataset.utils import pytorch_worker_info

    rank, world = pytorch_worker_info()[:2]
    total = sum(
        epoch_batches(plan[round_of_epoch(e, every)].nsamples, cfg.batch_size, cfg.workers, rank, world)
        for e in range(1, cfg.epochs + 1)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_lambda(total))  # per optimiser step, whole run
    state: dict[str, Any] = {"epoch": 0, "done": 0, "best_epoch": 0, "best_acc": -1.0, "val_acc": []}
    state |= {"train_samples": 0, "train_seconds": 0.0, "steps": total}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["rng"])
        if ckpt.get("cuda_rng") and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
        state = {k: ckpt[k] for k in state}
        lines = (out / LOG_NAME).read_text().splitlines() if (out / LOG_NAME).exists() else []
        # A crash between the log line and the checkpoint leaves a line for an epoch that will run again.
        kept = [ln for ln in lines if json.loads(ln)["epoch"] <= state["epoch"]]
        atomic_write(out / LOG_NAME, "".join(ln + "\n" for ln in kept).encode())
        log.info("resuming %s after epoch %d of %d", out, state["epoch"], cfg.epochs)

    def report(seen: int, loss: float, seconds: float) -> None:  # after every step
        state["done"] += 1
        if progress is not None:
            rate = (state["train_samples"] + seen) / (state["train_seconds"] + seconds)
            progress(state["done"], total, loss, rate)

    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        rnd = plan[round_of_epoch(epoch, every)]
        ensure_round(rnd, pool)
        eseed = sample_seed(cfg.seed, epoch)  # data order and augmentation of this epoch: resume-stable
        loader = shard_loader(
            rnd.urls, cfg.batch_size, cfg.workers, cfg.shuffle_buffer, eseed,
            logits=cfg.labels == "stored", in_process=in_process,
        )  # fmt: skip
        aug = torch.Generator().manual_seed(eseed)
        bss = None
        if cfg.bss:  # the reference's per-epoch schedule, epochs counted from 1
            alpha, beta = bss_schedule(epoch / cfg.epochs, cfg.bss_config())
            bss = (alpha, beta, torch.Generator().manual_seed(eseed ^ BSS_SALT))
        t_epoch = time.perf_counter()
        loss_sum, correct, seen, adv = _train_epoch(
            cfg, model, teacher, opt, sched, iterate_batches(loader, rnd.folder), aug, shape, shift, hflip,
            len(val.classes), report, bss,
        )  # fmt: skip
        seconds = time.perf_counter() - t_epoch
        state["train_samples"] += seen
        state["train_seconds"] += seconds
        acc = evaluate_accuracy(model, val, cfg.eval_batch_size)
        state["val_acc"].append(acc)
        state["epoch"] = epoch
        if acc > state["best_acc"]:  # strictly better: the earliest epoch wins ties
            state["best_epoch"], state["best_acc"] = epoch, acc
            save_classifier(model, out)
        line = {
            "epoch": epoch,
            "round": rnd.index,
            "samples": seen,
            "train_loss": round(loss_sum / max(seen, 1), 5),
            "train_accuracy": round(correct / max(seen, 1), 5),  # argmax vs the shard's class
            "val_accuracy": round(acc, 5),
            "lr": opt.param_groups[0]["lr"],
            "samples_per_sec": round(seen / seconds, 1) if seconds > 0 else 0.0,
            "seconds": round(seconds, 2),
        }
        if bss is not None:
            line |= {"bss_alpha": bss[0], "bss_beta": bss[1], "bss_samples": adv}
        with (out / LOG_NAME).open("a") as f:
            f.write(json.dumps(line) + "\n")
        _save_checkpoint(
            out,
            {
                **state,
                "identity": _identity(cfg, pool),
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if model_device(model).type == "cuda" else [],
            },
        )
        log.info(
            "epoch %d/%d (round %d): loss %.4f, val acc %.4f%s, %.0f samples/s", epoch, cfg.epochs,
            rnd.index, line["train_loss"], acc, " (best)" if state["best_epoch"] == epoch else "",
            line["samples_per_sec"],
        )  # fmt: skip
    return state


def _bss_metrics(cfg: StudentConfig) -> dict[str, Any] | None:
    """metrics.json's record of the BSS settings and the (α, β) of every epoch; None when BSS is off."""
    if not cfg.bss:
        return None
    bcfg = cfg.bss_config()
    schedule = [bss_schedule(e / cfg.epochs, bcfg) for e in range(1, cfg.epochs + 1)]
    return {
        **bcfg.attack_settings(),
        "temperature": bcfg.temperature,
        "alpha": [round(a, 6) for a, _ in schedule],
        "beta": [round(b, 6) for _, b in schedule],
        "progress": "epoch / epochs, epochs counted from 1",
        "attacked": "augmented batch",
    }


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@keep_freed_memory()  # no page faults for every batch's tensors (allocator.py)
def train_student(
    cfg: StudentConfig,
    shards: str | Path,
    out: str | Path,
    progress: Progress | None = None,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Train a student on the synthetic shard folder `shards` (GKD); returns the metrics (also metrics.json).

    A folder with metrics.json is refused unless `overwrite`; an unfinished one with a checkpoint resumes
    (same settings required) and ends as an uninterrupted run would (see the module docstring).
    `progress(done_steps, total_steps, epoch_loss, samples_per_sec)` is called after every step.
    """
    cfg.validate()
    out = Path(out).expanduser()
    t0 = time.perf_counter()
    pool = open_shard_folder(shards)
    dataset = cfg.dataset or pool.spec["dataset"]
    full = load_dataset(dataset, "train")
    _, h, w, c = full.images.shape
    _check_inputs(cfg, pool, full.classes, (h, w, c))
    _, val_idx = train_val_split(full.labels, cfg.val_fraction, seed=cfg.seed)
    val = full.subset(val_idx)
    plan = plan_rounds(
        pool, cfg.epochs, cfg.regenerate_every, cfg.regenerate, cfg.images_per_round, out / REGEN_DIR
    )
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    in_process = loader_in_process(cfg.loader, device, cfg.workers, torch.get_num_threads())
    online = cfg.labels == "online" or cfg.bss
    teacher = _load_teacher(cfg, full.classes, (h, w, c), device) if online else None
    ckpt = _prepare_out(out, overwrite, _identity(cfg, pool))
    shift = max(1, min(4, min(h, w) // 10)) if cfg.shift is None else cfg.shift  # the teacher's rule
    hflip = (full.name != "digits") if cfg.hflip is None else cfg.hflip

    # The run owns a seeded global RNG (init, any dropout), restored on resume; the caller's is untouched.
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed)
        arch_kwargs: dict[str, Any] = {} if cfg.width is None else {"width": cfg.width}
        model = Classifier(cfg.arch, len(full.classes), c, h, full.classes, **arch_kwargs).to(device)
        if cfg.bss and teacher is not None and (teacher.mean, teacher.std) != (model.mean, model.std):
            raise TckrError(
                f"bss needs teacher and student with the same input normalisation; teacher {cfg.teacher} "
                f"uses mean/std {teacher.mean}/{teacher.std}, the student {model.mean}/{model.std}"
            )
        log.info(
            "student %s (%d parameters): %s labels, %d round(s) of %d shard images from %s, "
            "%d val images of %s, shift %d px, flip %s; %s", cfg.arch, count_parameters(model), cfg.labels,
            len(plan), plan[0].images, pool.path, len(val), dataset, shift, hflip,
            loader_note(cfg.workers, in_process),
        )  # fmt: skip
        state = _fit(cfg, model, teacher, pool, plan, val, out, ckpt, (shift, hflip), progress, in_process)

    # Selection is over. The test split is read for the first time here, to score the saved best weights.
    best = load_classifier(out, unfinished=True).to(device)  # metrics.json comes after
    test = load_dataset(dataset, "test")
    if test.classes != full.classes:
        raise TckrError(
            f"{dataset}: test classes {list(test.classes)} differ from train {list(full.classes)}"
        )
    test_acc = evaluate_accuracy(best, test, cfg.eval_batch_size)
    sps = state["train_samples"] / state["train_seconds"] if state["train_seconds"] > 0 else 0.0
    metrics = {
        "arch": cfg.arch,
        "dataset": dataset,
        "shards": str(pool.path),
        "teacher": cfg.teacher if online else None,
        "labels": cfg.labels,
        "bss": _bss_metrics(cfg),
        "temperature": cfg.temperature,
        "label_smoothing": cfg.label_smoothing,
        "parameters": count_parameters(best),
        "num_val": len(val),
        "num_test": len(test),
        "val_accuracy": state["val_acc"],
        "best_epoch": state["best_epoch"],
        "best_val_accuracy": state["best_acc"],
        "test_accuracy": test_acc,
        "train_samples": state["train_samples"],
        "samples_per_sec": round(sps, 1),
        "steps": state["steps"],
        "regeneration": {
            "mode": cfg.regenerate,
            "every": cfg.regenerate_every,
            "rounds": [r.to_json() for r in plan],
        },
        "seconds": round(time.perf_counter() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "shard_loader": "in-process" if in_process else "processes",
        "augmentation": {"shift": shift, "hflip": hflip},
        "config": dataclasses.asdict(cfg),
    }
    write_json(out / METRICS_NAME, metrics)  # written last: marks a finished run
    log.info(
        "best epoch %d (val acc %.4f): test acc %.4f -> %s",
        state["best_epoch"],
        state["best_acc"],
        test_acc,
        out,
    )
    return metrics
