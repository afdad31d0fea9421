"""Denoiser backends: one interface (`Denoiser`, a `DenoiseFn`), chosen by `generate --backend`.

- `torch`: the eager diffusers UNet forward.
- `compile`: `torch.compile` of the per-step UNet call, static shapes (the BatchScheduler pads the last
  batch, so every call has the same shape). On a GPU mode "reduce-overhead" (CUDA graphs); each call marks
  a new cudagraph step and clones the output, whose static buffer the next replay overwrites.
  `$TCKR_COMPILE_BACKEND` picks the dynamo backend (default inductor; tests use aot_eager to stay cheap).
- `onnxruntime`: the UNet exported to ONNX (cache keyed by generator id, precision, opset and versions),
  run by an InferenceSession: CPU provider on the CPU; CUDA provider on a GPU, or ONNX Runtime's TensorRT
  provider with `$TCKR_ORT_PROVIDER=tensorrt` (engine and timing caches, min/opt/max profile); IOBinding
  on the GPU so tensors stay on the device.
- `tensorrt`: a strongly typed TensorRT engine built from the fp16 (or fp32) ONNX export with a profile
  fixed at the run's batch, cached per TensorRT version, GPU and profile; `execute_async_v3` on the
  current CUDA stream.
Backends that cannot run here fail at `check_backend` (called when the run spec is resolved) with one line.

On the CPU every backend but TensorRT runs the UNet on row slices, so activations of a slice stay in the
cores' caches between layers: `torch` and `onnxruntime` run groups of images whose UNet calls have
`CPU_ROWS_PER_THREAD` rows, each group's whole sampling loop on its own worker thread with a one-thread
denoiser (`ParallelSlices`, `Engine.sample`); `compile` runs slices of `CPU_ROWS_PER_THREAD x threads` rows
one after another on all threads (`MicroBatched`). The slicing is part of the run spec (`cpu_slicing`), so
shards stay byte-identical run to run.
"""

from __future__ import annotations

import logging
import os
import queue
from collections.abc import Callable, Iterable
from typing import Any, ClassVar, TypeVar

import torch

from tckr_engine.config import BACKENDS
from tckr_engine.engine.sampler import unet_fn
from tckr_engine.errors import TckrError
from tckr_engine.models.generator import Generator

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

COMPILE_BACKEND_ENV = "TCKR_COMPILE_BACKEND"
ORT_PROVIDER_ENV = "TCKR_ORT_PROVIDER"


class Denoiser:
    """Interface: `(x (B, C, h, w), t (scalar tensor), context (B, L, D)) -> model output (B, C, h, w)`."""

    name: ClassVar[str]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchDenoiser(Denoiser):
    """The eager PyTorch UNet."""

    name = "torch"

    def __init__(self, spec: dict[str, Any], generator: Generator) -> None:
        self.fn = unet_fn(generator.unet)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.fn(x, t, context)


class CompiledDenoiser(Denoiser):
    """`torch.compile` of the per-step UNet call; CUDA graphs on a GPU."""

    name = "compile"

    def __init__(self, spec: dict[str, Any], generator: Generator) -> None:
        self.cudagraphs = torch.device(spec["device"]).type == "cuda"
        backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
        inductor = backend == "inductor"
        mode = "reduce-overhead" if self.cudagraphs and inductor else None
        # CPU: freezing folds the (fixed) weights into the graph as constants, which lets inductor prepack
        # them for oneDNN convolutions and MKL linears instead of reordering them on every call; without it
        # the compiled UNet was slower than eager on the CPU (bench notes in docs/bench/README.md).
        options = {"freezing": True} if inductor and not self.cudagraphs else None
        log.info(
            "torch.compile(backend=%s, mode=%s, options=%s, dynamic=False) of the UNet call",
            backend,
            mode,
            options,
        )
        # dynamic=False: one static graph for the padded batch shape (and CUDA graphs need static shapes).
        self.fn = torch.compile(
            unet_fn(generator.unet), backend=backend, mode=mode, options=options, dynamic=False
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
            return self.fn(x, t, context).clone()  # the graph's output buffer is reused by the next replay
        return self.fn(x, t, context)


def forward_batch(spec: dict[str, Any]) -> int:
    """Rows per UNet call: the batch, doubled by classifier-free guidance (one forward for both)."""
    return spec["batch_size"] * (2 if spec["guidance"] > 1.0 else 1)


def unet_profile(spec: dict[str, Any], generator: Generator) -> dict[str, Any]:
    """min = opt = max profile at the run's static UNet shapes (the scheduler pads every batch)."""
    from tckr_engine.export.contract import Profile

    b = forward_batch(spec)
    c, h, w = generator.latent_shape
    enc = generator.text_encoder

    def fixed(*shape: int) -> Profile:
        return Profile(shape, shape, shape)

    return {
        "sample": fixed(b, c, h, w),
        "timestep": fixed(1),
        "encoder_hidden_states": fixed(b, int(enc.length), int(generator.unet.config.cross_attention_dim)),
    }


def ort_provider(device: torch.device) -> str:
    """cpu on the CPU; on a GPU cuda, or tensorrt when `$TCKR_ORT_PROVIDER=tensorrt`."""
    if device.type == "cpu":
        return "cpu"
    choice = os.environ.get(ORT_PROVIDER_ENV, "cuda")
    if choice not in ("cuda", "tensorrt"):
        raise TckrError(f"{ORT_PROVIDER_ENV} must be cuda or tensorrt on a GPU, got {choice!r}")
    return choice


class _OnnxUNet(Denoiser):
    """Shared by the ONNX-based backends: feeds (sample, timestep (1,) fp32, context), returns noise_pred."""

    def __init__(self, spec: dict[str, Any], generator: Generator) -> None:
        self.device = torch.device(spec["device"])
        self.out_channels = int(generator.unet.config.out_channels)

    def feeds(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict[str, torch.Tensor]:
        t = t.reshape(1).to(self.device, torch.float32)  # (1,): the UNet broadcasts it over the batch
        return {"sample": x, "timestep": t, "encoder_hidden_states": context}


class OnnxRuntimeDenoiser(_OnnxUNet):
    """The cached ONNX export run by ONNX Runtime (CPU, CUDA or TensorRT execution provider)."""

    name = "onnxruntime"

    def __init__(self, spec: dict[str, Any], generator: Generator) -> None:
        from tckr_engine.export.cache import cache_root, cached_unet_export
        from tckr_engine.export.onnx_export import MODEL_FILE
        from tckr_engine.export.ort import OrtRunner

        super().__init__(spec, generator)
        folder = cached_unet_export(generator, spec["dtype"], forward_batch(spec))
        provider = ort_provider(self.device)
        self.runner = OrtRunner(
            folder / MODEL_FILE,
            self.device,
            provider,
            threads=spec["threads"] if provider == "cpu" else None,
            profile=unet_profile(spec, generator) if provider == "tensorrt" else None,
            cache_dir=cache_root() / "ort-tensorrt" if provider == "tensorrt" else None,
        )

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        out = self.runner.run(self.feeds(x, t, context), {"noise_pred": (b, self.out_channels, h, w)})
        return out["noise_pred"].to(x.dtype)  # (B, C, h, w)


class TensorRTDenoiser(_OnnxUNet):
    """A strongly typed TensorRT engine built from the cached ONNX export."""

    name = "tensorrt"

    def __init__(self, spec: dict[str, Any], generator: Generator) -> None:
        from tckr_engine.export.cache import cache_root, cached_unet_export
        from tckr_engine.export.tensorrt import TrtRunner, cached_engine

        super().__init__(spec, generator)
        folder = cached_unet_export(generator, spec["dtype"], forward_batch(spec))
        engine = cached_engine(folder, unet_profile(spec, generator), cache_root() / "tensorrt", self.device)
        self.runner = TrtRunner(engine, self.device)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.runner.run(self.feeds(x, t, context))["noise_pred"].to(x.dtype)  # (B, C, h, w)


_CLASSES: dict[str, type[Denoiser]] = {
    c.name: c for c in (TorchDenoiser, CompiledDenoiser, OnnxRuntimeDenoiser, TensorRTDenoiser)
}
# Backends that run an exported ONNX graph of the UNet (which holds its own attention); the others run the
# PyTorch UNet, whose attention processors the engine sets.
GRAPH_BACKENDS = (OnnxRuntimeDenoiser.name, TensorRTDenoiser.name)


def check_backend(backend: str, device: str, dtype: str) -> None:
    """One-line TckrError when `backend` cannot run on (device, dtype) here; imports nothing heavy."""
    if backend not in _CLASSES:
        raise TckrError(f"backend must be one of {', '.join(BACKENDS)}; got {backend!r}")
    if backend in GRAPH_BACKENDS:
        if dtype not in ("fp32", "fp16"):
            raise TckrError(f"backend {backend} runs fp32 or fp16 ONNX graphs; use --dtype fp32 or fp16")
        from tckr_engine.export.onnx_export import import_onnx

        import_onnx()
    if backend == "onnxruntime":
        from tckr_engine.export.ort import check_provider

        check_provider(ort_provider(torch.device(device)))
    if backend == "tensorrt":
        if device != "cuda":
            raise TckrError("backend tensorrt needs a CUDA GPU (--device cuda); use onnxruntime on the CPU")
        from tckr_engine.export.tensorrt import import_tensorrt

        import_tensorrt()


# Rows per UNet call on the CPU. Measured on 2-core Xeon (AVX-512) machines, tiny-fmnist, batch 64 with
# guidance (128 rows), 1 thread: 32-row slices vs one 128-row call were 1.11x faster in eager PyTorch (bitwise
# identical images), 1.15x with torch.compile and 1.12x with ONNX Runtime; 8-row slices were slower.
CPU_ROWS_PER_THREAD = 32
# Backends whose slices run side by side, one single-threaded denoiser per worker thread (`ParallelSlices`).
# On the small pixel UNets one thread per slice beats one slice on all threads, whose per-layer tensors are
# too small for intra-op parallelism to pay (tiny-fmnist, 2-core AMD EPYC; docs/bench/README.md): eager
# PyTorch 1.07x -> 1.21x of diffusers with the same images; ONNX Runtime, two one-thread sessions against one
# two-thread session, +10 % on the demo's generate with byte-identical shards. Not compile: dynamo's guards
# and caches are not made for one compiled function called from several threads at once (concurrent calls
# recompiled it until its recompile limit).
PARALLEL_SLICE_BACKENDS = ("torch", "onnxruntime")
# ... and only for UNets this small (the pixel presets have 1-10 M parameters). An SD-size UNet's layers are
# wide enough for intra-op threads: sd15-arch (860 M) at 64 px, 2 steps, eager on 2 cores ran at 0.80x and
# 0.69x of diffusers side by side, 1.15x and 1.14x as one slice on both threads, and side by side also moved
# 0.004 % of its pixels by one grey level (one-thread kernels sum in another order; docs/bench/README.md).
SIDE_BY_SIDE_MAX_UNET_PARAMS = 100_000_000


class MicroBatched(Denoiser):
    """A denoiser run on row slices of at most `rows` rows, outputs concatenated (CPU cache blocking)."""

    def __init__(self, inner: Denoiser, rows: int) -> None:
        self.inner, self.rows, self.name = inner, rows, inner.name

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        r = self.rows
        if x.shape[0] <= r:
            return self.inner(x, t, context)
        parts = [self.inner(x[i : i + r], t, context[i : i + r]) for i in range(0, x.shape[0], r)]
        return torch.cat(parts)  # (B, C, h, w)


class ParallelSlices(Denoiser):
    """Row slices of at most `rows` rows, `len(inners)` at a time on worker threads of one torch thread each.

    A batch of fewer than `rows x workers` rows is cut into `workers` even slices (the sampling loops of
    `Engine.sample` run on groups sized by `group_size` instead). Each slice goes to whichever
    single-threaded denoiser is free; outputs are concatenated in row order, so the result does not depend
    on which worker ran which slice (it can differ in the last bits from the same slices run on several
    threads). The caller's grad / inference mode (per thread in PyTorch) holds in the workers too.
    """

    def __init__(self, inners: list[Denoiser], rows: int, balanced: bool = True) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.rows, self.workers, self.name = rows, len(inners), inners[0].name
        self.balanced = balanced  # group sizes by `balanced_part`; False: the rule of run specs before it
        self.free: queue.SimpleQueue[Denoiser] = queue.SimpleQueue()
        for inner in inners:
            self.free.put(inner)
        self.pool = ThreadPoolExecutor(
            len(inners), thread_name_prefix="tckr-unet", initializer=torch.set_num_threads, initargs=(1,)
        )

    def _with_free(self, fn: Callable[[Denoiser, T], R], item: T, modes: tuple[bool, bool]) -> R:
        inner = self.free.get()
        try:
            with torch.inference_mode(modes[0]), torch.set_grad_enabled(modes[1]):
                return fn(inner, item)
        finally:
            self.free.put(inner)

    def map(self, fn: Callable[[Denoiser, T], R], items: Iterable[T]) -> list[R]:
        """`fn(denoiser, item)` for every item on the worker threads, each call with a free single-threaded
        denoiser; results in item order. The caller's grad / inference mode holds in the workers."""
        modes = (torch.is_inference_mode_enabled(), torch.is_grad_enabled())
        futures = [self.pool.submit(self._with_free, fn, item, modes) for item in items]
        return [f.result() for f in futures]

    def group_size(self, items: int, rows_per_item: int) -> int:
        """Items (images) per group when whole sampling loops run side by side (`Engine.sample`): a
        group's UNet call has at most `self.rows` rows, and the groups keep the workers evenly busy
        (`balanced_part`; without `balanced`, as many full groups as fit and the rest)."""
        cap = max(1, self.rows // rows_per_item)
        if self.balanced:
            return balanced_part(items, cap, self.workers)
        return max(1, min(cap, -(-items // self.workers)))

    def slice_rows(self, rows: int) -> int:
        """Rows per slice for a call of `rows` rows: at most `self.rows`, and a small call is still cut
        into `workers` even slices so that every worker is busy."""
        return max(1, min(self.rows, -(-rows // self.workers)))

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        r = self.slice_rows(x.shape[0])
        parts = self.map(lambda model, i: model(x[i : i + r], t, context[i : i + r]), range(0, x.shape[0], r))
        return torch.cat(parts)  # (B, C, h, w)


BALANCE_SLACK = 1.05  # a part size within 5 % of the best schedule's end keeps the larger calls


def balanced_part(items: int, cap: int, workers: int) -> int:
    """Items per part when `items` are cut into parts of at most `cap`, taken in order by `workers` that
    each take the next part when free, every item costing the same: the largest size whose schedule ends
    within `BALANCE_SLACK` of the earliest end (fuller calls run faster per row). E.g. 48 images in groups
    of at most 16 on 2 workers: 12 (24 images each), not 16 (three groups: 32 images on one worker, 16 on
    the other); 100: 16 (52 and 48 images). A UNet call's last float bits can depend on its row count
    (the kernels oneDNN / MKL pick), so the rule is part of the run spec (`cpu_slicing["groups"]`)."""
    ends = {}
    for size in range(1, max(1, min(cap, items)) + 1):
        loads = [0] * workers
        for start in range(0, items, size):
            loads[loads.index(min(loads))] += min(size, items - start)
        ends[size] = max(loads)
    earliest = min(ends.values())
    return max(size for size, end in ends.items() if end <= BALANCE_SLACK * earliest)


# Override of CPU_ROWS_PER_THREAD for profiling (0 = one call for the whole batch). It is recorded in the run
# spec (`cpu_slicing`) like the rest of the slicing, so a folder is never resumed under another slicing.
CPU_ROWS_ENV = "TCKR_CPU_ROWS_PER_THREAD"
# "0" runs every backend's slices one after another on all threads (`MicroBatched`), for A/B measurements of
# the side-by-side arrangement; recorded in the spec the same way.
CPU_SIDE_BY_SIDE_ENV = "TCKR_CPU_SIDE_BY_SIDE"


def cpu_slicing(device: str, backend: str, threads: int, *, unet_params: int) -> dict[str, Any] | None:
    """How the CPU runs the UNet over a batch: slices of `rows` rows, `workers` of them at a time (each on
    one thread when workers > 1, else all `threads` on one slice). None: one call per batch, as on GPUs.

    A pure function of the spec (device, backend, threads, the generator's UNet size), CPU_ROWS_ENV and
    CPU_SIDE_BY_SIDE_ENV; resolve() stores it in the spec.
    """
    if torch.device(device).type != "cpu" or backend == "tensorrt":
        return None
    per_thread = os.environ.get(CPU_ROWS_ENV, "").strip()
    try:
        rows = int(per_thread) if per_thread else CPU_ROWS_PER_THREAD
    except ValueError:
        raise TckrError(f"{CPU_ROWS_ENV} must be an integer (0 = no slicing), got {per_thread!r}") from None
    if rows <= 0:
        return None
    threads = max(1, int(threads or 1))
    side_by_side = os.environ.get(CPU_SIDE_BY_SIDE_ENV, "1").strip()
    if side_by_side not in ("0", "1"):
        raise TckrError(f"{CPU_SIDE_BY_SIDE_ENV} must be 0 or 1, got {side_by_side!r}")
    small = unet_params <= SIDE_BY_SIDE_MAX_UNET_PARAMS
    if backend in PARALLEL_SLICE_BACKENDS and threads > 1 and side_by_side == "1" and small:
        # "groups": how Engine.sample sizes its groups of images (`balanced_part`). A spec without it was
        # written before that rule: built from, it keeps the old groups; `generate` refuses to resume its
        # folder under the new spec (a changed cpu_slicing) instead of mixing the two
        return {"rows": rows, "workers": threads, "groups": "balanced"}
    return {"rows": rows * threads, "workers": 1}


def make_denoiser(spec: dict[str, Any], generator: Generator) -> Denoiser:
    """The denoiser for the spec's backend, on the generator already moved to the spec's device/dtype."""
    backend = spec.get("backend", "torch")
    check_backend(backend, spec["device"], spec["dtype"])
    slicing = spec.get("cpu_slicing")
    if slicing is None:
        return _CLASSES[backend](spec, generator)
    if slicing["workers"] > 1:  # one single-threaded denoiser per worker
        inners = [_CLASSES[backend]({**spec, "threads": 1}, generator) for _ in range(slicing["workers"])]
        return ParallelSlices(inners, slicing["rows"], balanced=slicing.get("groups") == "balanced")
    return MicroBatched(_CLASSES[backend](spec, generator), slicing["rows"])
