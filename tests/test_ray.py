"""The Ray distributor on a real local Ray cluster (2 CPUs, one per module): same bytes as the local path,
a worker killed mid-task is retried, a frozen worker is re-issued as a straggler, failures are bounded."""

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time

import pytest
from conftest import TINY, tiny_config

ray = pytest.importorskip("ray")

from tckr_engine.engine.distributed import Distribution  # noqa: E402
from tckr_engine.engine.generate import generate, prepare_folder, verify  # noqa: E402
from tckr_engine.engine.ray_backend import RayDriver  # noqa: E402
from tckr_engine.engine.shards import write_index  # noqa: E402
from tckr_engine.engine.spec import resolve  # noqa: E402
from tckr_engine.engine.store import open_store  # noqa: E402
from tckr_engine.errors import TckrError  # noqa: E402

# 16 shards of 16 images at 20 steps: long enough that a worker is mid-task when the test strikes.
LONG = dict(num_images=256, shard_size=16, batch_size=16, steps=20)


def tars(out):
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("long") / "reference"
    generate(tiny_config(**LONG), out)
    return out


class Background:
    """Runs a RayDriver in a thread so the test can act on its workers meanwhile."""

    def __init__(self, out, **dist):
        self.run, _ = resolve(tiny_config(**LONG))
        prepare_folder(out, self.run, overwrite=False)
        self.out = out
        self.driver = RayDriver(self.run, open_store(out), Distribution("ray", workers=2, **dist).validate())
        self.report, self.error = None, None
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self):
        try:
            self.report = self.driver.run(range(self.run["num_shards"]))
        except BaseException as e:  # re-raised in the test thread by finish()
            self.error = e

    def committed(self):
        return len(list((self.out / "shards").glob("*_stats.json")))

    def wait_until_working(self, timeout=240):
        """A worker loaded and a shard committed, most still to do: returns the loaded workers' pids."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = self.driver.pids()
            if pids and self.committed() >= 1:
                assert self.committed() < self.run["num_shards"] - 2, "the run ended before the test struck"
                return pids
            assert self.thread.is_alive(), self.error
            time.sleep(0.01)
        raise AssertionError("the Ray workers never started")

    def finish(self, timeout=300):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the Ray driver hangs"
        if self.error is not None:
            raise self.error
        write_index(self.out, self.run["num_shards"])
        return self.report


def test_backend_ray_cli_matches_the_local_backend(cli, ray_cluster, tiny_run, tmp_path):
    out = tmp_path / "ray"
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    result = cli("generate", "--shards", out, *args, "--backend", "ray", "--workers", "2")
    assert result.code == 0, result.err
    assert tars(out) == tars(tiny_run) and verify(out) == []
    ours, local = (json.loads((p / "run.json").read_text()) for p in (out, tiny_run))
    assert ours["spec"] == local["spec"] and ours["spec"]["backend"] == "torch"  # Ray is not in the spec
    assert (out / "index.json").read_text() == (tiny_run / "index.json").read_text()


def test_worker_killed_mid_task_is_retried(ray_cluster, long_reference, tmp_path):
    job = Background(tmp_path / "killed")
    victim = job.wait_until_working()[0]
    os.kill(victim, signal.SIGKILL)  # a real process kill of a worker that holds a shard
    report = job.finish()
    assert report.workers_lost == 1 and report.failed_attempts == 1 and report.workers_started == 3
    assert "died" in report.failures[0]
    assert report.shards == 16 and report.images == 256  # each shard counted once, from its stats file
    assert tars(job.out) == tars(long_reference) and verify(job.out) == []


def test_frozen_worker_is_a_straggler_reissued_elsewhere(ray_cluster, long_reference, tmp_path):
    job = Background(tmp_path / "frozen")
    victim = job.wait_until_working()[0]
    os.kill(victim, signal.SIGSTOP)  # a hung node: alive, holding its shard, never finishing
    try:
        report = job.finish()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGKILL)  # the driver kills it; this only cleans up after a failure
    assert report.stragglers_reissued == 1 and report.failed_attempts == 0
    assert report.shards == 16 and report.images == 256
    assert tars(job.out) == tars(long_reference) and verify(job.out) == []


def test_failures_are_retried_a_bounded_number_of_times(ray_cluster, tmp_path):
    out = tmp_path / "blocked"
    run, _ = resolve(tiny_config(num_images=16, shard_size=16))
    prepare_folder(out, run, overwrite=False)
    shutil.rmtree(out / "shards")
    (out / "shards").write_text("a file where the shard folder should be")  # every commit fails
    driver = RayDriver(run, open_store(out), Distribution("ray", workers=1, max_retries=1).validate())
    with pytest.raises(
        TckrError, match=r"shard 000000 failed 2 times .*Not a directory.*rerun the same command"
    ):
        driver.run(range(1))
    assert driver.report.failed_attempts == 2
