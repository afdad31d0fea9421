"""Generator quality measured with the teacher: class agreement and a Fréchet distance on its features.

- `teacher_agreement`: the share of generated images the teacher assigns to their conditioning class
  (REFERENCE.md §8 reports 82-91 % for the calibrated Fashion-MNIST generator).
- `frechet_distance`: the FID formula, ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁ Σ₂)^½), on the teacher's penultimate
  features instead of Inception's, so it works offline at any resolution and channel count. Values are only
  comparable between runs that use the same teacher.
- `read_shard_images`: every image and class index of a shard folder (DESIGN.md data contract), read with
  webdataset's own reader through `OUT/index.json`.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import Classifier

if TYPE_CHECKING:
    from tckr_engine.train.shard_folders import ShardFolder

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "webp")


@torch.no_grad()
def _batched(fn, images: np.ndarray | torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Apply `fn` to uint8 (N, H, W, C) images in batches; results concatenated on the CPU."""
    out = []
    for i in range(0, len(images), batch_size):
        batch = torch.as_tensor(np.array(images[i : i + batch_size]), device=device)  # (b, H, W, C) uint8
        out.append(fn(batch).float().cpu())
    return torch.cat(out)


def _check_images(teacher: Classifier, images: np.ndarray | torch.Tensor, what: str) -> None:
    shape = tuple(images.shape)
    if len(shape) != 4 or images.dtype not in (np.uint8, torch.uint8):
        raise TckrError(f"{what} must be uint8 images (N, H, W, C), got {images.dtype} {shape}")
    if shape[3] != teacher.config["in_channels"]:
        raise TckrError(
            f"{what} have {shape[3]} channel(s) but the teacher expects {teacher.config['in_channels']}"
        )


def teacher_agreement(
    teacher: Classifier,
    images_uint8: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Share of uint8 images (N, H, W, C) that `teacher` assigns to their conditioning class `labels` (N,)."""
    _check_images(teacher, images_uint8, "images")
    labels = torch.tensor(np.asarray(labels), dtype=torch.long)  # (N,) a copy: dataset arrays are read-only
    if labels.shape != (len(images_uint8),):
        raise TckrError(f"need one label per image: {len(images_uint8)} images, labels {tuple(labels.shape)}")
    if len(labels) == 0:
        raise TckrError("teacher agreement needs at least one image")
    from tckr_engine.train.teacher import predict

    pred = torch.from_numpy(predict(teacher, images_uint8, batch_size))  # (N,)
    return float((pred == labels).float().mean())


def teacher_features(
    teacher: Classifier, images_uint8: np.ndarray | torch.Tensor, batch_size: int = 256
) -> np.ndarray:
    """Penultimate teacher features (N, F) float64 of uint8 images (N, H, W, C), in eval mode."""
    _check_images(teacher, images_uint8, "images")
    was_training = teacher.training
    teacher.eval()
    device = next(teacher.parameters()).device
    feats = _batched(teacher.features, images_uint8, batch_size, device)  # (N, F)
    teacher.train(was_training)
    return feats.double().numpy()


def frechet_distance_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (N₁, F) and (N₂, F), N ≥ 2 each.

    tr((Σ₁ Σ₂)^½) is computed as Σ √λᵢ over the eigenvalues of the symmetric PSD matrix Σ₁^½ Σ₂ Σ₁^½ (it has
    the same eigenvalues as Σ₁ Σ₂): real by construction, with round-off negatives clipped to 0, so there
    is no imaginary part to discard and singular covariances (N < F) are fine.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or len(a) < 2 or len(b) < 2:
        raise TckrError(f"Fréchet distance needs two (N >= 2, F) feature sets, got {a.shape} and {b.shape}")
    mu1, mu2 = a.mean(0), b.mean(0)  # (F,)
    cov1 = np.cov(a, rowvar=False)  # (F, F)
    cov2 = np.cov(b, rowvar=False)  # (F, F)
    w1, v1 = np.linalg.eigh(cov1)  # (F,), (F, F)
    sqrt1 = (v1 * np.sqrt(np.clip(w1, 0, None))) @ v1.T  # (F, F) Σ₁^½
    middle = sqrt1 @ cov2 @ sqrt1  # (F, F) symmetric PSD
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)  # (F,) symmetrised against round-off
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    dist = float(((mu1 - mu2) ** 2).sum() + np.trace(cov1) + np.trace(cov2) - 2 * tr_sqrt)
    return max(dist, 0.0)  # round-off can make identical sets a tiny negative number


def frechet_distance(
    teacher: Classifier,
    real_images: np.ndarray | torch.Tensor,
    fake_images: np.ndarray | torch.Tensor,
    batch_size: int = 256,
) -> float:
    """Fréchet distance between teacher penultimate features of real and fake uint8 (N, H, W, C) images."""
    real = teacher_features(teacher, real_images, batch_size)  # (N1, F)
    fake = teacher_features(teacher, fake_images, batch_size)  # (N2, F)
    return frechet_distance_from_features(real, fake)


def read_shard_images(shard_folder: str | Path | ShardFolder) -> tuple[np.ndarray, np.ndarray]:
    """All images uint8 (N, H, W, C) and class indices int64 (N,) of a shard folder, in index order.

    Checks the folder as the trainer does (`open_shard_folder`: run.json, index.json, every tar against its
    stats file; pass an already opened `ShardFolder` to skip the second check), reads the listed tars with
    webdataset and checks the sample count against the index.
    Grayscale images give C = 1, colour C = 3.
    """
    import webdataset as wds
    from PIL import Image

    from tckr_engine.train.shard_folders import ShardFolder, open_shard_folder

    shards = (  # run.json, index.json, every tar against its stats file
        shard_folder if isinstance(shard_folder, ShardFolder) else open_shard_folder(shard_folder)
    )
    folder, urls = shards.path, list(shards.urls)
    images, labels = [], []
    try:
        # Basic decoders only (cls, txt, json): image bytes are decoded here so grayscale stays one channel.
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            key = next((k for k in IMAGE_KEYS if k in sample), None)
            if key is None or "cls" not in sample:
                raise TckrError(
                    f"sample {sample.get('__key__')} in {sample.get('__url__')} has no image or cls"
                )
            with Image.open(io.BytesIO(sample[key])) as image:
                arr = np.asarray(
                    image.convert("L" if image.mode in ("L", "I", "1") else "RGB")
                )  # (H, W[, 3])
            images.append(arr[..., None] if arr.ndim == 2 else arr)  # (H, W, C)
            labels.append(int(sample["cls"]))
    except (OSError, ValueError) as e:  # a truncated tar or an undecodable image
        raise TckrError(
            f"cannot read shards in {folder}: {e}; check them with 'tckr-engine verify'"
        ) from None
    if len({im.shape for im in images}) > 1:
        raise TckrError(
            f"images in {folder} differ in size or channels: {sorted({im.shape for im in images})}"
        )
    listed = sum(shards.nsamples)
    if len(images) != listed:  # a tar cut on a record boundary reads without an error
        raise TckrError(
            f"read {len(images)} samples from {folder}, its index lists {listed}; "
            f"check them with 'tckr-engine verify {folder}'"
        )
    log.info("read %d images from %d shard(s) in %s", len(images), len(urls), folder)
    return np.stack(images), np.asarray(labels, dtype=np.int64)  # (N, H, W, C), (N,)


def synthetic_quality(shard_folder: str | Path, teacher_path: str | Path, batch_size: int = 256) -> dict:
    """Teacher agreement and teacher-feature Fréchet distance of a shard folder; writes `quality.json` there.

    The real reference for the Fréchet distance is the dataset's test split (held-out real images), named in
    the folder's run.json; the teacher must have been trained on the same dataset (checked by class names).
    """
    from tckr_engine.data import load_dataset
    from tckr_engine.fsutil import write_json
    from tckr_engine.models.classifier import load_classifier
    from tckr_engine.train.shard_folders import open_shard_folder

    folder = Path(shard_folder)
    shards = open_shard_folder(folder)  # checked (each tar hashed) once, before the teacher is loaded
    spec = shards.spec
    teacher = load_classifier(teacher_path)
    if list(teacher.classes) != list(spec["classes"]):
        raise TckrError(f"teacher {teacher_path} classes differ from the shards' classes {spec['classes']}")
    fake, labels = read_shard_images(shards)
    real = load_dataset(spec["dataset"], "test")
    result = {
        "shards": str(folder),
        "teacher": str(teacher_path),
        "generator": spec["generator"]["id"],
        "images": len(fake),
        "steps": spec["steps"],
        "guidance": spec["guidance"],
        "sampler": spec["sampler"],
        "teacher_agreement": teacher_agreement(teacher, fake, labels, batch_size),
        "frechet_distance": frechet_distance(teacher, real.images, fake, batch_size),
        "frechet_reference": f"{spec['dataset']} test split ({len(real)} images)",
        "real_test_agreement": teacher_agreement(teacher, real.images, real.labels, batch_size),
    }
    write_json(folder / "quality.json", result)
    return result
