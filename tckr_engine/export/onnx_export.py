"""ONNX export of any `Exportable`: trace, optional fp16 pass, check, write `model.onnx` + `export.json`.

Exporter: `torch.onnx.export(..., dynamo=False)`, the TorchScript exporter. With torch 2.13 the dynamo
exporter needs the separate `onnxscript` package and the TorchScript one exports diffusers UNets with
truly dynamic batch, spatial and token axes (checked by tests/test_export.py with ONNX Runtime); it supports
opsets up to 20.

The export folder is built under a hidden temporary name beside the target and renamed into place only when
complete and checked: a failed or interrupted export never leaves a folder that looks finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from tckr_engine import __version__
from tckr_engine.errors import TckrError
from tckr_engine.export.contract import Exportable, ExportSpec

log = logging.getLogger(__name__)

MIN_OPSET = 17  # LayerNormalization is a single op from 17 on
TORCHSCRIPT_MAX_OPSET = 20  # torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET in torch 2.13
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"  # external weights, only for models near protobuf's 2 GB limit
INFO_FILE = "export.json"
EXTERNAL_DATA_BYTES = 1 << 30  # above 1 GiB of weights, store them beside the graph (protobuf caps at 2 GiB)
EXPORT_FORMAT = 1
EXPORTER = "torch.onnx.export(dynamo=False) (TorchScript)"
FP16_METHOD = "tckr_engine.export.fp16 cast pass (keep_fp32 inputs, fp32 islands)"
_DTYPE_NAMES = {1: "float32", 10: "float16", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 11: "float64"}


def max_opset() -> int:
    import onnx

    return min(TORCHSCRIPT_MAX_OPSET, onnx.defs.onnx_opset_version())


def check_opset(opset: int) -> int:
    hi = max_opset()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= hi:
        raise TckrError(
            f"opset must be an integer from {MIN_OPSET} to {hi} (TorchScript exporter), got {opset!r}"
        )
    return opset


def import_onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise TckrError("ONNX export needs the onnx package: pip install 'tckr-engine[export]'") from None
    return onnx


def export_versions() -> dict[str, str]:
    """Versions that decide an export's bytes (recorded in export.json, part of cache keys)."""
    import diffusers

    onnx = import_onnx()
    out = {"tckr_engine": __version__, "torch": torch.__version__, "onnx": onnx.__version__}
    out["diffusers"] = diffusers.__version__
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return out


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise TckrError(f"export target {out} exists and is not a folder; choose another --out")
    if out.is_dir() and any(out.iterdir()):
        if not (out / INFO_FILE).is_file():  # never delete what is not ours, even with --overwrite
            raise TckrError(
                f"export folder {out} holds other files (no {INFO_FILE}); choose another --out "
                "(--overwrite replaces only an earlier export)"
            )
        if not overwrite:
            raise TckrError(
                f"export folder {out} already holds an export; pass --overwrite or choose another --out"
            )
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TckrError(f"cannot create {parent}: {e.strerror}; choose a writable --out") from None
    if not os.access(parent, os.W_OK):
        raise TckrError(f"cannot write to {parent}; choose a writable --out")


def _trace(module: Exportable, spec: ExportSpec, path: Path, opset: int) -> None:
    """torch.onnx.export with the spec's names and dynamic axes (TorchScript exporter)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python branches
            torch.onnx.export(
                module.eval(),
                spec.sample_inputs,
                str(path),
                dynamo=False,
                opset_version=opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=spec.dynamic_axes,
                do_constant_folding=True,
            )
    except (RuntimeError, TypeError, ValueError, torch.onnx.errors.OnnxExporterError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TckrError(f"ONNX export of {spec.name} failed: {first}") from None


def _io(graph: Any) -> dict[str, list[dict[str, Any]]]:
    def one(vi: Any) -> dict[str, Any]:
        tt = vi.type.tensor_type
        dims = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        return {"name": vi.name, "dtype": _DTYPE_NAMES.get(tt.elem_type, str(tt.elem_type)), "shape": dims}

    return {"inputs": [one(v) for v in graph.input], "outputs": [one(v) for v in graph.output]}


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


def _verify(path: Path, module: Exportable, spec: ExportSpec) -> dict[str, Any] | None:
    """Max abs difference between ONNX Runtime (CPU) and PyTorch on the spec's sample input."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning("onnxruntime is not installed; the export is not checked against PyTorch")
        return None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()}
    feeds = {}
    for name, t in zip(spec.input_names, spec.sample_inputs, strict=True):
        arr = t.numpy()
        feeds[name] = arr.astype("float16") if types[name] == "tensor(float16)" else arr
    got = session.run(None, feeds)
    with torch.no_grad():
        ref = module(*spec.sample_inputs)
    refs = ref if isinstance(ref, tuple | list) else (ref,)
    diffs = [
        float(abs(g.astype("float32") - r.float().numpy()).max()) for g, r in zip(got, refs, strict=True)
    ]
    scale = [float(r.float().abs().max()) for r in refs]
    return {"provider": "CPUExecutionProvider", "max_abs_diff": max(diffs), "max_abs_reference": max(scale)}


def export_onnx(
    module: Exportable,
    out: str | Path,
    *,
    opset: int = MIN_OPSET,
    fp16: bool = False,
    overwrite: bool = False,
    verify: bool = True,
    kind: str = "model",
) -> dict[str, Any]:
    """Export `module` to `out/model.onnx` (+ `out/export.json`); returns the export.json content."""
    onnx = import_onnx()
    check_opset(opset)
    out = Path(out).expanduser()
    _check_target(out, overwrite)
    spec = module.export_spec().validate()
    t0 = time.perf_counter()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _trace(module, spec, tmp / "raw" / MODEL_FILE, opset)
        model = onnx.load(str(tmp / "raw" / MODEL_FILE))  # also loads weights the tracer stored externally
        if fp16:
            from tckr_engine.export.fp16 import convert_to_fp16

            model = convert_to_fp16(model, spec.keep_fp32)
        model.producer_name, model.producer_version = "tckr-engine", __version__
        weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
        external = weight_bytes > EXTERNAL_DATA_BYTES
        path = tmp / MODEL_FILE
        onnx.save_model(
            model, str(path), save_as_external_data=external, all_tensors_to_one_file=True, location=DATA_FILE
        )
        del model
        shutil.rmtree(tmp / "raw")
        try:
            onnx.checker.check_model(str(path), full_check=True)  # full_check: strict shape inference too
            onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True)
        except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
            raise TckrError(
                f"exported ONNX graph of {spec.name} is invalid: {str(e).splitlines()[0]}"
            ) from None
        graph = onnx.load(str(path), load_external_data=False).graph
        files = [MODEL_FILE, DATA_FILE] if external else [MODEL_FILE]
        info: dict[str, Any] = {
            "format": EXPORT_FORMAT,
            "kind": kind,
            "source": spec.meta.get("source"),
            "exporter": EXPORTER,
            "opset": opset,
            "precision": "fp16" if fp16 else "fp32",
            "fp16_method": FP16_METHOD if fp16 else None,
            "files": files,
            "sha256": _digest([tmp / f for f in files]),
            **_io(graph),
            "contract": spec.describe(),
            "check": _verify(path, module, spec) if verify else None,
            "seconds": round(time.perf_counter() - t0, 2),
            "versions": export_versions(),
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "exported %s to %s (%s, opset %d) in %.1f s",
        spec.name,
        out,
        info["precision"],
        opset,
        info["seconds"],
    )
    return info


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished temp folder to `out`, replacing an old export only after the new one is whole."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)
    dir_fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_export(folder: str | Path) -> dict[str, Any]:
    """export.json of a finished export folder; a missing or broken one is a TckrError."""
    folder = Path(folder)
    try:
        info = json.loads((folder / INFO_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        raise TckrError(f"{folder} is not a finished ONNX export (no readable {INFO_FILE})") from None
    if not all((folder / f).is_file() for f in info.get("files", [MODEL_FILE])):
        raise TckrError(f"export folder {folder} is missing files listed in {INFO_FILE}; export it again")
    return info
