"""How fast can the *same* PyTorch kernels run the UNet on this CPU? The ceiling for bit-identical images.

The bench's eager row gives the images of the diffusers baseline bit for bit because it runs the same
kernels; any speed-up it gets can only come from arranging those kernels better on the cores. This measures
the UNet alone (no scheduler, no image encoding) in rows per second, on one fixed batch, five ways:

- `intra-op`: one call for the whole batch on `threads` PyTorch threads (what the diffusers baseline does);
- `one-thread`: one thread, slices of `rows` rows one after another (x threads = perfect scaling);
- `free-workers`: `threads` Python threads with one PyTorch thread each, each running slices of `rows`
  rows in a loop with no synchronisation: the fastest any arrangement of these kernels on these cores gets
  (the engine cannot beat it without changing the kernels, hence the images). Since git 572d13b this is the
  engine's eager arrangement: groups of images run whole sampling loops side by side (`Engine.sample`);
- `parallel-slices`: one UNet call cut into slices on the workers with a barrier per call
  (`engine.backends.ParallelSlices` called directly; the engine's arrangement before 572d13b);
- `free-workers-kv`: `free-workers` with the engine's attention processor inside
  `cross_attention_kv_cache()`, as a sampling loop runs it since git d34371c: each slice's text context is
  projected to cross-attention keys and values once, not on every call (same output bits, less work).

In both free-workers modes a worker runs each of its slices `calls` times in a row, as a group of images
runs its denoising steps.

Repeats interleave the modes so machine drift hits all of them; medians and spread go to a JSON file.
`--profile` adds where one call's time goes: the PyTorch profiler's top ops (by op and input shapes) of
one single-threaded call on a slice, with diffusers' processors, as a share of the call.

    python -m tckr_engine.bench.ceiling --preset tiny-fmnist --threads 2 \\
        --out docs/bench/cpu-ceiling-tiny-fmnist.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import statistics
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tckr_engine.models.generator import Generator

log = logging.getLogger(__name__)

MODES = ("intra-op", "one-thread", "free-workers", "parallel-slices", "free-workers-kv")


def _inputs(gen: Generator, rows: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A random batch for the UNet: latents (rows, C, h, w), one timestep, text context (rows, L, D)."""
    cfg = gen.unet.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, *gen.latent_shape, generator=g)
    t = torch.tensor(500)  # one timestep for the batch, as the engine's sampler passes it
    context = torch.randn(rows, gen.text_encoder.length, cfg.cross_attention_dim, generator=g)
    return x, t, context


def _slices(batch: tuple[torch.Tensor, ...], rows: int) -> list[tuple[torch.Tensor, ...]]:
    x, t, context = batch
    return [(x[i : i + rows], t, context[i : i + rows]) for i in range(0, x.shape[0], rows)]


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _free_workers(
    call: Callable[..., torch.Tensor],
    parts: list[tuple[torch.Tensor, ...]],
    threads: int,
    calls: int,
    cached: bool = False,
) -> None:
    """Each worker takes every `threads`-th slice and calls it `calls` times in a row; no barrier."""
    from tckr_engine.kernels.kv_cache import cross_attention_kv_cache

    def work(k: int) -> None:
        torch.set_num_threads(1)
        with torch.inference_mode():
            for part in parts[k::threads]:
                with cross_attention_kv_cache() if cached else contextlib.nullcontext():
                    for _ in range(calls):
                        call(*part)

    workers = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def measure(
    gen: Generator, *, threads: int, batch: int, rows: int, calls: int, repeats: int
) -> dict[str, Any]:
    """Rows/sec per mode (median over `repeats` interleaved rounds of `calls` batch-sized calls each)."""
    from tckr_engine.engine.backends import ParallelSlices, TorchDenoiser
    from tckr_engine.engine.sampler import unet_fn
    from tckr_engine.kernels.processor import set_attention_backend

    call = unet_fn(gen.unet.eval().requires_grad_(False))  # diffusers' attention processors
    engine_unet = copy.deepcopy(gen.unet)
    set_attention_backend(engine_unet, "sdpa")  # the engine's processor (cross-attention keys cached)
    engine_call = unet_fn(engine_unet)
    full = _inputs(gen, batch)
    parts = _slices(full, rows)
    sliced = ParallelSlices([TorchDenoiser({}, gen) for _ in range(threads)], rows)

    def intra_op() -> None:
        torch.set_num_threads(threads)
        for _ in range(calls):
            call(*full)

    def one_thread() -> None:
        torch.set_num_threads(1)
        for _ in range(calls):
            for part in parts:
                call(*part)

    def free_workers() -> None:
        _free_workers(call, parts, threads, calls)

    def parallel_slices() -> None:
        torch.set_num_threads(threads)  # the caller's own threads (scheduler math) as in the engine
        for _ in range(calls):
            sliced(*full)

    def free_workers_kv() -> None:
        _free_workers(engine_call, parts, threads, calls, cached=True)

    runs = dict(
        zip(MODES, (intra_op, one_thread, free_workers, parallel_slices, free_workers_kv), strict=True)
    )
    times: dict[str, list[float]] = {m: [] for m in MODES}
    before = torch.get_num_threads()
    try:
        with torch.inference_mode():
            for fn in runs.values():  # warm-up: oneDNN primitives, thread pools
                fn()
            for _ in range(repeats):
                for mode, fn in runs.items():
                    times[mode].append(_timed(fn))
    finally:
        sliced.pool.shutdown()
        torch.set_num_threads(before)
    total = batch * calls
    out: dict[str, Any] = {}
    for mode, secs in times.items():
        rates = sorted(total / s for s in secs)
        out[mode] = {
            "rows_per_s": round(statistics.median(rates), 1),
            "min": round(rates[0], 1),
            "max": round(rates[-1], 1),
        }
    base = out["intra-op"]["rows_per_s"]
    for mode in MODES:
        out[mode]["x_intra_op"] = round(out[mode]["rows_per_s"] / base, 3)
    out["one-thread"]["x_intra_op_if_linear"] = round(threads * out["one-thread"]["rows_per_s"] / base, 3)
    return out


def profile_ops(gen: Generator, rows: int, calls: int = 5, top: int = 12) -> list[dict[str, Any]]:
    """The `top` ops by self CPU time of one-thread UNet calls on `rows` rows (diffusers' processors):
    op, input shapes, calls and ms per UNet call, share of all ops' self time."""
    from torch.profiler import profile

    from tckr_engine.engine.sampler import unet_fn

    call = unet_fn(gen.unet.eval().requires_grad_(False))
    x, t, context = _inputs(gen, rows)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            call(x, t, context)  # warm-up
            with profile(record_shapes=True) as prof:
                for _ in range(calls):
                    call(x, t, context)
    finally:
        torch.set_num_threads(before)
    events = prof.key_averages(group_by_input_shape=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return [
        {
            "op": e.key,
            "input_shapes": str(e.input_shapes),
            "calls_per_unet_call": e.count / calls,
            "self_ms_per_unet_call": round(e.self_cpu_time_total / calls / 1e3, 3),
            "share": round(e.self_cpu_time_total / total, 4),
        }
        for e in ranked
    ]


def run(
    preset: str,
    *,
    threads: int,
    batch: int,
    rows: int,
    calls: int,
    repeats: int,
    profile: bool = False,
) -> dict[str, Any]:
    from tckr_engine.bench.flops import device_name
    from tckr_engine.bench.kernels import git_sha
    from tckr_engine.engine.spec import versions
    from tckr_engine.models.generator import build_preset

    gen = build_preset(preset)
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    modes = measure(gen, threads=threads, batch=batch, rows=rows, calls=calls, repeats=repeats)
    result = {
        "preset": preset,
        "threads": threads,
        "batch_rows": batch,
        "slice_rows": rows,
        "calls_per_repeat": calls,
        "repeats": repeats,
        "modes": modes,
        "device": device_name(torch.device("cpu")),
        "cpu_count": os.cpu_count(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "versions": versions(),
        "git_sha": git_sha(),
        "started": started,
    }
    if profile:
        result["profile_one_thread"] = profile_ops(gen, rows)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description="UNet rows/sec on the CPU with the same kernels, five ways.")
    parser.add_argument("--preset", default="tiny-fmnist")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=128, help="rows per batch (the bench: 64 images x CFG)")
    parser.add_argument("--rows", type=int, default=32, help="rows per slice (engine: CPU_ROWS_PER_THREAD)")
    parser.add_argument("--calls", type=int, default=4, help="batch-sized calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    parser.add_argument("--profile", action="store_true", help="also profile one call's ops (one thread)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(
        args.preset,
        threads=args.threads,
        batch=args.batch,
        rows=args.rows,
        calls=args.calls,
        repeats=args.repeats,
        profile=args.profile,
    )
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
        log.info("wrote %s", args.out)
    for mode in MODES:
        m = result["modes"][mode]
        log.info("%-16s %8.1f rows/s  (%.2fx intra-op)", mode, m["rows_per_s"], m["x_intra_op"])
    for op in result.get("profile_one_thread", []):
        log.info("%5.1f %%  %-48s %s", 100 * op["share"], op["op"][:48], op["input_shapes"][:60])


if __name__ == "__main__":
    main()
