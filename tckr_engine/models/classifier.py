"""Image classifiers (teacher and student): presets, uint8 preprocessing, safetensors save/load.

A classifier folder holds `model.safetensors` and `classifier.json` (architecture, number of classes, input
size and channels, class names in the dataset's own order, normalisation). `Classifier.forward` takes
uint8 images (B, H, W, C) as the engine produces them, so a teacher can label generated batches on the device.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tckr_engine.errors import TckrError

CONFIG_NAME = "classifier.json"
WEIGHTS_NAME = "model.safetensors"


def _small_cnn(in_channels: int, num_classes: int, width: int = 32) -> nn.Module:
    """A small CNN for 8-64 px images (BN + ReLU, global average pooling)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *block(in_channels, width),
        *block(width, width),
        nn.MaxPool2d(2, ceil_mode=True),
        *block(width, 2 * width),
        *block(2 * width, 2 * width),
        nn.MaxPool2d(2, ceil_mode=True),
        *block(2 * width, 4 * width),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4 * width, num_classes),
    )


ARCHS: dict[str, Callable[..., nn.Module]] = {"small-cnn": _small_cnn}


class Classifier(nn.Module):
    """A network plus its input contract. `forward(uint8 (B, H, W, C)) -> logits (B, K)`."""

    def __init__(
        self,
        arch: str,
        num_classes: int,
        in_channels: int,
        image_size: int,
        classes: tuple[str, ...],
        mean: float = 0.5,
        std: float = 0.5,
        **arch_kwargs: Any,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise TckrError(f"unknown classifier architecture {arch!r}; choose one of {', '.join(ARCHS)}")
        if len(classes) != num_classes:
            raise TckrError(f"classifier has {num_classes} outputs but {len(classes)} class names")
        self.config = {
            "arch": arch,
            "num_classes": num_classes,
            "in_channels": in_channels,
            "image_size": image_size,
            "classes": list(classes),
            "mean": mean,
            "std": std,
            **arch_kwargs,
        }
        self.net = ARCHS[arch](in_channels, num_classes, **arch_kwargs)
        self.mean, self.std = mean, std

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.config["classes"])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, H, W, C) -> normalised float (B, C, H, W) in the network's dtype."""
        dtype = next(self.net.parameters()).dtype
        x = images.permute(0, 3, 1, 2).to(dtype) / 255.0
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = self.preprocess(images)
        return self.net(images)


def save_classifier(model: Classifier, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(model.config, indent=2) + "\n")
    return path


def load_classifier(path: str | Path) -> Classifier:
    """Load a classifier folder; a missing or broken folder is one clear TckrError."""
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise TckrError(
            f"classifier not found at {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(train one with 'tckr-engine teacher')"
        )
    try:
        cfg = json.loads(cfg_file.read_text())
        cfg["classes"] = tuple(cfg["classes"])
        model = Classifier(**cfg)
        model.load_state_dict(load_file(str(weights)))
    except (json.JSONDecodeError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TckrError(f"cannot load classifier from {path}: {first}") from None
    return model.eval()
