#!/usr/bin/env bash
# Real-data quality run (issues #3, #12): AG-MAN vs ASEN_v2 vs global on fashion-products, same
# recipe and budget, plus the untrained ImageNet floor and a supervised linear probe at the same
# input size. Writes RUN_DIR/*/metrics.jsonl, RUN_DIR/*_test.json (per-attribute MAP with 95%
# bootstrap intervals over queries), RUN_DIR/timing.txt and RUN_DIR/results.md (the table
# published in docs/results.md).
#
# Usage: bench/quality.sh [RUN_DIR]
#   env: AGMAN_SHARED_DIR, RECIPE (product | paper), MODELS (default "agman probe floor asen_v2
#   global"; a row whose RUN_DIR/<row>_test.json exists is skipped), EPOCHS, IMAGE_SIZE, BACKBONE
#   (default efficientnet_lite0 for product, mobilenet_v2 for paper; the floor and the probe use
#   the same trunk), TUNE_MID_BLOCKS (product: fine-tune the mid level's last N blocks; default:
#   the recipe's, 3 on efficientnet_lite0), FOLD_VALID (1, the product default: the models and the
#   probe learn from the valid images too and each model's last epoch is kept, `--fold-valid`;
#   0, the paper default: the valid split picks each model's best epoch), PRECISION (what the
#   feature cache and the training steps compute in, `agman train --precision`: default float32 on
#   CPU; bfloat16 or auto train in bfloat16 on a CPU that computes it natively: the same MAP, 1.5x
#   sooner from nothing at 2 threads, docs/results.md), THREADS (torch threads per process,
#   default 1; 2 is faster on an idle 2-core machine).
# product (default): EfficientNet-Lite0 at 224 px, late taps (AG-MAN's fusion also reads the
#   stride-8 level, `--taps late_fine`; its cache, with those maps, serves the rows after it), frozen
#   mid maps cached once (float16, with mirrors; without the mid level's last 3 blocks, which are
#   fine-tuned with the high stage),
#   value-proxy + in-batch triplet loss, 6 epochs of batch 64
#   (agman_milvus/training/product.py).
# paper: issue #3's budget run of the paper's triplet recipe (frozen trunk, cached maps, 128 px,
#   16 epochs x 1,600 triplets of batch 16).
# One torch thread per process by default (faster than 2 on a busy 2-core machine).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-/tmp/agman_quality}
SHARED=${AGMAN_SHARED_DIR:-$(cd .. && pwd)/shared}
CATALOG=$SHARED/data/fashion-products/manifest.csv
RECIPE=${RECIPE:-product}
if [ "$RECIPE" = product ]; then BACKBONE=${BACKBONE:-efficientnet_lite0}; else BACKBONE=${BACKBONE:-mobilenet_v2}; fi
if [ "$RECIPE" = product ]; then FOLD_VALID=${FOLD_VALID:-1}; else FOLD_VALID=${FOLD_VALID:-0}; fi
FOLD=()
[ "$FOLD_VALID" = 1 ] && FOLD=(--fold-valid)
MODELS=${MODELS:-agman probe floor asen_v2 global}
THREADS=${THREADS:-1}
AGMAN=${AGMAN:-.venv/bin/agman}
[ -f "$CATALOG" ] || { echo "no catalog at $CATALOG (set AGMAN_SHARED_DIR)" >&2; exit 1; }
mkdir -p "$RUN_DIR"

DATA=(--catalog "$CATALOG" --attributes articleType,baseColour,gender,usage,season,subCategory
      --min-count 10 --split-seed 0)
if [ "$RECIPE" = product ]; then
  IMAGE_SIZE=${IMAGE_SIZE:-224}
  COMMON=(--recipe product --backbone "$BACKBONE" --pretrained --image-size "$IMAGE_SIZE"
          --epochs "${EPOCHS:-6}" --batch-size 64 --seed 1 --device auto --workers 1 --threads "$THREADS"
          ${TUNE_MID_BLOCKS:+--tune-mid-blocks "$TUNE_MID_BLOCKS"} ${PRECISION:+--precision "$PRECISION"} "${FOLD[@]}"
          --cache-path "$RUN_DIR/feature_cache.safetensors")
else
  IMAGE_SIZE=${IMAGE_SIZE:-128}
  COMMON=(--recipe paper --backbone "$BACKBONE" --pretrained --image-size "$IMAGE_SIZE"
          --epochs "${EPOCHS:-16}" --triplets-per-epoch 1600 --batch-size 16 --lr 1e-4 --step-size 3
          --gamma 0.9 --margin 0.2 --seed 1 --device auto --workers 1 --threads "$THREADS"
          --freeze-backbone --cache-features --cache-path "$RUN_DIR/feature_cache.safetensors" "${FOLD[@]}"
          ${PRECISION:+--precision "$PRECISION"})
fi
EVAL=("${DATA[@]}" --split test --workers 1 --threads "$THREADS")

timed() {  # timed ROW COMMAND...: run it, append "ROW train seconds: N" to timing.txt
  local row=$1 start
  shift
  start=$(date +%s)
  "$@"
  echo "$row train seconds: $(( $(date +%s) - start ))" | tee -a "$RUN_DIR/timing.txt"
}

for row in $MODELS; do
  [ -f "$RUN_DIR/${row}_test.json" ] && { echo "$row: done already"; continue; }
  case $row in
    floor)
      echo "imagenet_floor train seconds: 0" | tee -a "$RUN_DIR/timing.txt"
      $AGMAN eval --imagenet-floor "$BACKBONE" --image-size "$IMAGE_SIZE" "${EVAL[@]}" -o "$RUN_DIR/floor_test.json" ;;
    probe)  # trained on the train split, then evaluated: its training time is in the eval call
      timed probe $AGMAN eval --linear-probe "$BACKBONE" --image-size "$IMAGE_SIZE" "${EVAL[@]}" "${FOLD[@]}" \
          -o "$RUN_DIR/probe_test.json" ;;
    *)
      timed "$row" $AGMAN train "$row" -o "$RUN_DIR/$row" "${DATA[@]}" "${COMMON[@]}"
      $AGMAN eval --checkpoint "$RUN_DIR/$row/best.safetensors" "${EVAL[@]}" -o "$RUN_DIR/${row}_test.json" ;;
  esac
done
.venv/bin/python bench/quality_table.py "$RUN_DIR" > "$RUN_DIR/results.md"
cat "$RUN_DIR/results.md"
