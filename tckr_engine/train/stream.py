"""The student's streaming shard loader (the shard folders it reads and the rounds: `train/shard_folders.py`).

- `shard_loader(...)`: webdataset's pipeline (node and worker splitting, seeded shard and sample shuffles)
  with the engine's own USTAR reader for its shards (same samples as webdataset's tarfile-based reader,
  ~4x less work), PNG/JPEG/WebP decoded to uint8, batched in the worker, served by a
  `torch.utils.data.DataLoader`; its `workers` shard streams are read by worker processes or, with the same
  batches in the same order, in the training process (`loader_in_process` decides for the trainer's "auto").
- `epoch_batches(...)`: exactly how many batches that loader yields, for the cosine schedule and progress.
- `iterate_batches(...)`: the loader's batches, a shard that breaks while streaming as one clear error.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)

IMAGE_KEYS = ("png", "jpg", "webp")
LOADERS = ("auto", "processes", "in-process")  # where shard_loader's streams are read (the same batches)


def _decode(sample: dict[str, Any], logits: bool) -> dict[str, Any]:
    """One raw webdataset sample -> image uint8 (H, W, C), class index, optional logits, key and url."""
    from PIL import Image

    where = f"sample {sample.get('__key__')} in {sample.get('__url__')}"
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    if key is None or "cls" not in sample:
        raise TckrError(f"{where} has no image or cls; check the folder with 'tckr-engine verify'")
    with Image.open(io.BytesIO(sample[key])) as image:
        mode = "L" if image.mode in ("L", "I", "1") else "RGB"
        arr = np.asarray(image if image.mode == mode else image.convert(mode))  # (H, W[, 3])
    out = {
        "image": arr[..., None] if arr.ndim == 2 else arr,  # (H, W, C)
        "cls": int(sample["cls"]),
        "key": sample["__key__"],
        "url": sample["__url__"],
    }
    if logits:
        if "logits.npy" not in sample:
            raise TckrError(
                f"{where} has no stored teacher logits (logits.npy); generate with --teacher, "
                "or train with labels 'online' or 'hard'"
            )
        out["logits"] = _load_npy(sample["logits.npy"])  # (K,) float16
    return out


@functools.lru_cache(maxsize=32)
def _npy_layout(header: bytes) -> tuple[np.dtype, tuple[int, ...]] | None:
    """dtype and shape of a version 1.0 .npy header, or None where `_load_npy` leaves it to `np.load`
    (Fortran order, object arrays). Cached: every logits.npy of a run has the same header."""
    from numpy.lib import format as npy

    f = io.BytesIO(header)
    if npy.read_magic(f) != (1, 0):
        return None
    shape, fortran, dtype = npy.read_array_header_1_0(f)
    return None if fortran or dtype.hasobject else (dtype, shape)


def _load_npy(data: bytes) -> np.ndarray:
    """`np.load` of one .npy file's bytes without re-parsing its header each time (np.load `literal_eval`s
    it: ~20x slower per stored-logits file, `python -m tckr_engine.bench.trainer --costs`)."""
    if data[:8] == b"\x93NUMPY\x01\x00" and len(data) >= 10:
        end = 10 + int.from_bytes(data[8:10], "little")
        layout = _npy_layout(data[:end])
        if layout is not None and len(data) - end == layout[0].itemsize * math.prod(layout[1]):
            return np.frombuffer(data, layout[0], offset=end).reshape(layout[1])
    return np.load(io.BytesIO(data), allow_pickle=False)


def _collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> one batch: images uint8 (B, H, W, C), cls int64 (B,), [logits float32 (B, K)]."""
    shapes = {s["image"].shape for s in samples}
    if len(shapes) > 1:
        raise TckrError(f"images in one batch differ in size or channels: {sorted(shapes)}")
    batch = {
        "images": torch.from_numpy(np.stack([s["image"] for s in samples])),  # (B, H, W, C) uint8
        "cls": torch.tensor([s["cls"] for s in samples], dtype=torch.int64),  # (B,)
        "keys": [s["key"] for s in samples],
        "urls": [s["url"] for s in samples],
    }
    if "logits" in samples[0]:
        batch["logits"] = torch.from_numpy(np.stack([s["logits"] for s in samples])).float()  # (B, K)
    return batch


_BLOCK = 512  # tar header and data alignment
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR = (b"0", b"\0")  # ustar typeflags of a regular file
_LONG_NAMES = (b"x", b"g", b"L", b"K")  # pax and GNU long-name records: not written by the engine
_META = re.compile(r"__[^/]*__($|/)")  # names webdataset's tar reader skips


def _octal(field: bytes, what: str) -> int:
    try:
        return int(field.rstrip(b"\0 ").lstrip(b" ") or b"0", 8)
    except ValueError:
        raise TckrError(f"{what}: a tar header field is not an octal number ({field!r})") from None


def _tar_files(stream: Any, where: str) -> Iterator[tuple[str, int]]:
    """(name, size) of each regular file of an uncompressed ustar stream, positioned at its data.

    The caller reads exactly `size` bytes or calls `_skip`; padding is consumed here. This is the engine's
    own reader for its own shards (written by `tarfile` in USTAR format): a header is parsed with a few
    slices, ~9x less time per sample than webdataset's `tarfile`-based expansion, which was most of the
    trainer's loader (`python -m tckr_engine.bench.trainer --costs`). Every header must carry the ustar
    magic (a misaligned or truncated stream fails there) and the first header's checksum must hold (not a
    tar at all); the other checksums are not summed (a `sum` over 512 bytes costs as much as the rest of
    the parse): the trainer reads folders whose tars `open_shard_folder` has checked against their sha256.
    A header it does not understand (pax or GNU long names) or a truncated member is a TckrError, never a
    silently short sample.
    """
    first = True
    while True:
        header = stream.read(_BLOCK)
        if not header or header == _ZERO_BLOCK:  # end of the archive (a missing end marker is tolerated)
            return
        if len(header) < _BLOCK or header[257:262] != b"ustar":
            raise TckrError(
                f"{where} is not a readable USTAR tar; check the folder with 'tckr-engine verify'"
            )
        if first and sum(header) - sum(header[148:156]) + 8 * 32 != _octal(header[148:156], where):
            raise TckrError(
                f"{where} has a tar header with a bad checksum; check it with 'tckr-engine verify'"
            )
        first = False
        kind = header[156:157]
        if kind in _LONG_NAMES:
            raise TckrError(
                f"{where} uses pax/GNU long-name tar records, which the shard reader does not read; "
                "write shards with 'tckr-engine generate' (plain USTAR)"
            )
        name = header[:100].split(b"\0", 1)[0].decode("utf-8")
        if header[345]:  # the ustar prefix field
            name = header[345:500].split(b"\0", 1)[0].decode("utf-8") + "/" + name
        size = _octal(header[124:136], where)
        pad = -size % _BLOCK
        if kind in _REGULAR:
            yield name, size
            _skip(stream, pad, where)
        else:  # directories, links and other entries carry no sample data
            _skip(stream, size + pad, where)


def _skip(stream: Any, n: int, where: str) -> None:
    if n and len(stream.read(n)) < n:
        raise TckrError(f"{where} ends inside a tar member; check the folder with 'tckr-engine verify'")


def _tar_samples(sources: Iterator[dict[str, Any]], keep: frozenset[str]) -> Iterator[dict[str, Any]]:
    """The pipeline stage between webdataset's opener and its sample shuffle: opened shard streams ->
    samples `{"__key__", "__url__", ext: bytes}` holding only the extensions in `keep`.

    Grouping is webdataset's (`tariterators.group_by_keys` with `base_plus_ext`): consecutive files with the
    same key (the name up to the first dot of its last path part) form one sample; a file without a dot or
    named like `__meta__` is skipped; a sample never spans two shards; a repeated extension is an error.
    `tests/test_gkd.py` checks the samples equal webdataset's own `tarfile_to_samples` output.
    """
    for source in sources:
        url, stream = source["url"], source["stream"]
        try:
            sample: dict[str, Any] | None = None
            for name, size in _tar_files(stream, url):
                slash = name.rfind("/") + 1
                dot = name.find(".", slash)
                if dot <= slash or (name.startswith("__") and _META.match(name)):
                    _skip(stream, size, url)
                    continue
                key, ext = name[:dot], name[dot + 1 :].lower()
                if sample is None or sample["__key__"] != key:
                    if sample is not None:
                        yield sample
                    sample, exts = {"__key__": key, "__url__": url}, set()
                if ext in exts:
                    raise TckrError(f"{url}: {name} appears twice in sample {key}")
                exts.add(ext)
                if ext in keep:
                    data = stream.read(size)
                    if len(data) < size:
                        raise TckrError(
                            f"{url} ends inside {name}; check the folder with 'tckr-engine verify'"
                        )
                    sample[ext] = data
                else:
                    _skip(stream, size, url)
            if sample is not None:
                yield sample
        finally:
            stream.close()


def shard_loader(
    urls: Sequence[str | Path],
    batch_size: int,
    workers: int = 0,
    shuffle_buffer: int = 0,
    seed: int = 0,
    *,
    logits: bool = False,
    in_process: bool = False,
) -> DataLoader:
    """A DataLoader over WebDataset shards yielding batch dicts (see `_collate`); one pass = one epoch.

    Pipeline (the stages `wds.WebDataset` chains, with the engine's tar reader in place of `tarfile`):
    the shard list split by `wds.split_by_node` (under torchrun each rank reads urls[rank::world]) and
    `wds.split_by_worker` (each DataLoader worker a stride of those), a shard-order shuffle, webdataset's
    opener, `_tar_samples`, a `shuffle_buffer`-sample shuffle (both shuffles seeded with `seed`; 0 = neither:
    index order), decode, batches of `batch_size` formed in the worker (each worker's last batch may be
    partial). The batches equal those of `wds.WebDataset(urls, shardshuffle=..., seed=seed)` with the same
    stages (`tests/test_gkd.py`). `workers` streams, capped at the number of shards (an extra one would have
    nothing to read); 0 and 1 are one stream. Pass a different `seed` per epoch for a different order;
    equal arguments give equal batches. `logits` also decodes the stored teacher logits (`logits.npy`; a
    sample without them is a TckrError).

    The streams are read by `workers` DataLoader worker processes, or with `in_process` (and always for
    `workers` 0) in this process, one batch from each stream in turn: the DataLoader's own order (it takes
    its workers' batches round-robin and drops a worker once it is exhausted), so the batches, their order
    and the draw the DataLoader makes from torch's global RNG are the same either way (`tests/test_gkd.py`).
    Worker processes decode beside the training, on cores it leaves idle; when its threads keep every core
    busy the workers take turns with them, and reading here is faster (`loader_in_process`).
    """
    import webdataset as wds
    from webdataset.cache import StreamingOpen

    urls = [str(u) for u in urls]
    if not urls:
        raise TckrError("no shards to read")
    shuffle = shuffle_buffer > 0
    keep = frozenset((*IMAGE_KEYS, "cls", *(("logits.npy",) if logits else ())))
    streams = max(1, min(workers, len(urls)))

    def pipeline(split_by_worker: Any) -> Any:
        stages: list[Any] = [wds.SimpleShardList(urls), wds.split_by_node, split_by_worker]
        stages.append(wds.shuffle(len(urls) if shuffle else 0, seed=seed))  # as wds.WebDataset's shardshuffle
        stages += [StreamingOpen(), functools.partial(_tar_samples, keep=keep)]
        if shuffle:
            stages.append(wds.shuffle(shuffle_buffer, seed=seed))
        stages += [
            wds.map(functools.partial(_decode, logits=logits)),
            wds.batched(batch_size, collation_fn=_collate, partial=True),
        ]
        return wds.DataPipeline(*stages)

    if workers and not in_process:
        return DataLoader(pipeline(wds.split_by_worker), batch_size=None, num_workers=streams)
    # wds.split_by_worker in worker i of n > 1 keeps the shards i, i + n, ...; in one process it keeps all.
    split = [functools.partial(_every_nth, i, streams) for i in range(streams)]
    return DataLoader(_RoundRobin([pipeline(s) for s in split]), batch_size=None, num_workers=0)


def _every_nth(first: int, step: int, src: Iterator[Any]) -> Iterator[Any]:
    yield from itertools.islice(src, first, None, step)


class _RoundRobin(IterableDataset):
    """Batches of several pipelines in turn, one from each, skipping a pipeline once it is exhausted."""

    def __init__(self, pipelines: Sequence[Any]) -> None:
        self.pipelines = list(pipelines)

    def __iter__(self) -> Iterator[Any]:
        live = [iter(p) for p in self.pipelines]
        while live:
            for it in list(live):
                try:
                    yield next(it)
                except StopIteration:
                    live.remove(it)


def loader_in_process(loader: str, device: str | torch.device, workers: int, threads: int) -> bool:
    """Whether the trainer reads its shard streams in the training process, for its `loader` setting:
    "processes" and "in-process" as named (workers 0: always in-process); "auto": in-process when the
    training runs on the CPU with `threads` threads and the cores left over cannot give each stream's worker
    one of its own, else DataLoader worker processes. On a 2-core CPU with 2 threads, in-process was faster
    in 7 of 8 whole-run pairs (up to +30 %; the eighth -3 %, within noise; docs/bench/README.md)."""
    if loader not in LOADERS:
        raise TckrError(f"loader must be one of {', '.join(LOADERS)}, got {loader!r}")
    if workers == 0 or loader != "auto":
        return workers == 0 or loader == "in-process"
    if torch.device(device).type != "cpu":
        return False
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cores - threads < workers


def loader_note(workers: int, in_process: bool) -> str:
    """How `shard_loader` reads its streams, for logs and bench notes (before the cap at the shard count)."""
    streams = max(1, workers)
    if in_process or workers == 0:
        return f"{streams} shard stream{'s' * (streams > 1)} read in the training process"
    return f"{streams} DataLoader worker{'s' * (streams > 1)} reading the shards"


def epoch_batches(
    nsamples: Sequence[int], batch_size: int, workers: int, rank: int = 0, world_size: int = 1
) -> int:
    """Batches one pass of `shard_loader` yields: per worker, ceil(its samples / batch_size)."""
    streams = max(1, min(workers, len(nsamples)))
    mine = list(nsamples)[rank::world_size]
    return sum(math.ceil(sum(mine[w::streams]) / batch_size) for w in range(streams))


def iterate_batches(loader: DataLoader, what: str | Path) -> Iterator[dict[str, Any]]:
    """Iterate `loader`, turning read errors (also those re-raised from DataLoader workers) into one line."""
    import tarfile

    try:
        yield from loader
    except TckrError as e:  # from a worker, the message carries the worker's traceback: keep the last part
        raise TckrError(str(e).rsplit("TckrError: ", 1)[-1]) from None
    except (OSError, ValueError, tarfile.TarError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        raise TckrError(
            f"cannot read the shards of {what}: {lines[-1] if lines else type(e).__name__}; "
            f"check them with 'tckr-engine verify {what}'"
        ) from None
