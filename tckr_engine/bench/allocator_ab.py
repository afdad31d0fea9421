"""A/B of `allocator.keep_freed_memory`: whole CLI commands with it on and off, alternated.

Each round runs, in fresh processes (a process's malloc state is what is being compared, so the two sides
cannot share one), `tckr-engine generate` of the demo's embedded Fashion-MNIST generator and then
`tckr-engine train` of a student on those shards, once with `TCKR_KEEP_FREED_MEMORY=1` (the default) and
once with `=0`, alternating which goes first. Per command: wall seconds, the child's minor page faults
and peak resident size (its own `rusage`, from `os.wait4`), the shards' sha256 (generate) or the
student's test accuracy (train): the setting must change neither.

    python -m tckr_engine.bench.allocator_ab --out docs/bench/allocator/ab.json      # ~8 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tckr_engine.allocator import ENV
from tckr_engine.bench.contenders import files_digest
from tckr_engine.bench.kernels import git_sha
from tckr_engine.engine.spec import versions

log = logging.getLogger(__name__)


def timed_command(args: list[str], keep: bool) -> dict[str, Any]:
    """Run `tckr-engine ARGS` with the allocator setting on or off: wall seconds, and from the child's own
    resource usage (`os.wait4`) its minor page faults and peak resident size."""
    env = {**os.environ, ENV: "1" if keep else "0"}
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tckr_engine.cli", *args], env=env, stdout=subprocess.DEVNULL, stderr=err
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read()[-2000:].decode(errors="replace")
            raise RuntimeError(f"tckr-engine {' '.join(args)} failed:\n{tail}")
    return {
        "seconds": round(seconds, 2),
        "minor_faults": usage.ru_minflt,
        "max_rss_mb": round(usage.ru_maxrss / 1024),  # KiB on Linux
    }


def run_ab(work: Path, rounds: int, images: int, epochs: int, threads: int) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    for r in range(rounds):
        for keep in (True, False) if r % 2 == 0 else (False, True):
            gen = work / f"gen-{r}-{int(keep)}"
            shutil.rmtree(gen, ignore_errors=True)
            g = timed_command(
                ["generate", "--shards", str(gen), "--model", "fmnist", "--dataset", "fashion-mnist",
                 "--num-images", str(images), "--batch-size", "100", "--steps", "20", "--guidance", "2",
                 "--threads", str(threads)],
                keep,
            )  # fmt: skip
            shards = files_digest(gen / "shards", "*.tar")
            g.update(command="generate", keep=keep, round=r, shards_sha256=shards)
            g["images_per_s"] = round(images / g["seconds"], 3)  # model loading included
            log.info("%s", g)
            student = work / f"student-{r}-{int(keep)}"
            t = timed_command(
                ["train", "--shards", str(gen), "--out", str(student), "--labels", "hard",
                 "--epochs", str(epochs), "--threads", str(threads), "--overwrite"],
                keep,
            )  # fmt: skip
            metrics = json.loads((student / "metrics.json").read_text())
            t.update(command="train", keep=keep, round=r, test_acc=metrics.get("test_accuracy"))
            log.info("%s", t)
            runs += [g, t]

    def median(command: str, keep: bool, key: str) -> float:
        values = [x[key] for x in runs if x["command"] == command and x["keep"] is keep]
        return round(statistics.median(values), 3)

    summary = {
        command: {
            "seconds_keep": median(command, True, "seconds"),
            "seconds_default": median(command, False, "seconds"),
            "speedup": round(median(command, False, "seconds") / median(command, True, "seconds"), 3),
            "minor_faults_keep": median(command, True, "minor_faults"),
            "minor_faults_default": median(command, False, "minor_faults"),
            "max_rss_mb_keep": median(command, True, "max_rss_mb"),
            "max_rss_mb_default": median(command, False, "max_rss_mb"),
        }
        for command in ("generate", "train")
    }
    identical = len({x["shards_sha256"] for x in runs if x["command"] == "generate"}) == 1
    same_acc = len({x["test_acc"] for x in runs if x["command"] == "train"}) == 1
    return {
        "runs": runs,
        "summary": summary,
        "shards_identical": identical,
        "student_test_acc_identical": same_acc,
        "config": {"rounds": rounds, "images": images, "epochs": epochs, "threads": threads},
        "meta": {
            "platform": platform.platform(),
            "libc": list(platform.libc_ver()),
            "cpu_count": os.cpu_count(),
            "versions": versions(),
            "git_sha": git_sha(),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="generate + train with and without keep_freed_memory.")
    parser.add_argument("--out", type=Path, required=True, help="JSON file for the results.")
    parser.add_argument("--work", type=Path, default=Path("/tmp/tckr-allocator-ab"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run_ab(args.work, args.rounds, args.images, args.epochs, args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    log.info("summary: %s", json.dumps(result["summary"]))


if __name__ == "__main__":
    main()
