"""allocator.keep_freed_memory: glibc thresholds set for a scope and settled after; left alone where the
user or the platform says so; real page faults gone on this machine; generation bytes unchanged."""

import platform
import resource
import threading

import pytest
import torch
from conftest import tiny_config

from tckr_engine import allocator
from tckr_engine.allocator import (
    KEEP_BYTES,
    M_MMAP_THRESHOLD,
    M_TRIM_THRESHOLD,
    SETTLED_MMAP_BYTES,
    SETTLED_TRIM_BYTES,
    keep_freed_memory,
)

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
KEEP = [(M_MMAP_THRESHOLD, KEEP_BYTES), (M_TRIM_THRESHOLD, KEEP_BYTES)]
SETTLED = [(M_MMAP_THRESHOLD, SETTLED_MMAP_BYTES), (M_TRIM_THRESHOLD, SETTLED_TRIM_BYTES)]


@pytest.fixture
def calls(monkeypatch):
    """mallopt replaced by a recorder (every other condition of the module as on a plain glibc Linux)."""
    seen: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        seen.append((param, value))
        return 1

    for var in (allocator.ENV, "GLIBC_TUNABLES", "LD_PRELOAD", *allocator._USER_MALLOC_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(allocator, "_libc_mallopt", lambda: mallopt)
    monkeypatch.setattr(allocator.platform, "system", lambda: "Linux")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("glibc", "2.36"))
    return seen


def test_a_scope_keeps_freed_memory_and_leaves_the_thresholds_settled(calls):
    with keep_freed_memory():
        assert calls == KEEP
        with keep_freed_memory():  # nested (the engine's run around its batches): nothing more
            pass
        assert calls == KEEP
    assert calls == KEEP + SETTLED
    assert allocator.describe()["state"] == "settled"


def test_scopes_on_two_threads_overlap_without_settling_early(calls):
    inside, release = threading.Event(), threading.Event()

    def worker() -> None:
        with keep_freed_memory():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=worker)
    t.start()
    inside.wait(10)
    with keep_freed_memory():
        pass  # the other thread's scope is still open: the thresholds must stay where they are
    assert calls == KEEP
    release.set()
    t.join()
    assert calls == KEEP + SETTLED


def test_disabled_scope_and_settle_inside_a_scope_change_nothing(calls):
    with keep_freed_memory(enabled=False):
        pass
    assert calls == []
    with keep_freed_memory():
        allocator.settle()  # the bench settles before its rows: never in the middle of a scope
    assert calls == KEEP + SETTLED
    allocator.settle()
    assert calls == KEEP + SETTLED + SETTLED


def test_an_old_glibc_refusing_a_large_mmap_threshold_gets_the_largest_it_takes(monkeypatch, calls):
    def picky(param: int, value: int) -> int:
        calls.append((param, value))
        return int(not (param == M_MMAP_THRESHOLD and value > SETTLED_MMAP_BYTES))

    monkeypatch.setattr(allocator, "_libc_mallopt", lambda: picky)
    with keep_freed_memory():
        pass
    assert calls[:3] == [
        (M_MMAP_THRESHOLD, KEEP_BYTES),
        (M_MMAP_THRESHOLD, SETTLED_MMAP_BYTES),
        (M_TRIM_THRESHOLD, KEEP_BYTES),
    ]


@pytest.mark.parametrize(
    ("var", "value", "reason"),
    [
        (allocator.ENV, "0", "TCKR_KEEP_FREED_MEMORY=0"),
        ("MALLOC_TRIM_THRESHOLD_", "131072", "chosen by the user (MALLOC_TRIM_THRESHOLD_)"),
        ("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=0", "chosen by the user (GLIBC_TUNABLES)"),
        ("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "another allocator is preloaded"),
    ],
)
def test_the_users_choice_is_left_alone(monkeypatch, calls, var, value, reason):
    monkeypatch.setenv(var, value)
    with keep_freed_memory():
        pass
    allocator.settle()
    assert calls == []
    info = allocator.describe()
    assert not info["keep_freed_memory"] and reason in info["reason"]


def test_not_glibc_is_left_alone(monkeypatch, calls):
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    with keep_freed_memory():
        pass
    assert calls == [] and "not glibc" in allocator.describe()["reason"]


def _faults_of_big_tensors(rounds: int = 4, warmup: int = 6) -> int:
    """Minor page faults of allocating, touching and freeing a 48 MiB tensor a few times (above the
    settled 32 MiB mmap threshold: glibc maps and unmaps it every time unless the scope keeps it)."""
    for _ in range(warmup):  # the heap grows to it (glibc took up to 4 rounds to settle here; not counted)
        torch.ones(12 << 20).sum()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.ones(12 << 20).sum()  # 12 Mi float32 = 48 MiB, every page touched by ones()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_on_this_machine_the_scope_removes_the_page_faults(monkeypatch):
    for var in (allocator.ENV, "GLIBC_TUNABLES", "LD_PRELOAD", *allocator._USER_MALLOC_ENV):
        monkeypatch.delenv(var, raising=False)
    allocator.settle()
    outside = _faults_of_big_tensors()
    with keep_freed_memory():
        inside = _faults_of_big_tensors()
    pages = 4 * (48 << 20) // resource.getpagesize()
    assert outside >= pages // 2, outside  # mapped afresh each round (at least half its pages faulted)
    assert inside < pages // 20, inside  # kept: the rounds reuse the same pages


def test_generated_bytes_do_not_depend_on_the_allocator(monkeypatch, tmp_path, tiny_run):
    from tckr_engine.engine.generate import generate

    monkeypatch.setenv(allocator.ENV, "0")
    generate(tiny_config(), tmp_path / "default")
    tars = sorted((tmp_path / "default" / "shards").glob("*.tar"))
    assert [p.read_bytes() for p in tars] == [
        (tiny_run / "shards" / p.name).read_bytes() for p in tars
    ]  # tiny_run was generated with the scope (the default)


def test_the_ab_script_runs_a_command_under_each_setting_and_reports_its_failure():
    from tckr_engine.bench.allocator_ab import timed_command

    run = timed_command(["presets"], keep=False)
    assert run["seconds"] > 0 and run["minor_faults"] > 0 and run["max_rss_mb"] > 0  # its own rusage
    with pytest.raises(RuntimeError, match="generate"):
        timed_command(["generate", "--shards", "/nonexistent/x", "--model", "no-such-model"], keep=True)


def test_a_bad_switch_value_is_one_clear_error(monkeypatch, calls):
    from tckr_engine.errors import TckrError

    monkeypatch.setenv(allocator.ENV, "yes")
    with pytest.raises(TckrError, match=f"{allocator.ENV} must be 0 or 1, got 'yes'"), keep_freed_memory():
        pass
    assert calls == [] and allocator._depth == 0
