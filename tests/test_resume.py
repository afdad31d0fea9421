"""A real `tckr-engine generate` killed with SIGKILL mid-run, then rerun, gives byte-identical shards."""

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import tiny_config

from tckr_engine.engine.generate import generate, verify

KW = dict(num_images=256, shard_size=16, batch_size=16, steps=20)
ARGS = [
    "--model",
    "tiny-digits",
    "--dataset",
    "digits",
    "--num-images",
    "256",
    "--shard-size",
    "16",
    "--batch-size",
    "16",
    "--steps",
    "20",
    "--threads",
    "1",
]


def cli_command(out):
    return [sys.executable, "-m", "tckr_engine.cli", "generate", "--shards", str(out), *ARGS]


def tars(out):
    return {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}


@pytest.mark.slow
def test_sigkill_then_rerun_is_byte_identical(tmp_path):
    reference = tmp_path / "reference"
    generate(tiny_config(**KW), reference)
    ref = tars(reference)
    assert len(ref) == 16

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cli_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    seen_partial = []
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            committed = list((out / "shards").glob("*_stats.json")) if (out / "shards").exists() else []
            # Any tar under its final name must already be complete: byte-equal to the reference.
            for path in (out / "shards").glob("*.tar") if (out / "shards").exists() else []:
                try:
                    data = path.read_bytes()
                except FileNotFoundError:
                    continue
                if data != ref[path.name]:
                    seen_partial.append(path.name)
            if len(committed) >= 3:
                break
            assert proc.poll() is None, proc.stderr.read().decode()
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not seen_partial, f"partial shards visible under their final names: {seen_partial}"
    done_before = len(list((out / "shards").glob("*_stats.json")))
    assert 3 <= done_before < 16, "the kill must land mid-run"
    for name, data in tars(out).items():
        assert data == ref[name], f"{name} committed before the kill differs from the reference"

    rerun = subprocess.run(cli_command(out), capture_output=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr.decode()
    summary = re.search(r"\((\d+) generated in", " ".join(rerun.stderr.decode().split()))
    assert summary is not None and int(summary.group(1)) == 256 - 16 * done_before  # only the missing shards
    assert tars(out) == ref
    assert verify(out) == []
    assert not list(out.rglob("*.tmp"))
