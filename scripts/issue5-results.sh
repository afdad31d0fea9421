#!/usr/bin/env bash
# Issue 5 measurements (docs/results/README.md, "Teacher-driven synthesisers"): rerun with
#   scripts/issue5-results.sh [teacher|a|b|fmnist|fmnist-small|summary|all]
#   (default: all = the digits parts and the summary; a and b may run in parallel)
# (a) a student trained only on activation-maximised images vs its teacher, on digits;
# (b) plain KD vs KD + BSS on digits with 20 % and 100 % of the real training images, seeds 0 1 2;
# fmnist: (a) and (b, 20 % only, FMNIST_EPOCHS epochs) on Fashion-MNIST with the resnet-small teacher of
#   `tckr-engine teacher --out runs/fmnist-teacher --epochs 14` (FMNIST_TEACHER).
# fmnist-small: (b) on Fashion-MNIST with the demo's teacher recipe (small-cnn, 3 epochs, 2 threads, seed 0:
#   what `make demo` trains into runs/demo/teacher), trained here unless FMNIST_SMALL_TEACHER holds it;
#   PCTS (default "20"; "20 100" adds 100 %) x FMNIST_SEEDS (default "0") x KINDS (default "kd bss": plain KD,
#   KD + BSS; "kdce" adds the BSS recipe with beta 0; one kind per job lets two single-thread jobs share a 2-core
#   machine), FMNIST_EPOCHS epochs.
# Everything on CPU with one thread. Finished runs (metrics.json present) are skipped and an interrupted one
# resumes from its last epoch's checkpoint, so a rerun picks up where the last one stopped.
# Outputs: runs under $RUNS (default runs/issue5), JSON under docs/results/issue5/.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=.venv/bin/python
TE=.venv/bin/tckr-engine
R=${RUNS:-runs/issue5}
D=docs/results/issue5
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS_A=${EPOCHS_A:-30}          # student epochs on activation-maximised images
EPOCHS_B=${EPOCHS_B:-30}          # student epochs in the KD vs KD + BSS comparison
AM_IMAGES=${AM_IMAGES:-2048}      # activation-maximised images (class-balanced)
T=$R/digits-teacher
FT=${FMNIST_TEACHER:-runs/fmnist-teacher}
FMNIST_EPOCHS=${FMNIST_EPOCHS:-10}
FST=${FMNIST_SMALL_TEACHER:-$R/fmnist-teacher-small}
mkdir -p "$R" "$D/runs"

teacher() {  # resnet-small digits teacher, 30 epochs (best epoch on the validation split)
  [ -f "$T/metrics.json" ] || $TE teacher --out "$T" --dataset digits --arch resnet-small --epochs 30 \
    --threads 1 --seed 0 --overwrite
  cp "$T/metrics.json" "$D/digits-teacher-resnet-small-metrics.json"
}

train() {  # train NAME SHARDS [extra train flags...]: one small-cnn student, skipped when finished
  local name=$1 shards=$2; shift 2
  [ -f "$R/$name/metrics.json" ] || $TE train --shards "$shards" --out "$R/$name" --teacher "$T" \
    --dataset "${DS:-digits}" --arch small-cnn --workers 0 --threads 1 "$@"
  cp "$R/$name/metrics.json" "$D/runs/$name.json"
}

part_a() {  # activation maximisation from the teacher alone (default regularisers, 200 Adam steps)
  [ -f "$R/digits-am/index.json" ] || $PY -c "
from tckr_engine.synth.sources import SynthConfig, generate_synthetic
s = generate_synthetic(SynthConfig(source='activation-max', teacher='$T', dataset='digits',
    num_images=$AM_IMAGES, shard_size=256, batch_size=64, seed=0, device='cpu', threads=1), '$R/digits-am')
import json; json.dump({'images': s.images, 'seconds': round(s.seconds, 1)}, open('$R/digits-am/summary.json', 'w'))
"
  cp "$R/digits-am/summary.json" "$D/digits-am-generate.json"
  train digits-am-online "$R/digits-am" --epochs "$EPOCHS_A" --labels online --seed 0
  train digits-am-hard "$R/digits-am" --epochs "$EPOCHS_A" --labels hard --seed 0
}

real_shards() {  # real_shards DATASET PCT SEED SHARD_SIZE: prints the folder of PCT % of the real train split
  local shards=$R/$1-real-$2-s$3  # the train side of the student's own train/val split (same seed)
  [ -f "$shards/index.json" ] || $PY -c "
from tckr_engine.data.real_shards import write_real_shards
write_real_shards('$1', '$shards', fraction=$2 / 100, seed=$3, shard_size=$4)" >&2
  echo "$shards"
}

part_b() {
  for seed in $SEEDS; do
    for pct in 20 100; do
      local shards
      shards=$(real_shards digits "$pct" "$seed" 256)
      local common=(--epochs "$EPOCHS_B" --seed "$seed")
      train "digits-$pct-kd-s$seed" "$shards" "${common[@]}"                      # trainer's KD (T 1, ls 0.1)
      train "digits-$pct-kdce-s$seed" "$shards" "${common[@]}" --bss --bss-beta 0  # BSS recipe, β = 0
      train "digits-$pct-bss-s$seed" "$shards" "${common[@]}" --bss                # KD + BSS (reference)
    done
  done
}

fmnist() {  # Fashion-MNIST: activation-max student vs the teacher; KD vs KD + BSS at 20 %, seed 0
  [ -f "$FT/metrics.json" ] || { echo "no Fashion-MNIST teacher at $FT (see the header)" >&2; exit 2; }
  cp "$FT/metrics.json" "$D/fmnist-teacher-resnet-small-metrics.json"
  [ -f "$R/fmnist-am/index.json" ] || $TE generate --source activation-max --teacher "$FT" \
    --dataset fashion-mnist --shards "$R/fmnist-am" --num-images "$AM_IMAGES" --shard-size 256 \
    --batch-size 64 --seed 0 --device cpu --threads 1
  local t=$T; T=$FT; DS=fashion-mnist
  train fmnist-am-online "$R/fmnist-am" --epochs "$EPOCHS_A" --labels online --seed 0
  local shards
  shards=$(real_shards fashion-mnist 20 0 1024)
  train fmnist-20-kd-s0 "$shards" --epochs "$FMNIST_EPOCHS" --seed 0
  train fmnist-20-bss-s0 "$shards" --epochs "$FMNIST_EPOCHS" --seed 0 --bss
  T=$t; DS=digits
}

fmnist_small() {  # Fashion-MNIST: KD vs KD + BSS with the demo's small-cnn teacher
  [ -f "$FST/metrics.json" ] || OMP_NUM_THREADS=2 $TE teacher --out "$FST" --dataset fashion-mnist \
    --arch small-cnn --epochs 3 --threads 2 --seed 0 --overwrite
  cp "$FST/metrics.json" "$D/fmnist-teacher-small-cnn-metrics.json"
  local t=$T shards; T=$FST; DS=fashion-mnist
  for seed in ${FMNIST_SEEDS:-0}; do
    for pct in ${PCTS:-20}; do
      shards=$(real_shards fashion-mnist "$pct" "$seed" 1024)
      for kind in ${KINDS:-kd bss}; do
        case $kind in
          kd) train "fmnist-small-$pct-kd-s$seed" "$shards" --epochs "$FMNIST_EPOCHS" --seed "$seed" ;;
          bss) train "fmnist-small-$pct-bss-s$seed" "$shards" --epochs "$FMNIST_EPOCHS" --seed "$seed" --bss ;;
          kdce) train "fmnist-small-$pct-kdce-s$seed" "$shards" --epochs "$FMNIST_EPOCHS" --seed "$seed" \
            --bss --bss-beta 0 ;;  # the BSS recipe without its boundary term (the control)
          *) echo "unknown kind '$kind' in KINDS (use kd, bss and/or kdce)" >&2; exit 2 ;;
        esac
      done
    done
  done
  T=$t; DS=digits
}

summary() {  # one table of every finished run
  $PY - "$D" <<'EOF'
import json, re, sys
from pathlib import Path
d = Path(sys.argv[1])
rows = {}
for f in sorted((d / "runs").glob("*.json")):
    m = json.loads(f.read_text())
    rows[f.stem] = {
        "test_accuracy": m["test_accuracy"], "best_epoch": m["best_epoch"],
        "best_val_accuracy": m["best_val_accuracy"], "images": m["train_samples"] // m["config"]["epochs"],
        "epochs": m["config"]["epochs"], "seconds": m["seconds"], "threads": m["torch_threads"],
        "labels": m["labels"], "bss": m.get("bss"), "seed": m["config"]["seed"],
    }
t = json.loads((d / "digits-teacher-resnet-small-metrics.json").read_text())
out = {"teacher": {"arch": t["arch"], "test_accuracy": t["test_accuracy"], "seconds": t["seconds"]}, "runs": rows}
ft = d / "fmnist-teacher-resnet-small-metrics.json"
if ft.exists():
    t = json.loads(ft.read_text())
    out["fmnist_teacher"] = {"arch": t["arch"], "test_accuracy": t["test_accuracy"], "seconds": t["seconds"]}
groups = {}
for k, r in rows.items():  # seeds of one setting: NAME-sSEED
    groups.setdefault(re.sub(r"-s\d+$", "", k), []).append(r["test_accuracy"])
out["by_setting"] = {
    g: {"seeds": len(v), "mean": sum(v) / len(v), "min": min(v), "max": max(v), "test_accuracy": v}
    for g, v in groups.items()
}
(d / "summary.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
for k, r in rows.items():
    print(f"{k:28s} test {r['test_accuracy']:.4f}  images {r['images']:5d}  {r['seconds']:6.1f} s")
for g, v in out["by_setting"].items():
    print(f"{g:28s} mean {v['mean']:.4f} over {v['seeds']} seed(s) (min {v['min']:.4f}, max {v['max']:.4f})")
EOF
}

case "${1:-all}" in
  teacher) teacher ;;
  a) teacher; part_a ;;
  b) teacher; part_b ;;
  fmnist) fmnist ;;
  fmnist-small) fmnist_small ;;
  summary) summary ;;
  all) teacher; part_a; part_b; summary ;;
  *) echo "usage: $0 [teacher|a|b|fmnist|fmnist-small|summary|all]" >&2; exit 2 ;;
esac
