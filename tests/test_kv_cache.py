"""Cross-attention keys and values computed once per sampling loop (kernels/kv_cache.py).

The cache must change nothing but the work done: the UNet's output with the engine's processor is bitwise
diffusers' `AttnProcessor2_0`'s, cached or not; a new context is projected, not served stale; nothing is
cached outside the scope, with autograd on, or on another thread.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import tiny_unet
from diffusers.models.attention_processor import AttnProcessor2_0

from tckr_engine.engine.sampler import denoise, make_scheduler
from tckr_engine.kernels.kv_cache import cross_attention_kv_cache
from tckr_engine.kernels.processor import EngineAttnProcessor, set_attention_backend


def contexts(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 5, 32, generator=g) for _ in range(n)]  # (B, text tokens, cross dim)


def latents(seed=4):
    return torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


class KeyCalls:
    """Counts `to_k` calls of the cross-attention layers (attn2) and of the self-attention layers (attn1)."""

    def __init__(self, unet):
        self.cross = self.self_ = 0
        for name, module in unet.named_modules():
            if name.endswith("attn2.to_k"):
                module.register_forward_hook(lambda *_: self._add("cross"))
            elif name.endswith("attn1.to_k"):
                module.register_forward_hook(lambda *_: self._add("self_"))
        self.layers = sum(name.endswith("attn2.to_k") for name, _ in unet.named_modules())

    def _add(self, which):
        setattr(self, which, getattr(self, which) + 1)


@pytest.fixture
def unet():
    net = tiny_unet()
    set_attention_backend(net, "sdpa")
    assert all(type(p) is EngineAttnProcessor for p in net.attn_processors.values())
    return net


def test_engine_sdpa_processor_is_bitwise_diffusers_cached_or_not(unet):
    x, t = latents(), torch.tensor(500)
    ctx_a, ctx_b = contexts(2)
    with torch.inference_mode():
        plain = tiny_unet()
        plain.set_attn_processor(AttnProcessor2_0())
        expected = [plain(x, t, c).sample for c in (ctx_a, ctx_b)]
        assert not torch.equal(expected[0], expected[1])  # the context matters to the output
        assert torch.equal(unet(x, t, ctx_a).sample, expected[0])
        with cross_attention_kv_cache():
            for c, want in [(ctx_a, expected[0]), (ctx_a, expected[0]), (ctx_b, expected[1])]:
                assert torch.equal(unet(x, t, c).sample, want)  # ctx_b: projected, not ctx_a's keys


def test_scope_projects_each_context_once_per_layer(unet):
    calls = KeyCalls(unet)
    assert calls.layers == 4  # transformer blocks: down 1, mid 1, up 2
    x, t = latents(), torch.tensor(500)
    ctx_a, ctx_b = contexts(2)
    with torch.inference_mode():
        unet(x, t, ctx_a)
        unet(x, t, ctx_a)
        assert (calls.cross, calls.self_) == (2 * calls.layers, 2 * calls.layers)  # no scope: every call
        calls.cross = calls.self_ = 0
        with cross_attention_kv_cache():
            for _ in range(3):
                unet(x, t, ctx_a)
            assert calls.cross == calls.layers  # once for three calls
            unet(x, t, ctx_b)
            unet(x, t, ctx_b.clone())  # equal values, another tensor: projected again
            assert calls.cross == 3 * calls.layers
        assert calls.self_ == 5 * calls.layers  # self-attention keys depend on x: never cached
        calls.cross = 0
        unet(x, t, ctx_a)  # the scope is closed
        assert calls.cross == calls.layers


def test_nothing_cached_with_autograd_or_on_another_thread(unet):
    calls = KeyCalls(unet)
    x, t = latents(), torch.tensor(500)
    (ctx,) = contexts(1)
    with cross_attention_kv_cache():
        with torch.no_grad():
            unet(x, t, ctx)
        assert calls.cross == calls.layers
        unet(x, t, ctx).sample.sum().backward()  # training: keys must stay in the graph
        assert calls.cross == 2 * calls.layers
        assert unet.conv_in.weight.grad is not None

        def other():
            with torch.no_grad():
                unet(x, t, ctx)  # the scope belongs to the main thread

        worker = threading.Thread(target=other)
        worker.start()
        worker.join()
        assert calls.cross == 3 * calls.layers


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_denoise_projects_the_context_once_per_loop(unet, guidance):
    calls = KeyCalls(unet)
    (cond,) = contexts(1)
    uncond = torch.zeros(1, 5, 32)
    schedule = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}

    def run():
        sched = make_scheduler("ddim", schedule, "latent")
        fn = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
        return denoise(fn, sched, latents(), cond, uncond, guidance, steps=4)

    out = run()
    assert calls.cross == calls.layers  # 4 steps, one projection per layer
    assert calls.self_ == 4 * calls.layers
    with torch.inference_mode():
        unet.set_attn_processor(AttnProcessor2_0())
    assert torch.equal(run(), out)  # diffusers' processor, no cache: the same latents bit for bit


def test_compiled_unet_takes_the_engines_processor_in_one_graph(unet):
    """torch.compile traces the processor without a graph break and computes keys in the graph (the cache
    is off while compiling), inside the scope as the engine's compile backend runs it."""
    calls = KeyCalls(unet)
    x, t = latents(), torch.tensor(500)
    (ctx,) = contexts(1)
    with torch.inference_mode():
        expected = unet(x, t, ctx).sample
        compiled = torch.compile(unet, fullgraph=True, backend="eager")  # fullgraph: a break raises
        with cross_attention_kv_cache():
            got = [compiled(x, t, ctx).sample for _ in range(2)]
    assert all(torch.equal(g, expected) for g in got)
    assert calls.cross == 3 * calls.layers  # eager once, then the graph projects on every call


@pytest.mark.gpu
def test_gpu_cached_keys_give_diffusers_output_bit_for_bit():
    """On CUDA in fp16 (the GPU bench's dtype) the cache reuses the projection's own tensors: bitwise."""
    net = tiny_unet().to("cuda", torch.float16)
    plain = tiny_unet().to("cuda", torch.float16)
    plain.set_attn_processor(AttnProcessor2_0())
    set_attention_backend(net, "sdpa")
    x, t = latents().to("cuda", torch.float16), torch.tensor(500, device="cuda")
    (ctx,) = (c.to("cuda", torch.float16) for c in contexts(1))
    with torch.inference_mode():
        expected = plain(x, t, ctx).sample
        with cross_attention_kv_cache():
            got = [net(x, t, ctx).sample for _ in range(3)]
    assert all(torch.equal(g, expected) for g in got)
