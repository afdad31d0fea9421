#!/usr/bin/env bash
# Issue 4's full-scale study on Fashion-MNIST (docs/results/README.md, "Full-scale study"): rerun with
#   scripts/issue4-results.sh [0.2x|1x|sweep|all]      (default: all, in that order)
# 0.2x : tckr-engine run configs/fashion-mnist-0.2x.toml  (small-cnn teacher, 12,000 images, soft- and
#        hard-label students, 16 shadow models; ~2 h on 2 cores)
# 1x   : tckr-engine run configs/fashion-mnist-1x.toml    (60,000 images; the 0.2x run's teacher and shadow
#        models reused; ~2.5 h of generation + ~40 min per student on 2 cores)
# sweep: one `tckr-engine evaluate` of the teacher and the four students against the same shadow models:
#        the accuracy / AUC / AOP against synthetic-set size figure, one line per label kind (minutes)
# Every step resumes: `run` skips finished stages and generates / trains from where it stopped, `evaluate`
# reuses the shadow models. Results are copied to docs/results/fmnist-{0.2x,1x,sweep}/.
set -euo pipefail
cd "$(dirname "$0")/.."
TE=.venv/bin/tckr-engine
D=docs/results
R=runs
SMALL=$R/fashion-mnist-0.2x
FULL=$R/fashion-mnist-1x
SWEEP=$R/fashion-mnist-sweep

publish() {  # publish RUN_OR_EVAL_FOLDER DEST: report, figures, config, stage record, per-model metrics
  local src=$1 dest=$2
  mkdir -p "$dest/figures"
  cp "$src/report.md" "$src/report.json" "$dest/"
  cp "$src"/figures/*.png "$dest/figures/"
  for f in config.toml stages.json; do
    if [ -f "$src/$f" ]; then cp "$src/$f" "$dest/"; fi
  done
  if [ -f "$src/synthetic/quality.json" ]; then cp "$src/synthetic/quality.json" "$dest/"; fi
  for m in "$src"/student*/metrics.json; do
    if [ -f "$m" ]; then cp "$m" "$dest/$(basename "$(dirname "$m")")-metrics.json"; fi
  done
}

small() {
  $TE run configs/fashion-mnist-0.2x.toml
  publish "$SMALL" "$D/fmnist-0.2x"
  mkdir -p "$D/fmnist-0.2x/teacher"  # the 1x half reuses these weights
  cp "$SMALL"/teacher/{metrics.json,classifier.json,model.safetensors} "$D/fmnist-0.2x/teacher/"
}

full() {
  if [ ! -f "$SMALL/teacher/metrics.json" ]; then  # a fresh checkout: the committed teacher weights
    mkdir -p "$SMALL/teacher"
    cp "$D"/fmnist-0.2x/teacher/{metrics.json,classifier.json,model.safetensors} "$SMALL/teacher/"
  fi
  $TE run configs/fashion-mnist-1x.toml  # trains the 16 shadows into $SMALL/privacy/shadows if missing
  publish "$FULL" "$D/fmnist-1x"
}

sweep() {  # the [evaluate] settings of both configs, so the shared shadow models match
  $TE evaluate "teacher=$SMALL/teacher" "$SMALL/student-0.2x" "$SMALL/student-0.2x-hard" \
    "$FULL/student-1x" "$FULL/student-1x-hard" --teacher "$SMALL/teacher" --out "$SWEEP" \
    --shadows "$SMALL/privacy/shadows" --num-shadows 16 --members 2500 --epochs 15 --seed 0 --threads 2
  publish "$SWEEP" "$D/fmnist-sweep"
}

case "${1:-all}" in
  0.2x) small ;;
  1x) full ;;
  sweep) sweep ;;
  all) small; full; sweep ;;
  *) echo "usage: $0 [0.2x|1x|sweep|all]" >&2; exit 2 ;;
esac
