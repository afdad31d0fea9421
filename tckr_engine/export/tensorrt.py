"""TensorRT engines from exported ONNX graphs: a strongly typed build with one optimisation profile and a
timing cache, and a runner that executes on PyTorch's current CUDA stream (`execute_async_v3`).

Typing (REFERENCE.md §6): TensorRT 11 removed weak typing (`BuilderFlag.FP16` and friends are gone), so the
precision comes from the graph: fp16 engines are built from the fp16 ONNX export. The network is created
with `NetworkDefinitionCreationFlag.STRONGLY_TYPED`, which TensorRT 10 needs for the same semantics and
TensorRT 11 accepts (strong typing is unconditional there). No precision builder flag is ever set.

Caches: an engine is specific to the TensorRT version, the GPU (name and compute capability), the graph
(sha256 of the ONNX files) and the profile; its file name is a digest of all four. The timing cache is one
file per TensorRT version and GPU, shared by every build. `tensorrt` is imported lazily: it is an optional
GPU dependency (`pip install 'tckr-engine[gpu]'`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from tckr_engine.errors import TckrError
from tckr_engine.export.contract import Profile
from tckr_engine.fsutil import atomic_write

log = logging.getLogger(__name__)

WORKSPACE_FRACTION = 0.5  # at most half of the GPU's memory for tactic workspace during a build


def import_tensorrt() -> Any:
    try:
        import tensorrt
    except ImportError:
        raise TckrError(
            "backend tensorrt needs NVIDIA TensorRT 10 or 11: pip install tensorrt (on a CUDA machine)"
        ) from None
    return tensorrt


def gpu_id(device: torch.device) -> str:
    """GPU name and compute capability, e.g. 'NVIDIA H100 80GB HBM3 sm90' (engines are per GPU)."""
    props = torch.cuda.get_device_properties(device)
    return f"{props.name} sm{props.major}{props.minor}"


def engine_key(onnx_sha256: str, profile: dict[str, Profile], device: torch.device) -> str:
    """Digest naming an engine: TensorRT version, GPU, graph and profile."""
    trt = import_tensorrt()
    key = {
        "tensorrt": trt.__version__,
        "gpu": gpu_id(device),
        "onnx": onnx_sha256,
        "profile": {name: p.as_dict() for name, p in profile.items()},
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def timing_cache_path(cache_dir: Path, device: torch.device) -> Path:
    trt = import_tensorrt()
    props = torch.cuda.get_device_properties(device)
    return cache_dir / f"timing-trt{trt.__version__}-sm{props.major}{props.minor}.cache"


def build_engine(
    onnx_path: Path,
    profile: dict[str, Profile],
    engine_path: Path,
    timing_cache: Path,
    device: torch.device,
) -> Path:
    """Parse `onnx_path`, build a strongly typed engine for `profile`, write it atomically."""
    trt = import_tensorrt()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strong is None:
        raise TckrError(
            f"TensorRT {trt.__version__} has no strongly typed networks; install TensorRT 10 or 11"
        )
    network = builder.create_network(1 << int(strong))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a path: external weights are found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TckrError(f"TensorRT cannot parse {onnx_path}: {errors or 'unknown error'}")
    config = builder.create_builder_config()
    total = torch.cuda.get_device_properties(device).total_memory
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(total * WORKSPACE_FRACTION))
    opt_profile = builder.create_optimization_profile()
    for name, p in profile.items():
        opt_profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TckrError(f"TensorRT could not build an engine from {onnx_path} (see the TensorRT log above)")
    engine_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(engine_path, bytes(plan))
    atomic_write(timing_cache, bytes(config.get_timing_cache().serialize()))
    log.info("built TensorRT %s engine %s in %.0f s", trt.__version__, engine_path, time.perf_counter() - t0)
    return engine_path


def cached_engine(onnx_dir: Path, profile: dict[str, Profile], cache_dir: Path, device: torch.device) -> Path:
    """The engine for an export folder and profile, built on first use into `cache_dir`."""
    from tckr_engine.export.onnx_export import MODEL_FILE, read_export

    info = read_export(onnx_dir)
    path = cache_dir / f"engine-{engine_key(info['sha256'], profile, device)}.plan"
    if not path.is_file():
        build_engine(onnx_dir / MODEL_FILE, profile, path, timing_cache_path(cache_dir, device), device)
    return path


class TrtRunner:
    """A deserialised engine and one execution context; runs on the current CUDA stream."""

    def __init__(self, engine_path: Path, device: torch.device) -> None:
        trt = import_tensorrt()
        self.trt, self.device = trt, device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise TckrError(f"TensorRT cannot load {engine_path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        to_torch = {
            trt.DataType.FLOAT: torch.float32,
            trt.DataType.HALF: torch.float16,
            trt.DataType.INT32: torch.int32,
            trt.DataType.INT64: torch.int64,
            trt.DataType.UINT8: torch.uint8,
        }
        self.dtypes = {n: to_torch[self.engine.get_tensor_dtype(n)] for n in names}

    def run(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Enqueue one inference on the current stream; outputs are new tensors on the device."""
        keep = []
        for name in self.inputs:
            t = feeds[name].to(self.device, self.dtypes[name]).contiguous()
            keep.append(t)  # alive until enqueued; the caching allocator orders reuse on this stream
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            outs[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, outs[name].data_ptr())
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise TckrError("TensorRT execution failed (execute_async_v3 returned False)")
        return outs
