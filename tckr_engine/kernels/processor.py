"""The engine's diffusers attention processor: SDPA or the Triton kernel, cross-attention keys cached.

`EngineAttnProcessor` is diffusers' `AttnProcessor2_0` (diffusers/models/attention_processor.py) with two
changes: the attention call is a parameter (`sdpa_attention`, or `kernels.attention.attention` for
`TritonAttnProcessor`), and inside `kernels.kv_cache.cross_attention_kv_cache()` (the engine's sampling
loop) a cross-attention layer projects its text context to keys and values once, not at every step. The
projections, norms, residual and output rescaling are the same, so with SDPA a UNet gives bitwise the
output of `AttnProcessor2_0` (tests/test_kv_cache.py), and with Triton the same up to kernel rounding.
`set_attention_backend(unet, name)` swaps the processors of every attention layer;
`default_attention_backend(device)` picks one per device.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tckr_engine.errors import TckrError
from tckr_engine.kernels.attention import HAS_TRITON, attention, triton_disabled
from tckr_engine.kernels.kv_cache import cross_kv

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("sdpa", "triton", "xformers")

AttentionFn = Callable[..., torch.Tensor]  # (q, k, v, scale=...) -> out, all (B, H, S, D)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """PyTorch's scaled_dot_product_attention, (B, H, S, D) in and out."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class EngineAttnProcessor:
    """Self- and cross-attention of a diffusers `Attention` module through `attention_fn`.

    Args:
        attention_fn: the `(q, k, v, scale=None)` function to call (default `sdpa_attention`).
    """

    def __init__(self, attention_fn: AttentionFn = sdpa_attention) -> None:
        self.attention_fn = attention_fn

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: object,
        **kwargs: object,
    ) -> torch.Tensor:
        """Same contract as `AttnProcessor2_0.__call__`; extra args (the deprecated `scale`) are ignored."""
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)

        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(
                1, 2
            )  # (B, S, C)

        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
            attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])

        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)  # (B, Sq, H*D)
        if encoder_hidden_states is None:
            key, value = _project_kv(attn, hidden_states)  # (B, Sk, H*D) each
        else:  # the text context: the same tensor at every step of a sampling loop
            key, value = cross_kv(attn, encoder_hidden_states, lambda c: _project_kv(attn, c, cross=True))

        head_dim = key.shape[-1] // attn.heads
        # Views, no copies: the kernel takes any strides with a contiguous head dim.
        query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Sq, D)
        key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Sk, D)
        value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)  # (B, H, Sk, D)

        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if attention_mask is None:
            # attn.scale honours `scale_qk=False` (scale 1), which AttnProcessor2_0 ignores.
            hidden_states = self.attention_fn(query, key, value, scale=attn.scale)  # (B, H, Sq, D)
        else:  # masks are rare in UNets (none in SD); the kernel has no mask input
            hidden_states = F.scaled_dot_product_attention(
                query, key, value, attn_mask=attention_mask, scale=attn.scale
            )

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)  # (B, Sq, H*D)

        hidden_states = attn.to_out[0](hidden_states)  # linear projection
        hidden_states = attn.to_out[1](hidden_states)  # dropout

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _project_kv(
    attn: torch.nn.Module, context: torch.Tensor, cross: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(key, value), each (B, S, H*D), of `context` (B, S, C); a cross-attention context is normalised
    first where the layer has `norm_cross`, as in `AttnProcessor2_0`."""
    if cross and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    return attn.to_k(context), attn.to_v(context)


class TritonAttnProcessor(EngineAttnProcessor):
    """`EngineAttnProcessor` through the Triton kernel.

    Args:
        attention_fn: default `kernels.attention.attention`, which guards and falls back to SDPA (CPU,
            autograd, kill switch). Tests pass `triton_attention` to force the kernel (the Triton
            interpreter on CPU).
    """

    def __init__(self, attention_fn: AttentionFn = attention) -> None:
        super().__init__(attention_fn)


def _xformers_processor() -> object:
    try:
        import xformers.ops  # noqa: F401  (diffusers' processor imports it lazily; fail here, clearly)
    except ImportError as e:
        raise TckrError(
            "attention backend 'xformers' needs the xformers package, which is not installed: "
            "pip install xformers, or use --attention sdpa or --attention triton"
        ) from e
    from diffusers.models.attention_processor import XFormersAttnProcessor

    return XFormersAttnProcessor()


def check_attention_backend(name: str) -> None:
    """Raise TckrError now (before any output is written) if backend `name` cannot be used here."""
    if name not in ATTENTION_BACKENDS:
        raise TckrError(f"unknown attention backend {name!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    if name == "xformers":
        _xformers_processor()


def set_attention_backend(unet: torch.nn.Module, name: str) -> None:
    """Give every attention layer of a diffusers model the processor for backend `name`.

    Args:
        unet: a diffusers model with `set_attn_processor` (e.g. `UNet2DConditionModel`).
        name: "sdpa" (`EngineAttnProcessor`: `AttnProcessor2_0`'s output bit for bit, cross-attention keys
            cached in a sampling loop), "triton" (`TritonAttnProcessor`; it falls back to SDPA per call
            where the kernel cannot run) or "xformers" (diffusers' `XFormersAttnProcessor`, no cache).

    Raises:
        TckrError: unknown name, or xformers requested but not importable.
    """
    if name == "sdpa":
        processor: object = EngineAttnProcessor()
    elif name == "triton":
        if not HAS_TRITON or triton_disabled():
            log.warning("attention backend 'triton' without a usable Triton: every call falls back to SDPA")
        processor = TritonAttnProcessor()
    elif name == "xformers":
        processor = _xformers_processor()
    else:
        raise TckrError(f"unknown attention backend {name!r}: use one of {', '.join(ATTENTION_BACKENDS)}")
    unet.set_attn_processor(processor)
    log.info("attention backend: %s", name)


def default_attention_backend(device: torch.device | str) -> str:
    """ "triton" on CUDA when Triton imports and `TCKR_DISABLE_TRITON` is off, else "sdpa"."""
    if torch.device(device).type == "cuda" and HAS_TRITON and not triton_disabled():
        return "triton"
    return "sdpa"
