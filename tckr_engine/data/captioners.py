"""Captioners: one caption per real training image; prompt = "<class name>: <caption>" (TCKR).

- `attributes` (built in, deterministic, no model): words for measurable visual attributes of each image —
  brightness, ink coverage (size), aspect, texture (edge density), position — each binned by the quantiles of
  the image's own class, so captions vary within a class and every word is used about equally.
- `hf`: any transformers image-to-text model from a local folder (BLIP / BLIP-2 as in TCKR); see
  `tckr_engine.data.hf_captioner`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from tckr_engine.data.datasets import ImageDataset
from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write, check_output_file

log = logging.getLogger(__name__)

INK_THRESHOLD = 0.1  # a pixel is "ink" when its normalised distance from the background exceeds this

# (attribute, words for the low / middle / high third of the class's distribution)
WORDS: dict[str, tuple[str, str, str]] = {
    "brightness": ("dark", "mid-tone", "bright"),
    "size": ("small", "medium-sized", "large"),
    "aspect": ("tall", "square", "wide"),
    "texture": ("smooth", "lightly textured", "highly textured"),
}


def _measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per-image attribute values for uint8 images (N, H, W, C); background = the border's median."""
    x = images.astype(np.float32).mean(axis=-1) / 255.0  # (N, H, W) grey
    _, h, w = x.shape
    border = np.concatenate([x[:, 0, :], x[:, -1, :], x[:, :, 0], x[:, :, -1]], axis=1)  # (N, 2H+2W)
    background = np.median(border, axis=1)[:, None, None]  # (N, 1, 1)
    ink = np.abs(x - background) > INK_THRESHOLD  # (N, H, W)
    count = np.maximum(ink.sum(axis=(1, 2)), 1)
    brightness = (x * ink).sum(axis=(1, 2)) / count
    coverage = ink.mean(axis=(1, 2))
    rows, cols = ink.any(axis=2), ink.any(axis=1)  # (N, H), (N, W)
    height = np.maximum(rows.sum(axis=1), 1)
    width = np.maximum(cols.sum(axis=1), 1)
    gy = np.abs(np.diff(x, axis=1))[:, :, :-1]
    gx = np.abs(np.diff(x, axis=2))[:, :-1, :]
    edges = ((gx + gy) * ink[:, :-1, :-1]).sum(axis=(1, 2)) / count
    yy, xx = np.mgrid[0:h, 0:w]
    cy = (ink * yy).sum(axis=(1, 2)) / count / max(h - 1, 1) - 0.5  # centroid offset in [-0.5, 0.5]
    cx = (ink * xx).sum(axis=(1, 2)) / count / max(w - 1, 1) - 0.5
    return {
        "brightness": brightness,
        "size": coverage,
        "aspect": width / height,
        "texture": edges,
        "cy": cy,
        "cx": cx,
    }


def _position(cy: float, cx: float, tol: float = 0.06) -> str:
    vertical = "upper" if cy < -tol else "lower" if cy > tol else ""
    horizontal = "left" if cx < -tol else "right" if cx > tol else ""
    if not vertical and not horizontal:
        return "centered"
    return "in the " + " ".join(filter(None, [vertical, horizontal])) + " part"


def _tertiles(values: np.ndarray) -> np.ndarray:
    """Bin index 0/1/2 per value by the 1/3 and 2/3 quantiles of `values` (rank-based: ties stay together)."""
    if len(values) < 3:
        return np.ones(len(values), dtype=np.int64)
    lo, hi = np.quantile(values, [1 / 3, 2 / 3])
    return (values > lo).astype(np.int64) + (values > hi).astype(np.int64)


def attribute_captions(images: np.ndarray, labels: np.ndarray) -> list[str]:
    """Deterministic captions such as "bright, large, tall, smooth, centered"."""
    values = _measure(images)
    bins = {name: np.zeros(len(images), dtype=np.int64) for name in WORDS}
    for c in np.unique(labels):
        members = labels == c
        for name in WORDS:
            bins[name][members] = _tertiles(values[name][members])
    captions = []
    for i in range(len(images)):
        words = [WORDS[name][bins[name][i]] for name in WORDS]
        words.append(_position(float(values["cy"][i]), float(values["cx"][i])))
        captions.append(", ".join(words))
    return captions


CAPTIONERS: dict[str, str] = {
    "attributes": "deterministic words for brightness, size, aspect, texture and position (no model)",
    "hf": "a transformers image-to-text model from a local folder (e.g. BLIP-2, as in TCKR)",
}


def caption_dataset(
    dataset: ImageDataset,
    captioner: str = "attributes",
    model: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    max_new_tokens: int = 20,
    progress: Callable[[int], None] | None = None,
) -> list[str]:
    """One caption per image of `dataset`."""
    if captioner == "attributes":
        captions = attribute_captions(dataset.images, dataset.labels)
        if progress is not None:
            progress(len(captions))
        return captions
    if captioner == "hf":
        if not model:
            raise TckrError("the hf captioner needs --caption-model FOLDER (a local transformers model)")
        from tckr_engine.data.hf_captioner import hf_captions

        return hf_captions(dataset.images, model, device, batch_size, max_new_tokens, progress)
    raise TckrError(f"unknown captioner {captioner!r}; choose {', '.join(CAPTIONERS)}")


def write_captions(path: str | Path, dataset: ImageDataset, captions: Sequence[str]) -> Path:
    """Write the captions JSONL (atomically); the prompt is "<class name>: <caption>"."""
    if len(captions) != len(dataset):
        raise ValueError(f"{len(captions)} captions for {len(dataset)} images")
    lines = []
    for i, (label, caption) in enumerate(zip(dataset.labels.tolist(), captions, strict=True)):
        name = dataset.classes[label]
        row = {
            "index": i,
            "class_index": label,
            "class_name": name,
            "caption": caption,
            "prompt": f"{name}: {caption}",
        }
        lines.append(json.dumps(row, ensure_ascii=False))
    path = check_output_file(path, "captions file")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, ("\n".join(lines) + "\n").encode("utf-8"))
    return path
