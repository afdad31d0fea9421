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


def test_group_sizes_are_part_of_the_run_spec(tmp_path):
    """A UNet call's last bits can depend on its row count, so the group rule is in the spec: a spec from
    before `balanced_part` keeps the old groups when built from, and its folder is not resumed under the new
    rule (one clear error) but can be overwritten."""
    from tckr_engine.engine.backends import ParallelSlices, make_denoiser
    from tckr_engine.engine.generate import prepare_folder
    from tckr_engine.engine.spec import resolve
    from tckr_engine.models.generator import build_preset

    run, _ = resolve(tiny_config(threads=2).validate())
    assert run["spec"]["cpu_slicing"] == {"rows": 32, "workers": 2, "groups": "balanced"}
    gen = build_preset("tiny-digits")
    new = make_denoiser(run["spec"], gen)
    old_spec = {**run["spec"], "cpu_slicing": {"rows": 32, "workers": 2}}
    old = make_denoiser(old_spec, gen)
    assert isinstance(new, ParallelSlices) and isinstance(old, ParallelSlices)
    assert (new.group_size(48, 2), old.group_size(48, 2)) == (12, 16)  # 24 + 24 images, against 32 + 16
    assert (new.group_size(64, 2), old.group_size(64, 2)) == (16, 16)
    out = tmp_path / "shards"
    prepare_folder(out, {**run, "spec": old_spec}, overwrite=False)
    with pytest.raises(TckrError, match="cpu_slicing"):
        prepare_folder(out, run, overwrite=False)
    prepare_folder(out, run, overwrite=True)


def test_the_padding_of_a_shards_last_batch_is_not_sampled():
    """CPU side by side: the copies that pad a shard's last batch to the batch size are never written, so
    only the real images run their sampling loops and the last one stands in for the padding."""
    from tckr_engine.engine.engine import Engine
    from tckr_engine.engine.spec import resolve

    run, resources = resolve(tiny_config(threads=2, num_images=10, shard_size=10, batch_size=8).validate())
    engine = Engine(run["spec"], resources)
    last = list(engine.scheduler.schedule([0]))[-1]
    assert (last.n_real, len(last.jobs)) == (2, 8)
    calls, map_ = [], engine.denoiser.map
    engine.denoiser.map = lambda fn, items: calls.append(list(items)) or map_(fn, calls[-1])
    images, _ = engine.sample(last)
    assert calls == [[slice(0, 1), slice(1, 2)]]  # two real images, a group each; no padding
    assert images.shape[0] == 8 and all(torch.equal(images[i], images[1]) for i in range(2, 8))
