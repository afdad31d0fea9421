"""The export cache: ONNX exports and TensorRT engines that the generate backends build on first use.

Root: `$TCKR_CACHE_DIR`, else `~/.cache/tckr-engine`. A UNet export lives in
`onnx/<generator id>-<precision>-opset<N>-<digest>/`, the digest covering the generator id, precision,
opset and the versions that decide the exported bytes (tckr-engine, torch, diffusers, onnx): a new
generator, precision or toolchain never reuses a stale graph. Engines and ONNX Runtime TensorRT caches live
under `tensorrt/` and `ort-tensorrt/`; their own keys carry the TensorRT version, GPU and profile.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

from tckr_engine.errors import TckrError
from tckr_engine.export.onnx_export import MIN_OPSET, export_onnx, export_versions, read_export
from tckr_engine.models.generator import Generator

log = logging.getLogger(__name__)

CACHE_ENV = "TCKR_CACHE_DIR"
DEFAULT_OPSET = MIN_OPSET


def cache_root() -> Path:
    """The cache folder (created); `$TCKR_CACHE_DIR` overrides the default."""
    root = Path(os.environ.get(CACHE_ENV) or "~/.cache/tckr-engine").expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TckrError(f"cannot create the cache folder {root}: {e.strerror}; set {CACHE_ENV}") from None
    return root


def unet_export_dir(generator: Generator, precision: str, opset: int = DEFAULT_OPSET) -> Path:
    """Cache folder of the generator's UNet export for `precision` (fp32 | fp16) and `opset`."""
    key = {"id": generator.ident, "precision": precision, "opset": opset, "versions": export_versions()}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = re.sub(r"[^A-Za-z0-9._@+-]+", "_", generator.ident)[:80]
    return cache_root() / "onnx" / f"{name}-{precision}-opset{opset}-{digest}"


def cached_unet_export(
    generator: Generator, precision: str, opt_batch: int, opset: int = DEFAULT_OPSET
) -> Path:
    """The generator's UNet as ONNX in the cache, exported on first use; returns the export folder."""
    from tckr_engine.export.modules import UNetExport

    if precision not in ("fp32", "fp16"):
        raise TckrError(f"ONNX exports are fp32 or fp16, not {precision}; use --dtype fp32 or fp16")
    folder = unet_export_dir(generator, precision, opset)
    try:
        read_export(folder)
        log.info("using cached ONNX export %s", folder)
        return folder
    except TckrError:
        pass
    log.info("exporting the UNet of %s to %s (%s, opset %d)", generator.ident, folder, precision, opset)
    module = UNetExport(generator, opt_batch=opt_batch)
    export_onnx(
        module, folder, opset=opset, fp16=precision == "fp16", overwrite=True, verify=False, kind="unet"
    )
    return folder
