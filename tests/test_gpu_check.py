"""scripts/gpu-check.sh runs only on a lent GPU machine, rarely and against a clock: its command lines are
checked here against the current CLI, so a renamed option or a bad value cannot waste that machine's call."""

import shlex
import subprocess
import sys
from pathlib import Path

from tckr_engine.errors import TckrError

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu-check.sh"


def script_command(module: str) -> str:
    """The arguments of the script's `python3 -m MODULE ...` call, continuation lines joined, pipes cut."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    lines = [line for line in text.splitlines() if f"python3 -m {module} " in line]
    assert len(lines) == 1, f"expected one call of {module} in {SCRIPT.name}, found {len(lines)}"
    return lines[0].split(f"python3 -m {module} ", 1)[1].split(" 2>&1", 1)[0]


def test_the_gpu_bench_command_parses_and_validates(cli, monkeypatch, tmp_path):
    args = script_command("tckr_engine.cli")
    args = args.replace("$((T > 140 ? T - 70 : T / 2))", "260").replace('"$OUT/bench"', str(tmp_path / "b"))
    assert "$" not in args, f"a shell expression this test does not substitute: {args}"
    seen = {}

    def run_bench(cfg, out, progress=None):  # validated config in hand: stop before any model is built
        seen["cfg"], seen["out"] = cfg, out
        raise TckrError("rehearsal stops here")

    monkeypatch.setattr("tckr_engine.bench.throughput.run_bench", run_bench)
    result = cli(*shlex.split(args))
    assert result.code != 0 and "rehearsal stops here" in result.err, result.err
    cfg = seen["cfg"]
    assert (cfg.preset, cfg.device, cfg.dtype) == ("sd15-arch", "cuda", "fp16")
    assert (cfg.steps, cfg.guidance) == (20, 2)  # the GPU target: 20 steps with CFG
    assert set(cfg.backends) == {"torch", "compile", "onnxruntime", "tensorrt"}
    assert set(cfg.attention) == {"sdpa", "triton", "xformers"}
    assert cfg.train_steps > 0 and cfg.time_budget_s == 260 and seen["out"] == tmp_path / "b"
    assert cfg.profile  # one profiled batch per row: where a GPU's time goes, from the same call


def test_the_kernel_bench_command_names_existing_options():
    module = "tckr_engine.bench.kernels"
    args = shlex.split(script_command(module).replace('"$OUT/kernels"', "OUT"))
    options = {a for a in args if a.startswith("--")}
    assert options, args
    help_text = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert all(o in help_text for o in options), (options, help_text)
