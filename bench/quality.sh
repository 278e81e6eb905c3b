#!/usr/bin/env bash
# Real-data quality run (issue #3): AG-MAN vs ASEN_v2 vs global on fashion-products, same budget,
# plus the untrained ImageNet floor. Writes RUN_DIR/*/metrics.jsonl, RUN_DIR/*_test.json and
# RUN_DIR/results.md (the table published in docs/results.md).
#
# Usage: bench/quality.sh [RUN_DIR]      (env: AGMAN_SHARED_DIR, EPOCHS, TRIPLETS, IMAGE_SIZE, FREEZE)
# Budget (2 shared CPU cores): MobileNetV2 ImageNet trunk frozen, its maps cached once (exactly
# the frozen model, see agman_milvus/training/feature_cache.py), 128 px, 16 epochs x 1,600
# re-sampled triplets (batch 16) per model, one torch thread (faster than 2 on a busy machine).
# FREEZE="" trains the whole network instead (far slower).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN_DIR=${1:-/tmp/agman_quality}
SHARED=${AGMAN_SHARED_DIR:-$(cd .. && pwd)/shared}
CATALOG=$SHARED/data/fashion-products/manifest.csv
EPOCHS=${EPOCHS:-16}
TRIPLETS=${TRIPLETS:-1600}
IMAGE_SIZE=${IMAGE_SIZE:-128}
FREEZE=${FREEZE:---freeze-backbone --cache-features --cache-path $RUN_DIR/feature_cache.safetensors}
AGMAN=${AGMAN:-.venv/bin/agman}
[ -f "$CATALOG" ] || { echo "no catalog at $CATALOG (set AGMAN_SHARED_DIR)" >&2; exit 1; }
mkdir -p "$RUN_DIR"

DATA=(--catalog "$CATALOG" --attributes articleType,baseColour,gender,usage,season,subCategory
      --min-count 10 --split-seed 0)
COMMON=(--backbone mobilenet_v2 --pretrained --image-size "$IMAGE_SIZE" --epochs "$EPOCHS"
        --triplets-per-epoch "$TRIPLETS" --batch-size 16 --lr 1e-4 --step-size 3 --gamma 0.9
        --margin 0.2 --seed 1 --device auto --workers 1 --threads 1 $FREEZE)

for model in agman asen_v2 global; do
  start=$(date +%s)
  $AGMAN train "$model" -o "$RUN_DIR/$model" "${DATA[@]}" "${COMMON[@]}"
  echo "$model train seconds: $(( $(date +%s) - start ))" | tee -a "$RUN_DIR/timing.txt"
  $AGMAN eval --checkpoint "$RUN_DIR/$model/best.safetensors" "${DATA[@]}" --split test \
      --workers 1 --threads 1 -o "$RUN_DIR/${model}_test.json"
done
$AGMAN eval --imagenet-floor mobilenet_v2 --image-size "$IMAGE_SIZE" "${DATA[@]}" --split test \
    --workers 1 --threads 1 -o "$RUN_DIR/imagenet_floor_test.json"
.venv/bin/python bench/quality_table.py "$RUN_DIR" > "$RUN_DIR/results.md"
cat "$RUN_DIR/results.md"
