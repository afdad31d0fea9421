"""bench.targets: issue 8's targets judged on result dicts (met, not met, or not judged off their setting),
and bench.results' markdown page of a result file."""

from __future__ import annotations

import copy
import json

import pytest

from tckr_engine.bench.results import format_markdown, main
from tckr_engine.bench.targets import check_targets, format_check


def _row(backend: str, ratio: float, diff: int, **extra) -> dict:
    return {
        "kind": "generate", "name": "diffusers" if backend == "diffusers" else "engine", "backend": backend,
        "attention": "graph" if backend == "onnxruntime" else "sdpa", "batch_size": 8, "status": "ok",
        "images_per_s": 10 * ratio, "ratio_to_baseline": ratio, "max_abs_diff": diff, **extra,
    }  # fmt: skip


def _result(device_type: str = "cpu", preset: str = "tiny-fmnist", **cfg) -> dict:
    rows = [
        _row("diffusers", 1.0, 0, fraction_of_matmul=0.2),
        _row("torch", 1.6, 0, fraction_of_matmul=0.3, notes="groups | side by side"),
        _row("onnxruntime", 1.9, 7, fraction_of_matmul=0.45),
        {"kind": "generate", "name": "engine", "backend": "tensorrt", "attention": "graph", "batch_size": 8,
         "status": "skipped: backend tensorrt needs a CUDA GPU"},
        {"kind": "train", "name": "trainer-memory", "backend": "memory", "attention": "-", "batch_size": 8,
         "status": "ok", "images_per_s": 100.0, "ratio_to_baseline": 1.0},
        {"kind": "train", "name": "trainer-stream", "backend": "stream", "attention": "-", "batch_size": 8,
         "status": "ok", "images_per_s": 95.0, "ratio_to_baseline": 0.95},
    ]  # fmt: skip
    config = {"preset": preset, "steps": 20, "guidance": 2.0, "image_size": None, "batch_sizes": [8]}
    config.update(images=8, sampler="dpm++", repeats=3, **cfg)
    meta = {"device": "test device", "device_type": device_type, "dtype": "fp32", "threads": 2}
    meta.update(python="3", platform="linux", versions={"torch": "2"}, git_sha="abc", started="now", note="")
    mm = {"dtype": "bfloat16" if device_type == "cuda" else "float32", "tflops": 800.0}
    return {"config": config, "meta": meta, "rows": rows, "matmul": mm, "flops": {"flops_per_image": 1e9}}


def _verdicts(result: dict) -> list[bool | None]:
    return [c["met"] for c in check_targets(result)]


def test_cpu_target_takes_the_best_row_with_identical_images():
    result = _result()
    cpu, stream = check_targets(result)
    assert cpu["met"] is True and "torch/sdpa at batch 8: 1.60x" in cpu["value"]
    assert "fastest of all: onnxruntime/graph at batch 8 1.90x, max|d| 7" in cpu["value"]  # faster, not equal
    assert stream["met"] is None and stream["value"] == "95 %"  # a GPU host's target on a CPU run
    result["rows"][1]["ratio_to_baseline"] = 1.49
    assert _verdicts(result)[0] is False
    result["rows"][1]["max_abs_diff"] = 1  # no row with identical images left: the target is not met
    cpu = check_targets(result)[0]
    assert cpu["met"] is False and cpu["value"].startswith("no engine row with identical images")
    assert _verdicts(_result(preset="fmnist"))[0] is None  # another preset: reported, not judged


def test_gpu_targets_speed_matmul_fraction_and_streaming():
    result = _result("cuda", "sd15-arch")
    ratio, matmul, stream = check_targets(result)
    assert ratio["met"] is False and "onnxruntime/graph at batch 8: 1.90x, max|d| 7" in ratio["value"]
    assert matmul["met"] is True and "45.0 % of 800 TFLOP/s bfloat16" in matmul["value"]
    assert stream["met"] is True
    fast = copy.deepcopy(result)
    fast["rows"][2]["ratio_to_baseline"] = 2.4
    fast["rows"][2]["fraction_of_matmul"] = 0.39
    fast["rows"][5]["ratio_to_baseline"] = 0.85
    assert _verdicts(fast) == [True, False, False]
    for cfg, why in [
        ({"steps": 4}, "4 steps"),
        ({"image_size": 256}, "256 px"),
        ({"guidance": 1.0}, "no guidance"),
    ]:
        off = _result("cuda", "sd15-arch", **cfg)
        checks = check_targets(off)
        assert [c["met"] for c in checks[:2]] == [None, None] and why in checks[0]["why"]
    fp16 = copy.deepcopy(result)
    fp16["matmul"]["dtype"] = "float16"
    assert check_targets(fp16)[1]["met"] is None  # the target is a fraction of the bf16 rate


def test_no_rows_is_never_a_verdict():
    result = _result("cuda", "sd15-arch")
    result["rows"] = [r for r in result["rows"] if r["name"] == "diffusers"]
    assert _verdicts(result) == [None, None, None]
    assert format_check(check_targets(result)[2]) == (
        "trainer streaming >= 90 % of in memory: no trainer rows measured -> not judged"
    )


def test_markdown_page_and_its_command(tmp_path, capsys):
    result = _result()
    page = format_markdown(result, source="r.json")
    assert page.startswith("# `tckr-engine bench`: tiny-fmnist on test device\n")
    assert (
        "| b8 torch/sdpa | 16 | 1.60 |" in page and "groups / side by side" in page
    )  # '|' kept out of cells
    assert "- b8 tensorrt/graph: skipped: backend tensorrt needs a CUDA GPU" in page
    assert "| trainer-stream | 95 samples/s | 0.95 |" in page
    assert "-> met" in page and "(from `r.json`)" in page
    path = tmp_path / "throughput-x-cpu.json"
    path.write_text(json.dumps(result))
    main([str(path)])
    assert capsys.readouterr().out == format_markdown(result, source=str(path))
    main([str(path), "--out", str(tmp_path / "x.md")])
    assert (tmp_path / "x.md").read_text() == format_markdown(result, source=str(path))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(SystemExit, match="is not a readable bench result"):
        main([str(tmp_path / "bad.json")])
