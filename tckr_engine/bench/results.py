"""Benchmark output: CSV + JSON + bar plot into the output folder, the short terminal table, and a
markdown page of a result file for docs/bench (`python -m tckr_engine.bench.results FILE.json`).

File names carry the model and the device type (`throughput-<model>-<cpu|cuda>.{csv,json,png}`), so CPU
and GPU results of several models live side by side in `docs/bench/`.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from tckr_engine.bench.profile import profile_line
from tckr_engine.bench.targets import check_targets, format_check
from tckr_engine.fsutil import atomic_write

log = logging.getLogger(__name__)

COLUMNS = [
    "kind", "name", "backend", "attention", "batch_size", "images", "steps", "guidance", "dtype", "status",
    "images_per_s", "images_per_s_min", "images_per_s_max", "seconds_median", "spread_pct", "repeats",
    "ratio_to_baseline", "ms_per_step", "setup_s", "warmup_s", "peak_mem_mb", "minor_faults_per_image",
    "gflops_per_image", "achieved_gflops_per_s", "fraction_of_peak", "fraction_of_matmul", "max_abs_diff",
    "diff_pixels_pct",
    "repeats_identical", "notes", "device", "threads", "torch", "diffusers", "git_sha",
]  # fmt: skip


def stem(model: str, device_type: str) -> str:
    name = Path(model).name if ("/" in model or model.startswith(".")) else model
    return f"throughput-{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}-{device_type}"


def write_results(out_dir: Path, result: dict[str, Any], plot: bool = True) -> dict[str, str]:
    """Write `<stem>.csv`, `<stem>.json` and `<stem>.png`; returns what was written, by kind. Without
    `plot` (the bench's saves while it runs) an older plot of the same stem is removed instead."""
    out_dir.mkdir(parents=True, exist_ok=True)
    base = stem(result["config"]["preset"], result["meta"]["device_type"])
    files = {"csv": out_dir / f"{base}.csv", "json": out_dir / f"{base}.json", "png": out_dir / f"{base}.png"}
    meta = result["meta"]
    with open(files["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow(
                {
                    **row,
                    "device": meta["device"],
                    "threads": meta["threads"],
                    "torch": meta["versions"]["torch"],
                    "diffusers": meta["versions"]["diffusers"],
                    "git_sha": meta["git_sha"],
                }
            )
    atomic_write(files["json"], (json.dumps(result, indent=1, default=str) + "\n").encode())
    if not plot:
        files.pop("png").unlink(missing_ok=True)  # it would show another run beside these files
    elif not _plot(files["png"], result):
        del files["png"]
    return {k: str(v) for k, v in files.items()}


def _label(row: dict[str, Any]) -> str:
    if row["kind"] == "train":
        return row["name"]
    if row["backend"] == "diffusers":
        return f"b{row['batch_size']} diffusers"
    return f"b{row['batch_size']} {row['backend']}/{row['attention']}"


def _plot(path: Path, result: dict[str, Any]) -> bool:
    """Horizontal bars: images/s of every measured generation row (ratio and pixel difference written on
    each bar), and the trainer's samples/s streaming vs in memory. False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot")
        return False
    gen = [r for r in result["rows"] if r["kind"] == "generate" and r["status"] == "ok"]
    train = [r for r in result["rows"] if r["kind"] == "train" and r["status"] == "ok"]
    panels = [p for p in (gen, train) if p]
    if not panels:
        return False
    heights = [max(1.6, 0.45 * len(p) + 0.9) for p in panels]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for ax, rows in zip(axes[:, 0], panels, strict=True):
        labels = [_label(r) for r in rows]
        values = [r["images_per_s"] for r in rows]
        lo = [r["images_per_s"] - (r.get("images_per_s_min") or r["images_per_s"]) for r in rows]
        hi = [(r.get("images_per_s_max") or r["images_per_s"]) - r["images_per_s"] for r in rows]
        colors = ["0.6" if r["backend"] in ("diffusers", "memory") else "tab:blue" for r in rows]
        ax.barh(range(len(rows)), values, xerr=[lo, hi], color=colors, capsize=3)
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        for i, r in enumerate(rows):
            ratio = r.get("ratio_to_baseline")
            text = f" {r['images_per_s']:.3g}"
            if ratio is not None:
                text += f"  x{ratio:.2f}"
            if r.get("max_abs_diff") is not None:
                text += f"  max|diff| {r['max_abs_diff']}"
            ax.text(values[i] + hi[i], i, text, va="center", fontsize=7)
        is_train = rows[0]["kind"] == "train"
        ax.set_xlabel("training samples / s" if is_train else "images / s (end to end, files written)")
        ax.set_xlim(0, max(values) * 1.45)
    meta, cfg = result["meta"], result["config"]
    title = (
        f"{cfg['preset']} {cfg['steps']} steps, guidance {cfg['guidance']} | {meta['device']} | "
        f"torch {meta['versions']['torch']} | {meta['git_sha'][:10]}"
    )
    if meta.get("note"):
        title += f"\n{meta['note']}"
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _fmt(value: Any, spec: str) -> str:
    """`format(value, spec)`, or a dash padded to the spec's width when there is no value."""
    if value is None:
        width = spec.split(".")[0].rstrip("dfg") or "0"
        return "-".rjust(int(width))
    return format(value, spec)


def format_table(result: dict[str, Any]) -> str:
    """The short terminal table: one line per row."""
    head = (
        f"{'row':28s} {'img/s':>8s} {'min-max':>13s} {'ratio':>6s} {'ms/step':>8s} {'peak MB':>8s} "
        f"{'GFLOP/s':>8s} {'%peak':>6s} {'max|d|':>6s}  status"
    )
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        if r["status"] != "ok":
            lines.append(f"{_label(r):28s} {r['status']}"[:160])
            continue
        span = (
            f"{r['images_per_s_min']:.3g}-{r['images_per_s_max']:.3g}" if r.get("images_per_s_min") else "-"
        )
        frac = r.get("fraction_of_peak")
        if frac is None:
            frac = r.get("fraction_of_matmul")
        cells = [
            f"{_label(r):28s}",
            f"{r['images_per_s']:8.3g}",
            f"{span:>13s}",
            _fmt(r.get("ratio_to_baseline"), "6.2f"),
            _fmt(r.get("ms_per_step"), "8.1f"),
            _fmt(r.get("peak_mem_mb"), "8.0f"),
            _fmt(r.get("achieved_gflops_per_s"), "8.1f"),
            _fmt(None if frac is None else 100 * frac, "6.1f"),
            _fmt(r.get("max_abs_diff"), "6d"),
        ]
        status = r.get("notes", "")[:60] if r["kind"] == "train" else "ok"
        lines.append(" ".join(cells) + "  " + status)
    if any(r.get("fraction_of_peak") is None and r.get("fraction_of_matmul") for r in result["rows"]):
        lines.append(
            "%peak without a device peak (the CPU): % of the fp32 matmul rate measured in this run; "
            "convolutions can exceed it"
        )
    for r in result["rows"]:
        prof = r.get("profile")
        if prof:
            line = prof.get("status") or f"{profile_line(prof)} ({prof['scope']})"
            lines.append(f"profile {_label(r)}: {line}"[:200])
    budget = result.get("time_budget") or {}
    if budget.get("left_out"):
        lines.append(f"--time-budget {budget['seconds']:g} s left out: {'; '.join(budget['left_out'])}"[:400])
    lines += [f"target: {format_check(c)}" for c in check_targets(result)]
    return "\n".join(lines)


def _cell(value: Any, spec: str) -> str:
    return "" if value is None else format(value, spec)


def format_markdown(result: dict[str, Any], source: str = "") -> str:
    """A result as a markdown page: the run (device, versions, git sha, settings), every row, the profile
    of each row when the run had `--profile`, and the targets; `source` names the JSON file it came from."""
    meta, cfg, mm = result["meta"], result["config"], result.get("matmul") or {}
    flops = result.get("flops") or {}
    v = meta["versions"]
    peak = result.get("device_peak_flops")
    lines = [
        f"# `tckr-engine bench`: {cfg['preset']} on {meta['device']}",
        "",
        f"git {meta['git_sha']}, started {meta['started']}; torch {v.get('torch')}, diffusers "
        f"{v.get('diffusers')}, onnxruntime {v.get('onnxruntime')}, triton {v.get('triton')}, tensorrt "
        f"{v.get('tensorrt')}; Python {meta['python']} on {meta['platform']}"
        + (f"; note: {meta['note']}" if meta.get("note") else ""),
        "",
        f"{meta['dtype']}, {meta['threads']} threads, batch sizes {cfg['batch_sizes']}, "
        f"{cfg['images']} images, {cfg['steps']} {cfg['sampler']} steps, guidance {cfg['guidance']:g}, "
        f"{cfg['repeats']} repeats; "
        f"{flops.get('flops_per_image', 0) / 1e9:.2f} GFLOP per image; measured {mm.get('dtype')} matmul "
        f"{mm.get('tflops', 0) * 1e3:.1f} GFLOP/s"
        + (f", table peak {peak / 1e12:.0f} TFLOP/s" if peak else "")
        + (f" (from `{source}`)" if source else ""),
        "",
        "| row | img/s (min–max) | × baseline | ms/step | GFLOP/s | % of device peak (of matmul) | peak MB | "
        "minor faults / image | max\\|d\\| | notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped = []
    for r in result["rows"]:
        if r["status"] != "ok":
            skipped.append(f"- {_label(r)}: {r['status']}")
            continue
        unit = " samples/s" if r["kind"] == "train" else ""
        span = (
            f" ({r['images_per_s_min']:.3g}–{r['images_per_s_max']:.3g})" if r.get("images_per_s_min") else ""
        )
        frac = r.get("fraction_of_peak")
        frac_cell = _cell(None if frac is None else 100 * frac, ".1f")
        if frac is None and r.get("fraction_of_matmul") is not None:
            frac_cell = f"({100 * r['fraction_of_matmul']:.1f})"
        cells = [
            _label(r),
            f"{r['images_per_s']:.3g}{unit}{span}",
            _cell(r.get("ratio_to_baseline"), ".2f"),
            _cell(r.get("ms_per_step"), ".1f"),
            _cell(r.get("achieved_gflops_per_s"), ".1f"),
            frac_cell,
            _cell(r.get("peak_mem_mb"), ".0f"),
            _cell(r.get("minor_faults_per_image"), ",d"),
            _cell(r.get("max_abs_diff"), "d"),
            (r.get("notes") or "").replace("|", "/"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not measured:", *skipped]
    profiled = [r for r in result["rows"] if r.get("profile")]
    if profiled:
        lines += ["", "Where one batch's time went (`--profile`):", ""]
        for r in profiled:
            prof = r["profile"]
            text = prof.get("status") or f"{profile_line(prof, width=8)} ({prof['scope']})"
            lines.append(f"- {_label(r)}: {text}" + (f"; {prof['note']}" if prof.get("note") else ""))
    lines += ["", "Targets (issue 8):", ""]
    lines += [f"- {format_check(c)}" for c in check_targets(result)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(
        description="Print (or write) a bench result file as a markdown page for docs/bench."
    )
    parser.add_argument("result", type=Path, help="a throughput-*.json written by `tckr-engine bench`")
    parser.add_argument("--out", type=Path, help="write the page here instead of printing it")
    args = parser.parse_args(argv)
    try:
        result = json.loads(args.result.read_text())
        page = format_markdown(result, source=str(args.result))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(
            f"error: {args.result} is not a readable bench result ({type(e).__name__}: {e})"
        ) from None
    if args.out is None:
        sys.stdout.write(page)  # the page is this command's output, not a log line
    else:
        atomic_write(args.out, page.encode())


if __name__ == "__main__":
    main()
