"""Where a bench row's time goes: one batch under the PyTorch profiler, grouped by kind of work.

`tckr-engine bench --profile` runs, after a batch size's timed rounds, one more batch of every row that ran
(the baseline's pipeline call, the engine's `Engine.sample`: prompts, the whole sampling loop, decode,
teacher; no file writing) under `torch.profiler`, and stores in the row:

- on a GPU, the CUDA kernels' own time (kernels only are recorded), so one run of a lent GPU says how much
  of a batch the device was busy (the rest is launch gaps, host work, synchronisation) and which kernels
  took it: cuDNN convolutions, GEMMs, attention, norms, inductor's fused kernels, layout transposes, ...;
- on the CPU, the PyTorch ops' self time summed over every thread (worker threads included), which can
  exceed the wall clock when several threads compute at once. ONNX Runtime and TensorRT run outside
  PyTorch's ops: on the CPU their work is not seen (the row says so); on a GPU CUPTI traces the kernels of
  the whole process, theirs included (not yet checked on a GPU).

Categories come from kernel / op names (`categorize`, first matching rule wins); the top entries are kept
by name, so a misfiled kernel is visible in the JSON. The profiled batch runs slower than the timed ones
(the profiler's own overhead): read shares, not speeds.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger(__name__)

# (category, name substrings), matched on the lower-cased aten op or kernel name; the first rule that
# matches wins, so the more specific rules come first.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    # cuDNN's NCHW <-> NHWC conversions around convolutions of channels-first tensors
    ("layout", ("nchwtonhwc", "nhwctonchw")),
    # inductor's generated code: GPU pointwise / reduction kernels (their names list the fused ops,
    # "convolution" included, so before the conv rule; its templates, triton_tem_*, fall through to conv /
    # gemm) and, on the CPU, the compiled graph's own C++ between the aten calls it makes
    ("fused", ("triton_poi", "triton_red", "triton_per", "compiledfxgraph")),
    ("attention", ("flash", "fmha", "attention", "_attn_fwd", "sdpa", "softmax")),
    ("conv", ("conv", "fprop", "implicit_gemm", "winograd", "im2col")),
    ("gemm", ("gemm", "gemv", "addmm", "aten::mm", "bmm", "matmul", "linear", "cutlass", "cublas",
              "triton_tem")),
    ("norm", ("group_norm", "groupnorm", "layer_norm", "layernorm", "batch_norm", "rms_norm", "welford",
              "rowwisemoments", "computefusedparams")),
    ("copy", ("copy", "memcpy", "memset", "cat", "clone", "contiguous", "upsample", "fill", "index", "pad")),
    ("elementwise", ("elementwise", "add", "mul", "sub", "div", "silu", "gelu", "sigmoid", "tanh",
                     "exp_kernel", "clamp", "where", "pow", "sqrt", "neg", "abs", "relu", "round", "lerp")),
)  # fmt: skip
CATEGORIES = (*(c for c, _ in RULES), "other")


def categorize(name: str) -> str:
    """The kind of work of an aten op or GPU kernel name (one of CATEGORIES)."""
    low = name.lower()
    for category, keys in RULES:
        if any(k in low for k in keys):
            return category
    return "other"


def _profiler_kwargs(device: torch.device) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity

    if device.type == "cuda":  # kernels only (from every thread): without recording the host's ops the
        # profiler slows an eager loop's launches less, so the device's busy share is closer to the truth
        return {"activities": [ProfilerActivity.CUDA]}
    kwargs: dict[str, Any] = {"activities": [ProfilerActivity.CPU]}
    # kineto prints a "profiler_start"/"profiler_stop" line per profile at its top log level (5), read when
    # the profiler first starts; 6 silences it. Not on a GPU, where its errors (CUPTI's) must stay visible.
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    try:  # the engine's side-by-side workers are threads the profiler would not see otherwise
        kwargs["experimental_config"] = torch.profiler._ExperimentalConfig(profile_all_threads=True)
    except (AttributeError, TypeError):  # an older PyTorch: the calling thread only
        log.info("this PyTorch cannot profile all threads; worker threads are not seen")
    return kwargs


def profile_batch(fn: Callable[[], Any], device: torch.device, top: int = 15) -> dict[str, Any]:
    """Run `fn()` once under the PyTorch profiler; its time by category and its `top` entries.

    Returns `{"scope", "wall_ms", "busy_ms", "busy_pct", "by_category": {cat: {"ms", "pct"}}, "top":
    [{"name", "category", "ms", "pct", "calls"}]}`: `scope` is "cuda kernels" or "cpu ops, all threads";
    `pct` is of `busy_ms`; `busy_pct` is `busy_ms` over the wall clock (a GPU's busy share; on the CPU
    more than 100 when threads overlap).
    """
    from torch.profiler import profile

    from tckr_engine.bench.flops import sync

    cuda = device.type == "cuda"
    with profile(**_profiler_kwargs(device)) as prof:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    try:
        totals = raw_self_times(prof.profiler.kineto_results.events(), cuda)
    except AttributeError:  # another PyTorch's internals: the public (slower) path
        log.info("profiler internals differ in this PyTorch; summing its FunctionEvents instead")
        totals = event_self_times(prof.events(), cuda)
    entries = [(name, us, n) for name, (us, n) in totals.items() if us > 0]
    return summarize(entries, wall_us, "cuda kernels" if cuda else "cpu ops, all threads", top)


# Helper events of the profiler that PyTorch's own tables leave out (`torch.autograd.profiler_util`).
_SKIPPED = frozenset(
    {
        "[memory]", "[OutOfMemory]", "profiler::_record_function_enter",
        "profiler::_record_function_enter_new", "profiler::_record_function_exit", "aten::is_leaf",
        "aten::output_nr", "aten::_version",
    }
)  # fmt: skip


def raw_self_times(events: list[Any], cuda: bool) -> dict[str, tuple[float, int]]:
    """{name: (self microseconds, calls)} from the profiler's raw kineto events.

    `prof.events()` / `key_averages()` build a Python object per event first: ~40 us each, so tens of
    seconds for one SD batch of a lent GPU. This reads the raw events: on a GPU the kernels' (and
    copies') durations, which do not nest (PyTorch's tables also leave out the GPU spans of
    record_function regions); on the CPU each op's duration less its children's, children
    found per thread by time ranges as `torch.autograd.profiler_util` nests them.
    """
    from torch.autograd import DeviceType

    totals: dict[str, list[float]] = {}

    def add(name: str, ns: float) -> None:
        t = totals.setdefault(name, [0.0, 0])
        t[0] += ns / 1e3
        t[1] += 1

    if cuda:  # not the GPU-side spans of record_function regions: they cover kernels counted already
        for e in events:
            if e.device_type() == DeviceType.CUDA and e.name() not in _SKIPPED and not e.is_user_annotation():
                add(e.name(), e.duration_ns())
        return _demangled(totals)
    ops = [
        (e.start_thread_id(), e.start_ns(), e.end_ns(), e.name())
        for e in events
        if e.device_type() == DeviceType.CPU and e.name() not in _SKIPPED and not e.is_async()
        and e.start_thread_id() == e.end_thread_id() and not e.is_hidden_event()
    ]  # fmt: skip
    ops.sort(key=lambda o: (o[0], o[1], -o[2]))
    own = [end - start for _, start, end, _ in ops]
    parent = [-1] * len(ops)
    children: list[list[int]] = [[] for _ in ops]
    stack: list[int] = []
    for i, (thread, start, end, _) in enumerate(ops):
        if stack and ops[stack[-1]][0] != thread:
            stack = []
        while stack:  # the innermost open op that contains this one is its parent
            p = ops[stack[-1]]
            if start >= p[2] or end > p[2]:
                stack.pop()
            else:
                own[stack[-1]] -= end - start
                parent[i] = stack[-1]
                children[stack[-1]].append(i)
                break
        stack.append(i)
    # An op whose only child has its name (an overload calling another) counts once, with the child's
    # own time, as in PyTorch's tables (`EventList._remove_dup_nodes`).
    alive = [True] * len(ops)
    merged = True
    while merged:
        merged = False
        for i, p in enumerate(parent):
            if alive[i] and p >= 0 and ops[p][3] == ops[i][3] and len(children[p]) == 1:
                own[p] += own[i]
                children[p] = children[i]
                for c in children[i]:
                    parent[c] = p
                alive[i], merged = False, True
    for (_, _, _, name), ns, keep in zip(ops, own, alive, strict=True):
        if keep:
            add(name, ns)
    return _demangled(totals)


def _demangled(totals: dict[str, list[float]]) -> dict[str, tuple[float, int]]:
    out: dict[str, tuple[float, int]] = {}
    for name, (us, n) in totals.items():
        key = torch._C._demangle(name) if name.startswith("_Z") else name
        prev = out.get(key, (0.0, 0))
        out[key] = (prev[0] + us, prev[1] + int(n))
    return out


def event_self_times(events: list[Any], cuda: bool) -> dict[str, tuple[float, int]]:
    """{name: (self microseconds, calls)} from `prof.events()` (PyTorch's FunctionEvents)."""
    from torch.autograd import DeviceType

    want = DeviceType.CUDA if cuda else DeviceType.CPU
    totals: dict[str, tuple[float, int]] = {}
    for e in events:
        if e.device_type != want or (cuda and getattr(e, "is_user_annotation", False)):
            continue
        if cuda:  # a kernel's own time (self_cuda_time_total before PyTorch 2.4)
            us = getattr(e, "self_device_time_total", None)
            us = e.self_cuda_time_total if us is None else us
        else:
            us = e.self_cpu_time_total
        prev = totals.get(e.name, (0.0, 0))
        totals[e.name] = (prev[0] + float(us), prev[1] + 1)
    return totals


def summarize(
    entries: list[tuple[str, float, int]], wall_us: float, scope: str, top: int = 15
) -> dict[str, Any]:
    """`profile_batch`'s result from (name, self microseconds, calls) entries and the wall clock."""
    busy = sum(us for _, us, _ in entries)
    per_cat = dict.fromkeys(CATEGORIES, 0.0)
    for name, us, _ in entries:
        per_cat[categorize(name)] += us

    def pct(us: float) -> float:
        return round(100 * us / busy, 2) if busy else 0.0

    ranked = sorted(entries, key=lambda e: -e[1])[:top]
    return {
        "scope": scope,
        "wall_ms": round(wall_us / 1e3, 3),
        "busy_ms": round(busy / 1e3, 3),
        "busy_pct": round(100 * busy / wall_us, 1) if wall_us > 0 else None,
        "by_category": {
            c: {"ms": round(us / 1e3, 3), "pct": pct(us)}
            for c, us in sorted(per_cat.items(), key=lambda kv: -kv[1])
            if us > 0
        },
        "top": [
            {
                "name": name[:200],
                "category": categorize(name),
                "ms": round(us / 1e3, 3),
                "pct": pct(us),
                "calls": calls,
            }
            for name, us, calls in ranked
        ],
    }


def profile_line(profile: dict[str, Any], width: int = 6) -> str:
    """One terminal line: busy share and the largest categories, e.g. `busy 93 %: conv 48 %, gemm 21 %`."""
    cats = list(profile["by_category"].items())[:width]
    parts = ", ".join(f"{c} {v['pct']:.0f} %" for c, v in cats)
    busy = profile.get("busy_pct")
    return (f"busy {busy:.0f} % of {profile['wall_ms'] / 1e3:.2f} s: " if busy is not None else "") + parts


def postprocessing_cost(ops: int = 50_000) -> dict[str, Any]:
    """Seconds to turn one profile of `ops` small CPU ops into per-op self times: the raw kineto events
    (`raw_self_times`, what `profile_batch` does) against PyTorch's FunctionEvents (`prof.events()`, which
    `key_averages()` also builds first), on the same profile."""
    from torch.profiler import profile

    a = torch.randn(8, 8)
    with profile(**_profiler_kwargs(torch.device("cpu"))) as prof:
        for _ in range(ops // 2):
            a.add(1).mul(2)
    t0 = time.perf_counter()
    raw = raw_self_times(prof.profiler.kineto_results.events(), cuda=False)
    t1 = time.perf_counter()
    ref = event_self_times(prof.events(), cuda=False)
    t2 = time.perf_counter()
    return {
        "ops": ops,
        "raw_events_s": round(t1 - t0, 3),
        "function_events_s": round(t2 - t1, 3),
        "same_ops_and_calls": {k: v[1] for k, v in raw.items()} == {k: v[1] for k, v in ref.items()},
    }


if __name__ == "__main__":  # python -m tckr_engine.bench.profile [OPS]
    import json
    import sys

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    log.info(json.dumps(postprocessing_cost(int(sys.argv[1]) if len(sys.argv) > 1 else 50_000)))
