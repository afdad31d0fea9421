"""`tckr-engine export`: one validated config, one function.

A generator (preset, saved folder, SD checkpoint or LoRA folder, fused at load) exports its UNet; a
classifier folder (`classifier.json`) exports the classifier. Optionally the fp16 graph, and a TensorRT
engine built from it beside the ONNX file (`model.plan`, needs a CUDA GPU and TensorRT).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tckr_engine.errors import TckrError
from tckr_engine.export.onnx_export import INFO_FILE, MIN_OPSET, MODEL_FILE, check_opset, export_onnx
from tckr_engine.fsutil import write_json

log = logging.getLogger(__name__)

KINDS = ("auto", "unet", "classifier")
ENGINE_FILE = "model.plan"


@dataclass
class ExportConfig:
    """What `tckr-engine export` does. Batch sizes are rows per model call (a UNet call with classifier-free
    guidance has twice as many rows as images)."""

    model: str  # generator preset / folder, or a classifier folder
    out: str  # export folder to create (model.onnx, export.json[, model.plan])
    kind: str = "auto"  # auto: classifier when `model` holds classifier.json, else the generator's UNet
    opset: int = MIN_OPSET
    fp16: bool = False  # convert the graph to fp16 (for GPUs; TensorRT builds strongly typed from it)
    batch_size: int = 16  # the profile's opt batch
    max_batch_size: int | None = None  # the profile's max batch; defaults to batch_size
    min_batch_size: int = 1
    image_size: int | None = None  # override a generator preset's resolution
    tensorrt: bool = False  # also build a TensorRT engine for the profile (CUDA GPU + tensorrt)
    overwrite: bool = False
    verify: bool = True  # compare ONNX Runtime (CPU) with PyTorch on the sample input, record it

    def validate(self) -> ExportConfig:
        if self.kind not in KINDS:
            raise TckrError(f"kind must be one of {', '.join(KINDS)}; got {self.kind!r}")
        check_opset(self.opset)
        for name in ("batch_size", "min_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TckrError(f"{name} must be a positive integer, got {value!r}")
        hi = self.max_batch_size if self.max_batch_size is not None else self.batch_size
        if not self.min_batch_size <= self.batch_size <= hi:
            raise TckrError(
                f"batch sizes must satisfy min <= batch <= max, got {self.min_batch_size}, "
                f"{self.batch_size}, {hi}"
            )
        if not self.model:
            raise TckrError("model must be a generator preset or folder, or a classifier folder")
        return self


def _is_classifier(model: str) -> bool:
    from tckr_engine.models.classifier import CONFIG_NAME

    return (Path(model).expanduser() / CONFIG_NAME).is_file()


def _module(cfg: ExportConfig) -> tuple[Any, str]:
    """The Exportable wrapper for the config's model and its kind."""
    kind = cfg.kind if cfg.kind != "auto" else ("classifier" if _is_classifier(cfg.model) else "unet")
    batches = {"opt_batch": cfg.batch_size, "max_batch": cfg.max_batch_size, "min_batch": cfg.min_batch_size}
    if kind == "classifier":
        from tckr_engine.export.modules import ClassifierExport
        from tckr_engine.models.classifier import WEIGHTS_NAME, load_classifier
        from tckr_engine.models.generator import file_digest

        if cfg.image_size is not None:
            raise TckrError("image_size applies to generator presets only, not to a classifier")
        path = Path(cfg.model).expanduser()
        classifier = load_classifier(path)
        source = f"{path.resolve()}@{file_digest([path / WEIGHTS_NAME])}"
        return ClassifierExport(classifier, source, **batches), kind
    from tckr_engine.export.modules import UNetExport
    from tckr_engine.models.generator import load_generator

    return UNetExport(load_generator(cfg.model, cfg.image_size), **batches), kind


def export_model(cfg: ExportConfig) -> dict[str, Any]:
    """Export the config's model; returns the export.json content (also written beside model.onnx)."""
    cfg.validate()
    if cfg.tensorrt:  # fail before the (long) export when the engine cannot be built here
        from tckr_engine.export.tensorrt import import_tensorrt

        if not torch.cuda.is_available():
            raise TckrError("--tensorrt needs a CUDA GPU; export the ONNX file here and build on the GPU")
        import_tensorrt()
    module, kind = _module(cfg)
    out = Path(cfg.out).expanduser()
    info = export_onnx(
        module, out, opset=cfg.opset, fp16=cfg.fp16, overwrite=cfg.overwrite, verify=cfg.verify, kind=kind
    )
    if cfg.tensorrt:
        from tckr_engine.export.cache import cache_root
        from tckr_engine.export.tensorrt import build_engine, gpu_id, import_tensorrt, timing_cache_path

        device = torch.device("cuda", torch.cuda.current_device())
        profile = module.export_spec().profile
        timing = timing_cache_path(cache_root() / "tensorrt", device)  # shared with the generate backends
        build_engine(out / MODEL_FILE, profile, out / ENGINE_FILE, timing, device)
        info["tensorrt"] = {
            "engine": ENGINE_FILE,
            "version": import_tensorrt().__version__,
            "gpu": gpu_id(device),
            "profile": {n: p.as_dict() for n, p in profile.items()},
        }
        write_json(out / INFO_FILE, info)
    log.info("export.json: %s", json.dumps({k: info[k] for k in ("kind", "precision", "opset", "check")}))
    return info
