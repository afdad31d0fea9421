#!/usr/bin/env bash
# Everything a lent GPU machine should measure, in one call of under 10 minutes:
#   run(command="bash scripts/gpu-check.sh", carry=[".whl"])     (after scripts/fetch-gpu-wheels.sh here)
# Installs the carried wheels, runs the GPU tests, the attention-kernel benchmark and an sd15-arch generation
# throughput run, and writes everything under $OUT (logs, CSV/JSON) with device, versions and git sha.
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

echo "== sd15-arch generation throughput (512 px, 20 steps, CFG 2, fp16)"
for attn in sdpa triton; do
  timeout 150 python3 -m tckr_engine.cli generate --shards "/tmp/gen-$attn" --model sd15-arch --dataset digits \
    --device cuda --dtype fp16 --attention "$attn" --num-images 64 --shard-size 64 --batch-size 16 --steps 20 \
    --format jpg --overwrite 2>&1 | tail -2 | tee -a "$OUT/generate.log"
done
ls -la "$OUT"
