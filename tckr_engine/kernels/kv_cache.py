"""Keys and values of a cross-attention context, computed once per sampling loop instead of once per step.

In a text-conditioned UNet every cross-attention layer projects the same text context to keys and values
at every denoising step: `to_k(context)`, `to_v(context)`. The context does not change during a sampling
loop, so inside `cross_attention_kv_cache()` the engine's attention processors
(`kernels.processor.EngineAttnProcessor`) keep each layer's keys and values of the last context they saw
and reuse them while the *same tensor object* comes back. Reused values are the very tensors the
projection produced, so the UNet's output is bitwise that of recomputing them.

The scope is explicit and per thread (the engine runs groups of images on worker threads, each its own
loop): outside it, with autograd recording, or while torch.compile / torch.export / TorchScript trace the
UNet, nothing is cached. Inside it the caller promises that the UNet's weights and the context tensor are
not modified in place (true of a sampling loop; inference tensors carry no version counter to check).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

import torch

_state = threading.local()

# (attention module) -> (context tensor, key, value)
Cache = dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


@contextlib.contextmanager
def cross_attention_kv_cache() -> Iterator[None]:
    """Within: cross-attention keys and values of a context tensor are computed once per layer."""
    outer = getattr(_state, "cache", None)
    _state.cache = {}
    try:
        yield
    finally:
        _state.cache = outer


def _active() -> Cache | None:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return None  # a traced graph must compute its keys and values (checked first: dynamo folds it)
    if torch.is_grad_enabled():
        return None
    cache: Cache | None = getattr(_state, "cache", None)
    return cache


def cross_kv(
    attn: torch.nn.Module,
    context: torch.Tensor,
    project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """`project(context)` -> (key, value) of layer `attn`, from the cache when the scope is active.

    A hit needs the same tensor object as the layer's last context (`is`, not equality: comparing values
    would cost as much as a projection); any other context is projected and replaces the entry.
    """
    cache = _active()
    if cache is None:
        return project(context)
    hit = cache.get(attn)
    if hit is not None and hit[0] is context:
        return hit[1], hit[2]
    key, value = project(context)
    cache[attn] = (context, key, value)
    return key, value
