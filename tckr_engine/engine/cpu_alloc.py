"""glibc malloc thresholds for CPU generation: keep freed activation buffers instead of returning them.

PyTorch's CPU allocator is the C library's malloc. A UNet forward allocates and frees every activation
(MBs each at the tiny preset), and glibc hands large freed blocks back to the kernel: blocks above the mmap
threshold are unmapped on free, and a heap whose free top grows past the trim threshold is shrunk. The
next step maps the same memory again, page by page: generating 1,280 images at the tiny preset on 2 cores
took ~1.7 million minor page faults and ~4.6 s of system time out of ~45 s. glibc raises both thresholds
on its own (the "dynamic" thresholds), but only after freeing an mmapped block larger than the current
one, so with the engine's block sizes it keeps trimming.

`tune_cpu_allocator()` fixes them at the top of glibc's own dynamic range (`M_MMAP_THRESHOLD` 32 MiB, its
`DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit; `M_TRIM_THRESHOLD` twice that, as the dynamic rule sets it): the
page faults drop ~13x. Both must be set together: setting either one switches the dynamic rule off for
both, and one alone was 2-8x slower than the default in that measurement. A freed block no larger than
32 MiB stays in the process (up to 64 MiB of free heap top per arena before a trim), the memory a
generation process holds anyway. Nothing computed changes: images are bitwise the same.

It is process-wide and happens once, when an engine is built on the CPU (`Engine.__init__`);
`$TCKR_CPU_MALLOC=0` leaves malloc as it is (A/B runs). Other C libraries (macOS, musl): nothing is done.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading

from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)

CPU_MALLOC_ENV = "TCKR_CPU_MALLOC"

# mallopt(3) parameters (glibc malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 2 * MMAP_THRESHOLD  # the dynamic rule's trim threshold for that mmap threshold

_lock = threading.Lock()
_done: bool | None = None  # None: not tried yet; then whether the thresholds are in force


def cpu_malloc_enabled() -> bool:
    """`$TCKR_CPU_MALLOC`: "1" (default) tunes malloc for CPU generation, "0" leaves it alone."""
    value = os.environ.get(CPU_MALLOC_ENV, "1").strip()
    if value not in ("0", "1"):
        raise TckrError(f"{CPU_MALLOC_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


def tune_cpu_allocator() -> bool:
    """Set glibc's mmap and trim thresholds for this process (once). Returns whether they are in force."""
    global _done
    with _lock:
        if _done is not None:
            return _done
        _done = False
        if not cpu_malloc_enabled():
            log.info("malloc left as it is (%s=0)", CPU_MALLOC_ENV)
            return False
        if platform.libc_ver()[0] != "glibc":
            log.debug("not glibc: malloc thresholds left as they are")
            return False
        try:
            libc = ctypes.CDLL("libc.so.6")
        except OSError as e:
            log.debug("libc.so.6 not loadable (%s): malloc thresholds left as they are", e)
            return False
        ok = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
        ok = ok and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
        if not ok:
            log.warning("mallopt refused the CPU generation thresholds; malloc may be half-tuned")
            return False
        _done = True
        log.info(
            "malloc: mmap threshold %d MiB, trim threshold %d MiB (%s=0 to leave malloc alone)",
            MMAP_THRESHOLD >> 20,
            TRIM_THRESHOLD >> 20,
            CPU_MALLOC_ENV,
        )
        return True


def malloc_tuned() -> bool:
    """Whether `tune_cpu_allocator()` has set the thresholds in this process."""
    return bool(_done)
