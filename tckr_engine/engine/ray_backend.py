"""The Ray distributor: a pool of actors, each holding the run's loaded model, generating one shard per task.

What img2dataset users hit on Ray (REFERENCE.md §7) and what this driver does about it:
- no retries: a failed task (an exception, or its worker process dying) is retried on a live worker, at
  most `max_retries` times per shard; a dead worker is replaced by a fresh actor.
- hangs at the end: once no new shard is left, a shard running longer than `straggler_factor` x the median
  shard time is re-issued to an idle worker; the first copy to commit wins and the other worker is killed.
- RAM spikes: shard ids are pulled lazily from an iterator and each worker holds one task at a time, so the
  driver keeps O(workers) state whatever the image count; results are small stats dicts.
- progress: the driver counts what the committed stats files say, never what workers report, so the count
  is right whatever happens to workers.

Every task runs `generate_shards(run, out, [shard])`, the same function as the local path, with the thread
count recorded in the spec, so a shard's bytes do not depend on where it ran (DESIGN.md "Scale-out").
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tckr_engine.engine.distributed import Distribution
from tckr_engine.engine.shards import read_stats, shard_problem
from tckr_engine.engine.store import Store
from tckr_engine.errors import TckrError

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5  # how often the driver looks for stragglers when nothing finishes
START_TIMEOUT = 900.0  # no worker able to start for this long: the cluster cannot host one


class ShardWorker:
    """The Ray actor: `load()` builds the Engine once (model on the worker's device), `generate(shard)`
    commits one shard and returns its stats."""

    def __init__(self, run: dict[str, Any], url: str, rename: bool, writers: int) -> None:
        self.run, self.store, self.writers = run, Store(url, rename), writers
        self.engine: Any = None

    def load(self) -> int:
        import torch

        from tckr_engine.engine.engine import Engine
        from tckr_engine.engine.spec import load_resources

        spec = self.run["spec"]
        if spec["device"] == "cpu":
            torch.set_num_threads(spec["threads"])  # the spec's count, whatever Ray set OMP_NUM_THREADS to
        self.engine = Engine(spec, load_resources(self.run))
        return os.getpid()

    def generate(self, shard: int) -> dict[str, Any]:
        from tckr_engine.engine.generate import generate_shards

        [stats] = generate_shards(self.run, self.store, [shard], engine=self.engine, writers=self.writers)
        return stats.to_json()


@dataclass
class RayReport:
    """What happened during a Ray run (logged at the end, returned for tests and benchmarks)."""

    shards: int = 0  # shards committed by this call
    images: int = 0
    workers: int = 0  # pool size asked for
    workers_started: int = 0  # including replacements
    workers_lost: int = 0  # died mid-task (killed, OOM, node lost) or killed as a straggler's loser
    failed_attempts: int = 0
    stragglers_reissued: int = 0
    seconds: float = 0.0
    failures: list[str] = field(default_factory=list)  # "shard 000003: why", capped


@dataclass(eq=False)
class _Worker:
    actor: Any
    index: int
    pid: int | None = None  # set once the model is loaded
    busy: bool = False


@dataclass
class _Task:
    shard: int
    worker: _Worker
    started: float


class _Lookahead:
    """An iterator whose exhaustion can be checked without consuming it."""

    _END = object()

    def __init__(self, it: Iterable[int]) -> None:
        self._it: Iterator[int] = iter(it)
        self._next: Any = next(self._it, self._END)

    @property
    def empty(self) -> bool:
        return self._next is self._END

    def pop(self) -> int | None:
        if self.empty:
            return None
        item, self._next = self._next, next(self._it, self._END)
        return item


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise TckrError(
            "the Ray distributor needs the ray package: pip install 'tckr-engine[ray]' "
            "(or drop --distributor ray)"
        ) from None
    return ray


def _why(error: BaseException) -> str:
    cause = getattr(error, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else error).strip()
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _user_error(error: BaseException) -> TckrError | None:
    """The TckrError a task raised (a bad model path, an unwritable store): retrying cannot fix it."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, TckrError) else None


class RayDriver:
    """Runs the shards of a prepared run on a pool of `ShardWorker` actors (Ray must be initialised)."""

    def __init__(
        self,
        run: dict[str, Any],
        store: Store,
        dist: Distribution,
        *,
        writers: int = 2,
        progress: Any = None,
    ) -> None:
        self.ray = import_ray()
        if not self.ray.is_initialized():
            raise TckrError("RayDriver needs ray.init() first (generate_on_ray does it)")
        if store.url.startswith("memory://"):
            raise TckrError(
                f"{store} lives in one process's memory; Ray workers cannot write to it: use a folder or a "
                "shared URL"
            )
        self.run_spec, self.store, self.dist = run, store, dist
        self.writers, self.progress = writers, progress
        self.cpus, self.gpus = self._resources(run["spec"])
        self.n_workers = dist.workers or self._default_workers()
        self.workers: list[_Worker] = []
        self.starting: dict[Any, _Worker] = {}  # ref of load() -> worker
        self.tasks: dict[Any, _Task] = {}  # ref of generate() -> task; at most 2 per shard
        self.attempts: dict[int, int] = {}  # failed attempts of shards not yet committed
        self.durations: deque[float] = deque(maxlen=128)  # recent successful shard times
        self.report = RayReport(workers=self.n_workers)
        self._start_failures = 0
        self._no_worker_since: float | None = None
        self._actor_cls: Any = None

    # --- pool ----------------------------------------------------------------------------------------

    def _resources(self, spec: dict[str, Any]) -> tuple[float, float]:
        """(CPUs, GPUs) one worker asks Ray for."""
        total = self.ray.cluster_resources()
        if spec["device"] == "cuda":
            gpus = 1.0 if self.dist.gpus_per_worker is None else float(self.dist.gpus_per_worker)
            if gpus > total.get("GPU", 0):
                raise TckrError(
                    f"each worker asks for {gpus:g} GPU(s) but the Ray cluster has {total.get('GPU', 0):g}; "
                    "add GPU nodes or lower --gpus-per-worker"
                )
            return 1.0, gpus
        cpus = float(spec["threads"])
        if cpus > total.get("CPU", 0):
            raise TckrError(
                f"each worker runs {spec['threads']} CPU threads (the spec's) but the Ray cluster has "
                f"{total.get('CPU', 0):g} CPUs; pass a smaller --threads"
            )
        return cpus, float(self.dist.gpus_per_worker or 0)

    def _default_workers(self) -> int:
        total = self.ray.cluster_resources()
        if self.gpus > 0:
            return max(1, int(total.get("GPU", 0) // self.gpus))
        return max(1, int(total.get("CPU", 1) // self.cpus))

    def _start_worker(self) -> None:
        if self._actor_cls is None:
            self._actor_cls = self.ray.remote(ShardWorker).options(
                num_cpus=self.cpus, num_gpus=self.gpus, max_restarts=0, max_task_retries=0
            )
        index = self.report.workers_started
        worker = _Worker(
            self._actor_cls.remote(self.run_spec, self.store.url, self.store.rename, self.writers),
            index,
        )
        self.workers.append(worker)
        self.starting[worker.actor.load.remote()] = worker
        self.report.workers_started += 1

    def _drop_worker(self, worker: _Worker, kill: bool = False) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
        if kill:
            self.ray.kill(worker.actor)

    def pids(self) -> list[int]:
        """Process ids of the loaded workers (what an operator, or a test, would kill)."""
        return [w.pid for w in self.workers if w.pid is not None]

    # --- events --------------------------------------------------------------------------------------

    def _on_loaded(self, ref: Any) -> None:
        worker = self.starting.pop(ref)
        try:
            worker.pid = self.ray.get(ref)
        except self.ray.exceptions.RayError as e:
            self._drop_worker(worker, kill=True)
            if (user := _user_error(e)) is not None:
                raise TckrError(str(user)) from None
            self._start_failures += 1
            log.warning("Ray worker %d failed to start: %s", worker.index, _why(e))
            if self._start_failures > self.dist.max_retries:
                raise TckrError(
                    f"Ray workers failed to start {self._start_failures} times in a row (last: {_why(e)})"
                ) from None
            return
        self._start_failures = 0
        log.debug("Ray worker %d loaded (pid %d)", worker.index, worker.pid)

    def _on_finished(self, ref: Any, retry: deque[int]) -> None:
        task = self.tasks.pop(ref)
        task.worker.busy = False
        try:
            result = self.ray.get(ref)
        except self.ray.exceptions.RayTaskError as e:  # the task raised; its worker is alive
            if (user := _user_error(e)) is not None:
                raise TckrError(str(user)) from None
            self._failed(task.shard, _why(e), retry)
            return
        except self.ray.exceptions.RayError as e:  # the worker process died (killed, OOM, node lost)
            self._drop_worker(task.worker)
            self.report.workers_lost += 1
            self._failed(task.shard, f"worker {task.worker.index} died ({type(e).__name__})", retry)
            return
        # The stats file is the truth, not the worker's word: read it back before counting the shard.
        stats = read_stats(self.store, task.shard)
        if stats is None or stats.get("sha256") != result["sha256"]:
            self._failed(task.shard, "its stats file is missing or disagrees after the commit", retry)
            return
        self.durations.append(time.monotonic() - task.started)
        self.attempts.pop(task.shard, None)
        self.report.shards += 1
        self.report.images += int(stats["count"])
        if self.progress is not None:
            self.progress.advance(int(stats["count"]))
        for other_ref, other in list(self.tasks.items()):
            if other.shard == task.shard:  # the losing copy of a re-issued straggler
                self._kill_loser(other_ref, other, retry)

    def _kill_loser(self, ref: Any, task: _Task, retry: deque[int]) -> None:
        del self.tasks[ref]
        log.info("shard %06d committed by another worker; stopping worker %d", task.shard, task.worker.index)
        self._drop_worker(task.worker, kill=True)
        self.report.workers_lost += 1
        self.ray.wait([ref], timeout=30)  # let the kill land before judging the shard
        # Identical bytes make a second commit a no-op; if they differed (heterogeneous devices) the killed
        # copy may have un-committed the winner's shard: check, and regenerate it then.
        if shard_problem(self.store, task.shard) is not None:
            self._failed(task.shard, "the straggler's copy left it uncommitted", retry)

    def _failed(self, shard: int, why: str, retry: deque[int]) -> None:
        if any(t.shard == shard for t in self.tasks.values()):
            return  # its other copy is still running
        n = self.attempts[shard] = self.attempts.get(shard, 0) + 1
        self.report.failed_attempts += 1
        if len(self.report.failures) < 100:
            self.report.failures.append(f"shard {shard:06d}: {why}")
        if n > self.dist.max_retries:
            raise TckrError(
                f"shard {shard:06d} failed {n} times (last: {why}); committed shards are kept: rerun the "
                "same command to resume, or raise --max-retries"
            )
        log.warning(
            "shard %06d failed (attempt %d of %d): %s; retrying", shard, n, self.dist.max_retries + 1, why
        )
        retry.append(shard)

    def _straggler(self) -> int | None:
        """The longest-running shard with a single copy, if it exceeds factor x the median shard time."""
        if not self.durations:
            return None
        limit = self.dist.straggler_factor * statistics.median(self.durations)
        now = time.monotonic()
        copies: dict[int, int] = {}
        for t in self.tasks.values():
            copies[t.shard] = copies.get(t.shard, 0) + 1
        slow = [t for t in self.tasks.values() if copies[t.shard] == 1 and now - t.started > limit]
        if not slow:
            return None
        task = min(slow, key=lambda t: t.started)
        log.warning(
            "shard %06d has run %.1f s on worker %d (median shard %.1f s): re-issuing it",
            task.shard,
            now - task.started,
            task.worker.index,
            statistics.median(self.durations),
        )
        self.report.stragglers_reissued += 1
        return task.shard

    def _dispatch(self, todo: _Lookahead, retry: deque[int]) -> None:
        for worker in self.workers:
            if worker.pid is None or worker.busy:
                continue
            shard = retry.popleft() if retry else todo.pop()
            if shard is None:
                shard = self._straggler()  # no new work: a second copy of a slow shard, if any
            if shard is None:
                return
            worker.busy = True
            self.tasks[worker.actor.generate.remote(shard)] = _Task(shard, worker, time.monotonic())

    # --- the loop ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the pool and wait until every worker has loaded the model (benchmarks time what follows)."""
        while len(self.workers) < self.n_workers:
            self._start_worker()
        while self.starting:
            done, _ = self.ray.wait(list(self.starting), num_returns=1)
            self._on_loaded(done[0])

    def run(self, shard_ids: Iterable[int]) -> RayReport:
        """Generate every shard of `shard_ids` (an iterator is consumed lazily); returns the report."""
        t0 = time.monotonic()
        todo, retry = _Lookahead(shard_ids), deque()
        log.info(
            "Ray: %d workers x (%g CPU, %g GPU) on a cluster with %s",
            self.n_workers,
            self.cpus,
            self.gpus,
            {k: v for k, v in self.ray.cluster_resources().items() if k in ("CPU", "GPU")},
        )
        try:
            while True:
                work_left = bool(retry) or not todo.empty
                while work_left and len(self.workers) < self.n_workers:
                    self._start_worker()  # the first pool, and replacements for lost workers
                self._dispatch(todo, retry)
                if not self.tasks and not work_left:
                    break
                self._check_start_timeout()
                done, _ = self.ray.wait([*self.tasks, *self.starting], num_returns=1, timeout=POLL_SECONDS)
                for ref in done:
                    if ref in self.starting:
                        self._on_loaded(ref)
                    elif ref in self.tasks:  # not already settled as a straggler's loser
                        self._on_finished(ref, retry)
        finally:
            for worker in list(self.workers):
                self._drop_worker(worker, kill=True)
            self.starting.clear()
            self.tasks.clear()
        self.report.seconds = time.monotonic() - t0
        return self.report

    def _check_start_timeout(self) -> None:
        if any(w.pid is not None for w in self.workers):
            self._no_worker_since = None
            return
        now = time.monotonic()
        self._no_worker_since = self._no_worker_since or now
        if now - self._no_worker_since > START_TIMEOUT:
            raise TckrError(
                f"no Ray worker could start in {START_TIMEOUT:.0f} s (each needs {self.cpus:g} CPU, "
                f"{self.gpus:g} GPU); check the cluster's free resources"
            )


def generate_on_ray(
    run: dict[str, Any],
    store: Store,
    shard_ids: Iterable[int],
    dist: Distribution,
    *,
    writers: int = 2,
    progress: Any = None,
) -> RayReport:
    """Connect to Ray (`dist.ray_address`, or the running/new local cluster), run the shards, disconnect."""
    ray = import_ray()
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=dist.ray_address, logging_level=logging.WARNING)
    try:
        report = RayDriver(run, store, dist, writers=writers, progress=progress).run(shard_ids)
    finally:
        if started_here:
            ray.shutdown()
    log.info(
        "Ray: %d shards (%d images) in %.1f s; %d workers started, %d lost, %d failed attempts, "
        "%d stragglers re-issued",
        report.shards,
        report.images,
        report.seconds,
        report.workers_started,
        report.workers_lost,
        report.failed_attempts,
        report.stragglers_reissued,
    )
    return report
