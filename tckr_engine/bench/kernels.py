"""Attention kernel micro-benchmark: our Triton kernel vs every SDPA backend (and xformers) at UNet shapes.

Each row carries its speed (ms, TFLOP/s from the explicit formula 4·B·H·Sq·Sk·D) with its quality (max
abs error against the fp32 `attention_ref`) and with the device, torch/triton versions and git sha.
Results go to `out_dir/kernels.{csv,json}` and `kernels.png` (when matplotlib imports).

    python -m tckr_engine.bench.kernels --out-dir docs/bench/kernels            # CUDA: fp16 + bf16
    python -m tckr_engine.bench.kernels --device cpu --repeats 1 --shapes small-d32-s49
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tckr_engine.config import check_training_device
from tckr_engine.errors import TckrError
from tckr_engine.kernels.attention import HAS_TRITON, attention_flops, interpreting, triton_attention
from tckr_engine.kernels.reference import attention_ref

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SDPA_BACKENDS = {
    "sdpa-flash": SDPBackend.FLASH_ATTENTION,
    "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
    "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION,
    "sdpa-math": SDPBackend.MATH,
}
COLUMNS = [
    "shape", "kind", "batch", "heads", "seq_q", "seq_k", "head_dim", "dtype", "backend", "status",
    "ms", "tflops", "max_abs_err", "device", "torch", "triton", "git_sha",
]  # fmt: skip


@dataclass(frozen=True)
class Shape:
    """One attention call: q (batch, heads, seq_q, head_dim), k/v (batch, heads, seq_k, head_dim)."""

    name: str
    batch: int
    heads: int
    seq_q: int
    seq_k: int
    head_dim: int

    @property
    def kind(self) -> str:
        return "self" if self.seq_q == self.seq_k else "cross"


# SD 1.5 at 512² (64² latents): 8 heads, head dims 40/80/160 at 64²/32²/16² tokens, cross-attention to
# 77 CLIP tokens; batch 4 = two images with classifier-free guidance. The small shapes are the built-in
# pixel UNets (7² and 14² tokens on 28² inputs) and windowed attention, where launch overheads show.
SHAPES = [
    Shape("sd15-self-64x64", 4, 8, 4096, 4096, 40),
    Shape("sd15-cross-64x64", 4, 8, 4096, 77, 40),
    Shape("sd15-self-32x32", 4, 8, 1024, 1024, 80),
    Shape("sd15-cross-32x32", 4, 8, 1024, 77, 80),
    Shape("sd15-self-16x16", 4, 8, 256, 256, 160),
    Shape("sd15-cross-16x16", 4, 8, 256, 77, 160),
    Shape("small-d32-s49", 64, 4, 49, 49, 32),
    Shape("small-d64-s49", 64, 4, 49, 49, 64),
    Shape("small-d32-s196", 64, 4, 196, 196, 32),
    Shape("small-d64-s196", 64, 4, 196, 196, 64),
]


def git_sha() -> str:
    """HEAD of the checkout holding this package, "+dirty" appended when tracked files differ from it (a
    result measured on uncommitted code says so), or "unknown"."""
    try:
        res = subprocess.run(
            ["git", "describe", "--always", "--exclude=*", "--abbrev=40", "--dirty=+dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return res.stdout.strip() if res.returncode == 0 and res.stdout.strip() else "unknown"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _time_ms(fn: Callable[[], torch.Tensor], repeats: int, device: torch.device) -> float:
    """Mean milliseconds per call over `repeats` calls, after two warm-up calls (compile, autotune)."""
    fn()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / repeats
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _backends(device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    """name -> fn(q, k, v, scale) for every backend worth trying on `device`."""
    fns: dict[str, Callable[..., torch.Tensor]] = {}
    if HAS_TRITON and device.type == "cuda" and not interpreting():
        fns["triton"] = lambda q, k, v, s: triton_attention(q, k, v, scale=s)
    for name, backend in SDPA_BACKENDS.items():
        if device.type != "cuda" and backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            continue  # CUDA-only backends

        def sdpa(
            q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, s: float, backend: SDPBackend = backend
        ) -> torch.Tensor:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=s)

        fns[name] = sdpa
    if device.type == "cuda":
        try:
            import xformers.ops as xops

            # xformers wants (B, S, H, D); the transposes are views, so the layout cost is in the kernel.
            fns["xformers"] = lambda q, k, v, s: xops.memory_efficient_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=s
            ).transpose(1, 2)
        except ImportError:
            log.info("xformers not installed: no xformers rows")
    return fns


def run_kernel_bench(
    out_dir: str | Path,
    device: str | torch.device = "cuda",
    dtypes: Sequence[str] = ("fp16", "bf16"),
    repeats: int = 20,
    shapes: Sequence[str] | None = None,
    batch: int | None = None,
    seed: int = 0,
) -> list[dict]:
    """Benchmark every backend at every shape and dtype; write CSV, JSON and a plot into `out_dir`.

    Args:
        out_dir: folder for kernels.csv / kernels.json / kernels.png (created).
        device: "cuda" or "cpu". On CPU only the SDPA backends run (the Triton rows need CUDA).
        dtypes: names from `DTYPES` ("fp32", "fp16", "bf16").
        repeats: timed calls per row (warm-up excluded).
        shapes: names from `SHAPES` to run (default all).
        batch: override every shape's batch (small values keep CPU runs quick).
        seed: inputs are `torch.randn` from this seed.

    Returns:
        One dict per (shape, dtype, backend) with the keys in `COLUMNS`; `status` is "ok" or why the
        backend could not run ("unsupported: ..."), in which case ms / tflops / max_abs_err are None.
    """
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be cpu or cuda, got {device!r}") from None
    check_training_device(device.type)  # cpu, or cuda when torch sees a GPU (one TckrError line)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        raise ValueError(f"unknown dtypes {unknown}: use {', '.join(DTYPES)}")
    by_name = {s.name: s for s in SHAPES}
    missing = [n for n in shapes or [] if n not in by_name]
    if missing:
        raise ValueError(f"unknown shapes {missing}: use {', '.join(by_name)}")
    selected = [by_name[n] for n in shapes] if shapes else SHAPES

    meta = {
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__ if HAS_TRITON else "none",
        "git_sha": git_sha(),
    }
    backends = _backends(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rows: list[dict] = []
    with warnings.catch_warnings():
        # SDPA warns on every backend that declines a shape; the row's status already says so.
        warnings.filterwarnings("ignore", category=UserWarning, module="torch")
        for shape in selected:
            rows += _bench_shape(shape, batch or shape.batch, dtypes, backends, device, repeats, gen, meta)
    _write(Path(out_dir), rows, meta)
    return rows


def _bench_shape(
    shape: Shape,
    b: int,
    dtypes: Sequence[str],
    backends: dict[str, Callable[..., torch.Tensor]],
    device: torch.device,
    repeats: int,
    gen: torch.Generator,
    meta: dict,
) -> list[dict]:
    """The rows of one shape: every dtype x backend, each with time, TFLOP/s and error vs fp32."""
    rows: list[dict] = []
    flops = attention_flops(b, shape.heads, shape.seq_q, shape.seq_k, shape.head_dim)
    scale = shape.head_dim**-0.5
    for dname in dtypes:
        dtype = DTYPES[dname]
        # Made (B, S, H, D) and viewed (B, H, S, D), the layout diffusers hands to attention (row stride
        # H*D, a multiple of 16 elements even for D=40, which keeps loads vectorised).
        q, k, v = (
            torch.randn(b, s, shape.heads, shape.head_dim, generator=gen).to(device, dtype).transpose(1, 2)
            for s in (shape.seq_q, shape.seq_k, shape.seq_k)
        )  # (B, H, S, D)
        ref = attention_ref(q, k, v, scale=scale).float()  # fp32 oracle, (B, H, Sq, D)
        for bname, fn in backends.items():
            row = {"shape": shape.name, "kind": shape.kind, "batch": b, "heads": shape.heads}
            row.update(seq_q=shape.seq_q, seq_k=shape.seq_k, head_dim=shape.head_dim, dtype=dname)
            row.update(backend=bname, status="ok", ms=None, tflops=None, max_abs_err=None, **meta)
            call = functools.partial(fn, q, k, v, scale)
            try:
                err = (call().float() - ref).abs().max().item()
                ms = _time_ms(call, repeats, device)
            except (RuntimeError, ValueError, NotImplementedError) as e:
                row["status"] = "unsupported: " + " ".join(str(e).split())[:160]
                log.debug("%s %s %s: %s", shape.name, dname, bname, row["status"])
            else:
                row.update(ms=round(ms, 5), tflops=round(flops / (ms * 1e-3) / 1e12, 4))
                row["max_abs_err"] = float(f"{err:.3g}")
                log.info(
                    "%s %s %-15s %9.4f ms %8.2f TFLOP/s err %.2g",
                    shape.name,
                    dname,
                    bname,
                    ms,
                    row["tflops"],
                    err,
                )
            rows.append(row)
        del q, k, v, ref
    return rows


def _write(out_dir: Path, rows: list[dict], meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    payload = {"meta": meta, "flop_formula": "4*batch*heads*seq_q*seq_k*head_dim", "rows": rows}
    (out_dir / "kernels.json").write_text(json.dumps(payload, indent=1) + "\n")
    _plot(out_dir / "kernels.png", rows, meta)


def _plot(path: Path, rows: list[dict], meta: dict) -> None:
    """Grouped bars of TFLOP/s per shape and backend, one panel per dtype; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    fig, axes = plt.subplots(len(dtypes), 1, figsize=(max(8, 1.1 * len(shapes)), 3.5 * len(dtypes)))
    axes = [axes] if len(dtypes) == 1 else list(axes)
    width = 0.8 / max(1, len(backends))
    for ax, dname in zip(axes, dtypes, strict=True):
        for i, bname in enumerate(backends):
            vals = {
                r["shape"]: r["tflops"] or 0.0 for r in rows if r["dtype"] == dname and r["backend"] == bname
            }
            xs = [j + i * width for j in range(len(shapes))]
            ax.bar(xs, [vals.get(s, 0.0) for s in shapes], width, label=bname)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, rotation=30, ha="right")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"attention forward, {dname}")
        ax.legend(fontsize=7)
    fig.suptitle(
        f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | {meta['git_sha'][:10]}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Attention kernel micro-benchmark (TFLOP/s + error).")
    parser.add_argument("--out-dir", default="docs/bench/kernels")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", default=None, help="comma list of fp32,fp16,bf16 (CUDA: fp16,bf16)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row (CUDA 50, CPU 2)")
    parser.add_argument("--shapes", default=None, help="comma list of shape names (default all)")
    parser.add_argument("--batch", type=int, default=None, help="override every shape's batch")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    on_cuda = args.device.startswith("cuda")
    if (args.repeats is not None and args.repeats < 1) or (args.batch is not None and args.batch < 1):
        parser.error("--repeats and --batch must be integers >= 1")
    try:
        result = run_kernel_bench(
            args.out_dir,
            device=args.device,
            dtypes=(args.dtypes or ("fp16,bf16" if on_cuda else "fp32")).split(","),
            repeats=args.repeats or (50 if on_cuda else 2),
            shapes=args.shapes.split(",") if args.shapes else None,
            batch=args.batch,
        )
    except (ValueError, TckrError) as e:  # bad arguments: one line, exit 2
        parser.error(str(e))
    for r in result:
        speed = (
            f"{r['ms']:9.4f} ms {r['tflops']:8.2f} TFLOP/s err {r['max_abs_err']:.2g}"
            if r["ms"]
            else r["status"]
        )
        log.info("%-18s %-5s %-15s %s", r["shape"], r["dtype"], r["backend"], speed)
    log.info("wrote %s/kernels.csv, kernels.json", args.out_dir)
