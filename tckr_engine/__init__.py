"""tckr-engine: synthetic image datasets from diffusion models (TCKR / KR), produced at scale."""

__version__ = "0.1.0"
