#!/usr/bin/env bash
# The whole test suite: unit + integration (Milvus Lite, SQLite, PostgreSQL, Redis + Celery
# workers), the real-data tier when ../shared exists, then the real Milvus server tier.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/services.sh
.venv/bin/python -m pytest -q "$@"
if [ -f tests/milvus_server_tier.sh ]; then
  bash tests/milvus_server_tier.sh
fi
