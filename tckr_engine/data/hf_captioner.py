"""The `hf` captioner: any transformers image-to-text model from a local folder (BLIP, BLIP-2 as in TCKR, GIT,
vision-encoder-decoder models).

One unconditional caption per image (no text prompt), greedy decoding, `max_new_tokens` tokens at most
(TCKR: BLIP-2, 20 tokens; REFERENCE.md §1). Grey images are converted to RGB. The model is loaded with
`local_files_only=True`: a folder that is missing or does not hold an image-to-text model is one clear
`TckrError`, never a download.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)

_HELP = "pass a local transformers image-to-text model folder (config.json, weights, processor files)"


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _model_class(model_type: str) -> Any:
    """The transformers class that generates text from images for `model_type`."""
    import transformers

    explicit = {
        "blip": "BlipForConditionalGeneration",
        "blip-2": "Blip2ForConditionalGeneration",
        "vision-encoder-decoder": "VisionEncoderDecoderModel",
    }
    if model_type in explicit:
        return getattr(transformers, explicit[model_type])
    # transformers 5 folded AutoModelForVision2Seq into AutoModelForImageTextToText.
    auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
    return auto


class _Captioner:
    """A loaded model plus the two halves of its processor (image preprocessing, token decoding)."""

    def __init__(self, folder: Path, device: str) -> None:
        import transformers

        if not folder.is_dir():
            raise TckrError(f"caption model folder not found: {folder}; {_HELP}")
        if not (folder / "config.json").is_file():
            raise TckrError(f"{folder} has no config.json; {_HELP}")
        try:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise TckrError(f"cannot read the model config in {folder}: {_first_line(e)}") from None
        self.device = torch.device(device)
        # fp16 on a GPU as in TCKR's BLIP-2 captioning; fp32 on CPU, where fp16 matmuls are slow or missing.
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        model_type = str(getattr(config, "model_type", ""))
        try:
            cls = _model_class(model_type)
            model = cls.from_pretrained(str(folder), local_files_only=True, dtype=self.dtype)
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise TckrError(
                f"{folder} (model type {model_type!r}) cannot be loaded as an image-to-text model: "
                f"{_first_line(e)}"
            ) from None
        if not hasattr(model, "generate"):
            raise TckrError(f"{folder} (model type {model_type!r}) cannot generate text; {_HELP}")
        self.model = model.to(self.device).eval()
        self.images, self.decoder = self._processor(folder, model_type)
        log.info("caption model %s (%s) on %s, %s", folder, type(model).__name__, self.device, self.dtype)

    @staticmethod
    def _processor(folder: Path, model_type: str) -> tuple[Callable[..., Any], Any]:
        """(image preprocessing callable, object with `batch_decode`) for the model in `folder`."""
        import transformers

        try:
            proc = transformers.AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError):
            proc = None
        if proc is not None and hasattr(proc, "image_processor") and hasattr(proc, "batch_decode"):
            return (lambda pils: proc(images=pils, return_tensors="pt")), proc
        # Folders without a processor config (e.g. vision-encoder-decoder): image processor + tokenizer.
        try:
            image_proc = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise TckrError(
                f"{folder} (model type {model_type!r}) has no usable image processor and tokenizer: "
                f"{_first_line(e)}"
            ) from None
        return (lambda pils: image_proc(pils, return_tensors="pt")), tokenizer

    @torch.inference_mode()
    def __call__(self, images: np.ndarray, max_new_tokens: int) -> list[str]:
        """Captions for uint8 images (B, H, W, C), C in {1, 3}."""
        from PIL import Image

        if images.shape[-1] == 1:
            pils = [Image.fromarray(im[..., 0], "L").convert("RGB") for im in images]
        else:
            pils = [Image.fromarray(im, "RGB") for im in images]
        inputs = dict(self.images(pils))
        inputs = {
            k: v.to(self.device, self.dtype if v.is_floating_point() else v.dtype)
            for k, v in inputs.items()
            if isinstance(v, torch.Tensor)
        }  # pixel_values: (B, 3, h, w)
        out = self.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
        texts = self.decoder.batch_decode(out, skip_special_tokens=True)  # (B,) strings
        return [" ".join(t.split()) for t in texts]


def hf_captions(
    images: np.ndarray,
    model: str | Path,
    device: str = "cpu",
    batch_size: int = 32,
    max_new_tokens: int = 20,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """One greedy, unconditional caption per uint8 image (N, H, W, C) from the local model folder `model`.

    Batched on `device`; `progress(n)` is called after each batch of n images. Captions are stripped and
    their whitespace collapsed (an empty caption stays "").
    """
    if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3):
        raise ValueError(f"need uint8 images (N, H, W, 1|3), got {images.dtype} {images.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise TckrError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise TckrError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TckrError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    captioner = _Captioner(Path(model).expanduser(), device)
    captions: list[str] = []
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]  # (B, H, W, C)
        captions += captioner(batch, max_new_tokens)
        if progress is not None:
            progress(len(batch))
    empty = sum(not c for c in captions)
    if empty:
        log.warning("%d of %d captions are empty (prompt = class name only)", empty, len(captions))
    log.info("%d captions, %d distinct", len(captions), len(set(captions)))
    return captions
