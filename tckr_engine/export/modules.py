"""The exportable wrappers: a generator UNet and a classifier, each with its `ExportSpec`.

- `UNetExport`: (sample (B, C, h, w), timestep (1,) float32, encoder_hidden_states (B, L, D)) -> noise
  prediction (B, C, h, w); batch, spatial size and token count are dynamic axes.
- `ClassifierExport`: uint8 images (B, H, W, C) -> logits (B, K), the same contract as
  `Classifier.forward` (preprocessing is inside the graph); spatial axes are dynamic for the built-in
  architectures (global average pooling), static for timm models.
"""

from __future__ import annotations

import copy
import logging

import torch

from tckr_engine.errors import TckrError
from tckr_engine.export.contract import Exportable, ExportSpec, Profile, batch_profile
from tckr_engine.models.classifier import Classifier
from tckr_engine.models.generator import Generator

log = logging.getLogger(__name__)

SAMPLE_BATCH = 2  # trace with batch 2: a batch of 1 lets the tracer bake size-1 broadcasts into the graph
UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states")
UNET_OUTPUTS = ("noise_pred",)
CLASSIFIER_INPUTS = ("images",)
CLASSIFIER_OUTPUTS = ("logits",)
SPATIAL_DYNAMIC_ARCHS = ("small-cnn", "resnet-small")  # global pooling: any input size works


def _plain_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet on the CPU in fp32 with PyTorch attention (a copy when the engine changed any of those).

    Custom attention processors (Triton kernels, xformers) cannot be traced to ONNX; SDPA exports as
    MatMul/Softmax. The engine's own UNet is left untouched.
    """
    from diffusers.models.attention_processor import AttnProcessor2_0

    procs = getattr(unet, "attn_processors", {})
    default = all(type(p) is AttnProcessor2_0 for p in procs.values())
    param = next(unet.parameters())
    if default and param.device.type == "cpu" and param.dtype == torch.float32:
        return unet
    plain = copy.deepcopy(unet).to("cpu", torch.float32)
    if procs:
        plain.set_attn_processor(AttnProcessor2_0())
    return plain.eval()


class UNetExport(Exportable):
    """A diffusers UNet2DConditionModel as (sample, timestep, encoder_hidden_states) -> noise prediction."""

    def __init__(
        self,
        generator: Generator,
        opt_batch: int,
        max_batch: int | None = None,
        min_batch: int = 1,
    ) -> None:
        super().__init__()
        cfg = generator.unet.config
        for key in ("addition_embed_type", "class_embed_type"):
            if getattr(cfg, key, None) is not None:
                raise TckrError(
                    f"generator {generator.ident}: UNets with {key}={getattr(cfg, key)!r} (SDXL-style extra "
                    "conditioning) are not exportable; use --backend torch or compile"
                )
        self.unet = _plain_unet(generator.unet)
        self.ident = generator.ident
        self.latent_shape = generator.latent_shape  # (C, h, w)
        self.tokens = int(generator.text_encoder.length)
        self.context_dim = int(cfg.cross_attention_dim)
        self.out_channels = int(cfg.out_channels)
        self.min_batch, self.opt_batch = min_batch, opt_batch
        self.max_batch = max_batch if max_batch is not None else opt_batch

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor
    ) -> torch.Tensor:
        # sample (B, C, h, w), timestep (1,) broadcast over the batch, context (B, L, D) -> (B, C, h, w)
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]

    def export_spec(self) -> ExportSpec:
        c, h, w = self.latent_shape
        gen = torch.Generator().manual_seed(0)  # fixed samples: the export check is reproducible
        sample = torch.randn(SAMPLE_BATCH, c, h, w, generator=gen)  # (B, C, h, w)
        timestep = torch.tensor([500.0])  # (1,)
        context = torch.randn(SAMPLE_BATCH, self.tokens, self.context_dim, generator=gen)  # (B, L, D)
        lo, mid, hi = self.min_batch, self.opt_batch, self.max_batch
        return ExportSpec(
            name="unet",
            input_names=UNET_INPUTS,
            output_names=UNET_OUTPUTS,
            dynamic_axes={
                "sample": {0: "batch", 2: "height", 3: "width"},
                "encoder_hidden_states": {0: "batch", 1: "tokens"},
                "noise_pred": {0: "batch", 2: "height", 3: "width"},
            },
            sample_inputs=(sample, timestep, context),
            profile={
                "sample": batch_profile(sample.shape, lo, mid, hi),
                "timestep": Profile((1,), (1,), (1,)),
                "encoder_hidden_states": batch_profile(context.shape, lo, mid, hi),
            },
            keep_fp32=("timestep",),
            meta={"source": self.ident, "latent_shape": list(self.latent_shape), "tokens": self.tokens},
        ).validate()


class ClassifierExport(Exportable):
    """A `Classifier` as uint8 images (B, H, W, C) -> logits (B, K), preprocessing in the graph."""

    def __init__(
        self,
        classifier: Classifier,
        source: str,
        opt_batch: int,
        max_batch: int | None = None,
        min_batch: int = 1,
    ) -> None:
        super().__init__()
        self.classifier = classifier.to("cpu", torch.float32).eval()
        self.source = source
        self.min_batch, self.opt_batch = min_batch, opt_batch
        self.max_batch = max_batch if max_batch is not None else opt_batch

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier(images)  # uint8 (B, H, W, C) -> (B, K)

    def export_spec(self) -> ExportSpec:
        cfg = self.classifier.config
        size, channels = int(cfg["image_size"]), int(cfg["in_channels"])
        gen = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (SAMPLE_BATCH, size, size, channels), dtype=torch.uint8, generator=gen)
        spatial = cfg["arch"] in SPATIAL_DYNAMIC_ARCHS
        axes = {0: "batch", 1: "height", 2: "width"} if spatial else {0: "batch"}
        return ExportSpec(
            name="classifier",
            input_names=CLASSIFIER_INPUTS,
            output_names=CLASSIFIER_OUTPUTS,
            dynamic_axes={"images": axes, "logits": {0: "batch"}},
            sample_inputs=(images,),
            profile={"images": batch_profile(images.shape, self.min_batch, self.opt_batch, self.max_batch)},
            meta={
                "source": self.source,
                "arch": cfg["arch"],
                "classes": list(cfg["classes"]),
                "image_size": size,
                "in_channels": channels,
            },
        ).validate()
