"""Teacher-driven synthesis: activation maximisation and boundary-supporting samples (BSS).

Used by the engine as generation sources (`generate_synthetic`, shard folders like the diffusion engine's)
and by the trainer for the BSS loss term (`boundary_samples`, `bss_loss`, `bss_schedule`).
"""

from tckr_engine.synth.activation_max import (
    ActivationMaxConfig,
    ActivationMaxResult,
    activation_maximise,
    total_variation,
)
from tckr_engine.synth.bss import (
    BSSConfig,
    BSSInfo,
    boundary_samples,
    bss_loss,
    bss_schedule,
    soft_cross_entropy,
)
from tckr_engine.synth.sources import SOURCES, SynthConfig, generate_synthetic, resolve_synth, synth_config

__all__ = [
    "SOURCES",
    "ActivationMaxConfig",
    "ActivationMaxResult",
    "BSSConfig",
    "BSSInfo",
    "SynthConfig",
    "activation_maximise",
    "boundary_samples",
    "bss_loss",
    "bss_schedule",
    "generate_synthetic",
    "resolve_synth",
    "soft_cross_entropy",
    "synth_config",
    "total_variation",
]
