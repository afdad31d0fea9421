"""`tckr-engine bench`: a seconds-long run writes CSV / JSON / plot, the engine's images equal the diffusers
baseline's, unavailable backends get a row saying why; the SD pipeline baseline; FLOP counting; bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tckr_engine.bench.flops import PeakMemory, device_peak, generation_flops, unet_flops
from tckr_engine.bench.results import format_markdown
from tckr_engine.bench.throughput import BenchConfig, format_table, run_bench
from tckr_engine.errors import TckrError
from tckr_engine.models.generator import build_preset
from tckr_engine.train.stream import loader_in_process


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("TCKR_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "tckr-cache"))


def test_cli_bench_writes_results_and_engine_matches_baseline(cli, tmp_path):
    out = tmp_path / "bench"
    res = cli(
        "bench", "--preset", "tiny-digits", "--device", "cpu", "--batch-sizes", "8", "--steps", "2",
        "--images", "16", "--repeats", "2", "--threads", "1", "--backends", "torch,onnxruntime,tensorrt",
        "--attention", "sdpa,xformers", "--train-steps", "2", "--train-batch-size", "8",
        "--train-workers", "1", "--train-repeats", "3", "--note", "test run", "--out", out,
    )  # fmt: skip
    assert res.code == 0, res.err
    assert "b8 diffusers" in res.out and "b8 torch/sdpa" in res.out and "trainer-stream" in res.out
    assert "% of the fp32 matmul rate measured in this run" in res.out  # what %peak means on a CPU
    stem = out / "throughput-tiny-digits-cpu"
    assert {p.name for p in out.iterdir()} == {f"{stem.name}.{ext}" for ext in ("csv", "json", "png")}

    result = json.loads(stem.with_suffix(".json").read_text())
    meta = result["meta"]
    assert meta["device_type"] == "cpu" and meta["threads"] == 1 and meta["note"] == "test run"
    assert meta["versions"]["torch"] == torch.__version__ and meta["git_sha"]
    assert result["flops"]["flops_per_image"] > 0 and result["matmul"]["tflops"] > 0
    rows = {(r["kind"], r["backend"], r["attention"]): r for r in result["rows"]}

    base = rows[("generate", "diffusers", "sdpa")]
    for key in [("generate", "torch", "sdpa"), ("generate", "onnxruntime", "graph")]:
        row = rows[key]
        assert row["status"] == "ok" and row["images"] == 16 and row["repeats"] == 2
        assert row["max_abs_diff"] <= 1 and row["diff_pixels_pct"] < 1.0  # same seeds, same images
        assert row["repeats_identical"] is True  # byte-identical shards on every repeat
        assert row["ratio_to_baseline"] == pytest.approx(row["images_per_s"] / base["images_per_s"], rel=1e-3)
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
        assert row["ms_per_step"] > 0 and row["peak_mem_mb"] > 0 and row["warmup_s"] >= 0
        assert row["achieved_gflops_per_s"] > 0 and row["fraction_of_peak"] is None  # no peak table on CPU
    assert base["status"] == "ok" and base["repeats_identical"] is True and "PIL save" in base["notes"]
    assert rows[("generate", "tensorrt", "graph")]["status"].startswith("skipped: ")
    assert rows[("generate", "torch", "xformers")]["status"].startswith("skipped: ")
    stream, memory = rows[("train", "stream", "-")], rows[("train", "memory", "-")]
    assert stream["images_per_s"] > 0 and memory["images_per_s"] > 0 and stream["repeats"] == 3
    assert stream["images_per_s_min"] <= stream["images_per_s"] <= stream["images_per_s_max"]
    assert result["trainer"]["stream_vs_memory"] == stream["ratio_to_baseline"]
    loader = result["trainer"]["loader"]  # the loader alone: the ceiling of the stream row
    assert loader["samples"] >= stream["images"] and loader["samples_per_s"] > 0
    assert f"the loader alone {loader['samples_per_s']:.0f} samples/s" in stream["notes"]

    with stem.with_suffix(".csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(result["rows"]) and all(r["git_sha"] == meta["git_sha"] for r in table)

    # the targets are judged on the run, and not for tiny-digits: the CPU target is set at tiny-fmnist
    cpu_target, stream_target = result["targets"]
    assert cpu_target["met"] is None and "not tiny-fmnist" in cpu_target["why"]
    assert stream_target["met"] is None and "shown for reference" in stream_target["why"]
    assert "target: best backend with identical images" in res.out
    page = format_markdown(result)  # the page for docs/bench names every measured row
    assert "| b8 torch/sdpa |" in page and "| b8 onnxruntime/graph |" in page
    assert "- b8 tensorrt/graph: skipped: " in page and "| trainer-stream | " in page


def test_stable_diffusion_pipeline_baseline_matches_engine(tiny_sd, tmp_path):
    cfg = BenchConfig(
        preset=str(tiny_sd), dataset="digits", device="cpu", batch_sizes=(4,), steps=2, images=4,
        repeats=1, backends=("torch",), attention=("sdpa",), threads=1, train_steps=0,
    )  # fmt: skip
    result = run_bench(cfg, tmp_path)
    base, engine = result["rows"]
    assert "StableDiffusionPipeline" in base["notes"] and base["status"] == "ok"
    assert engine["status"] == "ok" and engine["max_abs_diff"] <= 1
    assert result["flops"]["decode_flops_per_image"] > 0 and result["trainer"] is None


def test_time_budget_stops_timed_rounds_and_skips_rows(tmp_path):
    """A spent budget: no new timed round (rows keep the rounds they finished), no new row, files written."""
    import time

    from tckr_engine.bench.contenders import BenchProgress, Budget, Contender, timed_rounds

    def slow(folder, on_batch):
        time.sleep(0.3)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "a.tar").write_bytes(b"x")

    for seconds, done in [(0.4, 1), (None, 3)]:  # 0.1 s left after round 1 < its 0.3 s: round 2 not started
        c = Contender("engine", "torch", "sdpa", run=slow)
        budget = Budget(seconds)
        timed_rounds([c], tmp_path / f"b{seconds}", 3, torch.device("cpu"), BenchProgress(), budget)
        assert len(c.seconds) == done and c.status == "ok"
        assert ("1 of 3 repeats (--time-budget)" in c.notes) == (seconds is not None)
        assert bool(budget.stopped) == (seconds is not None)

    cfg = BenchConfig(
        preset="tiny-digits", device="cpu", batch_sizes=(8,), steps=2, images=8, repeats=2,
        backends=("torch",), attention=("sdpa",), threads=1, train_steps=2, train_batch_size=8,
        time_budget_s=1e-6,
    )  # fmt: skip
    result = run_bench(cfg, tmp_path / "out")
    assert [r["status"] for r in result["rows"]] == [Budget(1e-6).skip_status()] * 3  # base, torch, trainer
    assert result["time_budget"] == {
        "seconds": 1e-6, "left_out": ["b=8 diffusers", "b=8 torch/sdpa", "the trainer row"]
    }  # fmt: skip
    assert all(Path(f).is_file() for f in result["files"].values())
    assert "--time-budget 1e-06 s left out: b=8 diffusers" in format_table(result)


def test_flop_count_matches_the_real_model():
    from torch.utils.flop_counter import FlopCounterMode

    gen = build_preset("tiny-digits")
    x, ctx = torch.randn(2, 1, 8, 8), torch.randn(2, 32, 384)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        gen.unet(x, torch.tensor(10), encoder_hidden_states=ctx)
    real = {str(k).removeprefix("aten."): v for k, v in counter.get_flop_counts()["Global"].items()}
    meta = unet_flops(gen, rows=2)
    for op in ("convolution", "addmm", "mm"):  # the CPU's fused attention kernel has no FLOP formula
        assert meta[op] == real[op]
    assert meta["bmm"] > 0  # attention, counted on the meta device
    total = generation_flops(gen, steps=3, cfg=True)
    assert total["flops_per_image"] == 6 * sum(unet_flops(gen, rows=1).values())
    # what the engine's key cache skips: to_k and to_v of every cross-attention layer, 2 of 3 steps x CFG
    kv = [m for n, m in gen.unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    per_row = sum(2 * 32 * m.in_features * m.out_features for m in kv)  # 32 text tokens
    assert kv and total["cross_kv_flops_skipped_per_image"] == 2 * 2 * per_row


def test_cpu_slicing_is_a_function_of_device_backend_and_threads(monkeypatch):
    from tckr_engine.engine.backends import CPU_ROWS_ENV, CPU_SIDE_BY_SIDE_ENV, cpu_slicing

    def slicing(device, backend, threads, unet_params=1_150_000):  # tiny-fmnist's UNet
        return cpu_slicing(device, backend, threads, unet_params=unet_params)

    assert slicing("cpu", "torch", 1) == {"rows": 32, "workers": 1}
    side_by_side = {"rows": 32, "workers": 2, "groups": "balanced"}  # a thread each, groups by balanced_part
    assert slicing("cpu", "torch", 2) == side_by_side and slicing("cpu", "onnxruntime", 2) == side_by_side
    assert slicing("cpu", "compile", 2) == {"rows": 64, "workers": 1}  # one slice on both threads
    assert slicing("cpu", "torch", 2, unet_params=860_000_000) == {"rows": 64, "workers": 1}  # SD-size
    assert slicing("cuda", "torch", 2) is None and slicing("cpu", "tensorrt", 2) is None
    monkeypatch.setenv(CPU_SIDE_BY_SIDE_ENV, "0")  # the A/B switch: one slice after another for every backend
    assert slicing("cpu", "onnxruntime", 2) == {"rows": 64, "workers": 1}
    monkeypatch.setenv(CPU_SIDE_BY_SIDE_ENV, "yes")
    with pytest.raises(TckrError, match=CPU_SIDE_BY_SIDE_ENV):
        slicing("cpu", "torch", 2)
    monkeypatch.delenv(CPU_SIDE_BY_SIDE_ENV)
    monkeypatch.setenv(CPU_ROWS_ENV, "0")  # the profiling switch: off
    assert slicing("cpu", "torch", 2) is None
    monkeypatch.setenv(CPU_ROWS_ENV, "8")
    assert slicing("cpu", "compile", 2) == {"rows": 16, "workers": 1}
    monkeypatch.setenv(CPU_ROWS_ENV, "many")
    with pytest.raises(TckrError, match=CPU_ROWS_ENV):
        slicing("cpu", "torch", 1)


def test_cpu_slices_keep_the_images():
    """Row slices, one after another or side by side on worker threads, give the whole batch's images."""
    from tckr_engine.engine.backends import MicroBatched, ParallelSlices, TorchDenoiser
    from tckr_engine.engine.sampler import denoise, initial_noise, make_scheduler

    spec = {"device": "cpu", "backend": "torch", "threads": 1}
    gen = build_preset("tiny-digits")
    whole = TorchDenoiser(spec, gen)
    sliced = MicroBatched(whole, 16)  # 40 images with guidance: 80 rows in slices of 16
    parallel = ParallelSlices([TorchDenoiser(spec, gen), TorchDenoiser(spec, gen)], 16)
    x, ctx, t = torch.randn(80, *gen.latent_shape), gen.text_encoder(["3"] * 80), torch.tensor(500)
    threads = torch.get_num_threads()
    with torch.inference_mode():
        out = parallel(x, t, ctx)
        assert out.is_inference()  # the caller's inference mode held in the worker threads
        small = parallel(x[:20], t, ctx[:20])  # fewer rows than 2 x 16: two slices of 10
        torch.set_num_threads(
            1
        )  # the workers' thread count: bitwise the same slices, whichever thread ran them
        try:
            assert torch.equal(out, sliced(x, t, ctx))
            assert torch.equal(small, MicroBatched(whole, 10)(x[:20], t, ctx[:20]))
        finally:
            torch.set_num_threads(threads)
    with torch.no_grad():
        assert not parallel(x, t, ctx).requires_grad
    cond, uncond = gen.text_encoder(["3"] * 40), gen.text_encoder([""])
    noise = initial_noise(list(range(40)), gen.latent_shape, torch.device("cpu"), torch.float32)
    images = []
    for model in (whole, sliced, parallel):
        sched = make_scheduler("dpm++", gen.schedule, "pixel")
        images.append(gen.decode(denoise(model, sched, noise * sched.init_noise_sigma, cond, uncond, 2.0, 3)))
    for other in images[1:]:  # 1 grey level: slices may round differently from one call on other threads
        assert (images[0].int() - other.int()).abs().max() <= 1


def test_engine_runs_groups_of_images_side_by_side_with_the_same_images():
    """Eager torch on 2 CPU threads: groups of images run whole sampling loops on the worker threads; the
    images are bitwise those of one loop over the batch whose UNet calls are cut into the same slices."""
    from conftest import tiny_config

    from tckr_engine.engine.backends import ParallelSlices
    from tckr_engine.engine.engine import Engine
    from tckr_engine.engine.sampler import denoise, initial_noise, make_scheduler
    from tckr_engine.engine.spec import resolve

    run, resources = resolve(tiny_config(threads=2, batch_size=20, num_images=40, shard_size=40).validate())
    engine = Engine(run["spec"], resources)
    assert isinstance(engine.denoiser, ParallelSlices) and engine.denoiser.workers == 2
    assert engine.denoiser.group_size(20, 2) == 10  # 40 rows with guidance: two groups of 10 images
    assert engine.denoiser.group_size(64, 2) == 16 and engine.denoiser.group_size(5, 1) == 3
    batch = next(engine.scheduler.schedule([0]))
    calls, map_ = [], engine.denoiser.map
    engine.denoiser.map = lambda fn, items: calls.append(list(items)) or map_(fn, calls[-1])
    images, _ = engine.sample(batch)
    assert calls == [[slice(0, 10), slice(10, 20)]]  # whole loops over groups, not one loop over the batch
    engine.denoiser.map = map_

    gen, spec = engine.generator, run["spec"]
    cond = engine.embed([j.prompt.text for j in batch.jobs])
    noise = initial_noise([j.seed for j in batch.jobs], gen.latent_shape, torch.device("cpu"), torch.float32)
    sched = make_scheduler(spec["sampler"], gen.schedule, gen.kind)
    with torch.inference_mode():  # one loop; each UNet call cut into 2 slices of 20 rows (uncond | cond)
        x = denoise(engine.denoiser, sched, noise * sched.init_noise_sigma, cond, engine._uncond,
                    spec["guidance"], spec["steps"])  # fmt: skip
    assert torch.equal(images, gen.decode(x))


def test_a_run_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """Each row is timed once right after its set-up and the files are rewritten: an outer timeout during a
    later row's set-up (a long compilation on a lent GPU) leaves the rows measured so far on disk."""
    import tckr_engine.bench.throughput as throughput

    make = throughput.engine_contender

    def killed_in_compile(run, resources, backend, attention, writers):
        if backend == "compile":
            raise KeyboardInterrupt  # what `timeout` does to the process, as far as the bench can tell
        return make(run, resources, backend, attention, writers)

    monkeypatch.setattr(throughput, "engine_contender", killed_in_compile)
    out = tmp_path / "out"
    out.mkdir()
    (out / "throughput-tiny-digits-cpu.png").write_bytes(b"an older run's plot")
    cfg = BenchConfig(
        preset="tiny-digits", device="cpu", batch_sizes=(8,), steps=2, images=8, repeats=3,
        backends=("torch", "compile"), attention=("sdpa",), threads=1, train_steps=0,
    )  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_bench(cfg, out)
    written = json.loads((out / "throughput-tiny-digits-cpu.json").read_text())
    rows = {r["backend"]: r for r in written["rows"]}
    assert set(rows) == {"diffusers", "torch"} and all(r["repeats"] == 1 for r in rows.values())
    assert rows["torch"]["max_abs_diff"] == 0 and rows["torch"]["ratio_to_baseline"] > 0
    assert not (out / "throughput-tiny-digits-cpu.png").exists()  # not beside these figures
    with (out / "throughput-tiny-digits-cpu.csv").open() as f:
        assert [r["backend"] for r in csv.DictReader(f)] == ["diffusers", "torch"]


def test_each_engine_row_runs_its_backends_own_cpu_slicing(tmp_path, monkeypatch):
    """The bench resolves its spec once (with torch); each row must still slice the UNet as
    `generate --backend` does: compile calls its graph from one thread, never from the torch workers.
    The engine swaps attention processors in place: the baseline's UNet must keep diffusers' own."""
    from tckr_engine.bench.baseline import PixelLoop
    from tckr_engine.bench.throughput import ENGINE_ENV
    from tckr_engine.engine.backends import CompiledDenoiser

    baseline_attention = []
    call = PixelLoop.__call__

    def recording_call(self, jobs):
        procs = self.generator.unet.attn_processors.values()
        baseline_attention.append({type(p).__name__ for p in procs})
        return call(self, jobs)

    monkeypatch.setattr(PixelLoop, "__call__", recording_call)

    for name in ENGINE_ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TCKR_COMPILE_BACKEND", "aot_eager")
    denoisers = []
    init = CompiledDenoiser.__init__
    monkeypatch.setattr(
        CompiledDenoiser, "__init__", lambda self, spec, gen: denoisers.append(spec) or init(self, spec, gen)
    )
    cfg = BenchConfig(
        preset="tiny-digits", device="cpu", batch_sizes=(8,), steps=2, images=8, repeats=1,
        backends=("torch", "compile"), attention=("sdpa",), threads=2, train_steps=0,
    )  # fmt: skip
    result = run_bench(cfg, tmp_path)
    assert result["meta"]["env"] == {"TCKR_COMPILE_BACKEND": "aot_eager"}  # the switches in force
    rows = {r["backend"]: r for r in result["rows"]}
    assert rows["torch"]["notes"] == "groups of 32 UNet rows side by side on 2 one-thread workers"
    assert rows["compile"]["notes"] == "UNet slices of 64 rows on all threads"
    assert [d["cpu_slicing"] for d in denoisers] == [{"rows": 64, "workers": 1}]  # one compiled denoiser
    assert rows["compile"]["status"] == "ok" and rows["compile"]["max_abs_diff"] <= 1
    assert len(baseline_attention) == 2 and all(a == {"AttnProcessor2_0"} for a in baseline_attention)
    assert rows["torch"]["max_abs_diff"] == 0  # the engine's processor and cache: the same images


def test_cpu_ceiling_runs_every_slice_in_every_arrangement():
    """The same-kernels ceiling (bench/ceiling.py): every slice runs once per call, each worker one thread."""
    import threading

    from tckr_engine.bench.ceiling import MODES, _free_workers, _inputs, _slices, measure

    gen = build_preset("tiny-digits")
    parts = _slices(_inputs(gen, 10), 4)
    assert [p[0].shape[0] for p in parts] == [4, 4, 2] and all(p[1].ndim == 0 for p in parts)
    seen, lock = [], threading.Lock()

    def call(x, t, context):
        with lock:
            seen.append((x.data_ptr(), torch.get_num_threads()))

    _free_workers(call, parts, threads=2, calls=3)  # 3 slices x 3 calls over 2 workers, one thread each
    assert sorted(p for p, _ in seen) == sorted(p[0].data_ptr() for p in parts * 3)
    assert {n for _, n in seen} == {1}
    worker0 = [p for p, _ in seen if p in (parts[0][0].data_ptr(), parts[2][0].data_ptr())]
    assert worker0 == [parts[0][0].data_ptr()] * 3 + [parts[2][0].data_ptr()] * 3  # a slice's calls in a row
    result = measure(gen, threads=2, batch=16, rows=4, calls=1, repeats=1)
    assert set(result) == set(MODES) and all(result[m]["rows_per_s"] > 0 for m in MODES)
    assert result["intra-op"]["x_intra_op"] == 1.0


def test_ceiling_profile_names_the_ops_of_a_call():
    from tckr_engine.bench.ceiling import profile_ops

    ops = profile_ops(build_preset("tiny-digits"), rows=4, calls=1, top=50)
    names = {o["op"] for o in ops}
    assert "aten::mkldnn_convolution" in names or "aten::convolution" in names
    shares = [o["share"] for o in ops]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1.0001
    assert all(o["self_ms_per_unet_call"] >= 0 and o["calls_per_unet_call"] > 0 for o in ops)


def test_device_peaks_and_peak_memory():
    assert device_peak("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert device_peak("NVIDIA H100 PCIe", "fp16") == 756e12
    assert device_peak("NVIDIA H200", "bf16") == 989e12
    assert device_peak("Some Future GPU", "bf16") is None
    with PeakMemory(torch.device("cpu")) as mem:
        block = torch.ones(64 * 2**20 // 4)  # 64 MiB touched
        del block
    assert mem.mb is not None and mem.mb >= 64


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"backends": ("torch", "nope")}, "backends"),
        ({"attention": ("flash",)}, "attention"),
        ({"batch_sizes": ()}, "batch_sizes"),
        ({"repeats": 0}, "repeats"),
        ({"train_steps": -1}, "train_steps"),
        ({"images": 32, "batch_sizes": (8,), "train_batch_size": 128}, "train_batch_size 128 is more than"),
        ({"guidance": float("inf")}, "guidance must be a finite number"),
        ({"guidance": float("nan")}, "guidance must be a finite number"),
        ({"guidance": True}, "guidance must be a finite number"),
        ({"time_budget_s": 0}, "time_budget_s must be a positive number"),
        ({"time_budget_s": float("inf")}, "time_budget_s must be a positive number"),
    ],
)
def test_bad_config_is_one_clear_error(changes, words):
    with pytest.raises(TckrError, match=words):
        BenchConfig(**changes).validate()


def test_trainer_row_batch_defaults_to_the_trainers_capped_at_the_rows_images():
    assert BenchConfig().validate().trainer_batch() == 64  # the default 64 images: one batch of 64
    assert BenchConfig(images=300, batch_sizes=(64,)).trainer_batch() == 128  # the student trainer's
    assert BenchConfig(images=20, batch_sizes=(8,)).validate().trainer_batch() == 24  # 3 whole batches
    assert BenchConfig(images=64, train_batch_size=16).validate().trainer_batch() == 16


def test_cli_bad_batch_sizes(cli):
    res = cli("bench", "--batch-sizes", "64,abc")
    assert res.code == 2 and "--batch-sizes" in res.err and "Traceback" not in res.err


def test_trainer_bench_command_on_a_shard_folder(tiny_run, tmp_path):
    """`python -m tckr_engine.bench.trainer`: the trainer row alone on any shard folder (loader A/B)."""
    import subprocess
    import sys

    out = tmp_path / "trainer.json"
    cmd = [
        sys.executable,
        "-m",
        "tckr_engine.bench.trainer",
        "--shards",
        str(tiny_run),
        "--arch",
        "small-cnn",
    ]
    args = [
        "--batch-size",
        "8",
        "--steps",
        "3",
        "--repeats",
        "2",
        "--workers",
        "1",
        "--threads",
        "1",
        "--costs",
        "1",
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd + args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    costs = json.loads(out.read_text())["costs"]  # per-sample steps, webdataset's tar reader beside ours
    assert costs["samples"] > 0 and costs["tar_webdataset_us"] > 0 and costs["tar_engine_us"] > 0
    assert costs["decode_us"] > 0 and costs["stored_logits"] == ("npy_engine_us" in costs)
    result = json.loads(out.read_text())
    assert result["steps"] == 3 and result["arch"] == "small-cnn" and result["threads"] == 1
    assert result["repeats"] == 2 and result["memory"]["samples"] == result["stream"]["samples"] == 24
    mode = "in-process" if loader_in_process("auto", "cpu", 1, 1) else "processes"  # the trainer's default
    assert result["loader_mode"] == mode and result["loader_note"].startswith("1 ")
    for mode in ("memory", "stream", "loader"):
        m = result[mode]
        assert m["samples"] == 24 and m["samples_per_s_min"] <= m["samples_per_s"] <= m["samples_per_s_max"]
    assert (
        result["shards"] == str(tiny_run.resolve()) and result["git_sha"] and "stream / memory" in done.stderr
    )
    bad = subprocess.run([*cmd[:3], "--shards", str(tmp_path / "nope")], capture_output=True, text=True)
    assert bad.returncode == 2 and "shard folder not found" in bad.stderr and "Traceback" not in bad.stderr
    for flags, needle in [
        (["--steps", "0"], "--steps must be an integer >= 1"),
        (["--device", "tpu"], "cpu or cuda"),
    ]:
        bad = subprocess.run([*cmd, *flags], capture_output=True, text=True)
        assert bad.returncode == 2 and bad.stderr.startswith("error: ") and needle in bad.stderr, bad.stderr
