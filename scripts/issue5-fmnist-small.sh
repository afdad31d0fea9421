#!/usr/bin/env bash
# Issue 5 (b) on Fashion-MNIST with a small teacher: plain KD vs KD + BSS on a fraction of the real train split,
# same seeds (docs/results/README.md, "Teacher-driven synthesisers"). Rerun with
#   scripts/issue5-fmnist-small.sh            (PCTS="20", SEEDS="0", EPOCHS=10; PCTS="20 100" adds 100 %)
# The teacher is the demo's recipe (small-cnn, 3 epochs, 2 threads, seed 0: what `make demo` trains into
# runs/demo/teacher); it is trained here unless $TEACHER already holds it. Students: small-cnn, one thread each.
# Finished runs (metrics.json present) are skipped, so a rerun resumes. JSON under docs/results/issue5/runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=.venv/bin/python
TE=.venv/bin/tckr-engine
R=${RUNS:-runs/issue5}
D=docs/results/issue5
T=${TEACHER:-$R/fmnist-teacher-small}
PCTS=${PCTS:-20}
SEEDS=${SEEDS:-0}
EPOCHS=${EPOCHS:-10}
mkdir -p "$R" "$D/runs"

[ -f "$T/metrics.json" ] || OMP_NUM_THREADS=2 $TE teacher --out "$T" --dataset fashion-mnist --arch small-cnn \
  --epochs 3 --threads 2 --seed 0 --overwrite
cp "$T/metrics.json" "$D/fmnist-teacher-small-cnn-metrics.json"

train() {  # train NAME SHARDS [extra train flags...]
  local name=$1 shards=$2; shift 2
  [ -f "$R/$name/metrics.json" ] || $TE train --shards "$shards" --out "$R/$name" --teacher "$T" \
    --dataset fashion-mnist --arch small-cnn --workers 0 --threads 1 "$@" --overwrite
  cp "$R/$name/metrics.json" "$D/runs/$name.json"
}

for seed in $SEEDS; do
  for pct in $PCTS; do
    shards=$R/fmnist-real-$pct-s$seed
    [ -f "$shards/index.json" ] || $PY -c "
from tckr_engine.data.real_shards import write_real_shards
write_real_shards('fashion-mnist', '$shards', fraction=$pct / 100, seed=$seed, shard_size=1024)"
    train "fmnist-small-$pct-kd-s$seed" "$shards" --epochs "$EPOCHS" --seed "$seed"
    train "fmnist-small-$pct-bss-s$seed" "$shards" --epochs "$EPOCHS" --seed "$seed" --bss
  done
done
