"""Teacher-driven generation sources written as shard folders (DESIGN.md data contract).

`generate_synthetic(cfg, out)` writes (or resumes) a shard folder for `cfg.source`:
- `activation-max`: images optimised from seeded noise to maximise a class logit of the teacher alone
  (`synth.activation_max`). Sample i gets class i % C (class-balanced, as the diffusion engine) and noise
  seed `sample_seed(seed, i)`; images are optimised in batches of `batch_size` inside a shard.
- `bss`: boundary-supporting samples (`synth.bss`) walked from real base images of `dataset`'s `split`
  towards teacher-sampled target classes; needs the teacher and a student (reference) classifier.

Both write what `tckr-engine generate` writes: run.json, shards/NNNNNN.tar (+ `_stats.json`, last, by the
same commit protocol), index.json; per sample `png` (or jpg/webp), `cls`, `txt`, `json`, `logits.npy` (the
teacher's logits of the stored uint8 image, float16). `verify`, `open_shard_folder` and the trainer read them
like diffusion shards. run.json records the source, its settings, the teacher (and student, base images)
with content digests, and the whole `SynthConfig` under `synth_config` (not `config`: that key holds a
diffusion `GenerateConfig`, which the trainer's engine regeneration would rebuild).

A shard's bytes are a pure function of (run spec, shard id) on one device and thread count, so runs are
deterministic per seed and resume at shard granularity (shards with a valid stats file are kept).

BSS base stream: positions p = 0, 1, 2, ... map to base images through a fresh seeded permutation of the
split for every pass (`p // N`). Shard s reads candidate batches of `bss.candidates` from position
s · ceil(shard_size / attack_size) · candidates on, keeping up to `attack_size` base samples per batch
(largest teacher–student gap first) until the shard is full; each batch's target classes come from
`sample_seed(seed, p) ^ BSS_SALT`. `cls` of a BSS sample is its base image's label y (the teacher's class
before the walk; the target class k is in `json` and `txt`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tckr_engine import __version__
from tckr_engine.config import IMAGE_FORMATS, MAX_SHARD_SIZE, MAX_SHARDS, check_positive
from tckr_engine.data import ImageDataset, class_names, load_dataset, resolve_dataset
from tckr_engine.engine.scheduler import sample_seed
from tckr_engine.engine.shards import ShardStats, commit_shard, encode_sample, file_sha256, tar_bytes
from tckr_engine.errors import TckrError
from tckr_engine.models.classifier import WEIGHTS_NAME, Classifier, load_classifier
from tckr_engine.synth.activation_max import ActivationMaxConfig, activation_maximise, to_uint8
from tckr_engine.synth.bss import BSSConfig, boundary_samples

if TYPE_CHECKING:
    from tckr_engine.engine.generate import Progress, Summary

log = logging.getLogger(__name__)

SOURCES = ("activation-max", "bss")
RUN_FORMAT = 1
PERM_SALT = 0x9E4D  # base-image permutations and target sampling use seeds distinct from noise seeds
BSS_SALT = 0xB55


@dataclass
class SynthConfig:
    """Everything that decides a teacher-driven shard folder; `validate()` raises one-line `TckrError`s.

    Field names shared with `GenerateConfig` mean the same thing there.
    """

    source: str = "activation-max"  # activation-max | bss
    teacher: str | None = None  # classifier folder (required); its logits go into every sample
    student: str | None = None  # bss only (required there): the reference student classifier folder
    dataset: str = "fashion-mnist"  # class names and indices (asserted against the teacher); bss base images
    split: str = "train"  # bss only: the split base images come from
    num_images: int = 1000
    shard_size: int = 1024
    batch_size: int = 64  # activation-max: images optimised together (BN statistics are per batch)
    seed: int = 0
    image_format: str = "png"
    quality: int = 95  # jpg / webp quality; png is lossless
    device: str = "auto"  # cuda when available, else cpu
    threads: int | None = None  # CPU threads; None = this machine's default (recorded in run.json)
    activation_max: ActivationMaxConfig = field(default_factory=ActivationMaxConfig)
    bss: BSSConfig = field(default_factory=BSSConfig)

    def validate(self) -> SynthConfig:
        """Check every field; raise a one-line TckrError naming the first bad one. Returns self."""
        if self.source not in SOURCES:
            raise TckrError(f"source must be one of {', '.join(SOURCES)}; got {self.source!r}")
        if not self.teacher:
            raise TckrError(f"source {self.source} needs a teacher classifier folder (--teacher)")
        if self.source == "bss" and not self.student:
            raise TckrError("source bss needs a student classifier folder (--student) to pick base samples")
        if self.split not in ("train", "test"):
            raise TckrError(f"split must be train or test, got {self.split!r}")
        check_positive("num_images", self.num_images)
        check_positive("shard_size", self.shard_size, hi=MAX_SHARD_SIZE)
        check_positive("batch_size", self.batch_size, hi=65_536)
        if -(-self.num_images // self.shard_size) > MAX_SHARDS:
            raise TckrError(
                f"num_images={self.num_images} needs more than {MAX_SHARDS} shards; raise shard_size"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise TckrError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise TckrError(
                f"image_format must be one of {', '.join(IMAGE_FORMATS)}; got {self.image_format!r}"
            )
        check_positive("quality", self.quality, hi=100)
        if self.device not in ("auto", "cpu", "cuda"):
            raise TckrError(f"device must be one of auto, cpu, cuda; got {self.device!r}")
        if self.threads is not None:
            check_positive("threads", self.threads, hi=1024)
        if not isinstance(self.activation_max, ActivationMaxConfig) or not isinstance(self.bss, BSSConfig):
            raise TckrError(
                "activation_max and bss must be ActivationMaxConfig / BSSConfig (use synth_config())"
            )
        self.activation_max.validate()
        self.bss.validate()
        return self


def synth_config(table: Mapping[str, Any]) -> SynthConfig:
    """A SynthConfig from a plain mapping (a TOML table): keys may use - or _; `activation_max` / `bss` are
    nested tables of their own fields. Unknown keys are one TckrError. Values are checked later, by
    `validate()` (which `generate_synthetic` calls), so CLI flags can still be applied with
    `dataclasses.replace`."""

    def build(cls: type, values: Mapping[str, Any], where: str) -> Any:
        if not isinstance(values, Mapping):
            raise TckrError(f"{where} must be a table of settings, got {values!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        norm = {str(k).replace("-", "_"): v for k, v in values.items()}
        unknown = sorted(set(norm) - known)
        if unknown:
            raise TckrError(
                f"unknown {where} option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return norm

    values = build(SynthConfig, table, "synth")
    if "activation_max" in values:
        values["activation_max"] = ActivationMaxConfig(
            **build(ActivationMaxConfig, values["activation_max"], "activation_max")
        )
    if "bss" in values:
        values["bss"] = BSSConfig(**build(BSSConfig, values["bss"], "bss"))
    return SynthConfig(**values)


@dataclass
class SynthResources:
    """The loaded objects a synth spec names."""

    teacher: Classifier
    student: Classifier | None = None
    base: ImageDataset | None = None  # bss base images
    _perms: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def base_index(self, positions: np.ndarray, seed: int) -> np.ndarray:
        """Dataset indices of base-stream positions: pass e = p // N uses its own seeded permutation."""
        assert self.base is not None
        n = len(self.base)
        out = np.empty(len(positions), np.int64)
        for e in np.unique(positions // n):
            if int(e) not in self._perms:
                if len(self._perms) > 4:  # a shard spans at most a couple of passes
                    self._perms.clear()
                rng = np.random.default_rng(sample_seed(seed, int(e)) ^ PERM_SALT)
                self._perms[int(e)] = rng.permutation(n)
            mask = positions // n == e
            out[mask] = self._perms[int(e)][positions[mask] % n]
        return out


def _digest(path: Path) -> str:
    return file_sha256(path / WEIGHTS_NAME)[:16]


def _dataset_digest(ds: ImageDataset) -> str:
    h = hashlib.sha256(np.ascontiguousarray(ds.images).tobytes())
    h.update(np.ascontiguousarray(ds.labels).tobytes())
    return h.hexdigest()[:16]


def _load_checked(path: str, what: str, classes: list[str]) -> Classifier:
    model = load_classifier(path)
    if list(model.classes) != classes:
        raise TckrError(
            f"{what} {path} classes {list(model.classes)} differ from the dataset's {classes} "
            "(names and order must match); pass the dataset it was trained on"
        )
    return model


def _versions() -> dict[str, str]:
    import PIL

    return {
        "tckr_engine": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pillow": PIL.__version__,
    }


def resolve_synth(
    cfg: SynthConfig, previous: dict[str, Any] | None = None
) -> tuple[dict[str, Any], SynthResources]:
    """Validate `cfg`, load what it names, and return (run.json content, resources).

    `previous` is an existing run.json: when `cfg.threads` is unset its thread count is kept, so a resume
    reproduces the same bytes.
    """
    cfg.validate()
    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise TckrError("device 'cuda' requested but no CUDA GPU is visible; use --device cpu")
    threads = cfg.threads
    if threads is None and previous is not None:
        threads = previous.get("spec", {}).get("threads")
    threads = int(threads or torch.get_num_threads())
    dataset = resolve_dataset(cfg.dataset)
    classes = list(class_names(dataset))

    teacher = _load_checked(cfg.teacher, "teacher", classes)  # type: ignore[arg-type]
    size, channels = int(teacher.config["image_size"]), int(teacher.config["in_channels"])
    tpath = Path(cfg.teacher).expanduser().resolve()  # type: ignore[arg-type]
    spec: dict[str, Any] = {
        "source": cfg.source,
        "dataset": dataset,
        "classes": classes,
        "num_images": cfg.num_images,
        "shard_size": cfg.shard_size,
        "seed": cfg.seed,
        "image_format": cfg.image_format,
        "quality": cfg.quality,
        "device": device,
        "dtype": "fp32",
        "threads": threads,
        "image_size": size,
        "teacher": {"path": str(tpath), "id": _digest(tpath)},
        "sampler": cfg.source,  # readers of diffusion specs (quality reports) find these keys
        "guidance": None,
    }
    student, base = None, None
    if cfg.source == "activation-max":
        settings = cfg.activation_max.resolved(size)
        spec.update(batch_size=cfg.batch_size, steps=cfg.activation_max.steps, activation_max=settings)
    else:
        student = _load_checked(cfg.student, "student", classes)  # type: ignore[arg-type]
        sc = student.config
        if (sc["image_size"], sc["in_channels"]) != (size, channels):
            raise TckrError(
                f"student {cfg.student} expects {sc['image_size']}px x {sc['in_channels']} channels, the "
                f"teacher {size}px x {channels}; BSS needs both on the same images"
            )
        if (student.mean, student.std) != (teacher.mean, teacher.std):
            raise TckrError(
                f"student {cfg.student} and the teacher normalise inputs differently; BSS needs the same"
            )
        base = load_dataset(dataset, cfg.split)
        if base.images.shape[1:] != (size, size, channels):
            raise TckrError(
                f"{cfg.dataset} {cfg.split} images are {base.images.shape[1:]}, the teacher expects "
                f"({size}, {size}, {channels}); pass the dataset the teacher was trained on"
            )
        if base.classes != tuple(classes):
            raise TckrError(f"{cfg.dataset} {cfg.split} classes differ from its train classes")
        spath = Path(cfg.student).expanduser().resolve()  # type: ignore[arg-type]
        spec.update(
            steps=cfg.bss.steps,
            student={"path": str(spath), "id": _digest(spath)},
            base={"dataset": dataset, "split": cfg.split, "count": len(base), "id": _dataset_digest(base)},
            bss=cfg.bss.attack_settings(),
        )
    spec["generator"] = {  # what made the images; image_size / channels are what the trainer checks
        "id": f"{cfg.source}:{spec['teacher']['id']}",
        "kind": cfg.source,
        "image_size": size,
        "channels": channels,
    }
    run = {
        "format": RUN_FORMAT,
        "tckr_engine_version": __version__,
        "num_shards": -(-cfg.num_images // cfg.shard_size),
        "spec": spec,
        "versions": _versions(),
        "synth_config": dataclasses.asdict(cfg),
    }
    return run, _place(SynthResources(teacher, student, base), device)


def _place(res: SynthResources, device: str) -> SynthResources:
    res.teacher.to(device).eval()
    if res.student is not None:
        res.student.to(device).eval()
    return res


def load_synth_resources(run: dict[str, Any]) -> SynthResources:
    """Rebuild the resources from a run.json alone (what a remote worker does); changed inputs are refused."""
    spec = run["spec"]
    tpath = Path(spec["teacher"]["path"])
    teacher = load_classifier(tpath)
    if _digest(tpath) != spec["teacher"]["id"]:
        raise TckrError(f"teacher {tpath} changed since the run started (weights differ)")
    student, base = None, None
    if spec["source"] == "bss":
        spath = Path(spec["student"]["path"])
        student = load_classifier(spath)
        if _digest(spath) != spec["student"]["id"]:
            raise TckrError(f"student {spath} changed since the run started (weights differ)")
        base = load_dataset(spec["base"]["dataset"], spec["base"]["split"])
        if _dataset_digest(base) != spec["base"]["id"]:
            raise TckrError(
                f"base images {spec['base']['dataset']} ({spec['base']['split']}) changed since the run "
                "started"
            )
    return _place(SynthResources(teacher, student, base), spec["device"])


Sample = tuple[np.ndarray, int, str, dict[str, Any], np.ndarray]  # image (H, W, C), cls, txt, json, logits


def _count(spec: dict[str, Any], shard: int) -> int:
    return min(spec["shard_size"], spec["num_images"] - shard * spec["shard_size"])


def _activation_max_shard(
    spec: dict[str, Any], res: SynthResources, shard: int, on_batch: Callable[[int], None] | None
) -> list[Sample]:
    settings = spec["activation_max"]
    cfg = ActivationMaxConfig(**settings)
    classes = spec["classes"]
    start = shard * spec["shard_size"]
    samples: list[Sample] = []
    for lo in range(start, start + _count(spec, shard), spec["batch_size"]):
        idx = range(lo, min(lo + spec["batch_size"], start + _count(spec, shard)))
        targets = [i % len(classes) for i in idx]  # class-balanced, as the engine's BatchScheduler
        seeds = [sample_seed(spec["seed"], i) for i in idx]
        r = activation_maximise(res.teacher, targets, seeds, cfg)
        images, logits, probs = r.images.cpu().numpy(), r.logits.cpu().numpy(), r.target_prob.cpu().tolist()
        for j, i in enumerate(idx):
            name = classes[targets[j]]
            meta = {
                "index": i,
                "seed": seeds[j],
                "class_name": name,
                "source": "activation-max",
                "teacher": spec["teacher"]["id"],
                "target_prob": round(probs[j], 6),
                "settings": settings,
            }
            samples.append((images[j], targets[j], f"activation-max: {name}", meta, logits[j]))
        if on_batch is not None:
            on_batch(len(idx))
    return samples


def _bss_shard(
    spec: dict[str, Any], res: SynthResources, shard: int, on_batch: Callable[[int], None] | None
) -> list[Sample]:
    assert res.base is not None and res.student is not None
    settings = spec["bss"]
    cfg = BSSConfig(**{k: v for k, v in settings.items() if k != "gap_eps"})
    classes, seed, n = spec["classes"], spec["seed"], len(res.base)
    device = next(res.teacher.parameters()).device
    want = _count(spec, shard)
    # This shard's window: room for ceil(shard_size / attack_size) full candidate batches, so shards do not
    # overlap unless a batch yields fewer than attack_size base samples.
    pos = shard * -(-spec["shard_size"] // cfg.attack_size) * cfg.candidates
    samples: list[Sample] = []
    scanned_without_any = 0
    while len(samples) < want:
        positions = np.arange(pos, pos + cfg.candidates, dtype=np.int64)
        idx = res.base_index(positions, seed)  # (candidates,)
        x = torch.from_numpy(res.base.images[idx]).to(device)  # (B, H, W, C) uint8
        y = torch.from_numpy(res.base.labels[idx]).to(device)  # (B,)
        gen = torch.Generator().manual_seed(sample_seed(seed, pos) ^ BSS_SALT)
        x_adv, info = boundary_samples(res.teacher, res.student, x, y, cfg=cfg, generator=gen)
        if len(info.index) == 0:
            scanned_without_any += cfg.candidates
            if scanned_without_any >= n:
                raise TckrError(
                    f"no base samples in {spec['dataset']} {spec['base']['split']}: no image is classified "
                    "correctly by both teacher and student; check that both were trained on this dataset"
                )
        else:
            scanned_without_any = 0
        images = to_uint8(x_adv, res.teacher)  # (N, H, W, C): what is stored ...
        with torch.no_grad():
            logits = res.teacher(images).float()  # (N, K) ... and the teacher's logits of it
        probs = logits.softmax(1)
        take = min(len(images), want - len(samples))
        host = images[:take].cpu().numpy()
        host_logits = logits[:take].cpu().numpy()
        moved = info.active.sum(0).tolist() if info.steps else [0] * len(info.index)
        rows = zip(
            info.index[:take].tolist(),
            info.y[:take].tolist(),
            info.target[:take].tolist(),
            info.score[:take].tolist(),
            probs[:take].gather(1, info.target[:take, None]).squeeze(1).tolist(),
            logits[:take].argmax(1).tolist(),
            moved[:take],
            strict=True,
        )
        for j, (b, yc, k, score, p_k, t_cls, steps) in enumerate(rows):
            meta = {
                "source": "bss",
                "position": int(positions[b]),
                "base_index": int(idx[b]),
                "class_name": classes[yc],
                "target_class": k,
                "target_name": classes[k],
                "target_prob": round(p_k, 6),
                "teacher_class": t_cls,
                "score": round(score, 6),
                "steps_moved": int(steps),
                "teacher": spec["teacher"]["id"],
                "student": spec["student"]["id"],
                "settings": settings,
            }
            samples.append((host[j], yc, f"bss: {classes[yc]} -> {classes[k]}", meta, host_logits[j]))
        if on_batch is not None and take:
            on_batch(take)
        pos += cfg.candidates
    return samples


def generate_synthetic_shards(
    run: dict[str, Any],
    out: Path,
    shard_ids: Sequence[int],
    *,
    resources: SynthResources | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[ShardStats]:
    """Generate and commit `shard_ids` of a synth run into the prepared folder `out` (the unit of work)."""
    spec = run["spec"]
    if spec["device"] == "cpu":
        torch.set_num_threads(spec["threads"])  # CPU results depend on the thread count
    res = resources if resources is not None else load_synth_resources(run)
    make = _activation_max_shard if spec["source"] == "activation-max" else _bss_shard
    stats = []
    for shard in shard_ids:
        t0 = time.perf_counter()
        samples = make(spec, res, shard, on_batch)
        members: list[tuple[str, bytes]] = []
        for slot, (image, cls, txt, meta, logits) in enumerate(samples):
            key = f"{shard:06d}{slot:05d}"
            members += encode_sample(
                key, image, spec["image_format"], spec["quality"], cls, txt, meta, logits
            )
        stats.append(commit_shard(out, shard, tar_bytes(members), len(samples), time.perf_counter() - t0))
        log.debug("committed shard %06d: %d samples", shard, len(samples))
    return stats


def generate_synthetic(
    cfg: SynthConfig, out: str | Path, progress: Progress | None = None, *, overwrite: bool = False
) -> Summary:
    """Generate (or resume) the shard folder `out` for a teacher-driven source; returns the engine's Summary.

    A folder holding a different run is refused unless `overwrite` (as `generate`); committed shards of
    the same run are kept.
    """
    from tckr_engine.engine.generate import Summary, pending_shards, prepare_folder, read_run
    from tckr_engine.engine.shards import INDEX_FILE, read_stats, write_index

    out = Path(out).expanduser()
    previous = read_run(out) if out.is_dir() else None
    run, res = resolve_synth(cfg, previous)
    prepare_folder(out, run, overwrite)
    pending = pending_shards(out, run)
    spec = run["spec"]
    todo = sum(_count(spec, s) for s in pending)
    if progress is not None:
        progress.start(spec["num_images"], spec["num_images"] - todo)
    log.info(
        "%s: %d of %d shards to generate (%d images) into %s",
        cfg.source,
        len(pending),
        run["num_shards"],
        todo,
        out,
    )
    t0 = time.perf_counter()
    if pending:
        (out / INDEX_FILE).unlink(missing_ok=True)  # rewritten once every shard is committed
        generate_synthetic_shards(
            run, out, pending, resources=res, on_batch=progress.advance if progress is not None else None
        )
    write_index(out, run["num_shards"])
    images = sum(read_stats(out, s)["count"] for s in range(run["num_shards"]))
    return Summary(out, images, todo, run["num_shards"], len(pending), time.perf_counter() - t0)
