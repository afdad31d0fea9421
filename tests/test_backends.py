"""Denoiser backends: each one generates shards that match the eager torch backend; bad choices are one
clear error; GPU backends (CUDA provider, TensorRT, CUDA graphs) are marked and skipped without a GPU."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from tckr_engine.engine.backends import check_backend
from tckr_engine.engine.generate import generate
from tckr_engine.errors import TckrError

GREY_LEVELS = 3  # images of two backends may differ by this much per pixel (fp32 reassociation, rounding)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.getbasetemp() / "tckr-cache"
    monkeypatch.setenv("TCKR_CACHE_DIR", str(path))
    return path


def shard_images(out) -> dict[str, np.ndarray]:
    """Every image of a shard folder, by sample key, as int16 arrays."""
    images = {}
    for tar in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf.getmembers():
                if member.name.endswith(".png"):
                    data = tf.extractfile(member).read()
                    images[member.name] = np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16)
    return images


def assert_same_images(a, b, tolerance=GREY_LEVELS):
    ia, ib = shard_images(a), shard_images(b)
    assert ia.keys() == ib.keys() and len(ia) > 0
    worst = max(int(np.abs(ia[k] - ib[k]).max()) for k in ia)
    assert worst <= tolerance, f"images differ by up to {worst} grey levels"


def test_onnxruntime_backend_matches_torch(tiny_run, tmp_path, cache_dir):
    out = tmp_path / "ort"
    summary = generate(tiny_config(backend="onnxruntime"), out)
    assert summary.images == 100
    assert json.loads((out / "run.json").read_text())["spec"]["backend"] == "onnxruntime"
    assert_same_images(tiny_run, out)
    exports = list((cache_dir / "onnx").iterdir())
    assert len(exports) == 1 and "tiny-digits-fp32-opset17" in exports[0].name
    # A second run reuses the cached export instead of exporting again.
    stamp = (exports[0] / "model.onnx").stat().st_mtime_ns
    generate(tiny_config(backend="onnxruntime", num_images=16, shard_size=16), tmp_path / "again")
    assert (exports[0] / "model.onnx").stat().st_mtime_ns == stamp
    assert len(list((cache_dir / "onnx").iterdir())) == 1


def test_compile_backend_matches_torch(tiny_run, tmp_path, monkeypatch):
    # aot_eager: dynamo captures the real UNet graph (static shapes) without minutes of C++ codegen.
    monkeypatch.setenv("TCKR_COMPILE_BACKEND", "aot_eager")
    torch._dynamo.reset()
    out = tmp_path / "compiled"
    generate(tiny_config(backend="compile"), out)
    assert_same_images(tiny_run, out)


@pytest.mark.parametrize(
    ("backend", "device", "dtype", "message"),
    [
        ("tensorrt", "cpu", "fp32", "needs a CUDA GPU"),
        ("onnxruntime", "cpu", "bf16", "fp32 or fp16"),
        ("nope", "cpu", "fp32", "backend must be one of torch, compile, onnxruntime, tensorrt"),
    ],
)
def test_backends_that_cannot_run_are_one_line_errors(backend, device, dtype, message):
    with pytest.raises(TckrError, match=message):
        check_backend(backend, device, dtype)


def test_missing_gpu_providers_are_named(monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    from tckr_engine.export.ort import check_provider

    with pytest.raises(TckrError, match=r"no CUDAExecutionProvider.*onnxruntime-gpu"):
        check_provider("cuda")
    with pytest.raises(TckrError, match=r"no TensorrtExecutionProvider.*tensorrt"):
        check_provider("tensorrt")


def test_generate_refuses_a_backend_before_writing(tmp_path):
    out = tmp_path / "never"
    with pytest.raises(TckrError, match="fp32 or fp16"):
        generate(tiny_config(backend="onnxruntime", dtype="bf16", device="cpu"), out)
    assert not out.exists()


def gpu_config(**changes):
    return tiny_config(device="cuda", dtype="fp16", **changes)


@pytest.fixture(scope="module")
def gpu_torch_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu") / "torch"
    generate(gpu_config(), out)
    return out


@pytest.mark.gpu
def test_onnxruntime_cuda_provider_matches_torch(gpu_torch_run, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    out = tmp_path / "ort-cuda"
    generate(gpu_config(backend="onnxruntime"), out)
    assert_same_images(gpu_torch_run, out)


@pytest.mark.gpu
def test_onnxruntime_tensorrt_provider_matches_torch(gpu_torch_run, tmp_path, monkeypatch):
    ort = pytest.importorskip("onnxruntime")
    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu with TensorRT")
    monkeypatch.setenv("TCKR_ORT_PROVIDER", "tensorrt")
    out = tmp_path / "ort-trt"
    generate(gpu_config(backend="onnxruntime"), out)
    assert_same_images(gpu_torch_run, out)


@pytest.mark.gpu
def test_tensorrt_backend_matches_torch(gpu_torch_run, tmp_path, cache_dir):
    pytest.importorskip("tensorrt")
    out = tmp_path / "trt"
    generate(gpu_config(backend="tensorrt"), out)
    assert_same_images(gpu_torch_run, out)
    assert len(list((cache_dir / "tensorrt").glob("engine-*.plan"))) == 1
    assert len(list((cache_dir / "tensorrt").glob("timing-*.cache"))) == 1


@pytest.mark.gpu
def test_compile_backend_with_cuda_graphs_matches_torch(gpu_torch_run, tmp_path):
    torch._dynamo.reset()
    out = tmp_path / "compiled-cuda"
    generate(gpu_config(backend="compile"), out)
    assert_same_images(gpu_torch_run, out)


@pytest.mark.parametrize(
    "items, cap, workers, size",
    [
        (48, 16, 2, 12),  # 4 groups, 24 images per worker; 16 would leave one worker 32 and the other 16
        (50, 16, 2, 13),
        (80, 16, 2, 14),
        (100, 16, 2, 16),  # 52 and 48 images per worker: within 5 % of even, fuller calls kept
        (64, 16, 2, 16),
        (20, 16, 2, 10),
        (5, 32, 2, 3),
        (7, 16, 3, 3),
        (1, 16, 2, 1),
        (100, 16, 4, 13),
    ],
)
def test_balanced_part_keeps_the_workers_evenly_busy(items, cap, workers, size):
    from tckr_engine.engine.backends import balanced_part

    assert balanced_part(items, cap, workers) == size


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_side_by_side_images_do_not_depend_on_the_group_size(backend, cache_dir):
    """The CPU groups' size comes from `balanced_part`, which a later version may change: a resumed folder
    must not change its images with it. Every grouping of a batch gives the same bytes."""
    from tckr_engine.engine.backends import ParallelSlices
    from tckr_engine.engine.engine import Engine
    from tckr_engine.engine.spec import resolve

    run, resources = resolve(tiny_config(backend=backend, threads=2, batch_size=12, num_images=12).validate())
    engine = Engine(run["spec"], resources)
    assert isinstance(engine.denoiser, ParallelSlices) and engine.denoiser.workers == 2
    batch = next(engine.scheduler.schedule([0]))
    images = []
    for size in (12, 6, 5, 4, 1):  # one group; even; uneven (5, 5, 2); 3 groups on 2 workers; single images
        engine.denoiser.group_size = lambda items, rows_per_item, size=size: size
        images.append(engine.sample(batch)[0])
    assert all(torch.equal(images[0], other) for other in images[1:])
