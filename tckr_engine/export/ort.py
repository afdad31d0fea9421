"""ONNX Runtime sessions for exported models: CPU, CUDA or TensorRT execution providers.

`OrtRunner.run(feeds, out_shapes)` takes and returns torch tensors. On the CPU it goes through numpy
(zero-copy views). On a GPU it uses IOBinding: inputs and preallocated outputs are bound by device pointer,
so tensors never leave the device, and the providers run on PyTorch's current CUDA stream
(`user_compute_stream`), so no host synchronisation is needed between PyTorch and ONNX Runtime work.

Provider options (REFERENCE.md §6): the CUDA EP gets the device and stream; the TensorRT EP additionally
gets engine and timing cache folders and the min/opt/max profile of every input. `trt_fp16_enable` stays
off on purpose: precision lives in the graph (the fp16 export), which keeps the EP's TensorRT network
strongly typed on TensorRT 10 and is the only mode TensorRT 11 has.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tckr_engine.errors import TckrError
from tckr_engine.export.contract import Profile, Shape

log = logging.getLogger(__name__)

PROVIDERS = ("cpu", "cuda", "tensorrt")
_EP = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
_NP = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8}
_TORCH = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16, "tensor(uint8)": torch.uint8}


def import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise TckrError(
            "backend onnxruntime needs the onnxruntime package: pip install onnxruntime (CPU) "
            "or onnxruntime-gpu (CUDA / TensorRT providers)"
        ) from None
    return onnxruntime


def check_provider(provider: str) -> None:
    """A TckrError when the installed onnxruntime lacks the execution provider."""
    if provider not in PROVIDERS:
        raise TckrError(f"onnxruntime provider must be one of {', '.join(PROVIDERS)}; got {provider!r}")
    ort = import_ort()
    if _EP[provider] not in ort.get_available_providers():
        hint = "pip install onnxruntime-gpu" + (" and tensorrt" if provider == "tensorrt" else "")
        raise TckrError(
            f"the installed onnxruntime {ort.__version__} has no {_EP[provider]} "
            f"(available: {', '.join(ort.get_available_providers())}); {hint}"
        )


def profile_option(profile: dict[str, Profile], which: str) -> str:
    """ORT TensorRT EP profile string: "name:1x4x64x64,other:1x77x768" for which in min/opt/max."""
    return ",".join(f"{name}:{'x'.join(map(str, getattr(p, which)))}" for name, p in profile.items())


def provider_options(
    provider: str,
    device_id: int,
    stream: int | None,
    profile: dict[str, Profile] | None,
    cache_dir: Path | None,
) -> list[tuple[str, dict[str, Any]]]:
    """The (provider, options) list for InferenceSession, best first, CPU last as the fallback."""
    if provider == "cpu":
        return [("CPUExecutionProvider", {})]
    cuda: dict[str, Any] = {"device_id": device_id}
    if stream:  # ORT treats 0 (PyTorch's legacy default stream) as "none given": it then uses that stream too
        cuda["user_compute_stream"] = str(stream)
    out = [("CUDAExecutionProvider", cuda), ("CPUExecutionProvider", {})]
    if provider == "tensorrt":
        trt: dict[str, Any] = {**cuda, "trt_fp16_enable": False}  # precision comes from the graph
        if cache_dir is not None:
            cache_dir.mkdir(parents=True, exist_ok=True)
            trt.update(
                trt_engine_cache_enable=True,
                trt_engine_cache_path=str(cache_dir),
                trt_timing_cache_enable=True,
                trt_timing_cache_path=str(cache_dir),
            )
        if profile:
            trt.update(
                trt_profile_min_shapes=profile_option(profile, "min"),
                trt_profile_opt_shapes=profile_option(profile, "opt"),
                trt_profile_max_shapes=profile_option(profile, "max"),
            )
        out.insert(0, ("TensorrtExecutionProvider", trt))
    return out


class OrtRunner:
    """An InferenceSession on one device that takes and returns torch tensors."""

    def __init__(
        self,
        path: str | Path,
        device: torch.device,
        provider: str = "cpu",
        threads: int | None = None,
        profile: dict[str, Profile] | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        ort = import_ort()
        check_provider(provider)
        if (provider == "cpu") != (device.type == "cpu"):
            raise TckrError(f"onnxruntime provider {provider} cannot run on device {device}")
        self.device = device
        self.gpu = device.type == "cuda"
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3  # errors only: the TensorRT EP is chatty
        if threads:  # CPU results depend on the thread count (run.json records it)
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        device_id = device.index if device.index is not None else 0
        stream = torch.cuda.current_stream(device).cuda_stream if self.gpu else None
        providers = provider_options(provider, device_id, stream, profile, cache_dir)
        try:
            self.session = ort.InferenceSession(
                str(path),
                opts,
                providers=[p for p, _ in providers],
                provider_options=[o for _, o in providers],
            )
        except Exception as e:  # onnxruntime raises its own exception types (Fail, InvalidGraph, ...)
            raise TckrError(f"onnxruntime cannot load {path}: {str(e).strip().splitlines()[0]}") from None
        used = self.session.get_providers()
        if used[0] != providers[0][0]:
            log.warning("onnxruntime fell back to %s (asked for %s)", used[0], providers[0][0])
        self.input_types = {i.name: i.type for i in self.session.get_inputs()}
        self.output_types = {o.name: o.type for o in self.session.get_outputs()}
        log.info("onnxruntime session on %s with %s", device, ", ".join(used))

    def run(self, feeds: dict[str, torch.Tensor], out_shapes: dict[str, Shape]) -> dict[str, torch.Tensor]:
        """Run the graph; inputs are cast to the graph's dtypes, outputs have the given shapes."""
        feeds = {k: v.to(_TORCH[self.input_types[k]]).contiguous() for k, v in feeds.items()}
        if not self.gpu:
            got = self.session.run(list(out_shapes), {k: v.numpy() for k, v in feeds.items()})
            return {k: torch.from_numpy(a) for k, a in zip(out_shapes, got, strict=True)}
        binding = self.session.io_binding()
        idx = self.device.index if self.device.index is not None else 0
        for name, t in feeds.items():
            ty = self.input_types[name]
            binding.bind_input(name, "cuda", idx, _NP[ty], tuple(t.shape), t.data_ptr())
        outs = {}
        for name, shape in out_shapes.items():
            ty = self.output_types[name]
            outs[name] = torch.empty(shape, dtype=_TORCH[ty], device=self.device)
            binding.bind_output(name, "cuda", idx, _NP[ty], tuple(shape), outs[name].data_ptr())
        self.session.run_with_iobinding(binding)
        return outs
