"""tckr_engine.kernels: attention kernels for the generator UNets.

- `attention`: Triton flash-attention forward (`attention()` public, SDPA fallback; `triton_attention`
  launcher; custom op `torch.ops.tckr.attention`).
- `reference`: `attention_ref`, the PyTorch reference, CPU path and test oracle.
- `processor`: `TritonAttnProcessor`, `set_attention_backend`, `default_attention_backend` for diffusers.

Submodules are imported explicitly: `attention` imports triton, which must not happen before a test run
has set TRITON_INTERPRET=1.
"""
