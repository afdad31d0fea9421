#!/usr/bin/env bash
# Everything a lent GPU machine should measure, in one call of under 10 minutes:
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"], timeout_s=600)   (after scripts/fetch-gpu-wheels.sh)
# Installs the carried wheels, then, most valuable first: `tckr-engine bench` on sd15-arch (the issue-8
# figures, and with --profile where each row's GPU time goes, by kind of kernel), the attention-kernel
# benchmark, the GPU tests. Each step gets a share of one deadline
# ($GPU_CHECK_SECONDS, default 560 s of the device tool's 600 s per call), and the bench has a --time-budget
# inside its timeout, so it writes its results rather than being killed. The device tool returns at most 8
# files from $OUT: log.txt (environment + every step's output), kernels/{csv,json,png}, bench/{csv,json,png}.
# Back here: `python -m tckr_engine.bench.results <files_at>/bench/throughput-sd15-arch-cuda.json --out PAGE.md`
# writes the page for docs/bench, the issue-8 targets judged on the run included.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
LIMIT=${GPU_CHECK_SECONDS:-560}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT/kernels" "$OUT/bench"
LOG="$OUT/log.txt"
left() { echo $((LIMIT - (SECONDS - START))); }
share() {  # share WANT RESERVE: at most WANT seconds, keeping RESERVE seconds for the steps after
  local s=$(($(left) - $2))
  ((s > $1)) && s=$1
  ((s < 30)) && s=30
  echo "$s"
}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} 2>&1 | tee "$LOG"

T=$(share 330 170)
echo "== tckr-engine bench: sd15-arch at 512 px, 20 steps, CFG 2, fp16, beside the plain diffusers pipeline (${T} s)" | tee -a "$LOG"
timeout "$T" python3 -m tckr_engine.cli bench --preset sd15-arch --device cuda --dtype fp16 --batch-sizes 8 \
  --images 32 --repeats 2 --backends torch,compile,onnxruntime,tensorrt --attention sdpa,triton,xformers \
  --train-steps 32 --train-batch-size 32 --train-workers 8 --time-budget $((T > 140 ? T - 70 : T / 2)) --profile \
  --out "$OUT/bench" --note "scripts/gpu-check.sh" 2>&1 | tee -a "$LOG" | tail -32

T=$(share 120 60)
echo "== attention kernel benchmark (${T} s)" | tee -a "$LOG"
timeout "$T" python3 -m tckr_engine.bench.kernels --out-dir "$OUT/kernels" --device cuda 2>&1 | tee -a "$LOG" | tail -25

T=$(share 240 0)
echo "== GPU tests (${T} s)" | tee -a "$LOG"
timeout "$T" python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee -a "$LOG" | tail -15

echo "== done in $((SECONDS - START)) s" | tee -a "$LOG"
find "$OUT" -type f | sort
