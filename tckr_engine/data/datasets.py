"""Real labelled image datasets: Fashion-MNIST (IDX files), scikit-learn digits, IDX folders, image folders.

Every loader returns an `ImageDataset` of uint8 images `(N, H, W, C)` and int64 labels that index into the
dataset's own class list (never re-sorted). IDX arrays (Fashion-MNIST) are shared with an in-process cache
and read-only, so a caller cannot change what the next `load_dataset` returns; `subset` or `.copy()` gives
writable arrays. Bad input raises `TckrError` with one line: what is wrong, where we looked, how to fix it.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tckr_engine.errors import TckrError

logger = logging.getLogger(__name__)

FASHION_MNIST_ENV = "TCKR_FASHION_MNIST_DIR"
DEFAULT_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian `dataset-fashion-mnist`
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
DIGIT_CLASSES = tuple(str(i) for i in range(10))
DIGITS_TEST_FRACTION = 0.2  # digits has no official split: stratified 80/20 ...
DIGITS_SPLIT_SEED = 0  # ... drawn with `train_val_split(target, 0.2, seed=0)`, the test part is "test"
NAMED_DATASETS = ("fashion-mnist", "digits")
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
IDX_FILES = {  # split -> (images stem, labels stem); each may also end in .gz
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_HELP = "a folder of IDX files needs " + ", ".join(f"{s}[.gz]" for p in IDX_FILES.values() for s in p)


@dataclass(frozen=True, eq=False)  # eq=False: comparing arrays with == has no single truth value
class ImageDataset:
    """Labelled images: `images` uint8 (N, H, W, C), C in {1, 3}; `labels` int64 (N,) index `classes`."""

    name: str
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int64
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        im, lb = self.images, self.labels
        ok = im.dtype == np.uint8 and im.ndim == 4 and im.shape[3] in (1, 3) and lb.dtype == np.int64
        if not ok or lb.shape != (len(im),):
            raise ValueError(
                f"need uint8 (N, H, W, 1|3) images, int64 (N,) labels; got {im.shape} {lb.shape}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | list[int]) -> ImageDataset:
        """The samples at `indices` (integer indices or a boolean mask), same name and classes."""
        idx = np.asarray(indices)
        return ImageDataset(self.name, self.images[idx], self.labels[idx], self.classes)


def _idx_path(folder: Path, stem: str) -> Path | None:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    return None


def _is_idx_dir(folder: Path) -> bool:
    return any(_idx_path(folder, stem) for pair in IDX_FILES.values() for stem in pair)


def _find_fashion_dir() -> Path:
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        if _is_idx_dir(Path(env).expanduser()):
            return Path(env).expanduser().resolve()
        logger.warning(
            "$%s=%s has no IDX files; trying %s", FASHION_MNIST_ENV, env, DEFAULT_FASHION_MNIST_DIR
        )
    if _is_idx_dir(DEFAULT_FASHION_MNIST_DIR):
        return DEFAULT_FASHION_MNIST_DIR
    where = f"={env}, no IDX files there" if env else "unset"
    raise TckrError(
        f"Fashion-MNIST not found: looked in ${FASHION_MNIST_ENV} ({where}) and {DEFAULT_FASHION_MNIST_DIR}; "
        "install it with 'sudo apt-get install dataset-fashion-mnist' or pass a folder of IDX files"
    )


def _resolve(spec: str) -> tuple[str, Path | None]:
    """(kind, folder): kind is 'fashion-mnist', 'digits', 'idx' or 'folder'."""
    name = spec.strip().lower().replace("_", "-")
    if name == "fashion-mnist":
        return name, _find_fashion_dir()
    if name == "digits":
        return name, None
    path = Path(spec).expanduser().resolve()
    if not name or not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise TckrError(
            f"unknown dataset '{spec}': not one of {', '.join(NAMED_DATASETS)}, and {path} {what}; pass one "
            "of those names, a folder of IDX files, or a folder with one sub-folder of images per class"
        )
    if _is_idx_dir(path):
        return "idx", path
    if _class_dirs(path):
        return "folder", path
    raise TckrError(
        f"dataset folder {path} holds neither IDX files nor class sub-folders; {_IDX_HELP}, "
        "or put images in one sub-folder per class (optionally under train/ and test/)"
    )


def resolve_dataset(spec: str) -> str:
    """Normalise a dataset spec: 'fashion-mnist', 'digits', or the absolute path of a dataset folder.

    Raises `TckrError` when the dataset cannot be found (Fashion-MNIST not installed, no such folder, a folder
    with neither IDX files nor class sub-folders).
    """
    kind, path = _resolve(spec)
    return kind if kind in NAMED_DATASETS else str(path)


def _idx_classes(folder: Path, fashion: bool) -> tuple[str, ...]:
    txt = folder / "classes.txt"
    if fashion or not txt.is_file():
        return FASHION_MNIST_CLASSES if fashion or "fashion" in folder.name.lower() else DIGIT_CLASSES
    names = [line.strip() for line in txt.read_text(encoding="utf-8").splitlines()]
    while names and not names[-1]:
        names.pop()
    if not names or "" in names or len(set(names)) != len(names):
        raise TckrError(f"{txt} must list one non-empty, unique class name per line (line i = class i)")
    return tuple(names)


def _image_root(path: Path, split: str) -> Path:
    """The folder holding the class sub-folders for `split`."""
    if not (path / "train").is_dir():
        if split == "test":
            raise TckrError(
                f"image folder {path} has no test/ split; use split 'train', or lay it out as "
                f"{path}/train/<class>/ and {path}/test/<class>/"
            )
        return path
    root = path / split
    if not root.is_dir():
        raise TckrError(f"image folder {path} has train/ but no {split}/; add {root}/<class>/ image folders")
    return root


def _class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def class_names(spec: str) -> tuple[str, ...]:
    """Class names (index -> name) of a dataset, without decoding any pixels."""
    kind, path = _resolve(spec)
    if kind == "digits":
        return DIGIT_CLASSES
    if kind in ("fashion-mnist", "idx"):
        assert path is not None
        return _idx_classes(path, fashion=kind == "fashion-mnist")
    assert path is not None
    return tuple(p.name for p in _class_dirs(_image_root(path, "train")))


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes with `ndim` dimensions (gzipped when it ends in .gz)."""
    fix = "re-download it or reinstall dataset-fashion-mnist"
    try:
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise TckrError(f"cannot read IDX file {path}: {e}; the file is corrupt or truncated, {fix}") from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[3] != ndim:
        raise TckrError(f"{path} is not an IDX file with {ndim} dimension(s) (bad magic number); {fix}")
    if data[2] != 0x08:
        raise TckrError(f"{path} holds IDX type 0x{data[2]:02x}; only unsigned bytes (0x08) are supported")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise TckrError(f"{path} is truncated inside its header; {fix}")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = int(np.prod(dims))
    if len(data) - header != expected:
        raise TckrError(
            f"{path} is truncated or corrupt: header {dims} needs {expected} data bytes, "
            f"found {len(data) - header}; {fix}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


@functools.lru_cache(maxsize=8)
def _load_idx_cached(
    images_path: Path, labels_path: Path, stamp: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    # `stamp` (sizes and mtimes) is part of the key so a rewritten file is not served stale from the cache.
    del stamp
    logger.info("loading IDX files %s, %s", images_path, labels_path)
    images = _read_idx(images_path, ndim=3)[..., None]  # (N, H, W, 1), read-only view of the file bytes
    labels = _read_idx(labels_path, ndim=1).astype(np.int64)  # (N,)
    if len(images) != len(labels):
        raise TckrError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    labels.setflags(write=False)
    return images, labels


def _load_idx(folder: Path, split: str, name: str, fashion: bool) -> ImageDataset:
    paths = []
    for stem in IDX_FILES[split]:
        path = _idx_path(folder, stem)
        if path is None:
            raise TckrError(f"missing {stem}[.gz] in {folder} for split '{split}'; {_IDX_HELP}")
        paths.append(path)
    stamp = tuple(v for p in paths for v in (p.stat().st_size, p.stat().st_mtime_ns))
    images, labels = _load_idx_cached(paths[0], paths[1], stamp)
    classes = _idx_classes(folder, fashion)
    if len(labels) and int(labels.max()) >= len(classes):
        bad = int(np.argmax(labels >= len(classes)))
        raise TckrError(
            f"label {int(labels[bad])} at index {bad} of {paths[1]} is out of range for {len(classes)} "
            f"classes; list every class name in {folder / 'classes.txt'}, one per line"
        )
    return ImageDataset(name, images, labels, classes)


@functools.lru_cache(maxsize=1)
def _digits_splits() -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits  # local import: slow to import, only digits needs it

    bunch = load_digits()
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]  # (1797, 8, 8, 1), 0..255
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_val_split(labels, DIGITS_TEST_FRACTION, seed=DIGITS_SPLIT_SEED)
    return {"train": (images, labels, train_idx), "test": (images, labels, test_idx)}


def _image_files(root: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(file, label) for every image in the class sub-folders of `root`, in sorted order."""
    files = []
    for class_dir in _class_dirs(root):
        if class_dir.name not in classes:
            raise TckrError(f"class folder {class_dir} is not among the train classes {list(classes)}")
        names = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        files += [(p, classes.index(class_dir.name)) for p in names if not p.name.startswith(".")]
    return files


def _load_image_folder(path: Path, split: str) -> ImageDataset:
    from PIL import Image

    classes = class_names(str(path))
    root = _image_root(path, split)
    files = _image_files(root, classes)
    if not files:
        raise TckrError(
            f"no images ({'/'.join(s[1:] for s in IMAGE_SUFFIXES)}) in the class sub-folders of {root}; "
            "put each class's images in its own sub-folder"
        )
    # Size and mode are decided over every split (headers only: PIL decodes lazily), so train and test
    # always share one (H, W, C) and a classifier trained on one can be evaluated on the other.
    roots = [path / s for s in SPLITS if (path / s).is_dir()] if (path / "train").is_dir() else [path]
    size, first, gray = None, None, True
    for file, _ in (f for r in roots for f in (files if r == root else _image_files(r, classes))):
        try:
            with Image.open(file) as im:
                size, first = (size, first) if size else (im.size, file)  # first file sets the size
                gray = gray and im.mode == "L"
        except OSError as e:  # PIL's UnidentifiedImageError is an OSError
            raise TckrError(f"cannot read image {file}: {e}; fix or remove the file") from e
        if im.size != size:
            raise TckrError(
                f"image {file} is {im.size[0]}x{im.size[1]} but {first} is {size[0]}x{size[1]}; all images "
                f"must be {size[0]}x{size[1]} (width x height): resize them"
            )
    pixels = []
    for file, _ in files:
        try:
            with Image.open(file) as im:
                pixels.append(np.asarray(im.convert("L" if gray else "RGB")))  # (H, W) or (H, W, 3)
        except OSError as e:
            raise TckrError(f"cannot decode image {file}: {e}; fix or remove the file") from e
    images = np.stack(pixels).reshape(len(files), size[1], size[0], 1 if gray else 3)  # (N, H, W, C)
    labels = np.array([label for _, label in files], dtype=np.int64)  # (N,)
    logger.info("loaded %d images %s from %s", len(files), images.shape, root)
    return ImageDataset(str(path), images, labels, classes)


def load_dataset(spec: str, split: str = "train") -> ImageDataset:
    """Load the `split` ('train' or 'test') of a dataset spec (see `resolve_dataset`).

    'digits' is scikit-learn's bundled 8x8 digits scaled to 0..255, split 80/20 stratified with seed 0.
    """
    if split not in SPLITS:
        raise TckrError(f"unknown split '{split}' for dataset '{spec}': expected one of {', '.join(SPLITS)}")
    kind, path = _resolve(spec)
    if kind == "digits":
        images, labels, idx = _digits_splits()[split]
        return ImageDataset("digits", images[idx], labels[idx], DIGIT_CLASSES)
    assert path is not None
    if kind == "folder":
        return _load_image_folder(path, split)
    return _load_idx(path, split, kind if kind == "fashion-mnist" else str(path), kind == "fashion-mnist")


def train_val_split(
    labels: np.ndarray, val_fraction: float = 0.1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split into sorted, disjoint index arrays `(train_idx, val_idx)` covering all.

    Each class `c` puts `round(val_fraction * n_c)` samples in validation (at least 1 and at most `n_c - 1`
    when it has two or more samples and `val_fraction > 0`), chosen by a generator seeded with `(seed, c)`,
    so one class's split does not depend on the other classes.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise TckrError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if len(labels) and labels.min() < 0:
        raise TckrError(f"labels must be non-negative class indices, found {int(labels.min())}")
    if not 0.0 <= val_fraction < 1.0 or seed < 0:
        raise TckrError(
            f"need 0 <= val_fraction < 1 and seed >= 0, got val_fraction={val_fraction}, seed={seed}"
        )
    val = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n_val = int(np.floor(val_fraction * len(members) + 0.5))
        if val_fraction > 0 and len(members) >= 2:
            n_val = min(max(n_val, 1), len(members) - 1)
        rng = np.random.default_rng([seed, int(c)])
        val.append(rng.permutation(members)[:n_val])
    val_idx = np.sort(np.concatenate(val)) if val else np.zeros(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return train_idx.astype(np.int64), val_idx.astype(np.int64)
