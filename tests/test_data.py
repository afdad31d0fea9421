"""Tests for tckr_engine.data.datasets: real files written into tmp_path, plus the Debian Fashion-MNIST."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tckr_engine.data import ImageDataset, class_names, load_dataset, resolve_dataset, train_val_split
from tckr_engine.data import datasets as ds_mod
from tckr_engine.errors import TckrError

FASHION = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x00 0x00 0x08 ndim, big-endian uint32 dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, np.uint8).tobytes()


def write_idx_dir(folder: Path, n_train=6, n_test=4, size=(3, 2), gz=True, n_classes=10) -> dict:
    """Write the four standard IDX files; returns the arrays written, keyed by split."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    out = {}
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images = rng.integers(0, 256, (n, *size), dtype=np.uint8)  # (N, H, W)
        labels = (np.arange(n) % n_classes).astype(np.uint8)  # (N,)
        for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
            path = folder / f"{prefix}-{kind}{'.gz' if gz else ''}"
            path.write_bytes(gzip.compress(idx_bytes(arr)) if gz else idx_bytes(arr))
        out[split] = (images, labels)
    return out


def one_line_error(exc: pytest.ExceptionInfo, *fragments: str) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    return msg


def save(path: Path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


# ---------------------------------------------------------------- digits


def test_digits_shapes_split_and_scaling():
    from sklearn.datasets import load_digits

    train, test = load_dataset("digits"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1438, 359)
    assert train.images.shape == (1438, 8, 8, 1) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.classes == tuple("0123456789")
    assert train.name == test.name == "digits"
    assert np.bincount(test.labels).tolist() == [36, 36, 35, 37, 36, 36, 36, 36, 35, 36]
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    # Pixel values are exactly round(v * 255 / 16); e.g. 8 -> 127.5 -> 128.
    assert set(np.unique(train.images).tolist()) <= {round(v * 255 / 16) for v in range(17)}
    # The split is the documented one and the two parts together are the whole set, in order.
    digits = load_digits()
    train_idx, test_idx = train_val_split(digits.target, 0.2, seed=0)
    expected = np.rint(digits.images[test_idx] * 255 / 16).astype(np.uint8)
    np.testing.assert_array_equal(test.images[..., 0], expected)
    np.testing.assert_array_equal(train.labels, digits.target[train_idx])
    np.testing.assert_array_equal(load_dataset("digits").labels, train.labels)  # deterministic
    assert class_names("digits") == tuple("0123456789") and resolve_dataset(" Digits ") == "digits"


# ---------------------------------------------------------------- IDX folders


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_roundtrip(tmp_path, gz):
    folder = tmp_path / "mnistlike"
    written = write_idx_dir(folder, gz=gz)
    assert resolve_dataset(str(folder)) == str(folder.resolve())
    for split in ("train", "test"):
        data = load_dataset(str(folder), split)
        images, labels = written[split]
        assert data.images.shape == (len(images), 3, 2, 1) and data.images.dtype == np.uint8
        np.testing.assert_array_equal(data.images[..., 0], images)
        np.testing.assert_array_equal(data.labels, labels.astype(np.int64))
        assert data.labels.dtype == np.int64
        assert data.classes == tuple("0123456789") and data.name == str(folder.resolve())
    assert class_names(str(folder)) == tuple("0123456789")


def test_idx_folder_class_names_fashion_and_classes_txt(tmp_path):
    fashion = tmp_path / "my-Fashion-copy"
    write_idx_dir(fashion)
    assert class_names(str(fashion))[:5] == FASHION and len(class_names(str(fashion))) == 10
    custom = tmp_path / "three"
    write_idx_dir(custom, n_classes=3)
    (custom / "classes.txt").write_text("cat\ndog\nbird\n\n")
    assert class_names(str(custom)) == ("cat", "dog", "bird")
    assert load_dataset(str(custom)).labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_idx_cache_is_shared_read_only_and_sees_rewrites(tmp_path):
    folder = tmp_path / "cached"
    write_idx_dir(folder)
    a, b = load_dataset(str(folder)), load_dataset(str(folder))
    assert a.images is b.images  # served from the lru_cache
    assert not a.images.flags.writeable and not a.labels.flags.writeable
    sub = a.subset([1, 0])
    assert sub.images.flags.writeable and sub.labels.tolist() == [1, 0]
    new = np.full((2, 3, 2), 7, np.uint8)
    (folder / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(new)))
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.array([4, 5], np.uint8))))
    assert load_dataset(str(folder)).labels.tolist() == [4, 5]  # size/mtime changed -> not stale


def test_fashion_env_override(tmp_path, monkeypatch):
    folder = tmp_path / "elsewhere"
    written = write_idx_dir(folder, gz=False)
    monkeypatch.setenv("TCKR_FASHION_MNIST_DIR", str(folder))
    data = load_dataset("fashion-mnist", "test")
    assert data.name == "fashion-mnist" and data.classes[:5] == FASHION
    np.testing.assert_array_equal(data.images[..., 0], written["test"][0])
    assert resolve_dataset("Fashion_MNIST") == "fashion-mnist"
    assert class_names("fashion-mnist")[-1] == "Ankle boot"


def test_fashion_missing(tmp_path, monkeypatch):
    missing = tmp_path / "no-such-dir"
    monkeypatch.setattr(ds_mod, "DEFAULT_FASHION_MNIST_DIR", missing)
    monkeypatch.delenv("TCKR_FASHION_MNIST_DIR", raising=False)
    with pytest.raises(TckrError) as exc:
        load_dataset("fashion-mnist")
    one_line_error(exc, "Fashion-MNIST not found", "$TCKR_FASHION_MNIST_DIR (unset)", str(missing), "apt-get")
    monkeypatch.setenv("TCKR_FASHION_MNIST_DIR", str(tmp_path))  # set, but holds no IDX files
    with pytest.raises(TckrError) as exc:
        resolve_dataset("fashion-mnist")
    one_line_error(exc, f"={tmp_path}, no IDX files there", str(missing))


def test_idx_errors(tmp_path):
    folder = tmp_path / "broken"
    write_idx_dir(folder, gz=False)
    images_file = folder / "train-images-idx3-ubyte"
    images_file.write_bytes(images_file.read_bytes()[:-5])  # truncated data
    with pytest.raises(TckrError) as exc:
        load_dataset(str(folder))
    one_line_error(exc, str(images_file), "truncated", "needs 36 data bytes, found 31")
    images_file.write_bytes(b"\x08\x03\x00\x00" + bytes(40))  # bad magic
    with pytest.raises(TckrError) as exc:
        load_dataset(str(folder))
    one_line_error(exc, str(images_file), "bad magic number")
    # Train labels out of range for 10 classes.
    write_idx_dir(folder, gz=False)
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1, 2, 3, 12, 5], np.uint8)))
    with pytest.raises(TckrError) as exc:
        load_dataset(str(folder))
    one_line_error(exc, "label 12 at index 4", str(folder / "train-labels-idx1-ubyte"), "classes.txt")
    # Count mismatch between images and labels.
    (folder / "train-labels-idx1-ubyte").write_bytes(idx_bytes(np.array([0, 1], np.uint8)))
    with pytest.raises(TckrError) as exc:
        load_dataset(str(folder))
    one_line_error(exc, "has 6 images", "has 2 labels", str(images_file))


def test_idx_errors_gzip_and_missing_split(tmp_path):
    folder = tmp_path / "gzbroken"
    write_idx_dir(folder, gz=True)
    labels_file = folder / "t10k-labels-idx1-ubyte.gz"
    labels_file.write_bytes(labels_file.read_bytes()[:10])  # truncated gzip stream
    with pytest.raises(TckrError) as exc:
        load_dataset(str(folder), "test")
    one_line_error(exc, str(labels_file), "corrupt or truncated")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(TckrError) as exc:
        load_dataset(str(folder), "test")
    one_line_error(exc, "missing t10k-images-idx3-ubyte[.gz]", str(folder))
    (folder / "classes.txt").write_text("a\n\nb\n")
    with pytest.raises(TckrError) as exc:
        class_names(str(folder))
    one_line_error(exc, str(folder / "classes.txt"), "one non-empty, unique class name per line")


# ---------------------------------------------------------------- image folders


def test_image_folder_grayscale(tmp_path):
    root = tmp_path / "gray"
    for cls, value in (("zebra", 10), ("ant", 200)):  # classes are sorted by name: ant=0, zebra=1
        for i in range(2):
            save(root / cls / f"{i}.png", np.full((5, 4), value + i, np.uint8))
    (root / "ant" / "notes.txt").write_text("ignored")
    data = load_dataset(str(root))
    assert data.classes == ("ant", "zebra") == class_names(str(root))
    assert data.images.shape == (4, 5, 4, 1) and data.images.dtype == np.uint8
    assert data.labels.tolist() == [0, 0, 1, 1] and data.labels.dtype == np.int64
    assert data.images[:, 0, 0, 0].tolist() == [200, 201, 10, 11]
    assert data.name == str(root.resolve())
    with pytest.raises(TckrError) as exc:
        load_dataset(str(root), "test")
    one_line_error(exc, str(root.resolve()), "has no test/ split")


def test_image_folder_mixed_becomes_rgb_with_splits(tmp_path):
    root = tmp_path / "mixed"
    save(root / "train" / "b" / "x.jpg", np.zeros((3, 6, 3), np.uint8))
    save(root / "train" / "a" / "y.bmp", np.full((3, 6), 50, np.uint8), "L")
    save(root / "train" / "c" / "z.png", np.full((3, 6, 3), (1, 2, 3), np.uint8))
    save(root / "test" / "c" / "t.png", np.full((3, 6), 90, np.uint8), "L")
    train, test = load_dataset(str(root)), load_dataset(str(root), "test")
    assert train.classes == test.classes == ("a", "b", "c")
    assert train.images.shape == (3, 3, 6, 3) and train.labels.tolist() == [0, 1, 2]
    assert train.images[0, 0, 0].tolist() == [50, 50, 50]  # grey image expanded to RGB
    assert train.images[2, 0, 0].tolist() == [1, 2, 3]
    # The test split is all grey, but train is not: both splits share C=3 so one model fits both.
    assert test.images.shape == (1, 3, 6, 3) and test.labels.tolist() == [2]
    assert test.images[0, 0, 0].tolist() == [90, 90, 90]


def test_image_folder_all_grey_splits_and_webp(tmp_path):
    root = tmp_path / "grey-splits"
    save(root / "train" / "a" / "0.png", np.full((2, 2), 7, np.uint8), "L")
    save(root / "test" / "a" / "0.png", np.full((2, 2), 9, np.uint8), "L")
    assert load_dataset(str(root), "test").images.tolist() == [[[[9], [9]], [[9], [9]]]]
    save(root / "test" / "a" / "1.webp", np.full((2, 2), 5, np.uint8), "L")  # WebP decodes as RGB
    assert load_dataset(str(root), "train").images.shape == (1, 2, 2, 3)
    assert sorted(load_dataset(str(root), "test").images[:, 0, 0, 0].tolist()) == [5, 9]


def test_image_folder_errors(tmp_path):
    root = tmp_path / "sizes"
    save(root / "a" / "0.png", np.zeros((4, 4), np.uint8))
    save(root / "b" / "1.png", np.zeros((4, 5), np.uint8))
    with pytest.raises(TckrError) as exc:
        load_dataset(str(root))
    one_line_error(exc, str(root.resolve() / "b" / "1.png"), "is 5x4", "must be 4x4")
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "readme.txt").write_text("no images here")
    with pytest.raises(TckrError) as exc:
        load_dataset(str(empty))
    one_line_error(exc, "no images", str(empty.resolve()))
    (tmp_path / "bare").mkdir()
    with pytest.raises(TckrError) as exc:
        load_dataset(str(tmp_path / "bare"))
    one_line_error(exc, "neither IDX files nor class sub-folders", str((tmp_path / "bare").resolve()))
    corrupt = tmp_path / "corrupt"
    save(corrupt / "a" / "0.png", np.zeros((4, 4), np.uint8))
    (corrupt / "a" / "1.png").write_bytes(b"not a png")
    with pytest.raises(TckrError) as exc:
        load_dataset(str(corrupt))
    one_line_error(exc, "cannot read image", str(corrupt.resolve() / "a" / "1.png"))
    split = tmp_path / "split"
    save(split / "train" / "a" / "0.png", np.zeros((4, 4), np.uint8))
    save(split / "test" / "zzz" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(TckrError) as exc:
        load_dataset(str(split), "test")
    one_line_error(exc, str(split.resolve() / "test" / "zzz"), "not among the train classes")


def test_unknown_spec_and_split(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TckrError) as exc:
        resolve_dataset("cifar-10")
    one_line_error(exc, "unknown dataset 'cifar-10'", "fashion-mnist, digits", str(tmp_path / "cifar-10"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(TckrError) as exc:
        load_dataset("file.bin")
    one_line_error(exc, "is a file, not a folder", str(tmp_path / "file.bin"))
    with pytest.raises(TckrError) as exc:
        load_dataset("digits", "validation")
    one_line_error(exc, "unknown split 'validation'", "train, test")


# ---------------------------------------------------------------- splits and the dataset object


def test_train_val_split_stratified_deterministic_disjoint():
    labels = np.repeat(np.arange(4), [100, 50, 10, 1])  # (161,) imbalanced, one singleton class
    train_idx, val_idx = train_val_split(labels, 0.1, seed=3)
    assert train_idx.dtype == val_idx.dtype == np.int64
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(val_idx) > 0)  # sorted, unique
    assert np.intersect1d(train_idx, val_idx).size == 0
    np.testing.assert_array_equal(np.union1d(train_idx, val_idx), np.arange(161))
    assert np.bincount(labels[val_idx], minlength=4).tolist() == [10, 5, 1, 0]
    again = train_val_split(labels, 0.1, seed=3)
    np.testing.assert_array_equal(again[1], val_idx)
    assert not np.array_equal(train_val_split(labels, 0.1, seed=4)[1], val_idx)
    # A class's split depends only on its own members: dropping class 3 leaves classes 0..2 unchanged.
    np.testing.assert_array_equal(train_val_split(labels[:160], 0.1, seed=3)[1], val_idx)
    assert train_val_split(labels, 0.0)[1].size == 0
    with pytest.raises(TckrError):
        train_val_split(labels, 1.0)
    with pytest.raises(TckrError):
        train_val_split(labels.astype(float), 0.1)


def test_image_dataset_subset_and_validation():
    data = ImageDataset(
        "t", np.arange(24, dtype=np.uint8).reshape(3, 2, 2, 2)[..., :1], np.arange(3), ("a",) * 3
    )
    sub = data.subset(np.array([True, False, True]))
    assert len(sub) == 2 and sub.labels.tolist() == [0, 2] and sub.classes == data.classes
    assert sub.images[1, 0, 0, 0] == 16
    with pytest.raises(ValueError):
        ImageDataset("t", np.zeros((2, 2, 2, 2), np.uint8), np.zeros(2, np.int64), ("a",))
    with pytest.raises(ValueError):
        ImageDataset("t", np.zeros((2, 2, 2, 1), np.uint8), np.zeros(3, np.int64), ("a",))


# ---------------------------------------------------------------- the real Debian Fashion-MNIST


@pytest.mark.skipif(
    not (ds_mod.DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist(monkeypatch):
    monkeypatch.delenv("TCKR_FASHION_MNIST_DIR", raising=False)
    train, test = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", "test")
    assert train.images.shape == (60000, 28, 28, 1) and test.images.shape == (10000, 28, 28, 1)
    assert train.images.dtype == np.uint8 and train.labels.dtype == np.int64
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0] and test.labels[:5].tolist() == [9, 2, 1, 1, 6]
    assert train.classes[9] == "Ankle boot" and train.classes[0] == "T-shirt/top"
    assert load_dataset("fashion-mnist").images is train.images  # cached
