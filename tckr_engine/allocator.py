"""Keep freed memory in the process while the CPU runs models: glibc malloc set for PyTorch's pattern.

A CPU UNet forward (or a training step) allocates and frees megabytes of activations per layer, the same
sizes call after call. With its default settings glibc serves every block above its mmap threshold with a
fresh `mmap` (and `munmap`s it on free), and returns the top of its heap to the kernel whenever more than
its trim threshold lies free there; either way the next call's tensors land on pages the kernel has to
map and zero-fill again on first touch, one minor page fault per 4 KiB. glibc raises both thresholds as
it sees large blocks freed, but only up to 32 MiB (mmap) and 64 MiB (trim), below what a sampling loop or
a training step frees between two of its layers. Measured on the 2-core bench machine in fresh processes
(`python -m tckr_engine.bench.allocator_ab`, docs/bench/README.md "The engine and the trainers keep the
memory they free"): `generate` of 400 images 1.09-1.11x faster (2.6 M minor faults -> 0.15 M), a 4-epoch
student 1.43-1.52x (13-15 M -> 0.35 M), byte-identical shards and the same test accuracy (where memory
comes from does not change the arithmetic). The price is resident memory: what is freed stays in the
process and is not always what the next, differently sized request can use (the student's peak RSS
1.14-1.47 GB against 1.08-1.16 GB without, varying by run; generate's 0.72 -> 0.73 GB).

`keep_freed_memory()` sets both thresholds to 1 GiB for its scope (the engine's sampling on the CPU; the
trainers and `evaluate` on any device, their host-side batches churn memory too), so freed memory stays
in the process for the next call.
glibc offers no way back to its adaptive thresholds (setting one ends them for the process), so on
leaving the outermost scope both are set to the top of their adaptive range, 32 MiB and 64 MiB: at or
above where a fresh process's thresholds can climb, so code that runs after it (the bench's diffusers
baseline, say) gets no more page faults from them than glibc's own thresholds would give it.
`settle()` sets that state up front (the bench calls it before its first row, so every row starts alike).

Nothing is changed, and a debug line says why, when the C library is not glibc, when the user chose
malloc settings themselves (`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_TOP_PAD_`, glibc
malloc tunables in `GLIBC_TUNABLES`) or preloaded another allocator (`LD_PRELOAD`), or with
`TCKR_KEEP_FREED_MEMORY=0` (for A/B measurements).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform
import threading
from collections.abc import Iterator
from typing import Any

from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)

ENV = "TCKR_KEEP_FREED_MEMORY"

# mallopt(3) parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3

KEEP_BYTES = 1 << 30  # within a scope: blocks up to 1 GiB from the heap, up to 1 GiB free at its top kept
# The top of glibc's adaptive range on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX; trim follows at twice it),
# where the thresholds are left after a scope.
SETTLED_MMAP_BYTES = 32 << 20
SETTLED_TRIM_BYTES = 64 << 20

_USER_MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")

_lock = threading.Lock()
_depth = 0  # scopes open in this process (nested or on several threads): the outermost one restores
_state = "untouched"  # "untouched" | "kept" | "settled": for run records and the bench's JSON


def _skip_reason() -> str | None:
    """Why the allocator must be left alone here, or None."""
    switch = os.environ.get(ENV, "1").strip() or "1"
    if switch not in ("0", "1"):
        raise TckrError(f"{ENV} must be 0 or 1, got {switch!r}")
    if switch == "0":
        return f"{ENV}=0"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "the C library is not glibc"
    chosen = [v for v in _USER_MALLOC_ENV if v in os.environ]
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        chosen.append("GLIBC_TUNABLES")
    if chosen:
        return f"malloc settings chosen by the user ({', '.join(chosen)})"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return "another allocator is preloaded (LD_PRELOAD)"
    return None


@functools.cache
def _libc_mallopt() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt


@functools.cache
def _log_skip(reason: str) -> None:
    log.debug("malloc thresholds left as they are: %s", reason)


def _mallopt() -> Any:
    """glibc's `mallopt`, or None (the reason logged once) when the allocator is to be left alone."""
    reason = _skip_reason()
    if reason is None:
        try:
            return _libc_mallopt()
        except (OSError, AttributeError) as e:
            reason = f"mallopt not found ({e})"
    _log_skip(reason)
    return None


def _set(mmap_bytes: int, trim_bytes: int) -> bool:
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success; an older glibc refuses mmap thresholds above 32 MiB: keep that then
    if not mallopt(M_MMAP_THRESHOLD, mmap_bytes):
        mallopt(M_MMAP_THRESHOLD, SETTLED_MMAP_BYTES)
    mallopt(M_TRIM_THRESHOLD, trim_bytes)
    return True


def settle() -> None:
    """Pin glibc's thresholds at the top of their adaptive range now (no-op where it is left alone)."""
    global _state
    with _lock:
        if _depth == 0 and _set(SETTLED_MMAP_BYTES, SETTLED_TRIM_BYTES):
            _state = "settled"


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[None]:
    """Within: freed memory stays in the process (see the module doc); `enabled=False` does nothing
    (callers pass `device.type == "cpu"`)."""
    global _depth, _state
    if not enabled:
        yield
        return
    _skip_reason()  # a bad switch value fails here, before the scope is counted
    with _lock:
        _depth += 1
        if _depth == 1 and _set(KEEP_BYTES, KEEP_BYTES):
            _state = "kept"
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _state == "kept" and _set(SETTLED_MMAP_BYTES, SETTLED_TRIM_BYTES):
                _state = "settled"


def describe() -> dict[str, Any]:
    """What this process did to the allocator, for run records and bench results."""
    reason = _skip_reason()
    return {
        "keep_freed_memory": reason is None,
        "reason": reason or "glibc mallopt: 1 GiB mmap and trim thresholds while models run on the CPU",
        "state": _state,
    }
