"""The throughput benchmark's acceptance targets (issue 8), checked on a finished result dict.

- CPU, the `tiny-fmnist` preset: the engine's best backend whose images equal the baseline's (max|d| 0)
  runs at >= 1.5x the diffusers baseline.
- GPU, `sd15-arch` at 512 px, 20 steps, classifier-free guidance: the best engine row runs at >= 2x the
  baseline and at >= 40 % of the bf16 matmul rate measured in the same run; the trainer streaming from
  shards runs at >= 90 % of its in-memory rate.

Each check says what it found and whether the target is met: True, False, or None when the run is not
the target's setting (another preset, image size or step count, no guidance, no such row), so a smoke run
on other settings is never read as a pass or a failure.
"""

from __future__ import annotations

from typing import Any

CPU_RATIO = 1.5
GPU_RATIO = 2.0
GPU_MATMUL_FRACTION = 0.40
STREAM_FRACTION = 0.90


def _check(target: str, value: str, met: bool | None, why: str = "") -> dict[str, Any]:
    return {"target": target, "value": value, "met": met, "why": why}


def _label(row: dict[str, Any]) -> str:
    return f"{row['backend']}/{row['attention']} at batch {row['batch_size']}"


def _engine_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        r
        for r in result["rows"]
        if r["kind"] == "generate" and r["name"] == "engine" and r["status"] == "ok"
        and r.get("ratio_to_baseline") is not None
    ]  # fmt: skip


def _cpu_check(result: dict[str, Any]) -> dict[str, Any]:
    target = f"best backend with identical images (max|d| 0) >= {CPU_RATIO:g}x diffusers, tiny-fmnist"
    preset = result["config"]["preset"]
    rows = _engine_rows(result)
    identical = [r for r in rows if r.get("max_abs_diff") == 0]
    fastest = max(rows, key=lambda r: r["ratio_to_baseline"], default=None)
    other = (
        f"; fastest of all: {_label(fastest)} {fastest['ratio_to_baseline']:.2f}x, max|d| "
        f"{fastest.get('max_abs_diff')}"
        if fastest is not None and fastest.get("max_abs_diff") != 0
        else ""
    )
    why = "" if preset == "tiny-fmnist" else f"preset {preset}, not tiny-fmnist"
    if not rows:
        return _check(target, "no engine row measured", None, why)
    if not identical:
        return _check(target, "no engine row with identical images" + other, None if why else False, why)
    best = max(identical, key=lambda r: r["ratio_to_baseline"])
    value = f"{_label(best)}: {best['ratio_to_baseline']:.2f}x" + other
    return _check(target, value, None if why else best["ratio_to_baseline"] >= CPU_RATIO, why)


def _gpu_setting(result: dict[str, Any]) -> str:
    """Why this run is not the GPU targets' setting, or '' when it is."""
    cfg = result["config"]
    off = []
    if cfg["preset"] != "sd15-arch":
        off.append(f"preset {cfg['preset']}")
    if cfg.get("image_size") not in (None, 512):
        off.append(f"{cfg['image_size']} px")
    if cfg["steps"] != 20:
        off.append(f"{cfg['steps']} steps")
    if not cfg["guidance"] > 1.0:
        off.append("no guidance")
    return ", ".join(off) + (" (the targets: sd15-arch, 512 px, 20 steps, CFG)" if off else "")


def _gpu_checks(result: dict[str, Any]) -> list[dict[str, Any]]:
    setting = _gpu_setting(result)
    rows = _engine_rows(result)
    checks = []
    target = f"best engine row >= {GPU_RATIO:g}x diffusers"
    best = max(rows, key=lambda r: r["ratio_to_baseline"], default=None)
    if best is None:
        checks.append(_check(target, "no engine row measured", None))
    else:
        value = f"{_label(best)}: {best['ratio_to_baseline']:.2f}x, max|d| {best.get('max_abs_diff')}"
        met = None if setting else best["ratio_to_baseline"] >= GPU_RATIO
        checks.append(_check(target, value, met, setting))
    target = f"best engine row >= {100 * GPU_MATMUL_FRACTION:.0f} % of the measured bf16 matmul rate"
    measured = [r for r in rows if r.get("fraction_of_matmul") is not None]
    top = max(measured, key=lambda r: r["fraction_of_matmul"], default=None)
    if top is None:
        checks.append(_check(target, "no engine row measured", None))
    else:
        mm = result.get("matmul") or {}
        value = (
            f"{_label(top)}: {100 * top['fraction_of_matmul']:.1f} % of {mm.get('tflops', 0):.0f} "
            f"TFLOP/s {mm.get('dtype', '')}"
        )
        bf16 = mm.get("dtype") == "bfloat16"
        met = None if setting or not bf16 else top["fraction_of_matmul"] >= GPU_MATMUL_FRACTION
        checks.append(_check(target, value, met, setting or ("" if bf16 else "matmul not measured in bf16")))
    checks.append(_stream_check(result, None))
    return checks


def _stream_check(result: dict[str, Any], why_not: str | None) -> dict[str, Any]:
    """The trainer's streaming row against its in-memory row; `why_not` set: reported, not judged."""
    target = f"trainer streaming >= {100 * STREAM_FRACTION:.0f} % of in memory"
    stream = next((r for r in result["rows"] if r["kind"] == "train" and r["name"] == "trainer-stream"), None)
    if stream is None or stream["status"] != "ok" or stream.get("ratio_to_baseline") is None:
        return _check(target, "no trainer rows measured", None)
    value = f"{100 * stream['ratio_to_baseline']:.0f} %"
    if why_not is not None:
        return _check(target, value, None, why_not)
    return _check(target, value, stream["ratio_to_baseline"] >= STREAM_FRACTION)


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets that apply to this run's device, each {target, value, met, why} (see the module doc)."""
    if result["meta"]["device_type"] == "cuda":
        return _gpu_checks(result)
    return [_cpu_check(result), _stream_check(result, "a GPU host's target; shown for reference")]


def format_check(check: dict[str, Any]) -> str:
    """One line: `target: value -> met | NOT met | not judged (why)`."""
    verdict = {True: "met", False: "NOT met", None: "not judged"}[check["met"]]
    why = f" ({check['why']})" if check["why"] else ""
    return f"{check['target']}: {check['value']} -> {verdict}{why}"
