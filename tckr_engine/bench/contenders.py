"""The contenders of `tckr-engine bench` and their timed rounds (`bench/throughput.py` drives them).

A `Contender` is one row being measured: the plain diffusers baseline (`bench/baseline.py`) or the engine
with one backend x attention (`generate_shards` on a prebuilt Engine, with the backend's own CPU slicing).
Set-up and warm-up happen when it is built; `timed_rounds` then runs every live contender once per round,
one after the other, into fresh folders, with the device synchronised around each timed run. A `Budget`
(`--time-budget`) stops new rows and rounds once it is spent.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import hashlib
import logging
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tckr_engine.bench.baseline import make_baseline, run_baseline
from tckr_engine.bench.flops import PeakMemory, sync
from tckr_engine.engine.spec import Resources
from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)


class BenchProgress:
    """Callbacks for a progress display; the library never prints."""

    def status(self, line: str) -> None: ...

    def start(self, label: str, total: int) -> None: ...

    def advance(self, n: int) -> None: ...


class Budget:
    """The bench's `time_budget_s`, counted from construction; unlimited when None."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds, self.start = seconds, time.perf_counter()
        self.stopped: list[str] = []  # what the budget cut, for the result and the terminal

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.start)

    def spent(self, before: str) -> bool:
        """True (and recorded) when the budget is used up before `before` starts."""
        if self.left() > 0:
            return False
        self.stopped.append(before)
        log.info("time budget of %.0f s spent: %s left out", self.seconds, before)
        return True

    def skip_status(self) -> str:
        return f"skipped: the --time-budget of {self.seconds:g} s was spent before this row"


def files_digest(folder: Path, pattern: str) -> str:
    """sha256 over the names and bytes of the files under `folder` matching `pattern`, in path order."""
    h = hashlib.sha256()
    for path in sorted(folder.rglob(pattern)):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()


@dataclass
class Contender:
    """One row being measured: `prepare(folder)` then the timed `run(folder, on_batch)`."""

    name: str  # "diffusers" or "engine"
    backend: str
    attention: str
    status: str = "ok"
    setup_s: float | None = None
    warmup_s: float | None = None
    seconds: list[float] = field(default_factory=list)
    peak_mb: list[float] = field(default_factory=list)
    minor_faults: list[int] = field(default_factory=list)  # the process's, per timed repeat
    digests: list[str] = field(default_factory=list)
    last: Path | None = None  # output folder of the last repeat
    notes: str = ""
    prepare: Callable[[Path], None] = lambda folder: None
    run: Callable[[Path, Callable[[int], None]], None] | None = None
    sample: Callable[[], Any] | None = None  # one batch without writing files (`bench --profile`)
    profile: dict[str, Any] | None = None  # `bench/profile.py: profile_batch` of `sample`
    pattern: str = "*.tar"  # output files whose bytes are compared across repeats

    @property
    def slug(self) -> str:
        return f"{self.name}-{self.backend}-{self.attention}"


def _fail(c: Contender, e: BaseException) -> None:
    first = (str(e).strip().splitlines() or [""])[0]
    c.status = f"skipped: {first}" if isinstance(e, TckrError) else f"failed: {type(e).__name__}: {first}"
    c.status = c.status[:300]
    log.info("%s %s/%s: %s", c.name, c.backend, c.attention, c.status)


def baseline_contender(
    run: dict[str, Any], resources: Resources, batches: list, device: torch.device
) -> Contender:
    c = Contender("diffusers", "diffusers", "sdpa", pattern="*.png")
    try:
        t0 = time.perf_counter()
        baseline = make_baseline(resources.generator, run["spec"])
        c.setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        baseline(batches[0])  # warm-up: one batch, not saved
        sync(device)
        c.warmup_s = time.perf_counter() - t0
        text = baseline.text_seconds(batches[0])
    except Exception as e:
        _fail(c, e)
        return c
    c.notes = f"{baseline.describe}; per-call prompt encoding {text * 1e3:.0f} ms per batch (included)"
    c.run = lambda folder, on_batch: run_baseline(baseline, batches, folder, on_batch)
    c.sample = lambda: baseline(batches[0])
    return c


def engine_contender(
    run: dict[str, Any], resources: Resources, backend: str, attention: str, writers: int
) -> Contender:
    from tckr_engine.engine.backends import GRAPH_BACKENDS, check_backend, cpu_slicing
    from tckr_engine.engine.engine import Engine
    from tckr_engine.engine.generate import generate_shards, prepare_folder
    from tckr_engine.kernels.processor import check_attention_backend

    graph = backend in GRAPH_BACKENDS
    c = Contender("engine", backend, "graph" if graph else attention)  # a graph holds its own attention
    spec = run["spec"]
    device = torch.device(spec["device"])
    try:
        check_backend(backend, spec["device"], spec["dtype"])
        if not graph:
            check_attention_backend(attention)
            if attention != "sdpa" and device.type != "cuda":
                raise TckrError(f"attention {attention} needs a CUDA GPU (on the CPU it would run SDPA)")
        # The backend's own CPU slicing, as `generate --backend` resolves it (the shared spec has torch's).
        slicing = cpu_slicing(
            spec["device"], backend, spec["threads"], unet_params=resources.generator.unet_params
        )
        row_spec = {
            **spec,
            "backend": backend,
            "attention": "sdpa" if graph else attention,
            "cpu_slicing": slicing,
        }
        row_run = {**run, "spec": row_spec}
        if not graph:  # the engine swaps the attention processors in place: a private UNet, the
            # baseline keeps diffusers' own (its notes name them)
            gen = copy.copy(resources.generator)
            gen.unet = copy.deepcopy(gen.unet)
            resources = dataclasses.replace(resources, generator=gen)
        t0 = time.perf_counter()
        engine = Engine(row_spec, resources)  # ONNX export / session / TensorRT build happen here
        sync(device)
        c.setup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        first = next(engine.scheduler.schedule([0]))
        engine.sample(first)  # compilation / autotuning / first-call costs
        sync(device)
        c.warmup_s = time.perf_counter() - t0
    except Exception as e:  # one backend that cannot run must not stop the others
        _fail(c, e)
        return c
    c.notes = slicing_note(slicing)
    c.sample = lambda: engine.sample(first)
    c.prepare = lambda folder: prepare_folder(folder, row_run, overwrite=True)
    c.run = lambda folder, on_batch: generate_shards(
        row_run, folder, range(row_run["num_shards"]), engine=engine, writers=writers, on_batch=on_batch
    )
    return c


def slicing_note(slicing: dict[str, Any] | None) -> str:
    """How a row ran the UNet on the CPU (`engine.backends.cpu_slicing`), for its notes."""
    if slicing is None:
        return ""
    if slicing["workers"] > 1:
        return (
            f"groups of {slicing['rows']} UNet rows side by side on {slicing['workers']} one-thread workers"
        )
    return f"UNet slices of {slicing['rows']} rows on all threads"


def timed_rounds(
    contenders: list[Contender], work: Path, repeats: int, device: torch.device, progress: BenchProgress,
    budget: Budget | None = None, first: int = 0, last_round: float = 0.0,
) -> None:  # fmt: skip
    """Rounds `first` .. `repeats - 1` of every live contender; with a budget, round r > 0 starts only if
    the time left covers one more round as long as the last one (`last_round` before the first here)."""
    for r in range(first, repeats):
        if not any(c.status == "ok" for c in contenders):
            return
        if budget is not None and r > 0 and budget.left() < last_round:
            budget.stopped.append(f"timed rounds {r + 1}-{repeats} of batch {work.name}")
            log.info("time budget: stopping %s after %d of %d timed rounds", work.name, r, repeats)
            for c in contenders:
                if c.status == "ok":
                    c.notes = "; ".join(filter(None, [c.notes, f"{r} of {repeats} repeats (--time-budget)"]))
            return
        t_round = time.perf_counter()
        for c in contenders:
            if c.status != "ok":
                continue
            folder = work / c.slug / f"repeat{r}"
            try:
                c.prepare(folder)
                gc.collect()
                with PeakMemory(device) as mem:
                    sync(device)
                    t0 = time.perf_counter()
                    c.run(folder, progress.advance)
                    sync(device)
                    c.seconds.append(time.perf_counter() - t0)
            except Exception as e:
                _fail(c, e)
                continue
            c.peak_mb.append(mem.mb)
            c.minor_faults.append(mem.minor_faults)
            c.digests.append(files_digest(folder, c.pattern))
            if c.last is not None:
                shutil.rmtree(c.last, ignore_errors=True)
            c.last = folder
        last_round = time.perf_counter() - t_round


def profile_contenders(
    contenders: list[Contender], device: torch.device, progress: BenchProgress, budget: Budget | None = None
) -> None:
    """`bench --profile`: one more batch of every live contender under the PyTorch profiler, into
    `c.profile` (`bench/profile.py`); after the timed rounds, so it never touches their figures."""
    from tckr_engine.bench.profile import profile_batch
    from tckr_engine.engine.backends import GRAPH_BACKENDS

    for c in contenders:
        if c.status != "ok" or c.sample is None:
            continue
        if budget is not None and budget.spent(f"the profiles from {c.backend}/{c.attention} on"):
            return
        progress.status(f"profiling {c.backend}/{c.attention}: one batch")
        try:
            c.profile = profile_batch(c.sample, device)
        except Exception as e:  # a profile is extra: it must not cost the row its figures
            c.profile = {"status": f"failed: {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"[:300]}
            log.info("profile of %s/%s: %s", c.backend, c.attention, c.profile["status"])
            continue
        if device.type == "cpu" and c.backend in GRAPH_BACKENDS:
            c.profile["note"] = "the graph runtime's own work is not seen among PyTorch's CPU ops"
