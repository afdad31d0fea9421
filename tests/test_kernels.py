"""Triton attention kernel vs the PyTorch reference, the diffusers processor, the kernel benchmark.

Without a GPU the kernel runs on CPU tensors under the Triton interpreter, which must be switched on before
triton is first imported: this module sets TRITON_INTERPRET=1 at import (collection) time. If something
imported triton earlier, the interpreter tests skip here and `test_interpreter_suite_in_subprocess` runs
this file again in a fresh interpreter instead. With a GPU the same grid runs the compiled kernel.
"""

import os
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import csv
import json

import pytest
import torch.nn.functional as F
from conftest import tiny_unet

from tckr_engine.errors import TckrError
from tckr_engine.kernels import attention as K
from tckr_engine.kernels.processor import (
    TritonAttnProcessor,
    default_attention_backend,
    set_attention_backend,
)
from tckr_engine.kernels.reference import attention_ref

CUDA = torch.cuda.is_available()
KERNEL_DEVICE = "cuda" if CUDA and not K.interpreting() else "cpu"
KERNEL_RUNS = K.HAS_TRITON and (KERNEL_DEVICE == "cuda" or K.interpreting())
needs_kernel = pytest.mark.skipif(
    not KERNEL_RUNS,
    reason="triton missing, or imported before TRITON_INTERPRET=1 (see test_interpreter_suite_in_subprocess)",
)
requires_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def qkv(b, h, sq, sk, d, dtype, device=KERNEL_DEVICE, seed=0, q_gain=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, sq, d, generator=gen) * q_gain
    k, v = (torch.randn(b, h, sk, d, generator=gen) for _ in range(2))
    return (t.to(device, dtype) for t in (q, k, v))  # (B, H, S, D)


def assert_2x_rule(out, q, k, v, scale=None):
    """flash-attention's rule: |kernel - ref| ≤ 2·|plain PyTorch in q.dtype - ref| + rounding floor.

    `ref` is fp64 (at least as exact as the fp32 reference); "plain PyTorch" is `attention_ref(upcast=False)`.
    """
    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    ref = attention_ref(q.double(), k.double(), v.double(), scale)  # (B, H, Sq, D) fp64 oracle
    plain = attention_ref(q, k, v, scale, upcast=False)  # what low-precision PyTorch gets
    err = (out.double() - ref).abs().max().item()
    err_plain = (plain.double() - ref).abs().max().item()
    floor = 2 * (ref.to(q.dtype).double() - ref).abs().max().item() + 1e-7  # output rounding
    assert err <= 2 * err_plain + floor, (
        f"kernel err {err:.3g} vs PyTorch {err_plain:.3g} (floor {floor:.2g})"
    )


# --- pure-Python parts of the kernel module ---


def test_split_head_dim_never_pads_more_than_a_power_of_two():
    assert [K.split_head_dim(d) for d in (8, 16, 40, 64, 80, 96, 112, 160, 256)] == [
        (16, 0), (16, 0), (32, 16), (64, 0), (64, 16), (64, 32), (128, 0), (128, 32), (256, 0),
    ]  # fmt: skip
    for d in range(1, 257):
        a, b = K.split_head_dim(d)
        assert a + b >= d and a & (a - 1) == 0 and a >= 16
        assert b == 0 or (16 <= b < a and b & (b - 1) == 0)
        assert a + b <= max(16, 1 << (d - 1).bit_length())
    with pytest.raises(ValueError):
        K.split_head_dim(257)


@pytest.mark.skipif(not K.HAS_TRITON, reason="triton missing")
def test_prune_configs_fits_tiles_to_shapes():
    def pruned(sq, sk, da=64, db=0, dtype=torch.float16):
        args = {"Q": torch.empty(0, dtype=dtype), "seq_q": sq, "seq_k": sk}
        kept = K.prune_configs(K.AUTOTUNE_CONFIGS, args, BLOCK_DA=da, BLOCK_DB=db)
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept]

    assert all(n <= 128 for _, n, _ in pruned(4096, 77)) and (128, 128, 8) in pruned(4096, 77)
    assert all(m <= 64 and n <= 64 for m, n, _ in pruned(49, 49))
    wide = pruned(256, 256, da=128, db=32)  # head dim 160: 128-row tiles need 8 warps
    assert (128, 64, 4) not in wide and (128, 64, 8) in wide
    assert all(m * n <= 64 * 32 for m, n, _ in pruned(1024, 1024, dtype=torch.float32))
    assert pruned(3, 5) == [(16, 32, 2)]  # never empty


# --- the kernel (CPU interpreter here, compiled on a GPU machine) ---


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("seq_q", [33, 65])
@pytest.mark.parametrize("kind", ["self", "cross"])
@pytest.mark.parametrize("head_dim", [16, 40, 64, 80, 160])
def test_kernel_matches_reference(head_dim, kind, seq_q, dtype):
    seq_k = seq_q if kind == "self" else 77  # cross-attention to 77 text tokens
    q, k, v = qkv(1, 2, seq_q, seq_k, head_dim, dtype)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    res = K.triton_attention(q, k, v, out=out)
    assert res is out
    assert_2x_rule(out, q, k, v)


@needs_kernel
def test_kernel_many_tiles_rescale_online_softmax():
    # 16x16 tiles: 4 query tiles, 5 key tiles with a ragged last one; peaked scores move the running max.
    q, k, v = qkv(1, 1, 50, 77, 40, torch.float32, q_gain=4.0)
    out = torch.full_like(q, float("nan"))
    K.triton_attention(q, k, v, out=out, config={"BLOCK_M": 16, "BLOCK_N": 16})
    assert_2x_rule(out, q, k, v)


@needs_kernel
@pytest.mark.parametrize("i", range(len(K.AUTOTUNE_CONFIGS)))
def test_every_autotune_config_is_correct(i):
    cfg = K.AUTOTUNE_CONFIGS[i].kwargs
    q, k, v = qkv(1, 1, 130, 77, 80, torch.float16)
    out = torch.full_like(q, float("nan"))
    K.triton_attention(q, k, v, out=out, config=dict(cfg))
    assert_2x_rule(out, q, k, v)


@needs_kernel
def test_kernel_strided_inputs_explicit_scale_and_output_layout():
    b, h, s, d = 2, 3, 21, 24
    gen = torch.Generator().manual_seed(1)
    # diffusers' layout: projections (B, S, H*D) viewed as (B, H, S, D) without copies.
    q, k, v = (torch.randn(b, s, h, d, generator=gen).to(KERNEL_DEVICE).transpose(1, 2) for _ in range(3))
    k = torch.randn(b, h, 9, 2 * d, generator=gen).to(KERNEL_DEVICE)[..., ::2]  # head-dim stride 2
    v = torch.randn(b, h, 9, d, generator=gen).to(KERNEL_DEVICE)
    for scale in (0.3, 1.0):
        out = K.triton_attention(q, k, v, scale=scale)
        assert out.transpose(1, 2).is_contiguous()  # (B, Sq, H, D) memory: diffusers' reshape is free
        assert_2x_rule(out, q, k, v, scale)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=scale))


@needs_kernel
def test_custom_op_passes_opcheck_and_compiles_fullgraph():
    q, k, v = qkv(1, 2, 17, 77, 40, torch.float32)
    torch.library.opcheck(torch.ops.tckr.attention.default, (q, k, v, 0.25))

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(q, k, v):
        return torch.ops.tckr.attention(q * 2, k, v, 0.25) + 1  # (B, H, Sq, D)

    torch.testing.assert_close(f(q, k, v), attention_ref(q * 2, k, v, 0.25) + 1)


def test_kernel_errors_are_clear():
    q, k, v = qkv(1, 1, 4, 4, 8, torch.float32, device="cpu")
    with pytest.raises(ValueError, match="head dim"):
        K.triton_attention(q, k, v[..., :4])
    with pytest.raises(ValueError, match="dtypes"):
        K.triton_attention(q, k.double(), v)
    if K.interpreting():
        with pytest.raises(ValueError, match="bf16"):
            K.triton_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    elif K.HAS_TRITON:
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
            K.triton_attention(q, k, v)


# --- the public function: guards and fallback ---


def test_public_attention_falls_back_to_sdpa_where_the_kernel_cannot_run(monkeypatch):
    q, k, v = qkv(2, 2, 9, 5, 40, torch.float32, device="cpu")
    assert not K.can_use_triton(q, k, v)  # CPU tensors
    assert not K.can_use_triton(*(t.half() for t in (q, k, v)))
    assert torch.equal(K.attention(q, k, v, scale=0.2), F.scaled_dot_product_attention(q, k, v, scale=0.2))
    monkeypatch.setenv(K.KILL_SWITCH_ENV, "1")
    assert K.triton_disabled() and default_attention_backend("cuda") == "sdpa"
    monkeypatch.setenv(K.KILL_SWITCH_ENV, "0")
    assert not K.triton_disabled()
    assert default_attention_backend("cuda") == ("triton" if K.HAS_TRITON else "sdpa")
    assert default_attention_backend("cpu") == "sdpa"


def test_public_attention_traces_with_fullgraph():
    q, k, v = qkv(1, 2, 9, 5, 40, torch.float32, device="cpu")
    compiled = torch.compile(K.attention, fullgraph=True, backend="eager")  # guards must not graph-break
    torch.testing.assert_close(compiled(q, k, v), F.scaled_dot_product_attention(q, k, v))


def test_reference_matches_sdpa_and_keeps_dtype():
    q, k, v = qkv(2, 3, 11, 7, 24, torch.float32, device="cpu")
    torch.testing.assert_close(
        attention_ref(q, k, v, 0.5), F.scaled_dot_product_attention(q, k, v, scale=0.5)
    )
    assert attention_ref(q.half(), k.half(), v.half()).dtype == torch.float16
    assert attention_ref(q.double(), k.double(), v.double()).dtype == torch.float64  # no downcast


# --- the diffusers processor on a tiny UNet ---


def unet_inputs(device="cpu", dtype=torch.float32):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=gen)  # (B, C, H, W): 64 tokens, 16 in the mid block
    ctx = torch.randn(2, 5, 32, generator=gen)  # (B, text tokens, cross_attention_dim)
    return x.to(device, dtype), torch.tensor([10, 500], device=device), ctx.to(device, dtype)


@needs_kernel
def test_processor_unet_matches_sdpa_unet():
    unet = tiny_unet().to(KERNEL_DEVICE)
    x, t, ctx = unet_inputs(KERNEL_DEVICE)
    with torch.no_grad():
        set_attention_backend(unet, "sdpa")
        expected = unet(x, t, ctx).sample
        unet.set_attn_processor(TritonAttnProcessor(attention_fn=K.triton_attention))  # forced kernel
        got = unet(x, t, ctx).sample
        assert len(unet.attn_processors) == 8  # 4 transformer blocks (down 1, mid 1, up 2) x (self, cross)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


@needs_kernel
@pytest.mark.slow
def test_processor_unet_compiles_fullgraph_through_the_custom_op():
    # The CPU stand-in for the GPU compile test: the op's fake implementation must carry the whole UNet.
    unet = tiny_unet().to(KERNEL_DEVICE)
    x, t, ctx = unet_inputs(KERNEL_DEVICE)

    def op(q, k, v, scale):
        return torch.ops.tckr.attention(q, k, v, scale)

    with torch.no_grad():
        expected = unet(x, t, ctx).sample  # diffusers' default processor (SDPA)
        unet.set_attn_processor(TritonAttnProcessor(attention_fn=op))
        got = torch.compile(unet, fullgraph=True, backend="aot_eager")(x, t, ctx).sample
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_set_attention_backend_names():
    unet = tiny_unet()
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        set_attention_backend(unet, "sdpa")
        expected = unet(x, t, ctx).sample
        set_attention_backend(unet, "triton")
        assert all(isinstance(p, TritonAttnProcessor) for p in unet.attn_processors.values())
        assert torch.equal(unet(x, t, ctx).sample, expected)  # CPU: the guard falls back to SDPA exactly
    with pytest.raises(TckrError, match="unknown attention backend"):
        set_attention_backend(unet, "flash")
    try:
        import xformers  # noqa: F401
    except ImportError:
        with pytest.raises(TckrError, match="xformers") as e:
            set_attention_backend(unet, "xformers")
        assert "\n" not in str(e.value)
    else:
        set_attention_backend(unet, "xformers")
        assert "XFormers" in type(next(iter(unet.attn_processors.values()))).__name__


# --- the benchmark ---


def test_kernel_bench_writes_csv_and_json_on_cpu(tmp_path):
    from tckr_engine.bench.kernels import COLUMNS, run_kernel_bench

    rows = run_kernel_bench(
        tmp_path,
        device="cpu",
        dtypes=["fp32"],
        repeats=1,
        shapes=["small-d32-s49", "sd15-cross-16x16"],
        batch=1,
    )
    with open(tmp_path / "kernels.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS
        assert len(list(reader)) == len(rows)
    payload = json.loads((tmp_path / "kernels.json").read_text())
    assert payload["rows"] == rows and payload["meta"]["git_sha"]
    assert {r["shape"] for r in rows} == {"small-d32-s49", "sd15-cross-16x16"}
    math_rows = [r for r in rows if r["backend"] == "sdpa-math"]
    assert len(math_rows) == 2 and all(r["status"] == "ok" for r in math_rows)
    for r in math_rows:
        flops = 4 * r["batch"] * r["heads"] * r["seq_q"] * r["seq_k"] * r["head_dim"]
        assert r["tflops"] == pytest.approx(flops / (r["ms"] * 1e-3) / 1e12, rel=1e-2, abs=1e-4)
        assert r["max_abs_err"] < 1e-5 and r["device"].startswith("cpu")
    assert "triton" not in {r["backend"] for r in rows}  # triton rows need CUDA


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "tpu"], "device must be cpu or cuda"),
        (["--device", "cpu", "--shapes", "nope"], "unknown shapes"),
        (["--device", "cpu", "--dtypes", "fp8"], "unknown dtypes"),
        (["--device", "cpu", "--repeats", "0"], "--repeats and --batch must be integers >= 1"),
    ],
)
def test_kernel_bench_command_bad_arguments_are_one_line(tmp_path, args, needle):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tckr_engine.bench.kernels", "--out-dir", str(tmp_path / "k"), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and needle in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "k").exists()


# --- GPU only: compiled kernel at SD shapes, bf16, torch.compile through the custom op ---


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40), (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),
     (2, 8, 256, 256, 160), (2, 8, 256, 77, 160), (64, 4, 49, 49, 32), (64, 4, 196, 196, 64)],
)  # fmt: skip
def test_gpu_kernel_matches_reference(shape, dtype):
    q, k, v = qkv(*shape, dtype, device="cuda")
    out = torch.full_like(q, float("nan"))
    K.triton_attention(q, k, v, out=out)  # autotuned
    assert_2x_rule(out, q, k, v)
    assert K.can_use_triton(q, k, v)
    assert_2x_rule(K.attention(q, k, v), q, k, v)


@pytest.mark.gpu
@requires_cuda
def test_gpu_unet_compiles_fullgraph_through_the_custom_op():
    unet = tiny_unet().to("cuda", torch.float16)
    x, t, ctx = unet_inputs("cuda", torch.float16)
    with torch.no_grad():
        set_attention_backend(unet, "sdpa")
        expected = unet(x, t, ctx).sample
        set_attention_backend(unet, "triton")
        got = torch.compile(unet, fullgraph=True)(x, t, ctx).sample
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=5e-3)


@pytest.mark.gpu
@requires_cuda
def test_gpu_kernel_bench_has_triton_rows(tmp_path):
    from tckr_engine.bench.kernels import run_kernel_bench

    rows = run_kernel_bench(
        tmp_path, "cuda", ["fp16"], repeats=3, shapes=["sd15-cross-16x16", "small-d32-s49"]
    )
    triton_rows = [r for r in rows if r["backend"] == "triton"]
    assert len(triton_rows) == 2 and all(r["status"] == "ok" and r["tflops"] > 0 for r in triton_rows)
    assert all(r["max_abs_err"] < 1e-2 for r in triton_rows)


# --- the GPU code path, compiled ahead of time with Triton's bundled ptxas (no GPU needed) ---

AOT_SCRIPT = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tckr_engine.kernels import attention as K

fn = K._attn_fwd
pointers, ints = ("Q", "K", "V", "Out"), ("num_heads", "seq_q", "seq_k")
for dtype, head_dim, (m, n, warps, stages), arch in [
    ("fp16", 40, (128, 64, 8, 3), 90), ("bf16", 160, (128, 64, 8, 3), 80), ("fp32", 80, (64, 32, 4, 4), 90)
]:
    da, db = K.split_head_dim(head_dim)
    sig = {a: "*" + dtype if a in pointers else "i32" if a.startswith("stride") or a in ints
           else "fp32" if a == "qk_scale" else "constexpr" for a in fn.arg_names}
    consts = dict(HEAD_DIM=head_dim, BLOCK_DA=da, BLOCK_DB=db, BLOCK_M=m, BLOCK_N=n,
                  DOT_PRECISION="ieee" if dtype == "fp32" else "tf32")
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(fn.arg_names) if a in pointers}
    kernel = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=warps, num_stages=stages))
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024, kernel.metadata.shared
    print(dtype, head_dim, arch, kernel.metadata.shared)
"""


@pytest.mark.slow
@pytest.mark.skipif(not K.HAS_TRITON, reason="triton missing")
def test_kernel_compiles_for_sm80_and_sm90_without_a_gpu():
    # In a fresh process without TRITON_INTERPRET: the interpreter never exercises Triton's compiler
    # (constexpr branches, dot shapes, layouts), so this is the CPU machine's check of the real code path.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run(
        [sys.executable, "-c", AOT_SCRIPT], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if res.returncode != 0 and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's bundled ptxas is unavailable")
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(res.stdout.splitlines()) == 3


# --- safety net when triton was imported before this module could switch the interpreter on ---


@pytest.mark.skipif(KERNEL_RUNS or CUDA or not K.HAS_TRITON, reason="the kernel tests ran in this process")
def test_interpreter_suite_in_subprocess():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
