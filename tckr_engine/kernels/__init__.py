"""tckr_engine.kernels: attention kernels for the generator UNets.

- `attention`: Triton flash-attention forward (`attention()` public, SDPA fallback; `triton_attention`
  launcher; custom op `torch.ops.tckr.attention`).
- `reference`: `attention_ref`, the PyTorch reference, CPU path and test oracle.
- `processor`: `EngineAttnProcessor` (SDPA), `TritonAttnProcessor`, `set_attention_backend`,
  `default_attention_backend` for diffusers.
- `kv_cache`: `cross_attention_kv_cache()`, the scope in which cross-attention keys and values of a
  sampling loop's text context are computed once.

Submodules are imported explicitly: `attention` imports triton, which must not happen before a test run
has set TRITON_INTERPRET=1.
"""
