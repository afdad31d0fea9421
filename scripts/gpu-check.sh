#!/usr/bin/env bash
# Everything a lent GPU machine should measure, in one call of under 10 minutes:
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"])     (after scripts/fetch-gpu-wheels.sh here)
# Installs the carried wheels, runs the GPU tests, the attention-kernel benchmark and `tckr-engine bench` on
# sd15-arch, and writes everything under $OUT (logs, CSV/JSON) with device, versions and git sha.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  echo "git $(git rev-parse HEAD 2>/dev/null || echo unknown)"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

echo "== GPU tests"
timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu-tests.log" | tail -15

echo "== attention kernel benchmark"
timeout 180 python3 -m tckr_engine.bench.kernels --out-dir "$OUT" --device cuda 2>&1 | tee "$OUT/kernel-bench.log" | tail -25

echo "== tckr-engine bench: sd15-arch at 512 px, 20 steps, CFG 2, fp16, beside the plain diffusers pipeline"
timeout 330 python3 -m tckr_engine.cli bench --preset sd15-arch --device cuda --dtype fp16 --batch-sizes 8 \
  --images 32 --repeats 2 --backends torch,compile,onnxruntime,tensorrt --attention sdpa,triton,xformers \
  --train-steps 32 --train-batch-size 32 --train-workers 8 --out "$OUT/bench" --note "scripts/gpu-check.sh" 2>&1 | tee "$OUT/bench.log" | tail -25

ls -la "$OUT"
