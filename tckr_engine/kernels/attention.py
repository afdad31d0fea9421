"""Flash-attention forward in Triton for diffusion UNets, behind an SDPA-compatible public function.

Three layers, as in segment-anything-fast's `flash_4.py`:

1. `_attn_fwd`: the `@triton.jit` kernel. One program computes a (BLOCK_M, D) tile of the output for one
   (batch, head), streaming K/V once with the online softmax (running max `m_i`, running sum `l_i`).
2. `triton_attention`: the launcher. Checks its inputs, picks the head-dim split and the config (autotuned
   on CUDA, a fixed heuristic under the Triton interpreter) and launches. It runs on CPU tensors through
   the Triton interpreter, which is how the tests exercise the kernel without a GPU.
3. `attention`: the public function with the signature and semantics of
   `F.scaled_dot_product_attention(q, k, v, scale=scale)` (no mask, no dropout, not causal). It guards
   (CUDA, dtype, head dim, Triton importable, no autograd, the `TCKR_DISABLE_TRITON=1` kill switch) and
   otherwise falls back to SDPA. The kernel is reached through the custom op `torch.ops.tckr.attention`
   with a fake implementation, so `torch.compile(fullgraph=True)` traces through it.

Head dims. SD 1.5 uses 40 / 80 / 160, which FlashAttention pads to 64 / 128 / 256. Here the head dim is
split into at most two power-of-two chunks, `BLOCK_DA + BLOCK_DB` (40 = 32+16 with 8 lanes masked,
80 = 64+16, 160 = 128+32, 96 = 64+32), each chunk loaded with a mask, so no tensor is padded and the
dot products do 48 / 80 / 160 lanes of work instead of 64 / 128 / 256. `tl.dot` needs chunks ≥ 16.
"""

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # CPU-only installs: `attention` falls back to SDPA.
    triton = None

HAS_TRITON = triton is not None
KILL_SWITCH_ENV = "TCKR_DISABLE_TRITON"
MAX_HEAD_DIM = 256
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the kernel computes correctly
# What `attention` sends to the kernel. fp32 stays on SDPA: with IEEE (non-tf32) dots the kernel runs on
# FMA units and ptxas reports register spills for every tile at head dim ≥ 64, so it cannot beat SDPA's
# fp32 kernels; `triton_attention` still takes fp32 (tests, benchmark).
PUBLIC_DTYPES = (torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e)); exp2 is the fast path on GPUs
_MAX_GRID_Y = 65535  # CUDA limit on grid dim 1, where (batch, head) goes


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def split_head_dim(head_dim: int) -> tuple[int, int]:
    """Split a head dim into two power-of-two chunks (BLOCK_DA, BLOCK_DB ≥ 16, or 0 when one suffices).

    The split minimises padded lanes: 40 → (32, 16), 80 → (64, 16), 160 → (128, 32), 64 → (64, 0),
    112 → (128, 0) because 64+64 would not save anything over one 128 chunk.
    """
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")
    if head_dim <= 16:
        return 16, 0
    block_a = 1 << (head_dim.bit_length() - 1)  # largest power of two <= head_dim
    rest = head_dim - block_a
    if rest == 0:
        return block_a, 0
    block_b = max(16, _next_pow2(rest))
    if block_b >= block_a:  # two equal chunks == one chunk of the next power of two
        return 2 * block_a, 0
    return block_a, block_b


def heuristic_config(seq_q: int, seq_k: int) -> dict[str, int]:
    """Block sizes used where no autotuning happens (the interpreter): 16..64, fit to the lengths."""
    return {
        "BLOCK_M": min(64, max(16, _next_pow2(seq_q))),
        "BLOCK_N": min(64, max(16, _next_pow2(seq_k))),
    }


if HAS_TRITON:

    @triton.jit
    def _attn_fwd(
        Q, K, V, Out,  # (B, H, S, D) each, unit stride along D
        stride_qb, stride_qh, stride_qs,
        stride_kb, stride_kh, stride_ks,
        stride_vb, stride_vh, stride_vs,
        stride_ob, stride_oh, stride_os,
        num_heads, seq_q, seq_k,
        qk_scale,  # softmax scale * log2(e)
        HEAD_DIM: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr,
        DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ):  # fmt: skip
        """Out[b, h, m-tile] = softmax(Q Kᵀ · scale) V; the last dim of every tensor is contiguous."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        # int64 offsets: batch * stride can pass 2**31 elements on large batches.
        off_b = (pid_bh // num_heads).to(tl.int64)
        off_h = (pid_bh % num_heads).to(tl.int64)
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        k_base = K + off_b * stride_kb + off_h * stride_kh
        v_base = V + off_b * stride_vb + off_h * stride_vh
        o_base = Out + off_b * stride_ob + off_h * stride_oh

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        offs_n0 = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        offs_da = tl.arange(0, BLOCK_DA)  # (BLOCK_DA,)
        mask_m = offs_m < seq_q
        mask_da = offs_da < HEAD_DIM
        q_a = tl.load(
            q_base + offs_m[:, None] * stride_qs + offs_da[None, :],
            mask=mask_m[:, None] & mask_da[None, :],
            other=0.0,
        )  # (BLOCK_M, BLOCK_DA)
        acc_a = tl.zeros([BLOCK_M, BLOCK_DA], dtype=tl.float32)
        if BLOCK_DB > 0:  # compile-time: second head-dim chunk
            offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)  # (BLOCK_DB,)
            mask_db = offs_db < HEAD_DIM
            q_b = tl.load(
                q_base + offs_m[:, None] * stride_qs + offs_db[None, :],
                mask=mask_m[:, None] & mask_db[None, :],
                other=0.0,
            )  # (BLOCK_M, BLOCK_DB)
            acc_b = tl.zeros([BLOCK_M, BLOCK_DB], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # running row max (log2 units)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)  # running row sum of exp2

        for start_n in range(0, seq_k, BLOCK_N):
            offs_n = start_n + offs_n0
            mask_n = offs_n < seq_k
            k_a = tl.load(
                k_base + offs_n[:, None] * stride_ks + offs_da[None, :],
                mask=mask_n[:, None] & mask_da[None, :],
                other=0.0,
            )  # (BLOCK_N, BLOCK_DA)
            qk = tl.dot(q_a, tl.trans(k_a), input_precision=DOT_PRECISION)  # (BLOCK_M, BLOCK_N) fp32
            if BLOCK_DB > 0:
                k_b = tl.load(
                    k_base + offs_n[:, None] * stride_ks + offs_db[None, :],
                    mask=mask_n[:, None] & mask_db[None, :],
                    other=0.0,
                )  # (BLOCK_N, BLOCK_DB)
                qk = tl.dot(q_b, tl.trans(k_b), qk, input_precision=DOT_PRECISION)
            qk = tl.where(mask_n[None, :], qk * qk_scale, float("-inf"))
            # Online softmax: rescale what was accumulated so far to the new row max.
            m_new = tl.maximum(m_i, tl.max(qk, 1))  # (BLOCK_M,) finite: every tile has a valid key
            p = tl.math.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N)
            alpha = tl.math.exp2(m_i - m_new)  # (BLOCK_M,) 0 on the first tile
            l_i = l_i * alpha + tl.sum(p, 1)
            p = p.to(V.dtype.element_ty)
            v_a = tl.load(
                v_base + offs_n[:, None] * stride_vs + offs_da[None, :],
                mask=mask_n[:, None] & mask_da[None, :],
                other=0.0,
            )  # (BLOCK_N, BLOCK_DA)
            acc_a = tl.dot(p, v_a, acc_a * alpha[:, None], input_precision=DOT_PRECISION)
            if BLOCK_DB > 0:
                v_b = tl.load(
                    v_base + offs_n[:, None] * stride_vs + offs_db[None, :],
                    mask=mask_n[:, None] & mask_db[None, :],
                    other=0.0,
                )  # (BLOCK_N, BLOCK_DB)
                acc_b = tl.dot(p, v_b, acc_b * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new

        inv_l = 1.0 / l_i  # (BLOCK_M,) l_i >= 1: the max element contributes exp2(0)
        tl.store(
            o_base + offs_m[:, None] * stride_os + offs_da[None, :],
            (acc_a * inv_l[:, None]).to(Out.dtype.element_ty),
            mask=mask_m[:, None] & mask_da[None, :],
        )
        if BLOCK_DB > 0:
            tl.store(
                o_base + offs_m[:, None] * stride_os + offs_db[None, :],
                (acc_b * inv_l[:, None]).to(Out.dtype.element_ty),
                mask=mask_m[:, None] & mask_db[None, :],
            )

    # A small hand-picked set; `prune_configs` drops the ones that cannot help a given shape. Timings are
    # kept in memory per (seq_q, seq_k, head dim, dtypes) only: no on-disk cache tied to one GPU.
    AUTOTUNE_CONFIGS = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=2, num_stages=3),
        triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=2, num_stages=2),
    ]
else:
    AUTOTUNE_CONFIGS = []


def prune_configs(configs: list, named_args: dict, **kwargs: object) -> list:
    """Autotuner `early_config_prune`: drop tiles that cannot win for this shape and dtype. Never [].

    - No tile larger than the (power-of-two) sequence it covers: 77 text tokens → BLOCK_N ≤ 128, 49-token
      windows → 64x64 at most.
    - The fp32 accumulator must fit: BLOCK_M·lanes / threads ≤ 128 registers per thread (ptxas spills
      beyond, e.g. 128x64 tiles with 4 warps at head dim 160).
    - fp32 inputs keep only tiles ≤ 64x32: their IEEE dots run on FMA units with fp32 operands in
      registers, and bigger tiles spill kilobytes and take minutes to compile.
    """
    cap_m = max(16, _next_pow2(int(named_args["seq_q"])))
    cap_n = max(16, _next_pow2(int(named_args["seq_k"])))
    lanes = int(kwargs.get("BLOCK_DA", 0)) + int(kwargs.get("BLOCK_DB", 0))
    fp32 = named_args["Q"].dtype == torch.float32

    def keep(c: "triton.Config") -> bool:
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if m > cap_m or n > cap_n or m * lanes > 128 * 32 * c.num_warps:
            return False
        return not (fp32 and m * n > 64 * 32)

    kept = [c for c in configs if keep(c)]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


if HAS_TRITON:
    _attn_fwd_tuned = triton.autotune(
        configs=AUTOTUNE_CONFIGS,
        key=["seq_q", "seq_k", "HEAD_DIM"],  # the autotuner adds the tensors' dtypes to the key
        prune_configs_by={"early_config_prune": prune_configs},
    )(_attn_fwd)


def interpreting() -> bool:
    """True when the kernel is a Triton-interpreter function (TRITON_INTERPRET=1 set before triton's import).

    Only then can it run on CPU tensors. Triton decides at import time: its own `tl.*` helpers are jitted
    when `triton.language` is first imported, so setting the variable later has no effect.
    """
    # Both must hold: setting the variable after `import triton` makes our kernel interpreted but leaves
    # triton's own helpers (tl.zeros, tl.max, tl.sum) compiled, and calling those fails.
    return (
        HAS_TRITON and isinstance(_attn_fwd, InterpretedFunction) and isinstance(tl.max, InterpretedFunction)
    )


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    shapes = f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"expected (B, H, S, D) tensors, got {shapes}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"batch/heads/key lengths disagree: {shapes}")
    if not q.shape[-1] == k.shape[-1] == v.shape[-1]:
        raise ValueError(f"q, k and v must share one head dim: {shapes}")
    if q.dtype not in SUPPORTED_DTYPES or not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"dtypes must be equal and fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not q.device == k.device == v.device:
        raise ValueError("q, k and v must be on one device")
    if k.shape[2] == 0:
        raise ValueError("attention over zero keys is undefined")


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    out: torch.Tensor | None = None,
    config: dict[str, int] | None = None,
) -> torch.Tensor:
    """Launch the Triton kernel without guards; CPU tensors need the interpreter (`interpreting()`).

    Args:
        q: (B, H, Sq, D); k, v: (B, H, Sk, D); same dtype (fp16/bf16/fp32), D ≤ 256. Any strides.
        scale: softmax scale, default 1/sqrt(D).
        out: optional (B, H, Sq, D) output to write into (tests pre-fill it with NaN).
        config: fixed {"BLOCK_M", "BLOCK_N"} (plus optional "num_warps", "num_stages"); default:
            autotuned on CUDA, `heuristic_config` under the interpreter.

    Returns:
        (B, H, Sq, D); when allocated here its memory is laid out (B, Sq, H, D), so
        `out.transpose(1, 2).reshape(B, Sq, H * D)` is free, as diffusers does right after.
    """
    if not HAS_TRITON:
        raise RuntimeError("triton is not installed; call attention(), which falls back to SDPA")
    _check_inputs(q, k, v)
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    scale = head_dim**-0.5 if scale is None else float(scale)
    # The kernel assumes a unit stride along D (vector loads); anything else is copied once.
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    if out is None:
        out = q.new_empty(batch, seq_q, heads, head_dim).transpose(1, 2)  # (B, H, Sq, D)
    elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with unit stride along D")
    if out.numel() == 0:
        return out

    block_da, block_db = split_head_dim(head_dim)
    meta = {
        "HEAD_DIM": head_dim,
        "BLOCK_DA": block_da,
        "BLOCK_DB": block_db,
        # fp32 inputs: full-precision dots (tf32 would break the accuracy contract); ignored for 16-bit.
        "DOT_PRECISION": "ieee" if q.dtype == torch.float32 else "tf32",
    }
    if interpreting():
        if q.dtype == torch.bfloat16:  # numpy has no bf16: the interpreter multiplies the raw bits
            raise ValueError("the Triton interpreter cannot compute bf16 dots; use fp16/fp32 or a GPU")
        kernel, config = _attn_fwd, config or heuristic_config(seq_q, seq_k)
    elif q.device.type != "cuda" or isinstance(_attn_fwd, InterpretedFunction):
        raise RuntimeError(
            "the Triton kernel runs on CPU tensors only under the interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported"
        )
    elif config is not None:
        kernel = _attn_fwd
    else:
        kernel = _attn_fwd_tuned
    meta.update(config or {})

    # Grid dim 1 holds (batch, head) and is limited to 65535: launch batch slices when it overflows.
    batch_step = max(1, _MAX_GRID_Y // heads)
    for b0 in range(0, batch, batch_step):
        qs, ks, vs, os_ = (t[b0 : b0 + batch_step] for t in (q, k, v, out))
        nb = qs.shape[0]

        def grid(m: dict, nb: int = nb) -> tuple[int, int]:
            return (triton.cdiv(seq_q, m["BLOCK_M"]), nb * heads)

        # fmt: off
        kernel[grid](
            qs, ks, vs, os_,
            qs.stride(0), qs.stride(1), qs.stride(2),
            ks.stride(0), ks.stride(1), ks.stride(2),
            vs.stride(0), vs.stride(1), vs.stride(2),
            os_.stride(0), os_.stride(1), os_.stride(2),
            heads, seq_q, seq_k, scale * _LOG2E,
            **meta,
        )
        # fmt: on
    return out


# --- the custom op: opaque to torch.compile, which only sees the fake (shape/stride) implementation ---


@torch.library.custom_op("tckr::attention", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    # Device checks live here, inside the op, where torch.compile does not trace: Triton needs sm80+ for
    # bf16 dots. The fallback writes into the kernel's output layout so the fake stays exact.
    if q.is_cuda and q.dtype == torch.bfloat16 and torch.cuda.get_device_capability(q.device) < (8, 0):
        out = _attention_op_fake(q, k, v, scale)
        return out.copy_(F.scaled_dot_product_attention(q, k, v, scale=scale))
    return triton_attention(q, k, v, scale)


@_attention_op.register_fake
def _attention_op_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    batch, heads, seq_q, head_dim = q.shape
    return q.new_empty(batch, seq_q, heads, head_dim).transpose(1, 2)  # same layout as the real op


# --- the public function ---


def triton_disabled() -> bool:
    """True when the kill switch `TCKR_DISABLE_TRITON` is set to anything but ''/0/false."""
    return os.environ.get(KILL_SWITCH_ENV, "").strip().lower() not in ("", "0", "false", "no")


def can_use_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether `attention` would run the Triton kernel for these inputs (else it calls SDPA)."""
    if not HAS_TRITON or triton_disabled():
        return False
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    if not (q.is_cuda and k.device == q.device and v.device == q.device):
        return False
    if q.dtype not in PUBLIC_DTYPES or not q.dtype == k.dtype == v.dtype:
        return False
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3]:  # no broadcasting / GQA
        return False
    if not q.shape[-1] == k.shape[-1] == v.shape[-1] <= MAX_HEAD_DIM:
        return False
    if q.shape[2] == 0 or k.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return False
    # Forward only: the op has no backward, so training (LoRA fine-tuning) goes through SDPA.
    return not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, scale=scale)` through the Triton kernel where it can run.

    Args:
        q: (B, H, Sq, D); k, v: (B, H, Sk, D).
        scale: softmax scale; `None` means 1/sqrt(D).

    Returns:
        (B, H, Sq, D) in q's dtype. Falls back to SDPA on CPU, for fp32 and other dtypes, other shapes,
        with autograd, without Triton, or with `TCKR_DISABLE_TRITON=1`.
    """
    if can_use_triton(q, k, v):
        return torch.ops.tckr.attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else float(scale))
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int) -> int:
    """Forward FLOPs of attention: two matmuls of 2·Sq·Sk·D each per (batch, head) = 4·B·H·Sq·Sk·D."""
    return 4 * batch * heads * seq_q * seq_k * head_dim


__all__ = [
    "AUTOTUNE_CONFIGS",
    "HAS_TRITON",
    "KILL_SWITCH_ENV",
    "PUBLIC_DTYPES",
    "SUPPORTED_DTYPES",
    "attention",
    "attention_flops",
    "can_use_triton",
    "heuristic_config",
    "prune_configs",
    "split_head_dim",
    "triton_attention",
    "triton_disabled",
]
