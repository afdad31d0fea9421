"""`tckr-engine bench`: images/sec of the engine per backend x attention, beside a plain diffusers baseline.

One process, one run (DESIGN.md "Performance measurement", issue 8). For every batch size:
1. the run spec is resolved once (`engine.spec.resolve`), so baseline and engine share the UNet, the
   diffusers scheduler class and config, steps, guidance, prompts and per-image seeds;
2. every contender (`bench/contenders.py`) is set up and warmed up on one batch (model export / session /
   engine build = `setup_s`, first batch incl. compilation = `warmup_s`; both reported, never timed): the
   diffusers baseline (`bench/baseline.py`) and the engine per backend x attention (`generate_shards` with a
   prebuilt Engine: the writer pool encodes PNGs and commits shard tars); its first timed run follows at
   once, and the rows measured so far are written to the output files (a run cut short keeps them);
3. the other `repeats - 1` timed rounds; inside a round the contenders run one after the other, so slow
   drifts of the machine (other jobs, thermal) hit all of them alike. Each timed run generates all images
   end to end into a fresh folder (files on disk), with the device synchronised before and after;
4. per row: median images/sec with the slowest/fastest repeat, ratio to the baseline's median, wall ms per
   denoising step of one batch, peak memory, FLOPs per image (`bench/flops.py`) and the achieved rate,
   max |pixel difference| to the baseline's saved images for the same keys, and whether every repeat wrote
   byte-identical files;
5. with `profile`, one more batch of every row under the PyTorch profiler: where its time goes, by kind of
   kernel / op (`bench/profile.py`), into the row's `profile`.
Then the trainer row (`bench/trainer.py`) on the first engine row's shards. Results: `bench/results.py`.
Backends or attention kernels that cannot run here get a row whose status says why.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import logging
import math
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tckr_engine import allocator
from tckr_engine.bench.baseline import read_pngs
from tckr_engine.bench.contenders import (
    BenchProgress,
    Budget,
    Contender,
    baseline_contender,
    engine_contender,
    profile_contenders,
    timed_rounds,
)
from tckr_engine.bench.flops import device_name, device_peak, generation_flops, measured_matmul_tflops
from tckr_engine.bench.kernels import git_sha
from tckr_engine.bench.results import format_table, write_results
from tckr_engine.bench.targets import check_targets
from tckr_engine.bench.trainer import read_tar_images, trainer_throughput
from tckr_engine.config import (
    ATTENTION,
    BACKENDS,
    DEVICES,
    SAMPLERS,
    GenerateConfig,
    check_positive,
    is_finite_number,
)
from tckr_engine.engine.backends import (
    COMPILE_BACKEND_ENV,
    CPU_ROWS_ENV,
    CPU_SIDE_BY_SIDE_ENV,
    GRAPH_BACKENDS,
    ORT_PROVIDER_ENV,
)
from tckr_engine.engine.scheduler import BatchScheduler
from tckr_engine.engine.spec import DTYPES, Resources, resolve, resolve_device, versions
from tckr_engine.errors import TckrError
from tckr_engine.kernels.attention import KILL_SWITCH_ENV
from tckr_engine.train.gkd import StudentConfig

log = logging.getLogger(__name__)

# The engine's environment switches (engine/backends.py, kernels/attention.py), recorded with every run.
ENGINE_ENV = (
    CPU_ROWS_ENV, CPU_SIDE_BY_SIDE_ENV, COMPILE_BACKEND_ENV, ORT_PROVIDER_ENV, KILL_SWITCH_ENV, allocator.ENV,
)  # fmt: skip
DEFAULT_TRAIN_BATCH = StudentConfig.batch_size  # the student trainer's default batch (`train --batch-size`)

__all__ = ["BenchConfig", "BenchProgress", "format_table", "run_bench"]


@dataclass
class BenchConfig:
    """What `tckr-engine bench` measures; `validate()` gives one-line errors."""

    preset: str = "tiny-fmnist"  # a preset, an embedded generator (fmnist) or a generator folder
    dataset: str | None = None  # class names for the prompts; None: digits for *digits*, else fashion-mnist
    device: str = "auto"
    dtype: str = "auto"  # fp32 on the CPU, fp16 on a GPU
    batch_sizes: tuple[int, ...] = (64,)
    steps: int = 20  # TCKR's generation settings (REFERENCE.md §1.3)
    guidance: float = 2.0
    sampler: str = "dpm++"
    images: int = 64  # per row and repeat; rounded up to a multiple of each batch size
    repeats: int = 3
    backends: tuple[str, ...] = BACKENDS
    attention: tuple[str, ...] = ("sdpa", "triton", "xformers")
    threads: int | None = None  # CPU threads for everything (baseline, engine, trainer); None: torch's
    writers: int = 2  # the engine's encoding threads (generate's default)
    seed: int = 0
    image_size: int | None = None  # override a preset's resolution
    train_steps: int = 16  # trainer row: optimiser steps per mode; 0 leaves the row out
    train_batch_size: int | None = None  # None: the student trainer's 128, at most the images the row reads
    train_workers: int | None = None  # DataLoader workers of the stream; None: the trainer's default
    train_repeats: int = 2  # interleaved rounds of the trainer row's modes (median, min-max)
    profile: bool = False  # after the timed rounds, one batch per row under the PyTorch profiler
    note: str = ""  # free text recorded with the results (e.g. "contended machine")
    # Seconds from the start after which no row is set up and no timed round starts (rows keep the rounds
    # they finished, at least one each; the trainer row is skipped); None: no limit. For a machine lent
    # for minutes: results are written instead of lost to an outer timeout.
    time_budget_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def validate(self) -> BenchConfig:
        if not self.batch_sizes:
            raise TckrError("batch_sizes must list at least one batch size")
        for b in self.batch_sizes:
            check_positive("batch size", b, hi=65_536)
        check_positive("steps", self.steps, hi=1000)
        check_positive("images", self.images)
        check_positive("repeats", self.repeats, hi=100)
        check_positive("writers", self.writers, hi=64)
        if self.train_batch_size is not None:
            check_positive("train_batch_size", self.train_batch_size)
        check_positive("train_repeats", self.train_repeats, hi=100)
        if self.threads is not None:
            check_positive("threads", self.threads, hi=1024)
        if (
            isinstance(self.train_steps, bool)
            or not isinstance(self.train_steps, int)
            or self.train_steps < 0
        ):
            raise TckrError(f"train_steps must be a non-negative integer, got {self.train_steps!r}")
        first = self.first_row_images()
        if self.train_steps and self.trainer_batch() > first:
            raise TckrError(
                f"train_batch_size {self.train_batch_size} is more than the {first} images the trainer row "
                "reads (the first engine row's); lower --train-batch-size or raise --images"
            )
        if self.time_budget_s is not None and (
            not is_finite_number(self.time_budget_s) or self.time_budget_s <= 0
        ):
            raise TckrError(f"time_budget_s must be a positive number of seconds, got {self.time_budget_s!r}")
        if not is_finite_number(self.guidance) or self.guidance < 0:
            raise TckrError(f"guidance must be a finite number >= 0, got {self.guidance!r}")
        if self.device not in DEVICES:
            raise TckrError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.sampler not in SAMPLERS:
            raise TckrError(f"sampler must be one of {', '.join(SAMPLERS)}; got {self.sampler!r}")
        bad = [b for b in self.backends if b not in BACKENDS]
        if bad or not self.backends:
            raise TckrError(
                f"backends must be a list of {', '.join(BACKENDS)}; got {', '.join(bad) or 'none'}"
            )
        choices = [a for a in ATTENTION if a != "auto"]
        bad = [a for a in self.attention if a not in choices]
        if bad or not self.attention:
            raise TckrError(
                f"attention must be a list of {', '.join(choices)}; got {', '.join(bad) or 'none'}"
            )
        return self

    def first_row_images(self) -> int:
        """Images of the first batch size's rows (whole batches): the shards the trainer row reads."""
        return math.ceil(self.images / self.batch_sizes[0]) * self.batch_sizes[0]

    def trainer_batch(self) -> int:
        """The trainer row's batch: `train_batch_size`, or the student trainer's default batch capped at
        the images the row reads."""
        if self.train_batch_size is not None:
            return self.train_batch_size
        return min(DEFAULT_TRAIN_BATCH, self.first_row_images())


def _with_batch(run: dict[str, Any], batch: int, images: int) -> dict[str, Any]:
    """The run spec at another batch size: `images` (a multiple of `batch`) in shards of whole batches."""
    shard = min(images, batch * max(1, 1024 // batch))
    out = copy.deepcopy(run)
    out["spec"].update(batch_size=batch, num_images=images, shard_size=shard)
    out["num_shards"] = -(-images // shard)
    return out


def _compare(baseline: dict[str, np.ndarray], engine: dict[str, np.ndarray]) -> tuple[int, float]:
    """(max |difference| in grey levels, % of differing pixel values) over the baseline's keys."""
    if set(baseline) != set(engine):
        raise TckrError(f"engine wrote {len(engine)} images, the baseline {len(baseline)}; keys differ")
    worst, differing, total = 0, 0, 0
    for key, ref in baseline.items():
        d = np.abs(engine[key].astype(np.int16) - ref.astype(np.int16))
        worst, differing, total = max(worst, int(d.max())), differing + int((d > 0).sum()), total + d.size
    return worst, 100.0 * differing / max(total, 1)


def _row(c: Contender, spec: dict[str, Any], flops: dict[str, Any], ref: dict[str, Any]) -> dict[str, Any]:
    n, b, steps = spec["num_images"], spec["batch_size"], spec["steps"]
    row: dict[str, Any] = {
        "kind": "generate", "name": c.name, "backend": c.backend, "attention": c.attention, "batch_size": b,
        "images": n, "steps": steps, "guidance": spec["guidance"], "dtype": spec["dtype"],
        "status": c.status, "repeats": len(c.seconds), "setup_s": _r(c.setup_s, 3),
        "warmup_s": _r(c.warmup_s, 3), "notes": c.notes,
    }  # fmt: skip
    if c.status != "ok" or not c.seconds:
        return row
    med = statistics.median(c.seconds)
    ips = n / med
    achieved = flops["flops_per_image"] * ips
    row.update(
        images_per_s=_r(ips, 4),
        images_per_s_min=_r(n / max(c.seconds), 4),
        images_per_s_max=_r(n / min(c.seconds), 4),
        seconds_median=_r(med, 4),
        seconds=[_r(s, 4) for s in c.seconds],
        spread_pct=_r(100 * (max(c.seconds) - min(c.seconds)) / med, 2),
        ms_per_step=_r(1e3 * med / (n / b * steps), 3),
        peak_mem_mb=_r(max(c.peak_mb), 1),
        minor_faults_per_image=round(statistics.median(c.minor_faults) / n) if c.minor_faults else None,
        gflops_per_image=_r(flops["flops_per_image"] / 1e9, 4),
        achieved_gflops_per_s=_r(achieved / 1e9, 3),
        fraction_of_peak=_r(achieved / ref["peak"], 4) if ref.get("peak") else None,
        fraction_of_matmul=_r(achieved / (ref["matmul"]["tflops"] * 1e12), 4),
        repeats_identical=len(set(c.digests)) == 1,
    )
    return row


def _r(x: float | None, nd: int) -> float | None:
    return None if x is None else round(float(x), nd)


def _bench_batch(
    cfg: BenchConfig, run: dict[str, Any], resources: Resources, work: Path, ref: dict[str, Any],
    progress: BenchProgress, budget: Budget, save: Callable[[list[dict[str, Any]]], None],
) -> tuple[list[dict[str, Any]], list[str]]:  # fmt: skip
    """The rows of one batch size; also the tar paths of the first engine row (for the trainer row).

    Each row's first timed run follows its set-up and warm-up at once, and `save(rows)` then writes every
    row measured so far: a run cut short (an outer timeout in a long compilation on a lent GPU) keeps them.
    The other repeats interleave all rows, so slow drifts of the machine hit them alike. With
    `cfg.profile`, the profiles come after everything is measured and written.
    """
    spec = run["spec"]
    device = torch.device(spec["device"])
    b = spec["batch_size"]
    sched = BatchScheduler(spec["num_images"], spec["shard_size"], b, resources.prompts, spec["seed"])
    batches = [batch.jobs[: batch.n_real] for batch in sched.schedule(range(run["num_shards"]))]
    folder = work / f"b{b}"
    contenders: list[Contender] = []

    def add(c: Contender) -> None:
        contenders.append(c)
        what = f"setup {c.setup_s:.1f} s, warm-up {c.warmup_s:.1f} s" if c.status == "ok" else c.status
        progress.status(f"b={b} {c.backend}/{c.attention}: {what}")
        if c.status == "ok":
            progress.start(f"b={b} {c.backend}/{c.attention} repeat 1", spec["num_images"])
            timed_rounds([c], folder, 1, device, progress)
        save(_batch_rows(contenders, spec, ref)[0])

    if budget.spent(f"b={b} diffusers"):
        add(Contender("diffusers", "diffusers", "sdpa", status=budget.skip_status()))
    else:
        progress.status(f"b={b}: setting up the diffusers baseline")
        add(baseline_contender(run, resources, batches, device))
    for backend in cfg.backends:
        graph = backend in GRAPH_BACKENDS
        for attention in cfg.attention[:1] if graph else cfg.attention:
            what = f"{backend}" + ("" if graph else f"/{attention}")
            if budget.spent(f"b={b} {what}"):
                add(
                    Contender("engine", backend, "graph" if graph else attention, status=budget.skip_status())
                )
                continue
            progress.status(f"b={b}: setting up engine {what}")
            add(engine_contender(run, resources, backend, attention, cfg.writers))
    ok = [c for c in contenders if c.status == "ok" and c.seconds]
    if cfg.repeats > 1 and ok:
        progress.start(f"b={b} timed", (cfg.repeats - 1) * len(ok) * spec["num_images"])
        one_round = sum(c.seconds[0] for c in ok)  # what the next round will take, for the budget
        timed_rounds(contenders, folder, cfg.repeats, device, progress, budget, first=1, last_round=one_round)

    rows, urls = _batch_rows(contenders, spec, ref)
    for row in rows:
        line = f"{row['status']}" if row["status"] != "ok" else (
            f"{row['images_per_s']:.3g} img/s (x{row.get('ratio_to_baseline') or 0:.2f}), "
            f"max |diff| {row.get('max_abs_diff')}"
        )  # fmt: skip
        progress.status(f"b={b} {row['backend']}/{row['attention']}: {line}")
    save(rows)
    if cfg.profile:
        profile_contenders(contenders, device, progress, budget)
        for row, c in zip(rows, contenders, strict=True):
            if c.profile is not None:
                row["profile"] = c.profile
    return rows, urls


def _batch_rows(
    contenders: list[Contender], spec: dict[str, Any], ref: dict[str, Any]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The rows of the contenders as measured so far (pixel differences against the baseline's last
    images, ratios to its median), and the tar paths of the first engine row that wrote shards."""
    base = contenders[0]
    ref_images = read_pngs(base.last) if base.status == "ok" and base.last else None
    rows, urls = [], []
    for c in contenders:
        row = _row(c, spec, ref["flops"], ref)
        if c.status == "ok" and c.name == "engine" and c.last is not None:
            tars = sorted(str(p) for p in c.last.rglob("*.tar"))
            urls = urls or tars
            if ref_images is not None:
                images, _ = read_tar_images(tars)
                row["max_abs_diff"], pct = _compare(ref_images, images)
                row["diff_pixels_pct"] = _r(pct, 4)
        if c.name == "diffusers" and c.status == "ok" and c.seconds:
            row["max_abs_diff"], row["diff_pixels_pct"] = 0, 0.0
        rows.append(row)
    base_ips = rows[0].get("images_per_s")
    for row in rows:
        if base_ips and row.get("images_per_s"):
            row["ratio_to_baseline"] = _r(row["images_per_s"] / base_ips, 4)
    return rows, urls


def _meta(cfg: BenchConfig, device: torch.device, dtype: str, threads: int) -> dict[str, Any]:
    vers = versions()
    for name in ("onnxruntime", "onnx", "triton", "tensorrt", "xformers"):
        try:
            vers[name] = __import__(name).__version__
        except Exception:  # not installed (or broken): recorded as absent
            vers[name] = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "dtype": dtype,
        "threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": vers,
        "git_sha": git_sha(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "note": cfg.note,
        "env": {k: os.environ[k] for k in ENGINE_ENV if k in os.environ},  # A/B switches in force
        "allocator": allocator.describe(),
    }


def _dataset(cfg: BenchConfig) -> str:
    if cfg.dataset:
        return cfg.dataset
    if "digits" in cfg.preset:
        return "digits"
    from tckr_engine.data import class_names

    try:
        class_names("fashion-mnist")
        return "fashion-mnist"
    except TckrError:
        log.info("Fashion-MNIST class names unavailable here; prompts use the digits classes")
        return "digits"


def run_bench(cfg: BenchConfig, out: str | Path, progress: BenchProgress | None = None) -> dict[str, Any]:
    """Run the benchmark of `cfg` and write its CSV / JSON / plot into `out`; returns the result dict
    (`config`, `meta`, `flops`, `matmul`, `rows`, `trainer`, `files`)."""
    cfg.validate()
    budget = Budget(cfg.time_budget_s)
    progress = progress or BenchProgress()
    device_str, dtype = resolve_device(cfg.device, cfg.dtype)
    device = torch.device(device_str)
    threads = int(cfg.threads or torch.get_num_threads())
    if device.type == "cpu":
        torch.set_num_threads(threads)
    # The engine's rows keep freed memory (allocator.py) and leave glibc's thresholds settled: settled
    # from the start, every repeat of the baseline runs in one malloc state, the one glibc's own adaptive
    # thresholds climb to once the baseline's first batch has freed its large blocks.
    allocator.settle()
    first = cfg.batch_sizes[0]
    gcfg = GenerateConfig(
        model=cfg.preset, dataset=_dataset(cfg), num_images=math.ceil(cfg.images / first) * first,
        batch_size=first, steps=cfg.steps, guidance=float(cfg.guidance), sampler=cfg.sampler, seed=cfg.seed,
        device=device_str, dtype=dtype, attention="sdpa", backend="torch", threads=threads,
        image_size=cfg.image_size,
    ).validate()  # fmt: skip
    progress.status(f"loading {cfg.preset} on {device_str} ({dtype}, {threads} threads)")
    run, resources = resolve(gcfg)
    resources.generator.to(device, DTYPES[dtype])
    meta = _meta(cfg, device, dtype, threads)
    flops = generation_flops(resources.generator, cfg.steps, cfg.guidance > 1.0)
    mm_dtype = torch.bfloat16 if device.type == "cuda" else DTYPES[dtype]
    ref = {"flops": flops, "matmul": measured_matmul_tflops(device, mm_dtype)}
    ref["peak"] = device_peak(meta["device"], dtype) if device.type == "cuda" else None
    progress.status(
        f"{flops['flops_per_image'] / 1e9:.2f} GFLOP per image; measured {ref['matmul']['dtype']} matmul "
        f"{ref['matmul']['tflops'] * 1e3:.1f} GFLOP/s"
        + (f", table peak {ref['peak'] / 1e12:.0f} TFLOP/s" if ref["peak"] else "")
    )
    rows: list[dict[str, Any]] = []
    trainer = None

    def result_so_far(more: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"},
            "meta": meta,
            "flops": flops,
            "matmul": ref["matmul"],
            "device_peak_flops": ref["peak"],
            "rows": rows + more,
            "trainer": trainer,
            "time_budget": {"seconds": cfg.time_budget_s, "left_out": budget.stopped},
        }

    def save(more: list[dict[str, Any]]) -> None:  # while running: what is measured so far, no plot
        write_results(Path(out), result_so_far(more), plot=False)

    with tempfile.TemporaryDirectory(prefix="tckr-bench-") as tmp:
        work = Path(tmp)
        urls: list[str] = []
        for b in cfg.batch_sizes:
            brun = _with_batch(run, b, math.ceil(cfg.images / b) * b)
            brows, burls = _bench_batch(cfg, brun, resources, work, ref, progress, budget, save)
            rows += brows
            urls = urls or burls
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if cfg.train_steps:
            rows += _trainer_rows(cfg, urls, run["spec"]["classes"], device, progress, budget)
            trainer = rows[-1].pop("_detail", None)
    result = result_so_far([])
    result["targets"] = check_targets(result)  # issue 8's acceptance targets, judged on this run
    if budget.stopped:
        progress.status(f"--time-budget {cfg.time_budget_s:g} s left out: {'; '.join(budget.stopped)}")
    result["files"] = write_results(Path(out), result)
    return result


def _trainer_rows(
    cfg: BenchConfig, urls: list[str], classes: list[str], device: torch.device, progress: BenchProgress,
    budget: Budget,
) -> list[dict[str, Any]]:  # fmt: skip
    base = {"kind": "train", "attention": "-", "batch_size": cfg.trainer_batch(), "steps": cfg.train_steps}
    if budget.spent("the trainer row"):
        return [{**base, "name": "trainer", "backend": "-", "status": budget.skip_status()}]
    if not urls:
        return [{**base, "name": "trainer", "backend": "-", "status": "skipped: no engine row wrote shards"}]
    progress.status(f"trainer row: {cfg.train_steps} steps streaming vs in memory")
    try:
        t = trainer_throughput(
            urls, classes, device, cfg.trainer_batch(), cfg.train_steps, cfg.train_workers,
            repeats=cfg.train_repeats,
        )  # fmt: skip
    except Exception as e:
        status = f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]
        return [{**base, "name": "trainer", "backend": "-", "status": status}]
    note = f"{t['arch']}, AdamW, shift/flip, soft CE (hard labels), {t['images']} engine images"
    rows = []
    for mode in ("memory", "stream"):
        m = t[mode]
        extra = (
            f"; {t['loader_note']}, shuffle buffer {t['shuffle_buffer']}; "
            f"the loader alone {t['loader']['samples_per_s']:.0f} samples/s"
            if mode == "stream"
            else ""
        )
        rows.append(
            {
                **base, "name": f"trainer-{mode}", "backend": mode, "status": "ok",
                "images": m["samples"], "images_per_s": m["samples_per_s"], "seconds_median": m["seconds"],
                "images_per_s_min": m["samples_per_s_min"], "images_per_s_max": m["samples_per_s_max"],
                "repeats": t["repeats"],
                "ratio_to_baseline": 1.0 if mode == "memory" else t["stream_vs_memory"],
                "notes": note + extra,
            }
        )  # fmt: skip
    mem, stream, pct = t["memory"]["samples_per_s"], t["stream"]["samples_per_s"], 100 * t["stream_vs_memory"]
    progress.status(f"trainer: {mem:.0f} samples/s in memory, {stream:.0f} streaming ({pct:.0f} %)")
    rows[-1]["_detail"] = t
    return rows
