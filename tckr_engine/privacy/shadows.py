"""LiRA shadow models: trained once per (dataset, recipe, pool), cached on disk, reused for every target.

Folder layout:
- `shadows.json`: the setup (config minus runtime fields, dataset, resolved shift / flip, score views,
  pool hash) and its `fingerprint`; written right after `masks.npy`, before any shadow is trained;
- `masks.npy`: (K, 2M) bool, `masks[k, j]` = pool example j is in shadow k's training set. Balanced
  (Carlini et al.): every example is IN for exactly K/2 shadows, so online LiRA always has IN and OUT data;
- `shadow_000/` ... : `model.safetensors` + `classifier.json` (`save_classifier`) + `scores.npy`, the
  shadow's LiRA scores on the pool, (A, 2M) float64. Each folder is written as `.shadow_000.tmp` and
  renamed when complete, so a present folder is a finished shadow.
A second `train_shadows` with the same setup trains nothing; an interrupted one resumes at the first
missing shadow; a different setup is refused unless `overwrite=True`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tckr_engine.errors import TckrError
from tckr_engine.fsutil import atomic_write, write_json
from tckr_engine.models.classifier import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    Classifier,
    load_classifier,
    save_classifier,
)
from tckr_engine.privacy.lira import (
    RUNTIME_FIELDS,
    Aug,
    ChallengeSet,
    LiraConfig,
    augmentations,
    build_challenge,
    lira_score,
    log_probs,
)
from tckr_engine.train.fit import auto_hflip, auto_shift, fit_classifier

log = logging.getLogger(__name__)

META_NAME = "shadows.json"
MASKS_NAME = "masks.npy"
SCORES_NAME = "scores.npy"
# (shadows finished, K) after every shadow, trained or reused.
ShadowProgress = Callable[[int, int], None]


@dataclass
class Shadows:
    """A complete shadow-model folder, loaded: what `lira.attack` needs."""

    path: Path
    config: LiraConfig
    challenge: ChallengeSet
    masks: np.ndarray  # (K, 2M) bool
    scores: np.ndarray  # (K, A, 2M) float64 LiRA scores of each shadow on the pool
    augmentations: list[Aug]
    model_config: dict[str, Any]  # classifier.json of the shadows (arch, width, classes, ...)
    fingerprint: str
    trained: int = 0  # shadows trained by the call that returned this (0: all were reused)

    def model_dir(self, k: int) -> Path:
        return self.path / _shadow_name(k)

    def load_model(self, k: int) -> Classifier:
        """Shadow model `k` (eval mode, on the CPU)."""
        return load_classifier(self.model_dir(k))


def _shadow_name(k: int) -> str:
    return f"shadow_{k:03d}"


def balanced_masks(num_shadows: int, n: int, seed: int) -> np.ndarray:
    """(K, n) bool: for every example an independent random half of the K shadows holds it (K even)."""
    rng = np.random.default_rng([seed, 0x5AD0])
    base = np.tile(np.arange(num_shadows) < num_shadows // 2, (n, 1))  # (n, K), K/2 True per row
    return rng.permuted(base, axis=1).T.copy()  # (K, n)


def _setup(cfg: LiraConfig, challenge: ChallengeSet) -> tuple[dict[str, Any], int, bool, list[Aug]]:
    """(identity, shift, hflip, views): what decides the shadows' content; its hash is the fingerprint."""
    _, h, w, _ = challenge.images.shape
    shift = auto_shift(min(h, w)) if cfg.shift is None else cfg.shift
    hflip = auto_hflip(challenge.dataset) if cfg.hflip is None else cfg.hflip
    views = augmentations(hflip, cfg.augment)
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}
    identity = {
        "config": config,
        "dataset": challenge.dataset,
        "resolved": {"shift": shift, "hflip": hflip},
        "augmentations": [list(a) for a in views],
        "pool_sha256": challenge.sha256(),
    }
    return identity, shift, hflip, views


def _fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _flat(identity: dict[str, Any]) -> dict[str, Any]:
    nested = ("config", "resolved")
    return {
        **identity.get("config", {}),
        **identity.get("resolved", {}),
        **{k: v for k, v in identity.items() if k not in nested},
    }


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'epochs 30 -> 10; ...': the setup fields that differ, for the refusal message."""
    a, b = _flat(old), _flat(new)
    diffs = [
        "pool images" if k == "pool_sha256" else f"{k} {a.get(k)!r} -> {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]
    return "; ".join(diffs) or "unknown"


def _clear(out: Path) -> None:
    """Remove a shadow folder's files, shadows.json first so a half-cleared folder is never reused."""
    for name in (META_NAME, MASKS_NAME):
        (out / name).unlink(missing_ok=True)
    for child in out.iterdir():
        if child.is_dir() and (child.name.startswith("shadow_") or child.name.startswith(".shadow_")):
            shutil.rmtree(child)


def _save_npy(path: Path, array: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue())


def _is_complete(d: Path) -> bool:
    return all((d / n).is_file() for n in (WEIGHTS_NAME, CONFIG_NAME, SCORES_NAME))


def train_shadows(
    cfg: LiraConfig,
    dataset: str,
    out_dir: str | Path,
    progress: ShadowProgress | None = None,
    *,
    overwrite: bool = False,
) -> Shadows:
    """Train (or reuse, or finish) the K shadow models of `cfg` on `dataset`'s pool in `out_dir`.

    Shadow k trains with `fit_classifier` on the pool examples where `masks[k]` is True, from a
    seeded initialisation; its pool scores are cached next to its weights. Returns the loaded `Shadows`
    with `trained` = the number of shadows this call trained.
    """
    cfg.validate()
    out = Path(out_dir).expanduser()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    challenge = build_challenge(dataset, cfg.members, cfg.val_fraction, cfg.split_seed, cfg.seed)
    identity, shift, hflip, views = _setup(cfg, challenge)
    fingerprint = _fingerprint(identity)
    meta_path = out / META_NAME
    if meta_path.is_file():
        try:
            old = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            old = None
        if old is None or old.get("fingerprint") != fingerprint:
            if not overwrite:
                what = "an unreadable setup" if old is None else "another setup"
                diff = "" if old is None else f" ({_differences(old.get('identity', {}), identity)})"
                raise TckrError(
                    f"{out} holds shadow models of {what}{diff}; choose another shadows folder, or delete "
                    "this one to train them again"
                )
            log.info("overwriting the shadow models in %s", out)
            _clear(out)
    n, k_total = len(challenge.labels), cfg.num_shadows
    if not meta_path.is_file():
        out.mkdir(parents=True, exist_ok=True)
        _save_npy(out / MASKS_NAME, balanced_masks(k_total, n, cfg.seed))
        write_json(meta_path, {"fingerprint": fingerprint, "identity": identity})  # after masks.npy
    masks = _load_masks(out, k_total, n)

    _, h, _, c = challenge.images.shape
    arch_kwargs: dict[str, Any] = {} if cfg.width is None else {"width": cfg.width}
    if cfg.init_weights is not None:
        arch_kwargs["init_weights"] = cfg.init_weights
    device = torch.device(cfg.device)
    trained, t0 = 0, time.perf_counter()
    for k in range(k_total):
        final = out / _shadow_name(k)
        if not _is_complete(final):
            seed = int(np.random.SeedSequence([cfg.seed, k]).generate_state(1)[0])
            with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
                torch.manual_seed(seed)
                model = Classifier(cfg.arch, len(challenge.classes), c, h, challenge.classes, **arch_kwargs)
            train_idx = np.flatnonzero(masks[k])  # (~M,)
            t_fit = time.perf_counter()
            history = fit_classifier(
                model,
                challenge.images[train_idx],
                challenge.labels[train_idx],
                epochs=cfg.epochs,
                batch_size=cfg.batch_size,
                lr=cfg.lr,
                weight_decay=cfg.weight_decay,
                label_smoothing=cfg.label_smoothing,
                shift=shift,
                hflip=hflip,
                seed=seed,
                device=device,
            )
            t_score = time.perf_counter()
            scores = lira_score(
                log_probs(model, challenge.images, views, cfg.eval_batch_size), challenge.labels
            )
            t_done = time.perf_counter()
            tmp = out / f".{final.name}.tmp"
            if tmp.exists():
                shutil.rmtree(tmp)
            save_classifier(model, tmp)
            _save_npy(tmp / SCORES_NAME, scores)  # (A, 2M)
            if final.exists():  # an incomplete folder left by hand or by an older version
                shutil.rmtree(final)
            os.replace(tmp, final)  # the folder appears complete or not at all
            trained += 1
            # training and scoring apart: scoring every pool image in all its views costs about as much
            # as a shadow's training on small pools (the demo's: 500 images, 10 epochs, 10 views of 1,000)
            log.info(
                "shadow %d/%d: %d images, train acc %.3f, %.1f s training + %.1f s scoring %d views of %d "
                "images (%.0f s so far)",
                k + 1, k_total, len(train_idx), history[-1]["train_accuracy"], t_score - t_fit,
                t_done - t_score, len(views), n, time.perf_counter() - t0,
            )  # fmt: skip
        if progress is not None:
            progress(k + 1, k_total)
    shadows = load_shadows(out, dataset, _challenge=challenge)
    shadows.config, shadows.trained = cfg, trained  # keep the caller's runtime fields (device, threads)
    if trained == 0:
        log.info("reused %d shadow models from %s (fingerprint %s)", k_total, out, fingerprint)
    return shadows


def _load_masks(out: Path, num_shadows: int, n: int) -> np.ndarray:
    try:
        masks = np.load(out / MASKS_NAME)
    except (OSError, ValueError) as e:
        raise TckrError(f"cannot read {out / MASKS_NAME} ({e}); remove the folder or --overwrite") from None
    if masks.shape != (num_shadows, n) or masks.dtype != bool:
        raise TckrError(
            f"{out / MASKS_NAME} is {masks.dtype} {masks.shape}, expected bool ({num_shadows}, {n})"
        )
    return masks


def load_shadows(
    path: str | Path, dataset: str | None = None, *, _challenge: ChallengeSet | None = None
) -> Shadows:
    """Load a complete shadow folder written by `train_shadows`; the pool is rebuilt from `dataset`.

    `dataset` defaults to the name recorded in `shadows.json` (pass the spec when it is a folder that
    moved). Refuses an incomplete folder or one whose pool no longer matches the data.
    """
    out = Path(path).expanduser()
    try:
        meta = json.loads((out / META_NAME).read_text())
        identity = meta["identity"]
        cfg = LiraConfig(**identity["config"])
    except FileNotFoundError:
        raise TckrError(f"no shadow models at {out}: {META_NAME} is missing (run train_shadows)") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise TckrError(f"cannot read {out / META_NAME}: {type(e).__name__} {e}") from None
    challenge = _challenge or build_challenge(
        dataset or identity["dataset"], cfg.members, cfg.val_fraction, cfg.split_seed, cfg.seed
    )
    if challenge.sha256() != identity["pool_sha256"]:
        raise TckrError(
            f"the pool drawn from {dataset or identity['dataset']} is not the one the shadows in {out} saw"
        )
    n = len(challenge.labels)
    masks = _load_masks(out, cfg.num_shadows, n)
    missing = [k for k in range(cfg.num_shadows) if not _is_complete(out / _shadow_name(k))]
    if missing:
        raise TckrError(
            f"{out} lacks {len(missing)} of {cfg.num_shadows} shadow models; rerun train_shadows to finish"
        )
    views = [(bool(a[0]), int(a[1]), int(a[2])) for a in identity["augmentations"]]
    scores = np.stack([np.load(out / _shadow_name(k) / SCORES_NAME) for k in range(cfg.num_shadows)])
    if scores.shape != (cfg.num_shadows, len(views), n):
        raise TckrError(
            f"shadow scores in {out} have shape {scores.shape}, expected {(cfg.num_shadows, len(views), n)}"
        )
    model_config = json.loads((out / _shadow_name(0) / CONFIG_NAME).read_text())
    return Shadows(out, cfg, challenge, masks, scores, views, model_config, meta["fingerprint"])
