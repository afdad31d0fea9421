"""Rank-strided generation (torchrun / srun) as real processes, fsspec outputs, and the commit protocol."""

import json
import os
import subprocess
import sys
import uuid

import fsspec
import pytest
from conftest import TINY, tiny_config

from tckr_engine.engine.distributed import (
    Distribution,
    distribution_from_options,
    strided_ranges,
    world_from_env,
)
from tckr_engine.engine.generate import (
    generate,
    pending_ranges,
    prepare_folder,
    read_run,
    verify,
    wait_for_run,
)
from tckr_engine.engine.shards import commit_shard, read_stats, remove_temp_files
from tckr_engine.engine.spec import resolve
from tckr_engine.engine.store import Store
from tckr_engine.errors import TckrError

TINY_ARGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


def tars(out):
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


def store_tars(url):
    fs, root = fsspec.core.url_to_fs(url)
    return {p.rsplit("/", 1)[1]: fs.cat_file(p) for p in sorted(fs.glob(f"{root}/shards/*.tar"))}


# --- launcher environments -------------------------------------------------------------------------------


def test_world_from_env():
    assert world_from_env({}) == (0, 1)
    assert world_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)  # torchrun
    srun = {"SLURM_PROCID": "2", "SLURM_STEP_NUM_TASKS": "8", "SLURM_NTASKS": "8", "SLURM_STEP_ID": "0"}
    assert world_from_env(srun) == (2, 8)
    # A batch script sees SLURM_NTASKS and SLURM_PROCID=0 but is one process: it must not write 1/N.
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8", "SLURM_JOB_ID": "7"}) == (0, 1)
    # torchrun under srun: torchrun's global rank wins.
    assert world_from_env({**srun, "RANK": "5", "WORLD_SIZE": "16"}) == (5, 16)
    with pytest.raises(TckrError, match="WORLD_SIZE='two' is not an integer"):
        world_from_env({"WORLD_SIZE": "two"})


def test_distribution_options_and_the_backend_ray_alias():
    dist, backend = distribution_from_options("ray", env={})
    assert dist.distributor == "ray" and backend is None  # --backend ray: Ray with the torch denoiser
    dist, backend = distribution_from_options("onnxruntime", "ray", env={}, workers=3)
    assert (dist.distributor, dist.workers, backend) == ("ray", 3, "onnxruntime")
    dist, _ = distribution_from_options(None, env={"RANK": "1", "WORLD_SIZE": "2"})
    assert (dist.rank, dist.world_size, dist.strided) == (1, 2, True)
    assert [s for s in range(7) if dist.owns(s)] == [1, 3, 5]
    dist, _ = distribution_from_options(None, env={"RANK": "1", "WORLD_SIZE": "2"}, rank=0, world_size=1)
    assert not dist.strided  # explicit flags win over the environment
    with pytest.raises(TckrError, match="conflicts with --distributor local"):
        distribution_from_options("ray", "local", env={})
    with pytest.raises(TckrError, match="need --distributor ray"):
        distribution_from_options(None, env={}, ray_address="auto")
    with pytest.raises(TckrError, match="rank 2 is not in"):
        distribution_from_options(None, env={}, rank=2, world_size=2)
    with pytest.raises(TckrError, match="world size 2"):
        distribution_from_options(None, "ray", env={"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(TckrError, match="distributor must be one of local, ray"):
        Distribution("spark").validate()


def test_strided_ranges_hold_one_entry_per_gap():
    assert strided_ranges(iter(range(1, 2_000_001, 2)), 2) == [range(1, 2_000_001, 2)]
    assert strided_ranges(iter([0, 3, 6, 12, 15]), 3) == [range(0, 7, 3), range(12, 16, 3)]
    assert strided_ranges(iter([]), 4) == []


# --- rank-strided: two real processes ----------------------------------------------------------------


def cli_generate(out, rank, world, extra=()):
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "LOCAL_RANK"))
    }
    env.update(RANK=str(rank), WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tckr_engine.cli", "generate", "--shards", str(out), *TINY_ARGS, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_rank_strided_world_size_2_gives_the_same_dataset(cli, tiny_run, tmp_path):
    out = tmp_path / "ranks"
    procs = [cli_generate(out, rank, 2) for rank in (1, 0)]  # rank 1 first: it must wait for rank 0
    results = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, results, strict=True):
        assert p.returncode == 0, err
    err1, err0 = results[0][1], results[1][1]
    # 3 shards of (40, 40, 20): rank 0 writes shards 0 and 2, rank 1 writes shard 1.
    assert "60 images in 2 shards (rank 0 of 2)" in err0 and "40 images in 1 shards (rank 1 of 2)" in err1
    assert tars(out) == tars(tiny_run)
    ours, reference = (
        json.loads((out / "run.json").read_text()),
        json.loads((tiny_run / "run.json").read_text()),
    )
    assert ours["spec"] == reference["spec"]  # the distribution is not part of the spec
    assert (out / "index.json").read_text() == (tiny_run / "index.json").read_text()  # the last rank wrote it
    assert verify(out) == [] and not list(out.rglob("*.tmp"))

    # The merge step when ranks ran separately: verify --write-index rebuilds the index after checking.
    (out / "index.json").unlink()
    assert [name for name, _ in verify(out)] == ["index.json"]
    check = cli("verify", out, "--write-index")
    assert check.code == 0 and "index.json written" in check.err, check.err
    assert (out / "index.json").read_text() == (tiny_run / "index.json").read_text() and verify(out) == []


def test_a_rank_writes_only_its_shards_and_no_index(tiny_run, tmp_path):
    out = tmp_path / "half"
    summary = generate(tiny_config(), out, distribution=Distribution(rank=0, world_size=2))
    assert sorted(tars(out)) == ["000000.tar", "000002.tar"] and summary.images == 60
    assert not (out / "index.json").exists()
    assert [n for n, _ in verify(out)] == ["shards/000001.tar", "index.json"]
    summary = generate(tiny_config(), out, distribution=Distribution(rank=1, world_size=2))
    assert summary.generated == 40 and tars(out) == tars(tiny_run) and verify(out) == []


def test_ranks_above_zero_wait_for_rank_0(tiny_run, tmp_path):
    run, _ = resolve(tiny_config())
    with pytest.raises(TckrError, match="rank 0 writes it"):
        wait_for_run(tmp_path / "empty", run, overwrite=False, timeout=0.2)
    other, _ = resolve(tiny_config(seed=5))
    with pytest.raises(TckrError, match=r"different run \(changed: seed\)"):
        wait_for_run(tiny_run, other, overwrite=False, timeout=0.2)
    wait_for_run(tiny_run, read_run(tiny_run), overwrite=False, timeout=0.2)  # same spec: returns at once


def test_pending_ranges_of_a_rank(tiny_run, tmp_path):
    run = read_run(tiny_run)
    assert pending_ranges(tiny_run, run) == []
    empty = tmp_path / "fresh"
    prepare_folder(empty, run, overwrite=False)
    assert pending_ranges(empty, run) == [range(0, 3)]
    assert pending_ranges(empty, run, Distribution(rank=1, world_size=2)) == [range(1, 2, 2)]


# --- fsspec stores and the commit protocol ----------------------------------------------------------


@pytest.fixture
def memory_url():
    url = f"memory://tckr-{uuid.uuid4().hex[:8]}/out"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.mark.parametrize("rename", [True, False], ids=["rename", "put-then-stats"])
def test_memory_url_gives_the_same_shards(tiny_run, memory_url, rename):
    store = Store(memory_url, rename=rename)
    summary = generate(tiny_config(), store)
    assert summary.out == memory_url.replace("memory://", "memory:///") and summary.images == 100
    assert store_tars(memory_url) == tars(tiny_run)
    assert json.loads(store.read_bytes("index.json")) == json.loads((tiny_run / "index.json").read_text())
    assert verify(memory_url) == []
    assert not [n for n in store.listdir("shards") + store.listdir() if n.endswith(".tmp")]
    # resume through the URL: a stats file removed means exactly that shard is regenerated
    store.remove("shards/000001_stats.json")
    assert [n for n, _ in verify(memory_url)] == ["shards/000001.tar", "index.json"]
    assert generate(tiny_config(), memory_url).generated == 40 and verify(memory_url) == []
    assert store_tars(memory_url) == tars(tiny_run)


def test_file_url_and_cli(cli, tiny_run, tmp_path):
    url = f"file://{tmp_path}/viaurl"
    result = cli("generate", "--shards", url, *TINY_ARGS)
    assert result.code == 0, result.err
    assert tars(tmp_path / "viaurl") == tars(tiny_run)
    assert cli("verify", url).code == 0


def test_commit_of_identical_bytes_leaves_the_commit_alone(memory_url):
    store = Store(memory_url)
    store.makedirs("shards")
    commit_shard(store, 0, b"x" * 1024, 1, seconds=5.0)
    # A straggler's second copy commits the same bytes: the first commit (its stats file) stays as it was.
    commit_shard(store, 0, b"x" * 1024, 1, seconds=9.0)
    assert read_stats(store, 0)["seconds"] == 5.0
    # Different bytes replace the shard and its marker.
    commit_shard(store, 0, b"y" * 512, 1, seconds=7.0)
    assert read_stats(store, 0)["bytes"] == 512 and store.read_bytes("shards/000000.tar") == b"y" * 512


def test_temp_sweep_of_one_rank_spares_the_others(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    names = [".000000.tar.aa.tmp", ".000001.tar.bb.tmp", ".000002_stats.json.cc.tmp", ".000003.tar.tmp"]
    for name in names:
        (shards / name).write_bytes(b"partial")
    (tmp_path / ".index.json.dd.tmp").write_bytes(b"partial")
    remove_temp_files(tmp_path, owns=lambda shard: shard % 2 == 0)
    assert sorted(p.name for p in shards.iterdir()) == [".000001.tar.bb.tmp", ".000003.tar.tmp"]
    assert (tmp_path / ".index.json.dd.tmp").exists()  # folder-level temp files belong to no rank
    remove_temp_files(tmp_path)
    assert not list(tmp_path.rglob("*.tmp"))
