"""How a run's shards are spread over processes: in-process, a Ray actor pool, or rank-strided ranks.

None of this is part of the run spec: a shard's bytes are a pure function of (spec, shard id), so the same
spec gives the same folder whichever way the shards were distributed (DESIGN.md "Scale-out").

Rank-strided mode (torchrun, SLURM `srun`, or any launcher that starts W copies of the same command): rank r
writes shards r, r + W, r + 2W, ... Rank 0 prepares the folder (run.json); the other ranks wait for a
run.json with their spec. The last rank to finish writes index.json; `tckr-engine verify --write-index OUT`
checks every shard and writes it too (the merge step when ranks were cut short and rerun separately).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from tckr_engine.errors import TckrError

DISTRIBUTORS = ("local", "ray")  # img2dataset's word; "local" is in-process (rank-strided under a launcher)


@dataclass(frozen=True)
class Distribution:
    """Where the shards of a run are generated. Never recorded in run.json."""

    distributor: str = "local"  # local | ray
    rank: int = 0  # rank-strided mode: this process writes shards rank, rank + world_size, ...
    world_size: int = 1
    ray_address: str | None = None  # None: the running Ray cluster if any, else a new local one; "auto"
    workers: int | None = None  # Ray actors; None: as many as the cluster's CPUs (or GPUs) can hold
    gpus_per_worker: float | None = None  # None: 1 on cuda, 0 on cpu
    max_retries: int = 3  # attempts per shard after the first; a worker death counts as a failed attempt
    straggler_factor: float = 3.0  # re-issue a shard running longer than this x the median shard time
    wait_seconds: float = 600.0  # ranks > 0: how long to wait for rank 0 to write run.json

    def validate(self) -> Distribution:
        if self.distributor not in DISTRIBUTORS:
            raise TckrError(f"distributor must be one of {', '.join(DISTRIBUTORS)}; got {self.distributor!r}")
        if self.world_size < 1 or not 0 <= self.rank < self.world_size:
            raise TckrError(
                f"rank {self.rank} is not in [0, world size {self.world_size}); check --rank/--world-size "
                "or RANK/WORLD_SIZE (SLURM_PROCID/SLURM_STEP_NUM_TASKS)"
            )
        if self.world_size > 1 and self.distributor == "ray":
            raise TckrError(
                f"--distributor ray under a launcher with world size {self.world_size}: run one driver "
                "(--world-size 1) and let Ray spread the shards, or drop --distributor ray"
            )
        if self.distributor != "ray" and (self.ray_address or self.workers or self.gpus_per_worker):
            raise TckrError("--ray-address, --workers and --gpus-per-worker need --distributor ray")
        if self.workers is not None and self.workers < 1:
            raise TckrError(f"workers must be a positive integer, got {self.workers}")
        if self.gpus_per_worker is not None and self.gpus_per_worker < 0:
            raise TckrError(f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        if self.max_retries < 0:
            raise TckrError(f"max_retries must be >= 0, got {self.max_retries}")
        if self.straggler_factor <= 1:
            raise TckrError(f"straggler_factor must be > 1, got {self.straggler_factor}")
        return self

    @property
    def strided(self) -> bool:
        return self.world_size > 1

    def owns(self, shard: int) -> bool:
        return shard % self.world_size == self.rank


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise TckrError(f"environment variable {name}={env[name]!r} is not an integer") from None


def world_from_env(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) outside a launcher.

    torchrun: RANK / WORLD_SIZE. SLURM: SLURM_PROCID with SLURM_STEP_NUM_TASKS, which only `srun` sets — a
    batch script also sees SLURM_NTASKS and SLURM_PROCID=0, and taking those would make a plain `sbatch`
    job silently write 1/N of the dataset (SLURM_NTASKS is used only inside a step, SLURM_STEP_ID set).
    """
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return _int(env, "RANK") if "RANK" in env else 0, _int(env, "WORLD_SIZE")
    if "SLURM_PROCID" in env:
        if "SLURM_STEP_NUM_TASKS" in env:
            return _int(env, "SLURM_PROCID"), _int(env, "SLURM_STEP_NUM_TASKS")
        if "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
            return _int(env, "SLURM_PROCID"), _int(env, "SLURM_NTASKS")
    return 0, 1


def pick_local_gpu(env: Mapping[str, str] | None = None) -> None:
    """Rank-strided on a multi-GPU node: use GPU LOCAL_RANK (torchrun) or SLURM_LOCALID (srun).

    A no-op with one visible GPU (srun --gpus-per-task 1 already narrows CUDA_VISIBLE_DEVICES) or none.
    """
    import torch

    env = os.environ if env is None else env
    name = next((n for n in ("LOCAL_RANK", "SLURM_LOCALID") if n in env), None)
    if name is not None and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(_int(env, name) % torch.cuda.device_count())


def strided_ranges(pending: Iterator[int], world_size: int) -> list[range]:
    """Collapse increasing shard ids (one rank's: equal to rank mod world_size) into ranges of step W.

    A fresh run is one range whatever its size; a resume holds one range per gap, so the driver never keeps
    a list of every shard.
    """
    ranges: list[range] = []
    start = last = None
    for shard in pending:
        if last is not None and shard == last + world_size:
            last = shard
            continue
        if start is not None:
            ranges.append(range(start, last + 1, world_size))
        start = last = shard
    if start is not None:
        ranges.append(range(start, last + 1, world_size))
    return ranges


def distribution_from_options(
    backend: str | None,
    distributor: str | None = None,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    env: Mapping[str, str] | None = None,
    **ray_options: object,
) -> tuple[Distribution, str | None]:
    """The CLI's options -> (Distribution, denoiser backend).

    `--backend ray` is an alias: the Ray distributor with the default (torch) denoiser, as the issue spells
    the command. Rank and world size come from the flags, else the launcher's environment.
    """
    if backend == "ray":
        if distributor not in (None, "ray"):
            raise TckrError(
                f"--backend ray means --distributor ray; it conflicts with --distributor {distributor}"
            )
        backend, distributor = None, "ray"
    env_rank, env_world = world_from_env(env)
    dist = Distribution(
        distributor=distributor or "local",
        rank=env_rank if rank is None else rank,
        world_size=env_world if world_size is None else world_size,
        **ray_options,  # type: ignore[arg-type]
    )
    return dist.validate(), backend
