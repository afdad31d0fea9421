"""Image classifiers (teacher and student): presets, uint8 preprocessing, safetensors save/load.

A classifier folder holds `model.safetensors` and `classifier.json` (architecture, number of classes, input
size and channels, class names in the dataset's own order, normalisation). `Classifier.forward` takes
uint8 images (B, H, W, C) as the engine produces them, so a teacher can label generated batches on the device;
`Classifier.features` gives the penultimate features (Fréchet distance, probes).

Architectures: `small-cnn` (plain 5-conv CNN, 8-64 px), `resnet-small` (CIFAR-style ResNet, 28-64 px) and
`timm:<name>` (any timm model, for larger images; optional extra `tckr-engine[timm]`, imported lazily,
random init or a local weights file, never a hub download).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write

CONFIG_NAME = "classifier.json"
WEIGHTS_NAME = "model.safetensors"
RUN_LOG_NAME = "train_log.jsonl"  # a training run's folder: one line per epoch
RUN_METRICS_NAME = "metrics.json"  # written last: its presence marks a finished run


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


class _BasicBlock(nn.Module):
    """Standard (post-activation) ResNet basic block: two 3x3 convs with BN, identity or 1x1 shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))  # (B, cout, H/s, W/s)
        out = self.bn2(self.conv2(out))  # (B, cout, H/s, W/s)
        return torch.relu(out + self.shortcut(x))


class ResNetSmall(nn.Module):
    """CIFAR-style ResNet for 8-64 px: 3x3 stem, three stages (w, 2w, 4w) of `blocks` basic blocks.

    Stages 2 and 3 halve the resolution; no stem pooling, so 28 px keeps a 7x7 map in the last stage.
    Defaults (width 32, 2 blocks per stage) give ~0.69 M parameters (a ResNet-14). The timm-style
    `forward_features` / `forward_head(pre_logits=True)` split lets `Classifier.features` stay generic.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, blocks: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(blocks):
                layers.append(_BasicBlock(cin, cout, stride=2 if stage > 0 and i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():  # zero-init the last BN of each block: every block starts as the identity
            if isinstance(m, _BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x))  # (B, 4w, H/4, W/4)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=(2, 3))  # (B, 4w) global average pool
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))  # (B, K)


def _resnet_small(in_channels: int, num_classes: int, width: int = 32, blocks: int = 2) -> nn.Module:
    """CIFAR-style ResNet-14 for 28-64 px images (~0.69 M parameters at the defaults)."""
    return ResNetSmall(in_channels, num_classes, width=width, blocks=blocks)


ARCHS: dict[str, Callable[..., nn.Module]] = {"small-cnn": _small_cnn, "resnet-small": _resnet_small}
TIMM_PREFIX = "timm:"  # `timm:<model name>`, e.g. `timm:resnet18`, built by timm.create_model
ARCH_HELP = f"{', '.join(ARCHS)} or {TIMM_PREFIX}<model name>"


def _timm_net(
    name: str, in_channels: int, num_classes: int, init_weights: str | None, **kwargs: Any
) -> nn.Module:
    """A timm model with a fresh `num_classes` head; `init_weights` is a local file (never a hub download)."""
    try:
        import timm
    except ImportError:
        raise TckrError(
            f"classifier '{TIMM_PREFIX}{name}' needs timm, which is not installed: "
            "pip install 'tckr-engine[timm]'"
        ) from None
    if not timm.is_model(name):
        raise TckrError(f"timm has no model named {name!r}; timm.list_models() names the available ones")
    extra: dict[str, Any] = {}
    if init_weights is not None:
        path = Path(init_weights).expanduser()
        if not path.is_file():
            raise TckrError(
                f"initial weights for {TIMM_PREFIX}{name} not found at {path}; pass a local weights file"
            )
        # timm loads the file, drops a head of the wrong size and adapts the stem to `in_chans`.
        extra = {"pretrained": True, "pretrained_cfg_overlay": {"file": str(path)}}
    try:
        return timm.create_model(name, num_classes=num_classes, in_chans=in_channels, **extra, **kwargs)
    except (RuntimeError, TypeError, ValueError, OSError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TckrError(f"cannot build {TIMM_PREFIX}{name}: {first}") from None


def check_arch(arch: str, width: int | None = None, init_weights: str | None = None) -> None:
    """One-line TckrError unless `arch` names a registered or `timm:` architecture that takes the given
    options (`width`: registered ones only; `init_weights`: timm ones only); for configs, before a build."""
    if arch not in ARCHS and not (arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX)):
        raise TckrError(f"unknown classifier architecture {arch!r}; choose one of {ARCH_HELP}")
    if width is not None and arch not in ARCHS:
        raise TckrError(f"width applies to {', '.join(ARCHS)} only, not {arch}")
    if init_weights is not None and arch in ARCHS:
        raise TckrError(f"init_weights applies to {TIMM_PREFIX}<name> classifiers only, not {arch}")


def build_network(
    arch: str, in_channels: int, num_classes: int, init_weights: str | None = None, **arch_kwargs: Any
) -> nn.Module:
    """The bare network (float (B, C, H, W) -> logits (B, K)) of a registered or `timm:` architecture."""
    check_arch(arch, init_weights=init_weights)
    if arch not in ARCHS:
        return _timm_net(arch[len(TIMM_PREFIX) :], in_channels, num_classes, init_weights, **arch_kwargs)
    try:
        return ARCHS[arch](in_channels, num_classes, **arch_kwargs)
    except TypeError as e:
        raise TckrError(f"bad options for classifier {arch}: {e}") from None


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
        init_weights: str | None = None,
        **arch_kwargs: Any,
    ) -> None:
        super().__init__()
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
        if init_weights is not None:  # provenance only: `load_classifier` does not read the file again
            self.config["init_weights"] = str(init_weights)
        self.net = build_network(arch, in_channels, num_classes, init_weights, **arch_kwargs)
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
        """uint8 (B, H, W, C) or preprocessed float (B, C, H, W) -> logits (B, K)."""
        if images.dtype == torch.uint8:
            images = self.preprocess(images)
        return self.net(images)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate features (B, F): the input of the final linear layer (after global pooling)."""
        x = self.preprocess(images) if images.dtype == torch.uint8 else images  # (B, C, H, W)
        net = self.net
        if isinstance(net, nn.Sequential):  # small-cnn: every layer but the final Linear
            return net[:-1](x)  # (B, F)
        return net.forward_head(net.forward_features(x), pre_logits=True)  # (B, F): ResNetSmall and timm


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def save_classifier(model: Classifier, path: str | Path) -> Path:
    """Write `model.safetensors` and `classifier.json` into the folder `path` (created), each atomically:
    a trainer rewrites the weights at every better epoch; a kill mid-write must leave the previous ones."""
    from safetensors.torch import save

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write(path / WEIGHTS_NAME, save(state))
    atomic_write(path / CONFIG_NAME, (json.dumps(model.config, indent=2) + "\n").encode())
    return path


def load_classifier(path: str | Path, *, unfinished: bool = False) -> Classifier:
    """Load a classifier folder; a missing or broken folder is one clear TckrError.

    A training run's folder (`teacher`, `train`: it has `train_log.jsonl`) holds its best-so-far weights
    from the first epoch on and writes `metrics.json` last; without it the run was interrupted and its
    weights are not the model it was asked for, so it is refused unless `unfinished` (the trainers
    themselves, scoring their best epoch before writing metrics.json). Folders written by `save_classifier`
    alone (shadow models, tests, the Python API) have no training log and load as they are.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path).expanduser()
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    if not cfg_file.is_file() or not weights.is_file():
        raise TckrError(
            f"classifier not found at {path}: expected {CONFIG_NAME} and {WEIGHTS_NAME} "
            "(train one with 'tckr-engine teacher')"
        )
    if not unfinished and (path / RUN_LOG_NAME).is_file() and not (path / RUN_METRICS_NAME).is_file():
        raise TckrError(
            f"{path} is an unfinished training run ({RUN_LOG_NAME} but no {RUN_METRICS_NAME}: it was "
            "interrupted); finish it: a student resumes when its 'tckr-engine train' command is rerun, a "
            "teacher is retrained with 'tckr-engine teacher ... --overwrite'"
        )
    retrain = "train it again with 'tckr-engine teacher' (or 'train')"
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TckrError(f"cannot read {cfg_file} ({e}); {retrain}") from None
    required = ("arch", "num_classes", "in_channels", "image_size", "classes")
    missing = [k for k in required if k not in cfg] if isinstance(cfg, dict) else list(required)
    if missing:
        raise TckrError(f"{cfg_file} is not a classifier config (no {', '.join(missing)}); {retrain}")
    try:
        cfg["classes"] = tuple(cfg["classes"])
        init_weights = cfg.pop("init_weights", None)  # the weights file below replaces them
        model = Classifier(**cfg)
    except (TypeError, ValueError, KeyError) as e:
        raise TckrError(f"{cfg_file} does not describe a classifier ({e}); {retrain}") from None
    if init_weights is not None:
        model.config["init_weights"] = init_weights
    try:
        state = load_file(str(weights))
    except (OSError, SafetensorError) as e:
        raise TckrError(f"cannot read the weights {weights} ({e}); {retrain}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # "Error(s) in loading state_dict ...:" then what does not match
        lines = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        detail = lines[0][:200] if lines else str(e)[:200]
        raise TckrError(f"the weights in {weights} do not fit {cfg_file} ({detail}); {retrain}") from None
    return model.eval()
