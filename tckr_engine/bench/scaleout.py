"""Scale-out measurements on a local Ray cluster: images/sec per worker count, and the driver's memory.

Every speed row carries its quality check: the Ray run's shards are compared byte for byte with the same
spec generated in-process. Results (with CPU count, load average, versions and git sha) go to a JSON file.

    python -m tckr_engine.bench.scaleout throughput --workers 1,2 --out docs/results/scaleout-throughput.json
    python -m tckr_engine.bench.scaleout driver-memory --num-images 10000,1000000 \\
        --out docs/results/scaleout-driver-memory.json

`throughput` starts the worker pool and waits until every worker has loaded the model, then times the
shards (the steady-state number the issue asks for); the end-to-end time with model loading is reported
beside it. `driver-memory` runs the real `generate()` path with the Ray distributor on a trivial model
(tiny-digits, 8x8, one step, no guidance) and records the driver process's peak Python heap (tracemalloc)
and resident set size sampled during the run, for each image count, after an unreported warm-up run.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import resource
import shutil
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

from tckr_engine.config import GenerateConfig
from tckr_engine.engine.distributed import Distribution

log = logging.getLogger(__name__)


def _tar_digests(out: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "shards").glob("*.tar"))
    }


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _config(cfg: GenerateConfig) -> dict[str, Any]:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"}


def _context() -> dict[str, Any]:
    import ray

    from tckr_engine.bench.kernels import git_sha
    from tckr_engine.engine.spec import versions

    return {
        "cpu_count": os.cpu_count(),
        "ray_cluster": {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")},
        "load_average_1m_at_start": os.getloadavg()[0],
        "versions": {**versions(), "ray": ray.__version__},
        "git_sha": git_sha(),
    }


def throughput(cfg: GenerateConfig, workers: list[int], scratch: Path) -> dict[str, Any]:
    """images/sec in-process and with each Ray pool size, for the same spec; shards compared to local."""
    from tckr_engine.engine.generate import generate, prepare_folder
    from tckr_engine.engine.ray_backend import RayDriver
    from tckr_engine.engine.shards import write_index
    from tckr_engine.engine.spec import resolve
    from tckr_engine.engine.store import open_store

    local = scratch / "local"
    summary = generate(cfg, local)
    reference = _tar_digests(local)
    rows = [
        {
            "mode": "in-process (no Ray)",
            "workers": 1,
            "images": summary.generated,
            "seconds": round(summary.seconds, 2),
            "images_per_second": round(summary.images_per_second, 2),
        }
    ]
    log.info("in-process: %.2f images/s", summary.images_per_second)
    for n in workers:
        out = scratch / f"ray-{n}"
        run, _ = resolve(cfg)
        prepare_folder(out, run, overwrite=False)
        driver = RayDriver(run, open_store(out), Distribution("ray", workers=n).validate())
        load_avg = os.getloadavg()[0]
        t0 = time.perf_counter()
        driver.start()
        t_loaded = time.perf_counter()
        report = driver.run(range(run["num_shards"]))
        t_end = time.perf_counter()
        write_index(out, run["num_shards"])
        rate = report.images / (t_end - t_loaded)
        rows.append(
            {
                "mode": "ray",
                "workers": n,
                "images": report.images,
                "seconds": round(t_end - t_loaded, 2),
                "images_per_second": round(rate, 2),
                "seconds_with_model_loading": round(t_end - t0, 2),
                "images_per_second_with_model_loading": round(report.images / (t_end - t0), 2),
                "load_average_1m_before": load_avg,
                "identical_to_in_process": _tar_digests(out) == reference,
                "failed_attempts": report.failed_attempts,
                "stragglers_reissued": report.stragglers_reissued,
            }
        )
        log.info(
            "ray x%d: %.2f images/s after loading (identical: %s)",
            n,
            rate,
            rows[-1]["identical_to_in_process"],
        )
        shutil.rmtree(out)
    shutil.rmtree(local)
    one = next((r["images_per_second"] for r in rows if r["mode"] == "ray" and r["workers"] == 1), None)
    for r in rows:
        if r["mode"] == "ray" and one:
            r["speedup_vs_1_worker"] = round(r["images_per_second"] / one, 2)
    return {"config": _config(cfg), "rows": rows}


def driver_memory(cfg: GenerateConfig, counts: list[int], workers: int, scratch: Path) -> dict[str, Any]:
    """Driver memory of the real Ray `generate()` path for each image count (same process, in order).

    A warm-up run (2 shards, not reported) first, so imports and first-call caches do not land on the
    first measured count.
    """
    from tckr_engine.engine.generate import generate

    warm = scratch / "warm-up"
    generate(dataclasses.replace(cfg, num_images=2 * cfg.shard_size), warm, distribution=Distribution("ray"))
    shutil.rmtree(warm)
    rows = []
    for n in counts:
        out = scratch / f"mem-{n}"
        samples: list[float] = []
        stop = threading.Event()

        def sample(samples: list[float] = samples, stop: threading.Event = stop) -> None:
            while not stop.wait(0.2):
                samples.append(_rss_mb())

        rss_before = _rss_mb()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        tracemalloc.start()
        try:
            summary = generate(
                dataclasses.replace(cfg, num_images=n),
                out,
                distribution=Distribution("ray", workers=workers),
            )
            _, heap_peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            stop.set()
            sampler.join()
        rows.append(
            {
                "num_images": n,
                "shards": summary.shards,
                "images_committed": summary.images,
                "seconds": round(summary.seconds, 1),
                "images_per_second": round(summary.images_per_second, 1),
                "driver_python_heap_peak_mb": round(heap_peak / 2**20, 2),
                "driver_rss_before_mb": round(rss_before, 1),
                "driver_rss_peak_during_run_mb": round(max(samples, default=rss_before), 1),
                "driver_ru_maxrss_mb_so_far": round(
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
                ),
            }
        )
        log.info("%s", rows[-1])
        shutil.rmtree(out)
    return {"config": _config(cfg), "workers": workers, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description="Ray scale-out: images/sec per worker count, driver memory.")
    parser.add_argument("what", choices=["throughput", "driver-memory"])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--workers", default=None, help="throughput: comma list (default 1,2); memory: one")
    parser.add_argument("--num-images", default=None, help="throughput 512; memory: comma list")
    parser.add_argument("--model", default=None)
    parser.add_argument("--dataset", default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--threads", type=int, default=1, help="per worker (recorded in the spec)")
    parser.add_argument("--num-cpus", type=int, default=None, help="Ray cluster CPUs (default: all)")
    parser.add_argument("--scratch", default=None, help="where the shards go (deleted after each run)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("tckr_engine").setLevel(logging.INFO)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    import ray

    memory = args.what == "driver-memory"
    defaults = (
        dict(model="tiny-digits", dataset="digits", batch_size=1000, shard_size=1000, steps=1, guidance=1.0)
        if memory
        else dict(
            model="fmnist", dataset="fashion-mnist", batch_size=64, shard_size=64, steps=20, guidance=2.0
        )
    )
    given = dict(
        model=args.model,
        dataset=args.dataset,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        steps=args.steps,
        guidance=args.guidance,
    )
    settings = {**defaults, **{k: v for k, v in given.items() if v is not None}}
    counts = [int(x) for x in (args.num_images or ("10000,1000000" if memory else "512")).split(",")]
    cfg = GenerateConfig(num_images=counts[0], threads=args.threads, device="cpu", **settings).validate()
    if args.scratch:
        Path(args.scratch).mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="tckr-scaleout-", dir=args.scratch))
    ray.init(num_cpus=args.num_cpus or os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING)
    try:
        context = _context()
        if memory:
            result = driver_memory(cfg, counts, int(args.workers or 2), scratch)
        else:
            result = throughput(cfg, [int(w) for w in (args.workers or "1,2").split(",")], scratch)
    finally:
        ray.shutdown()
        shutil.rmtree(scratch, ignore_errors=True)
    payload = {"what": args.what, **context, **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1, default=str) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    main()
