"""`tckr-engine bench --profile`: where a row's batch spends its time, by kind of op / kernel
(`tckr_engine/bench/profile.py`)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tckr_engine.bench.profile import CATEGORIES, categorize, profile_batch, profile_line, summarize
from tckr_engine.bench.throughput import BenchConfig, format_table, run_bench


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TCKR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tckr-cache"))


@pytest.mark.parametrize(
    "name, category",
    [
        # PyTorch's CPU ops
        ("aten::mkldnn_convolution", "conv"),
        ("aten::_slow_conv2d_forward", "conv"),
        ("aten::addmm", "gemm"),
        ("aten::mm", "gemm"),
        ("aten::bmm", "gemm"),
        ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
        ("aten::native_group_norm", "norm"),
        ("aten::native_layer_norm", "norm"),
        ("aten::normal_", "other"),  # random noise is not a norm
        ("aten::silu", "elementwise"),
        ("aten::add", "elementwise"),
        ("aten::copy_", "copy"),
        ("aten::cat", "copy"),
        ("aten::upsample_nearest2d", "copy"),
        ("aten::sort", "other"),
        ("aten::expand", "other"),  # a view
        ("## Call CompiledFxGraph fxmnu27h5agrmwv5w7 ##", "fused"),  # inductor's C++ on the CPU
        # CUDA kernels (cuDNN, cuBLAS / CUTLASS, flash / memory-efficient attention, PyTorch, inductor, ours)
        ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "conv"),
        ("void cudnn::ops::nchwToNhwcKernel<__half, __half, float, false, true>", "layout"),
        ("sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1", "gemm"),
        ("void cutlass::Kernel2<cutlass_80_tensorop_f16_s16816gemm_relu_f16_256x128_32x3_nn_align8>", "gemm"),
        ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 64, 4>>", "attention"),
        ("fmha_cutlassF_f16_aligned_64x64_rf_sm80(PyTorchMemEffAttention::AttentionKernel)", "attention"),
        ("_attn_fwd", "attention"),
        ("void at::native::(anonymous namespace)::GroupNormKernel<c10::Half>", "norm"),
        ("void at::native::(anonymous namespace)::RowwiseMomentsCUDAKernel<c10::Half, float>", "norm"),
        ("triton_poi_fused_add_convolution_silu_12", "fused"),  # inductor names list the fused ops
        ("triton_red_fused_native_group_norm_3", "fused"),
        ("triton_tem_fused_convolution_4", "conv"),
        ("triton_tem_fused_addmm_7", "gemm"),
        ("void at::native::vectorized_elementwise_kernel<4, at::native::silu_kernel_cuda>", "elementwise"),
        ("void at::native::elementwise_kernel<128, 4, at::native::direct_copy_kernel_cuda>", "copy"),
        ("void at::native::(anonymous namespace)::CatArrayBatchedCopy<float, unsigned, 4, 64, 64>", "copy"),
        ("Memcpy DtoH (Device -> Pinned)", "copy"),
        ("something_new", "other"),
    ],
)  # fmt: skip
def test_categorize(name, category):
    assert categorize(name) == category


def test_summary_shares_and_line():
    entries = [("aten::mkldnn_convolution", 600.0, 4), ("aten::addmm", 300.0, 2), ("aten::sort", 100.0, 1)]
    s = summarize(entries, wall_us=2000.0, scope="cpu ops, all threads", top=2)
    assert s["busy_ms"] == 1.0 and s["busy_pct"] == 50.0 and s["wall_ms"] == 2.0
    assert list(s["by_category"]) == ["conv", "gemm", "other"]  # largest first
    assert s["by_category"]["conv"] == {"ms": 0.6, "pct": 60.0}
    assert [t["name"] for t in s["top"]] == ["aten::mkldnn_convolution", "aten::addmm"]
    assert s["top"][0]["calls"] == 4 and s["top"][0]["category"] == "conv"
    assert profile_line(s) == "busy 50 % of 0.00 s: conv 60 %, gemm 30 %, other 10 %"
    assert set(s["by_category"]) <= set(CATEGORIES)


def test_profile_sees_the_work_of_worker_threads():
    """The engine's eager CPU rows compute on one-thread workers; their ops must be counted."""
    x, w, a = torch.randn(4, 8, 16, 16), torch.randn(8, 8, 3, 3), torch.randn(128, 128)
    pool = ThreadPoolExecutor(2, initializer=torch.set_num_threads, initargs=(1,))
    list(pool.map(lambda _: None, range(2)))  # the workers exist before the profiler starts

    def batch():
        list(pool.map(lambda _: [torch.conv2d(x, w, padding=1) for _ in range(20)], range(2)))
        for _ in range(5):
            a @ a  # on the calling thread

    prof = profile_batch(batch, torch.device("cpu"))
    pool.shutdown()
    assert prof["scope"] == "cpu ops, all threads" and prof["busy_ms"] > 0 and prof["wall_ms"] > 0
    assert {"conv", "gemm"} <= set(prof["by_category"])  # conv only ran on the workers
    conv = [t for t in prof["top"] if t["category"] == "conv"]
    assert sum(t["calls"] for t in conv) >= 40


def test_raw_event_times_equal_pytorchs_own():
    """The fast path over the raw kineto events gives PyTorch's FunctionEvent self times: same ops, same
    calls, same microseconds (nested ops on the calling thread and on a worker; the UNet's upsampling
    is an op calling its own other overload, which PyTorch counts once)."""
    from torch.profiler import profile

    from tckr_engine.bench.profile import _profiler_kwargs, event_self_times, raw_self_times
    from tckr_engine.models.generator import build_preset

    unet = build_preset("tiny-digits").unet
    x, t = torch.randn(4, unet.config.in_channels, 8, 8), torch.tensor(10)
    ctx = torch.randn(4, 6, unet.config.cross_attention_dim)
    pool = ThreadPoolExecutor(1, initializer=torch.set_num_threads, initargs=(1,))
    list(pool.map(lambda _: None, range(1)))
    with torch.inference_mode(), profile(**_profiler_kwargs(torch.device("cpu"))) as prof:
        unet(x, t, ctx)
        pool.submit(lambda: unet(x, t, ctx)).result()
    pool.shutdown()
    raw = raw_self_times(prof.profiler.kineto_results.events(), cuda=False)
    ref = event_self_times(prof.events(), cuda=False)
    assert set(raw) == set(ref) and "aten::conv2d" in raw
    for name, (us, calls) in ref.items():
        assert raw[name][1] == calls, name
        assert raw[name][0] == pytest.approx(us, abs=0.01 * calls + 1e-6), name
    n_conv = sum(isinstance(m, torch.nn.Conv2d) for m in unet.modules())
    assert raw["aten::conv2d"][1] == 2 * n_conv  # both threads' calls (their kernels may differ: thnn/oneDNN)


def test_bench_profile_rows(tmp_path, monkeypatch):
    """`bench --profile`: every row that ran gets a profile of one batch; the figures are written before
    the profiler runs, and a failing profile leaves them alone; the graph runtime's CPU work is flagged
    as unseen."""
    cfg = BenchConfig(
        preset="tiny-digits", device="cpu", batch_sizes=(8,), steps=2, images=8, repeats=1,
        backends=("torch", "onnxruntime", "tensorrt"), attention=("sdpa",), threads=2, train_steps=0,
        profile=True,
    )  # fmt: skip
    result = run_bench(cfg, tmp_path / "a")
    rows = {r["backend"]: r for r in result["rows"]}
    assert "profile" not in rows["tensorrt"]  # skipped rows are not profiled
    for backend in ("diffusers", "torch", "onnxruntime"):
        prof = rows[backend]["profile"]
        assert rows[backend]["status"] == "ok" and prof["scope"] == "cpu ops, all threads"
        assert prof["wall_ms"] > 0 and prof["top"]
    for backend in ("diffusers", "torch"):  # the UNet's convolutions, the engine's on its workers
        assert rows[backend]["profile"]["by_category"]["conv"]["ms"] > 0
    assert "not seen" in rows["onnxruntime"]["profile"]["note"]
    table = format_table(result)
    assert "profile b8 torch/sdpa: busy" in table and "(cpu ops, all threads)" in table

    import tckr_engine.bench.profile as profile_module

    seen = []

    def broken(fn, device, top=15):  # the measured rows are on disk before any profile runs
        written = json.loads((tmp_path / "b" / "throughput-tiny-digits-cpu.json").read_text())
        seen.append([(r["backend"], r["images_per_s"] > 0) for r in written["rows"]])
        raise RuntimeError("profiler unavailable\nsecond line")

    monkeypatch.setattr(profile_module, "profile_batch", broken)
    cfg.backends = ("torch",)
    result = run_bench(cfg, tmp_path / "b")
    assert seen == [[("diffusers", True), ("torch", True)]] * 2
    for row in result["rows"]:
        assert row["status"] == "ok" and row["images_per_s"] > 0
        assert row["profile"] == {"status": "failed: RuntimeError: profiler unavailable"}
    assert "profile b8 torch/sdpa: failed: RuntimeError: profiler unavailable" in format_table(result)


@pytest.mark.gpu  # skipped without a GPU (conftest)
def test_gpu_profile_counts_kernels():
    """On a GPU the profile is the CUDA kernels' own time, with the device's busy share."""
    x = torch.randn(8, 64, 64, 64, device="cuda", dtype=torch.float16)
    w = torch.randn(64, 64, 3, 3, device="cuda", dtype=torch.float16)
    a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)

    def batch():
        with torch.profiler.record_function("region"):  # its GPU-side span must not count twice
            for _ in range(10):
                torch.conv2d(x, w, padding=1)
                a @ a

    batch()
    prof = profile_batch(batch, torch.device("cuda"))
    assert prof["scope"] == "cuda kernels" and 0 < prof["busy_pct"] <= 100.5
    assert {"conv", "gemm"} <= set(prof["by_category"]), prof["top"]
    assert sum(v["pct"] for v in prof["by_category"].values()) == pytest.approx(100, abs=0.1)

    from torch.profiler import profile

    from tckr_engine.bench.profile import _profiler_kwargs, event_self_times, raw_self_times

    with profile(**_profiler_kwargs(torch.device("cuda"))) as p:
        batch()
        torch.cuda.synchronize()
    raw = raw_self_times(p.profiler.kineto_results.events(), cuda=True)
    ref = event_self_times(p.events(), cuda=True)
    assert set(raw) == set(ref) and "region" not in raw
    for name, (us, calls) in ref.items():
        assert raw[name][1] == calls and raw[name][0] == pytest.approx(us, abs=0.01 * calls + 1e-6), name


def test_postprocessing_cost_command_compares_both_paths():
    from tckr_engine.bench.profile import postprocessing_cost

    cost = postprocessing_cost(ops=200)
    assert cost["ops"] == 200 and cost["same_ops_and_calls"] is True
    assert cost["raw_events_s"] >= 0 and cost["function_events_s"] >= 0
