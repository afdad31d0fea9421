"""PyTorch reference attention: the CPU path and the oracle every kernel test compares against.

Modelled on flash-attention's `attention_ref`: plain matmul + softmax, optionally upcast to fp32 so that
it can serve as the "exact" answer for fp16 / bf16 inputs. With `upcast=False` it is what plain
low-precision PyTorch computes, which sets the error budget in the 2x rule (STYLE.md): a kernel's error
against the upcast reference may be at most twice the error of the non-upcast reference.
"""

from __future__ import annotations

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float | None = None,
    upcast: bool = True,
) -> torch.Tensor:
    """softmax(q kᵀ · scale) v over the last two dims, like `F.scaled_dot_product_attention` (no mask).

    Args:
        q: (..., Sq, D) queries, usually (B, H, Sq, D).
        k: (..., Sk, D) keys.
        v: (..., Sk, Dv) values.
        scale: softmax scale; `None` means 1/sqrt(D), as in SDPA.
        upcast: compute in fp32 when the inputs are fp16/bf16 (fp32 and fp64 inputs keep their dtype).

    Returns:
        (..., Sq, Dv) in the dtype of `q`.
    """
    dtype_in = q.dtype
    if upcast and dtype_in in _LOW_PRECISION:
        q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., Sq, Sk)
    probs = torch.softmax(scores, dim=-1)  # (..., Sq, Sk)
    out = torch.matmul(probs, v)  # (..., Sq, Dv)
    return out.to(dtype_in)
