"""What a benchmark row is measured against: FLOPs per image, device peaks, measured matmul rate, memory.

- `generation_flops(generator, steps, cfg)`: matmul/conv FLOPs of generating one image, counted with
  `torch.utils.flop_counter.FlopCounterMode` on a meta-device copy of the UNet (and VAE decoder), so nothing
  is computed and SD-sized models cost no time; attention is counted too (on the meta device SDPA
  decomposes into the two batched matmuls). Elementwise work (norms, activations) is not counted, as usual.
- `DEVICE_PEAKS`: dense (no sparsity) tensor-core peaks by device name, the denominator of "fraction of
  peak" on GPUs. CPU rows report achieved GFLOP/s and the fraction of a matmul measured in the same process.
- `measured_matmul_tflops`: one large square matmul in the run's dtype (bf16 on GPUs: the issue's reference).
- `PeakMemory`: the high-water mark over a region: CUDA `max_memory_allocated` (PyTorch's allocator only,
  so ONNX Runtime / TensorRT arenas are not seen), CPU the process RSS high-water mark (`VmHWM`, reset
  through `/proc/self/clear_refs`; `ru_maxrss`, never reset, where that is unavailable).
"""

from __future__ import annotations

import copy
import logging
import platform
import resource
import time
from pathlib import Path
from typing import Any

import torch

from tckr_engine.models.generator import Generator

log = logging.getLogger(__name__)

TFLOP = 1e12
# Dense peaks in FLOP/s by dtype, matched on a substring of torch.cuda.get_device_name() (first match wins,
# so the more specific names come first). H100/H200 SXM bf16/fp16 from REFERENCE.md §6; the rest from the
# vendors' datasheets (dense tensor-core rates, fp32 = non-tensor FP32).
DEVICE_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756 * TFLOP, "fp16": 756 * TFLOP, "fp32": 51 * TFLOP}),
    ("H100 NVL", {"bf16": 835 * TFLOP, "fp16": 835 * TFLOP, "fp32": 60 * TFLOP}),
    ("H100", {"bf16": 989 * TFLOP, "fp16": 989 * TFLOP, "fp32": 67 * TFLOP}),
    ("H200", {"bf16": 989 * TFLOP, "fp16": 989 * TFLOP, "fp32": 67 * TFLOP}),
    ("A100", {"bf16": 312 * TFLOP, "fp16": 312 * TFLOP, "fp32": 19.5 * TFLOP}),
    ("L40S", {"bf16": 362 * TFLOP, "fp16": 362 * TFLOP, "fp32": 91.6 * TFLOP}),
    ("L4", {"bf16": 121 * TFLOP, "fp16": 121 * TFLOP, "fp32": 30.3 * TFLOP}),
    ("A10", {"bf16": 125 * TFLOP, "fp16": 125 * TFLOP, "fp32": 31.2 * TFLOP}),
]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({model or platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def device_peak(name: str, dtype: str) -> float | None:
    """Dense peak FLOP/s of the named device for `dtype`, or None when the table does not know it."""
    for key, peaks in DEVICE_PEAKS:
        if key in name:
            return peaks.get(dtype)
    return None


def _count(fn: Any) -> dict[str, int]:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        fn()
    return {str(op).removeprefix("aten."): int(n) for op, n in counter.get_flop_counts()["Global"].items()}


def _meta_copy(module: torch.nn.Module) -> torch.nn.Module:
    """The same diffusers model class and config, built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        return type(module).from_config(module.config).eval()


def _unet_call(generator: Generator, rows: int, copy_unet: bool = False) -> tuple[Any, torch.nn.Module]:
    """(a function running one UNet call on `rows` zero rows, the UNet it runs), on the meta device."""
    c, h, w = generator.latent_shape
    enc = generator.text_encoder
    dim = int(generator.unet.config.cross_attention_dim)
    try:
        unet, dev = _meta_copy(generator.unet), torch.device("meta")
    except Exception as e:  # a model class without from_config: count on the real weights instead
        log.info("meta-device copy failed (%s); counting FLOPs on the real UNet", e)
        unet, dev = generator.unet, generator.device
        if copy_unet:
            unet = copy.deepcopy(unet)
    x = torch.zeros(rows, c, h, w, device=dev, dtype=generator.dtype)
    ctx = torch.zeros(rows, int(enc.length), dim, device=dev, dtype=generator.dtype)
    t = torch.tensor(500, device=dev)
    return (lambda: unet(x, t, encoder_hidden_states=ctx, return_dict=False)), unet


def unet_flops(generator: Generator, rows: int = 1) -> dict[str, int]:
    """FLOPs of one UNet call on `rows` rows, by aten op (convolution, addmm, mm, bmm, ...)."""
    return _count(_unet_call(generator, rows)[0])


def cross_kv_flops(generator: Generator, rows: int = 1) -> int:
    """FLOPs of one UNet call that the engine's cross-attention key cache (kernels/kv_cache.py) skips on
    every call of a sampling loop after the first: the first call in the scope minus the second."""
    from tckr_engine.kernels.kv_cache import cross_attention_kv_cache
    from tckr_engine.kernels.processor import set_attention_backend

    call, unet = _unet_call(generator, rows, copy_unet=True)
    set_attention_backend(unet, "sdpa")  # the engine's processor
    with cross_attention_kv_cache():
        first, cached = (sum(_count(call).values()) for _ in range(2))
    return int(first - cached)


def decode_flops(generator: Generator) -> dict[str, int]:
    """FLOPs of decoding one image (the VAE decoder of latent models; pixel models decode for free)."""
    if generator.vae is None:
        return {}
    c, h, w = generator.latent_shape
    vae = _meta_copy(generator.vae)
    z = torch.zeros(1, c, h, w, device="meta", dtype=generator.dtype)
    return _count(lambda: vae.decode(z, return_dict=False))


def generation_flops(generator: Generator, steps: int, cfg: bool) -> dict[str, Any]:
    """FLOPs per generated image: steps x UNet rows per image (2 with classifier-free guidance) + decode."""
    per_call = unet_flops(generator, 1)
    decode = decode_flops(generator)
    rows_per_step = 2 if cfg else 1
    calls = steps * rows_per_step
    total = calls * sum(per_call.values()) + sum(decode.values())
    return {
        "flops_per_image": int(total),
        "unet_flops_per_row": int(sum(per_call.values())),
        "unet_flops_by_op": per_call,
        "unet_rows_per_image": calls,
        # not done by the engine's eager loop (calls after the first reuse the keys): the rows' GFLOP/s
        # use flops_per_image for every row, the work as diffusers does it
        "cross_kv_flops_skipped_per_image": (steps - 1) * rows_per_step * cross_kv_flops(generator),
        "decode_flops_per_image": int(sum(decode.values())),
        "counted_with": "torch.utils.flop_counter.FlopCounterMode (matmul, conv, attention; meta device)",
    }


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measured_matmul_tflops(device: torch.device, dtype: torch.dtype, repeats: int = 5) -> dict[str, Any]:
    """Best-of-`repeats` rate of one n x n x n matmul (n = 8192 on a GPU, 1024 on the CPU), in TFLOP/s."""
    n = 8192 if device.type == "cuda" else 1024
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(device, dtype)
    b = torch.randn(n, n, generator=gen).to(device, dtype)
    with torch.inference_mode():
        torch.mm(a, b)
        best = float("inf")
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "tflops": round(2 * n**3 / best / TFLOP, 4)}


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.mb` (MiB), `m.kind` (what was measured) and
    `m.minor_faults`: the process's minor page faults in the block (pages the kernel mapped and
    zero-filled on first touch: memory the allocator had handed back and took again; `allocator.py`)."""

    _CLEAR = Path("/proc/self/clear_refs")
    _STATUS = Path("/proc/self/status")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.mb: float | None = None
        self.kind = "cuda max_memory_allocated" if device.type == "cuda" else "process RSS high-water"
        self.minor_faults: int | None = None
        self._faults0 = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            try:
                self._CLEAR.write_text("5")  # resets the RSS high-water mark of this process
            except OSError:
                self.kind = "process RSS high-water since start (ru_maxrss)"
        self._faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        return self

    def __exit__(self, *exc: object) -> None:
        self.minor_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults0
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return
        self.mb = self._rss_hwm_mb()

    def _rss_hwm_mb(self) -> float:
        try:
            for line in self._STATUS.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
        except OSError:
            pass
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
